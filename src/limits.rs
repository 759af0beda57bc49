//! Per-agent limits and usage: requests and tokens per minute (token buckets), generation
//! requests in flight, and a share of each model's KV pool; plus what each agent has used.
//! Past a limit the caller gets how long to wait (the HTTP layer's 429 with Retry-After).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::Config;

/// The limits of one agent; 0 is no limit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AgentLimits {
    pub requests_per_minute: u32,
    pub tokens_per_minute: u64,
    pub max_streams: u32,
    pub max_kv_share: f64,
    /// US dollars the agent may spend on remote backends (0: no limit); once spent, requests
    /// no longer spill over.
    pub cloud_budget_usd: f64,
}

/// Every agent's limits, resolved from `[limits]` and `[agents.NAME]`.
#[derive(Clone, Debug)]
pub struct Limits {
    default: AgentLimits,
    agents: HashMap<String, AgentLimits>,
}

impl Limits {
    pub fn from_config(cfg: &Config) -> Self {
        let l = &cfg.limits;
        let default = AgentLimits {
            requests_per_minute: l.requests_per_minute,
            tokens_per_minute: l.tokens_per_minute,
            max_streams: l.max_streams,
            max_kv_share: l.max_kv_share,
            cloud_budget_usd: l.cloud_budget_usd,
        };
        let agents = cfg
            .agents
            .iter()
            .map(|(name, a)| {
                let limits = AgentLimits {
                    requests_per_minute: a
                        .requests_per_minute
                        .unwrap_or(default.requests_per_minute),
                    tokens_per_minute: a.tokens_per_minute.unwrap_or(default.tokens_per_minute),
                    max_streams: a.max_streams.unwrap_or(default.max_streams),
                    max_kv_share: a.max_kv_share.unwrap_or(default.max_kv_share),
                    cloud_budget_usd: a.cloud_budget_usd.unwrap_or(default.cloud_budget_usd),
                };
                (name.clone(), limits)
            })
            .collect();
        Self { default, agents }
    }

    pub fn of(&self, agent: &str) -> AgentLimits {
        self.agents.get(agent).copied().unwrap_or(self.default)
    }
}

/// Why a request was refused, and when to try again.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub message: String,
    pub retry_after: Duration,
}

/// A token bucket holding up to `per_minute`, refilled continuously.
#[derive(Debug)]
pub(crate) struct Bucket {
    pub(crate) level: f64,
    at: Instant,
    /// The limit the level was counted under; a new limit (a reload) starts a full bucket.
    limit: f64,
}

impl Bucket {
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            level: f64::INFINITY,
            at: now,
            limit: 0.0,
        }
    }

    pub(crate) fn refill(&mut self, per_minute: f64, now: Instant) {
        if per_minute != self.limit {
            self.limit = per_minute;
            self.level = per_minute;
        }
        let secs = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + secs * per_minute / 60.0).min(per_minute);
        self.at = now;
    }

    /// Seconds until the level reaches `want`.
    pub(crate) fn wait_for(&self, want: f64, per_minute: f64) -> Duration {
        Duration::from_secs_f64(((want - self.level) * 60.0 / per_minute).max(0.0))
    }
}

/// What one agent has used since the server started.
#[derive(Debug, Default, Clone, Serialize)]
pub struct AgentUsage {
    pub requests: u64,
    pub refused: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    /// The ledger: tokens and cost by backend (`local`, or a provider's name).
    pub backends: std::collections::BTreeMap<String, BackendUsage>,
}

/// What one agent used on one backend.
#[derive(Debug, Default, Clone, Serialize)]
pub struct BackendUsage {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usd: f64,
}

#[derive(Debug)]
struct AgentState {
    requests: Bucket,
    tokens: Bucket,
    streams: u32,
    /// Tokens reserved in each model's KV pool by this agent's requests in flight.
    kv: HashMap<String, usize>,
    usage: AgentUsage,
    seen: Instant,
}

/// Most agents tracked at once; past it idle ones (nothing in flight, buckets full) are forgotten.
const MAX_TRACKED: usize = 4096;

/// The limits in force and every agent's state.
#[derive(Debug, Default)]
pub struct Governor {
    agents: Mutex<HashMap<String, AgentState>>,
}

/// A generation request in flight: holds one of the agent's streams until dropped.
pub struct StreamPermit {
    gov: Arc<Governor>,
    agent: String,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        self.gov
            .with(&self.agent, |s| s.streams = s.streams.saturating_sub(1));
    }
}

/// Tokens of a model's KV pool reserved by one request until dropped.
pub struct KvReservation {
    gov: Arc<Governor>,
    agent: String,
    model: String,
    tokens: usize,
}

impl Drop for KvReservation {
    fn drop(&mut self) {
        let (model, tokens) = (&self.model, self.tokens);
        self.gov.with(&self.agent, |s| {
            if let Some(t) = s.kv.get_mut(model) {
                *t = t.saturating_sub(tokens);
            }
        });
    }
}

impl Governor {
    fn with<R>(&self, agent: &str, f: impl FnOnce(&mut AgentState) -> R) -> R {
        let mut map = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if map.len() >= MAX_TRACKED && !map.contains_key(agent) {
            map.retain(|_, s| {
                s.streams > 0
                    || s.kv.values().any(|&t| t > 0)
                    || now.saturating_duration_since(s.seen) < Duration::from_secs(60)
            });
        }
        let s = map.entry(agent.to_string()).or_insert_with(|| AgentState {
            requests: Bucket::new(now),
            tokens: Bucket::new(now),
            streams: 0,
            kv: HashMap::new(),
            usage: AgentUsage::default(),
            seen: now,
        });
        s.seen = now;
        f(s)
    }

    /// Admit one request of `agent`. Only generation requests count: against requests and
    /// tokens per minute, and each takes one of the agent's streams while in flight.
    pub fn admit(
        self: &Arc<Self>,
        agent: &str,
        limits: AgentLimits,
        generation: bool,
    ) -> Result<Option<StreamPermit>, Refusal> {
        let now = Instant::now();
        self.with(agent, |s| {
            let refused = |s: &mut AgentState, message: String, retry_after: Duration| {
                s.usage.refused += 1;
                Err(Refusal {
                    message,
                    retry_after,
                })
            };
            if !generation {
                return Ok(None);
            }
            let rpm = limits.requests_per_minute as f64;
            if rpm > 0.0 {
                s.requests.refill(rpm, now);
                if s.requests.level < 1.0 {
                    let wait = s.requests.wait_for(1.0, rpm);
                    return refused(
                        s,
                        format!(
                            "agent '{agent}' is over its limit of {} requests per minute",
                            limits.requests_per_minute
                        ),
                        wait,
                    );
                }
            }
            let tpm = limits.tokens_per_minute as f64;
            if tpm > 0.0 {
                s.tokens.refill(tpm, now);
                if s.tokens.level <= 0.0 {
                    let wait = s.tokens.wait_for(1.0, tpm);
                    return refused(
                        s,
                        format!(
                            "agent '{agent}' is over its limit of {} tokens per minute",
                            limits.tokens_per_minute
                        ),
                        wait,
                    );
                }
            }
            if limits.max_streams > 0 && s.streams >= limits.max_streams {
                return refused(
                    s,
                    format!(
                        "agent '{agent}' already has {} requests in flight, its limit",
                        s.streams
                    ),
                    Duration::from_secs(1),
                );
            }
            if rpm > 0.0 {
                s.requests.level -= 1.0;
            }
            s.usage.requests += 1;
            s.streams += 1;
            Ok(Some(StreamPermit {
                gov: self.clone(),
                agent: agent.to_string(),
            }))
        })
    }

    /// Reserve `tokens` of `model`'s pool of `capacity` tokens for a request of `agent`.
    pub fn reserve_kv(
        self: &Arc<Self>,
        agent: &str,
        limits: AgentLimits,
        model: &str,
        tokens: usize,
        capacity: usize,
    ) -> Result<KvReservation, Refusal> {
        let cap = (limits.max_kv_share * capacity as f64).floor() as usize;
        self.with(agent, |s| {
            let held = s.kv.get(model).copied().unwrap_or(0);
            if limits.max_kv_share < 1.0 && held + tokens > cap {
                s.usage.refused += 1;
                return Err(Refusal {
                    message: format!(
                        "agent '{agent}' may hold {cap} tokens of model '{model}' KV ({}% of the pool); it holds {held} and this request needs {tokens}",
                        (limits.max_kv_share * 100.0).round()
                    ),
                    retry_after: Duration::from_secs(1),
                });
            }
            *s.kv.entry(model.to_string()).or_insert(0) += tokens;
            Ok(KvReservation {
                gov: self.clone(),
                agent: agent.to_string(),
                model: model.to_string(),
                tokens,
            })
        })
    }

    /// Count what a finished choice used against the agent's tokens per minute and usage.
    pub fn charge(&self, agent: &str, limits: AgentLimits, u: &crate::engine::Usage) {
        let now = Instant::now();
        self.with(agent, |s| {
            let tpm = limits.tokens_per_minute as f64;
            if tpm > 0.0 {
                s.tokens.refill(tpm, now);
                s.tokens.level -= (u.prompt_tokens + u.completion_tokens) as f64;
            }
            s.usage.prompt_tokens += u.prompt_tokens as u64;
            s.usage.completion_tokens += u.completion_tokens as u64;
            s.usage.cached_tokens += u.cached_tokens as u64;
            let b = s.usage.backends.entry("local".into()).or_default();
            b.requests += 1;
            b.prompt_tokens += u.prompt_tokens as u64;
            b.completion_tokens += u.completion_tokens as u64;
        })
    }

    /// Record a request another backend served for `agent`: its tokens (against the agent's
    /// tokens per minute too) and its cost.
    pub fn charge_remote(
        &self,
        agent: &str,
        limits: AgentLimits,
        backend: &str,
        prompt: u64,
        completion: u64,
        cost: f64,
    ) {
        let now = Instant::now();
        self.with(agent, |s| {
            let tpm = limits.tokens_per_minute as f64;
            if tpm > 0.0 {
                s.tokens.refill(tpm, now);
                s.tokens.level -= (prompt + completion) as f64;
            }
            s.usage.prompt_tokens += prompt;
            s.usage.completion_tokens += completion;
            let b = s.usage.backends.entry(backend.to_string()).or_default();
            b.requests += 1;
            b.prompt_tokens += prompt;
            b.completion_tokens += completion;
            b.cost_usd += cost;
        })
    }

    /// What `agent` has spent on remote backends, in US dollars.
    pub fn remote_spend(&self, agent: &str) -> f64 {
        let map = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        map.get(agent)
            .map(|s| s.usage.backends.values().map(|b| b.cost_usd).sum())
            .unwrap_or(0.0)
    }

    /// What `agent` has used.
    pub fn usage(&self, agent: &str) -> AgentUsage {
        let map = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        map.get(agent).map(|s| s.usage.clone()).unwrap_or_default()
    }

    /// What every tracked agent has used.
    pub fn all_usage(&self) -> std::collections::BTreeMap<String, AgentUsage> {
        let map = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .map(|(a, s)| (a.clone(), s.usage.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rpm: u32, tpm: u64, streams: u32, share: f64) -> AgentLimits {
        AgentLimits {
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
            max_streams: streams,
            max_kv_share: share,
            cloud_budget_usd: 0.0,
        }
    }

    #[test]
    fn requests_per_minute_refuse_with_a_wait() {
        let g = Arc::new(Governor::default());
        let l = limits(2, 0, 0, 1.0);
        assert!(g.admit("a", l, true).is_ok());
        assert!(g.admit("a", l, true).is_ok());
        // Other routes (listing models, usage) do not count.
        assert!(g.admit("a", l, false).unwrap().is_none());
        let r = g.admit("a", l, true).err().unwrap();
        assert!(r.retry_after > Duration::from_secs(25), "{r:?}");
        assert!(r.retry_after <= Duration::from_secs(30), "{r:?}");
        // Another agent has its own bucket.
        assert!(g.admit("b", l, true).is_ok());
        assert_eq!(g.usage("a").refused, 1);
        assert_eq!(g.usage("a").requests, 2);
    }

    #[test]
    fn streams_and_tokens_and_kv_share() {
        let g = Arc::new(Governor::default());
        let l = limits(0, 100, 1, 0.5);
        let p = g.admit("a", l, true).unwrap();
        assert!(g.admit("a", l, true).is_err());
        drop(p);
        let _p = g.admit("a", l, true).unwrap();
        let u = crate::engine::Usage {
            prompt_tokens: 90,
            completion_tokens: 20,
            cached_tokens: 5,
            ..Default::default()
        };
        g.charge("a", l, &u);
        let r = g.admit("a", limits(0, 100, 0, 1.0), true).err().unwrap();
        assert!(r.message.contains("tokens per minute"), "{r:?}");
        assert_eq!(g.usage("a").prompt_tokens, 90);
        // Half of a 1,000-token pool: 400 + 100 fit, one more token does not.
        let k = g.reserve_kv("a", l, "m", 400, 1000).unwrap();
        let _k2 = g.reserve_kv("a", l, "m", 100, 1000).unwrap();
        assert!(g.reserve_kv("a", l, "m", 1, 1000).is_err());
        drop(k);
        assert!(g.reserve_kv("a", l, "m", 400, 1000).is_ok());
    }
}

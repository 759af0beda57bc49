//! Remote backends a model spills over to when the local engine cannot take a request: any
//! OpenAI-compatible API (OpenAI, Groq, DeepSeek, vLLM, Ollama, another aios).
//!
//! A provider owns its limits: concurrency (a semaphore), requests and tokens per minute
//! (token buckets; a request waits for them, up to the timeout, rather than fail), retries with
//! backoff that honour `Retry-After`, and a cooldown after consecutive failures. Its key comes
//! from an environment variable and never reaches logs, errors or metrics.

pub mod anthropic;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::config::ProviderConfig;
use crate::limits::Bucket;

/// Which OpenAI route a request is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Chat,
    Completions,
}

impl Route {
    fn path(self) -> &'static str {
        match self {
            Route::Chat => "chat/completions",
            Route::Completions => "completions",
        }
    }
}

/// Why a provider did not answer.
#[derive(Debug, Clone)]
pub struct ProviderError {
    pub message: String,
    /// The provider's own HTTP status, when it answered with an error.
    pub status: Option<u16>,
}

pub struct Provider {
    pub cfg: ProviderConfig,
    client: reqwest::Client,
    key: Option<String>,
    slots: Option<tokio::sync::Semaphore>,
    buckets: Mutex<(Bucket, Bucket)>,
    failures: AtomicU32,
    resting_until: Mutex<Option<Instant>>,
}

impl Provider {
    pub fn new(cfg: ProviderConfig) -> Result<Self, String> {
        let key = if cfg.api_key_env.is_empty() {
            None
        } else {
            std::env::var(&cfg.api_key_env).ok()
        };
        if !cfg.api_key_env.is_empty() && key.is_none() {
            tracing::warn!(
                "provider '{}': ${} is not set; calling it without a key",
                cfg.name,
                cfg.api_key_env
            );
        }
        // No total timeout on the client: a streamed answer may run longer than `timeout_secs`
        // (it must not stall that long); a whole answer gets it per request, in `send`.
        let limit = Duration::from_secs(cfg.timeout_secs.max(1));
        let client = reqwest::Client::builder()
            .connect_timeout(limit)
            .read_timeout(limit)
            .build()
            .map_err(|e| format!("provider '{}': {e}", cfg.name))?;
        let now = Instant::now();
        Ok(Self {
            slots: (cfg.max_concurrency > 0)
                .then(|| tokio::sync::Semaphore::new(cfg.max_concurrency)),
            client,
            key,
            buckets: Mutex::new((Bucket::new(now), Bucket::new(now))),
            failures: AtomicU32::new(0),
            resting_until: Mutex::new(None),
            cfg,
        })
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// Whether this provider speaks Anthropic's Messages API (translated both ways).
    pub fn is_anthropic(&self) -> bool {
        self.cfg.kind == "anthropic"
    }

    /// Whether the provider is resting after repeated failures.
    pub fn resting(&self) -> bool {
        let mut r = self.resting_until.lock().unwrap_or_else(|p| p.into_inner());
        match *r {
            Some(t) if Instant::now() < t => true,
            Some(_) => {
                *r = None;
                false
            }
            None => false,
        }
    }

    /// The provider's name for our model `model`.
    pub fn model_for(&self, model: &str) -> String {
        self.cfg
            .models
            .get(model)
            .cloned()
            .unwrap_or_else(|| model.to_string())
    }

    /// Cost in US dollars of a call that used these tokens.
    pub fn cost(&self, prompt_tokens: u64, completion_tokens: u64) -> f64 {
        (prompt_tokens as f64 * self.cfg.price_input_per_mtok
            + completion_tokens as f64 * self.cfg.price_output_per_mtok)
            / 1e6
    }

    /// Wait until the buckets allow one more request of about `tokens` tokens (or give up at
    /// `deadline`), then take them.
    async fn pace(&self, tokens: u64, deadline: Instant) -> Result<(), ProviderError> {
        let (rpm, tpm) = (
            self.cfg.requests_per_minute as f64,
            self.cfg.tokens_per_minute as f64,
        );
        loop {
            let wait = {
                let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                let mut wait = Duration::ZERO;
                if rpm > 0.0 {
                    b.0.refill(rpm, now);
                    wait = wait.max(b.0.wait_for(1.0, rpm));
                }
                if tpm > 0.0 {
                    b.1.refill(tpm, now);
                    wait = wait.max(b.1.wait_for(1.0, tpm));
                }
                if wait.is_zero() {
                    if rpm > 0.0 {
                        b.0.level -= 1.0;
                    }
                    if tpm > 0.0 {
                        b.1.level -= tokens as f64;
                    }
                    return Ok(());
                }
                wait
            };
            if Instant::now() + wait > deadline {
                return Err(ProviderError {
                    message: format!(
                        "provider '{}' is over its rate limit for longer than the timeout",
                        self.cfg.name
                    ),
                    status: Some(429),
                });
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// Send `body` (an OpenAI request, `model` already mapped) to the provider, retrying what
    /// can be retried; returns the response once its status is a success.
    pub async fn send(
        &self,
        route: Route,
        body: &Value,
        est_tokens: u64,
    ) -> Result<reqwest::Response, ProviderError> {
        let deadline = Instant::now() + Duration::from_secs(self.cfg.timeout_secs.max(1));
        let translated;
        let (body, path) = if self.is_anthropic() {
            if route != Route::Chat {
                return Err(ProviderError {
                    message: format!(
                        "provider '{}' (anthropic) serves chat requests only",
                        self.cfg.name
                    ),
                    status: None,
                });
            }
            translated = anthropic::request(body).map_err(|message| ProviderError {
                message,
                status: None,
            })?;
            (&translated, "messages")
        } else {
            (body, route.path())
        };
        self.pace(est_tokens, deadline).await?;
        let _slot = match &self.slots {
            Some(s) => Some(s.acquire().await.map_err(|_| ProviderError {
                message: "provider closed".into(),
                status: None,
            })?),
            None => None,
        };
        let url = format!("{}/{path}", self.cfg.base_url.trim_end_matches('/'));
        let mut attempt = 0;
        loop {
            let mut req = self.client.post(&url).json(body);
            if body["stream"] != true {
                req = req.timeout(deadline.saturating_duration_since(Instant::now()));
            }
            if self.is_anthropic() {
                req = req.header("anthropic-version", "2023-06-01");
                if let Some(k) = &self.key {
                    req = req.header("x-api-key", k);
                }
            } else if let Some(k) = &self.key {
                req = req.bearer_auth(k);
            }
            let (err, retry_after) = match req.send().await {
                Ok(r) if r.status().is_success() => {
                    self.failures.store(0, Ordering::Relaxed);
                    return Ok(r);
                }
                Ok(r) => {
                    let status = r.status().as_u16();
                    let retry_after = r
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<f64>().ok())
                        .filter(|s| s.is_finite() && *s >= 0.0)
                        .map(|s| Duration::from_secs_f64(s.min(3600.0)));
                    let text = r.text().await.unwrap_or_default();
                    let detail = serde_json::from_str::<Value>(&text)
                        .ok()
                        .and_then(|v| v["error"]["message"].as_str().map(String::from))
                        .unwrap_or_else(|| text.chars().take(200).collect());
                    let e = ProviderError {
                        message: format!(
                            "provider '{}' answered {status}: {detail}",
                            self.cfg.name
                        ),
                        status: Some(status),
                    };
                    if !(status == 429 || status >= 500) {
                        // The request itself is wrong: retrying will not help.
                        return Err(e);
                    }
                    (e, retry_after)
                }
                Err(e) => (
                    ProviderError {
                        // reqwest's message names the URL, never the key.
                        message: format!("provider '{}' unreachable: {e}", self.cfg.name),
                        status: None,
                    },
                    None,
                ),
            };
            attempt += 1;
            let backoff = retry_after
                .unwrap_or(Duration::from_millis(200 << attempt.min(6)))
                .min(Duration::from_secs(30));
            if attempt > self.cfg.max_retries || Instant::now() + backoff > deadline {
                let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
                if self.cfg.cooldown_after_failures > 0 && n >= self.cfg.cooldown_after_failures {
                    let until = Instant::now() + Duration::from_secs(self.cfg.cooldown_secs);
                    *self.resting_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(until);
                    self.failures.store(0, Ordering::Relaxed);
                    tracing::warn!(
                        "provider '{}' failed {n} times in a row; resting {}s",
                        self.cfg.name,
                        self.cfg.cooldown_secs
                    );
                }
                return Err(err);
            }
            tracing::info!(
                "provider '{}': {}; retry {attempt} in {:.1}s",
                self.cfg.name,
                err.message,
                backoff.as_secs_f64()
            );
            tokio::time::sleep(backoff).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(tpm: u64) -> Provider {
        Provider::new(ProviderConfig {
            name: "p".into(),
            kind: "openai".into(),
            base_url: "http://127.0.0.1:9/v1".into(),
            api_key_env: String::new(),
            models: Default::default(),
            timeout_secs: 5,
            max_concurrency: 0,
            requests_per_minute: 0,
            tokens_per_minute: tpm,
            max_retries: 0,
            cooldown_after_failures: 0,
            cooldown_secs: 0,
            price_input_per_mtok: 1.0,
            price_output_per_mtok: 3.0,
        })
        .unwrap()
    }

    #[tokio::test]
    async fn rate_limits_delay_rather_than_fail() {
        // 600 tokens a minute: ten a second. The first call spends the minute's 600.
        let p = provider(600);
        let far = Instant::now() + Duration::from_secs(5);
        p.pace(600, far).await.unwrap();
        // The next waits for the bucket to refill (a tenth of a second), then goes.
        let t0 = Instant::now();
        p.pace(10, far).await.unwrap();
        assert!(
            t0.elapsed() >= Duration::from_millis(50),
            "{:?}",
            t0.elapsed()
        );
        // One that could not go before its deadline fails at once, and says why.
        let e = p
            .pace(10, Instant::now() + Duration::from_millis(10))
            .await
            .unwrap_err();
        assert_eq!(e.status, Some(429));
        assert!(e.message.contains("rate limit"), "{}", e.message);
        assert!((p.cost(1_000_000, 1_000_000) - 4.0).abs() < 1e-9);
    }
}

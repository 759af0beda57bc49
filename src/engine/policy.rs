//! Scheduling policies: which sequences run in the next step when there are more than the
//! engine runs at once. A policy ranks every live sequence each step; the engine runs the first
//! `max_running` of them and pauses the rest (their KV stays where it is, so pausing and
//! resuming lose nothing). A new policy is one `impl Policy`.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

/// What a policy may look at for one live sequence.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub id: u64,
    pub agent: String,
    pub priority: i32,
    pub arrived: Instant,
    /// Tokens still expected: the unprocessed prompt plus the output still allowed.
    pub remaining: usize,
}

/// Tokens a sequence was served in one step.
#[derive(Clone, Copy, Debug, Default)]
pub struct Served {
    pub input: usize,
    pub output: usize,
}

pub trait Policy: Send {
    /// Order `cands` most deserving first; returns indices into `cands`.
    fn rank(&mut self, cands: &[Candidate], now: Instant) -> Vec<usize>;
    /// Account for what an agent was served in the last step.
    fn served(&mut self, _agent: &str, _tokens: Served) {}
}

/// Which policy, by its config name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    Fifo,
    RoundRobin,
    Priority,
    Sjf,
    Fair,
}

/// Settings the policies share.
#[derive(Clone, Copy, Debug)]
pub struct PolicyParams {
    /// Tokens an agent is served per turn under `round_robin`.
    pub quantum: usize,
    /// Seconds of waiting worth one priority level (`priority`), or that halve a job's apparent
    /// length (`sjf`): nothing waits forever.
    pub aging_secs: f64,
}

impl PolicyKind {
    pub fn build(self, p: PolicyParams) -> Box<dyn Policy> {
        match self {
            PolicyKind::Fifo => Box::new(Fifo),
            PolicyKind::RoundRobin => Box::new(RoundRobin::new(p.quantum)),
            PolicyKind::Priority => Box::new(PriorityAging(p.aging_secs)),
            PolicyKind::Sjf => Box::new(ShortestFirst(p.aging_secs)),
            PolicyKind::Fair => Box::new(Fair::default()),
        }
    }
}

fn by_key(cands: &[Candidate], key: impl Fn(&Candidate) -> f64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..cands.len()).collect();
    idx.sort_by(|&a, &b| {
        key(&cands[a])
            .total_cmp(&key(&cands[b]))
            .then(cands[a].arrived.cmp(&cands[b].arrived))
            .then(cands[a].id.cmp(&cands[b].id))
    });
    idx
}

fn age(c: &Candidate, now: Instant) -> f64 {
    now.saturating_duration_since(c.arrived).as_secs_f64()
}

/// Arrival order.
pub struct Fifo;

impl Policy for Fifo {
    fn rank(&mut self, cands: &[Candidate], _now: Instant) -> Vec<usize> {
        by_key(cands, |_| 0.0)
    }
}

/// Higher priority first; waiting raises a sequence's priority by one level per `aging_secs`.
pub struct PriorityAging(pub f64);

impl Policy for PriorityAging {
    fn rank(&mut self, cands: &[Candidate], now: Instant) -> Vec<usize> {
        let aging = self.0.max(1e-3);
        by_key(cands, |c| -(c.priority as f64 + age(c, now) / aging))
    }
}

/// Shortest remaining job first; a job's apparent length shrinks as it waits.
pub struct ShortestFirst(pub f64);

impl Policy for ShortestFirst {
    fn rank(&mut self, cands: &[Candidate], now: Instant) -> Vec<usize> {
        let aging = self.0.max(1e-3);
        by_key(cands, |c| c.remaining as f64 / (1.0 + age(c, now) / aging))
    }
}

/// Fair share: per-agent virtual token counters (input tokens weigh 1, output tokens 2); the
/// agent with the least service goes first. An agent that comes back after being idle is lifted
/// to the least counter among the active agents, so idling earns no credit.
#[derive(Default)]
pub struct Fair {
    counters: HashMap<String, f64>,
    active: Vec<String>,
}

impl Policy for Fair {
    fn rank(&mut self, cands: &[Candidate], _now: Instant) -> Vec<usize> {
        let floor = self
            .active
            .iter()
            .filter_map(|a| self.counters.get(a))
            .cloned()
            .fold(f64::INFINITY, f64::min);
        let mut now_active: Vec<String> = cands.iter().map(|c| c.agent.clone()).collect();
        now_active.sort();
        now_active.dedup();
        for a in &now_active {
            let returning = !self.active.contains(a);
            let c = self.counters.entry(a.clone()).or_insert(0.0);
            if returning && floor.is_finite() {
                *c = c.max(floor);
            }
        }
        self.active = now_active;
        let counters = &self.counters;
        by_key(cands, |c| counters.get(&c.agent).copied().unwrap_or(0.0))
    }

    fn served(&mut self, agent: &str, t: Served) {
        *self.counters.entry(agent.to_string()).or_insert(0.0) +=
            t.input as f64 + 2.0 * t.output as f64;
    }
}

/// Agents take turns: the agent at the front is served first until it has used its quantum of
/// tokens, then it moves to the back. Within an agent, arrival order.
pub struct RoundRobin {
    quantum: usize,
    turn: VecDeque<String>,
    used: usize,
}

impl RoundRobin {
    pub fn new(quantum: usize) -> Self {
        Self {
            quantum: quantum.max(1),
            turn: VecDeque::new(),
            used: 0,
        }
    }
}

impl Policy for RoundRobin {
    fn rank(&mut self, cands: &[Candidate], _now: Instant) -> Vec<usize> {
        self.turn.retain(|a| cands.iter().any(|c| &c.agent == a));
        for c in cands {
            if !self.turn.contains(&c.agent) {
                self.turn.push_back(c.agent.clone());
            }
        }
        if self.used >= self.quantum && self.turn.len() > 1 {
            self.turn.rotate_left(1);
            self.used = 0;
        }
        let turn = &self.turn;
        by_key(cands, |c| {
            turn.iter()
                .position(|a| a == &c.agent)
                .unwrap_or(usize::MAX) as f64
        })
    }

    fn served(&mut self, agent: &str, t: Served) {
        if self.turn.front().map(String::as_str) == Some(agent) {
            self.used += t.input + t.output;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cand(id: u64, agent: &str, priority: i32, arrived: Instant, remaining: usize) -> Candidate {
        Candidate {
            id,
            agent: agent.into(),
            priority,
            arrived,
            remaining,
        }
    }

    #[test]
    fn priority_ages_and_sjf_prefers_short() {
        let t0 = Instant::now();
        let old = t0 - Duration::from_secs(100);
        let cands = [
            cand(1, "a", 0, old, 10),
            cand(2, "b", 5, t0, 10),
            cand(3, "c", 1, t0, 10),
        ];
        // aging 10 s: the old request is at 0 + 10 = 10 > 5.
        assert_eq!(PriorityAging(10.0).rank(&cands, t0), vec![0, 1, 2]);
        assert_eq!(PriorityAging(1000.0).rank(&cands, t0), vec![1, 2, 0]);
        let jobs = [cand(1, "a", 0, t0, 500), cand(2, "b", 0, t0, 20)];
        assert_eq!(ShortestFirst(1e9).rank(&jobs, t0), vec![1, 0]);
    }

    #[test]
    fn fair_serves_the_least_served_agent_and_lifts_returners() {
        let t0 = Instant::now();
        let mut f = Fair::default();
        let cands = [cand(1, "a", 0, t0, 1), cand(2, "b", 0, t0, 1)];
        f.rank(&cands, t0);
        f.served(
            "a",
            Served {
                input: 100,
                output: 10,
            },
        );
        assert_eq!(f.rank(&cands, t0)[0], 1);
        f.served(
            "b",
            Served {
                input: 50,
                output: 0,
            },
        );
        // "c" arrives later: it starts at the least active counter (b's 50), not at zero.
        let cands = [
            cand(1, "a", 0, t0, 1),
            cand(2, "b", 0, t0, 1),
            cand(3, "c", 0, t0, 1),
        ];
        f.rank(&cands, t0);
        assert_eq!(f.counters["c"], 50.0);
    }

    #[test]
    fn round_robin_rotates_after_the_quantum() {
        let t0 = Instant::now();
        let mut rr = RoundRobin::new(4);
        let cands = [
            cand(1, "a", 0, t0, 1),
            cand(2, "a", 0, t0, 1),
            cand(3, "b", 0, t0, 1),
        ];
        let mut firsts = vec![];
        for _ in 0..12 {
            let r = rr.rank(&cands, t0);
            let agent = cands[r[0]].agent.clone();
            rr.served(
                &agent,
                Served {
                    input: 0,
                    output: 1,
                },
            );
            firsts.push(agent);
        }
        assert_eq!(firsts.join(""), "aaaabbbbaaaa");
    }
}

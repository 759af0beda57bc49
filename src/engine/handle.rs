//! What the rest of the server holds of an engine: a handle to submit requests and manage
//! contexts, the engine's published state (KV use, the wait predictor), and the model's
//! description.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use tokio::sync::mpsc::UnboundedSender;

use super::{
    Command, ContextError, ContextInfo, ContextOp, EngineStats, Event, GenRequest, Grammars,
    PolicyKind, PolicyParams,
};
use crate::kv::{KvPool, KvUsage};

/// One place among the engine's live sequences, holding `tokens` (its prompt, and its
/// `max_tokens`) of the live totals; dropping it (when the sequence ends, however it ends) gives
/// them back.
pub struct LiveSlot {
    pub(super) live: Arc<AtomicUsize>,
    pub(super) live_tokens: LiveTokens,
    pub(super) tokens: [u64; 2],
    /// When the request was submitted: its wait (for aging, and the queue-time metric) counts
    /// from here, not from when the engine, busy with a step, got to its message.
    pub(super) arrived: std::time::Instant,
}

impl Drop for LiveSlot {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::AcqRel);
        for (total, n) in self.live_tokens.iter().zip(self.tokens) {
            total.fetch_sub(n, Ordering::AcqRel);
        }
    }
}

/// The live sequences' prompt tokens and `max_tokens`, summed.
pub(super) type LiveTokens = Arc<[AtomicU64; 2]>;

/// Why a request was not queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the server is at capacity ({0} sequences running or queued); retry shortly")]
    Full(usize),
    #[error("the engine has stopped")]
    Stopped,
}

/// The cheap, cloneable side of an engine that HTTP handlers hold.
#[derive(Clone)]
pub struct EngineHandle {
    pub(super) tx: mpsc::Sender<Command>,
    pub model: Arc<ModelInfo>,
    pub(super) live: Arc<AtomicUsize>,
    /// Prompt tokens and `max_tokens` of the live sequences, summed.
    pub(super) live_tokens: LiveTokens,
    pub(super) max_live: usize,
    pub(super) max_running: usize,
    pub(super) kv: Arc<KvPool>,
    pub(super) agent_priority: Arc<std::sync::RwLock<Arc<std::collections::HashMap<String, i32>>>>,
    pub(super) stats: Arc<EngineStats>,
}

/// What the rest of the server needs to know about the model an engine runs.
pub struct ModelInfo {
    pub tokenizer: crate::model::Tokenizer,
    pub template: Option<crate::model::ChatTemplate>,
    pub context_length: usize,
    pub vocab_size: usize,
    pub source: String,
    pub format: String,
    /// Compiles response formats and tool schemas into constraints for this vocabulary.
    pub grammars: Grammars,
}

impl EngineHandle {
    /// Queue a request; events arrive on `events`.
    pub fn submit(
        &self,
        req: GenRequest,
        events: UnboundedSender<Event>,
    ) -> Result<(), SubmitError> {
        self.submit_all(vec![(req, events)])
    }

    /// Queue several requests (the choices of one API request): all of them, or none when the
    /// engine's bound on live sequences would be passed.
    pub fn submit_all(
        &self,
        reqs: Vec<(GenRequest, UnboundedSender<Event>)>,
    ) -> Result<(), SubmitError> {
        let k = reqs.len();
        self.live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n + k <= self.max_live).then_some(n + k)
            })
            .map_err(|_| SubmitError::Full(self.max_live))?;
        for (req, events) in reqs {
            let tokens = [req.prompt.len() as u64, req.max_tokens as u64];
            for (total, n) in self.live_tokens.iter().zip(tokens) {
                total.fetch_add(n, Ordering::AcqRel);
            }
            let slot = LiveSlot {
                live: self.live.clone(),
                live_tokens: self.live_tokens.clone(),
                tokens,
                arrived: std::time::Instant::now(),
            };
            self.tx
                .send(Command::Submit(Box::new(req), events, slot))
                .map_err(|_| SubmitError::Stopped)?;
        }
        Ok(())
    }

    /// Sequences running or queued now.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// How long a request arriving now would wait before its first step, predicted from the
    /// sequences ahead of it and how long sequences have lately taken. Before any sequence has
    /// finished, from the measured costs of a decode step and of a prompt token and the live
    /// sequences' prompts and `max_tokens` (an upper bound, as they may stop sooner), and never
    /// less than the time until the running sequence nearest its end is done.
    pub fn predicted_wait_ms(&self) -> u64 {
        let ahead = (self.live() + 1).saturating_sub(self.max_running) as u64;
        if ahead == 0 {
            return 0;
        }
        let s = &self.stats;
        let per_slot = |mean_us: u64| ahead * mean_us / self.max_running.max(1) as u64;
        match s.mean_sequence_us.load(Ordering::Relaxed) {
            0 => {
                // Before any step has run, the live sequences are taken to have just started.
                let live = self.live().max(1) as u64;
                let [prompt, decode] = [0, 1].map(|i| self.live_tokens[i].load(Ordering::Relaxed));
                let mean_us = s.sequence_us(prompt, decode) / live;
                let first = match s.first_free_us.load(Ordering::Relaxed) {
                    0 => mean_us,
                    f => f,
                };
                per_slot(mean_us).max(first) / 1000
            }
            mean_us => per_slot(mean_us) / 1000,
        }
    }

    /// Create, list, read, fork or delete contexts (see [`ContextOp`]).
    pub async fn context(&self, op: ContextOp) -> Result<Vec<ContextInfo>, ContextError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Command::Context(op, tx))
            .map_err(|_| ContextError::Stopped)?;
        rx.await.map_err(|_| ContextError::Stopped)?
    }

    /// The configured priority of an agent (0 when it has none).
    pub fn agent_priority(&self, agent: &str) -> i32 {
        let map = self
            .agent_priority
            .read()
            .unwrap_or_else(|p| p.into_inner());
        map.get(agent).copied().unwrap_or(0)
    }

    /// Apply a reloaded configuration: agents' priorities and the scheduling policy.
    pub fn reconfigure(
        &self,
        agent_priority: Arc<std::collections::HashMap<String, i32>>,
        policy: PolicyKind,
        params: PolicyParams,
    ) {
        *self
            .agent_priority
            .write()
            .unwrap_or_else(|p| p.into_inner()) = agent_priority;
        let _ = self.tx.send(Command::SetPolicy(policy, params));
    }

    /// KV blocks in use, free and swapped out.
    pub fn kv_usage(&self) -> KvUsage {
        self.kv.usage()
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Report this model's prefix-cache changes to `sink` (KV events for routers).
    pub fn set_kv_event_sink(&self, sink: crate::kv::KvEventSink) {
        self.kv.set_event_sink(sink);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_tokens_cost_a_step_each_until_a_prefill_is_measured() {
        let s = EngineStats::default();
        s.step_us.store(5_000, Ordering::Relaxed);
        // 1,400 prompt tokens and 10 decode steps, before any prefill ran: all steps.
        assert_eq!(s.sequence_us(1_400, 10), 1_410 * 5_000);
        // Once a prefill has run, prompt tokens cost what they were measured to.
        s.prompt_token_us.store(1_700, Ordering::Relaxed);
        assert_eq!(s.sequence_us(1_400, 10), 1_400 * 1_700 + 10 * 5_000);
    }
}

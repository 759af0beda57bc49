//! The engine: one thread per loaded model owns the model and every running sequence. HTTP
//! handlers submit requests over a channel and receive a stream of [`Event`]s.
//!
//! Each step runs the new tokens of the sequences the policy chose (one decode token each, or a
//! chunk of a prompt) through the model as one batch, then samples.

mod config;
pub mod contexts;
pub mod grammar;
mod handle;
mod plan;
pub mod policy;
pub mod sampler;
mod sequence;
pub mod text;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

pub use config::{available_memory, EngineConfig, KvBudget, Preemption};
pub use grammar::{Constraint, Grammars};
pub use handle::{EngineHandle, LiveSlot, ModelInfo, SubmitError};
pub use policy::{PolicyKind, PolicyParams};
pub use sampler::{SamplingParams, TokenLogprobs};
use sequence::Sequence;

use crate::kv::{HostCopy, KvPool, KvSeq};
use crate::model::{LoadedModel, SeqInput};
pub use contexts::{ContextError, ContextInfo, ContextOp, Tier};

/// Why a sequence ended, in OpenAI's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-generation token, stop token or stop string.
    Stop,
    /// `max_tokens` or the context length reached.
    Length,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// One generation request: a tokenised prompt and how to continue it.
#[derive(Clone, Debug)]
pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// Who asked (for fair share and round robin).
    pub agent: String,
    /// Higher runs first under the `priority` policy.
    pub priority: i32,
    /// A context (owned by `agent`) to run on and to extend with this turn.
    pub context: Option<String>,
    /// A grammar the output must follow (JSON schema); tokens outside it are never sampled.
    pub constraint: Option<Constraint>,
}

/// What the engine streams back for one sequence.
#[derive(Clone, Debug)]
pub enum Event {
    /// A sampled token. `text` is the output released by this token: possibly empty (an
    /// incomplete character, or text held back as a possible stop string), possibly more than
    /// the token itself (held text released).
    Token {
        id: u32,
        text: String,
        logprobs: Option<TokenLogprobs>,
    },
    /// The sequence ended. `text` is any held-back output released at the end.
    Done {
        finish: FinishReason,
        text: String,
        usage: Usage,
    },
    /// The sequence failed; nothing more follows.
    Error(String),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache instead of a prefill.
    pub cached_tokens: usize,
    /// Microseconds from arrival to the sequence's first step.
    pub queued_us: u64,
}

/// What the engine last saw of its own state, for `/metrics` (updated after every step).
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Sequences that ran in the last step.
    pub running: AtomicUsize,
    /// Live sequences that did not: queued, paused by the policy, or loading a context.
    pub waiting: AtomicUsize,
    /// Contexts by tier, and the bytes of the host and disk tiers.
    pub contexts_pool: AtomicUsize,
    pub contexts_host: AtomicUsize,
    pub contexts_disk: AtomicUsize,
    pub host_bytes: AtomicU64,
    pub disk_bytes: AtomicU64,
    /// Moving average of how long sequences take, arrival to end (microseconds).
    pub mean_sequence_us: AtomicU64,
    /// Moving average of a decode step's duration (steps with no prompt tokens; microseconds).
    pub step_us: AtomicU64,
    /// Moving average of a prompt token's share of the steps that prefill (microseconds; 0
    /// until one has run).
    pub prompt_token_us: AtomicU64,
    /// Of the sequences that ran in the last step, the shortest predicted time to its end (the
    /// rest of its prompt and of its `max_tokens`; microseconds).
    pub first_free_us: AtomicU64,
}

impl EngineStats {
    /// Predicted time for `prompt` prompt tokens and `decode` decode steps (microseconds). A
    /// prompt token costs a decode step until a prefill has been measured (an over-estimate).
    pub fn sequence_us(&self, prompt: u64, decode: u64) -> u64 {
        let step = self.step_us.load(Ordering::Relaxed);
        let token = match self.prompt_token_us.load(Ordering::Relaxed) {
            0 => step,
            t => t,
        };
        prompt * token + decode * step
    }
}

enum Command {
    Submit(Box<GenRequest>, UnboundedSender<Event>, LiveSlot),
    Context(ContextOp, ContextReply),
    /// A context's snapshot, read from disk by a loader thread.
    Loaded(String, contexts::Loaded),
    /// A snapshot writer thread has finished the write with this ticket.
    Written(u64),
    /// A copier thread has copied a context's KV from host memory (the shared bytes) into
    /// pool blocks.
    Filled(String, std::sync::Arc<Vec<u8>>, KvSeq),
    /// A copier thread has copied an idle context's KV out to host memory.
    Evicted(Box<contexts::Evicted>),
    /// A copier thread has copied a preempted sequence's KV out to host memory.
    SwappedOut(u64, Box<HostCopy>),
    /// A copier thread has copied a preempted sequence's KV (the shared bytes) back into pool
    /// blocks.
    SwappedIn(u64, std::sync::Arc<Vec<u8>>, KvSeq),
    /// Rank sequences by this policy from now on (a configuration reload).
    SetPolicy(PolicyKind, PolicyParams),
}

type ContextReply = tokio::sync::oneshot::Sender<Result<Vec<ContextInfo>, ContextError>>;

/// Start the engine thread for a loaded model. Returns once the engine has taken its first
/// (warm-up) step and the KV pool's first `prefault_bytes` are committed, so a model reported
/// ready serves its first request at full speed (llama.cpp's server and vLLM also warm up
/// before they take requests).
pub fn spawn(model: LoadedModel, cfg: EngineConfig) -> EngineHandle {
    let LoadedModel {
        llama,
        tokenizer,
        template,
        source,
        format,
    } = model;
    let layout = crate::kv::KvLayout {
        dtype: cfg.kv_dtype,
        ..llama.kv_layout()
    };
    let pool = KvPool::with_bytes(layout, cfg.kv.bytes() as usize);
    // The pool's first `prefault_bytes` are committed beside the warm-up step, both before the
    // model is reported ready. Committed in the background after it, they took a core from the
    // first request's step (its time to first token 290-400 ms instead of 30-80 on 2 cores).
    let prefault = (cfg.prefault_bytes > 0).then(|| {
        let blocks = cfg.prefault_bytes as usize / pool.layout().bytes_per_block();
        let pool = pool.clone();
        std::thread::Builder::new()
            .name("kv-prefault".into())
            .spawn(move || pool.prefault(blocks))
    });
    // A sequence must fit the pool alone: serve at most what the pool holds.
    let mut context_length = llama.context_length();
    if pool.capacity_tokens() < context_length {
        tracing::warn!(
            "KV pool of {} blocks holds {} tokens: serving a context of {} instead of the model's {}",
            pool.usage().blocks_total,
            pool.capacity_tokens(),
            pool.capacity_tokens(),
            context_length
        );
        context_length = pool.capacity_tokens();
    }
    let info = Arc::new(ModelInfo {
        context_length,
        vocab_size: llama.cfg.vocab_size,
        tokenizer,
        template,
        source,
        format,
        grammars: Grammars::default(),
    });
    let (tx, rx) = mpsc::channel();
    let thread_info = info.clone();
    let thread_pool = pool.clone();
    let loopback = tx.clone();
    let handle = EngineHandle {
        tx,
        model: info,
        live: Arc::new(AtomicUsize::new(0)),
        live_tokens: Default::default(),
        max_live: cfg.max_running + cfg.max_queued,
        max_running: cfg.max_running,
        kv: pool,
        agent_priority: Arc::new(std::sync::RwLock::new(cfg.agent_priority.clone())),
        stats: Arc::new(EngineStats::default()),
    };
    let stats = handle.stats.clone();
    let (warm_tx, warm_rx) = mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("aios-engine".into())
        .spawn(move || {
            let engine = Engine::new(llama, thread_info, cfg, thread_pool, loopback, stats);
            engine.warm_up();
            let _ = warm_tx.send(());
            engine.run(rx)
        })
        .expect("spawn engine thread");
    // If the engine thread dies starting up, its sender is dropped and this returns at once.
    let _ = warm_rx.recv();
    if let Some(Ok(thread)) = prefault {
        let _ = thread.join();
    }
    handle
}

struct Engine {
    llama: crate::model::Llama,
    info: Arc<ModelInfo>,
    cfg: EngineConfig,
    policy: Box<dyn policy::Policy>,
    /// Every live sequence, whether it ran in the last step or was paused by the policy.
    running: Vec<Sequence>,
    next_id: u64,
    pool: Arc<KvPool>,
    contexts: contexts::Contexts,
    /// Requests on contexts whose snapshot is being read from disk.
    waiting: Vec<(Box<GenRequest>, UnboundedSender<Event>, LiveSlot)>,
    /// Where loader threads send what they read.
    loopback: mpsc::Sender<Command>,
    stats: Arc<EngineStats>,
    /// Sequences that ran in the last step.
    ran: usize,
    /// Preempted sequences being copied out to host memory on copier threads, by id, with the
    /// blocks each will give back; and those being copied back into the pool. Neither runs
    /// until its copy is settled.
    moving_out: HashMap<u64, usize>,
    moving_in: HashSet<u64>,
}

/// What identifies the KV a model computes: its file, its format and quantisation.
fn model_fingerprint(info: &ModelInfo) -> String {
    let file = crate::kv::snapshot::file_fingerprint(std::path::Path::new(&info.source))
        .unwrap_or_else(|| info.source.clone());
    format!("{}|{file}", info.format)
}

impl Engine {
    fn new(
        llama: crate::model::Llama,
        info: Arc<ModelInfo>,
        cfg: EngineConfig,
        pool: Arc<KvPool>,
        loopback: mpsc::Sender<Command>,
        stats: Arc<EngineStats>,
    ) -> Self {
        let store = cfg.snapshot_dir.as_ref().and_then(|dir| {
            let fp = model_fingerprint(&info);
            crate::kv::snapshot::DiskStore::new(dir, &fp, pool.layout())
                .map_err(|e| {
                    tracing::error!("no disk tier: cannot use {}: {e}", dir.display());
                })
                .ok()
        });
        let contexts = contexts::Contexts::new(
            pool.clone(),
            store,
            cfg.host_bytes,
            cfg.disk_bytes,
            loopback.clone(),
        );
        Self {
            llama,
            info,
            policy: cfg.policy.build(cfg.policy_params),
            cfg,
            running: Vec::new(),
            next_id: 0,
            pool,
            contexts,
            waiting: Vec::new(),
            loopback,
            stats,
            ran: 0,
            moving_out: HashMap::new(),
            moving_in: HashSet::new(),
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Command>) {
        loop {
            // Block when idle; otherwise take whatever arrived since the last step.
            if self.running.is_empty() {
                match rx.recv() {
                    Ok(cmd) => self.accept(cmd),
                    Err(_) => return,
                }
            }
            while let Ok(cmd) = rx.try_recv() {
                self.accept(cmd);
            }
            self.running.retain(|s| !s.cancelled());
            self.ran = 0;
            if !self.running.is_empty() {
                self.step();
                if self.ran == 0 {
                    // Nothing could run (waiting for blocks a copier thread gives back): wait
                    // for news instead of spinning on a core the copier needs.
                    match rx.recv_timeout(std::time::Duration::from_millis(2)) {
                        Ok(cmd) => self.accept(cmd),
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
            }
            self.publish();
        }
    }

    /// Publish the counts `/metrics` reads.
    fn publish(&self) {
        let s = &self.stats;
        let live = self.running.len() + self.waiting.len();
        let ran = self.ran.min(self.running.len());
        s.running.store(ran, Ordering::Relaxed);
        s.waiting.store(live.saturating_sub(ran), Ordering::Relaxed);
        let t = self.contexts.tiers();
        s.contexts_pool.store(t.pool, Ordering::Relaxed);
        s.contexts_host.store(t.host, Ordering::Relaxed);
        s.contexts_disk.store(t.disk, Ordering::Relaxed);
        s.host_bytes.store(t.host_bytes, Ordering::Relaxed);
        s.disk_bytes.store(t.disk_bytes, Ordering::Relaxed);
    }

    fn accept(&mut self, cmd: Command) {
        match cmd {
            Command::Submit(req, events, slot) => {
                let ctx = self.info.context_length;
                if req.prompt.is_empty() || req.prompt.len() >= ctx {
                    let _ = events.send(Event::Error(format!(
                        "prompt of {} tokens does not fit the context length {ctx}",
                        req.prompt.len()
                    )));
                    return;
                }
                let kv = match &req.context {
                    None => KvSeq::in_pool(self.pool.clone()),
                    Some(id) => {
                        if let Err(e) = self.contexts.check(id, &req.agent) {
                            let _ = events.send(Event::Error(e.to_string()));
                            return;
                        }
                        let busy: Vec<&str> =
                            self.running.iter().filter_map(Sequence::context).collect();
                        match self.contexts.start(id, &req.prompt, &busy) {
                            contexts::Start::Kv(kv) => kv,
                            contexts::Start::Load(path, kv_len) => {
                                self.load(id.clone(), path, kv_len);
                                self.waiting.push((req, events, slot));
                                return;
                            }
                            contexts::Start::Wait => {
                                self.waiting.push((req, events, slot));
                                return;
                            }
                        }
                    }
                };
                self.next_id += 1;
                let arrived = slot.arrived;
                self.running.push(Sequence::new(
                    self.next_id,
                    *req,
                    events,
                    slot,
                    kv,
                    ctx,
                    arrived,
                ));
            }
            Command::Context(op, reply) => self.contexts.request(op, reply),
            Command::SetPolicy(kind, params) => {
                self.cfg.policy = kind;
                self.cfg.policy_params = params;
                self.policy = kind.build(params);
            }
            Command::Loaded(id, result) => {
                let outcome = self.contexts.loaded(&id, result);
                self.resume(&id, outcome);
            }
            Command::Written(ticket) => {
                if let Some(id) = self.contexts.written(ticket) {
                    self.resume(&id, Ok(()));
                }
            }
            Command::Evicted(e) => {
                let busy: Vec<&str> = self.running.iter().filter_map(Sequence::context).collect();
                self.contexts.evicted(*e, &busy);
                // Requests waiting for room in the pool try again.
                let mut ids: Vec<String> = self
                    .waiting
                    .iter()
                    .filter_map(|(r, _, _)| r.context.clone())
                    .filter(|id| self.contexts.waits_for_room(id))
                    .collect();
                ids.dedup();
                for id in ids {
                    self.resume(&id, Ok(()));
                }
            }
            Command::Filled(id, from, kv) => {
                self.contexts.filled(&id, &from, kv);
                self.resume(&id, Ok(()));
            }
            // A sequence gone meanwhile (its client left) drops the copy, and with it the
            // blocks or the bytes.
            Command::SwappedOut(id, copy) => {
                self.moving_out.remove(&id);
                if let Some(s) = self.running.iter_mut().find(|s| s.id() == id) {
                    s.kv_mut().swap_out_with(*copy);
                }
            }
            Command::SwappedIn(id, from, kv) => {
                self.moving_in.remove(&id);
                if let Some(s) = self.running.iter_mut().find(|s| s.id() == id) {
                    s.kv_mut().swap_in_with(&from, kv);
                }
            }
        }
    }

    /// The requests waiting for context `id` (its snapshot being read or written) go on, or
    /// fail with `outcome`'s message.
    fn resume(&mut self, id: &str, outcome: Result<(), String>) {
        let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|(req, _, _)| req.context.as_deref() == Some(id));
        self.waiting = rest;
        for (req, events, slot) in mine {
            match &outcome {
                Ok(()) => self.accept(Command::Submit(req, events, slot)),
                Err(msg) => {
                    let _ = events.send(Event::Error(msg.clone()));
                }
            }
        }
    }

    /// Read context `id`'s snapshot on a loader thread (once, however many requests wait):
    /// straight into blocks taken from the pool now when it has them (no copy left to make
    /// when the sequence runs), else into host memory (swapped in when it runs).
    fn load(&self, id: String, path: std::path::PathBuf, kv_len: usize) {
        if self
            .waiting
            .iter()
            .any(|(r, _, _)| r.context.as_deref() == Some(id.as_str()))
        {
            return;
        }
        let Some(store) = self.contexts.store() else {
            return;
        };
        let tx = self.loopback.clone();
        let pool = self.pool.clone();
        let into = KvSeq::for_fill(pool.clone(), kv_len).ok();
        std::thread::spawn(move || {
            let t = Instant::now();
            let to_pool = into.is_some();
            let result = match into {
                Some(mut kv) => store
                    .read_into(&path, &mut kv)
                    .map(|(_, tokens)| (tokens, kv)),
                None => store.read(&path).and_then(|(meta, tokens, data)| {
                    Ok((tokens, KvSeq::from_host(pool, meta.kv_len, data)?))
                }),
            };
            if result.is_ok() {
                tracing::debug!(
                    "context {id}: snapshot read and verified into {} in {:.1} ms",
                    if to_pool { "the pool" } else { "host memory" },
                    t.elapsed().as_secs_f64() * 1e3
                );
            }
            let _ = tx.send(Command::Loaded(id, result));
        });
    }

    /// One decode step of a throwaway one-token sequence (its own KV, not the pool's): the
    /// first step's one-off costs are paid before any request, and the wait predictor starts
    /// from a measured step time.
    fn warm_up(&self) {
        let mut kv = KvSeq::new(self.pool.layout(), 1);
        let started = Instant::now();
        let ok = self
            .llama
            .forward(&mut [SeqInput {
                tokens: &[0],
                kv: &mut kv,
                want_logits: true,
            }])
            .is_ok();
        if ok {
            let us = started.elapsed().as_micros() as u64;
            self.stats.step_us.store(us.max(1), Ordering::Relaxed);
        }
    }

    /// Publish the step's duration and the served sequences' lengths, for the wait predictor.
    fn note_step(&self, took: std::time::Duration, served: &[(usize, policy::Served)]) {
        let avg = |a: &AtomicU64, x: u64| {
            let old = a.load(Ordering::Relaxed);
            a.store(
                if old == 0 { x } else { (old * 4 + x) / 5 },
                Ordering::Relaxed,
            );
        };
        let us = took.as_micros() as u64;
        let prompt: usize = served.iter().map(|(_, t)| t.input).sum();
        if prompt == 0 {
            avg(&self.stats.step_us, us);
        } else {
            avg(&self.stats.prompt_token_us, (us / prompt as u64).max(1));
        }
        let first = served
            .iter()
            .map(|(i, _)| {
                let s = &self.running[*i];
                let prompt = if s.generated() == 0 { s.pending() } else { 0 };
                let decode = s.remaining() - prompt;
                self.stats.sequence_us(prompt as u64, decode as u64)
            })
            .min();
        if let Some(first) = first {
            self.stats.first_free_us.store(first, Ordering::Relaxed);
        }
    }

    fn step(&mut self) {
        let plan = self.plan();
        let mut sampled = Vec::new(); // indices of sequences whose logits row comes back
        let mut served = Vec::new(); // what each agent gets from this step, for the policy
                                     // The grammar masks of constrained sequences that sample this step are computed on a
                                     // helper thread while the forward pass runs, so they cost the batch no step time.
        let mut constraints: Vec<(usize, Constraint)> = Vec::new();
        for (i, s) in self.running.iter_mut().enumerate() {
            if plan[i] > 0 && plan[i] >= s.pending() {
                if let Some(c) = s.take_constraint() {
                    constraints.push((i, c));
                }
            }
        }
        let mut inputs: Vec<SeqInput> = Vec::new();
        for (i, (s, &n)) in self.running.iter_mut().zip(&plan).enumerate() {
            if n > 0 {
                let prefill = s.generated() == 0;
                let input = s.next_input(n);
                if input.want_logits {
                    sampled.push(i);
                }
                let tokens = policy::Served {
                    input: if prefill { n } else { 0 },
                    output: usize::from(input.want_logits),
                };
                served.push((i, tokens));
                inputs.push(input);
                self.ran += 1;
            }
        }
        let started = Instant::now();
        let result = if constraints.is_empty() {
            self.llama.forward(&mut inputs)
        } else {
            std::thread::scope(|scope| {
                let masks = scope.spawn(|| {
                    for (_, c) in constraints.iter_mut() {
                        c.prepare();
                    }
                });
                let r = self.llama.forward(&mut inputs);
                let _ = masks.join();
                r
            })
        };
        drop(inputs);
        self.note_step(started.elapsed(), &served);
        for (i, c) in constraints {
            self.running[i].put_constraint(c);
        }
        if self.cfg.prefix_cache && result.is_ok() {
            for (i, _) in &served {
                self.running[*i].register_blocks();
            }
        }
        let logits = match result {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(e) => {
                tracing::error!("forward pass failed: {e}");
                for s in self.running.drain(..) {
                    s.fail(format!("forward pass failed: {e}"));
                }
                return;
            }
        };
        let rows = match logits.to_vec2::<f32>() {
            Ok(r) => r,
            Err(e) => {
                for s in self.running.drain(..) {
                    s.fail(format!("reading logits failed: {e}"));
                }
                return;
            }
        };
        for (i, tokens) in served {
            self.policy.served(self.running[i].agent(), tokens);
        }
        let tok = &self.info.tokenizer;
        for (i, mut row) in sampled.into_iter().zip(rows) {
            self.running[i].advance(&mut row, tok);
        }
        let (done, running) = std::mem::take(&mut self.running)
            .into_iter()
            .partition::<Vec<_>, _>(|s| s.finished());
        self.running = running;
        for s in done {
            if let Some(id) = s.context() {
                self.contexts.finish(id, s.tokens(), s.kv());
            }
            let took = s.age().as_micros() as u64;
            let m = &self.stats.mean_sequence_us;
            let old = m.load(Ordering::Relaxed);
            m.store(
                if old == 0 { took } else { (old * 4 + took) / 5 },
                Ordering::Relaxed,
            );
            s.close();
        }
    }
}

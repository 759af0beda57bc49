//! One running sequence: its tokens, KV storage, sampler, output text state and the channel
//! its events go to.

use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::grammar::Constraint;
use super::policy::Candidate;
use super::sampler::Sampler;
use super::text::{StopCheck, StopMatcher, Utf8Stream};
use super::{Event, FinishReason, GenRequest, LiveSlot, Usage};
use crate::kv::KvSeq;
use crate::model::{SeqInput, Tokenizer};

pub struct Sequence {
    id: u64,
    agent: String,
    priority: i32,
    tokens: Vec<u32>,
    prompt_len: usize,
    max_tokens: usize,
    context_length: usize,
    stop_token_ids: Vec<u32>,
    ignore_eos: bool,
    kv: KvSeq,
    sampler: Sampler,
    utf8: Utf8Stream,
    stops: StopMatcher,
    events: UnboundedSender<Event>,
    finished: bool,
    /// The final event (`Done` or `Error`), sent by `close` once the KV and the queue slot are
    /// released, so a client that has its answer never sees the blocks still held.
    last: Option<Event>,
    arrived: Instant,
    /// When the sequence first ran (its queue time ends).
    scheduled: Option<Instant>,
    /// Prompt tokens taken from the prefix cache or a context.
    cached: usize,
    context: Option<String>,
    constraint: Option<Constraint>,
    /// Held while the sequence lives: bounds the engine's queue.
    _slot: LiveSlot,
}

impl Sequence {
    pub fn new(
        id: u64,
        req: GenRequest,
        events: UnboundedSender<Event>,
        slot: LiveSlot,
        kv: KvSeq,
        context_length: usize,
        arrived: Instant,
    ) -> Self {
        let cached = kv.len().min(req.prompt.len());
        Self {
            id,
            agent: req.agent,
            priority: req.priority,
            prompt_len: req.prompt.len(),
            sampler: Sampler::new(req.sampling, &req.prompt),
            tokens: req.prompt,
            max_tokens: req.max_tokens,
            context_length,
            stop_token_ids: req.stop_token_ids,
            ignore_eos: req.ignore_eos,
            kv,
            utf8: Utf8Stream::default(),
            stops: StopMatcher::new(req.stop),
            events,
            finished: false,
            last: None,
            arrived,
            scheduled: None,
            cached,
            context: req.context,
            constraint: req.constraint,
            _slot: slot,
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// Output tokens sampled so far.
    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    pub fn context(&self) -> Option<&str> {
        self.context.as_deref()
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Take the longest cached prefix of this sequence's tokens, if it has no KV yet.
    pub fn attach_prefix(&mut self) {
        let got = self.kv.attach_prefix(&self.tokens);
        if self.generated() == 0 {
            self.cached = self.cached.max(got.min(self.prompt_len));
        }
    }

    /// Offer this sequence's full blocks to the prefix cache.
    pub fn register_blocks(&mut self) {
        self.kv.register_blocks(&self.tokens);
    }

    pub fn kv(&self) -> &KvSeq {
        &self.kv
    }

    pub fn kv_mut(&mut self) -> &mut KvSeq {
        &mut self.kv
    }

    /// Time since the request arrived.
    pub fn age(&self) -> std::time::Duration {
        self.arrived.elapsed()
    }

    pub fn agent(&self) -> &str {
        &self.agent
    }

    /// What the scheduling policy sees of this sequence.
    pub fn candidate(&self) -> Candidate {
        Candidate {
            id: self.id,
            agent: self.agent.clone(),
            priority: self.priority,
            arrived: self.arrived,
            remaining: self.remaining(),
        }
    }

    /// Tokens still to go: the rest of the prompt and of `max_tokens`.
    pub fn remaining(&self) -> usize {
        self.pending() + self.max_tokens.saturating_sub(self.generated())
    }

    /// Tokens not yet in the KV cache: the rest of the prompt, or the last sampled token.
    pub fn pending(&self) -> usize {
        self.tokens.len() - self.kv.len()
    }

    /// Feed at most `budget` pending tokens to the next step. Logits are wanted only when the
    /// chunk reaches the last token (a prompt prefilled in several chunks samples once, at its end).
    pub fn next_input(&mut self, budget: usize) -> SeqInput<'_> {
        self.scheduled.get_or_insert_with(Instant::now);
        let from = self.kv.len();
        let to = (from + budget).min(self.tokens.len());
        SeqInput {
            tokens: &self.tokens[from..to],
            kv: &mut self.kv,
            want_logits: to == self.tokens.len(),
        }
    }

    /// Lend the grammar state out (to compute its mask beside the forward pass).
    pub fn take_constraint(&mut self) -> Option<Constraint> {
        self.constraint.take()
    }

    pub fn put_constraint(&mut self, c: Constraint) {
        self.constraint = Some(c);
    }

    pub fn cancelled(&self) -> bool {
        self.events.is_closed()
    }

    pub fn finished(&self) -> bool {
        self.finished
    }

    pub fn fail(mut self, msg: String) {
        self.last = Some(Event::Error(msg));
        self.close();
    }

    /// Release this sequence's KV blocks and queue slot, then send its final event.
    pub fn close(mut self) {
        let last = self.last.take();
        let events = self.events.clone();
        drop(self);
        if let Some(e) = last {
            let _ = events.send(e);
        }
    }

    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_len,
            completion_tokens: self.generated(),
            cached_tokens: self.cached,
            queued_us: self.scheduled.map_or(0, |t| {
                t.saturating_duration_since(self.arrived).as_micros() as u64
            }),
        }
    }

    /// Sample the next token from this sequence's logits row and stream what it produced.
    pub fn advance(&mut self, logits: &mut Vec<f32>, tok: &Tokenizer) {
        logits.truncate(tok.vocab_size());
        if let Some(c) = &mut self.constraint {
            if let Err(e) = c.apply(logits) {
                self.last = Some(Event::Error(e));
                self.finished = true;
                return;
            }
        }
        let (id, logprobs) = self.sampler.sample(logits);
        self.tokens.push(id);
        let generated = self.generated();
        let end_token = (!self.ignore_eos && tok.is_eog(id)) || self.stop_token_ids.contains(&id);
        let mut finish = None;
        let mut text = String::new();
        let mut grammar_done = false;
        if !end_token {
            // A complete grammar ends the output as a stop would.
            match self.constraint.as_mut().map(|c| c.commit(id)) {
                Some(Ok(true)) => grammar_done = true,
                Some(Ok(false)) | None => {}
                Some(Err(e)) => {
                    self.last = Some(Event::Error(e));
                    self.finished = true;
                    return;
                }
            }
        }
        if end_token {
            finish = Some(FinishReason::Stop);
        } else {
            let piece = self.utf8.push(tok.token_bytes(id));
            match self.stops.push(&piece) {
                StopCheck::Continue(t) => text = t,
                StopCheck::Stop(t) => {
                    text = t;
                    finish = Some(FinishReason::Stop);
                }
            }
        }
        let mut flush = end_token;
        if grammar_done && finish.is_none() {
            finish = Some(FinishReason::Stop);
            flush = true;
        }
        if finish.is_none()
            && (generated >= self.max_tokens || self.tokens.len() >= self.context_length)
        {
            finish = Some(FinishReason::Length);
        }
        let sent = self.events.send(Event::Token { id, text, logprobs });
        if sent.is_err() {
            self.finished = true;
            return;
        }
        if let Some(finish) = finish {
            let mut rest = String::new();
            if finish == FinishReason::Length || flush {
                rest = self.utf8.finish();
                match self.stops.push(&rest) {
                    StopCheck::Continue(t) | StopCheck::Stop(t) => rest = t,
                }
                rest.push_str(&self.stops.flush());
            }
            self.last = Some(Event::Done {
                finish,
                text: rest,
                usage: self.usage(),
            });
            self.finished = true;
        }
    }
}

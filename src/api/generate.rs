//! Running a request's choices on the engine: submitting them, then either collecting each
//! choice whole or streaming chunks as Server-Sent Events. Chat and completions differ only in
//! how a chunk or a choice is written, which [`Format`] says.

use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{select_all, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};

use super::cached::{cache_header, serve_hit, CacheUse};
use super::error::ApiError;
use super::params::{Body, GenParams};
use super::spill::{backend_header, engine_failed, spill_to, Spill, SPILL_HOLD};
use crate::engine::{
    EngineHandle, Event, FinishReason, GenRequest, SubmitError, TokenLogprobs, Usage,
};
use crate::metrics::Observer;

/// One output token with what the client may want to know about it.
#[derive(Debug, Clone)]
pub struct OutToken {
    pub id: u32,
    pub logprobs: Option<TokenLogprobs>,
}

/// A finished choice.
#[derive(Debug, Default)]
pub struct ChoiceOut {
    pub text: String,
    pub tokens: Vec<OutToken>,
    pub finish: Option<FinishReason>,
    pub usage: Usage,
}

/// What every response object and chunk of one request carries.
pub struct Envelope {
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl Envelope {
    /// An object of type `object` (e.g. `chat.completion.chunk`) holding `choices`.
    pub fn object(&self, object: &str, choices: Value) -> Value {
        json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "system_fingerprint": super::FINGERPRINT, "choices": choices,
        })
    }

    /// The trailing usage chunk of a stream: no choices.
    pub fn usage_chunk(&self, object: &str, usage: Value) -> Value {
        let mut v = self.object(object, json!([]));
        v["usage"] = usage;
        v
    }
}

/// How an endpoint writes its objects.
pub trait Format: Send + Sync + 'static {
    /// The chunk sent before any token of choice `index` (chat sends the role), if any.
    fn start_chunk(&self, index: usize) -> Option<Value>;
    /// The chunk carrying `text` (and the tokens that produced it) for choice `index`; None
    /// when the format holds the text back (a tool call is sent whole at the end).
    fn delta_chunk(&mut self, index: usize, text: &str, tokens: &[OutToken]) -> Option<Value>;
    /// The chunks that close choice `index` (with anything held back).
    fn finish_chunks(&mut self, index: usize, finish: FinishReason) -> Vec<Value>;
    /// The trailing usage chunk (`stream_options.include_usage`).
    fn usage_chunk(&self, usage: Value) -> Value;
    /// The whole, non-streamed response.
    fn response(&self, choices: Vec<ChoiceOut>, usage: Value) -> Value;
}

/// The prompts and settings of one request, checked against the model's context.
pub struct Job {
    pub engine: EngineHandle,
    pub prompts: Vec<Vec<u32>>,
    pub params: GenParams,
    /// Metrics, the agent's limits and usage, and the request's log line.
    pub obs: Observer,
    /// `[limits] max_prompt_tokens` (0: none).
    pub max_prompt_tokens: usize,
    /// Where the request goes when the local engine cannot take it.
    pub spill: Option<Spill>,
    /// The response cache's part in this request.
    pub cache: CacheUse,
}

/// The observer of a generation request of `params` on `model`.
fn observer(
    state: &super::AppState,
    model: &str,
    params: &GenParams,
    headers: &axum::http::HeaderMap,
) -> Observer {
    let request_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    Observer::new(
        state.metrics.clone(),
        state.governor.clone(),
        state.live().limits.of(&params.agent),
        model,
        &params.agent,
        request_id,
    )
}

/// Answer a generation request on `route` as its handler prepared it: the prepared job, with
/// the response cache and the model's fallbacks, or (the model cannot run here) [`unserved`].
pub async fn answer<F: Format>(
    state: &super::AppState,
    headers: &axum::http::HeaderMap,
    bytes: &[u8],
    route: crate::providers::Route,
    prepared: Result<(Job, F), ApiError>,
) -> Response {
    match prepared {
        Ok((job, format)) => {
            let job = job
                .with_fallback(state, route, bytes)
                .with_cache(state, route, bytes)
                .await;
            job.respond(format).await
        }
        Err(e) => unserved(state, headers, bytes, route, e).await,
    }
}

/// A request for a model that cannot run here at all (`why`: it failed to load, or is still
/// loading): a cached answer, else the model's fallbacks, else `why`.
async fn unserved(
    state: &super::AppState,
    headers: &axum::http::HeaderMap,
    bytes: &[u8],
    route: crate::providers::Route,
    why: ApiError,
) -> Response {
    if !why.local_capacity {
        return why.into_response();
    }
    let keys: &[&str] = match route {
        crate::providers::Route::Chat => &["max_completion_tokens", "max_tokens"],
        crate::providers::Route::Completions => &["max_tokens"],
    };
    let Ok(params) = Body::parse(bytes).and_then(|b| GenParams::read(&b, headers, keys)) else {
        return why.into_response();
    };
    let Some(model) = state.slot(params.model.as_deref()).map(|s| s.name.clone()) else {
        return why.into_response();
    };
    let obs = observer(state, &model, &params, headers);
    let cache = CacheUse::lookup(state, route, &model, &params, bytes).await;
    let mut r = if let Some(hit) = cache.hit() {
        serve_hit(hit, &obs, &params)
    } else {
        match Spill::new(state, &model, &params, route, bytes) {
            // No tokenizer here: a prompt's tokens are guessed from its bytes.
            Some(spill) => {
                spill_to(spill, &obs, &params, bytes.len() / 4, why, cache.store()).await
            }
            None => why.into_response(),
        }
    };
    cache_header(&mut r, cache.label());
    r
}

impl Job {
    pub fn new(
        state: &super::AppState,
        engine: EngineHandle,
        model: &str,
        prompts: Vec<Vec<u32>>,
        params: GenParams,
        headers: &axum::http::HeaderMap,
    ) -> Self {
        Self {
            engine,
            prompts,
            obs: observer(state, model, &params, headers),
            params,
            max_prompt_tokens: state.live().config.limits.max_prompt_tokens,
            spill: None,
            cache: CacheUse::Off,
        }
    }

    /// Answer from the response cache when `[cache]` is on and it holds this request's answer
    /// (waiting for an identical request that is computing it); store a complete answer
    /// otherwise.
    async fn with_cache(
        mut self,
        state: &super::AppState,
        route: crate::providers::Route,
        bytes: &[u8],
    ) -> Self {
        self.cache = CacheUse::lookup(state, route, self.obs.model(), &self.params, bytes).await;
        self
    }

    /// Let this request spill over to the model's providers (unless it says `"fallback":
    /// false`) when the local engine cannot take it.
    fn with_fallback(
        mut self,
        state: &super::AppState,
        route: crate::providers::Route,
        bytes: &[u8],
    ) -> Self {
        self.spill = Spill::new(state, self.obs.model(), &self.params, route, bytes);
        self
    }

    /// The local engine cannot take the request (`why`): try the providers in order; a
    /// request without fallbacks, or a failure that is not about the local engine, gets `why`.
    async fn spill_over(mut self, why: ApiError) -> Response {
        let Some(spill) = self.spill.take().filter(|_| why.local_capacity) else {
            return why.into_response();
        };
        // The spill-over logs its own line; the local engine ran nothing and holds no KV.
        self.obs.ran = false;
        self.obs.kv = None;
        let prompt: usize = self.prompts.iter().map(Vec::len).sum();
        spill_to(
            spill,
            &self.obs,
            &self.params,
            prompt,
            why,
            self.cache.store(),
        )
        .await
    }

    /// Refuse prompts that do not leave room for the requested output, are longer than the
    /// server allows, or would take more of the KV pool than the agent's share.
    pub fn check_context(&mut self) -> Result<(), ApiError> {
        let ctx = self.engine.model.context_length;
        let max = self.max_prompt_tokens;
        if let Some(p) = self.prompts.iter().find(|p| max > 0 && p.len() > max) {
            return Err(ApiError::invalid(format!(
                "the prompt has {} tokens; this server accepts at most {max}",
                p.len()
            ))
            .with_code("context_length_exceeded"));
        }
        for p in &self.prompts {
            let want = p.len() + self.params.max_tokens.unwrap_or(1);
            if p.is_empty() {
                return Err(ApiError::invalid("the prompt is empty"));
            }
            if p.len() >= ctx || want > ctx {
                let msg = match self.params.max_tokens {
                    Some(m) => format!(
                        "This model's maximum context length is {ctx} tokens. However, you requested {want} tokens ({} in the prompt, {m} for the completion). Please reduce the length of the prompt or of max_tokens.",
                        p.len()
                    ),
                    None => format!(
                        "This model's maximum context length is {ctx} tokens. However, your prompt has {} tokens, which leaves no room for a completion.",
                        p.len()
                    ),
                };
                let mut e = ApiError::invalid(msg).with_code("context_length_exceeded");
                // Another backend may hold a longer context.
                e.local_capacity = true;
                return Err(e);
            }
        }
        let need: usize = self
            .prompts
            .iter()
            .map(|p| {
                let out = self
                    .params
                    .max_tokens
                    .unwrap_or(ctx.saturating_sub(p.len()));
                (p.len() + out).min(ctx) * self.params.n.max(1)
            })
            .sum();
        let (gov, limits, agent) = self.obs.governor();
        let capacity = self.engine.kv_usage().blocks_total * self.engine.kv_usage().block_tokens;
        let model = self.obs.model().to_string();
        let kv = gov
            .reserve_kv(agent, limits, &model, need, capacity)
            .map_err(|r| {
                self.obs.limited("max_kv_share");
                super::gate::rate_limited(r)
            })?;
        self.obs.kv = Some(kv);
        Ok(())
    }

    /// Queue every choice (all or none); returns one event stream per choice, in order.
    fn submit(&self) -> Result<Vec<mpsc::UnboundedReceiver<Event>>, ApiError> {
        let ctx = self.engine.model.context_length;
        let mut reqs = Vec::new();
        let mut out = Vec::new();
        for prompt in &self.prompts {
            for j in 0..self.params.n {
                let mut sampling = self.params.sampling.clone();
                sampling.seed = sampling.seed.map(|s| s.wrapping_add(j as u64));
                let req = GenRequest {
                    prompt: prompt.clone(),
                    sampling,
                    max_tokens: self.params.max_tokens.unwrap_or(ctx - prompt.len()),
                    stop: self.params.stop.clone(),
                    stop_token_ids: self.params.stop_token_ids.clone(),
                    ignore_eos: self.params.ignore_eos,
                    agent: self.params.agent.clone(),
                    priority: self
                        .params
                        .priority
                        .unwrap_or_else(|| self.engine.agent_priority(&self.params.agent)),
                    context: self.params.context.clone(),
                    constraint: self.params.constraint.clone(),
                };
                let (tx, rx) = mpsc::unbounded_channel();
                reqs.push((req, tx));
                out.push(rx);
            }
        }
        self.engine.submit_all(reqs).map_err(|e| match e {
            SubmitError::Full(_) => ApiError::overloaded(e.to_string()),
            SubmitError::Stopped => {
                let mut e = ApiError::unavailable(e.to_string());
                e.local_capacity = true;
                e
            }
        })?;
        Ok(out)
    }

    /// `cached` holds each choice's prefix-cache hits (choices are prompt-major); a prompt
    /// counts its best choice once.
    fn usage_json(&self, completion_tokens: usize, cached: &[usize]) -> Value {
        let prompt_tokens: usize = self.prompts.iter().map(Vec::len).sum();
        let n = self.params.n.max(1);
        let cached_tokens: usize = cached
            .chunks(n)
            .map(|c| c.iter().copied().max().unwrap_or(0))
            .sum();
        json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens},
        })
    }

    /// Run the job and answer: one JSON object, or an SSE stream.
    pub async fn respond<F: Format>(self, format: F) -> Response {
        let label = self.cache.label();
        let mut r = self.run(format).await;
        cache_header(&mut r, label);
        r
    }

    async fn run<F: Format>(mut self, format: F) -> Response {
        if let Some(hit) = self.cache.hit() {
            return serve_hit(hit, &self.obs, &self.params);
        }
        self.obs.ran = true;
        if let Some(id) = &self.params.context {
            if self.params.n > 1 || self.prompts.len() > 1 {
                return ApiError::param("context_id", "context_id runs one prompt with n = 1")
                    .into_response();
            }
            let op = crate::engine::ContextOp::Get {
                id: id.clone(),
                owner: self.params.agent.clone(),
            };
            if let Err(e) = self.engine.context(op).await {
                return super::contexts::engine_error(e, id).into_response();
            }
        }
        if let Some(s) = &self.spill {
            let wait = self.engine.predicted_wait_ms();
            if s.fb.max_queue_ms > 0 && wait > s.fb.max_queue_ms {
                let why = ApiError::overloaded(format!(
                    "the local queue's predicted wait is {wait} ms, over max_queue_ms = {}",
                    s.fb.max_queue_ms
                ));
                return self.spill_over(why).await;
            }
        }
        let receivers = match self.check_context().and_then(|_| self.submit()) {
            Ok(r) => r,
            Err(e) => return self.spill_over(e).await,
        };
        let n = self.params.n;
        self.obs.submitted(
            self.prompts
                .iter()
                .flat_map(|p| std::iter::repeat_n(p.len(), n)),
        );
        if self.params.stream {
            return self.stream(receivers, format).await;
        }
        let mut choices = Vec::with_capacity(receivers.len());
        let mut pending = receivers.into_iter();
        while let Some(mut rx) = pending.next() {
            let mut c = ChoiceOut::default();
            loop {
                match rx.recv().await {
                    Some(Event::Token { id, text, logprobs }) => {
                        self.obs.token(choices.len());
                        c.text.push_str(&text);
                        c.tokens.push(OutToken { id, logprobs });
                    }
                    Some(Event::Done {
                        finish,
                        text,
                        usage,
                    }) => {
                        c.text.push_str(&text);
                        self.obs.done(choices.len(), &usage, finish);
                        c.finish = Some(finish);
                        c.usage = usage;
                        break;
                    }
                    Some(Event::Error(e)) => return self.failed(pending, &choices, e).await,
                    None => {
                        let e = "the engine dropped the request".to_string();
                        return self.failed(pending, &choices, e).await;
                    }
                }
            }
            choices.push(c);
        }
        let completion: usize = choices.iter().map(|c| c.usage.completion_tokens).sum();
        let cached: Vec<usize> = choices.iter().map(|c| c.usage.cached_tokens).collect();
        let usage = self.usage_json(completion, &cached);
        let v = format.response(choices, usage);
        if let Some(s) = self.cache.store() {
            s.put(&v, "local");
        }
        let mut r = axum::Json(v).into_response();
        backend_header(&mut r, "local");
        r
    }

    /// The local engine failed a non-streamed request. Nothing has reached the client, so
    /// another backend may answer, unless a choice already finished (its tokens are charged
    /// to the local backend: a second backend would charge them again); then it is a 500.
    async fn failed(
        self,
        pending: impl Iterator<Item = mpsc::UnboundedReceiver<Event>>,
        done: &[ChoiceOut],
        why: String,
    ) -> Response {
        // Dropping the other choices' receivers cancels their sequences.
        drop(pending);
        if done.is_empty() {
            self.spill_over(engine_failed(why)).await
        } else {
            ApiError::internal(why).into_response()
        }
    }

    /// Stream the choices as SSE. Where fallbacks could take the request, its headers wait for
    /// the first event (at most `SPILL_HOLD`): an engine that fails before it sends the request
    /// to the fallbacks. Otherwise, and once the first event or `SPILL_HOLD` has passed, the
    /// stream is local for good, with keep-alive comments while it waits.
    async fn stream<F: Format>(
        self,
        receivers: Vec<mpsc::UnboundedReceiver<Event>>,
        format: F,
    ) -> Response {
        let n = receivers.len();
        let mut merged = select_all(
            receivers
                .into_iter()
                .enumerate()
                .map(|(i, r)| UnboundedReceiverStream::new(r).map(move |e| (i, e))),
        );
        if self.spill.is_none() {
            return self.stream_local(merged, n, None, format);
        }
        let failed = match tokio::time::timeout(SPILL_HOLD, merged.next()).await {
            Ok(Some((_, Event::Error(e)))) => e,
            Ok(None) => "the engine dropped the request".to_string(),
            Ok(Some(ev)) => return self.stream_local(merged, n, Some(ev), format),
            Err(_) => return self.stream_local(merged, n, None, format),
        };
        // Dropping the receivers cancels the other choices.
        drop(merged);
        self.spill_over(engine_failed(failed)).await
    }

    /// The SSE response of a stream served locally; `first` is an event already received.
    fn stream_local<F: Format, S>(
        mut self,
        mut merged: S,
        n: usize,
        first: Option<(usize, Event)>,
        mut format: F,
    ) -> Response
    where
        S: futures_util::Stream<Item = (usize, Event)> + Unpin + Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
        let send = |v: Value| SseEvent::default().data(v.to_string());
        let store = self.cache.store();
        tokio::spawn(async move {
            for i in 0..n {
                if let Some(c) = format.start_chunk(i) {
                    if tx.send(Ok(send(c))).await.is_err() {
                        return;
                    }
                }
            }
            let mut completion = 0;
            let mut cached = vec![0; n];
            let mut open = n;
            // What the choices amount to, for the cache.
            let mut whole: Vec<ChoiceOut> = (0..n).map(|_| ChoiceOut::default()).collect();
            let mut next = first;
            // A dropped client closes `tx`; returning drops the engine receivers, which
            // cancels the sequences.
            loop {
                let (i, ev) = match next.take() {
                    Some(x) => x,
                    None => match merged.next().await {
                        Some(x) => x,
                        None => break,
                    },
                };
                let chunks = match ev {
                    Event::Token { id, text, logprobs } => {
                        self.obs.token(i);
                        let tok = OutToken { id, logprobs };
                        if store.is_some() {
                            whole[i].text.push_str(&text);
                            whole[i].tokens.push(tok.clone());
                        }
                        if text.is_empty() && tok.logprobs.is_none() {
                            vec![]
                        } else {
                            format.delta_chunk(i, &text, &[tok]).into_iter().collect()
                        }
                    }
                    Event::Done {
                        finish,
                        text,
                        usage,
                    } => {
                        self.obs.done(i, &usage, finish);
                        completion += usage.completion_tokens;
                        cached[i] = usage.cached_tokens;
                        open -= 1;
                        whole[i].text.push_str(&text);
                        whole[i].finish = Some(finish);
                        whole[i].usage = usage;
                        let mut v = vec![];
                        if !text.is_empty() {
                            v.extend(format.delta_chunk(i, &text, &[]));
                        }
                        v.extend(format.finish_chunks(i, finish));
                        v
                    }
                    Event::Error(e) => {
                        let _ = tx.send(Ok(send(ApiError::internal(e).body()))).await;
                        return;
                    }
                };
                for c in chunks {
                    if tx.send(Ok(send(c))).await.is_err() {
                        return;
                    }
                }
                if open == 0 {
                    break;
                }
            }
            let usage = self.usage_json(completion, &cached);
            if self.params.include_usage {
                let u = format.usage_chunk(usage.clone());
                let _ = tx.send(Ok(send(u))).await;
            }
            let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
            if let Some(s) = store.filter(|_| open == 0) {
                s.put(&format.response(whole, usage), "local");
            }
        });
        let mut r = Sse::new(ReceiverStream::new(rx))
            .keep_alive(KeepAlive::default())
            .into_response();
        backend_header(&mut r, "local");
        r
    }
}

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

use super::cache::{self, Hit, Key, ResponseCache};
use super::error::ApiError;
use super::params::{Body, GenParams};
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

/// A request's way to the model's fallback providers.
pub struct Spill {
    fb: super::ModelFallback,
    route: crate::providers::Route,
    /// The client's request, forwarded with the provider's model name.
    body: Value,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
}

impl Spill {
    /// The way to `model`'s providers, if it has any and the request may take it (not on a
    /// context, not `"fallback": false`).
    fn new(
        state: &super::AppState,
        model: &str,
        params: &GenParams,
        route: crate::providers::Route,
        bytes: &[u8],
    ) -> Option<Self> {
        let fb = state.fallbacks.get(model)?;
        if params.context.is_some() {
            // A context's KV lives here; elsewhere the conversation would be lost.
            return None;
        }
        let body = serde_json::from_slice::<Value>(bytes).ok()?;
        if body.get("fallback") == Some(&Value::Bool(false)) {
            return None;
        }
        Some(Spill {
            fb: fb.clone(),
            route,
            body,
            metrics: state.metrics.clone(),
        })
    }
}

/// The response cache's part in one request.
pub enum CacheUse {
    /// The cache is off: nothing is said.
    Off,
    /// Not for the cache (sampled, on a context, or `"cache": false`): `X-Aios-Cache: bypass`.
    Bypass,
    /// Looked up: the stored answer (`hit`), or where a complete answer goes (`miss`).
    Lookup { hit: Option<Hit>, store: Store },
}

/// Where a request's complete answer is stored.
#[derive(Clone)]
pub struct Store {
    cache: std::sync::Arc<ResponseCache>,
    key: Key,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    max_entries: usize,
    max_bytes: usize,
}

impl Store {
    /// Keep `response` (a whole non-streamed response object) if every choice finished.
    fn put(&self, response: &Value, backend: &str) {
        if !cache::complete(response) {
            return;
        }
        let hit = Hit {
            response: response.clone(),
            backend: backend.to_string(),
        };
        let now = std::time::Instant::now();
        self.cache
            .put(self.key, hit, now, self.max_entries, self.max_bytes);
        let (entries, bytes) = self.cache.size();
        self.metrics.cache_store(backend, entries, bytes);
    }
}

fn route_name(route: crate::providers::Route) -> &'static str {
    match route {
        crate::providers::Route::Chat => "chat",
        crate::providers::Route::Completions => "completions",
    }
}

impl CacheUse {
    /// Look a request of `params` for `model` (the served name) up, as `[cache]` says now.
    pub fn lookup(
        state: &super::AppState,
        route: crate::providers::Route,
        model: &str,
        params: &GenParams,
        bytes: &[u8],
    ) -> Self {
        let live = state.live();
        let c = &live.config.cache;
        if !c.enabled {
            return CacheUse::Off;
        }
        let body = match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(b)) => b,
            _ => return CacheUse::Off,
        };
        if !params.cache || params.context.is_some() || !cache::deterministic(&params.sampling) {
            state.metrics.cache_lookup("bypass");
            return CacheUse::Bypass;
        }
        let key = cache::key(route_name(route), &params.agent, model, &body);
        let ttl = std::time::Duration::from_secs(c.ttl_secs);
        let hit = state
            .cache
            .get(&key, ttl, std::time::Instant::now())
            // A request that refuses the providers gets no provider's answer.
            .filter(|h| h.backend == "local" || body.get("fallback") != Some(&Value::Bool(false)));
        state
            .metrics
            .cache_lookup(if hit.is_some() { "hit" } else { "miss" });
        CacheUse::Lookup {
            hit,
            store: Store {
                cache: state.cache.clone(),
                key,
                metrics: state.metrics.clone(),
                max_entries: c.max_entries,
                max_bytes: c.max_bytes,
            },
        }
    }

    /// The `X-Aios-Cache` value, if any.
    fn label(&self) -> Option<&'static str> {
        match self {
            CacheUse::Off => None,
            CacheUse::Bypass => Some("bypass"),
            CacheUse::Lookup { hit: Some(_), .. } => Some("hit"),
            CacheUse::Lookup { hit: None, .. } => Some("miss"),
        }
    }

    fn hit(&self) -> Option<&Hit> {
        match self {
            CacheUse::Lookup { hit, .. } => hit.as_ref(),
            _ => None,
        }
    }

    /// Where the answer goes, on a miss.
    fn store(&self) -> Option<Store> {
        match self {
            CacheUse::Lookup { hit: None, store } => Some(store.clone()),
            _ => None,
        }
    }
}

/// Set `X-Aios-Cache` on a response.
fn cache_header(r: &mut Response, label: Option<&'static str>) {
    if let Some(l) = label {
        r.headers_mut()
            .insert("x-aios-cache", axum::http::HeaderValue::from_static(l));
    }
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

/// Answer from the cache: the stored response with a fresh id, or replayed as a stream. No
/// tokens are charged; the agent's ledger counts a request on the `cache` backend.
fn serve_hit(hit: &Hit, obs: &Observer, params: &GenParams) -> Response {
    let (gov, limits, agent) = obs.governor();
    gov.charge_remote(agent, limits, "cache", 0, 0, 0.0);
    tracing::info!(
        request_id = %obs.request_id(), agent = %agent, model = %obs.model(),
        backend = "cache", origin = %hit.backend, "served from the response cache"
    );
    let mut v = hit.response.clone();
    let chat = v["object"] == "chat.completion";
    v["id"] = json!(super::new_id(if chat { "chatcmpl" } else { "cmpl" }));
    v["created"] = json!(super::unix_now());
    let mut r = if params.stream {
        let mut text = String::new();
        for c in replay_chunks(&v, chat, params.include_usage) {
            text.push_str(&format!("data: {c}\n\n"));
        }
        text.push_str("data: [DONE]\n\n");
        let mut r = Response::new(axum::body::Body::from(text));
        r.headers_mut().insert(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("text/event-stream"),
        );
        r
    } else {
        axum::Json(v).into_response()
    };
    backend_header(&mut r, "cache");
    if let Ok(v) = axum::http::HeaderValue::from_str(&hit.backend) {
        r.headers_mut().insert("x-aios-cache-origin", v);
    }
    r
}

/// The chunks of a stream that amounts to the response `v`: per choice its role (chat), its
/// whole text or tool calls in one chunk, and its finish; then the usage when asked for.
fn replay_chunks(v: &Value, chat: bool, include_usage: bool) -> Vec<Value> {
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let chunk = |choices: Value| {
        let mut c = json!({
            "id": v["id"], "object": object, "created": v["created"], "model": v["model"],
            "system_fingerprint": v.get("system_fingerprint").cloned().unwrap_or(Value::Null),
            "choices": choices,
        });
        if include_usage {
            c["usage"] = Value::Null;
        }
        c
    };
    let mut out = Vec::new();
    let choices = v["choices"].as_array().cloned().unwrap_or_default();
    for (i, c) in choices.iter().enumerate() {
        let index = c.get("index").cloned().unwrap_or(json!(i));
        let finish = c["finish_reason"].clone();
        let lp = c.get("logprobs").cloned().unwrap_or(Value::Null);
        if chat {
            let m = &c["message"];
            out.push(chunk(
                json!([{"index": index, "delta": {"role": "assistant", "content": ""},
                                    "logprobs": null, "finish_reason": null}]),
            ));
            if let Some(t) = m["content"].as_str().filter(|t| !t.is_empty()) {
                out.push(chunk(json!([{"index": index, "delta": {"content": t},
                                        "logprobs": lp, "finish_reason": null}])));
            }
            if let Some(calls) = m["tool_calls"].as_array() {
                let calls: Vec<Value> = calls
                    .iter()
                    .enumerate()
                    .map(|(k, c)| {
                        json!({"index": k, "id": c["id"], "type": "function", "function": c["function"]})
                    })
                    .collect();
                out.push(chunk(
                    json!([{"index": index, "delta": {"tool_calls": calls},
                                        "logprobs": null, "finish_reason": null}]),
                ));
            }
            out.push(chunk(
                json!([{"index": index, "delta": {}, "logprobs": null,
                                    "finish_reason": finish}]),
            ));
        } else {
            out.push(chunk(
                json!([{"index": index, "text": c["text"], "logprobs": lp,
                                    "finish_reason": null}]),
            ));
            out.push(chunk(json!([{"index": index, "text": "", "logprobs": null,
                                    "finish_reason": finish}])));
        }
    }
    if include_usage {
        let mut u = chunk(json!([]));
        u["usage"] = v["usage"].clone();
        out.push(u);
    }
    out
}

/// A request for a model that cannot run here at all (`why`: it failed to load, or is still
/// loading): a cached answer, else the model's fallbacks, else `why`.
pub async fn unserved(
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
    let cache = CacheUse::lookup(state, route, &model, &params, bytes);
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

    /// Answer from the response cache when `[cache]` is on and it holds this request's answer;
    /// store a complete answer otherwise.
    pub fn with_cache(
        mut self,
        state: &super::AppState,
        route: crate::providers::Route,
        bytes: &[u8],
    ) -> Self {
        self.cache = CacheUse::lookup(state, route, self.obs.model(), &self.params, bytes);
        self
    }

    /// Let this request spill over to the model's providers (unless it says `"fallback":
    /// false`) when the local engine cannot take it.
    pub fn with_fallback(
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
                        self.obs.done(&usage, finish);
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
                        self.obs.done(&usage, finish);
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

/// The local engine failed on a request (`why`) before anything reached the client: a model
/// with fallbacks sends it there; without, a 500.
/// How long a stream that could still spill over holds its headers for the first event. Past
/// it the stream is local for good: proxies and clients with a first-byte timeout (often 60 s)
/// must see headers and keep-alives long before a slow prefill ends.
const SPILL_HOLD: std::time::Duration = std::time::Duration::from_secs(10);

fn engine_failed(why: String) -> ApiError {
    let mut e = ApiError::internal(why);
    e.local_capacity = true;
    e
}

/// Send a request the local engine cannot take (`why`) to the providers of `spill`, in order;
/// `prompt` is its prompt tokens (for the providers' token limits). A complete answer goes to
/// `store`.
async fn spill_to(
    spill: Spill,
    obs: &Observer,
    params: &GenParams,
    prompt: usize,
    why: ApiError,
    store: Option<Store>,
) -> Response {
    let model = obs.model().to_string();
    let (gov, limits, agent) = obs.governor();
    let (gov, agent) = (gov.clone(), agent.to_string());
    if limits.cloud_budget_usd > 0.0 && gov.remote_spend(&agent) >= limits.cloud_budget_usd {
        spill.metrics.fallback(&model, "-", "skipped_budget", 0.0);
        let mut e = why;
        e.message = format!(
            "{} (agent '{agent}' has spent its cloud budget of ${:.2}, so no spill-over)",
            e.message, limits.cloud_budget_usd
        );
        return e.into_response();
    }
    let est = (prompt + params.max_tokens.unwrap_or(256)) as u64;
    let mut failures = Vec::new();
    for p in &spill.fb.providers {
        if p.resting() {
            spill
                .metrics
                .fallback(&model, p.name(), "skipped_resting", 0.0);
            failures.push(format!("provider '{}' is resting after failures", p.name()));
            continue;
        }
        let mut body = spill.body.clone();
        body["model"] = json!(p.model_for(&model));
        if let Some(o) = body.as_object_mut() {
            o.remove("context_id");
            o.remove("fallback");
            o.remove("cache");
        }
        let wants_usage = params.include_usage;
        if params.stream && !p.is_anthropic() {
            body["stream_options"] = json!({"include_usage": true});
        }
        match p.send(spill.route, &body, est).await {
            Ok(resp) => {
                tracing::info!(
                    request_id = %obs.request_id(), agent = %agent, model = %model,
                    backend = %p.name(), reason = %why.message, "spilled over"
                );
                let charge = {
                    let (gov, agent, p, metrics, model) = (
                        gov.clone(),
                        agent.clone(),
                        p.clone(),
                        spill.metrics.clone(),
                        model.clone(),
                    );
                    move |prompt: u64, completion: u64| {
                        let cost = p.cost(prompt, completion);
                        gov.charge_remote(&agent, limits, p.name(), prompt, completion, cost);
                        metrics.fallback(&model, p.name(), "served", cost);
                    }
                };
                return if params.stream {
                    let translate = p
                        .is_anthropic()
                        .then(|| crate::providers::anthropic::StreamTranslator::new(&model));
                    relay_stream(resp, p.name(), wants_usage, translate, charge, store)
                } else {
                    match resp.json::<Value>().await {
                        Ok(v) => {
                            let v = if p.is_anthropic() {
                                let m = v["model"].as_str().unwrap_or(&model).to_string();
                                crate::providers::anthropic::response(&v, &m)
                            } else {
                                v
                            };
                            let n = |k: &str| v["usage"][k].as_u64().unwrap_or(0);
                            charge(n("prompt_tokens"), n("completion_tokens"));
                            if let Some(s) = &store {
                                s.put(&v, p.name());
                            }
                            let mut r = axum::Json(v).into_response();
                            backend_header(&mut r, p.name());
                            r
                        }
                        Err(e) => ApiError::new(
                            axum::http::StatusCode::BAD_GATEWAY,
                            "upstream_error",
                            format!("provider '{}' sent an unreadable answer: {e}", p.name()),
                        )
                        .into_response(),
                    }
                };
            }
            Err(e) => {
                spill.metrics.fallback(&model, p.name(), "failed", 0.0);
                failures.push(e.message);
            }
        }
    }
    let mut e = ApiError::unavailable(format!(
        "{}; and no fallback could take it: {}",
        why.message,
        failures.join("; ")
    ));
    e.retry_after = Some(1);
    e.into_response()
}

/// Name the backend that served a response (`X-Aios-Backend`).
fn backend_header(r: &mut Response, backend: &str) {
    if let Ok(v) = axum::http::HeaderValue::from_str(backend) {
        r.headers_mut().insert("x-aios-backend", v);
    }
}

/// Pass a provider's SSE stream through to the client as it comes, reading its usage for the
/// ledger (the trailing usage chunk is dropped when the client did not ask for one), and the
/// whole answer for `store` when the stream ends complete.
fn relay_stream(
    resp: reqwest::Response,
    backend: &str,
    wants_usage: bool,
    mut translate: Option<crate::providers::anthropic::StreamTranslator>,
    charge: impl FnOnce(u64, u64) + Send + 'static,
    store: Option<Store>,
) -> Response {
    let (tx, rx) = mpsc::channel::<Result<axum::body::Bytes, Infallible>>(64);
    let name = backend.to_string();
    tokio::spawn(async move {
        let mut upstream = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        let (mut prompt, mut completion) = (0, 0);
        let mut collect = Collect::default();
        'read: while let Some(chunk) = upstream.next().await {
            let Ok(chunk) = chunk else { break };
            buf.extend_from_slice(&chunk);
            while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = buf.drain(..end + 2).collect();
                let text = String::from_utf8_lossy(&event);
                if let Some(t) = translate.as_mut() {
                    // An Anthropic event (`event: …` and `data: …` lines) → OpenAI chunks.
                    let data = text
                        .lines()
                        .find_map(|l| l.strip_prefix("data:"))
                        .map(str::trim);
                    let Some(v) = data.and_then(|d| serde_json::from_str::<Value>(d).ok()) else {
                        continue;
                    };
                    let chunks = t.event(&v);
                    chunks.iter().for_each(|c| collect.chunk(c));
                    let mut out: Vec<String> =
                        chunks.iter().map(|c| format!("data: {c}\n\n")).collect();
                    if v["type"] == "message_stop" {
                        collect.done = true;
                        if wants_usage {
                            out.push(format!("data: {}\n\n", t.usage_chunk()));
                        }
                        out.push("data: [DONE]\n\n".into());
                    }
                    (prompt, completion) = t.usage();
                    for o in out {
                        if tx.send(Ok(o.into())).await.is_err() {
                            break 'read;
                        }
                    }
                    continue;
                }
                let data = text.trim().strip_prefix("data:").map(str::trim);
                if data == Some("[DONE]") {
                    collect.done = true;
                }
                if let Some(v) = data.and_then(|d| serde_json::from_str::<Value>(d).ok()) {
                    collect.chunk(&v);
                    if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                        prompt = u["prompt_tokens"].as_u64().unwrap_or(prompt);
                        completion = u["completion_tokens"].as_u64().unwrap_or(completion);
                        let empty = v["choices"].as_array().is_none_or(|c| c.is_empty());
                        if !wants_usage && empty {
                            continue;
                        }
                    }
                }
                if tx.send(Ok(event.into())).await.is_err() {
                    break 'read;
                }
            }
        }
        charge(prompt, completion);
        if let Some(s) = store {
            if let Some(v) = collect.response(prompt, completion) {
                s.put(&v, &name);
            }
        }
    });
    let mut r = Response::new(axum::body::Body::from_stream(ReceiverStream::new(rx)));
    r.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("text/event-stream"),
    );
    backend_header(&mut r, backend);
    r
}

/// A provider's stream read back into the whole response it amounts to (for the cache).
#[derive(Default)]
struct Collect {
    /// The first chunk with choices: id, object, created, model.
    head: Option<Value>,
    choices: std::collections::BTreeMap<u64, Collected>,
    /// The stream ended properly (`[DONE]`, or Anthropic's `message_stop`).
    done: bool,
    /// It carried logprobs, which are not collected: not stored.
    lossy: bool,
}

#[derive(Default)]
struct Collected {
    text: String,
    tool_calls: std::collections::BTreeMap<u64, Value>,
    finish: Value,
}

impl Collect {
    fn chunk(&mut self, v: &Value) {
        let Some(choices) = v["choices"].as_array() else {
            return;
        };
        if self.head.is_none() {
            self.head = Some(v.clone());
        }
        for c in choices {
            let e = self
                .choices
                .entry(c["index"].as_u64().unwrap_or(0))
                .or_default();
            if !c["logprobs"].is_null() {
                self.lossy = true;
            }
            let d = &c["delta"];
            for t in [&d["content"], &c["text"]] {
                if let Some(t) = t.as_str() {
                    e.text.push_str(t);
                }
            }
            for tc in d["tool_calls"].as_array().into_iter().flatten() {
                let call = e
                    .tool_calls
                    .entry(tc["index"].as_u64().unwrap_or(0))
                    .or_insert_with(|| {
                        json!({"id": null, "type": "function",
                               "function": {"name": "", "arguments": ""}})
                    });
                if tc["id"].is_string() {
                    call["id"] = tc["id"].clone();
                }
                for k in ["name", "arguments"] {
                    if let Some(part) = tc["function"][k].as_str() {
                        let whole = format!("{}{part}", call["function"][k].as_str().unwrap_or(""));
                        call["function"][k] = json!(whole);
                    }
                }
            }
            if c["finish_reason"].is_string() {
                e.finish = c["finish_reason"].clone();
            }
        }
    }

    /// The non-streamed response, if the stream ended properly and lost nothing.
    fn response(self, prompt: u64, completion: u64) -> Option<Value> {
        if !self.done || self.lossy {
            return None;
        }
        let head = self.head?;
        let chat = head["object"] == "chat.completion.chunk";
        let choices: Vec<Value> = self
            .choices
            .into_iter()
            .map(|(i, c)| {
                if !chat {
                    return json!({"index": i, "text": c.text, "logprobs": null,
                                  "finish_reason": c.finish});
                }
                let mut msg = json!({"role": "assistant", "content": c.text});
                if !c.tool_calls.is_empty() {
                    if c.text.is_empty() {
                        msg["content"] = Value::Null;
                    }
                    msg["tool_calls"] = Value::Array(c.tool_calls.into_values().collect());
                }
                json!({"index": i, "message": msg, "logprobs": null, "finish_reason": c.finish})
            })
            .collect();
        Some(json!({
            "id": head["id"],
            "object": if chat { "chat.completion" } else { "text_completion" },
            "created": head["created"],
            "model": head["model"],
            "choices": choices,
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion},
        }))
    }
}

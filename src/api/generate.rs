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

use super::error::ApiError;
use super::params::GenParams;
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
}

/// A request's way to the model's fallback providers.
pub struct Spill {
    fb: super::ModelFallback,
    route: crate::providers::Route,
    /// The client's request, forwarded with the provider's model name.
    body: Value,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
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
        let live = state.live();
        let request_id = headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let obs = Observer::new(
            state.metrics.clone(),
            state.governor.clone(),
            live.limits.of(&params.agent),
            model,
            &params.agent,
            request_id,
        );
        Self {
            engine,
            prompts,
            params,
            obs,
            max_prompt_tokens: live.config.limits.max_prompt_tokens,
            spill: None,
        }
    }

    /// Let this request spill over to the model's providers (unless it says `"fallback":
    /// false`) when the local engine cannot take it.
    pub fn with_fallback(
        mut self,
        state: &super::AppState,
        route: crate::providers::Route,
        bytes: &[u8],
    ) -> Self {
        let Some(fb) = state.fallbacks.get(self.obs.model()) else {
            return self;
        };
        if self.params.context.is_some() {
            // A context's KV lives here; elsewhere the conversation would be lost.
            return self;
        }
        let Ok(body) = serde_json::from_slice::<Value>(bytes) else {
            return self;
        };
        if body.get("fallback") == Some(&Value::Bool(false)) {
            return self;
        }
        self.spill = Some(Spill {
            fb: fb.clone(),
            route,
            body,
            metrics: state.metrics.clone(),
        });
        self
    }

    /// The local engine cannot take the request (`why`): try the providers in order; a
    /// request without fallbacks, or a failure that is not about capacity, gets `why`.
    async fn spill_over(mut self, why: ApiError) -> Response {
        let Some(spill) = self.spill.take().filter(|_| why.local_capacity) else {
            return why.into_response();
        };
        // The spill-over logs its own line; the local engine ran nothing and holds no KV.
        self.obs.ran = false;
        self.obs.kv = None;
        let model = self.obs.model().to_string();
        let (gov, limits, agent) = self.obs.governor();
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
        let prompt: usize = self.prompts.iter().map(Vec::len).sum();
        let est = (prompt + self.params.max_tokens.unwrap_or(256)) as u64;
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
            }
            let wants_usage = self.params.include_usage;
            if self.params.stream && !p.is_anthropic() {
                body["stream_options"] = json!({"include_usage": true});
            }
            match p.send(spill.route, &body, est).await {
                Ok(resp) => {
                    tracing::info!(
                        request_id = %self.obs.request_id(), agent = %agent, model = %model,
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
                    return if self.params.stream {
                        let translate = p
                            .is_anthropic()
                            .then(|| crate::providers::anthropic::StreamTranslator::new(&model));
                        relay_stream(resp, p.name(), wants_usage, translate, charge)
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
            SubmitError::Stopped => ApiError::unavailable(e.to_string()),
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
    pub async fn respond<F: Format>(mut self, format: F) -> Response {
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
            let mut r = self.stream(receivers, format);
            backend_header(&mut r, "local");
            return r;
        }
        let mut choices = Vec::with_capacity(receivers.len());
        for mut rx in receivers {
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
                    Some(Event::Error(e)) => return ApiError::internal(e).into_response(),
                    None => {
                        return ApiError::internal("the engine dropped the request").into_response()
                    }
                }
            }
            choices.push(c);
        }
        let completion: usize = choices.iter().map(|c| c.usage.completion_tokens).sum();
        let cached: Vec<usize> = choices.iter().map(|c| c.usage.cached_tokens).collect();
        let usage = self.usage_json(completion, &cached);
        let mut r = axum::Json(format.response(choices, usage)).into_response();
        backend_header(&mut r, "local");
        r
    }

    fn stream<F: Format>(
        mut self,
        receivers: Vec<mpsc::UnboundedReceiver<Event>>,
        mut format: F,
    ) -> Response {
        let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
        let send = |v: Value| SseEvent::default().data(v.to_string());
        tokio::spawn(async move {
            let mut merged = select_all(
                receivers
                    .into_iter()
                    .enumerate()
                    .map(|(i, r)| UnboundedReceiverStream::new(r).map(move |e| (i, e))),
            );
            let n = merged.len();
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
            // A dropped client closes `tx`; returning drops the engine receivers, which
            // cancels the sequences.
            while let Some((i, ev)) = merged.next().await {
                let chunks = match ev {
                    Event::Token { id, text, logprobs } => {
                        self.obs.token(i);
                        let tok = OutToken { id, logprobs };
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
            if self.params.include_usage {
                let u = format.usage_chunk(self.usage_json(completion, &cached));
                let _ = tx.send(Ok(send(u))).await;
            }
            let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
        });
        Sse::new(ReceiverStream::new(rx))
            .keep_alive(KeepAlive::default())
            .into_response()
    }
}

/// Name the backend that served a response (`X-Aios-Backend`).
fn backend_header(r: &mut Response, backend: &str) {
    if let Ok(v) = axum::http::HeaderValue::from_str(backend) {
        r.headers_mut().insert("x-aios-backend", v);
    }
}

/// Pass a provider's SSE stream through to the client as it comes, reading its usage for the
/// ledger (the trailing usage chunk is dropped when the client did not ask for one).
fn relay_stream(
    resp: reqwest::Response,
    backend: &str,
    wants_usage: bool,
    mut translate: Option<crate::providers::anthropic::StreamTranslator>,
    charge: impl FnOnce(u64, u64) + Send + 'static,
) -> Response {
    let (tx, rx) = mpsc::channel::<Result<axum::body::Bytes, Infallible>>(64);
    tokio::spawn(async move {
        let mut upstream = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        let (mut prompt, mut completion) = (0, 0);
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
                    let mut out: Vec<String> = t
                        .event(&v)
                        .iter()
                        .map(|c| format!("data: {c}\n\n"))
                        .collect();
                    if v["type"] == "message_stop" {
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
                if let Some(v) = data.and_then(|d| serde_json::from_str::<Value>(d).ok()) {
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
    });
    let mut r = Response::new(axum::body::Body::from_stream(ReceiverStream::new(rx)));
    r.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("text/event-stream"),
    );
    backend_header(&mut r, backend);
    r
}

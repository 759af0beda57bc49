//! Spill-over: a request the local engine cannot take, or failed before anything reached the
//! client, goes to the model's fallback providers in order; their answers are relayed (streamed
//! or whole), charged to the agent's ledger by backend, and may be kept by the response cache.

use std::convert::Infallible;

use axum::response::{IntoResponse, Response};
use futures_util::stream::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::cached::Store;
use super::error::ApiError;
use super::params::GenParams;
use crate::metrics::Observer;

/// A request's way to the model's fallback providers.
pub struct Spill {
    pub(super) fb: super::ModelFallback,
    route: crate::providers::Route,
    /// The client's request, forwarded with the provider's model name.
    body: Value,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
}

impl Spill {
    /// The way to `model`'s providers, if it has any and the request may take it (not on a
    /// context, not `"fallback": false`).
    pub(super) fn new(
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

/// How long a stream that could still spill over holds its headers for the first event. Past
/// it the stream is local for good: proxies and clients with a first-byte timeout (often 60 s)
/// must see headers and keep-alives long before a slow prefill ends.
pub(super) const SPILL_HOLD: std::time::Duration = std::time::Duration::from_secs(10);

/// The local engine failed on a request (`why`) before anything reached the client: a model
/// with fallbacks sends it there; without, a 500.
pub(super) fn engine_failed(why: String) -> ApiError {
    let mut e = ApiError::internal(why);
    e.local_capacity = true;
    e
}

/// Send a request the local engine cannot take (`why`) to the providers of `spill`, in order;
/// `prompt` is its prompt tokens (for the providers' token limits). A complete answer goes to
/// `store`.
pub(super) async fn spill_to(
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
    // Whether every provider refused the request itself (a 4xx other than 429: a wrong key,
    // an unknown model, a request it will not take), which trying again will not change.
    let mut all_refused = true;
    for p in &spill.fb.providers {
        if p.resting() {
            spill
                .metrics
                .fallback(&model, p.name(), "skipped_resting", 0.0);
            failures.push(format!("provider '{}' is resting after failures", p.name()));
            all_refused = false;
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
                    let chat = spill.route == crate::providers::Route::Chat;
                    relay_stream(resp, p.name(), chat, wants_usage, translate, charge, store)
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
                all_refused &= e
                    .status
                    .is_some_and(|s| (400..500).contains(&s) && s != 429);
                failures.push(e.message);
            }
        }
    }
    let message = format!(
        "{}; and no fallback could take it: {}",
        why.message,
        failures.join("; ")
    );
    if all_refused && !failures.is_empty() {
        // Not a passing shortage: a 502 the client should not simply retry.
        return ApiError::new(
            axum::http::StatusCode::BAD_GATEWAY,
            "upstream_error",
            message,
        )
        .into_response();
    }
    let mut e = ApiError::unavailable(message);
    e.retry_after = Some(1);
    e.into_response()
}

/// Name the backend that served a response (`X-Aios-Backend`).
pub(super) fn backend_header(r: &mut Response, backend: &str) {
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
    chat: bool,
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
        let mut collect = Collect {
            chat,
            ..Collect::default()
        };
        let mut ended = false;
        'read: while !ended {
            match upstream.next().await {
                Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                _ => {
                    // The end: a last event without its blank line still counts.
                    if buf.iter().all(u8::is_ascii_whitespace) {
                        break;
                    }
                    buf.extend_from_slice(b"\n\n");
                    ended = true;
                }
            }
            while let Some(end) = event_end(&buf) {
                let event: Vec<u8> = buf.drain(..end).collect();
                let text = String::from_utf8_lossy(&event);
                let data = event_data(&text);
                if let Some(t) = translate.as_mut() {
                    // An Anthropic event (`event: …` and `data: …` lines) → OpenAI chunks.
                    let Some(v) = data.and_then(|d| serde_json::from_str::<Value>(&d).ok()) else {
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
                if data.as_deref().map(str::trim) == Some("[DONE]") {
                    collect.done = true;
                }
                if let Some(v) = data.and_then(|d| serde_json::from_str::<Value>(&d).ok()) {
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

/// Where the first complete server-sent event in `buf` ends (past the blank line closing it;
/// lines end in LF, CRLF or CR).
fn event_end(buf: &[u8]) -> Option<usize> {
    [&b"\n\n"[..], b"\r\n\r\n", b"\r\r"]
        .iter()
        .filter_map(|sep| {
            buf.windows(sep.len())
                .position(|w| w == *sep)
                .map(|i| i + sep.len())
        })
        .min()
}

/// An event's data: its `data:` lines (one leading space dropped), joined by newlines.
fn event_data(event: &str) -> Option<String> {
    let lines: Vec<&str> = event
        .split(['\n', '\r'])
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.strip_prefix(' ').unwrap_or(d))
        .collect();
    (!lines.is_empty()).then(|| lines.join("\n"))
}

/// A provider's stream read back into the whole response it amounts to (for the cache).
#[derive(Default)]
struct Collect {
    /// A chat completion (else a text completion), as the route says: a provider's chunks
    /// need not name their `object`.
    chat: bool,
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
        let chat = self.chat;
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

#[cfg(test)]
mod tests {
    use super::{event_data, event_end};

    #[test]
    fn events_end_at_a_blank_line_of_any_line_ending() {
        assert_eq!(event_end(b"data: 1\n\ndata: 2\n\n"), Some(9));
        assert_eq!(event_end(b"data: 1\r\n\r\ndata: 2"), Some(11));
        assert_eq!(event_end(b"data: 1\r\rdata: 2"), Some(9));
        assert_eq!(event_end(b"data: 1\r\n"), None);
        assert_eq!(event_end(b"data: 1\n"), None);
    }

    #[test]
    fn an_events_data_lines_are_joined() {
        assert_eq!(
            event_data("data: {\"a\":1}\n\n").as_deref(),
            Some("{\"a\":1}")
        );
        assert_eq!(
            event_data("event: x\r\ndata:[DONE]\r\n\r\n").as_deref(),
            Some("[DONE]")
        );
        assert_eq!(event_data("data: a\ndata: b\n\n").as_deref(), Some("a\nb"));
        assert_eq!(event_data(": keep-alive\n\n"), None);
    }
}

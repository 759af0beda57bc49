//! How a generation request uses the response cache: whether it may (`CacheUse`), where its
//! complete answer goes (`Store`), and serving a hit, whole or replayed as Server-Sent Events.

use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::cache::{self, Hit, Key, ResponseCache};
use super::params::GenParams;
use super::spill::backend_header;
use crate::metrics::Observer;

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
    /// This request computes the key's answer; identical ones wait until every clone is gone.
    _flight: Option<std::sync::Arc<cache::Flight>>,
    cache: std::sync::Arc<ResponseCache>,
    key: Key,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    max_entries: usize,
    max_bytes: usize,
    /// The request asked for temperature 0. Only then is a provider's answer kept: top_k and
    /// seed make our own sampling repeatable, but providers may ignore them (OpenAI has no
    /// top_k; its seed is best effort), so their answer to such a request is one sample.
    greedy: bool,
}

impl Store {
    /// Keep `response` (a whole non-streamed response object) if every choice finished. A
    /// provider's answer is kept only for a greedy request and with its usage known (a hit
    /// reports the tokens the answer cost).
    pub(super) fn put(&self, response: &Value, backend: &str) {
        if !cache::complete(response) {
            return;
        }
        if backend != "local" {
            let n = |k: &str| response["usage"][k].as_u64().unwrap_or(0);
            if !self.greedy || n("prompt_tokens") + n("completion_tokens") == 0 {
                return;
            }
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
    /// Look a request of `params` for `model` (the served name) up, as `[cache]` says now. On
    /// a miss while an identical request is computing the same answer, wait for that one to
    /// end and look again: one computation for a burst of identical requests (if it ends
    /// without a storable answer, the next one computes).
    pub async fn lookup(
        state: &super::AppState,
        route: crate::providers::Route,
        model: &str,
        params: &GenParams,
        bytes: &[u8],
    ) -> Self {
        loop {
            match Self::try_lookup(state, route, model, params, bytes) {
                // Woken when the leader's flight ends (its sender is dropped).
                Err(mut rx) => {
                    let _ = rx.changed().await;
                }
                Ok(c) => return c,
            }
        }
    }

    /// One look: the answer, or the request computing it to wait for.
    fn try_lookup(
        state: &super::AppState,
        route: crate::providers::Route,
        model: &str,
        params: &GenParams,
        bytes: &[u8],
    ) -> Result<Self, tokio::sync::watch::Receiver<()>> {
        let live = state.live();
        let c = &live.config.cache;
        if !c.enabled {
            return Ok(CacheUse::Off);
        }
        let body = match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(b)) => b,
            _ => return Ok(CacheUse::Off),
        };
        if !params.cache || params.context.is_some() || !cache::deterministic(&params.sampling) {
            state.metrics.cache_lookup("bypass");
            return Ok(CacheUse::Bypass);
        }
        let key = cache::key(route_name(route), &params.agent, model, &body);
        let ttl = std::time::Duration::from_secs(c.ttl_secs);
        let hit = state
            .cache
            .get(&key, ttl, std::time::Instant::now())
            // A request that refuses the providers gets no provider's answer.
            .filter(|h| h.backend == "local" || body.get("fallback") != Some(&Value::Bool(false)));
        let flight = match hit {
            Some(_) => None,
            None => match state.cache.join(key) {
                cache::Join::Lead(f) => Some(std::sync::Arc::new(f)),
                cache::Join::Follow(rx) => return Err(rx),
            },
        };
        state
            .metrics
            .cache_lookup(if hit.is_some() { "hit" } else { "miss" });
        Ok(CacheUse::Lookup {
            hit,
            store: Store {
                _flight: flight,
                cache: state.cache.clone(),
                key,
                metrics: state.metrics.clone(),
                max_entries: c.max_entries,
                max_bytes: c.max_bytes,
                greedy: params.sampling.temperature == 0.0,
            },
        })
    }

    /// The `X-Aios-Cache` value, if any.
    pub(super) fn label(&self) -> Option<&'static str> {
        match self {
            CacheUse::Off => None,
            CacheUse::Bypass => Some("bypass"),
            CacheUse::Lookup { hit: Some(_), .. } => Some("hit"),
            CacheUse::Lookup { hit: None, .. } => Some("miss"),
        }
    }

    pub(super) fn hit(&self) -> Option<&Hit> {
        match self {
            CacheUse::Lookup { hit, .. } => hit.as_ref(),
            _ => None,
        }
    }

    /// Where the answer goes, on a miss.
    pub(super) fn store(&self) -> Option<Store> {
        match self {
            CacheUse::Lookup { hit: None, store } => Some(store.clone()),
            _ => None,
        }
    }
}

/// Set `X-Aios-Cache` on a response.
pub(super) fn cache_header(r: &mut Response, label: Option<&'static str>) {
    if let Some(l) = label {
        r.headers_mut()
            .insert("x-aios-cache", axum::http::HeaderValue::from_static(l));
    }
}

/// Answer from the cache: the stored response with a fresh id, or replayed as a stream. No
/// tokens are charged; the agent's ledger counts a request on the `cache` backend.
pub(super) fn serve_hit(hit: &Hit, obs: &Observer, params: &GenParams) -> Response {
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

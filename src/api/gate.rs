//! What every request passes before its handler: a request id, the drain on shutdown, header
//! size, API keys (which decide the agent), the agent's limits, the request timeout; and after
//! it: the `X-Request-Id` header, the HTTP metrics and one log line.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;

use super::error::ApiError;
use super::AppState;
use crate::auth::Who;

/// Routes that run the model: they take one of the agent's streams and count its tokens.
const GENERATION: &[&str] = &[
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/query",
];

/// The header the gate sets to the agent a key proved (a client's own is removed). Routes
/// that take the agent from the body (`/query`'s `agent_name`) check it against this.
pub const KEY_AGENT: &str = "x-aios-key-agent";

/// Routes anyone may call, keys or not (probes and scrapers).
fn is_open(path: &str) -> bool {
    path == "/health" || path == "/metrics"
}

/// Held while a request (its body included) is in flight: the drain waits for none to be left.
pub struct InFlight(Arc<AppState>);

impl InFlight {
    fn new(state: &Arc<AppState>) -> Self {
        state.inflight.fetch_add(1, Ordering::AcqRel);
        Self(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.inflight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// A request id from the client's `X-Request-Id` when it is sane, else a fresh one.
fn request_id(req: &Request) -> String {
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(String::from)
        .unwrap_or_else(|| format!("req-{:016x}", rand::random::<u64>()))
}

fn unauthorized(msg: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "authentication_error", msg)
        .with_code("invalid_api_key")
}

/// The gate itself (an axum middleware over every route).
pub async fn gate(State(state): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let t0 = Instant::now();
    let rid = request_id(&req);
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "other".into());
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let peer_loopback = req
        .extensions()
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .is_none_or(|c| c.0.ip().is_loopback());
    if let Ok(v) = HeaderValue::from_str(&rid) {
        req.headers_mut().insert("x-request-id", v);
    }
    let mut agent = String::new();
    let mut resp = match admit(&state, &mut req, &path, peer_loopback, &mut agent) {
        Err(e) => e.into_response(),
        Ok(permit) => {
            let live = state.live();
            let timeout = Duration::from_secs(live.config.limits.request_timeout_secs.max(1));
            let guard = (InFlight::new(&state), permit);
            match tokio::time::timeout(timeout, next.run(req)).await {
                Err(_) => ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout",
                    format!(
                        "the request ran past the server's limit of {}s",
                        timeout.as_secs()
                    ),
                )
                .into_response(),
                Ok(resp) => guard_body(resp, guard, t0 + timeout),
            }
        }
    };
    if let Ok(v) = HeaderValue::from_str(&rid) {
        resp.headers_mut().insert("x-request-id", v);
    }
    let status = resp.status().as_u16();
    let backend = resp
        .headers()
        .get("x-aios-backend")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("local")
        .to_string();
    state.metrics.http(&route, status, &backend);
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    if is_open(&path) && status < 400 {
        // Probes and scrapes come every few seconds: only at debug.
        tracing::debug!(request_id = %rid, method = %method, path = %path, status, ms, "request");
    } else {
        tracing::info!(request_id = %rid, agent = %agent, method = %method, path = %path, status, ms, "request");
    }
    resp
}

/// Drain, header size, key and limits; on success the agent's stream permit, if it took one.
fn admit(
    state: &Arc<AppState>,
    req: &mut Request,
    path: &str,
    peer_loopback: bool,
    agent: &mut String,
) -> Result<Option<crate::limits::StreamPermit>, ApiError> {
    let open = is_open(path);
    if state.draining.load(Ordering::Acquire) && !open {
        let mut e = ApiError::unavailable("the server is shutting down");
        e.retry_after = Some(1);
        return Err(e);
    }
    let live = state.live();
    let header_bytes: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    let max = live.config.limits.max_header_bytes;
    if max > 0 && header_bytes > max {
        return Err(ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "invalid_request_error",
            format!("the request's headers take {header_bytes} bytes; the limit is {max}"),
        ));
    }
    // Set below, by the gate only: the agent a key proved.
    req.headers_mut().remove(KEY_AGENT);
    if open {
        return Ok(None);
    }
    let admin_route = path.starts_with("/admin/") || path == "/v1/devices";
    let who = if live.keys.is_on() {
        let key = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let Some(key) = key else {
            return Err(unauthorized(
                "this server needs an API key: send Authorization: Bearer KEY",
            ));
        };
        match live.keys.lookup(key) {
            Some(w) => Some(w.clone()),
            None => return Err(unauthorized("the API key is not valid")),
        }
    } else {
        None
    };
    if admin_route {
        return match who {
            Some(Who::Admin) => {
                *agent = "admin".into();
                Ok(None)
            }
            Some(Who::Agent(_)) => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "permission_error",
                "this route needs the admin key",
            )),
            None if peer_loopback => {
                *agent = "admin".into();
                Ok(None)
            }
            None => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "permission_error",
                "with no keys configured, admin routes answer only on loopback",
            )),
        };
    }
    // The key decides the agent; only the admin may act as another through X-Agent-Id.
    if let Some(Who::Agent(name)) = &who {
        let v = HeaderValue::from_str(name)
            .map_err(|_| ApiError::internal("agent name is not a header value"))?;
        req.headers_mut().insert("x-agent-id", v.clone());
        req.headers_mut().insert(KEY_AGENT, v);
    }
    *agent = req
        .headers()
        .get("x-agent-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .unwrap_or(if who == Some(Who::Admin) {
            "admin"
        } else {
            "anonymous"
        })
        .chars()
        .take(128)
        .collect();
    if who == Some(Who::Admin) && req.headers().get("x-agent-id").is_none() {
        req.headers_mut()
            .insert("x-agent-id", HeaderValue::from_static("admin"));
    }
    let generation = req.method() == axum::http::Method::POST && GENERATION.contains(&path);
    state
        .governor
        .admit(agent, live.limits.of(agent), generation)
        .map_err(|r| {
            let limit = if r.message.contains("tokens per minute") {
                "tokens_per_minute"
            } else if r.message.contains("requests per minute") {
                "requests_per_minute"
            } else {
                "max_streams"
            };
            state.metrics.limited(limit);
            rate_limited(r)
        })
}

/// 429 with `Retry-After` (whole seconds, at least 1).
pub fn rate_limited(r: crate::limits::Refusal) -> ApiError {
    let mut e = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", r.message)
        .with_code("rate_limit_exceeded");
    e.retry_after = Some(r.retry_after.as_secs_f64().ceil().max(1.0) as u64);
    e
}

/// Keep `guard` alive until the body is sent (or the client goes), and end a body still
/// streaming at `deadline`: an SSE stream gets a last error event.
fn guard_body<G: Send + 'static>(resp: Response, guard: G, deadline: Instant) -> Response {
    let sse = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let (parts, body) = resp.into_parts();
    let sleep = Box::pin(tokio::time::sleep_until(deadline.into()));
    let stream = futures_util::stream::unfold(
        (body.into_data_stream(), sleep, Some(guard)),
        move |(mut body, mut sleep, guard)| async move {
            guard.as_ref()?;
            tokio::select! {
                chunk = body.next() => chunk.map(|c| (c, (body, sleep, guard))),
                _ = &mut sleep => {
                    let msg = ApiError::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        "timeout",
                        "the request ran past the server's time limit",
                    )
                    .body();
                    let end = if sse { format!("data: {msg}\n\n") } else { String::new() };
                    Some((Ok(Bytes::from(end)), (body, sleep, None)))
                }
            }
        },
    );
    Response::from_parts(parts, Body::from_stream(stream))
}

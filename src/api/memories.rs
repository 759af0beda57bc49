//! `/v1/memories`: an agent's long-term memory (content, metadata, embedding), searched by
//! meaning. Every route acts as the asking agent (`X-Agent-Id`, else the API key's tag); another
//! agent's memory is a 404, exactly as a missing one.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::embeddings::embed_one;
use super::error::ApiError;
use super::params::{agent_of, Body};
use super::AppState;
use crate::memory::{Memory, MemoryStore};

fn store(state: &AppState) -> Result<Arc<MemoryStore>, ApiError> {
    state.memory.clone().ok_or_else(|| {
        ApiError::unavailable("long-term memory is off: set [memory] path in the configuration")
    })
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!("no memory '{id}' for this agent"),
    )
    .with_code("memory_not_found")
}

fn memory_json(m: &Memory) -> Value {
    let mut v = json!(m);
    v["object"] = json!("memory");
    v
}

fn metadata(b: &Body) -> Result<Option<Value>, ApiError> {
    match b.get("metadata") {
        None => Ok(None),
        Some(v @ Value::Object(_)) => Ok(Some(v.clone())),
        Some(_) => Err(ApiError::param("metadata", "metadata must be an object")),
    }
}

fn content(b: &Body, required: bool) -> Result<Option<String>, ApiError> {
    match b.string("content")? {
        Some(c) if !c.trim().is_empty() => Ok(Some(c.to_string())),
        Some(_) => Err(ApiError::param("content", "content must not be empty")),
        None if required => Err(ApiError::param("content", "content is required")),
        None => Ok(None),
    }
}

/// Run a store call on a blocking worker (SQLite does file I/O).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(ApiError::internal)
}

/// Store a memory for `agent` (also used by the AIOS `/query` endpoint).
pub(super) async fn add(
    state: &AppState,
    agent: &str,
    text: String,
    meta: Value,
) -> Result<Memory, ApiError> {
    let s = store(state)?;
    let e = embed_one(state, &text, "content").await?;
    let agent = agent.to_string();
    blocking(move || s.add(&agent, &text, &meta, &e)).await
}

/// The agent's `k` memories closest in meaning to `query`, best first.
pub(super) async fn search(
    state: &AppState,
    agent: &str,
    query: &str,
    k: usize,
) -> Result<Vec<(Memory, f32)>, ApiError> {
    let s = store(state)?;
    let e = embed_one(state, query, "query").await?;
    let agent = agent.to_string();
    blocking(move || s.search(&agent, &e, k)).await
}

pub async fn create(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let run = async {
        let b = Body::parse(&body)?;
        let agent = agent_of(&headers)?;
        let text = content(&b, true)?.expect("required");
        let m = add(&state, &agent, text, metadata(&b)?.unwrap_or(json!({}))).await?;
        Ok::<_, ApiError>(axum::Json(memory_json(&m)).into_response())
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

#[derive(serde::Deserialize)]
pub struct ListQuery {
    limit: Option<usize>,
}

pub async fn list(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    let run = async {
        let agent = agent_of(&headers)?;
        let s = store(&state)?;
        let limit = q.limit.unwrap_or(100).min(10_000);
        let v = blocking(move || s.list(&agent, limit)).await?;
        let data: Vec<Value> = v.iter().map(memory_json).collect();
        Ok::<_, ApiError>(axum::Json(json!({"object": "list", "data": data})).into_response())
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

pub async fn get(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let run = async {
        let agent = agent_of(&headers)?;
        let m = get_one(&state, &agent, &id)
            .await?
            .ok_or_else(|| not_found(&id))?;
        Ok::<_, ApiError>(axum::Json(memory_json(&m)).into_response())
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// One of `agent`'s memories, if it exists.
pub(super) async fn get_one(
    state: &AppState,
    agent: &str,
    id: &str,
) -> Result<Option<Memory>, ApiError> {
    let s = store(state)?;
    let (agent, key) = (agent.to_string(), id.to_string());
    blocking(move || s.get(&agent, &key)).await
}

/// Change a memory's content (re-embedded) and/or metadata.
pub(super) async fn update(
    state: &AppState,
    agent: &str,
    id: &str,
    text: Option<String>,
    meta: Option<Value>,
) -> Result<Memory, ApiError> {
    let s = store(state)?;
    let emb = match &text {
        Some(t) => Some(embed_one(state, t, "content").await?),
        None => None,
    };
    let (agent, key) = (agent.to_string(), id.to_string());
    blocking(move || {
        let c = text.as_deref().zip(emb.as_deref());
        s.update(&agent, &key, c, meta.as_ref())
    })
    .await?
    .ok_or_else(|| not_found(id))
}

pub async fn patch(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let run = async {
        let b = Body::parse(&body)?;
        let agent = agent_of(&headers)?;
        let m = update(&state, &agent, &id, content(&b, false)?, metadata(&b)?).await?;
        Ok::<_, ApiError>(axum::Json(memory_json(&m)).into_response())
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// Remove a memory of `agent`'s; false if there was none.
pub(super) async fn remove(state: &AppState, agent: &str, id: &str) -> Result<bool, ApiError> {
    let s = store(state)?;
    let (agent, key) = (agent.to_string(), id.to_string());
    blocking(move || s.remove(&agent, &key)).await
}

pub async fn delete(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let run = async {
        let agent = agent_of(&headers)?;
        if !remove(&state, &agent, &id).await? {
            return Err(not_found(&id));
        }
        Ok::<_, ApiError>(
            axum::Json(json!({"id": id, "object": "memory", "deleted": true})).into_response(),
        )
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// `POST /v1/memories/search` `{"query": ..., "k": 5}`.
pub async fn search_route(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let run = async {
        let b = Body::parse(&body)?;
        let agent = agent_of(&headers)?;
        let query = match b.string("query")? {
            Some(q) if !q.trim().is_empty() => q.to_string(),
            _ => {
                return Err(ApiError::param(
                    "query",
                    "query is required (a non-empty string)",
                ))
            }
        };
        let k = b.int("k", 1, 1000)?.unwrap_or(5) as usize;
        let hits = search(&state, &agent, &query, k).await?;
        let data: Vec<Value> = hits
            .iter()
            .map(|(m, score)| {
                let mut v = memory_json(m);
                v["score"] = json!(score);
                v
            })
            .collect();
        Ok::<_, ApiError>(axum::Json(json!({"object": "list", "data": data})).into_response())
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

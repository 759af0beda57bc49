//! `/v1/contexts`: an agent's named conversation KV. Create one, run chat or completion
//! requests on it with `"context_id"`, fork it (copy-on-write: the fork shares the blocks), list,
//! read and delete it. An agent sees only its own contexts; another agent's id is a 404.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::error::ApiError;
use super::params::{agent_of, Body};
use super::AppState;
use crate::engine::{ContextError, ContextInfo, ContextOp, Tier};

fn context_json(model: &str, c: &ContextInfo) -> Value {
    let mut v = json!(c);
    v["object"] = json!("context");
    v["model"] = json!(model);
    v
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!("no context '{id}' for this agent"),
    )
    .with_code("context_not_found")
}

pub(super) fn engine_error(e: ContextError, id: &str) -> ApiError {
    match e {
        ContextError::NotFound(_) => not_found(id),
        ContextError::Stopped => ApiError::unavailable(e.to_string()),
        ContextError::Unsupported(m) => ApiError::invalid(m),
        ContextError::Storage(m) => ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "server_error",
            format!("the context snapshot failed: {m}"),
        ),
    }
}

/// Run `op` on the engine that holds context `id`.
async fn on_context(
    state: &AppState,
    id: &str,
    op: impl Fn() -> ContextOp,
) -> Result<(String, Vec<ContextInfo>), ApiError> {
    for (name, engine) in state.ready_engines() {
        match engine.context(op()).await {
            Ok(v) => return Ok((name, v)),
            Err(ContextError::NotFound(_)) => continue,
            Err(e) => return Err(engine_error(e, id)),
        }
    }
    Err(not_found(id))
}

fn body_or_empty(bytes: &[u8]) -> Result<Body, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        Body::parse(b"{}")
    } else {
        Body::parse(bytes)
    }
}

pub async fn create(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let run = async {
        let b = body_or_empty(&body)?;
        let owner = agent_of(&headers)?;
        let (name, engine) = state.engine_for(b.string("model")?)?;
        let v = engine
            .context(ContextOp::Create { owner })
            .await
            .map_err(|e| engine_error(e, ""))?;
        Ok::<_, ApiError>(axum::Json(context_json(&name, &v[0])).into_response())
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

pub async fn list(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let run = async {
        let owner = agent_of(&headers)?;
        let mut data = Vec::new();
        for (name, engine) in state.ready_engines() {
            let v = engine
                .context(ContextOp::List {
                    owner: owner.clone(),
                })
                .await
                .map_err(|e| engine_error(e, ""))?;
            data.extend(v.iter().map(|c| context_json(&name, c)));
        }
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
        let owner = agent_of(&headers)?;
        let (name, v) = on_context(&state, &id, || ContextOp::Get {
            id: id.clone(),
            owner: owner.clone(),
        })
        .await?;
        Ok::<_, ApiError>(axum::Json(context_json(&name, &v[0])).into_response())
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

pub async fn fork(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let run = async {
        let b = body_or_empty(&body)?;
        let owner = agent_of(&headers)?;
        // Forking for another agent is how a context is shared with it.
        let new_owner = b.string("owner")?.map(String::from);
        let (name, v) = on_context(&state, &id, || ContextOp::Fork {
            id: id.clone(),
            owner: owner.clone(),
            new_owner: new_owner.clone(),
        })
        .await?;
        Ok::<_, ApiError>(axum::Json(context_json(&name, &v[0])).into_response())
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

pub async fn delete(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let run = async {
        let owner = agent_of(&headers)?;
        on_context(&state, &id, || ContextOp::Delete {
            id: id.clone(),
            owner: owner.clone(),
        })
        .await?;
        Ok::<_, ApiError>(
            axum::Json(json!({"id": id, "object": "context", "deleted": true})).into_response(),
        )
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// `POST /v1/contexts/{id}/snapshot`: move the context's KV out of the pool now, to disk (the
/// default; it then survives a restart) or, with `{"tier": "host"}`, to host memory.
pub async fn snapshot(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let run = async {
        let b = body_or_empty(&body)?;
        let owner = agent_of(&headers)?;
        let tier = match b.string("tier")? {
            None | Some("disk") => Tier::Disk,
            Some("host") => Tier::Host,
            Some(other) => {
                return Err(ApiError::param(
                    "tier",
                    format!("tier {other:?} is not one of disk, host"),
                ))
            }
        };
        let (name, v) = on_context(&state, &id, || ContextOp::Snapshot {
            id: id.clone(),
            owner: owner.clone(),
            tier,
        })
        .await?;
        Ok::<_, ApiError>(axum::Json(context_json(&name, &v[0])).into_response())
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

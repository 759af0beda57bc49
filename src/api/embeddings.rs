//! `POST /v1/embeddings`: sentence embeddings from the configured embedding model.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::error::ApiError;
use super::params::Body;
use super::{AppState, EmbedSlot};

/// Most inputs in one request (as OpenAI allows).
const MAX_INPUTS: usize = 2048;

/// The embedding model when it is ready; `None` when embeddings are off.
pub(super) fn embedder(state: &AppState) -> Result<Arc<crate::embed::Embedder>, Option<ApiError>> {
    match &*state.embeddings.read().unwrap_or_else(|p| p.into_inner()) {
        EmbedSlot::Ready(m) => Ok(m.clone()),
        EmbedSlot::Loading => Err(Some(ApiError::unavailable(
            "the embedding model is still loading; retry shortly",
        ))),
        EmbedSlot::Failed(why) => Err(Some(ApiError::unavailable(format!(
            "the embedding model failed to load: {why} (scripts/fetch-model.sh fetches it)"
        )))),
        EmbedSlot::Off => Err(None),
    }
}

/// Token ids of `texts`; an input longer than the model takes is the client's 400 on `param`,
/// naming the input as `label(i)`.
fn tokenize_within_limit(
    m: &crate::embed::Embedder,
    texts: &[String],
    param: &str,
    label: impl Fn(usize) -> String,
) -> Result<Vec<Vec<u32>>, ApiError> {
    let ids = m.tokenize(texts).map_err(ApiError::internal)?;
    if let Some((i, t)) = ids.iter().enumerate().find(|(_, t)| t.len() > m.max_tokens) {
        return Err(ApiError::param(
            param,
            format!(
                "{} is {} tokens; {} takes at most {}",
                label(i),
                t.len(),
                m.name,
                m.max_tokens
            ),
        ));
    }
    Ok(ids)
}

/// The embedding of one text (on a blocking worker), refused when too long.
pub(super) async fn embed_one(
    state: &AppState,
    text: &str,
    param: &str,
) -> Result<Vec<f32>, ApiError> {
    let m = embedder(state).map_err(|e| {
        e.unwrap_or_else(|| {
            ApiError::unavailable("no embedding model is configured ([embeddings] path)")
        })
    })?;
    let (text, param) = (text.to_string(), param.to_string());
    tokio::task::spawn_blocking(move || {
        let ids =
            tokenize_within_limit(&m, std::slice::from_ref(&text), &param, |_| param.clone())?;
        let mut v = m.embed(&ids).map_err(ApiError::internal)?;
        Ok(v.remove(0))
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
}

pub async fn embeddings(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    match run(&state, &body).await {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn run(state: &AppState, bytes: &[u8]) -> Result<Value, ApiError> {
    let b = Body::parse(bytes)?;
    let model = embedder(state).map_err(|e| match e {
        None => ApiError::model_not_found(b.string("model").ok().flatten().unwrap_or("embeddings")),
        Some(e) => e,
    })?;
    if let Some(name) = b.string("model")? {
        if name != model.name {
            return Err(ApiError::model_not_found(name));
        }
    }
    let texts: Vec<String> = match b.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if !a.is_empty() && a.len() <= MAX_INPUTS => a
            .iter()
            .map(|v| v.as_str().map(String::from))
            .collect::<Option<_>>()
            .ok_or_else(|| {
                ApiError::param(
                    "input",
                    "input must be a string or a list of strings (token ids are not accepted)",
                )
            })?,
        Some(Value::Array(a)) if a.is_empty() => {
            return Err(ApiError::param("input", "input must not be empty"))
        }
        Some(Value::Array(_)) => {
            return Err(ApiError::param(
                "input",
                format!("input may hold at most {MAX_INPUTS} strings"),
            ))
        }
        Some(_) => {
            return Err(ApiError::param(
                "input",
                "input must be a string or a list of strings",
            ))
        }
        None => return Err(ApiError::param("input", "input is required")),
    };
    let base64 = match b.string("encoding_format")? {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::param(
                "encoding_format",
                format!("encoding_format {other:?} is not one of float, base64"),
            ))
        }
    };
    if let Some(d) = b.int("dimensions", 1, i64::MAX)? {
        if d as usize != model.dims {
            return Err(ApiError::param(
                "dimensions",
                format!(
                    "{} gives {}-dimensional embeddings only",
                    model.name, model.dims
                ),
            ));
        }
    }
    let m = model.clone();
    let (ids, vectors) = tokio::task::spawn_blocking(move || {
        let ids = tokenize_within_limit(&m, &texts, "input", |i| format!("input[{i}]"))?;
        let v = m.embed(&ids).map_err(ApiError::internal)?;
        Ok((ids, v))
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))??;
    let tokens: usize = ids.iter().map(Vec::len).sum();
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(crate::embed::base64(&bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(json!({
        "object": "list",
        "data": data,
        "model": model.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
}

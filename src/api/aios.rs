//! The AIOS kernel protocol, so agents written with the AIOS SDK (Cerebrum) run against aios:
//! `POST /query` with `{"query_type", "agent_name", "query_data"}` and `GET /core/llms/list`.
//!
//! `llm` queries run through our own chat endpoint (templates, sampling, response formats, tool
//! grammars) as the agent `agent_name`; `memory` queries use the agent's long-term memory.
//! Queries we do not run (`storage`, `tool`, the `call_tool` and `operate_file` actions) get the
//! envelope with a clear error and an inner `status_code` of 501. Replies are always HTTP 200
//! with the envelope, as the SDK expects; malformed envelopes are 400s.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::params::Body;
use super::{memories, AppState, SlotState};

fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// `GET /core/llms/list`.
pub async fn llms_list(State(state): State<Arc<AppState>>) -> Response {
    let llms: Vec<Value> = state
        .models
        .iter()
        .filter(|m| {
            matches!(
                &*m.state.read().unwrap_or_else(|p| p.into_inner()),
                SlotState::Ready(_)
            )
        })
        .map(|m| json!({"name": m.name, "backend": "aios", "hostname": "localhost"}))
        .collect();
    axum::Json(json!({"status": "success", "llms": llms})).into_response()
}

/// The envelope of an `llm` reply.
fn llm_reply(message: Value, tool_calls: Value, error: Value, status: u16, t0: f64) -> Value {
    let t1 = now_secs();
    json!({
        "response": {
            "response_class": "llm", "response_message": message, "tool_calls": tool_calls,
            "finished": true, "error": error, "status_code": status,
        },
        "start_times": [t0], "end_times": [t1], "waiting_times": [0.0],
        "turnaround_times": [t1 - t0],
    })
}

fn unsupported(class: &str, what: &str) -> Value {
    json!({"response": {
        "response_class": class, "finished": true, "status_code": 501,
        "error": format!("{what} is not supported by this kernel (aios)"),
    }})
}

pub async fn query(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let run = async {
        let b = Body::parse(&body)?;
        let agent = match b.string("agent_name")? {
            Some(a) if !a.is_empty() => a.chars().take(128).collect::<String>(),
            _ => return Err(ApiError::param("agent_name", "agent_name is required")),
        };
        // The gate sets this from the key (agent names are visible ASCII); absent without keys.
        let proved = headers
            .get(super::gate::KEY_AGENT)
            .map(|v| v.to_str().unwrap_or("?"));
        if let Some(owner) = proved.filter(|o| *o != agent) {
            return Err(ApiError::new(
                axum::http::StatusCode::FORBIDDEN,
                "permission_error",
                format!("agent_name '{agent}' is not the agent of this API key ('{owner}')"),
            ));
        }
        let data = match b.get("query_data") {
            Some(Value::Object(m)) => m.clone(),
            _ => {
                return Err(ApiError::param(
                    "query_data",
                    "query_data is required and must be an object",
                ))
            }
        };
        let reply = match b.string("query_type")? {
            Some("llm") => llm(state.clone(), &headers, &agent, &data).await,
            Some("memory") => memory(&state, &agent, &data).await,
            Some("storage") => unsupported("storage", "the storage query"),
            Some("tool") => unsupported("tool", "the tool query"),
            other => {
                return Err(ApiError::param(
                    "query_type",
                    format!("query_type {other:?} is not one of llm, memory, storage, tool"),
                ))
            }
        };
        Ok::<_, ApiError>(axum::Json(reply).into_response())
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// A tool name as the model sees it: `/` (as in `author/tool`) is not allowed in function
/// names, so it becomes `__`; the reply maps it back.
fn safe_name(name: &str) -> String {
    name.replace('/', "__")
}

async fn llm(
    state: Arc<AppState>,
    headers: &HeaderMap,
    agent: &str,
    d: &Map<String, Value>,
) -> Value {
    let t0 = now_secs();
    let action = d
        .get("action_type")
        .and_then(Value::as_str)
        .unwrap_or("chat");
    if matches!(action, "call_tool" | "operate_file") {
        let mut r = llm_reply(Value::Null, Value::Null, Value::Null, 501, t0);
        r["response"]["error"] = json!(format!(
            "action_type {action:?} is not supported by this kernel (aios runs the model; the agent runs its tools)"
        ));
        return r;
    }
    // The first preferred model we serve, else the default one.
    let model = d
        .get("llms")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|l| l.get("name").and_then(Value::as_str))
        .find(|n| state.engine_for(Some(n)).is_ok())
        .map(String::from);
    let mut body = json!({"messages": d.get("messages").cloned().unwrap_or(Value::Null)});
    if let Some(m) = model {
        body["model"] = json!(m);
    }
    if let Some(t) = d.get("temperature").filter(|v| !v.is_null()) {
        body["temperature"] = t.clone();
    }
    if let Some(t) = d.get("max_new_tokens").filter(|v| !v.is_null()) {
        body["max_tokens"] = t.clone();
    }
    let json_out = action == "chat_with_json_output"
        || d.get("message_return_type").and_then(Value::as_str) == Some("json");
    match d.get("response_format").filter(|v| !v.is_null()) {
        Some(rf) => body["response_format"] = rf.clone(),
        None if json_out => body["response_format"] = json!({"type": "json_object"}),
        None => {}
    }
    let mut names = Vec::new();
    if let Some(Value::Array(tools)) = d.get("tools") {
        let mut safe = tools.clone();
        for t in safe.iter_mut() {
            if let Some(n) = t["function"]["name"].as_str().map(String::from) {
                t["function"]["name"] = json!(safe_name(&n));
                names.push(n);
            }
        }
        if !safe.is_empty() {
            body["tools"] = Value::Array(safe);
            if matches!(action, "chat_with_tool_call_output" | "tool_use") {
                body["tool_choice"] = json!("required");
            }
        }
    }
    let mut h = headers.clone();
    h.remove("x-agent-id");
    if let Ok(v) = HeaderValue::from_str(agent) {
        h.insert("x-agent-id", v);
    }
    let resp = super::chat::chat_completions(State(state), h, Bytes::from(body.to_string())).await;
    let status = resp.status().as_u16();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap_or_default();
    let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if status != 200 {
        let msg = v["error"]["message"]
            .as_str()
            .unwrap_or("the model failed")
            .to_string();
        return llm_reply(Value::Null, Value::Null, json!(msg), status, t0);
    }
    let msg = &v["choices"][0]["message"];
    let calls = msg["tool_calls"].as_array().map(|calls| {
        calls
            .iter()
            .map(|c| {
                let safe = c["function"]["name"].as_str().unwrap_or_default();
                let name = names
                    .iter()
                    .find(|n| safe_name(n) == safe)
                    .cloned()
                    .unwrap_or_else(|| safe.to_string());
                let args = c["function"]["arguments"]
                    .as_str()
                    .and_then(|a| serde_json::from_str::<Value>(a).ok())
                    .unwrap_or(json!({}));
                json!({"name": name, "parameters": args, "id": c["id"]})
            })
            .collect::<Vec<_>>()
    });
    llm_reply(
        msg["content"].clone(),
        calls.map_or(Value::Null, Value::Array),
        Value::Null,
        200,
        t0,
    )
}

async fn memory(state: &AppState, agent: &str, d: &Map<String, Value>) -> Value {
    let op = d
        .get("operation_type")
        .and_then(Value::as_str)
        .unwrap_or("");
    let params = d.get("params").and_then(Value::as_object).unwrap_or(d);
    let s = |k: &str| params.get(k).and_then(Value::as_str).map(String::from);
    let reply = |fields: Value| {
        let mut r = json!({"response_class": "memory", "memory_id": null, "content": null,
                           "metadata": null, "search_results": null, "success": true, "error": null});
        for (k, v) in fields.as_object().unwrap() {
            r[k] = v.clone();
        }
        json!({ "response": r })
    };
    let fail = |e: String| reply(json!({"success": false, "error": e}));
    let meta = params.get("metadata").filter(|m| m.is_object()).cloned();
    let result: Result<Value, ApiError> = async {
        match op {
            "add_memory" | "add_agentic_memory" => {
                let content = s("content").filter(|c| !c.trim().is_empty()).ok_or_else(|| {
                    ApiError::param("content", "add_memory needs a non-empty content")
                })?;
                let m =
                    memories::add(state, agent, content, meta.unwrap_or(json!({}))).await?;
                Ok(reply(json!({"memory_id": m.id, "content": m.content, "metadata": m.metadata})))
            }
            "get_memory" => {
                let id = s("memory_id").unwrap_or_default();
                match memories::get_one(state, agent, &id).await? {
                    Some(m) => Ok(reply(json!({"memory_id": m.id, "content": m.content, "metadata": m.metadata}))),
                    None => Ok(fail(format!("no memory '{id}' for this agent"))),
                }
            }
            "update_memory" => {
                let id = s("memory_id").unwrap_or_default();
                let m = memories::update(state, agent, &id, s("content"), meta).await?;
                Ok(reply(json!({"memory_id": m.id, "content": m.content, "metadata": m.metadata})))
            }
            "remove_memory" => {
                let id = s("memory_id").unwrap_or_default();
                if memories::remove(state, agent, &id).await? {
                    Ok(reply(json!({"memory_id": id})))
                } else {
                    Ok(fail(format!("no memory '{id}' for this agent")))
                }
            }
            "retrieve_memory" => {
                let q = s("content").or_else(|| s("query")).unwrap_or_default();
                let k = params.get("k").and_then(Value::as_u64).unwrap_or(5).clamp(1, 1000);
                let hits = memories::search(state, agent, &q, k as usize).await?;
                let results: Vec<Value> = hits
                    .iter()
                    .map(|(m, score)| json!({"memory_id": m.id, "content": m.content,
                                             "metadata": m.metadata, "score": score}))
                    .collect();
                Ok(reply(json!({"search_results": results})))
            }
            other => Ok(fail(format!(
                "operation_type {other:?} is not one of add_memory, add_agentic_memory, get_memory, update_memory, remove_memory, retrieve_memory"
            ))),
        }
    }
    .await;
    result.unwrap_or_else(|e| fail(e.message))
}

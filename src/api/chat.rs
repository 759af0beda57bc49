//! `POST /v1/chat/completions`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::error::ApiError;
use super::generate::{ChoiceOut, Envelope, Format, Job, OutToken};
use super::params::{Body, GenParams};
use super::{new_id, unix_now, AppState};
use crate::engine::{FinishReason, ModelInfo};

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match prepare(&state, &headers, &body) {
        Ok((job, format)) => job.respond(format).await,
        Err(e) => e.into_response(),
    }
}

fn prepare(
    state: &AppState,
    headers: &HeaderMap,
    bytes: &[u8],
) -> Result<(Job, ChatFormat), ApiError> {
    let b = Body::parse(bytes)?;
    let mut params = GenParams::read(&b, headers, &["max_completion_tokens", "max_tokens"])?;
    let (name, engine) = state.engine_for(params.model.as_deref())?;
    let messages = read_messages(&b)?;
    if let Some(rf) = b.get("response_format") {
        match rf.get("type").and_then(Value::as_str) {
            Some("text") => {}
            Some(other) => {
                return Err(ApiError::param(
                    "response_format",
                    format!("response_format type {other:?} is not supported yet"),
                ))
            }
            None => {
                return Err(ApiError::param(
                    "response_format",
                    "response_format.type is required",
                ))
            }
        }
    }
    let tools = b.get("tools");
    let tool_choice_none = b.get("tool_choice").and_then(Value::as_str) == Some("none");
    if tools.is_some_and(|t| t.as_array().is_some_and(|a| !a.is_empty())) && !tool_choice_none {
        return Err(ApiError::param("tools", "tool calls are not supported yet"));
    }
    let logprobs = b.bool("logprobs")?.unwrap_or(false);
    let top = b.int("top_logprobs", 0, 20)?;
    if top.is_some() && !logprobs {
        return Err(ApiError::param(
            "top_logprobs",
            "top_logprobs requires logprobs: true",
        ));
    }
    if logprobs {
        params.sampling.logprobs = Some(top.unwrap_or(0) as usize);
    }
    let info = engine.model.clone();
    let template = info.template.as_ref().ok_or_else(|| {
        ApiError::invalid(format!(
            "model '{name}' has no chat template; configure chat_template for it or use /v1/completions"
        ))
    })?;
    let text = template
        .render(&messages, None, true)
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    let prompt = info
        .tokenizer
        .encode(&text, true)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let format = ChatFormat {
        env: Envelope {
            id: new_id("chatcmpl"),
            created: unix_now(),
            model: name,
        },
        info,
        logprobs,
        include_usage: params.include_usage,
    };
    Ok((
        Job {
            engine,
            prompts: vec![prompt],
            params,
        },
        format,
    ))
}

/// Check the messages and flatten their content to text, as the template expects.
fn read_messages(b: &Body) -> Result<Vec<Value>, ApiError> {
    let list = match b.get("messages") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => {
            return Err(ApiError::param("messages", "messages must not be empty"))
        }
        Some(_) => return Err(ApiError::param("messages", "messages must be a list")),
        None => return Err(ApiError::param("messages", "messages is required")),
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let param = format!("messages[{i}]");
        let obj = m
            .as_object()
            .ok_or_else(|| ApiError::param(&param, format!("{param} must be an object")))?;
        let role = obj.get("role").and_then(Value::as_str).ok_or_else(|| {
            ApiError::param(
                &param,
                format!("{param}.role is required and must be a string"),
            )
        })?;
        let role = match role {
            "system" | "user" | "assistant" | "tool" => role,
            "developer" => "system",
            other => {
                return Err(ApiError::param(
                    &param,
                    format!(
                    "{param}.role {other:?} is not one of system, developer, user, assistant, tool"
                ),
                ))
            }
        };
        let content = match obj.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (
                        p.get("type").and_then(Value::as_str),
                        p.get("text").and_then(Value::as_str),
                    ) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        (kind, _) => {
                            return Err(ApiError::param(
                                &param,
                                format!(
                                "{param}.content part of type {:?} is not supported (text only)",
                                kind.unwrap_or("?")
                            ),
                            ))
                        }
                    }
                }
                text
            }
            None | Some(Value::Null) if role == "assistant" => String::new(),
            _ => {
                return Err(ApiError::param(
                    &param,
                    format!("{param}.content must be a string or a list of text parts"),
                ))
            }
        };
        let mut msg = obj.clone();
        msg.insert("role".into(), json!(role));
        msg.insert("content".into(), json!(content));
        out.push(Value::Object(msg));
    }
    Ok(out)
}

pub struct ChatFormat {
    env: Envelope,
    info: Arc<ModelInfo>,
    logprobs: bool,
    include_usage: bool,
}

impl ChatFormat {
    fn chunk(&self, choice: Value) -> Value {
        let mut v = self.env.object("chat.completion.chunk", json!([choice]));
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    fn logprobs_json(&self, tokens: &[OutToken]) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        let entry = |id: u32, lp: f32| {
            let s = self.info.tokenizer.token_str(id);
            json!({"token": s, "logprob": lp, "bytes": self.info.tokenizer.token_bytes(id)})
        };
        let content: Vec<Value> = tokens
            .iter()
            .filter_map(|t| {
                let lp = t.logprobs.as_ref()?;
                let mut e = entry(t.id, lp.logprob);
                e["top_logprobs"] = lp.top.iter().map(|&(i, l)| entry(i, l)).collect();
                Some(e)
            })
            .collect();
        json!({ "content": content })
    }
}

impl Format for ChatFormat {
    fn start_chunk(&self, index: usize) -> Option<Value> {
        Some(self.chunk(json!({
            "index": index, "delta": {"role": "assistant", "content": ""},
            "logprobs": Value::Null, "finish_reason": Value::Null,
        })))
    }

    fn delta_chunk(&self, index: usize, text: &str, tokens: &[OutToken]) -> Value {
        self.chunk(json!({
            "index": index, "delta": {"content": text},
            "logprobs": self.logprobs_json(tokens), "finish_reason": Value::Null,
        }))
    }

    fn finish_chunk(&self, index: usize, finish: FinishReason) -> Value {
        self.chunk(json!({
            "index": index, "delta": {}, "logprobs": Value::Null, "finish_reason": finish.as_str(),
        }))
    }

    fn usage_chunk(&self, usage: Value) -> Value {
        self.env.usage_chunk("chat.completion.chunk", usage)
    }

    fn response(&self, choices: Vec<ChoiceOut>, usage: Value) -> Value {
        let choices: Vec<Value> = choices
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                json!({
                    "index": i,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": self.logprobs_json(&c.tokens),
                    "finish_reason": c.finish.map(|f| f.as_str()),
                })
            })
            .collect();
        let mut v = self.env.object("chat.completion", json!(choices));
        v["usage"] = usage;
        v
    }
}

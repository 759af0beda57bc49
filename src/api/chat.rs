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
use super::structured::{self, ToolAnswer, Tools};
use super::{new_id, unix_now, AppState};
use crate::engine::{FinishReason, ModelInfo};

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let prepared = prepare(&state, &headers, &body);
    let route = crate::providers::Route::Chat;
    super::generate::answer(&state, &headers, &body, route, prepared).await
}

/// `POST /v1/chat/completions/render`: the token ids the engine would run for this request,
/// chat template (and tools, response format) included. Nothing runs: neither the response
/// cache nor the fallbacks are consulted.
pub async fn render(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match prepare(&state, &headers, &body) {
        Ok((job, _)) => axum::Json(json!({"token_ids": job.prompts[0]})).into_response(),
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
    // The body is checked before the model is looked up: a request for a model that is not
    // served here (failed to load, still loading) may go on to its fallbacks, checked.
    let mut messages = read_messages(&b)?;
    let answer_schema = structured::response_schema(&b)?;
    let tools = Tools::read(&b)?;
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
    let (name, engine) = state.engine_for(params.model.as_deref())?;
    let info = engine.model.clone();
    let template = info.template.as_ref().ok_or_else(|| {
        ApiError::invalid(format!(
            "model '{name}' has no chat template; configure chat_template for it or use /v1/completions"
        ))
    })?;
    // Tools go to templates that take them; the answer's shape is always spelled out in a
    // system message, as the grammar will enforce it.
    let template_tools = tools
        .as_ref()
        .filter(|_| template.takes("tools"))
        .map(|t| Value::Array(t.tools.iter().map(|x| x.raw.clone()).collect()));
    if let Some(t) = &tools {
        let text = t.instructions(template_tools.is_none());
        match messages.first_mut() {
            Some(m) if m["role"] == "system" => {
                let joined = format!("{}\n\n{text}", m["content"].as_str().unwrap_or_default());
                m["content"] = json!(joined);
            }
            _ => messages.insert(0, json!({"role": "system", "content": text})),
        }
    }
    let text = template
        .render(&messages, template_tools.as_ref(), true)
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    params.constraint = match (&tools, &answer_schema) {
        (Some(t), answer) => Some(structured::compile(
            &info,
            &t.schema(answer.as_ref()),
            "tools",
        )?),
        (None, Some(schema)) => Some(structured::compile(&info, schema, "response_format")?),
        (None, None) => None,
    };
    let prompt = info
        .tokenizer
        .encode(&text, true)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let format = ChatFormat {
        env: Envelope {
            id: new_id("chatcmpl"),
            created: unix_now(),
            model: name.clone(),
        },
        info,
        logprobs,
        include_usage: params.include_usage,
        tools: tools.is_some(),
        held: Vec::new(),
    };
    Ok((
        Job::new(state, engine, &name, vec![prompt], params, headers),
        format,
    ))
}

/// Check the messages and flatten their content to text, as the template expects.
pub(super) fn read_messages(b: &Body) -> Result<Vec<Value>, ApiError> {
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
            None | Some(Value::Null) if role == "assistant" && obj.contains_key("tool_calls") => {
                String::new()
            }
            None | Some(Value::Null) if role == "assistant" => String::new(),
            _ => {
                return Err(ApiError::param(
                    &param,
                    format!("{param}.content must be a string or a list of text parts"),
                ))
            }
        };
        let mut content = content;
        if role == "tool" && !obj.get("tool_call_id").is_some_and(Value::is_string) {
            return Err(ApiError::param(
                &param,
                format!("{param}.tool_call_id is required for role \"tool\" and must be a string"),
            ));
        }
        if role == "assistant" {
            match obj.get("tool_calls") {
                None | Some(Value::Null) => {}
                Some(Value::Array(calls)) => {
                    // The model sees its earlier calls in the shape it is asked to write them.
                    let text = structured::history_text(calls)
                        .map_err(|e| ApiError::param(&param, format!("{param}.{e}")))?;
                    if content.is_empty() {
                        content = text;
                    } else {
                        content = format!("{content}\n{text}");
                    }
                }
                Some(_) => {
                    return Err(ApiError::param(
                        &param,
                        format!("{param}.tool_calls must be a list"),
                    ))
                }
            }
        }
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
    /// Output is a tool grammar's JSON, unwrapped into `tool_calls` or `content`.
    tools: bool,
    /// Streamed text held back per choice until it can be unwrapped (tools only).
    held: Vec<String>,
}

impl ChatFormat {
    /// The message and finish reason of a finished choice's text under a tool grammar.
    fn unwrap_tools(
        &self,
        text: &str,
        finish: Option<FinishReason>,
    ) -> (Value, Option<&'static str>) {
        match structured::parse_answer(text) {
            ToolAnswer::Calls(calls) => {
                let calls: Vec<Value> = calls
                    .into_iter()
                    .map(|(name, args)| {
                        json!({"id": new_id("call"), "type": "function",
                               "function": {"name": name, "arguments": args}})
                    })
                    .collect();
                let msg = json!({"role": "assistant", "content": Value::Null, "tool_calls": calls});
                (msg, Some("tool_calls"))
            }
            ToolAnswer::Text(t) => (
                json!({"role": "assistant", "content": t}),
                finish.map(|f| f.as_str()),
            ),
        }
    }

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

    fn delta_chunk(&mut self, index: usize, text: &str, tokens: &[OutToken]) -> Option<Value> {
        if self.tools {
            if self.held.len() <= index {
                self.held.resize(index + 1, String::new());
            }
            self.held[index].push_str(text);
            return None;
        }
        Some(self.chunk(json!({
            "index": index, "delta": {"content": text},
            "logprobs": self.logprobs_json(tokens), "finish_reason": Value::Null,
        })))
    }

    fn finish_chunks(&mut self, index: usize, finish: FinishReason) -> Vec<Value> {
        let mut out = Vec::new();
        let mut reason = Some(finish.as_str());
        if self.tools {
            let text = self
                .held
                .get_mut(index)
                .map(std::mem::take)
                .unwrap_or_default();
            let (msg, r) = self.unwrap_tools(&text, Some(finish));
            reason = r;
            if let Some(calls) = msg["tool_calls"].as_array() {
                // Each call as OpenAI streams it: id and name first, then the arguments.
                for (k, c) in calls.iter().enumerate() {
                    let f = &c["function"];
                    let head = json!([{"index": k, "id": c["id"], "type": "function",
                                       "function": {"name": f["name"], "arguments": ""}}]);
                    let args = json!([{"index": k, "function": {"arguments": f["arguments"]}}]);
                    for d in [head, args] {
                        out.push(self.chunk(json!({
                            "index": index, "delta": {"tool_calls": d},
                            "logprobs": Value::Null, "finish_reason": Value::Null,
                        })));
                    }
                }
            } else if let Some(t) = msg["content"].as_str().filter(|t| !t.is_empty()) {
                out.push(self.chunk(json!({
                    "index": index, "delta": {"content": t},
                    "logprobs": Value::Null, "finish_reason": Value::Null,
                })));
            }
        }
        out.push(self.chunk(json!({
            "index": index, "delta": {}, "logprobs": Value::Null, "finish_reason": reason,
        })));
        out
    }

    fn usage_chunk(&self, usage: Value) -> Value {
        self.env.usage_chunk("chat.completion.chunk", usage)
    }

    fn response(&self, choices: Vec<ChoiceOut>, usage: Value) -> Value {
        let choices: Vec<Value> = choices
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let (message, finish) = if self.tools {
                    self.unwrap_tools(&c.text, c.finish)
                } else {
                    (
                        json!({"role": "assistant", "content": c.text}),
                        c.finish.map(|f| f.as_str()),
                    )
                };
                json!({
                    "index": i,
                    "message": message,
                    "logprobs": self.logprobs_json(&c.tokens),
                    "finish_reason": finish,
                })
            })
            .collect();
        let mut v = self.env.object("chat.completion", json!(choices));
        v["usage"] = usage;
        v
    }
}

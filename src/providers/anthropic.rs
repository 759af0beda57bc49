//! The Anthropic Messages API behind our OpenAI-shaped requests: chat requests are translated
//! to `/v1/messages` (system prompt, messages with tool uses and results, tools and tool
//! choice, stop sequences, sampling), and answers and streams back to chat completions.

use serde_json::{json, Map, Value};

/// The text of an OpenAI message content: a string, or the text parts of a list.
fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

/// An OpenAI chat request as a Messages API request.
pub fn request(body: &Value) -> Result<Value, String> {
    let mut system = Vec::new();
    let mut messages: Vec<Value> = Vec::new();
    let msgs = body["messages"]
        .as_array()
        .ok_or("the Anthropic provider serves chat requests only")?;
    for m in msgs {
        let role = m["role"].as_str().unwrap_or("user");
        let (role, content) = match role {
            "system" | "developer" => {
                system.push(text_of(&m["content"]));
                continue;
            }
            "tool" => (
                "user",
                json!([{"type": "tool_result",
                        "tool_use_id": m["tool_call_id"].as_str().unwrap_or(""),
                        "content": text_of(&m["content"])}]),
            ),
            "assistant" => {
                let mut blocks = Vec::new();
                let text = text_of(&m["content"]);
                if !text.is_empty() {
                    blocks.push(json!({"type": "text", "text": text}));
                }
                for c in m["tool_calls"].as_array().into_iter().flatten() {
                    let args = c["function"]["arguments"].as_str().unwrap_or("{}");
                    blocks.push(json!({
                        "type": "tool_use",
                        "id": c["id"],
                        "name": c["function"]["name"],
                        "input": serde_json::from_str::<Value>(args).unwrap_or(json!({})),
                    }));
                }
                ("assistant", Value::Array(blocks))
            }
            _ => (
                "user",
                json!([{"type": "text", "text": text_of(&m["content"])}]),
            ),
        };
        // The Messages API wants roles to alternate: merge consecutive turns of one role.
        match messages.last_mut() {
            Some(last) if last["role"] == role => {
                if let (Some(a), Some(b)) = (last["content"].as_array_mut(), content.as_array()) {
                    a.extend(b.iter().cloned());
                }
            }
            _ => messages.push(json!({"role": role, "content": content})),
        }
    }
    let mut out = Map::new();
    out.insert("model".into(), body["model"].clone());
    out.insert("messages".into(), Value::Array(messages));
    if !system.is_empty() {
        out.insert("system".into(), json!(system.join("\n\n")));
    }
    let max = body
        .get("max_completion_tokens")
        .or_else(|| body.get("max_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(1024);
    out.insert("max_tokens".into(), json!(max));
    for k in ["temperature", "top_p", "top_k", "stream"] {
        if let Some(v) = body.get(k).filter(|v| !v.is_null()) {
            out.insert(k.into(), v.clone());
        }
    }
    match &body["stop"] {
        Value::String(s) => {
            out.insert("stop_sequences".into(), json!([s]));
        }
        Value::Array(a) => {
            out.insert("stop_sequences".into(), Value::Array(a.clone()));
        }
        _ => {}
    }
    if let Some(tools) = body["tools"].as_array().filter(|t| !t.is_empty()) {
        let tools: Vec<Value> = tools
            .iter()
            .map(|t| {
                let f = &t["function"];
                let mut x = json!({"name": f["name"],
                    "input_schema": f.get("parameters").cloned().unwrap_or(json!({"type": "object"}))});
                if let Some(d) = f.get("description").filter(|d| d.is_string()) {
                    x["description"] = d.clone();
                }
                x
            })
            .collect();
        let choice = match &body["tool_choice"] {
            Value::String(s) if s == "required" => Some(json!({"type": "any"})),
            Value::String(s) if s == "none" => Some(json!({"type": "none"})),
            Value::Object(o) => o
                .get("function")
                .and_then(|f| f.get("name"))
                .map(|n| json!({"type": "tool", "name": n})),
            _ => None,
        };
        out.insert("tools".into(), Value::Array(tools));
        if let Some(c) = choice {
            out.insert("tool_choice".into(), c);
        }
    }
    Ok(Value::Object(out))
}

fn finish_reason(stop: &str) -> &'static str {
    match stop {
        "max_tokens" => "length",
        "tool_use" => "tool_calls",
        _ => "stop",
    }
}

/// A Messages API answer as a chat completion.
pub fn response(v: &Value, model: &str) -> Value {
    let mut text = String::new();
    let mut calls = Vec::new();
    for b in v["content"].as_array().into_iter().flatten() {
        match b["type"].as_str() {
            Some("text") => text.push_str(b["text"].as_str().unwrap_or("")),
            Some("tool_use") => calls.push(json!({
                "id": b["id"], "type": "function",
                "function": {"name": b["name"], "arguments": b["input"].to_string()},
            })),
            _ => {}
        }
    }
    let mut message = json!({"role": "assistant", "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { json!(text) }});
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    let (pt, ct) = (
        v["usage"]["input_tokens"].as_u64().unwrap_or(0),
        v["usage"]["output_tokens"].as_u64().unwrap_or(0),
    );
    json!({
        "id": v["id"], "object": "chat.completion", "created": crate::api::unix_now(),
        "model": model,
        "choices": [{"index": 0, "message": message,
                     "finish_reason": finish_reason(v["stop_reason"].as_str().unwrap_or(""))}],
        "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct},
    })
}

/// Turns a Messages API event stream into chat completion chunks, event by event.
#[derive(Default)]
pub struct StreamTranslator {
    id: String,
    model: String,
    prompt_tokens: u64,
    completion_tokens: u64,
    /// The content block index of each tool use, in the order they came (OpenAI's index).
    tools: Vec<u64>,
}

impl StreamTranslator {
    pub fn new(model: &str) -> Self {
        Self {
            model: model.to_string(),
            ..Default::default()
        }
    }

    pub fn usage(&self) -> (u64, u64) {
        (self.prompt_tokens, self.completion_tokens)
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> Value {
        json!({"id": self.id, "object": "chat.completion.chunk", "created": crate::api::unix_now(),
               "model": self.model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    }

    /// The chunks for one Messages API event (its `data` JSON).
    pub fn event(&mut self, e: &Value) -> Vec<Value> {
        match e["type"].as_str().unwrap_or("") {
            "message_start" => {
                self.id = e["message"]["id"].as_str().unwrap_or("").to_string();
                self.prompt_tokens = e["message"]["usage"]["input_tokens"].as_u64().unwrap_or(0);
                vec![self.chunk(json!({"role": "assistant", "content": ""}), None)]
            }
            "content_block_start" if e["content_block"]["type"] == "tool_use" => {
                let i = self.tools.len();
                self.tools.push(e["index"].as_u64().unwrap_or(0));
                let b = &e["content_block"];
                vec![self.chunk(
                    json!({"tool_calls": [{"index": i, "id": b["id"], "type": "function",
                                           "function": {"name": b["name"], "arguments": ""}}]}),
                    None,
                )]
            }
            "content_block_delta" => {
                let d = &e["delta"];
                match d["type"].as_str() {
                    Some("text_delta") => vec![self.chunk(json!({"content": d["text"]}), None)],
                    Some("input_json_delta") => {
                        let block = e["index"].as_u64().unwrap_or(0);
                        let i = self.tools.iter().position(|&b| b == block).unwrap_or(0);
                        vec![self.chunk(
                            json!({"tool_calls": [{"index": i,
                                   "function": {"arguments": d["partial_json"]}}]}),
                            None,
                        )]
                    }
                    _ => vec![],
                }
            }
            "message_delta" => {
                self.completion_tokens = e["usage"]["output_tokens"]
                    .as_u64()
                    .unwrap_or(self.completion_tokens);
                let stop = e["delta"]["stop_reason"].as_str().unwrap_or("end_turn");
                vec![self.chunk(json!({}), Some(finish_reason(stop)))]
            }
            _ => vec![],
        }
    }

    /// The usage chunk OpenAI streams send last (`include_usage`).
    pub fn usage_chunk(&self) -> Value {
        let (p, c) = self.usage();
        json!({"id": self.id, "object": "chat.completion.chunk", "created": crate::api::unix_now(),
               "model": self.model, "choices": [],
               "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}})
    }
}

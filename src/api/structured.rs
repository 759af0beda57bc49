//! Structured output: `response_format` (JSON object or JSON schema) and tool calls.
//!
//! Tool calls use one JSON shape for every model, written into the prompt and enforced by the
//! grammar: `{"tool_calls": [{"name": ..., "arguments": {...}}]}` to call tools, or (with
//! `tool_choice: "auto"`) `{"response": ...}` to answer in words. The arguments are generated
//! under each function's own parameter schema, so a call always parses and validates; the
//! server unwraps the shape into OpenAI's `tool_calls` or `content`. Templates that take a
//! `tools` variable get the tools as well; others get them in a system message.

use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::params::Body;
use crate::engine::{Constraint, ModelInfo};

/// The JSON schema that `response_format` asks for; None for plain text.
pub fn response_schema(b: &Body) -> Result<Option<Value>, ApiError> {
    const P: &str = "response_format";
    let Some(rf) = b.get(P) else {
        return Ok(None);
    };
    let kind = rf.get("type").and_then(Value::as_str).ok_or_else(|| {
        ApiError::param(
            P,
            "response_format.type is required: text, json_object or json_schema",
        )
    })?;
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(json!({"type": "object"}))),
        "json_schema" => {
            let js = rf.get("json_schema").ok_or_else(|| {
                ApiError::param(
                    P,
                    "response_format.json_schema is required when type is json_schema",
                )
            })?;
            match js.get("schema") {
                Some(s @ Value::Object(_)) => Ok(Some(s.clone())),
                Some(_) => Err(ApiError::param(
                    P,
                    "response_format.json_schema.schema must be a JSON object",
                )),
                None => Err(ApiError::param(
                    P,
                    "response_format.json_schema.schema is required",
                )),
            }
        }
        other => Err(ApiError::param(
            P,
            format!("response_format.type {other:?} is not one of text, json_object, json_schema"),
        )),
    }
}

/// Compile `schema` for the model; a schema the grammar compiler refuses is the client's 400,
/// naming what it refused (e.g. `Unimplemented keys: ["not"]`).
pub fn compile(info: &ModelInfo, schema: &Value, param: &str) -> Result<Constraint, ApiError> {
    info.grammars
        .json_schema(&info.tokenizer, schema)
        .map_err(|e| {
            ApiError::param(
                param,
                format!("{param}: the JSON schema uses a feature aios does not support, or is invalid: {e}"),
            )
        })
}

/// One function the model may call.
#[derive(Debug, Clone)]
pub struct Tool {
    pub name: String,
    /// The tool as the client sent it (`{"type": "function", "function": {...}}`).
    pub raw: Value,
    parameters: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    Auto,
    Required,
    Named(String),
}

/// The tools a request offers and how the model must use them.
#[derive(Debug, Clone)]
pub struct Tools {
    pub tools: Vec<Tool>,
    pub choice: ToolChoice,
    pub parallel: bool,
}

impl Tools {
    /// Read `tools`, `tool_choice` and `parallel_tool_calls`. None when no tool can be called
    /// (no tools, or `tool_choice: "none"`).
    pub fn read(b: &Body) -> Result<Option<Self>, ApiError> {
        let list = match b.get("tools") {
            None => return Ok(None),
            Some(Value::Array(a)) => a,
            Some(_) => return Err(ApiError::param("tools", "tools must be a list")),
        };
        let mut tools = Vec::with_capacity(list.len());
        for (i, t) in list.iter().enumerate() {
            let p = format!("tools[{i}]");
            if t.get("type").and_then(Value::as_str) != Some("function") {
                return Err(ApiError::param(
                    &p,
                    format!("{p}.type must be \"function\""),
                ));
            }
            let f = t
                .get("function")
                .and_then(Value::as_object)
                .ok_or_else(|| ApiError::param(&p, format!("{p}.function must be an object")))?;
            let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
            let valid = !name.is_empty()
                && name.len() <= 64
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !valid {
                return Err(ApiError::param(
                    &p,
                    format!("{p}.function.name must be 1 to 64 letters, digits, '_' or '-'"),
                ));
            }
            if tools.iter().any(|t: &Tool| t.name == name) {
                return Err(ApiError::param(&p, format!("two tools are named {name:?}")));
            }
            let parameters = match f.get("parameters") {
                None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
                Some(s @ Value::Object(_)) => s.clone(),
                Some(_) => {
                    return Err(ApiError::param(
                        &p,
                        format!("{p}.function.parameters must be a JSON schema object"),
                    ))
                }
            };
            tools.push(Tool {
                name: name.to_string(),
                raw: t.clone(),
                parameters,
            });
        }
        let choice = match b.get("tool_choice") {
            None => ToolChoice::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "none" => return Ok(None),
                "auto" => ToolChoice::Auto,
                "required" => ToolChoice::Required,
                other => {
                    return Err(ApiError::param(
                        "tool_choice",
                        format!("tool_choice {other:?} is not one of none, auto, required, or a named function"),
                    ))
                }
            },
            Some(v) => {
                let name = v
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        ApiError::param(
                            "tool_choice",
                            "tool_choice must be a string or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                        )
                    })?;
                if !tools.iter().any(|t| t.name == name) {
                    return Err(ApiError::param(
                        "tool_choice",
                        format!("tool_choice names {name:?}, which is not among the tools"),
                    ));
                }
                ToolChoice::Named(name.to_string())
            }
        };
        if tools.is_empty() {
            if choice == ToolChoice::Auto {
                return Ok(None);
            }
            return Err(ApiError::param(
                "tool_choice",
                "tool_choice requires at least one tool",
            ));
        }
        // One call per turn unless the client asks for more (as llama.cpp's server does): small
        // models otherwise repeat the same call until max_tokens.
        let parallel = b.bool("parallel_tool_calls")?.unwrap_or(false);
        Ok(Some(Self {
            tools,
            choice,
            parallel,
        }))
    }

    /// The tools a call may name under `tool_choice`.
    fn callable(&self) -> impl Iterator<Item = &Tool> {
        self.tools.iter().filter(move |t| match &self.choice {
            ToolChoice::Named(n) => &t.name == n,
            _ => true,
        })
    }

    /// The grammar of the model's answer. `answer` is the schema of a direct answer under
    /// `auto` (a string unless `response_format` says otherwise).
    pub fn schema(&self, answer: Option<&Value>) -> Value {
        let one_call: Vec<Value> = self
            .callable()
            .map(|t| {
                json!({
                    "type": "object",
                    "properties": {
                        "name": {"const": t.name},
                        "arguments": t.parameters,
                    },
                    "required": ["name", "arguments"],
                    "additionalProperties": false,
                })
            })
            .collect();
        let single = !self.parallel || matches!(self.choice, ToolChoice::Named(_));
        let mut calls = json!({"type": "array", "items": {"anyOf": one_call}, "minItems": 1});
        if single {
            calls["maxItems"] = json!(1);
        }
        let call = json!({
            "type": "object",
            "properties": {"tool_calls": calls},
            "required": ["tool_calls"],
            "additionalProperties": false,
        });
        match self.choice {
            ToolChoice::Auto => {
                let answer = answer.cloned().unwrap_or(json!({"type": "string"}));
                json!({"anyOf": [call, {
                    "type": "object",
                    "properties": {"response": answer},
                    "required": ["response"],
                    "additionalProperties": false,
                }]})
            }
            _ => call,
        }
    }

    /// The system text that tells the model about the tools (when `list` is set) and the
    /// shape its answer must take.
    pub fn instructions(&self, list: bool) -> String {
        let mut s = String::new();
        if list {
            s.push_str("You have access to the following functions:\n");
            for t in self.callable() {
                let f = &t.raw["function"];
                let mut entry = Map::new();
                entry.insert("name".into(), json!(t.name));
                if let Some(d) = f.get("description") {
                    entry.insert("description".into(), d.clone());
                }
                entry.insert("parameters".into(), t.parameters.clone());
                s.push_str(&Value::Object(entry).to_string());
                s.push('\n');
            }
            s.push('\n');
        }
        let call =
            "{\"tool_calls\": [{\"name\": \"<function name>\", \"arguments\": {<arguments>}}]}";
        match &self.choice {
            ToolChoice::Auto => s.push_str(&format!(
                "To call functions, answer with {call}. To answer the user directly, answer with {{\"response\": \"<your answer>\"}}."
            )),
            ToolChoice::Required => s.push_str(&format!(
                "Call a function: answer with {call}."
            )),
            ToolChoice::Named(n) => s.push_str(&format!(
                "Call the function {n}: answer with {{\"tool_calls\": [{{\"name\": \"{n}\", \"arguments\": {{<arguments>}}}}]}}."
            )),
        }
        s
    }
}

/// A tool call in the model's history, written the way the model is asked to write one.
pub fn history_text(calls: &[Value]) -> Result<String, String> {
    let mut out = Vec::with_capacity(calls.len());
    for (i, c) in calls.iter().enumerate() {
        let f = c
            .get("function")
            .ok_or_else(|| format!("tool_calls[{i}].function is required"))?;
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("tool_calls[{i}].function.name must be a string"))?;
        let args = match f.get("arguments") {
            Some(Value::String(s)) => serde_json::from_str::<Value>(s).map_err(|e| {
                format!("tool_calls[{i}].function.arguments is not valid JSON: {e}")
            })?,
            Some(v @ Value::Object(_)) => v.clone(),
            _ => {
                return Err(format!(
                    "tool_calls[{i}].function.arguments must be a JSON string"
                ))
            }
        };
        out.push(json!({"name": name, "arguments": args}));
    }
    Ok(dumps(&json!({ "tool_calls": out })))
}

/// JSON with one space after `,` and `:`, as the grammar writes it (and Python's `json.dumps`).
fn dumps(v: &Value) -> String {
    match v {
        Value::Array(a) => {
            let items: Vec<String> = a.iter().map(dumps).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Object(o) => {
            let items: Vec<String> = o
                .iter()
                .map(|(k, v)| format!("{}: {}", Value::String(k.clone()), dumps(v)))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        other => other.to_string(),
    }
}

/// What the model answered under a tool grammar.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolAnswer {
    /// `(name, arguments as a JSON string)` for each call.
    Calls(Vec<(String, String)>),
    /// A direct answer.
    Text(String),
}

/// Unwrap the grammar's JSON into calls or text. Output cut short (max_tokens) does not parse
/// and is returned as it is.
pub fn parse_answer(out: &str) -> ToolAnswer {
    let Ok(v) = serde_json::from_str::<Value>(out) else {
        return ToolAnswer::Text(out.to_string());
    };
    if let Some(calls) = v.get("tool_calls").and_then(Value::as_array) {
        let parsed: Option<Vec<(String, String)>> = calls
            .iter()
            .map(|c| {
                let name = c.get("name")?.as_str()?.to_string();
                Some((name, c.get("arguments")?.to_string()))
            })
            .collect();
        if let Some(p) = parsed {
            return ToolAnswer::Calls(p);
        }
    }
    match v.get("response") {
        Some(Value::String(s)) => ToolAnswer::Text(s.clone()),
        Some(other) => ToolAnswer::Text(other.to_string()),
        None => ToolAnswer::Text(out.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: Value) -> Body {
        Body(v.as_object().unwrap().clone())
    }

    #[test]
    fn tool_choice_forms_are_read() {
        let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
        let t = Tools::read(&body(json!({"tools": tools})))
            .unwrap()
            .unwrap();
        assert_eq!(t.choice, ToolChoice::Auto);
        let none = Tools::read(&body(json!({"tools": tools, "tool_choice": "none"}))).unwrap();
        assert!(none.is_none());
        let named =
            json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "f"}}});
        assert_eq!(
            Tools::read(&body(named)).unwrap().unwrap().choice,
            ToolChoice::Named("f".into())
        );
        let unknown =
            json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "g"}}});
        assert!(Tools::read(&body(unknown)).is_err());
        let bad_name = json!({"tools": [{"type": "function", "function": {"name": "a b"}}]});
        assert!(Tools::read(&body(bad_name)).is_err());
    }

    #[test]
    fn answers_unwrap_to_calls_or_text() {
        assert_eq!(
            parse_answer(r#"{"tool_calls": [{"name": "f", "arguments": {"x": 1}}]}"#),
            ToolAnswer::Calls(vec![("f".into(), r#"{"x":1}"#.into())])
        );
        assert_eq!(
            parse_answer(r#"{"response": "hi"}"#),
            ToolAnswer::Text("hi".into())
        );
        assert_eq!(
            parse_answer(r#"{"tool_calls": [{"na"#),
            ToolAnswer::Text(r#"{"tool_calls": [{"na"#.into())
        );
        let h = history_text(&[json!({"id": "c1", "type": "function",
            "function": {"name": "f", "arguments": "{\"x\": 1}"}})])
        .unwrap();
        assert_eq!(
            h,
            r#"{"tool_calls": [{"name": "f", "arguments": {"x": 1}}]}"#
        );
    }
}

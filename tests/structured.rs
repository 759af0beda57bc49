//! Structured output and tool calls, end to end: the real server and the real default model.
//! Every answer is checked by a JSON Schema validator written here, independent of the grammar
//! engine that produced it.

mod common;

use common::{post, post_stream};
use serde_json::{json, Value};

/// Check `v` against the subset of JSON Schema the tests' schemas use.
fn validate(schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    let fail = |why: String| Err(format!("{at}: {why} (value {v})"));
    if let Some(any) = schema.get("anyOf").and_then(Value::as_array) {
        if any.iter().any(|s| validate(s, v, at).is_ok()) {
            return Ok(());
        }
        return fail("matches no anyOf branch".into());
    }
    if let Some(c) = schema.get("const") {
        if c != v {
            return fail(format!("is not the const {c}"));
        }
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            return fail(format!("is not one of {e:?}"));
        }
    }
    if let Some(t) = schema.get("type") {
        let types: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => return fail("bad type in schema".into()),
        };
        let ok = types.iter().any(|t| match *t {
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            "null" => v.is_null(),
            "object" => v.is_object(),
            "array" => v.is_array(),
            _ => false,
        });
        if !ok {
            return fail(format!("is not of type {t}"));
        }
    }
    let num = |k: &str| schema.get(k).and_then(Value::as_f64);
    if let Some(x) = v.as_f64() {
        if num("minimum").is_some_and(|m| x < m) || num("maximum").is_some_and(|m| x > m) {
            return fail("is out of range".into());
        }
    }
    if let Some(s) = v.as_str() {
        let n = s.chars().count() as f64;
        if num("maxLength").is_some_and(|m| n > m) || num("minLength").is_some_and(|m| n < m) {
            return fail("has the wrong length".into());
        }
    }
    if let Some(a) = v.as_array() {
        let n = a.len() as f64;
        if num("maxItems").is_some_and(|m| n > m) || num("minItems").is_some_and(|m| n < m) {
            return fail("has the wrong number of items".into());
        }
        if let Some(items) = schema.get("items") {
            for (i, x) in a.iter().enumerate() {
                validate(items, x, &format!("{at}[{i}]"))?;
            }
        }
    }
    if let Some(o) = v.as_object() {
        let props = schema.get("properties").and_then(Value::as_object);
        for r in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if !o.contains_key(r.as_str().unwrap()) {
                return fail(format!("lacks the required property {r}"));
            }
        }
        for (k, x) in o {
            match props.and_then(|p| p.get(k)) {
                Some(s) => validate(s, x, &format!("{at}.{k}"))?,
                None if schema.get("additionalProperties") == Some(&json!(false)) => {
                    return fail(format!("has the extra property {k:?}"))
                }
                None => {}
            }
        }
    }
    Ok(())
}

fn schemas() -> Vec<(&'static str, Value)> {
    vec![
        (
            "person",
            json!({"type": "object", "properties": {
                "name": {"type": "string", "maxLength": 30},
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                "email": {"type": "string", "maxLength": 40},
                "is_student": {"type": "boolean"}},
              "required": ["name", "age", "email", "is_student"], "additionalProperties": false}),
        ),
        (
            "product",
            json!({"type": "object", "properties": {
                "product": {"type": "object", "properties": {
                    "name": {"type": "string", "maxLength": 30},
                    "price": {"type": "number", "minimum": 0, "maximum": 10000},
                    "currency": {"enum": ["USD", "EUR", "GBP"]}},
                  "required": ["name", "price", "currency"], "additionalProperties": false},
                "in_stock": {"type": "boolean"},
                "tags": {"type": "array", "items": {"type": "string", "maxLength": 15}, "maxItems": 4}},
              "required": ["product", "in_stock", "tags"], "additionalProperties": false}),
        ),
        (
            "tasks",
            json!({"type": "object", "properties": {
                "tasks": {"type": "array", "minItems": 1, "maxItems": 4, "items": {
                    "type": "object", "properties": {
                        "task": {"type": "string", "maxLength": 40},
                        "priority": {"type": "integer", "minimum": 1, "maximum": 5},
                        "done": {"type": "boolean"}},
                    "required": ["task", "priority", "done"], "additionalProperties": false}}},
              "required": ["tasks"], "additionalProperties": false}),
        ),
        (
            "quote",
            json!({"type": "object", "properties": {
                "quote": {"type": "string", "maxLength": 60},
                "author": {"type": ["string", "null"], "maxLength": 30},
                "year": {"anyOf": [{"type": "integer", "minimum": -3000, "maximum": 2100}, {"type": "null"}]}},
              "required": ["quote", "author", "year"], "additionalProperties": false}),
        ),
        (
            "verdict",
            json!({"type": "object", "properties": {
                "sentiment": {"enum": ["positive", "negative", "neutral"]},
                "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                "keywords": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 3}},
              "required": ["sentiment", "confidence", "keywords"], "additionalProperties": false}),
        ),
    ]
}

const SUBJECTS: [&str; 10] = [
    "a retired sailor who lives in Lisbon",
    "the best-selling laptop of the year",
    "planning a birthday party for a child",
    "a famous line about \"freedom\" and a backslash \\ in it",
    "the review: 'The food was cold and the waiter was rude.'",
    "a student learning Rust and C++",
    "a new coffee shop opening downtown",
    "a line of poetry with a\nline break",
    "fixing a leaking kitchen tap",
    "the film was wonderful, I cried twice",
];

fn structured_chat(content: &str, name: &str, schema: &Value, temperature: f64) -> Value {
    json!({
        "messages": [{"role": "user", "content": content}],
        "temperature": temperature, "seed": 7, "max_tokens": 300,
        "response_format": {"type": "json_schema",
            "json_schema": {"name": name, "schema": schema, "strict": true}},
    })
}

#[test]
fn fifty_varied_prompts_under_json_schemas_all_parse_and_validate() {
    let mut jobs = Vec::new();
    for (k, (name, schema)) in schemas().into_iter().enumerate() {
        for (j, subject) in SUBJECTS.iter().enumerate() {
            let content = format!("Write JSON describing {subject}.");
            // Half greedy, half sampled: sampling walks the grammar down unlikely paths.
            let t = if (j + k) % 2 == 0 { 0.0 } else { 0.9 };
            jobs.push((
                name,
                schema.clone(),
                structured_chat(&content, name, &schema, t),
            ));
        }
    }
    assert_eq!(jobs.len(), 50);
    // Eight at a time, so constrained sequences share batches.
    let mut results = Vec::new();
    for chunk in jobs.chunks(8) {
        let handles: Vec<_> = chunk
            .iter()
            .cloned()
            .map(|(name, schema, body)| {
                std::thread::spawn(move || (name, schema, post("/v1/chat/completions", &body)))
            })
            .collect();
        results.extend(handles.into_iter().map(|h| h.join().unwrap()));
    }
    for (name, schema, (status, v)) in results {
        assert_eq!(status, 200, "{v}");
        let choice = &v["choices"][0];
        let text = choice["message"]["content"].as_str().unwrap();
        assert_eq!(choice["finish_reason"], "stop", "{name}: {text}");
        let parsed: Value = serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("{name}: output does not parse ({e}): {text}"));
        validate(&schema, &parsed, name).unwrap_or_else(|e| panic!("{e}\n{text}"));
    }
}

#[test]
fn json_object_mode_gives_an_object_and_completions_take_response_format_too() {
    let (s, v) = post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Give the capital of France as a JSON object with one key, \"capital\"."}],
                "temperature": 0, "max_tokens": 200, "response_format": {"type": "json_object"}}),
    );
    assert_eq!(s, 200, "{v}");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{text}");
    let v: Value = serde_json::from_str(text).unwrap();
    assert!(v["capital"].as_str().unwrap().contains("Paris"), "{text}");

    let schema = &schemas()[0].1;
    let (s, v) = post(
        "/v1/completions",
        &json!({"prompt": "A person, as JSON:", "temperature": 0, "max_tokens": 200,
                "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}}),
    );
    assert_eq!(s, 200, "{v}");
    let text = v["choices"][0]["text"].as_str().unwrap();
    validate(schema, &serde_json::from_str(text).unwrap(), "completion").unwrap();
}

#[test]
fn unsupported_or_malformed_formats_are_400s_naming_the_problem() {
    let chat = |rf: Value| {
        post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "hi"}], "response_format": rf,
                    "max_tokens": 8}),
        )
    };
    let (s, v) = chat(json!({"type": "json_schema", "json_schema": {"name": "x",
        "schema": {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}}}));
    assert_eq!(s, 400, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("\"not\""), "{msg}");
    assert_eq!(v["error"]["param"], "response_format");

    let (s, v) = chat(json!({"type": "xml"}));
    assert_eq!(s, 400);
    assert!(v["error"]["message"].as_str().unwrap().contains("xml"));
    let (s, _) = chat(json!({"type": "json_schema", "json_schema": {"name": "x"}}));
    assert_eq!(s, 400);
    let (s, _) = chat(json!({"type": "json_schema", "json_schema": {"schema": true}}));
    assert_eq!(s, 400);

    // A tool whose parameters use an unsupported keyword.
    let (s, v) = post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required",
                "tools": [{"type": "function", "function": {"name": "f",
                    "parameters": {"type": "object", "if": {"type": "object"}}}}]}),
    );
    assert_eq!(s, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("\"if\""));
    assert_eq!(v["error"]["param"], "tools");

    // A tool message must say which call it answers.
    let (s, v) = post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}]}),
    );
    assert_eq!(s, 400);
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("tool_call_id"));
    // The server keeps serving.
    let (s, _) = chat(json!({"type": "text"}));
    assert_eq!(s, 200);
}

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
              "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "get_time",
            "description": "Get the current time in a timezone",
            "parameters": {"type": "object", "properties": {
                "timezone": {"type": "string", "maxLength": 40}},
              "required": ["timezone"], "additionalProperties": false}}}
    ])
}

fn tool_request(question: &str, choice: Value) -> Value {
    json!({
        "messages": [{"role": "user", "content": question}],
        "tools": weather_tools(), "tool_choice": choice,
        "temperature": 0, "max_tokens": 120,
    })
}

/// The single call of a response: (name, parsed arguments), after checking its envelope.
fn the_call(v: &Value) -> (String, Value) {
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    let msg = &choice["message"];
    assert!(msg["content"].is_null(), "{v}");
    let calls = msg["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{v}");
    assert_eq!(calls[0]["type"], "function");
    assert!(!calls[0]["id"].as_str().unwrap().is_empty());
    let f = &calls[0]["function"];
    let args: Value = serde_json::from_str(f["arguments"].as_str().unwrap()).unwrap();
    (f["name"].as_str().unwrap().to_string(), args)
}

fn params_of(name: &str) -> Value {
    weather_tools()
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["function"]["name"] == name)
        .unwrap()["function"]["parameters"]
        .clone()
}

#[test]
fn required_tool_choice_calls_the_right_function_with_valid_arguments() {
    for (question, want) in [
        ("What is the weather like in Paris today?", "get_weather"),
        ("What time is it in Tokyo right now?", "get_time"),
    ] {
        let (s, v) = post(
            "/v1/chat/completions",
            &tool_request(question, json!("required")),
        );
        assert_eq!(s, 200, "{v}");
        let (name, args) = the_call(&v);
        assert_eq!(name, want, "{question}: {v}");
        validate(&params_of(&name), &args, &name).unwrap();
    }
    // A named function is called even when the question is about something else.
    let (s, v) = post(
        "/v1/chat/completions",
        &tool_request(
            "What is the weather like in Paris today?",
            json!({"type": "function", "function": {"name": "get_time"}}),
        ),
    );
    assert_eq!(s, 200, "{v}");
    let (name, args) = the_call(&v);
    assert_eq!(name, "get_time");
    validate(&params_of("get_time"), &args, "get_time").unwrap();
}

#[test]
fn streamed_tool_calls_reassemble_to_the_same_call() {
    let body = tool_request(
        "What is the weather like in Paris today?",
        json!("required"),
    );
    let (_, whole) = post("/v1/chat/completions", &body);
    let want = the_call(&whole);
    let mut b = body.clone();
    b["stream"] = json!(true);
    let chunks = post_stream("/v1/chat/completions", &b);
    assert_eq!(chunks.last().unwrap(), "[DONE]");
    let (mut id, mut name, mut args, mut finish) = (None, String::new(), String::new(), None);
    for c in &chunks[..chunks.len() - 1] {
        let choice = &c["choices"][0];
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
        for d in choice["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            assert_eq!(d["index"], 0);
            if let Some(i) = d["id"].as_str() {
                id = Some(i.to_string());
            }
            name.push_str(d["function"]["name"].as_str().unwrap_or(""));
            args.push_str(d["function"]["arguments"].as_str().unwrap_or(""));
        }
    }
    assert!(id.is_some());
    assert_eq!(finish.as_deref(), Some("tool_calls"));
    assert_eq!((name, serde_json::from_str::<Value>(&args).unwrap()), want);
}

#[test]
fn a_follow_up_turn_with_the_tool_result_is_accepted() {
    let question = "What is the weather like in Paris today?";
    let (_, first) = post(
        "/v1/chat/completions",
        &tool_request(question, json!("required")),
    );
    let call = first["choices"][0]["message"]["tool_calls"][0].clone();
    let messages = json!([
        {"role": "user", "content": question},
        {"role": "assistant", "content": null, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "{\"temperature\": 21, \"sky\": \"sunny\"}"},
    ]);
    // With the tools still offered (auto) and without them: both answer.
    for tools in [true, false] {
        let mut body = json!({"messages": messages, "temperature": 0, "max_tokens": 60});
        if tools {
            body["tools"] = weather_tools();
        }
        let (s, v) = post("/v1/chat/completions", &body);
        assert_eq!(s, 200, "{v}");
        let msg = &v["choices"][0]["message"];
        assert!(
            msg["content"].as_str().is_some_and(|c| !c.is_empty()) || msg["tool_calls"].is_array(),
            "{v}"
        );
        // The earlier call and its result are part of the prompt.
        let first_prompt = first["usage"]["prompt_tokens"].as_u64().unwrap();
        if tools {
            assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > first_prompt);
        }
    }
    // An assistant tool call whose arguments are not JSON is refused.
    let mut bad = messages.clone();
    bad[1]["tool_calls"][0]["function"]["arguments"] = json!("{not json");
    let (s, v) = post(
        "/v1/chat/completions",
        &json!({"messages": bad, "max_tokens": 4}),
    );
    assert_eq!(s, 400, "{v}");
}

#[test]
fn constrained_sequences_batch_with_unconstrained_ones_without_changing_them() {
    let plain = json!({"messages": [{"role": "user", "content": "Tell me about the sea."}],
                       "temperature": 0, "max_tokens": 40});
    let (_, alone) = post("/v1/chat/completions", &plain);
    let (name, schema) = schemas().remove(2);
    let handles: Vec<_> = (0..3)
        .map(|i| {
            let body = if i == 1 {
                plain.clone()
            } else {
                structured_chat("Write JSON for my chores today.", name, &schema, 0.0)
            };
            std::thread::spawn(move || post("/v1/chat/completions", &body))
        })
        .collect();
    let out: Vec<(u16, Value)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(
        out[1].1["choices"][0]["message"]["content"],
        alone["choices"][0]["message"]["content"]
    );
    for i in [0, 2] {
        let text = out[i].1["choices"][0]["message"]["content"]
            .as_str()
            .unwrap();
        validate(&schema, &serde_json::from_str(text).unwrap(), name).unwrap();
    }
    // n > 1: every choice follows the schema.
    let mut body = structured_chat("Write JSON for my chores today.", name, &schema, 0.9);
    body["n"] = json!(3);
    let (s, v) = post("/v1/chat/completions", &body);
    assert_eq!(s, 200, "{v}");
    for c in v["choices"].as_array().unwrap() {
        let text = c["message"]["content"].as_str().unwrap();
        validate(&schema, &serde_json::from_str(text).unwrap(), name).unwrap();
    }
}

//! Spill-over to providers: a second real `aios serve` stands in for the cloud over real HTTP.

mod common;

use common::{serve_with_config, stop};
use serde_json::{json, Value};

fn post(url: &str, agent: &str, body: &Value) -> (u16, String, Value) {
    let r = common::client()
        .post(format!("{url}/v1/completions"))
        .header("X-Agent-Id", agent)
        .json(body)
        .send()
        .unwrap();
    let status = r.status().as_u16();
    let backend = r
        .headers()
        .get("x-aios-backend")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, backend, r.json().unwrap_or(Value::Null))
}

#[test]
fn overflow_goes_to_the_cloud_and_failures_are_clear() {
    // The "cloud": another aios, serving the default model also as "cloudy".
    let (cloud, cloud_url, cloud_dir) = serve_with_config("cloud", "", "aliases = [\"cloudy\"]\n");
    // Local: one sequence at a time, no queue, a 64-token context; spills to the cloud, then to
    // a provider that is down.
    let (local, url, dir) = serve_with_config(
        "spill",
        &format!(
            "[engine]\nmax_running = 1\nmax_queued = 0\n\n\
             [agents.thrifty]\ncloud_budget_usd = 0.000001\n\n\
             [[providers]]\nname = \"cloud\"\nbase_url = \"{cloud_url}/v1\"\n\
             models = {{ smollm2 = \"cloudy\" }}\nprice_input_per_mtok = 1.0\nprice_output_per_mtok = 2.0\n\n\
             [[providers]]\nname = \"down\"\nbase_url = \"http://127.0.0.1:9/v1\"\nmax_retries = 1\n\
             cooldown_after_failures = 2\ncooldown_secs = 600\ntimeout_secs = 5\n"
        ),
        "context_length = 64\nfallbacks = [\"cloud\", \"down\"]\n",
    );
    // Six at once against one local slot: every one answered, the overflow by the cloud.
    let handles: Vec<_> = (0..6)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                post(&url, "busy", &json!({"prompt": format!("{i}, {}, {},", i + 1, i + 2), "max_tokens": 24, "ignore_eos": true}))
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (s, _, v) in &results {
        assert_eq!(*s, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 24, "{v}");
    }
    let backends: Vec<&str> = results.iter().map(|(_, b, _)| b.as_str()).collect();
    assert!(backends.contains(&"local"), "{backends:?}");
    assert!(backends.contains(&"cloud"), "{backends:?}");
    // The cloud saw the mapped model name.
    let cloudy = results.iter().find(|(_, b, _)| b == "cloud").unwrap();
    assert_eq!(cloudy.2["model"], "smollm2", "{}", cloudy.2);
    // A prompt longer than the local context goes to the cloud too.
    let long = "one two three four five six seven eight nine ten ".repeat(8);
    let (s, b, v) = post(&url, "busy", &json!({"prompt": long, "max_tokens": 4}));
    assert_eq!((s, b.as_str()), (200, "cloud"), "{v}");
    // ... unless the request opts out.
    let (s, _, v) = post(
        &url,
        "busy",
        &json!({"prompt": long, "max_tokens": 4, "fallback": false}),
    );
    assert_eq!(s, 400, "{v}");
    // A streamed spill-over passes the cloud's stream through.
    let r = common::client()
        .post(format!("{url}/v1/completions"))
        .json(&json!({"prompt": long, "max_tokens": 6, "stream": true}))
        .send()
        .unwrap();
    assert_eq!(r.headers()["x-aios-backend"], "cloud");
    let text = r.text().unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(
        !text.contains("\"usage\":{"),
        "a usage chunk the client did not ask for: {text}"
    );
    // The ledger: tokens and cost by backend, for the agent.
    let usage: Value = common::client()
        .get(format!("{url}/v1/usage"))
        .header("X-Agent-Id", "busy")
        .send()
        .unwrap()
        .json()
        .unwrap();
    let cloud_use = &usage["usage"]["backends"]["cloud"];
    assert!(cloud_use["requests"].as_u64().unwrap() >= 2, "{usage}");
    assert!(cloud_use["cost_usd"].as_f64().unwrap() > 0.0, "{usage}");
    assert!(
        usage["usage"]["backends"]["local"]["requests"]
            .as_u64()
            .unwrap()
            >= 1,
        "{usage}"
    );
    // A spent budget stops spill-over for that agent.
    let (s, b, _) = post(&url, "thrifty", &json!({"prompt": long, "max_tokens": 4}));
    assert_eq!((s, b.as_str()), (200, "cloud"));
    let (s, _, v) = post(&url, "thrifty", &json!({"prompt": long, "max_tokens": 4}));
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cloud budget"),
        "{v}"
    );
    // The cloud goes away: retries, then a clear 503, and the server keeps serving.
    assert!(stop(cloud).success());
    let (s, _, v) = post(&url, "busy", &json!({"prompt": long, "max_tokens": 4}));
    assert_eq!(s, 503, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("provider 'cloud' unreachable"), "{msg}");
    assert!(msg.contains("provider 'down' unreachable"), "{msg}");
    // Two failures in a row: the provider that is down rests instead of being called.
    let (s, _, _) = post(&url, "busy", &json!({"prompt": long, "max_tokens": 4}));
    assert_eq!(s, 503);
    let (s, _, v) = post(&url, "busy", &json!({"prompt": long, "max_tokens": 4}));
    assert_eq!(s, 503);
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("provider 'down' is resting"), "{msg}");
    let (s, b, _) = post(&url, "busy", &json!({"prompt": "1, 2,", "max_tokens": 2}));
    assert_eq!((s, b.as_str()), (200, "local"));
    let metrics = common::client()
        .get(format!("{url}/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(metrics.contains("aios_fallback_requests_total{model_name=\"smollm2\",outcome=\"served\",provider=\"cloud\"}"), "{metrics}");
    assert!(metrics.contains("aios_cost_usd_total{backend=\"cloud\"}"));
    assert!(metrics.contains("backend=\"cloud\""));
    assert!(stop(local).success());
    std::fs::remove_dir_all(dir).unwrap();
    std::fs::remove_dir_all(cloud_dir).unwrap();
}

/// Anthropic's documented response bodies, replayed by the stand-in server.
const MESSAGE: &str = r#"{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant","model":"claude-3-5-haiku-20241022","content":[{"type":"text","text":"Paris is the capital of France."}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":21,"output_tokens":9}}"#;
const TOOL_USE: &str = r#"{"id":"msg_01Aq9w938a90dw8q","type":"message","role":"assistant","model":"claude-3-5-haiku-20241022","content":[{"type":"text","text":"I'll look that up."},{"type":"tool_use","id":"toolu_01A09q90qw90lq917835lq9","name":"get_weather","input":{"city":"Paris"}}],"stop_reason":"tool_use","stop_sequence":null,"usage":{"input_tokens":310,"output_tokens":52}}"#;
const STREAM: &str = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-3-5-haiku-20241022\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n\
event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n\
event: ping\ndata: {\"type\": \"ping\"}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Par\"}}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"is.\"}}\n\n\
event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n\
event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":15}}\n\n\
event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";

/// What the Messages API requires of a request; the reason when it is not met.
fn check_messages_request(h: &axum::http::HeaderMap, b: &Value) -> Result<(), String> {
    if h.get("x-api-key").and_then(|v| v.to_str().ok()) != Some("sk-ant-test") {
        return Err("x-api-key missing or wrong".into());
    }
    if h.get("anthropic-version").is_none() || h.get("authorization").is_some() {
        return Err("anthropic-version missing, or a bearer token sent".into());
    }
    if b["model"] != "claude-3-5-haiku-20241022" || !b["max_tokens"].is_u64() {
        return Err(format!("model or max_tokens: {b}"));
    }
    let msgs = b["messages"].as_array().ok_or("no messages")?;
    for w in msgs.windows(2) {
        if w[0]["role"] == w[1]["role"] {
            return Err("roles must alternate".into());
        }
    }
    if msgs.iter().any(|m| m["role"] == "system") || msgs[0]["role"] != "user" {
        return Err("system in messages, or the first turn is not the user's".into());
    }
    Ok(())
}

#[test]
fn anthropic_is_translated_both_ways() {
    use std::sync::{Arc, Mutex};
    let seen: Arc<Mutex<Vec<Value>>> = Arc::default();
    let (tx, rx) = std::sync::mpsc::channel();
    let log = seen.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let app = axum::Router::new().route(
                "/v1/messages",
                axum::routing::post(
                    move |h: axum::http::HeaderMap, axum::Json(b): axum::Json<Value>| async move {
                        use axum::response::IntoResponse;
                        log.lock().unwrap().push(b.clone());
                        if let Err(e) = check_messages_request(&h, &b) {
                            let err = json!({"type": "error", "error": {"type": "invalid_request_error", "message": e}});
                            return (axum::http::StatusCode::BAD_REQUEST, axum::Json(err)).into_response();
                        }
                        if b["stream"] == true {
                            ([("content-type", "text/event-stream")], STREAM).into_response()
                        } else if b.get("tools").is_some() {
                            ([("content-type", "application/json")], TOOL_USE).into_response()
                        } else {
                            ([("content-type", "application/json")], MESSAGE).into_response()
                        }
                    },
                ),
            );
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            axum::serve(l, app).await.unwrap();
        });
    });
    let addr = rx.recv().unwrap();
    std::env::set_var("AIOS_TEST_ANTHROPIC_KEY", "sk-ant-test");
    let (local, url, dir) = serve_with_config(
        "anthropic",
        &format!(
            "[[providers]]\nname = \"claude\"\nkind = \"anthropic\"\nbase_url = \"http://{addr}/v1\"\n\
             api_key_env = \"AIOS_TEST_ANTHROPIC_KEY\"\nmodels = {{ smollm2 = \"claude-3-5-haiku-20241022\" }}\n\
             price_input_per_mtok = 0.8\nprice_output_per_mtok = 4.0\n"
        ),
        // A 32-token local context: every chat below spills over.
        "context_length = 32\nfallbacks = [\"claude\"]\n",
    );
    let chat = |body: Value| {
        let r = common::client()
            .post(format!("{url}/v1/chat/completions"))
            .header("X-Agent-Id", "poet")
            .json(&body)
            .send()
            .unwrap();
        let backend = r
            .headers()
            .get("x-aios-backend")
            .map(|v| v.to_str().unwrap().to_string());
        (r.status().as_u16(), backend, r.text().unwrap())
    };
    let question = "What is the capital of France? Please answer in one short sentence, thank you.";
    // Plain: system prompt out of the messages, stop sequences, the answer and usage back.
    let (s, b, text) = chat(json!({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": question}], "max_tokens": 50, "stop": "\n\n", "temperature": 0.2}));
    assert_eq!((s, b.as_deref()), (200, Some("claude")), "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "Paris is the capital of France."
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["prompt_tokens"], 21);
    assert_eq!(v["usage"]["completion_tokens"], 9);
    let sent = seen.lock().unwrap().last().unwrap().clone();
    assert_eq!(sent["system"], "Be brief.");
    assert_eq!(sent["stop_sequences"], json!(["\n\n"]));
    assert_eq!(sent["max_tokens"], 50);
    assert_eq!(sent["temperature"], 0.2);
    assert_eq!(sent["messages"][0]["content"][0]["text"], question);
    // Tools: definitions, a forced call, and a history of a call and its result go over; the
    // tool use comes back as tool_calls.
    let (s, _, text) = chat(json!({
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
              "function": {"name": "get_weather", "arguments": "{\"city\":\"Lyon\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "12 C, rain"},
            {"role": "user", "content": "And in Paris?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                   "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}],
        "tool_choice": "required", "max_tokens": 64}));
    assert_eq!(s, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let call = &v["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather");
    assert_eq!(
        serde_json::from_str::<Value>(call["function"]["arguments"].as_str().unwrap()).unwrap(),
        json!({"city": "Paris"})
    );
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    let sent = seen.lock().unwrap().last().unwrap().clone();
    assert_eq!(
        sent["tools"][0]["input_schema"]["required"],
        json!(["city"])
    );
    assert_eq!(sent["tool_choice"], json!({"type": "any"}));
    assert_eq!(sent["messages"][1]["content"][0]["type"], "tool_use");
    assert_eq!(
        sent["messages"][1]["content"][0]["input"],
        json!({"city": "Lyon"})
    );
    assert_eq!(sent["messages"][2]["content"][0]["type"], "tool_result");
    assert_eq!(sent["messages"][2]["content"][0]["tool_use_id"], "call_1");
    // Streaming: Anthropic's events become chat chunks, usage last when asked, then [DONE].
    let (s, b, text) = chat(json!({"messages": [{"role": "user", "content": question}],
        "stream": true, "stream_options": {"include_usage": true}, "max_tokens": 20}));
    assert_eq!((s, b.as_deref()), (200, Some("claude")), "{text}");
    let chunks: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "Paris.");
    assert!(chunks
        .iter()
        .any(|c| c["choices"][0]["finish_reason"] == "stop"));
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(
        (
            usage["prompt_tokens"].as_u64(),
            usage["completion_tokens"].as_u64()
        ),
        (Some(25), Some(15))
    );
    assert!(text.trim_end().ends_with("data: [DONE]"));
    // The ledger prices what Anthropic reported.
    let u: Value = common::client()
        .get(format!("{url}/v1/usage"))
        .header("X-Agent-Id", "poet")
        .send()
        .unwrap()
        .json()
        .unwrap();
    let c = &u["usage"]["backends"]["claude"];
    assert_eq!(c["requests"], 3, "{u}");
    assert_eq!(c["prompt_tokens"], 21 + 310 + 25, "{u}");
    let want = ((21 + 310 + 25) as f64 * 0.8 + (9 + 52 + 15) as f64 * 4.0) / 1e6;
    assert!(
        (c["cost_usd"].as_f64().unwrap() - want).abs() < 1e-12,
        "{u}"
    );
    // Completions cannot go to the Messages API: a clear 503, not a crash.
    let r = common::client()
        .post(format!("{url}/v1/completions"))
        .json(&json!({"prompt": question.repeat(3), "max_tokens": 4}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.text().unwrap().contains("serves chat requests only"));
    assert!(stop(local).success());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_long_predicted_queue_wait_spills_over() {
    let (cloud, cloud_url, cloud_dir) = serve_with_config("cloud2", "", "");
    // One sequence at a time with room to queue: only the predicted wait sends work away.
    let (local, url, dir) = serve_with_config(
        "queuewait",
        &format!(
            "[engine]\nmax_running = 1\nmax_queued = 16\n\n\
             [[providers]]\nname = \"cloud\"\nbase_url = \"{cloud_url}/v1\"\n"
        ),
        "fallbacks = [\"cloud\"]\nmax_queue_ms = 1\n",
    );
    // Behind a long sequence (streaming here, so it surely runs) the predicted wait is over
    // 1 ms: the cloud takes the next request. First before any sequence has finished (the
    // prediction comes from the step time and the long one's tokens to go), then after.
    let long = || {
        let mut r = common::client()
            .post(format!("{url}/v1/completions"))
            .header("X-Agent-Id", "a")
            .json(&json!({"prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": true, "stream": true}))
            .send()
            .unwrap();
        assert_eq!(r.headers()["x-aios-backend"], "local");
        let mut first = [0u8; 16];
        std::io::Read::read_exact(&mut r, &mut first).unwrap();
        r
    };
    let running = long();
    let (s, b, v) = post(&url, "b", &json!({"prompt": "4, 5, 6,", "max_tokens": 2}));
    assert_eq!((s, b.as_str()), (200, "cloud"), "{v}");
    drop(running);
    // A request that may not spill over runs here (and the engine learns how long a sequence
    // takes).
    let (s, b, _) = post(
        &url,
        "a",
        &json!({"prompt": "1, 2, 3,", "max_tokens": 16, "ignore_eos": true, "fallback": false}),
    );
    assert_eq!((s, b.as_str()), (200, "local"));
    let running = long();
    let (s, b, v) = post(&url, "b", &json!({"prompt": "4, 5, 6,", "max_tokens": 2}));
    assert_eq!((s, b.as_str()), (200, "cloud"), "{v}");
    drop(running);
    assert!(stop(local).success());
    assert!(stop(cloud).success());
    std::fs::remove_dir_all(dir).unwrap();
    std::fs::remove_dir_all(cloud_dir).unwrap();
}

#[test]
fn a_model_that_failed_to_load_spills_over() {
    let (cloud, cloud_url, cloud_dir) = serve_with_config("cloud3", "", "");
    // "broken" is a model file that is not a model (a download cut short, a wrong path
    // typed): it fails to load, and its requests go to its fallback.
    let dir = std::env::temp_dir().join(format!("aios-broken-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let broken = dir.join("broken.gguf");
    std::fs::write(&broken, b"GGUF but not really a model").unwrap();
    let cfg = dir.join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "[memory]\npath = {:?}\n\n[cache]\nenabled = true\n\n\
             [[providers]]\nname = \"cloud\"\nbase_url = \"{cloud_url}/v1\"\n\
             models = {{ broken = \"smollm2\", orphan = \"no-such-model\" }}\n\n\
             [[models]]\nname = \"smollm2\"\npath = {:?}\n\n\
             [[models]]\nname = \"broken\"\npath = {:?}\nfallbacks = [\"cloud\"]\n\n\
             [[models]]\nname = \"orphan\"\npath = {:?}\nfallbacks = [\"cloud\"]\n",
            dir.join("memory.sqlite"),
            common::default_model_path(),
            broken,
            broken,
        ),
    )
    .unwrap();
    let (local, url) = common::serve(&["--config", cfg.to_str().unwrap()]);
    // Not healthy (a model failed): wait until both models have settled.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let h: Value = common::client()
            .get(format!("{url}/health"))
            .send()
            .unwrap()
            .json()
            .unwrap();
        if h["models"]["smollm2"] == "ready"
            && h["models"]["broken"]["error"].is_string()
            && h["models"]["orphan"]["error"].is_string()
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{h}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let req = json!({"model": "broken", "prompt": "1, 2, 3,", "max_tokens": 4, "temperature": 0});
    let (s, b, v) = post(&url, "a", &req);
    assert_eq!((s, b.as_str()), (200, "cloud"), "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 4, "{v}");
    // Chat and streams too; the cloud's stream passes through.
    let r = common::client()
        .post(format!("{url}/v1/chat/completions"))
        .json(
            &json!({"model": "broken", "messages": [{"role": "user", "content": "Hi"}],
                      "max_tokens": 3, "stream": true}),
        )
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-aios-backend"], "cloud");
    assert!(r.text().unwrap().trim_end().ends_with("data: [DONE]"));
    // The answer was cached: the same request again does not reach the cloud.
    let r = common::client()
        .post(format!("{url}/v1/completions"))
        .header("X-Agent-Id", "a")
        .json(&req)
        .send()
        .unwrap();
    assert_eq!(r.headers()["x-aios-backend"], "cache");
    assert_eq!(r.headers()["x-aios-cache-origin"], "cloud");
    // A seeded sampled request is repeatable here, but a provider's answer to it is one sample
    // (providers may ignore the seed): it is not kept.
    let seeded = json!({"model": "broken", "prompt": "1, 2, 3,", "max_tokens": 4,
                        "temperature": 0.8, "seed": 7});
    for _ in 0..2 {
        let r = common::client()
            .post(format!("{url}/v1/completions"))
            .header("X-Agent-Id", "a")
            .json(&seeded)
            .send()
            .unwrap();
        assert_eq!(r.headers()["x-aios-backend"], "cloud");
        assert_eq!(r.headers()["x-aios-cache"], "miss");
    }
    // Without the fallback, the failure itself.
    let mut own = req.clone();
    own["fallback"] = json!(false);
    let (s, _, v) = post(&url, "a", &own);
    assert_eq!(s, 503, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("'broken' failed to load"),
        "{v}"
    );
    // A malformed request is refused here, with its own error, not forwarded to the fallback.
    let bad = json!({"model": "broken", "messages": [], "max_tokens": 3});
    let r = common::client()
        .post(format!("{url}/v1/chat/completions"))
        .json(&bad)
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.headers().get("x-aios-backend").is_none());
    assert!(r.text().unwrap().contains("messages must not be empty"));
    let (s, _, v) = post(
        &url,
        "a",
        &json!({"model": "broken", "prompt": 7, "max_tokens": 3}),
    );
    assert_eq!(s, 400, "{v}");
    // A fallback that refuses the request itself (here: it has no such model) is a 502 the
    // client should not retry, not a 503 with Retry-After.
    let r = common::client()
        .post(format!("{url}/v1/completions"))
        .json(&json!({"model": "orphan", "prompt": "1, 2,", "max_tokens": 2}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 502);
    assert!(r.headers().get("retry-after").is_none());
    let v: Value = r.json().unwrap();
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("provider 'cloud' answered 404"), "{msg}");
    // The healthy model still answers here.
    let (s, b, _) = post(&url, "a", &json!({"prompt": "1, 2,", "max_tokens": 2}));
    assert_eq!((s, b.as_str()), (200, "local"));
    assert!(stop(local).success());
    assert!(stop(cloud).success());
    std::fs::remove_dir_all(dir).unwrap();
    std::fs::remove_dir_all(cloud_dir).unwrap();
}

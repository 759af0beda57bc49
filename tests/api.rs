//! The real server with the real default model, called over HTTP.

mod common;

use common::{post, post_raw, post_stream, server, TEST_MAX_BODY};
use serde_json::{json, Value};

fn chat_body(content: &str, extra: Value) -> Value {
    let mut b = json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": 24,
    });
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

fn assert_serving() {
    let (s, v) = post(
        "/v1/completions",
        &json!({"prompt": "1, 2, 3,", "max_tokens": 3, "temperature": 0}),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 3);
}

#[test]
fn capital_of_france_answers_paris() {
    let (s, v) = post(
        "/v1/chat/completions",
        &chat_body(
            "What is the capital of France? Answer in one sentence.",
            json!({}),
        ),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert!(v["created"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(v["model"], "smollm2");
    let msg = &v["choices"][0]["message"];
    assert_eq!(msg["role"], "assistant");
    let text = msg["content"].as_str().unwrap();
    assert!(text.contains("Paris"), "answer was {text:?}");
    // The reference conversation renders to 37 tokens with llama.cpp.
    let (_, r) = post(
        "/v1/chat/completions",
        &chat_body("What is the capital of France?", json!({"max_tokens": 1})),
    );
    assert_eq!(r["usage"]["prompt_tokens"], 37);
    let u = &v["usage"];
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap())
    );
    assert!(["stop", "length"].contains(&v["choices"][0]["finish_reason"].as_str().unwrap()));
}

/// Greedy decoding by the library itself, for the server's output to be compared with.
fn library_greedy(prompt: &str, n: usize) -> String {
    use aios::kv::KvSeq;
    use aios::model::{load_model, LoadOptions};
    let m = load_model(&common::default_model_path(), &LoadOptions::default()).unwrap();
    let mut feed = m.tokenizer.encode(prompt, false).unwrap();
    let mut kv = KvSeq::new(m.llama.kv_layout(), feed.len() + n);
    let mut out = Vec::new();
    for _ in 0..n {
        let logits = common::next_logits(&m, &feed, &mut kv);
        let t = aios::engine::sampler::argmax(&logits);
        out.push(t);
        feed = vec![t];
    }
    m.tokenizer.decode(&out)
}

/// The server's greedy completions are exactly the model's own greedy decode, and start as
/// llama.cpp's do. (Step-by-step agreement with llama.cpp, near ties aside, is checked in
/// tests/model.rs.)
#[test]
fn greedy_completions_are_the_models_and_start_as_llama_cpps() {
    let reference = common::reference();
    for case in reference["greedy"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let n = case["n_predict"].as_u64().unwrap() as usize;
        let (s, v) = post(
            "/v1/completions",
            &json!({"prompt": prompt, "max_tokens": n, "temperature": 0}),
        );
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        let text = v["choices"][0]["text"].as_str().unwrap();
        assert_eq!(text, library_greedy(prompt, n), "prompt {prompt:?}");
        let want = case["text"].as_str().unwrap();
        let head: String = want.chars().take(12).collect();
        assert!(text.starts_with(&head), "{text:?} vs llama.cpp's {want:?}");
    }
}

fn joined_chat_stream(chunks: &[Value]) -> (String, Option<String>) {
    let mut text = String::new();
    let mut finish = None;
    for c in chunks {
        if c == "[DONE]" {
            continue;
        }
        for ch in c["choices"].as_array().unwrap() {
            if let Some(t) = ch["delta"]["content"].as_str() {
                text.push_str(t);
            }
            if let Some(f) = ch["finish_reason"].as_str() {
                finish = Some(f.to_string());
            }
        }
    }
    (text, finish)
}

#[test]
fn streaming_equals_non_streaming_under_greedy() {
    let body = chat_body("Write a haiku about the sea.", json!({"max_tokens": 40}));
    let (s, whole) = post("/v1/chat/completions", &body);
    assert_eq!(s, 200);
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    sb["stream_options"] = json!({"include_usage": true});
    let chunks = post_stream("/v1/chat/completions", &sb);
    assert_eq!(chunks.last().unwrap(), "[DONE]");
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let ids: std::collections::HashSet<_> = chunks[..chunks.len() - 1]
        .iter()
        .map(|c| c["id"].clone())
        .collect();
    assert_eq!(ids.len(), 1, "one id for every chunk");
    let (text, finish) = joined_chat_stream(&chunks);
    assert_eq!(
        text,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
    assert_eq!(
        finish.as_deref(),
        whole["choices"][0]["finish_reason"].as_str()
    );
    // Last chunk before [DONE] carries the usage and no choices.
    let usage_chunk = &chunks[chunks.len() - 2];
    assert_eq!(usage_chunk["choices"].as_array().unwrap().len(), 0);
    for k in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(usage_chunk["usage"][k], whole["usage"][k]);
    }
    // The second run of the same prompt reuses the first one's full blocks.
    assert_eq!(
        usage_chunk["usage"]["prompt_tokens_details"]["cached_tokens"],
        32
    );

    // Completions too.
    let cb = json!({"prompt": "Once upon a time", "max_tokens": 20, "temperature": 0});
    let (_, whole) = post("/v1/completions", &cb);
    let mut sb = cb.clone();
    sb["stream"] = json!(true);
    let chunks = post_stream("/v1/completions", &sb);
    let text: String = chunks
        .iter()
        .filter(|c| *c != "[DONE]")
        .flat_map(|c| {
            c["choices"]
                .as_array()
                .unwrap()
                .iter()
                .map(|ch| ch["text"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(text, whole["choices"][0]["text"].as_str().unwrap());
}

#[test]
fn stop_strings_end_output_and_are_not_emitted() {
    // Greedy continuation is " 5, 6, 7, 8, 9, " (reference); ", 7" spans tokens.
    let body = json!({"prompt": "1, 2, 3, 4,", "max_tokens": 16, "temperature": 0, "stop": [", 7", "zzz"]});
    let (s, v) = post("/v1/completions", &body);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], " 5, 6");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let chunks = post_stream("/v1/completions", &sb);
    let text: String = chunks
        .iter()
        .filter(|c| *c != "[DONE]")
        .map(|c| c["choices"][0]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(text, " 5, 6");
}

#[test]
fn max_tokens_gives_length() {
    let (s, v) = post(
        "/v1/chat/completions",
        &chat_body(
            "Tell me a long story about dragons.",
            json!({"max_tokens": 7}),
        ),
    );
    assert_eq!(s, 200);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 7);
}

#[test]
fn seeded_sampling_is_reproducible_and_n_gives_choices() {
    let body = |seed: u64| {
        chat_body(
            "Invent a name for a cat.",
            json!({"temperature": 1.0, "seed": seed, "max_tokens": 16, "n": 2}),
        )
    };
    let (s, a) = post("/v1/chat/completions", &body(42));
    assert_eq!(s, 200, "{a}");
    let (_, b) = post("/v1/chat/completions", &body(42));
    let texts = |v: &Value| -> Vec<String> {
        v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["message"]["content"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(texts(&a).len(), 2);
    assert_eq!(a["choices"][1]["index"], 1);
    assert_eq!(texts(&a), texts(&b), "same seed, same output");
    let mut seen: std::collections::HashSet<Vec<String>> = Default::default();
    for seed in [1, 2, 3] {
        seen.insert(texts(&post("/v1/chat/completions", &body(seed)).1));
    }
    assert!(seen.len() > 1, "different seeds gave identical samples");
    let completion: u64 = a["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(completion >= 2);
}

#[test]
fn logprobs_are_reported() {
    let (s, v) = post(
        "/v1/chat/completions",
        &chat_body(
            "Say hello.",
            json!({"logprobs": true, "top_logprobs": 3, "max_tokens": 5}),
        ),
    );
    assert_eq!(s, 200, "{v}");
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        content.len() as u64,
        v["usage"]["completion_tokens"].as_u64().unwrap()
    );
    for e in content {
        let lp = e["logprob"].as_f64().unwrap();
        assert!(lp <= 0.0);
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(top[0]["token"], e["token"]);
        assert!((top[0]["logprob"].as_f64().unwrap() - lp).abs() < 1e-5);
        assert!(top[0]["logprob"].as_f64() >= top[1]["logprob"].as_f64());
        assert!(e["bytes"].is_array());
    }
    let (s, v) = post(
        "/v1/completions",
        &json!({"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0, "logprobs": 2}),
    );
    assert_eq!(s, 200, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 3);
    assert_eq!(lp["tokens"][0], " Paris");
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
    assert_eq!(lp["text_offset"][0], 0);
}

#[test]
fn bad_requests_get_clear_errors_and_the_server_keeps_serving() {
    let long_prompt = "hello ".repeat(9000);
    let cases: Vec<(Value, u16, &str)> = vec![
        (
            chat_body("hi", json!({"model": "no-such-model"})),
            404,
            "model_not_found",
        ),
        (json!({"model": "smollm2", "messages": []}), 400, "messages"),
        (
            json!({"messages": [{"role": "wizard", "content": "hi"}]}),
            400,
            "role",
        ),
        (json!({"messages": [{"content": "hi"}]}), 400, "role"),
        (json!({"messages": "hi"}), 400, "messages"),
        (chat_body("hi", json!({"max_tokens": 0})), 400, "max_tokens"),
        (
            chat_body("hi", json!({"max_tokens": -5})),
            400,
            "max_tokens",
        ),
        (
            chat_body("hi", json!({"temperature": 3.5})),
            400,
            "temperature",
        ),
        (chat_body("hi", json!({"top_p": 1.5})), 400, "top_p"),
        (chat_body("hi", json!({"n": 0})), 400, "n"),
        (
            chat_body("hi", json!({"max_tokens": 8190})),
            400,
            "context_length_exceeded",
        ),
        (
            chat_body(&long_prompt, json!({})),
            400,
            "context_length_exceeded",
        ),
        (
            json!({"prompt": "x", "max_tokens": "ten"}),
            400,
            "max_tokens",
        ),
        (json!({"prompt": [1, 2, 99999999]}), 400, "prompt"),
    ];
    for (body, status, needle) in cases {
        let path = if body.get("prompt").is_some() {
            "/v1/completions"
        } else {
            "/v1/chat/completions"
        };
        let (s, v) = post(path, &body);
        assert_eq!(s, status, "{body} -> {v}");
        let err = &v["error"];
        let text = format!("{} {} {}", err["message"], err["param"], err["code"]);
        assert!(text.contains(needle), "{needle:?} not in {text}");
        assert!(err["type"].is_string());
        assert_serving();
    }
    // Malformed JSON, invalid UTF-8, not an object.
    for raw in [
        b"{\"messages\": [".to_vec(),
        b"{\"prompt\": \"\xff\xfe\"}".to_vec(),
        b"[1,2]".to_vec(),
    ] {
        let (s, v) = post_raw("/v1/chat/completions", raw);
        assert_eq!(s, 400, "{v}");
        assert!(v["error"]["message"].is_string());
        assert_serving();
    }
    let (s, v) = post_raw("/v1/completions", vec![b' '; TEST_MAX_BODY + 10]);
    assert_eq!(s, 413, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("larger"));
    assert_serving();
}

#[test]
fn a_client_that_disconnects_mid_stream_does_not_stop_the_server() {
    use std::io::{Read, Write};
    let addr = server().trim_start_matches("http://").to_string();
    for _ in 0..3 {
        let body = json!({"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": true, "stream": true}).to_string();
        let mut sock = std::net::TcpStream::connect(&addr).unwrap();
        write!(sock, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Agent-Id: dropper\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        // Read until a few tokens have come, then go away.
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        while String::from_utf8_lossy(&got).matches("\"text\"").count() < 3 {
            let n = sock.read(&mut buf).unwrap();
            assert!(n > 0, "{}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
        drop(sock);
    }
    assert_serving();
    // What the cut streams used still counts for the agent (token limits, the ledger): their
    // prompts and at least the tokens they were sent.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let u: Value = common::client()
            .get(format!("{}/v1/usage", server()))
            .header("X-Agent-Id", "dropper")
            .send()
            .unwrap()
            .json()
            .unwrap();
        let local = &u["usage"]["backends"]["local"];
        let n = |k: &str| local[k].as_u64().unwrap_or(0);
        if n("prompt_tokens") >= 3 * 4 && n("completion_tokens") >= 3 * 3 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{u}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn health_and_models() {
    let c = common::client();
    let r = c.get(format!("{}/health", server())).send().unwrap();
    assert_eq!(r.status(), 200);
    let r: Value = c
        .get(format!("{}/v1/models", server()))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(r["object"], "list");
    assert_eq!(r["data"][0]["id"], "smollm2");
    assert_eq!(r["data"][0]["object"], "model");
    assert_eq!(r["data"][0]["max_model_len"], 8192);
    let r = c
        .get(format!("{}/v1/models/nope", server()))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = c.get(format!("{}/v1/nothing", server())).send().unwrap();
    assert_eq!(r.status(), 404);
}

#[test]
fn a_model_still_loading_gives_503_and_health_says_so() {
    use aios::api::{AppState, ModelSlot, Server, SlotState};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let slots = vec![ModelSlot {
        name: "slow".into(),
        aliases: vec![],
        created: 0,
        state: std::sync::RwLock::new(SlotState::Loading),
    }];
    let cfg = aios::config::Config::default();
    let state = std::sync::Arc::new(
        AppState::new(&cfg, slots, aios::api::EmbedSlot::Off, None, None).unwrap(),
    );
    let server = rt
        .block_on(Server::start(state, "127.0.0.1", 0, 1 << 16))
        .unwrap();
    let url = format!("http://{}", server.addr);
    let c = common::client();
    let r = c.get(format!("{url}/health")).send().unwrap();
    let (hs, health) = (r.status().as_u16(), r.json::<Value>().unwrap());
    let r = c
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({"messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .unwrap();
    let (cs, chat) = (r.status().as_u16(), r.json::<Value>().unwrap());
    assert_eq!(hs, 503);
    assert_eq!(health["status"], "loading");
    assert_eq!(health["models"]["slow"], "loading");
    assert_eq!(cs, 503);
    assert!(
        chat["error"]["message"]
            .as_str()
            .unwrap()
            .contains("loading"),
        "{chat}"
    );
    rt.block_on(server.stop(std::time::Duration::from_secs(5)));
}

#[test]
fn agent_and_priority_headers_are_read_and_checked() {
    let c = common::client();
    let body = json!({"prompt": "1, 2, 3,", "max_tokens": 2, "temperature": 0});
    let r = c
        .post(format!("{}/v1/completions", server()))
        .header("X-Priority", "urgent")
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().unwrap();
    assert_eq!(v["error"]["param"], "X-Priority");
    let r = c
        .post(format!("{}/v1/completions", server()))
        .header("X-Priority", "7")
        .header("X-Agent-Id", "coder-1")
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .post(format!("{}/v1/completions", server()))
        .header("X-Agent-Id", "x".repeat(200))
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[test]
fn a_repeated_prefix_is_served_from_the_prefix_cache_with_the_same_answer() {
    // A prompt no other test sends, long enough for several full 16-token blocks.
    let prompt = "Prefix cache check: ".to_string()
        + &"the engine keeps full blocks of tokens for the next request. ".repeat(8);
    let body = json!({"prompt": prompt, "max_tokens": 12, "temperature": 0});
    let (s, first) = post("/v1/completions", &body);
    assert_eq!(s, 200, "{first}");
    let prompt_tokens = first["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 64);
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let (s, second) = post("/v1/completions", &body);
    assert_eq!(s, 200, "{second}");
    // Every full block before the last prompt token is reused.
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert_eq!(cached, (prompt_tokens - 1) / 16 * 16, "{second}");
    assert_eq!(second["choices"][0]["text"], first["choices"][0]["text"]);
    // The same prefix with another ending reuses the blocks they share.
    let longer = json!({"prompt": format!("{prompt} And then?"), "max_tokens": 4});
    let (_, third) = post("/v1/completions", &longer);
    assert!(
        third["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            >= cached - 16
    );
}

fn as_agent(
    method: reqwest::Method,
    path: &str,
    agent: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut r = common::client()
        .request(method, format!("{}{path}", server()))
        .header("X-Agent-Id", agent);
    if let Some(b) = body {
        r = r.json(b);
    }
    let resp = r.send().unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().unwrap())
}

#[test]
fn a_conversation_on_a_context_prefills_only_each_new_turn() {
    use reqwest::Method;
    let agent = "context-agent";
    let (s, ctx) = as_agent(Method::POST, "/v1/contexts", agent, Some(&json!({})));
    assert_eq!(s, 200, "{ctx}");
    let id = ctx["id"].as_str().unwrap().to_string();
    assert_eq!(ctx["owner"], agent);
    assert_eq!(ctx["tokens"], 0);
    let turns = [
        "My name is Ada and I like sailing. Say hello.",
        "What is my name?",
        "What do I like?",
    ];
    let mut messages: Vec<Value> = vec![];
    let mut held = 0u64; // tokens the context holds before each turn
    for turn in turns {
        messages.push(json!({"role": "user", "content": turn}));
        let body = json!({"messages": messages, "max_tokens": 16, "temperature": 0});
        let mut on_ctx = body.clone();
        on_ctx["context_id"] = json!(id);
        let (s, v) = as_agent(Method::POST, "/v1/chat/completions", agent, Some(&on_ctx));
        assert_eq!(s, 200, "{v}");
        // The same conversation sent whole, by an agent without a context: same answer.
        let (_, plain) = as_agent(
            Method::POST,
            "/v1/chat/completions",
            "no-context-agent",
            Some(&body),
        );
        let answer = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(answer, plain["choices"][0]["message"]["content"]);
        // Only the new part was prefilled: everything the context held is reused.
        let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
        eprintln!(
            "turn {turn:?}: {cached} cached of {}, {held} held",
            v["usage"]["prompt_tokens"]
        );
        assert!(
            cached + 1 >= held,
            "turn {turn:?}: {cached} cached, {held} held"
        );
        let (_, info) = as_agent(Method::GET, &format!("/v1/contexts/{id}"), agent, None);
        let now = info["tokens"].as_u64().unwrap();
        let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
        assert!(now >= prompt, "the context holds the turn: {info}");
        held = now;
        messages.push(json!({"role": "assistant", "content": answer}));
    }
    assert!(held > 60);
    // Another agent cannot see or use it.
    let path = format!("/v1/contexts/{id}");
    assert_eq!(as_agent(Method::GET, &path, "intruder", None).0, 404);
    let body = json!({"messages": messages, "max_tokens": 2, "context_id": id});
    let (s, v) = as_agent(
        Method::POST,
        "/v1/chat/completions",
        "intruder",
        Some(&body),
    );
    assert_eq!(s, 404, "{v}");
    assert_eq!(v["error"]["code"], "context_not_found");
    // A fork shares the conversation and diverges without touching the parent.
    let (s, fork) = as_agent(
        Method::POST,
        &format!("{path}/fork"),
        agent,
        Some(&json!({})),
    );
    assert_eq!(s, 200, "{fork}");
    assert_eq!(fork["tokens"], held);
    let fork_id = fork["id"].as_str().unwrap().to_string();
    let mut branch = messages.clone();
    branch.push(json!({"role": "user", "content": "Count to five."}));
    let body = json!({"messages": branch, "max_tokens": 8, "context_id": fork_id});
    let (s, v) = as_agent(Method::POST, "/v1/chat/completions", agent, Some(&body));
    assert_eq!(s, 200, "{v}");
    assert!(
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            + 1
            >= held
    );
    let (_, parent) = as_agent(Method::GET, &path, agent, None);
    assert_eq!(parent["tokens"], held, "the parent changed");
    let (_, list) = as_agent(Method::GET, "/v1/contexts", agent, None);
    assert_eq!(list["data"].as_array().unwrap().len(), 2);
    assert_eq!(
        as_agent(Method::GET, "/v1/contexts", "intruder", None).1["data"],
        json!([])
    );
    // Deleted: gone.
    assert_eq!(as_agent(Method::DELETE, &path, agent, None).0, 200);
    assert_eq!(as_agent(Method::GET, &path, agent, None).0, 404);
    assert_eq!(
        as_agent(
            Method::DELETE,
            &format!("/v1/contexts/{fork_id}"),
            agent,
            None
        )
        .0,
        200
    );
}

#[test]
fn a_conversation_continues_the_same_after_its_context_went_to_host_memory_and_to_disk() {
    use reqwest::Method;
    let agent = "tier-agent";
    let (_, ctx) = as_agent(Method::POST, "/v1/contexts", agent, Some(&json!({})));
    let id = ctx["id"].as_str().unwrap().to_string();
    let path = format!("/v1/contexts/{id}");
    let mut messages: Vec<Value> = vec![];
    let mut held = 0u64;
    for (turn, tier) in [
        ("My name is Ada and I like sailing. Say hello.", "host"),
        ("What is my name?", "disk"),
        ("What do I like?", "host"),
    ] {
        messages.push(json!({"role": "user", "content": turn}));
        let body = json!({"messages": messages, "max_tokens": 16, "temperature": 0});
        let mut on_ctx = body.clone();
        on_ctx["context_id"] = json!(id);
        let (s, v) = as_agent(Method::POST, "/v1/chat/completions", agent, Some(&on_ctx));
        assert_eq!(s, 200, "{v}");
        let (_, plain) = as_agent(Method::POST, "/v1/chat/completions", "no-ctx", Some(&body));
        let answer = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(answer, plain["choices"][0]["message"]["content"]);
        let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
        assert!(cached + 1 >= held, "{turn:?}: {cached} cached, {held} held");
        messages.push(json!({"role": "assistant", "content": answer}));
        // Push the context out of the pool before the next turn.
        let (s, info) = as_agent(
            Method::POST,
            &format!("{path}/snapshot"),
            agent,
            Some(&json!({"tier": tier})),
        );
        assert_eq!(s, 200, "{info}");
        assert_eq!(info["tier"], tier);
        held = info["tokens"].as_u64().unwrap();
        assert!(info["bytes"].as_u64().unwrap() > 0);
    }
    // Another agent can neither snapshot it nor learn it exists.
    let (s, _) = as_agent(
        Method::POST,
        &format!("{path}/snapshot"),
        "intruder",
        Some(&json!({})),
    );
    assert_eq!(s, 404);
    let (s, v) = as_agent(
        Method::POST,
        &format!("{path}/snapshot"),
        agent,
        Some(&json!({"tier": "tape"})),
    );
    assert_eq!(s, 400, "{v}");
    assert_eq!(as_agent(Method::DELETE, &path, agent, None).0, 200);
}

/// Embeddings from the server, as floats.
fn embed(input: Value) -> (u16, Value) {
    post(
        "/v1/embeddings",
        &json!({"input": input, "model": "all-minilm-l6-v2"}),
    )
}

fn vectors(v: &Value) -> Vec<Vec<f32>> {
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            d["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn embeddings_match_sentence_transformers_all_minilm_l6_v2() {
    // The similarities sentence-transformers documents for this model and these sentences.
    let (s, v) = embed(json!([
        "The weather is lovely today.",
        "It's so sunny outside!",
        "He drove to the stadium."
    ]));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "all-minilm-l6-v2");
    let e = vectors(&v);
    assert_eq!(e.len(), 3);
    for x in &e {
        assert_eq!(x.len(), 384);
        assert!((cosine(x, x) - 1.0).abs() < 1e-4);
    }
    for (got, want) in [
        (cosine(&e[0], &e[1]), 0.6660),
        (cosine(&e[0], &e[2]), 0.1046),
        (cosine(&e[1], &e[2]), 0.1411),
    ] {
        assert!(
            (got - want).abs() < 0.002,
            "similarity {got}, sentence-transformers {want}"
        );
    }
    assert_eq!(v["usage"]["prompt_tokens"], v["usage"]["total_tokens"]);
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 15);
    // One input alone (no padding) gives what it gives in the padded batch.
    let (_, one) = embed(json!("He drove to the stadium."));
    let single = &vectors(&one)[0];
    assert!(single.iter().zip(&e[2]).all(|(a, b)| (a - b).abs() < 1e-4));
    // base64: the same floats, little-endian.
    let (s, b64) = post(
        "/v1/embeddings",
        &json!({"input": "He drove to the stadium.", "encoding_format": "base64"}),
    );
    assert_eq!(s, 200, "{b64}");
    let text = b64["data"][0]["embedding"].as_str().unwrap();
    assert_eq!(text.len(), (384 * 4_usize).div_ceil(3) * 4, "{text}");
    let decoded = decode_base64(text);
    let floats: Vec<f32> = decoded
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(floats, *single);
}

fn decode_base64(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    } as u32;
    let mut out = Vec::new();
    for chunk in s.as_bytes().chunks(4) {
        let pad = chunk.iter().filter(|&&c| c == b'=').count();
        let n = chunk
            .iter()
            .map(|&c| if c == b'=' { 0 } else { val(c) })
            .fold(0u32, |acc, x| acc << 6 | x);
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    out
}

#[test]
fn bad_embedding_requests_are_clear_errors() {
    for (body, status, needle) in [
        (json!({"input": []}), 400, "empty"),
        (json!({"input": [1, 2, 3]}), 400, "token ids"),
        (json!({"input": 5}), 400, "string"),
        (json!({}), 400, "required"),
        (json!({"input": "x", "model": "nope"}), 404, "nope"),
        (json!({"input": "x", "dimensions": 128}), 400, "384"),
        (json!({"input": "x", "encoding_format": "hex"}), 400, "hex"),
        (json!({"input": "word ".repeat(300)}), 400, "at most 256"),
    ] {
        let (s, v) = post("/v1/embeddings", &body);
        assert_eq!(s, status, "{body}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{body}: {msg}");
    }
    let (s, _) = embed(json!("still serving"));
    assert_eq!(s, 200);
}

#[test]
fn memories_are_searched_by_meaning_and_private_to_their_agent() {
    use reqwest::Method;
    let me = "memory-agent";
    let add = |content: &str, meta: Value| {
        let (s, v) = as_agent(
            Method::POST,
            "/v1/memories",
            me,
            Some(&json!({"content": content, "metadata": meta})),
        );
        assert_eq!(s, 200, "{v}");
        v["id"].as_str().unwrap().to_string()
    };
    let weather = add(
        "The forecast says heavy rain and storms tomorrow.",
        json!({"kind": "weather"}),
    );
    let boat = add("I keep a small sailing boat in the harbour.", json!({}));
    let tea = add("My favourite drink is green tea.", json!({}));
    let search = |agent: &str, q: &str| {
        let (s, v) = as_agent(
            Method::POST,
            "/v1/memories/search",
            agent,
            Some(&json!({"query": q, "k": 3})),
        );
        assert_eq!(s, 200, "{v}");
        v["data"].as_array().unwrap().clone()
    };
    let hits = search(me, "Will it rain?");
    assert_eq!(hits.len(), 3);
    assert_eq!(hits[0]["id"], weather.as_str(), "{hits:?}");
    assert_eq!(hits[0]["metadata"]["kind"], "weather");
    let scores: Vec<f64> = hits.iter().map(|h| h["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    assert_eq!(
        search(me, "What do I like to drink?")[0]["id"],
        tea.as_str()
    );

    // Another agent sees none of it and can change none of it.
    let other = "memory-intruder";
    assert!(search(other, "Will it rain?").is_empty());
    let path = format!("/v1/memories/{weather}");
    assert_eq!(as_agent(Method::GET, &path, other, None).0, 404);
    assert_eq!(as_agent(Method::DELETE, &path, other, None).0, 404);
    let patch = |agent: &str, body: Value| {
        common::client()
            .patch(format!("{}/v1/memories/{boat}", server()))
            .header("X-Agent-Id", agent)
            .json(&body)
            .send()
            .unwrap()
    };
    assert_eq!(patch(other, json!({"content": "hacked"})).status(), 404);
    assert_eq!(
        as_agent(Method::GET, "/v1/memories", other, None).1["data"],
        json!([])
    );

    // New content is embedded again: the memory is now found by its new meaning.
    let r = patch(
        me,
        json!({"content": "I play the violin every evening.", "metadata": {"v": 2}}),
    );
    assert_eq!(r.status(), 200);
    assert_eq!(
        search(me, "Which musical instrument?")[0]["id"],
        boat.as_str()
    );
    let (_, got) = as_agent(Method::GET, &format!("/v1/memories/{boat}"), me, None);
    assert_eq!(got["content"], "I play the violin every evening.");
    assert_eq!(got["metadata"], json!({"v": 2}));

    assert_eq!(
        as_agent(Method::GET, "/v1/memories", me, None).1["data"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    assert_eq!(as_agent(Method::DELETE, &path, me, None).0, 200);
    assert_eq!(as_agent(Method::GET, &path, me, None).0, 404);
    assert_eq!(
        as_agent(Method::GET, "/v1/memories", me, None).1["data"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    for (body, needle) in [
        (json!({"content": "  "}), "empty"),
        (json!({}), "required"),
        (json!({"content": "x", "metadata": [1]}), "object"),
    ] {
        let (s, v) = as_agent(Method::POST, "/v1/memories", me, Some(&body));
        assert_eq!(s, 400, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(needle));
    }
    let (s, _) = as_agent(
        Method::POST,
        "/v1/memories/search",
        me,
        Some(&json!({"k": 2})),
    );
    assert_eq!(s, 400);
}

fn aios_query(agent: &str, query_type: &str, data: Value) -> Value {
    let (s, v) = post(
        "/query",
        &json!({"query_type": query_type, "agent_name": agent, "query_data": data}),
    );
    assert_eq!(s, 200, "{v}");
    v
}

#[test]
fn cerebrum_agents_run_through_query() {
    let (s, list) = {
        let r = common::client()
            .get(format!("{}/core/llms/list", server()))
            .send()
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().unwrap())
    };
    assert_eq!(s, 200);
    assert_eq!(list["status"], "success");
    assert_eq!(list["llms"][0]["name"], "smollm2");

    // The current SDK's shape: a preference list whose first entry we do not serve.
    let question = json!([{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]);
    let v = aios_query(
        "demo/writer",
        "llm",
        json!({
            "query_class": "llm", "llms": [{"name": "gpt-9", "backend": "openai"}, {"name": "smollm2", "backend": "aios"}],
            "messages": question, "tools": null, "action_type": "chat", "temperature": 0,
            "max_new_tokens": 24, "message_return_type": "text", "response_format": null,
        }),
    );
    let r = &v["response"];
    assert_eq!(r["response_class"], "llm");
    assert_eq!(r["status_code"], 200);
    assert_eq!(r["finished"], true);
    assert!(r["error"].is_null());
    assert!(
        r["response_message"].as_str().unwrap().contains("Paris"),
        "{v}"
    );
    let (t0, t1) = (
        v["start_times"][0].as_f64().unwrap(),
        v["end_times"][0].as_f64().unwrap(),
    );
    assert!(t1 >= t0 && t0 > 1.7e9);
    assert!(v["turnaround_times"][0].as_f64().unwrap() >= 0.0);

    // The older shape: messages only.
    let v = aios_query(
        "demo/writer",
        "llm",
        json!({"messages": question, "action_type": "chat"}),
    );
    assert_eq!(v["response"]["status_code"], 200, "{v}");

    // JSON mode parses.
    let v = aios_query(
        "demo/writer",
        "llm",
        json!({
            "messages": [{"role": "user", "content": "Give the capital of France as a JSON object with one key, \"capital\"."}],
            "action_type": "chat_with_json_output", "temperature": 0, "max_new_tokens": 60,
        }),
    );
    let text = v["response"]["response_message"].as_str().unwrap();
    assert!(
        serde_json::from_str::<Value>(text).unwrap().is_object(),
        "{text}"
    );

    // A tool whose name has a '/': the reply names it as the agent did.
    let v = aios_query(
        "demo/writer",
        "llm",
        json!({
            "messages": [{"role": "user", "content": "What is the weather like in Paris today?"}],
            "tools": [{"type": "function", "function": {"name": "demo_author/get_weather",
                "description": "Get the current weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                               "required": ["city"], "additionalProperties": false}}}],
            "action_type": "chat_with_tool_call_output", "temperature": 0, "max_new_tokens": 60,
        }),
    );
    let call = &v["response"]["tool_calls"][0];
    assert_eq!(call["name"], "demo_author/get_weather", "{v}");
    assert!(call["parameters"]["city"].is_string());
    assert!(call["id"].is_string());

    // What this kernel does not run: the envelope with a 501 inside, never a crash.
    let v = aios_query(
        "demo/writer",
        "llm",
        json!({"messages": question, "action_type": "call_tool"}),
    );
    assert_eq!(v["response"]["status_code"], 501);
    assert!(v["response"]["error"]
        .as_str()
        .unwrap()
        .contains("call_tool"));
    for kind in ["storage", "tool"] {
        let v = aios_query("demo/writer", kind, json!({}));
        assert_eq!(v["response"]["status_code"], 501, "{v}");
    }
    // A model error comes back in the envelope with its status.
    let v = aios_query(
        "demo/writer",
        "llm",
        json!({"messages": [], "action_type": "chat"}),
    );
    assert_eq!(v["response"]["status_code"], 400, "{v}");
    assert!(v["response"]["error"].is_string());
    // A malformed envelope is a 400.
    let (s, _) = post("/query", &json!({"query_type": "llm", "query_data": {}}));
    assert_eq!(s, 400);
}

#[test]
fn cerebrum_memory_queries_are_per_agent() {
    let add = aios_query(
        "mem/one",
        "memory",
        json!({"operation_type": "add_memory",
        "params": {"content": "The meeting with Dana moved to Friday at noon.", "metadata": {"src": "email"}}}),
    );
    let r = &add["response"];
    assert_eq!(r["response_class"], "memory");
    assert_eq!(r["success"], true, "{add}");
    let id = r["memory_id"].as_str().unwrap().to_string();
    aios_query(
        "mem/one",
        "memory",
        json!({"operation_type": "add_memory",
        "params": {"content": "Buy oat milk and bread."}}),
    );
    let found = aios_query(
        "mem/one",
        "memory",
        json!({"operation_type": "retrieve_memory",
        "params": {"content": "When is the meeting?", "k": 2}}),
    );
    let hits = found["response"]["search_results"].as_array().unwrap();
    assert_eq!(hits.len(), 2);
    assert_eq!(hits[0]["memory_id"], id.as_str());
    let got = aios_query(
        "mem/one",
        "memory",
        json!({"operation_type": "get_memory", "params": {"memory_id": id}}),
    );
    assert_eq!(got["response"]["metadata"]["src"], "email");
    // Another agent: nothing to read, find or remove.
    let other = aios_query(
        "mem/two",
        "memory",
        json!({"operation_type": "get_memory", "params": {"memory_id": id}}),
    );
    assert_eq!(other["response"]["success"], false);
    let none = aios_query(
        "mem/two",
        "memory",
        json!({"operation_type": "retrieve_memory",
        "params": {"content": "When is the meeting?", "k": 2}}),
    );
    assert_eq!(none["response"]["search_results"], json!([]));
    let rm = aios_query(
        "mem/two",
        "memory",
        json!({"operation_type": "remove_memory", "params": {"memory_id": id}}),
    );
    assert_eq!(rm["response"]["success"], false);
    // Its owner updates and removes it.
    let up = aios_query(
        "mem/one",
        "memory",
        json!({"operation_type": "update_memory",
        "params": {"memory_id": id, "content": "The meeting with Dana is cancelled."}}),
    );
    assert_eq!(
        up["response"]["content"],
        "The meeting with Dana is cancelled."
    );
    let rm = aios_query(
        "mem/one",
        "memory",
        json!({"operation_type": "remove_memory", "params": {"memory_id": id}}),
    );
    assert_eq!(rm["response"]["success"], true);
    let bad = aios_query(
        "mem/one",
        "memory",
        json!({"operation_type": "forget_everything"}),
    );
    assert_eq!(bad["response"]["success"], false);
}

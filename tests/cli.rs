//! The `aios` binary as a user runs it.

mod common;

use std::process::{Command, Stdio};

use serde_json::{json, Value};

use common::{serve, serve_with_config, stop, BIN};

#[test]
fn serve_answers_then_shuts_down_cleanly_on_sigterm() {
    let model = common::default_model_path();
    let (child, url) = serve(&["--model", model.to_str().unwrap()]);
    common::wait_healthy(&url);
    let c = common::client();
    let models: Value = c
        .get(format!("{url}/v1/models"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    // --model PATH serves the file under its stem, plus the default alias for the default file.
    assert_eq!(models["data"][0]["id"], "SmolLM2-135M-Instruct.Q4_1");
    let r: Value = c
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({"model": "SmolLM2-135M-Instruct.Q4_1", "messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}], "temperature": 0, "max_tokens": 16}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert!(
        r["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("Paris"),
        "{r}"
    );
    assert!(stop(child).success());
}

#[test]
fn a_broken_model_file_is_reported_and_the_server_stays_up() {
    let dir = std::env::temp_dir().join(format!("aios-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("cut.gguf");
    let full = std::fs::read(common::default_model_path()).unwrap();
    std::fs::write(&bad, &full[..full.len() / 3]).unwrap();
    let (child, url) = serve(&["--model", bad.to_str().unwrap()]);
    let c = common::client();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let health = loop {
        let r = c.get(format!("{url}/health")).send().unwrap();
        let v: Value = r.json().unwrap();
        if v["status"] != "loading" {
            break v;
        }
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(health["status"], "error");
    assert!(health.to_string().contains("cut.gguf"), "{health}");
    let r = c
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({"messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().unwrap();
    assert!(
        v["error"]["message"].as_str().unwrap().contains("cut.gguf"),
        "{v}"
    );
    assert!(stop(child).success());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_config_names_the_field() {
    let dir = std::env::temp_dir().join(format!("aios-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("bad.toml");
    std::fs::write(&cfg, "[server]\nport = 8000\nthreadz = 2\n").unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("threadz"), "{err}");
    let out = Command::new(BIN)
        .args(["serve"])
        .env("AIOS_PORT", "eighty")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("AIOS_PORT"));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn models_lists_what_is_configured_and_found() {
    let out = Command::new(BIN)
        .args([
            "models",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml"),
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("smollm2"), "{text}");
    assert!(
        text.contains("found: models/SmolLM2-135M-Instruct.Q4_1.gguf"),
        "{text}"
    );
}

#[test]
fn chat_talks_in_the_terminal() {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .args([
            "chat",
            "--temperature",
            "0",
            "--max-tokens",
            "20",
            "--threads",
            "2",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    child
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"What is the capital of France? Answer in one sentence.\n\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Paris"), "{text}");
}

#[test]
fn bench_measures_a_running_server() {
    let model = common::default_model_path();
    let (child, url) = serve(&["--model", model.to_str().unwrap()]);
    common::wait_healthy(&url);
    let json = std::env::temp_dir().join(format!("aios-bench-{}.json", std::process::id()));
    let out = Command::new(BIN)
        .args([
            "bench",
            "--url",
            &format!("{url}/v1"),
            "--concurrency",
            "1,3",
            "--requests",
            "6",
        ])
        .args([
            "--prompt-words",
            "12",
            "--output-tokens",
            "8",
            "--seed",
            "7",
            "--json",
            json.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("TTFT"), "{table}");
    let reports: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let reports = reports.as_array().unwrap();
    assert_eq!(reports.len(), 2);
    for (r, conc) in reports.iter().zip([1, 3]) {
        assert_eq!(r["concurrency"], conc);
        assert_eq!(r["completed"], 6, "{r}");
        assert_eq!(r["failed"], 0);
        // EOS is ignored: every request produces exactly the requested tokens.
        assert_eq!(r["output_tokens"], 48);
        assert!(r["prompt_tokens"].as_u64().unwrap() >= 6 * 12);
        let ttft = &r["ttft_ms"];
        assert!(ttft["mean"].as_f64().unwrap() > 0.0);
        assert!(ttft["p50"].as_f64() <= ttft["p99"].as_f64());
        assert!(r["itl_ms"]["mean"].as_f64().unwrap() > 0.0);
        assert!(r["output_tokens_per_s"].as_f64().unwrap() > 0.0);
    }
    std::fs::remove_file(json).unwrap();
    assert!(stop(child).success());
}

#[test]
fn a_full_queue_answers_503_with_retry_after() {
    let (child, url, dir) =
        serve_with_config("full", "[engine]\nmax_running = 1\nmax_queued = 0\n", "");
    let c = common::client();
    let long = json!({"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": true, "stream": true});
    let mut stream = c
        .post(format!("{url}/v1/completions"))
        .json(&long)
        .send()
        .unwrap();
    let mut first = [0u8; 64];
    use std::io::Read;
    stream.read_exact(&mut first).unwrap(); // the long request is running
    let short = json!({"prompt": "1, 2, 3,", "max_tokens": 2});
    let r = c
        .post(format!("{url}/v1/completions"))
        .json(&short)
        .send()
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: Value = r.json().unwrap();
    assert_eq!(v["error"]["code"], "server_overloaded");
    drop(stream); // the client goes away: its place comes back within a step or two
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let r = c
            .post(format!("{url}/v1/completions"))
            .json(&short)
            .send()
            .unwrap();
        if r.status() == 200 {
            break;
        }
        assert_eq!(r.status(), 503);
        assert!(
            std::time::Instant::now() < deadline,
            "the cancelled stream never gave its place back"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(stop(child).success());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_small_kv_pool_caps_the_context_and_refuses_what_can_never_fit() {
    // The default model's KV takes 23,040 bytes a token: 8 blocks of 16 tokens.
    let (child, url, dir) = serve_with_config(
        "kv",
        &format!(
            "[kv]\nbytes = {}\n\n[agents.ci-bot]\npriority = 3\n",
            8 * 16 * 23_040
        ),
        "policy = \"priority\"\n",
    );
    let c = common::client();
    let health: Value = c
        .get(format!("{url}/health"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(health["kv"]["smollm2"]["blocks_total"], 8, "{health}");
    assert_eq!(health["kv"]["smollm2"]["block_tokens"], 16);
    let models: Value = c
        .get(format!("{url}/v1/models"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(models["data"][0]["max_model_len"], 128);
    // More than the pool can ever hold: refused at once, nothing queued.
    let r = c
        .post(format!("{url}/v1/completions"))
        .json(&json!({"prompt": "Once upon a time", "max_tokens": 200}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().unwrap();
    assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
    // What fits is served, by a configured agent too, and gives its blocks back.
    let r = c
        .post(format!("{url}/v1/completions"))
        .header("X-Agent-Id", "ci-bot")
        .json(&json!({"prompt": "1, 2, 3, 4,", "max_tokens": 16, "temperature": 0}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().unwrap();
    assert_eq!(v["choices"][0]["text"], " 5, 6, 7, 8, 9, ");
    let health: Value = c
        .get(format!("{url}/health"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(health["kv"]["smollm2"]["blocks_used"], 0, "{health}");
    assert!(stop(child).success());
    std::fs::remove_dir_all(dir).unwrap();
}

/// POST (or GET without a body) as agent `agent`; returns status and JSON.
fn call(url: &str, path: &str, agent: &str, body: Option<&Value>) -> (u16, Value) {
    let c = common::client();
    let r = match body {
        Some(b) => c.post(format!("{url}{path}")).json(b),
        None => c.get(format!("{url}{path}")),
    };
    let resp = r.header("X-Agent-Id", agent).send().unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().unwrap_or(Value::Null))
}

/// One turn on context `id`: checks the answer equals the same conversation sent whole (no
/// context) and that the KV the context held was reused; appends the answer to `messages`.
fn turn(url: &str, id: &str, messages: &mut Vec<Value>, text: &str, held: u64) -> Value {
    messages.push(json!({"role": "user", "content": text}));
    let body = json!({"messages": messages, "max_tokens": 12, "temperature": 0});
    let mut on_ctx = body.clone();
    on_ctx["context_id"] = json!(id);
    let (s, v) = call(url, "/v1/chat/completions", "snap-agent", Some(&on_ctx));
    assert_eq!(s, 200, "{v}");
    let (_, whole) = call(url, "/v1/chat/completions", "other", Some(&body));
    let answer = v["choices"][0]["message"]["content"].clone();
    assert_eq!(answer, whole["choices"][0]["message"]["content"]);
    let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(cached + 1 >= held, "{cached} cached, {held} held: {v}");
    messages.push(json!({"role": "assistant", "content": answer}));
    v
}

/// Snapshot context `id` to disk now; returns what the server says of it.
fn to_disk(url: &str, id: &str) -> Value {
    let path = format!("/v1/contexts/{id}/snapshot");
    let (s, v) = call(url, &path, "snap-agent", Some(&json!({})));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["tier"], "disk", "{v}");
    v
}

fn tokens_of(url: &str, id: &str) -> (u64, String) {
    let (s, info) = call(url, &format!("/v1/contexts/{id}"), "snap-agent", None);
    assert_eq!(s, 200, "{info}");
    (
        info["tokens"].as_u64().unwrap(),
        info["tier"].as_str().unwrap().to_string(),
    )
}

#[test]
fn contexts_on_disk_survive_a_restart_and_corrupt_snapshots_are_refused() {
    let dir = std::env::temp_dir().join(format!("aios-snap-{}", std::process::id()));
    let snaps = dir.join("snapshots");
    let sections = format!("[kv]\ndisk_dir = {:?}\n", snaps.to_str().unwrap());
    let (child, url, _) = serve_with_config("snap", &sections, "");
    let new_ctx = |url: &str| {
        let (s, c) = call(url, "/v1/contexts", "snap-agent", Some(&json!({})));
        assert_eq!(s, 200, "{c}");
        c["id"].as_str().unwrap().to_string()
    };
    let (a, b) = (new_ctx(&url), new_ctx(&url));
    let mut conv_a = vec![];
    let mut conv_b = vec![];
    turn(
        &url,
        &a,
        &mut conv_a,
        "My name is Ada and I like sailing.",
        0,
    );
    turn(&url, &b, &mut conv_b, "I am Bob and I grow tomatoes.", 0);
    for id in [&a, &b] {
        to_disk(&url, id);
    }
    let file = |id: &str| snaps.join("smollm2").join(format!("{id}.kvctx"));
    assert!(file(&a).exists() && file(&b).exists());
    // C stays in the pool: a clean stop (SIGTERM) writes it out.
    let c = new_ctx(&url);
    let mut conv_c = vec![];
    turn(&url, &c, &mut conv_c, "Remember the number 42.", 0);
    assert_eq!(tokens_of(&url, &c).1, "pool");
    assert!(stop(child).success());
    assert!(file(&c).exists());

    // B's file is damaged while the server is down.
    let mut bytes = std::fs::read(file(&b)).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(file(&b), &bytes).unwrap();

    let (child, url, _) = serve_with_config("snap", &sections, "");
    let (held, tier) = tokens_of(&url, &a);
    assert_eq!(tier, "disk");
    // A continues from its snapshot: only the new turn is prefilled, answers as if whole.
    turn(&url, &a, &mut conv_a, "What is my name?", held);
    assert_eq!(tokens_of(&url, &a).1, "pool");
    let (held, tier) = tokens_of(&url, &c);
    assert_eq!(tier, "disk");
    turn(&url, &c, &mut conv_c, "Which number?", held);
    // B was refused at start: not listed, kept aside as .rejected, never loaded.
    let path_b = format!("/v1/contexts/{b}");
    assert_eq!(call(&url, &path_b, "snap-agent", None).0, 404);
    assert!(!file(&b).exists());
    let mut rejected = file(&b).into_os_string();
    rejected.push(".rejected");
    assert!(std::path::Path::new(&rejected).exists());

    // A file damaged while the server runs is refused when it is loaded: a clear error, the
    // context is gone, the server keeps serving.
    to_disk(&url, &a);
    let mut bytes = std::fs::read(file(&a)).unwrap();
    let n = bytes.len();
    std::fs::write(file(&a), &bytes[..n - 1000]).unwrap();
    bytes.clear();
    conv_a.push(json!({"role": "user", "content": "What do I like?"}));
    let body = json!({"messages": conv_a, "max_tokens": 4, "context_id": a});
    let (s, v) = call(&url, "/v1/chat/completions", "snap-agent", Some(&body));
    assert_eq!(s, 500, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("could not be loaded") && msg.contains("truncated"),
        "{msg}"
    );
    assert_eq!(
        call(&url, &format!("/v1/contexts/{a}"), "snap-agent", None).0,
        404
    );
    let (s, _) = call(
        &url,
        "/v1/chat/completions",
        "snap-agent",
        Some(&json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})),
    );
    assert_eq!(s, 200);
    assert!(stop(child).success());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn with_8_bit_kv_a_context_survives_a_restart_and_an_f16_server_refuses_its_snapshot() {
    let dir = std::env::temp_dir().join(format!("aios-q8-{}", std::process::id()));
    let snaps = dir.join("snapshots");
    let kv = |dtype: &str| {
        format!(
            "[kv]\ndtype = {dtype:?}\ndisk_dir = {:?}\n",
            snaps.to_str().unwrap()
        )
    };
    let (child, url, _) = serve_with_config("q8", &kv("q8"), "");
    let health: Value = common::client()
        .get(format!("{url}/health"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let pool = &health["kv"]["smollm2"];
    // 30 layers × K/V × 3 heads × (64 values + a 4-byte scale) × 16 tokens.
    assert_eq!(pool["dtype"], "q8", "{health}");
    assert_eq!(pool["bytes_per_block"], 30 * 2 * 3 * 68 * 16, "{health}");
    let (s, c) = call(&url, "/v1/contexts", "snap-agent", Some(&json!({})));
    assert_eq!(s, 200, "{c}");
    let id = c["id"].as_str().unwrap().to_string();
    let mut conv = vec![];
    turn(
        &url,
        &id,
        &mut conv,
        "My name is Ada and I like sailing.",
        0,
    );
    let v = to_disk(&url, &id);
    // Half the bytes of the same context in f16 (its tokens, and KV of 68 bytes a row, not 128).
    let file = snaps.join("smollm2").join(format!("{id}.kvctx"));
    let held = v["tokens"].as_u64().unwrap();
    let f16_bytes = held.div_ceil(16) * 30 * 2 * 3 * 128 * 16;
    let size = std::fs::metadata(&file).unwrap().len();
    assert!(
        size < f16_bytes * 6 / 10,
        "{size} bytes vs {f16_bytes} in f16"
    );
    assert!(stop(child).success());

    // The same KV type after a restart: the conversation goes on from the snapshot.
    let (child, url, _) = serve_with_config("q8", &kv("q8"), "");
    let (held, tier) = tokens_of(&url, &id);
    assert_eq!(tier, "disk");
    turn(&url, &id, &mut conv, "What is my name?", held);
    to_disk(&url, &id);
    assert!(stop(child).success());

    // An f16 server refuses the 8-bit snapshot (another KV layout), sets it aside and serves.
    let (child, url, _) = serve_with_config("q8", &kv("f16"), "");
    assert_eq!(
        call(&url, &format!("/v1/contexts/{id}"), "snap-agent", None).0,
        404
    );
    let mut rejected = file.clone().into_os_string();
    rejected.push(".rejected");
    assert!(std::path::Path::new(&rejected).exists());
    let (s, v) = call(
        &url,
        "/v1/chat/completions",
        "snap-agent",
        Some(&json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})),
    );
    assert_eq!(s, 200, "{v}");
    assert!(stop(child).success());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn idle_contexts_move_to_host_then_disk_under_pressure_and_come_back() {
    // A pool of 24 blocks and room in host memory for about one context: five contexts of
    // about 100 tokens (7 blocks) each push the oldest out of the pool, then on to disk.
    let dir = std::env::temp_dir().join(format!("aios-tiers-{}", std::process::id()));
    let sections = format!(
        "[kv]\nbytes = {}\nhost_bytes = {}\nprefix_cache = false\ndisk_dir = {:?}\n",
        24 * 16 * 23_040,
        3_000_000,
        dir.join("snapshots").to_str().unwrap()
    );
    let (child, url, _) = serve_with_config("tiers", &sections, "");
    let topics = ["sailing", "tomatoes", "chess", "violins", "mountains"];
    let mut convs = Vec::new();
    for topic in topics {
        let (_, c) = call(&url, "/v1/contexts", "snap-agent", Some(&json!({})));
        let id = c["id"].as_str().unwrap().to_string();
        let mut conv = vec![];
        let text = format!(
            "I want to learn about {topic}. {}Tell me one fact.",
            "Please keep the answer short and simple. ".repeat(6)
        );
        turn(&url, &id, &mut conv, &text, 0);
        convs.push((id, conv));
    }
    let tiers: Vec<String> = convs.iter().map(|(id, _)| tokens_of(&url, id).1).collect();
    assert!(tiers.contains(&"host".to_string()), "{tiers:?}");
    assert!(tiers.contains(&"disk".to_string()), "{tiers:?}");
    assert_eq!(tiers.last().unwrap(), "pool", "{tiers:?}");
    // Each comes back for its next turn, reusing its KV from whichever tier it was in.
    for (id, conv) in convs.iter_mut() {
        let (held, _) = tokens_of(&url, id);
        turn(&url, id, conv, "Thank you. Another one?", held);
    }
    assert!(stop(child).success());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn memories_survive_a_restart() {
    let dir = std::env::temp_dir().join(format!("aios-mem-{}", std::process::id()));
    let sections = format!(
        "[memory]\npath = {:?}\n\n[embeddings]\npath = {:?}\n",
        dir.join("memory.sqlite").to_str().unwrap(),
        concat!(env!("CARGO_MANIFEST_DIR"), "/models/all-MiniLM-L6-v2")
    );
    let (child, url, _) = serve_with_config("mem", &sections, "");
    // The embedding model loads beside the chat model: wait for it.
    let mut added = None;
    for _ in 0..200 {
        let (s, v) = call(
            &url,
            "/v1/memories",
            "mem-agent",
            Some(&json!({"content": "The spare key is under the blue flowerpot."})),
        );
        if s == 200 {
            added = Some(v);
            break;
        }
        assert_eq!(s, 503, "{v}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let id = added.expect("the embedding model never loaded")["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(stop(child).success());
    let (child, url, _) = serve_with_config("mem", &sections, "");
    let (s, v) = call(&url, &format!("/v1/memories/{id}"), "mem-agent", None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["content"], "The spare key is under the blue flowerpot.");
    assert_eq!(
        call(&url, &format!("/v1/memories/{id}"), "someone-else", None).0,
        404
    );
    assert!(stop(child).success());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn devices_reports_the_cpu_and_any_gpu_without_failing() {
    let out = Command::new(BIN)
        .args(["devices", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(r["cpu"]["cores"].as_u64().unwrap() >= 1, "{r}");
    assert!(r["cpu"]["memory_total_bytes"].as_u64().unwrap() > 0, "{r}");
    // No NVIDIA driver: CPU only, and the reason, not an error.
    if r["nvml"] != "ok" {
        assert_eq!(r["gpus"], json!([]), "{r}");
    }
    let out = Command::new(BIN).arg("devices").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("cpu ") && text.contains("nvml"), "{text}");
}

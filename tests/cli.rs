//! The `aios` binary as a user runs it.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_aios");

/// Start `aios serve` with `args`; returns the child and its base URL.
fn serve(args: &[&str]) -> (std::process::Child, String) {
    let mut child = Command::new(BIN)
        .args(["serve", "--port", "0", "--threads", "2"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line.trim().rsplit(' ').next().unwrap().to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "{line}");
    (child, url)
}

/// Start `aios serve` on a config of `sections` plus the default model (with `model_extra`
/// lines), written to a fresh directory; waits until it is healthy. Returns the child, its
/// URL and the directory (the caller removes it).
fn serve_with_config(
    tag: &str,
    sections: &str,
    model_extra: &str,
) -> (std::process::Child, String, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("aios-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("config.toml");
    let model = common::default_model_path();
    std::fs::write(
        &cfg,
        format!(
            "{sections}\n[[models]]\nname = \"smollm2\"\npath = {:?}\n{model_extra}",
            model.to_str().unwrap()
        ),
    )
    .unwrap();
    let (child, url) = serve(&["--config", cfg.to_str().unwrap()]);
    common::wait_healthy(&url);
    (child, url, dir)
}

fn stop(mut child: std::process::Child) -> std::process::ExitStatus {
    sigterm(child.id());
    child.wait().unwrap()
}

fn sigterm(pid: u32) {
    Command::new("kill").arg(pid.to_string()).status().unwrap();
}

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

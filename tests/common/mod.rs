//! Shared by the integration tests: the real default model, and one real server per test
//! binary on an ephemeral loopback port.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn default_model_path() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(aios::config::DEFAULT_MODEL_PATH);
    assert!(
        p.exists(),
        "the default model is missing at {}: run scripts/fetch-model.sh",
        p.display()
    );
    p
}

pub fn reference() -> Value {
    let p =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/reference/smollm2-llamacpp.json");
    let p = if p.exists() {
        p
    } else {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/smollm2-llamacpp.json")
    };
    serde_json::from_slice(&std::fs::read(&p).expect("reference file")).unwrap()
}

/// Largest body the test server accepts (small, so the 413 test stays cheap).
pub const TEST_MAX_BODY: usize = 256 * 1024;

/// Base URL of this test binary's server, started on first use.
pub fn server() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                aios::init_threads(2);
                let mut cfg = aios::config::Config::default();
                cfg.models[0].path = default_model_path().display().to_string();
                // A disk tier for context snapshots, fresh for each test binary's server.
                let snaps =
                    std::env::temp_dir().join(format!("aios-test-kv-{}", std::process::id()));
                let _ = std::fs::remove_dir_all(&snaps);
                cfg.kv.disk_dir = snaps.display().to_string();
                cfg.embeddings.path =
                    concat!(env!("CARGO_MANIFEST_DIR"), "/models/all-MiniLM-L6-v2").into();
                // Long-term memory, fresh too (not the repository's data/memory.sqlite).
                cfg.memory.path = snaps.join("memory.sqlite").display().to_string();
                let state = aios::start_loading(&cfg, None).unwrap();
                let server = aios::api::Server::start(state, "127.0.0.1", 0, TEST_MAX_BODY)
                    .await
                    .unwrap();
                tx.send(format!("http://{}", server.addr)).unwrap();
                std::future::pending::<()>().await;
            });
        });
        let url = rx.recv().unwrap();
        wait_healthy(&url);
        url
    })
}

pub fn wait_healthy(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(r) = client().get(format!("{url}/health")).send() {
            if r.status() == 200 {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "server at {url} never became healthy"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap()
}

/// POST JSON, return (status, body as JSON).
pub fn post(path: &str, body: &Value) -> (u16, Value) {
    let r = client()
        .post(format!("{}{path}", server()))
        .json(body)
        .send()
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

/// POST raw bytes.
pub fn post_raw(path: &str, body: Vec<u8>) -> (u16, Value) {
    let r = client()
        .post(format!("{}{path}", server()))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

/// POST with `stream: true`; returns every `data:` payload parsed (the final `[DONE]` as a
/// JSON string "[DONE]").
pub fn post_stream(path: &str, body: &Value) -> Vec<Value> {
    let r = client()
        .post(format!("{}{path}", server()))
        .json(body)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = r.text().unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| {
            if d == "[DONE]" {
                Value::String(d.into())
            } else {
                serde_json::from_str(d).unwrap()
            }
        })
        .collect()
}

/// Feed `tokens` to one sequence and return the logits of its last one.
pub fn next_logits(
    m: &aios::model::LoadedModel,
    tokens: &[u32],
    kv: &mut aios::kv::KvSeq,
) -> Vec<f32> {
    m.llama
        .forward(&mut [aios::model::SeqInput {
            tokens,
            kv,
            want_logits: true,
        }])
        .unwrap()
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// llama.cpp's greedy continuations, teacher-forced: at every step llama.cpp's token must be
/// our top token or within `NEAR_TIE` logits of it. Different summation orders move logits by
/// a few hundredths through 30 layers of 8-bit activations, which can flip a near tie (e.g.
/// " New" vs " Nova" at 0.05 apart) and send a free-running greedy decode elsewhere; a real
/// error (a wrong scale, a wrong block layout) moves them by whole units.
pub fn check_llama_cpp_greedy(m: &aios::model::LoadedModel) {
    check_llama_cpp_greedy_on(m, aios::kv::KvDtype::F16, 0.25);
}

/// [`check_llama_cpp_greedy`] with the KV stored as `dtype`, near ties up to `near_tie` logits.
pub fn check_llama_cpp_greedy_on(
    m: &aios::model::LoadedModel,
    dtype: aios::kv::KvDtype,
    near_tie: f32,
) {
    use aios::kv::{KvLayout, KvSeq};
    let reference = reference();
    let (mut steps, mut exact) = (0, 0);
    for case in reference["greedy"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let text = case["text"].as_str().unwrap();
        let mut ids = m.tokenizer.encode(prompt, false).unwrap();
        let cont = m.tokenizer.encode(text, false).unwrap();
        assert_eq!(m.tokenizer.decode(&cont), text);
        let layout = KvLayout {
            dtype,
            ..m.llama.kv_layout()
        };
        let mut kv = KvSeq::new(layout, ids.len() + cont.len());
        let mut feed = ids.clone();
        for &want in &cont {
            let logits = next_logits(m, &feed, &mut kv);
            let top = aios::engine::sampler::argmax(&logits);
            let gap = logits[top as usize] - logits[want as usize];
            assert!(
                gap <= near_tie,
                "{dtype:?} KV, after {:?}: llama.cpp chose {:?}, ours {:?} by {gap}",
                m.tokenizer.decode(&ids),
                m.tokenizer.decode(&[want]),
                m.tokenizer.decode(&[top])
            );
            steps += 1;
            exact += usize::from(top == want);
            ids.push(want);
            feed = vec![want];
        }
    }
    // Near ties are rare: nearly every step is an exact match.
    assert!(
        exact + 2 >= steps,
        "{dtype:?} KV: {exact} of {steps} steps exact"
    );
}

pub const BIN: &str = env!("CARGO_BIN_EXE_aios");

/// Start `aios serve` with `args`; returns the child and its base URL.
pub fn serve(args: &[&str]) -> (std::process::Child, String) {
    let mut child = Command::new(BIN)
        .args(["serve", "--port", "0", "--threads", "2"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(if std::env::var_os("AIOS_TEST_LOGS").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
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
pub fn serve_with_config(
    tag: &str,
    sections: &str,
    model_extra: &str,
) -> (std::process::Child, String, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("aios-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("config.toml");
    let model = default_model_path();
    // Long-term memory in the test's own directory, never the repository's data/.
    let memory = if sections.contains("[memory]") {
        String::new()
    } else {
        format!("\n[memory]\npath = {:?}\n", dir.join("memory.sqlite"))
    };
    std::fs::write(
        &cfg,
        format!(
            "{sections}{memory}\n[[models]]\nname = \"smollm2\"\npath = {:?}\n{model_extra}",
            model.to_str().unwrap()
        ),
    )
    .unwrap();
    let (child, url) = serve(&["--config", cfg.to_str().unwrap()]);
    wait_healthy(&url);
    (child, url, dir)
}

pub fn stop(mut child: std::process::Child) -> std::process::ExitStatus {
    sigterm(child.id());
    child.wait().unwrap()
}

pub fn sighup(pid: u32) {
    Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
}

pub fn sigterm(pid: u32) {
    Command::new("kill").arg(pid.to_string()).status().unwrap();
}

//! Running unattended among many agents: API keys, limits, metrics, request ids, draining on
//! SIGTERM and reloading the configuration; each on a real `aios serve` process.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::time::{Duration, Instant};

use common::{serve_with_config, sigterm, stop, BIN};
use serde_json::{json, Value};

fn digest(key: &str) -> String {
    aios::auth::digest_hex(key)
}

/// A request with `key` (if any) and `agent` header (if any); returns status, headers, JSON.
fn req(
    method: &str,
    url: &str,
    key: Option<&str>,
    agent: Option<&str>,
    body: Option<&Value>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let c = common::client();
    let mut r = match method {
        "GET" => c.get(url),
        "DELETE" => c.delete(url),
        _ => c.post(url),
    };
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    if let Some(a) = agent {
        r = r.header("X-Agent-Id", a);
    }
    if let Some(b) = body {
        r = r.json(b);
    }
    let resp = r.send().unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.json().unwrap_or(Value::Null))
}

#[test]
fn keys_decide_the_agent_and_no_agent_reaches_another_agents_data() {
    let dir = std::env::temp_dir().join(format!("aios-keyfile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key_file = dir.join("keys");
    std::fs::write(&key_file, format!("# agents\nbob {}\n", digest("bob-key"))).unwrap();
    let (child, url, cfg_dir) = serve_with_config(
        "keys",
        &format!(
            "[auth]\nadmin_key_sha256 = \"{}\"\nkey_file = {:?}\n\n[agents.alice]\nkey_sha256 = \"{}\"\n",
            digest("root-key"),
            key_file.to_str().unwrap(),
            digest("alice-key")
        ),
        "",
    );
    let ask = json!({"prompt": "1, 2, 3,", "max_tokens": 3, "temperature": 0});
    // No key, a wrong key: 401 with a JSON error. Probes and scrapes need none.
    for key in [None, Some("nope")] {
        let (s, _, v) = req(
            "POST",
            &format!("{url}/v1/completions"),
            key,
            None,
            Some(&ask),
        );
        assert_eq!(s, 401, "{v}");
        assert_eq!(v["error"]["type"], "authentication_error", "{v}");
    }
    assert_eq!(
        req("GET", &format!("{url}/health"), None, None, None).0,
        200
    );
    assert_eq!(
        req("GET", &format!("{url}/metrics"), None, None, None).0,
        200
    );
    // The key decides the agent: alice claiming to be bob is still alice.
    let (s, h, v) = req(
        "POST",
        &format!("{url}/v1/contexts"),
        Some("alice-key"),
        Some("bob"),
        Some(&json!({})),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["owner"], "alice", "{v}");
    assert!(h.get("x-request-id").is_some());
    let ctx = v["id"].as_str().unwrap().to_string();
    let ctx_url = format!("{url}/v1/contexts/{ctx}");
    assert_eq!(req("GET", &ctx_url, Some("alice-key"), None, None).0, 200);
    // Bob (key from the key file) cannot see or use it, even naming alice.
    let (s, _, v) = req("GET", &ctx_url, Some("bob-key"), Some("alice"), None);
    assert_eq!(s, 404, "{v}");
    let mut on_ctx = ask.clone();
    on_ctx["context_id"] = json!(ctx);
    let (s, _, v) = req(
        "POST",
        &format!("{url}/v1/completions"),
        Some("bob-key"),
        None,
        Some(&on_ctx),
    );
    assert_eq!(s, 404, "{v}");
    assert_eq!(req("DELETE", &ctx_url, Some("bob-key"), None, None).0, 404);
    // Usage: each agent sees its own; all of it is the admin's.
    let (s, _, _) = req(
        "POST",
        &format!("{url}/v1/completions"),
        Some("alice-key"),
        None,
        Some(&ask),
    );
    assert_eq!(s, 200);
    let (_, _, mine) = req(
        "GET",
        &format!("{url}/v1/usage"),
        Some("alice-key"),
        None,
        None,
    );
    assert_eq!(mine["agent"], "alice");
    assert_eq!(mine["usage"]["completion_tokens"], 3, "{mine}");
    let (_, _, bobs) = req(
        "GET",
        &format!("{url}/v1/usage"),
        Some("bob-key"),
        Some("alice"),
        None,
    );
    assert_eq!(bobs["agent"], "bob");
    assert_eq!(bobs["usage"]["completion_tokens"], 0, "{bobs}");
    let (s, _, _) = req(
        "GET",
        &format!("{url}/admin/usage"),
        Some("alice-key"),
        None,
        None,
    );
    assert_eq!(s, 403);
    let (s, _, all) = req(
        "GET",
        &format!("{url}/admin/usage"),
        Some("root-key"),
        None,
        None,
    );
    assert_eq!(s, 200);
    assert_eq!(all["agents"]["alice"]["completion_tokens"], 3, "{all}");
    // An AIOS SDK query names its agent in the body: it must be the key's.
    let q = |name: &str| {
        json!({"agent_name": name, "query_type": "llm", "query_data": {
            "messages": [{"role": "user", "content": "Say hi"}], "max_new_tokens": 2}})
    };
    let (s, _, v) = req(
        "POST",
        &format!("{url}/query"),
        Some("alice-key"),
        None,
        Some(&q("bob")),
    );
    assert_eq!(s, 403, "{v}");
    let (s, _, v) = req(
        "POST",
        &format!("{url}/query"),
        Some("alice-key"),
        None,
        Some(&q("alice")),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["response"]["status_code"], 200, "{v}");
    // Devices are the admin's to see.
    let (s, _, _) = req(
        "GET",
        &format!("{url}/v1/devices"),
        Some("alice-key"),
        None,
        None,
    );
    assert_eq!(s, 403);
    let (s, _, dev) = req(
        "GET",
        &format!("{url}/v1/devices"),
        Some("root-key"),
        None,
        None,
    );
    assert_eq!(s, 200, "{dev}");
    assert!(dev["cpu"]["cores"].as_u64().unwrap() >= 1, "{dev}");
    // The admin may act as an agent.
    assert_eq!(
        req("GET", &ctx_url, Some("root-key"), Some("alice"), None).0,
        200
    );
    // A request id the client sends comes back; one is made up otherwise.
    let r = common::client()
        .get(format!("{url}/v1/models"))
        .bearer_auth("bob-key")
        .header("X-Request-Id", "trace-42")
        .send()
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "trace-42");
    assert!(stop(child).success());
    std::fs::remove_dir_all(cfg_dir).unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn without_keys_aios_will_not_listen_beyond_loopback() {
    let out = std::process::Command::new(BIN)
        .args(["serve", "--host", "0.0.0.0", "--port", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no API key configured"), "{err}");
}

/// Every sample line of a Prometheus text exposition: (name, labels, value). Panics on a line
/// that is not valid, or a sample whose family has no TYPE.
fn parse_metrics(text: &str) -> Vec<(String, String, f64)> {
    let mut typed = std::collections::HashSet::new();
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut p = rest.split(' ');
            let name = p.next().unwrap();
            let kind = p.next().unwrap();
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            typed.insert(name.to_string());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect(line);
        let value: f64 = value.parse().expect(line);
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => {
                assert!(l.ends_with('}'), "{line}");
                (n, l.trim_end_matches('}'))
            }
            None => (series, ""),
        };
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line}"
        );
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
            .unwrap_or(name);
        assert!(typed.contains(family), "no TYPE for {line}");
        out.push((name.to_string(), labels.to_string(), value));
    }
    out
}

fn metric(samples: &[(String, String, f64)], name: &str, label: &str) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| n == name && l.contains(label))
        .map(|(_, _, v)| v)
        .sum()
}

#[test]
fn limits_answer_429_and_metrics_move_with_requests() {
    let (child, url, dir) = serve_with_config(
        "limits",
        "[limits]\nmax_prompt_tokens = 64\nmax_header_bytes = 4096\n\n\
         [agents.hasty]\nrequests_per_minute = 2\n\n\
         [agents.greedy]\ntokens_per_minute = 30\n\n\
         [agents.single]\nmax_streams = 1\n\n\
         [agents.small]\nmax_kv_share = 0.0001\n",
        "",
    );
    let comp = format!("{url}/v1/completions");
    let ask = json!({"prompt": "1, 2, 3,", "max_tokens": 4, "temperature": 0});
    let scrape = || {
        let text = common::client()
            .get(format!("{url}/metrics"))
            .send()
            .unwrap()
            .text()
            .unwrap();
        parse_metrics(&text)
    };
    let before = scrape();
    // Requests per minute.
    for _ in 0..2 {
        assert_eq!(req("POST", &comp, None, Some("hasty"), Some(&ask)).0, 200);
    }
    let (s, h, v) = req("POST", &comp, None, Some("hasty"), Some(&ask));
    assert_eq!(s, 429, "{v}");
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    let wait: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&wait), "{wait}");
    // Others are not held back by hasty's limit.
    assert_eq!(req("POST", &comp, None, Some("calm"), Some(&ask)).0, 200);
    // Tokens per minute: the first request spends the budget, the next waits.
    let (s, _, v) = req(
        "POST",
        &comp,
        None,
        Some("greedy"),
        Some(&json!({"prompt": "1, 2, 3,", "max_tokens": 40, "ignore_eos": true})),
    );
    assert_eq!(s, 200, "{v}");
    let (s, h, v) = req("POST", &comp, None, Some("greedy"), Some(&ask));
    assert_eq!(s, 429, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("tokens per minute"));
    assert!(h.get("retry-after").is_some());
    // One stream at a time: a second request while the first streams is refused.
    let mut stream = common::client()
        .post(&comp)
        .header("X-Agent-Id", "single")
        .json(&json!({"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": true, "stream": true}))
        .send()
        .unwrap();
    let mut first = [0u8; 16];
    stream.read_exact(&mut first).unwrap();
    let (s, _, v) = req("POST", &comp, None, Some("single"), Some(&ask));
    assert_eq!(s, 429, "{v}");
    drop(stream);
    // The stream's slot comes back once the client has gone.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (s, _, _) = req("POST", &comp, None, Some("single"), Some(&ask));
        if s == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stream's slot never came back"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A share of the KV pool: 0.01% of it is less than this request needs.
    let (s, _, v) = req(
        "POST",
        &comp,
        None,
        Some("small"),
        Some(&json!({"prompt": "1, 2, 3,", "max_tokens": 200})),
    );
    assert_eq!(s, 429, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("KV"),
        "{v}"
    );
    // Global: the longest prompt, the largest headers.
    let long = "one two three four five six seven eight nine ten ".repeat(10);
    let (s, _, v) = req(
        "POST",
        &comp,
        None,
        None,
        Some(&json!({"prompt": long, "max_tokens": 1})),
    );
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 64"),
        "{v}"
    );
    let r = common::client()
        .get(format!("{url}/v1/models"))
        .header("X-Padding", "x".repeat(5000))
        .send()
        .unwrap();
    assert_eq!(r.status(), 431);
    // The metrics moved with all of this, under aios's names and vLLM's.
    let after = scrape();
    for name in [
        "vllm:prompt_tokens_total",
        "aios_prompt_tokens_total",
        "vllm:generation_tokens_total",
    ] {
        let grew = metric(&after, name, "smollm2") - metric(&before, name, "smollm2");
        assert!(grew >= 20.0, "{name} grew by {grew}");
    }
    let ok = metric(&after, "vllm:request_success_total", "smollm2")
        - metric(&before, "vllm:request_success_total", "smollm2");
    assert!(ok >= 5.0, "{ok}");
    assert!(metric(&after, "vllm:time_to_first_token_seconds_count", "smollm2") >= 5.0);
    assert!(metric(&after, "vllm:e2e_request_latency_seconds_count", "smollm2") >= 5.0);
    assert!(metric(&after, "vllm:request_queue_time_seconds_count", "smollm2") >= 5.0);
    assert!(metric(&after, "vllm:inter_token_latency_seconds_count", "smollm2") >= 10.0);
    assert!(metric(&after, "aios_http_requests_total", "status=\"429\"") >= 4.0);
    assert!(metric(&after, "aios_http_requests_total", "status=\"431\"") >= 1.0);
    let info = after
        .iter()
        .find(|(n, _, _)| n == "vllm:cache_config_info")
        .expect("cache_config_info");
    assert!(
        info.1.contains("block_size=\"16\"") && info.1.contains("num_gpu_blocks=\""),
        "{info:?}"
    );
    for gauge in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:num_preemptions_total",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
    ] {
        assert!(
            after
                .iter()
                .any(|(n, l, _)| n == gauge && l.contains("model_name=\"smollm2\"")),
            "{gauge} missing"
        );
    }
    let usage = metric(&after, "vllm:kv_cache_usage_perc", "smollm2");
    assert!((0.0..=1.0).contains(&usage), "{usage}");
    assert!(stop(child).success());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn sigterm_lets_a_stream_finish_refuses_new_work_and_exits_zero() {
    let (child, url, dir) = serve_with_config("drain", "", "");
    let mut stream = common::client()
        .post(format!("{url}/v1/completions"))
        .json(&json!({"prompt": "Once upon a time", "max_tokens": 150, "ignore_eos": true, "stream": true, "temperature": 0}))
        .send()
        .unwrap();
    assert_eq!(stream.status(), 200);
    let mut reader = BufReader::new(&mut stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("data: "), "{line}");
    sigterm(child.id());
    // Draining: new work is refused, the health check says so.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (s, _, v) = req("GET", &format!("{url}/health"), None, None, None);
        if s == 503 {
            assert_eq!(v["status"], "draining", "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "health never turned unready");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (s, h, v) = req(
        "POST",
        &format!("{url}/v1/completions"),
        None,
        None,
        Some(&json!({"prompt": "hi", "max_tokens": 1})),
    );
    assert_eq!(s, 503, "{v}");
    assert!(h.get("retry-after").is_some());
    // The stream in flight runs to its end.
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    assert!(rest.trim_end().ends_with("data: [DONE]"), "{rest}");
    let tokens = rest.lines().filter(|l| l.starts_with("data: {")).count() + 1;
    assert!(tokens >= 100, "only {tokens} chunks");
    let mut child = child;
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn reload_applies_new_keys_and_limits_and_refuses_a_broken_file_whole() {
    let (child, url, dir) =
        serve_with_config("reload", "[agents.a]\nrequests_per_minute = 1\n", "");
    let cfg = dir.join("config.toml");
    let original = std::fs::read_to_string(&cfg).unwrap();
    let comp = format!("{url}/v1/completions");
    let ask = json!({"prompt": "1, 2,", "max_tokens": 2});
    assert_eq!(req("POST", &comp, None, Some("a"), Some(&ask)).0, 200);
    assert_eq!(req("POST", &comp, None, Some("a"), Some(&ask)).0, 429);
    // A broken file: refused whole with the reason; the old limits stay.
    std::fs::write(
        &cfg,
        original.replace("requests_per_minute = 1", "requests_per_minute = \"many\""),
    )
    .unwrap();
    let (s, _, v) = req("POST", &format!("{url}/admin/reload"), None, None, None);
    assert_eq!(s, 422, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("requests_per_minute"),
        "{v}"
    );
    assert_eq!(req("POST", &comp, None, Some("a"), Some(&ask)).0, 429);
    // A good one applies, without a restart.
    std::fs::write(
        &cfg,
        original.replace("requests_per_minute = 1", "requests_per_minute = 1000"),
    )
    .unwrap();
    let (s, _, v) = req("POST", &format!("{url}/admin/reload"), None, None, None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["restart_needed"], json!([]));
    assert_eq!(req("POST", &comp, None, Some("a"), Some(&ask)).0, 200);
    // SIGHUP reloads too: now a key is needed.
    std::fs::write(
        &cfg,
        format!(
            "[auth]\nadmin_key_sha256 = \"{}\"\n{original}",
            digest("root")
        ),
    )
    .unwrap();
    common::sighup(child.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    while req("GET", &format!("{url}/v1/models"), None, None, None).0 != 401 {
        assert!(Instant::now() < deadline, "SIGHUP did not reload");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        req("GET", &format!("{url}/v1/models"), Some("root"), None, None).0,
        200
    );
    // Changing what needs a restart is reported, not applied.
    std::fs::write(
        &cfg,
        format!(
            "[auth]\nadmin_key_sha256 = \"{}\"\n[engine]\nmax_running = 3\n{original}",
            digest("root")
        ),
    )
    .unwrap();
    let (s, _, v) = req(
        "POST",
        &format!("{url}/admin/reload"),
        Some("root"),
        None,
        None,
    );
    assert_eq!(s, 200, "{v}");
    assert!(
        v["restart_needed"][0]
            .as_str()
            .unwrap()
            .contains("max_running"),
        "{v}"
    );
    assert!(stop(child).success());
    std::fs::remove_dir_all(dir).unwrap();
}

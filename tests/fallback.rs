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

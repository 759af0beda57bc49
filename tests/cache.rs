//! The exact-match response cache, on real servers over real HTTP: a local aios with the cache
//! on, and a second aios standing in for the cloud it spills over to.

mod common;

use common::{serve_with_config, stop};
use serde_json::{json, Value};

/// What one request came back with.
struct Answer {
    status: u16,
    backend: String,
    cache: String,
    origin: String,
    body: Value,
    /// A stream's text, its chunks' content joined.
    streamed: Option<String>,
}

fn header(r: &reqwest::blocking::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

fn send(url: &str, route: &str, agent: &str, body: &Value) -> Answer {
    let r = common::client()
        .post(format!("{url}/v1/{route}"))
        .header("X-Agent-Id", agent)
        .json(body)
        .send()
        .unwrap();
    let (status, backend) = (r.status().as_u16(), header(&r, "x-aios-backend"));
    let (cache, origin) = (
        header(&r, "x-aios-cache"),
        header(&r, "x-aios-cache-origin"),
    );
    if body["stream"] == true {
        let text = r.text().unwrap();
        assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
        let chunks: Vec<Value> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        let joined: String = chunks
            .iter()
            .filter_map(|c| {
                let c = &c["choices"][0];
                c["text"].as_str().or(c["delta"]["content"].as_str())
            })
            .collect();
        let last = chunks.last().cloned().unwrap_or(Value::Null);
        return Answer {
            status,
            backend,
            cache,
            origin,
            body: last,
            streamed: Some(joined),
        };
    }
    Answer {
        status,
        backend,
        cache,
        origin,
        body: r.json().unwrap_or(Value::Null),
        streamed: None,
    }
}

fn text(a: &Answer) -> String {
    if let Some(s) = &a.streamed {
        return s.clone();
    }
    let c = &a.body["choices"][0];
    c["text"]
        .as_str()
        .or(c["message"]["content"].as_str())
        .unwrap_or_else(|| panic!("no text in {}", a.body))
        .to_string()
}

fn get(url: &str, path: &str, agent: &str) -> String {
    common::client()
        .get(format!("{url}{path}"))
        .header("X-Agent-Id", agent)
        .send()
        .unwrap()
        .text()
        .unwrap()
}

/// The value of the first metric line starting with `prefix`, 0 when absent.
fn metric(url: &str, prefix: &str) -> f64 {
    get(url, "/metrics", "")
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .map(|v| v.parse().unwrap())
        .unwrap_or(0.0)
}

/// Tokens the local engine has generated.
fn generated(url: &str) -> f64 {
    metric(url, "aios_generation_tokens_total{model_name=\"smollm2\"}")
}

#[test]
fn repeated_deterministic_requests_are_answered_from_the_cache() {
    let (cloud, cloud_url, cloud_dir) = serve_with_config("cache-cloud", "", "");
    // A 64-token local context: long prompts spill over to the cloud.
    let (local, url, dir) = serve_with_config(
        "cache",
        &format!(
            "[cache]\nenabled = true\nttl_secs = 3\n\n\
             [[providers]]\nname = \"cloud\"\nbase_url = \"{cloud_url}/v1\"\n"
        ),
        "context_length = 64\nfallbacks = [\"cloud\"]\n",
    );
    let greedy = json!({"prompt": "1, 2, 3, 4,", "max_tokens": 6, "temperature": 0});

    // The first greedy request runs; the second is the cache's, the same answer and usage,
    // and the engine generates nothing for it.
    let a = send(&url, "completions", "ann", &greedy);
    assert_eq!(
        (a.status, a.backend.as_str(), a.cache.as_str()),
        (200, "local", "miss"),
        "{}",
        a.body
    );
    let before = generated(&url);
    let b = send(&url, "completions", "ann", &greedy);
    assert_eq!(
        (
            b.status,
            b.backend.as_str(),
            b.cache.as_str(),
            b.origin.as_str()
        ),
        (200, "cache", "hit", "local"),
        "{}",
        b.body
    );
    assert_eq!(text(&a), text(&b));
    assert_eq!(a.body["usage"], b.body["usage"]);
    assert_ne!(a.body["id"], b.body["id"], "a hit gets its own id");
    assert_eq!(generated(&url), before);
    // Streamed, the same request is a hit too, replayed as chunks, usage last when asked.
    let mut s = greedy.clone();
    s["stream"] = json!(true);
    s["stream_options"] = json!({"include_usage": true});
    let c = send(&url, "completions", "ann", &s);
    assert_eq!((c.backend.as_str(), c.cache.as_str()), ("cache", "hit"));
    assert_eq!(text(&c), text(&a));
    assert_eq!(c.body["usage"], a.body["usage"]);
    assert_eq!(generated(&url), before);
    // The ledger counts the hits as requests on the `cache` backend, with no tokens.
    let u: Value = serde_json::from_str(&get(&url, "/v1/usage", "ann")).unwrap();
    let b_ = &u["usage"]["backends"];
    assert_eq!(b_["local"]["requests"], 1, "{u}");
    assert_eq!(b_["cache"]["requests"], 2, "{u}");
    assert_eq!(b_["cache"]["completion_tokens"], 0, "{u}");
    assert_eq!(u["usage"]["completion_tokens"], 6, "{u}");

    // Anything else that differs is another request: a parameter, the agent.
    let mut other = greedy.clone();
    other["max_tokens"] = json!(5);
    let d = send(&url, "completions", "ann", &other);
    assert_eq!((d.backend.as_str(), d.cache.as_str()), ("local", "miss"));
    let e = send(&url, "completions", "bob", &greedy);
    assert_eq!((e.backend.as_str(), e.cache.as_str()), ("local", "miss"));
    assert_eq!(text(&e), text(&a), "greedy is greedy");
    // Sampling without a seed is never cached; with a seed it is.
    let hot = json!({"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0.9});
    for _ in 0..2 {
        let before = generated(&url);
        let h = send(&url, "completions", "ann", &hot);
        assert_eq!((h.backend.as_str(), h.cache.as_str()), ("local", "bypass"));
        assert!(generated(&url) > before);
    }
    let mut seeded = hot.clone();
    seeded["seed"] = json!(7);
    let f = send(&url, "completions", "ann", &seeded);
    assert_eq!(f.cache, "miss");
    let g = send(&url, "completions", "ann", &seeded);
    assert_eq!((g.backend.as_str(), g.cache.as_str()), ("cache", "hit"));
    assert_eq!(text(&f), text(&g));
    // A request may opt out.
    let mut opt_out = greedy.clone();
    opt_out["cache"] = json!(false);
    let h = send(&url, "completions", "ann", &opt_out);
    assert_eq!((h.backend.as_str(), h.cache.as_str()), ("local", "bypass"));

    // Chat: a streamed answer is stored whole, then served to a plain request.
    let chat = json!({"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 5,
                      "temperature": 0, "stream": true});
    let i = send(&url, "chat/completions", "ann", &chat);
    assert_eq!((i.backend.as_str(), i.cache.as_str()), ("local", "miss"));
    let mut plain = chat.clone();
    plain["stream"] = json!(false);
    let j = send(&url, "chat/completions", "ann", &plain);
    assert_eq!((j.backend.as_str(), j.cache.as_str()), ("cache", "hit"));
    assert_eq!(text(&i), text(&j));
    assert_eq!(j.body["object"], "chat.completion");
    assert_eq!(j.body["choices"][0]["message"]["role"], "assistant");
    let k = send(&url, "chat/completions", "ann", &chat);
    assert_eq!((k.backend.as_str(), k.cache.as_str()), ("cache", "hit"));
    assert_eq!(text(&k), text(&i));

    // A provider's answer is cached too: the cloud runs it once.
    let long = json!({"prompt": "one two three four five six seven eight nine ten ".repeat(8),
                      "max_tokens": 4, "temperature": 0});
    let cloud_before = metric(
        &cloud_url,
        "aios_http_requests_total{backend=\"local\",route=\"/v1/completions\",status=\"200\"}",
    );
    let l = send(&url, "completions", "ann", &long);
    assert_eq!((l.backend.as_str(), l.cache.as_str()), ("cloud", "miss"));
    let m = send(&url, "completions", "ann", &long);
    assert_eq!(
        (m.backend.as_str(), m.cache.as_str(), m.origin.as_str()),
        ("cache", "hit", "cloud")
    );
    assert_eq!(text(&l), text(&m));
    assert_eq!(l.body["usage"], m.body["usage"]);
    // ... streamed from the provider, collected, then served whole.
    let mut long_stream = long.clone();
    long_stream["prompt"] = json!("ten nine eight seven six five four three two one ".repeat(8));
    long_stream["stream"] = json!(true);
    let n = send(&url, "completions", "ann", &long_stream);
    assert_eq!((n.backend.as_str(), n.cache.as_str()), ("cloud", "miss"));
    long_stream["stream"] = json!(false);
    let o = send(&url, "completions", "ann", &long_stream);
    assert_eq!(
        (o.backend.as_str(), o.cache.as_str(), o.origin.as_str()),
        ("cache", "hit", "cloud")
    );
    assert_eq!(text(&n), text(&o));
    assert_eq!(o.body["usage"]["completion_tokens"], 4, "{}", o.body);
    let cloud_after = metric(
        &cloud_url,
        "aios_http_requests_total{backend=\"local\",route=\"/v1/completions\",status=\"200\"}",
    );
    assert_eq!(cloud_after - cloud_before, 2.0, "the cloud ran each once");
    let u: Value = serde_json::from_str(&get(&url, "/v1/usage", "ann")).unwrap();
    assert_eq!(u["usage"]["backends"]["cloud"]["requests"], 2, "{u}");

    // Past the time to live, an answer is gone.
    std::thread::sleep(std::time::Duration::from_millis(3100));
    let p = send(&url, "completions", "ann", &greedy);
    assert_eq!((p.backend.as_str(), p.cache.as_str()), ("local", "miss"));
    assert_eq!(text(&p), text(&a));

    let metrics = get(&url, "/metrics", "");
    for want in [
        "aios_response_cache_requests_total{outcome=\"hit\"} 7",
        "aios_response_cache_requests_total{outcome=\"bypass\"} 3",
        "aios_response_cache_stores_total{backend=\"cloud\"} 2",
        "aios_http_requests_total{backend=\"cache\",route=\"/v1/completions\",status=\"200\"} 5",
    ] {
        assert!(metrics.contains(want), "{want} not in {metrics}");
    }

    // A burst of identical requests: one runs, the others wait for its answer and get it from
    // the cache; the engine generates it once.
    let burst = json!({"prompt": "Once upon a time", "max_tokens": 48, "ignore_eos": true,
                       "temperature": 0});
    let before = generated(&url);
    let answers: Vec<Answer> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|_| s.spawn(|| send(&url, "completions", "bea", &burst)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut backends: Vec<&str> = answers.iter().map(|a| a.backend.as_str()).collect();
    backends.sort();
    assert_eq!(backends, ["cache", "cache", "cache", "local"]);
    assert!(answers.iter().all(|a| text(a) == text(&answers[0])));
    assert_eq!(generated(&url) - before, 48.0);

    // The cloud, another aios with no [cache] section: off by default, nothing said.
    for _ in 0..2 {
        let q = send(&cloud_url, "completions", "ann", &greedy);
        assert_eq!((q.backend.as_str(), q.cache.as_str()), ("local", ""));
    }
    assert!(!get(&cloud_url, "/metrics", "").contains("aios_response_cache_requests_total{"));

    assert!(stop(local).success());
    assert!(stop(cloud).success());
    std::fs::remove_dir_all(dir).unwrap();
    std::fs::remove_dir_all(cloud_dir).unwrap();
}

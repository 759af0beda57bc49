//! `aios bench`: a load generator for aios or any OpenAI-compatible server.
//!
//! For each concurrency level it sends a fixed number of streaming completions with random
//! prompts (a fresh seed per run unless one is given, so no prompt cache flatters a server) and
//! measures time to first token, inter-token latency, end-to-end latency and throughput.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Base URL, e.g. `http://127.0.0.1:8000` (with or without `/v1`).
    pub url: String,
    /// `"model"` in each request; `None` asks the server's `/v1/models` for its first model.
    pub model: Option<String>,
    pub concurrency: Vec<usize>,
    /// Requests per concurrency level.
    pub requests: usize,
    /// Approximate prompt length in words (about 1.3 tokens each).
    pub prompt_words: usize,
    pub output_tokens: usize,
    pub seed: u64,
    pub api_key: Option<String>,
    /// Sent as `response_format` with every request (to measure constrained decoding).
    pub response_format: Option<Value>,
}

/// Latency summary in milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    pub mean: f64,
    pub p50: f64,
    pub p99: f64,
}

impl Stats {
    fn of(mut xs: Vec<f64>) -> Self {
        if xs.is_empty() {
            return Self::default();
        }
        xs.sort_by(f64::total_cmp);
        let pick = |q: f64| xs[((xs.len() - 1) as f64 * q).round() as usize];
        Self {
            mean: xs.iter().sum::<f64>() / xs.len() as f64,
            p50: pick(0.5),
            p99: pick(0.99),
        }
    }
}

/// The result of one concurrency level.
#[derive(Clone, Debug, Serialize)]
pub struct LevelReport {
    pub concurrency: usize,
    pub requests: usize,
    pub completed: usize,
    pub failed: usize,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    pub duration_s: f64,
    pub output_tokens_per_s: f64,
    pub requests_per_s: f64,
    pub ttft_ms: Stats,
    pub itl_ms: Stats,
    pub e2e_ms: Stats,
}

/// One request's measurements.
#[derive(Default)]
struct Sample {
    ttft: Option<Duration>,
    gaps: Vec<Duration>,
    e2e: Duration,
    prompt_tokens: usize,
    output_tokens: usize,
}

const WORDS: &[&str] = &[
    "agent", "kernel", "token", "river", "mountain", "compile", "schedule", "memory", "garden",
    "signal", "vector", "planet", "coffee", "window", "number", "rapid", "silent", "orange",
    "network", "battery", "history", "question", "market", "engine", "forest", "pattern",
    "library", "ocean", "winter", "system", "letter", "camera", "bridge", "music", "science",
    "paper", "yellow", "travel", "simple", "machine", "doctor", "energy", "island", "future",
];

fn random_prompt(rng: &mut StdRng, words: usize) -> String {
    (0..words.max(1))
        .map(|_| WORDS[rng.random_range(0..WORDS.len())])
        .collect::<Vec<_>>()
        .join(" ")
}

fn base_url(url: &str) -> String {
    let u = url.trim_end_matches('/');
    u.strip_suffix("/v1").unwrap_or(u).to_string()
}

/// Run every concurrency level in turn.
pub async fn run(cfg: &BenchConfig) -> anyhow::Result<Vec<LevelReport>> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()?;
    let base = base_url(&cfg.url);
    let model = match &cfg.model {
        Some(m) => m.clone(),
        None => {
            let mut req = client.get(format!("{base}/v1/models"));
            if let Some(k) = &cfg.api_key {
                req = req.bearer_auth(k);
            }
            let v: Value = req.send().await?.error_for_status()?.json().await?;
            v["data"][0]["id"]
                .as_str()
                .ok_or_else(|| anyhow::anyhow!("{base}/v1/models lists no model"))?
                .to_string()
        }
    };
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut reports = Vec::new();
    for &conc in &cfg.concurrency {
        let prompts: Vec<String> = (0..cfg.requests)
            .map(|_| random_prompt(&mut rng, cfg.prompt_words))
            .collect();
        let queue = std::sync::Arc::new(std::sync::Mutex::new(prompts));
        let start = Instant::now();
        let mut workers = Vec::new();
        for _ in 0..conc.max(1) {
            let (client, queue, base, model, cfg) = (
                client.clone(),
                queue.clone(),
                base.clone(),
                model.clone(),
                cfg.clone(),
            );
            workers.push(tokio::spawn(async move {
                let mut out = Vec::new();
                loop {
                    let prompt = match queue.lock().map(|mut q| q.pop()) {
                        Ok(Some(p)) => p,
                        _ => break,
                    };
                    out.push(one_request(&client, &base, &model, &prompt, &cfg).await);
                }
                out
            }));
        }
        let mut samples = Vec::new();
        let mut failed = 0;
        for w in workers {
            for r in w.await? {
                match r {
                    Ok(s) => samples.push(s),
                    Err(e) => {
                        failed += 1;
                        tracing::warn!("request failed: {e}");
                    }
                }
            }
        }
        let duration = start.elapsed().as_secs_f64();
        let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
        let output_tokens: usize = samples.iter().map(|s| s.output_tokens).sum();
        reports.push(LevelReport {
            concurrency: conc,
            requests: cfg.requests,
            completed: samples.len(),
            failed,
            prompt_tokens: samples.iter().map(|s| s.prompt_tokens).sum(),
            output_tokens,
            duration_s: duration,
            output_tokens_per_s: output_tokens as f64 / duration,
            requests_per_s: samples.len() as f64 / duration,
            ttft_ms: Stats::of(
                samples
                    .iter()
                    .filter_map(|s| s.ttft.as_ref().map(ms))
                    .collect(),
            ),
            itl_ms: Stats::of(samples.iter().flat_map(|s| s.gaps.iter().map(ms)).collect()),
            e2e_ms: Stats::of(samples.iter().map(|s| ms(&s.e2e)).collect()),
        });
    }
    Ok(reports)
}

async fn one_request(
    client: &reqwest::Client,
    base: &str,
    model: &str,
    prompt: &str,
    cfg: &BenchConfig,
) -> anyhow::Result<Sample> {
    let mut body = json!({
        "model": model, "prompt": prompt, "max_tokens": cfg.output_tokens,
        "temperature": 0, "stream": true, "stream_options": {"include_usage": true},
        // Honoured by aios and vLLM: measure the requested output length, not an early EOS.
        "ignore_eos": true,
    });
    if let Some(rf) = &cfg.response_format {
        body["response_format"] = rf.clone();
    }
    let t0 = Instant::now();
    let mut req = client.post(format!("{base}/v1/completions")).json(&body);
    if let Some(k) = &cfg.api_key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await?;
    if !resp.status().is_success() {
        let status = resp.status();
        anyhow::bail!("{status}: {}", resp.text().await.unwrap_or_default());
    }
    let mut s = Sample::default();
    let mut last = None;
    let mut chunks = 0;
    let mut buf = String::new();
    let mut stream = resp.bytes_stream();
    while let Some(bytes) = stream.next().await {
        buf.push_str(&String::from_utf8_lossy(&bytes?));
        while let Some(end) = buf.find('\n') {
            let line = buf[..end].trim().to_string();
            buf.drain(..=end);
            let Some(data) = line.strip_prefix("data:").map(str::trim) else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(data)?;
            if let Some(e) = v.get("error") {
                anyhow::bail!("error in stream: {e}");
            }
            let text = v["choices"][0]["text"].as_str().unwrap_or("");
            if !text.is_empty() {
                let now = Instant::now();
                match last {
                    None => s.ttft = Some(now - t0),
                    Some(prev) => s.gaps.push(now - prev),
                }
                last = Some(now);
                chunks += 1;
            }
            if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                s.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0) as usize;
                s.output_tokens = u["completion_tokens"].as_u64().unwrap_or(0) as usize;
            }
        }
    }
    if s.output_tokens == 0 {
        s.output_tokens = chunks; // a server that sends no usage: one token per chunk
    }
    s.e2e = t0.elapsed();
    Ok(s)
}

/// The reports as a table.
pub fn table(reports: &[LevelReport]) -> String {
    let mut out = format!(
        "{:>5} {:>9} {:>10} {:>8} {:>22} {:>22} {:>22}\n",
        "conc",
        "ok/fail",
        "out tok/s",
        "req/s",
        "TTFT ms mean/p50/p99",
        "ITL ms mean/p50/p99",
        "E2E ms mean/p50/p99"
    );
    let s = |x: &Stats| format!("{:.0}/{:.0}/{:.0}", x.mean, x.p50, x.p99);
    for r in reports {
        out.push_str(&format!(
            "{:>5} {:>9} {:>10.1} {:>8.2} {:>22} {:>22} {:>22}\n",
            r.concurrency,
            format!("{}/{}", r.completed, r.failed),
            r.output_tokens_per_s,
            r.requests_per_s,
            s(&r.ttft_ms),
            s(&r.itl_ms),
            s(&r.e2e_ms)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_and_urls() {
        let s = Stats::of((1..=100).map(f64::from).collect());
        assert_eq!(s.mean, 50.5);
        assert_eq!(s.p50, 51.0);
        assert_eq!(s.p99, 99.0);
        assert_eq!(base_url("http://h:1/v1/"), "http://h:1");
        assert_eq!(base_url("http://h:1"), "http://h:1");
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(random_prompt(&mut rng, 5).split(' ').count(), 5);
    }
}

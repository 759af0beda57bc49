//! `/metrics`: Prometheus text. Everything is exported under `aios_` names; where vLLM has a
//! metric for the same thing it is also exported under vLLM's name and type, labelled
//! `model_name`, so dashboards and routers built for vLLM (the Gateway API Inference
//! Extension's endpoint picker among them) read aios unchanged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::engine::{EngineHandle, FinishReason, Usage};
use crate::limits::{AgentLimits, Governor, KvReservation};

const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
const ITL_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
    5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
];
const E2E_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
];

/// A counter exported under an aios name and vLLM's.
struct Counter2(IntCounterVec, IntCounterVec);

impl Counter2 {
    fn inc_by(&self, labels: &[&str], n: u64) {
        self.0.with_label_values(labels).inc_by(n);
        self.1.with_label_values(labels).inc_by(n);
    }
}

/// A histogram exported under an aios name and vLLM's.
struct Histogram2(HistogramVec, HistogramVec);

impl Histogram2 {
    fn observe(&self, model: &str, secs: f64) {
        self.0.with_label_values(&[model]).observe(secs);
        self.1.with_label_values(&[model]).observe(secs);
    }
}

/// A gauge exported under an aios name and vLLM's.
struct Gauge2(IntGaugeVec, IntGaugeVec);

impl Gauge2 {
    fn set(&self, model: &str, v: i64) {
        self.0.with_label_values(&[model]).set(v);
        self.1.with_label_values(&[model]).set(v);
    }
}

pub struct Metrics {
    registry: Registry,
    http_requests: IntCounterVec,
    prompt_tokens: Counter2,
    generation_tokens: Counter2,
    prefix_queries: Counter2,
    prefix_hits: Counter2,
    preemptions: Counter2,
    finished: Counter2,
    ttft: Histogram2,
    itl: Histogram2,
    e2e: Histogram2,
    queue: Histogram2,
    running: Gauge2,
    waiting: Gauge2,
    kv_usage: GaugeVec,
    cache_info: GaugeVec,
    kv_blocks: IntGaugeVec,
    swapped: IntGaugeVec,
    contexts: IntGaugeVec,
    tier_bytes: IntGaugeVec,
    rate_limited: IntCounterVec,
    kv_events: IntCounterVec,
    fallbacks: IntCounterVec,
    cost: prometheus::CounterVec,
    cache_lookups: IntCounterVec,
    cache_stores: IntCounterVec,
    cache_size: IntGaugeVec,
    /// Preemptions already counted, per model (the engine keeps a running total).
    seen_preemptions: Mutex<HashMap<String, u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
            r.register(Box::new(c.clone()))
                .expect("metric names are unique");
            c
        }
        let counter = |name: &str, help: &str, labels: &[&str]| {
            reg(
                r,
                IntCounterVec::new(Opts::new(name, help), labels).unwrap(),
            )
        };
        let counter2 = |a: &str, v: &str, help: &str, labels: &[&str]| {
            Counter2(counter(a, help, labels), counter(v, help, labels))
        };
        let hist = |name: &str, help: &str, b: &[f64]| {
            let o = HistogramOpts::new(name, help).buckets(b.to_vec());
            reg(r, HistogramVec::new(o, &["model_name"]).unwrap())
        };
        let hist2 = |a: &str, v: &str, help: &str, b: &[f64]| {
            Histogram2(hist(a, help, b), hist(v, help, b))
        };
        let igauge = |name: &str, help: &str, labels: &[&str]| {
            reg(r, IntGaugeVec::new(Opts::new(name, help), labels).unwrap())
        };
        let gauge2 = |a: &str, v: &str, help: &str| {
            Gauge2(
                igauge(a, help, &["model_name"]),
                igauge(v, help, &["model_name"]),
            )
        };
        let m = ["model_name"];
        Self {
            http_requests: counter(
                "aios_http_requests_total",
                "HTTP requests answered, by route, status and backend.",
                &["route", "status", "backend"],
            ),
            prompt_tokens: counter2(
                "aios_prompt_tokens_total",
                "vllm:prompt_tokens_total",
                "Prompt tokens of finished requests.",
                &m,
            ),
            generation_tokens: counter2(
                "aios_generation_tokens_total",
                "vllm:generation_tokens_total",
                "Tokens generated.",
                &m,
            ),
            prefix_queries: counter2(
                "aios_prefix_cache_queries_total",
                "vllm:prefix_cache_queries_total",
                "Prompt tokens looked up in the prefix cache.",
                &m,
            ),
            prefix_hits: counter2(
                "aios_prefix_cache_hits_total",
                "vllm:prefix_cache_hits_total",
                "Prompt tokens found in the prefix cache (or a context).",
                &m,
            ),
            preemptions: counter2(
                "aios_preemptions_total",
                "vllm:num_preemptions_total",
                "Sequences preempted (swapped out or dropped for recomputation).",
                &m,
            ),
            finished: counter2(
                "aios_requests_finished_total",
                "vllm:request_success_total",
                "Sequences that finished, by reason.",
                &["model_name", "finished_reason"],
            ),
            ttft: hist2(
                "aios_time_to_first_token_seconds",
                "vllm:time_to_first_token_seconds",
                "Time from arrival to the first output token.",
                TTFT_BUCKETS,
            ),
            itl: hist2(
                "aios_inter_token_latency_seconds",
                "vllm:inter_token_latency_seconds",
                "Time between consecutive output tokens.",
                ITL_BUCKETS,
            ),
            e2e: hist2(
                "aios_e2e_request_latency_seconds",
                "vllm:e2e_request_latency_seconds",
                "Time from arrival to the last output token.",
                E2E_BUCKETS,
            ),
            queue: hist2(
                "aios_request_queue_time_seconds",
                "vllm:request_queue_time_seconds",
                "Time from arrival to the first engine step.",
                E2E_BUCKETS,
            ),
            running: gauge2(
                "aios_requests_running",
                "vllm:num_requests_running",
                "Sequences that ran in the engine's last step.",
            ),
            waiting: gauge2(
                "aios_requests_waiting",
                "vllm:num_requests_waiting",
                "Live sequences that did not run in the last step (the queue).",
            ),
            kv_usage: reg(
                r,
                GaugeVec::new(
                    Opts::new("vllm:kv_cache_usage_perc", "KV pool blocks in use, 0 to 1."),
                    &m,
                )
                .unwrap(),
            ),
            cache_info: reg(
                r,
                GaugeVec::new(
                    Opts::new("vllm:cache_config_info", "The KV pool's layout (value 1)."),
                    &["model_name", "block_size", "num_gpu_blocks"],
                )
                .unwrap(),
            ),
            kv_blocks: igauge(
                "aios_kv_blocks",
                "KV pool blocks, by state (used, free).",
                &["model_name", "state"],
            ),
            swapped: igauge(
                "aios_swapped_sequences",
                "Sequences whose KV is swapped out to host memory.",
                &m,
            ),
            contexts: igauge(
                "aios_contexts",
                "Agent contexts, by the tier their KV is in (pool, host, disk).",
                &["model_name", "tier"],
            ),
            tier_bytes: igauge(
                "aios_kv_tier_bytes",
                "Bytes of context KV held outside the pool, by tier (host, disk).",
                &["model_name", "tier"],
            ),
            rate_limited: counter(
                "aios_rate_limited_total",
                "Requests refused by an agent limit (429).",
                &["limit"],
            ),
            kv_events: counter(
                "aios_kv_events_total",
                "KV events (prefix-cache changes) published, or dropped on a full queue.",
                &["outcome"],
            ),
            fallbacks: counter(
                "aios_fallback_requests_total",
                "Requests the local engine could not take, by provider and outcome (served, failed, skipped).",
                &["model_name", "provider", "outcome"],
            ),
            cost: reg(
                r,
                prometheus::CounterVec::new(
                    Opts::new("aios_cost_usd_total", "US dollars spent, by backend."),
                    &["backend"],
                )
                .unwrap(),
            ),
            cache_lookups: counter(
                "aios_response_cache_requests_total",
                "Generation requests seen by the response cache, by outcome (hit, miss, bypass: not deterministic, on a context or opted out).",
                &["outcome"],
            ),
            cache_stores: counter(
                "aios_response_cache_stores_total",
                "Complete answers stored in the response cache, by the backend that produced them.",
                &["backend"],
            ),
            cache_size: igauge(
                "aios_response_cache_size",
                "What the response cache holds, in entries and bytes.",
                &["unit"],
            ),
            seen_preemptions: Mutex::new(HashMap::new()),
            registry,
        }
    }

    /// Count one answered HTTP request.
    pub fn http(&self, route: &str, status: u16, backend: &str) {
        self.http_requests
            .with_label_values(&[route, &status.to_string(), backend])
            .inc();
    }

    /// Count one spill-over attempt.
    pub fn fallback(&self, model: &str, provider: &str, outcome: &str, cost: f64) {
        self.fallbacks
            .with_label_values(&[model, provider, outcome])
            .inc();
        if cost > 0.0 {
            self.cost.with_label_values(&[provider]).inc_by(cost);
        }
    }

    /// Count one response-cache lookup (`hit`, `miss` or `bypass`).
    pub fn cache_lookup(&self, outcome: &str) {
        self.cache_lookups.with_label_values(&[outcome]).inc();
    }

    /// Count one answer stored in the response cache, which now holds `entries` in `bytes`.
    pub fn cache_store(&self, backend: &str, entries: usize, bytes: usize) {
        self.cache_stores.with_label_values(&[backend]).inc();
        self.cache_size
            .with_label_values(&["entries"])
            .set(entries as i64);
        self.cache_size
            .with_label_values(&["bytes"])
            .set(bytes as i64);
    }

    /// Count one request refused by an agent limit.
    pub fn limited(&self, limit: &str) {
        self.rate_limited.with_label_values(&[limit]).inc();
    }

    /// Bring the KV-event counters up to the publisher's totals.
    pub fn kv_events(&self, published: u64, dropped: u64) {
        for (outcome, total) in [("published", published), ("dropped", dropped)] {
            let c = self.kv_events.with_label_values(&[outcome]);
            c.inc_by(total.saturating_sub(c.get()));
        }
    }

    /// The text exposition, with the engines' gauges read now.
    pub fn render<'a>(&self, engines: impl Iterator<Item = (&'a str, EngineHandle)>) -> String {
        use std::sync::atomic::Ordering::Relaxed;
        for (model, e) in engines {
            let s = e.stats();
            self.running.set(model, s.running.load(Relaxed) as i64);
            self.waiting.set(model, s.waiting.load(Relaxed) as i64);
            let kv = e.kv_usage();
            let total = kv.blocks_total.max(1) as f64;
            self.kv_usage
                .with_label_values(&[model])
                .set(kv.blocks_used as f64 / total);
            self.cache_info
                .with_label_values(&[
                    model,
                    &kv.block_tokens.to_string(),
                    &kv.blocks_total.to_string(),
                ])
                .set(1.0);
            let free = kv.blocks_total.saturating_sub(kv.blocks_used) as i64;
            self.kv_blocks
                .with_label_values(&[model, "used"])
                .set(kv.blocks_used as i64);
            self.kv_blocks.with_label_values(&[model, "free"]).set(free);
            self.swapped
                .with_label_values(&[model])
                .set(kv.swapped as i64);
            for (tier, n) in [
                ("pool", &s.contexts_pool),
                ("host", &s.contexts_host),
                ("disk", &s.contexts_disk),
            ] {
                self.contexts
                    .with_label_values(&[model, tier])
                    .set(n.load(Relaxed) as i64);
            }
            for (tier, b) in [("host", &s.host_bytes), ("disk", &s.disk_bytes)] {
                self.tier_bytes
                    .with_label_values(&[model, tier])
                    .set(b.load(Relaxed) as i64);
            }
            let now = (kv.swap_outs + kv.recomputes) as u64;
            let mut seen = self
                .seen_preemptions
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let before = seen.insert(model.to_string(), now).unwrap_or(0);
            self.preemptions
                .inc_by(&[model], now.saturating_sub(before));
        }
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Watches one generation request: its latencies and tokens go to the metrics, its tokens to
/// the agent's limits and usage, and one log line when it ends.
pub struct Observer {
    metrics: Arc<Metrics>,
    governor: Arc<Governor>,
    limits: AgentLimits,
    model: String,
    agent: String,
    request_id: String,
    start: Instant,
    /// Per choice: when its last token came.
    last: Vec<Option<Instant>>,
    /// When the first token of any choice came.
    first: Option<Instant>,
    usage: Usage,
    /// Per choice submitted to the engine: its prompt tokens, the tokens it has sent, and
    /// whether it ended (its usage charged). A choice cut short (the client went away) is
    /// charged what it used when the request ends.
    choices: Vec<(usize, usize, bool)>,
    /// The agent's share of the KV pool taken by this request, given back when it ends.
    pub kv: Option<KvReservation>,
    /// Whether it ran (a rendered request only tokenises: no log line).
    pub ran: bool,
}

impl Observer {
    pub fn new(
        metrics: Arc<Metrics>,
        governor: Arc<Governor>,
        limits: AgentLimits,
        model: &str,
        agent: &str,
        request_id: &str,
    ) -> Self {
        Self {
            metrics,
            governor,
            limits,
            model: model.to_string(),
            agent: agent.to_string(),
            request_id: request_id.to_string(),
            start: Instant::now(),
            last: Vec::new(),
            first: None,
            usage: Usage::default(),
            choices: Vec::new(),
            kv: None,
            ran: false,
        }
    }

    pub fn governor(&self) -> (&Arc<Governor>, AgentLimits, &str) {
        (&self.governor, self.limits, &self.agent)
    }

    /// Count a request this observer's checks refused by an agent limit.
    pub fn limited(&self, limit: &str) {
        self.metrics.limited(limit);
    }

    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    /// The choices went to the engine, with these prompt lengths.
    pub fn submitted(&mut self, prompts: impl IntoIterator<Item = usize>) {
        self.choices = prompts.into_iter().map(|p| (p, 0, false)).collect();
    }

    /// Choice `i` produced a token.
    pub fn token(&mut self, i: usize) {
        if let Some(c) = self.choices.get_mut(i) {
            c.1 += 1;
        }
        if self.last.len() <= i {
            self.last.resize(i + 1, None);
        }
        let now = Instant::now();
        self.first.get_or_insert(now);
        let m = &self.metrics;
        match self.last[i] {
            None => m
                .ttft
                .observe(&self.model, (now - self.start).as_secs_f64()),
            Some(t) => m.itl.observe(&self.model, (now - t).as_secs_f64()),
        }
        self.last[i] = Some(now);
    }

    /// Choice `i` finished.
    /// Choice `i` ended with `usage`.
    pub fn done(&mut self, i: usize, usage: &Usage, finish: FinishReason) {
        if let Some(c) = self.choices.get_mut(i) {
            c.2 = true;
        }
        let m = &self.metrics;
        let model = self.model.as_str();
        m.prompt_tokens.inc_by(&[model], usage.prompt_tokens as u64);
        m.generation_tokens
            .inc_by(&[model], usage.completion_tokens as u64);
        m.prefix_queries
            .inc_by(&[model], usage.prompt_tokens as u64);
        m.prefix_hits.inc_by(&[model], usage.cached_tokens as u64);
        let reason = match finish {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        };
        m.finished.inc_by(&[model, reason], 1);
        m.e2e.observe(model, self.start.elapsed().as_secs_f64());
        m.queue.observe(model, usage.queued_us as f64 / 1e6);
        self.governor.charge(&self.agent, self.limits, usage);
        self.usage.prompt_tokens += usage.prompt_tokens;
        self.usage.completion_tokens += usage.completion_tokens;
        self.usage.cached_tokens += usage.cached_tokens;
        self.usage.queued_us = self.usage.queued_us.max(usage.queued_us);
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        if !self.ran {
            return;
        }
        // Choices that never ended (a client that disconnected, an error): their prompt and
        // the tokens they sent still count against the agent's token limit and ledger.
        let (mut prompt, mut completion) = (0, 0);
        for &(p, sent, ended) in &self.choices {
            if !ended {
                prompt += p;
                completion += sent;
            }
        }
        if prompt + completion > 0 {
            let cut = Usage {
                prompt_tokens: prompt,
                completion_tokens: completion,
                ..Usage::default()
            };
            self.governor.charge(&self.agent, self.limits, &cut);
            self.usage.prompt_tokens += prompt;
            self.usage.completion_tokens += completion;
        }
        let u = &self.usage;
        let first = self.first.map(|t| (t - self.start).as_secs_f64() * 1e3);
        tracing::info!(
            request_id = %self.request_id,
            agent = %self.agent,
            model = %self.model,
            backend = "local",
            prompt_tokens = u.prompt_tokens,
            completion_tokens = u.completion_tokens,
            cached_tokens = u.cached_tokens,
            queue_ms = u.queued_us as f64 / 1e3,
            ttft_ms = first.unwrap_or(f64::NAN),
            total_ms = self.start.elapsed().as_secs_f64() * 1e3,
            "generation ended"
        );
    }
}

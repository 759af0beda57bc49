//! The `aios` command: `serve`, `models`, `chat`.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use aios::config::Config;
use aios::engine::{Event, GenRequest, SamplingParams};

#[derive(Parser)]
#[command(
    name = "aios",
    version,
    about = "An inference kernel for AI agents, speaking the OpenAI API"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the configured models over the OpenAI HTTP API.
    Serve(Common),
    /// List the configured models, whether their files are found, and models in the HF cache.
    Models(Common),
    /// Measure TTFT, inter-token latency and throughput of aios or any OpenAI-compatible server.
    Bench(BenchArgs),
    /// The CPU and the NVIDIA GPUs (through NVML) models can run on.
    Devices {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a fresh API key for agent NAME (`@admin` for the admin key) and the line that
    /// configures it; the key itself is not stored anywhere.
    Key {
        /// The agent the key is for, or `@admin`.
        name: String,
    },
    /// Chat with the default model in the terminal.
    Chat {
        #[command(flatten)]
        common: Common,
        /// Sampling temperature (0 = greedy).
        #[arg(long, default_value_t = 0.7)]
        temperature: f32,
        /// Most tokens per answer.
        #[arg(long, default_value_t = 512)]
        max_tokens: usize,
        /// A system prompt.
        #[arg(long)]
        system: Option<String>,
    },
}

#[derive(Args, Clone)]
struct BenchArgs {
    /// Server base URL (with or without /v1).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    /// Model name to request (default: the server's first listed model).
    #[arg(long)]
    model: Option<String>,
    /// Concurrency levels, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    concurrency: Vec<usize>,
    /// Requests per concurrency level.
    #[arg(long, default_value_t = 32)]
    requests: usize,
    /// Prompt length in random words (about 1.3 tokens each).
    #[arg(long, default_value_t = 100)]
    prompt_words: usize,
    /// Output tokens per request (EOS ignored where the server allows).
    #[arg(long, default_value_t = 64)]
    output_tokens: usize,
    /// Seed for the random prompts (default: a fresh one per run).
    #[arg(long)]
    seed: Option<u64>,
    /// Bearer token, if the server wants one (also from OPENAI_API_KEY).
    #[arg(long, env = "OPENAI_API_KEY")]
    api_key: Option<String>,
    /// Also write the reports as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Constrain every output: `json_object`, or the path of a JSON schema file.
    #[arg(long)]
    response_format: Option<String>,
}

#[derive(Args, Clone)]
struct Common {
    /// TOML config file (default: built-in defaults, which match config/default.toml).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// A configured model name, a .gguf file, a model directory or an HF repo id (serve it first).
    #[arg(long, short)]
    model: Option<String>,
    /// Address to listen on.
    #[arg(long)]
    host: Option<String>,
    /// Port to listen on (0 = any free port).
    #[arg(long)]
    port: Option<u16>,
    /// Compute threads (0 = one per core).
    #[arg(long)]
    threads: Option<usize>,
}

impl Common {
    fn config(&self) -> Result<Config> {
        let mut cfg = match &self.config {
            Some(p) => Config::load(p)?,
            None => Config::default(),
        };
        cfg.apply_env(|k| std::env::var(k).ok())?;
        if let Some(m) = &self.model {
            cfg.set_model(m);
        }
        if let Some(h) = &self.host {
            cfg.server.host = h.clone();
        }
        if let Some(p) = self.port {
            cfg.server.port = p;
        }
        if let Some(t) = self.threads {
            cfg.server.threads = t;
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

fn main() -> Result<()> {
    use std::io::IsTerminal;
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("AIOS_LOG").unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // AIOS_LOG_FORMAT=json: one JSON object per line, for log collectors.
    if std::env::var("AIOS_LOG_FORMAT").is_ok_and(|f| f == "json") {
        logs.json().init();
    } else {
        logs.with_ansi(std::io::stderr().is_terminal()).init();
    }
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Serve(c) => serve(c),
        Cmd::Devices { json } => {
            let r = aios::devices::discover();
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
                return Ok(());
            }
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            println!(
                "cpu     {} · {} cores · {:.1} GiB, {:.1} GiB available",
                r.cpu.model,
                r.cpu.cores,
                gib(r.cpu.memory_total_bytes),
                gib(r.cpu.memory_available_bytes)
            );
            for g in &r.gpus {
                let opt =
                    |v: Option<u32>, unit: &str| v.map_or("?".into(), |v| format!("{v}{unit}"));
                println!(
                    "cuda:{} {} · {:.1} GiB, {:.1} GiB free · {} busy · {}",
                    g.index,
                    g.name,
                    gib(g.memory_total_bytes),
                    gib(g.memory_free_bytes),
                    opt(g.utilization_gpu_percent, "%"),
                    opt(g.temperature_c, " °C")
                );
            }
            println!(
                "nvml    {}{}",
                r.nvml,
                r.driver_version
                    .map(|v| format!(" (driver {v})"))
                    .unwrap_or_default()
            );
            println!(
                "build   {}",
                if r.cuda_build {
                    "cpu + cuda"
                } else {
                    "cpu only (build with --features cuda for GPUs)"
                }
            );
            Ok(())
        }
        Cmd::Key { name } => {
            let key = aios::auth::new_key();
            let digest = aios::auth::digest_hex(&key);
            println!("key: {key}");
            println!("# for the key file (auth.key_file):");
            println!("{name} {digest}");
            if name == "@admin" {
                println!("# or in the config: [auth] admin_key_sha256 = \"{digest}\"");
            } else {
                println!("# or in the config: [agents.{name}] key_sha256 = \"{digest}\"");
            }
            Ok(())
        }
        Cmd::Models(c) => models(c.config()?),
        Cmd::Bench(b) => bench(b),
        Cmd::Chat {
            common,
            temperature,
            max_tokens,
            system,
        } => chat(common.config()?, temperature, max_tokens, system),
    }
}

fn serve(common: Common) -> Result<()> {
    let cfg = common.config()?;
    aios::init_process_threads(cfg.server.threads);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let keys = aios::auth::KeyTable::from_config(&cfg).map_err(anyhow::Error::msg)?;
        let kv_events = if cfg.kv_events.enabled {
            let instance = match cfg.kv_events.instance_id.as_str() {
                "" => hostname(),
                id => id.to_string(),
            };
            let gpu = cfg.models.iter().any(|m| m.device.starts_with("cuda"));
            let p = aios::kv_events::Publisher::start(
                &cfg.kv_events.endpoint,
                &instance,
                if gpu { "GPU" } else { "CPU" },
            )
            .await
            .map_err(anyhow::Error::msg)?;
            Some(std::sync::Arc::new(p))
        } else {
            None
        };
        let state = aios::start_loading(&cfg, kv_events.clone()).map_err(anyhow::Error::msg)?;
        {
            use aios::ops::quant::{isa, Isa};
            let paths: Vec<&str> = Isa::available().iter().map(|i| i.name()).collect();
            tracing::info!(
                "CPU kernels: {} (this CPU runs {}; AIOS_CPU_KERNELS picks one)",
                isa().name(),
                paths.join(", ")
            );
        }
        let _ = state
            .reload_source
            .set(Box::new(move || common.config().map_err(|e| format!("{e:#}"))));
        let server = aios::api::Server::start(
            state,
            &cfg.server.host,
            cfg.server.port,
            cfg.server.max_body_bytes,
        )
        .await
        .with_context(|| format!("binding {}:{}", cfg.server.host, cfg.server.port))?;
        // Tests and scripts read this line to find the port.
        println!("aios listening on http://{}", server.addr);
        if let Some(p) = &kv_events {
            println!("aios kv events on {}", p.endpoint);
        }
        std::io::stdout().flush().ok();
        if !keys.is_on() {
            if !server.addr.ip().is_loopback() && !cfg.auth.allow_unauthenticated {
                let addr = server.addr;
                server.stop(std::time::Duration::ZERO).await;
                bail!(
                    "refusing to listen on {addr} with no API key configured: set [auth] keys, or \
                     [auth] allow_unauthenticated = true to let anyone who reaches the port in"
                );
            }
            if server.addr.ip().is_loopback() {
                tracing::info!(
                    "no API keys configured: serving on loopback only; callers name their agent with X-Agent-Id"
                );
            } else {
                tracing::warn!(
                    "listening on {} without authentication (allow_unauthenticated): anyone who can reach it can use it",
                    server.addr
                );
            }
        }
        let state = server.state.clone();
        tokio::spawn(async move {
            #[cfg(unix)]
            {
                use tokio::signal::unix::{signal, SignalKind};
                let Ok(mut hup) = signal(SignalKind::hangup()) else {
                    return;
                };
                while hup.recv().await.is_some() {
                    if let Err(e) = state.reload() {
                        tracing::error!("reload on SIGHUP refused; the old configuration stays: {e}");
                    }
                }
            }
        });
        shutdown_signal().await;
        let grace = std::time::Duration::from_secs(server.state.live().config.limits.drain_secs);
        tracing::info!(
            "shutting down: refusing new requests, giving those in flight up to {}s",
            grace.as_secs()
        );
        server.stop(grace).await;
        Ok(())
    })
}

/// This machine's name (for the KV-event topic), else a random one.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("aios-{:08x}", rand::random::<u32>()))
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn bench(b: BenchArgs) -> Result<()> {
    if b.concurrency.is_empty()
        || b.concurrency.contains(&0)
        || b.requests == 0
        || b.output_tokens == 0
    {
        bail!("--concurrency levels, --requests and --output-tokens must be positive");
    }
    let cfg = aios::bench::BenchConfig {
        url: b.url,
        model: b.model,
        concurrency: b.concurrency,
        requests: b.requests,
        prompt_words: b.prompt_words,
        output_tokens: b.output_tokens,
        seed: b.seed.unwrap_or_else(rand::random),
        api_key: b.api_key,
        response_format: match b.response_format.as_deref() {
            None => None,
            Some("json_object") => Some(serde_json::json!({"type": "json_object"})),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading the JSON schema {path}"))?;
                let schema: serde_json::Value =
                    serde_json::from_str(&text).with_context(|| format!("{path} is not JSON"))?;
                Some(serde_json::json!({"type": "json_schema",
                    "json_schema": {"name": "bench", "schema": schema}}))
            }
        },
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let reports = rt.block_on(aios::bench::run(&cfg))?;
    println!(
        "{} requests per level, ~{} prompt words, {} output tokens, seed {}",
        cfg.requests, cfg.prompt_words, cfg.output_tokens, cfg.seed
    );
    print!("{}", aios::bench::table(&reports));
    if let Some(path) = b.json {
        std::fs::write(&path, serde_json::to_string_pretty(&reports)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn models(cfg: Config) -> Result<()> {
    println!("configured models (the first is the default):");
    for m in &cfg.models {
        let found = match aios::model::resolve::resolve(&m.path) {
            Ok(p) => format!("found: {}", p.display()),
            Err(e) => format!("NOT FOUND: {e}"),
        };
        let aliases = if m.aliases.is_empty() {
            String::new()
        } else {
            format!(" (aliases: {})", m.aliases.join(", "))
        };
        println!("  {}{aliases}\n    path: {}\n    {found}", m.name, m.path);
    }
    let cache = aios::model::resolve::hf_cache();
    let repos = aios::model::resolve::list_hf_cache(&cache);
    println!("Hugging Face cache ({}):", cache.path().display());
    if repos.is_empty() {
        println!("  (no models)");
    }
    for r in repos {
        println!("  {r}");
    }
    Ok(())
}

fn chat(cfg: Config, temperature: f32, max_tokens: usize, system: Option<String>) -> Result<()> {
    aios::init_process_threads(cfg.server.threads);
    let m = &cfg.models[0];
    eprintln!("loading {} ...", m.path);
    let loaded = aios::load_configured(m).map_err(anyhow::Error::msg)?;
    let engine = aios::engine::spawn(loaded, cfg.engine_config());
    let info = engine.model.clone();
    let Some(template) = info.template.as_ref() else {
        bail!("model '{}' has no chat template", m.name);
    };
    let mut messages = vec![];
    if let Some(s) = system {
        messages.push(serde_json::json!({"role": "system", "content": s}));
    }
    eprintln!("chatting with {} — an empty line or Ctrl-D quits", m.name);
    let stdin = std::io::stdin();
    loop {
        print!("> ");
        std::io::stdout().flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            return Ok(());
        }
        messages.push(serde_json::json!({"role": "user", "content": line.trim_end()}));
        let prompt_text = template.render(&messages, None, true)?;
        let prompt = info.tokenizer.encode(&prompt_text, true)?;
        if prompt.len() + 1 >= info.context_length {
            bail!(
                "the conversation no longer fits the context ({} tokens)",
                info.context_length
            );
        }
        let req = GenRequest {
            max_tokens: max_tokens.min(info.context_length - prompt.len()),
            prompt,
            sampling: SamplingParams {
                temperature,
                top_p: 0.95,
                ..Default::default()
            },
            stop: vec![],
            stop_token_ids: vec![],
            ignore_eos: false,
            agent: "terminal".into(),
            priority: 0,
            context: None,
            constraint: None,
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        engine.submit(req, tx).map_err(anyhow::Error::msg)?;
        let mut answer = String::new();
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                Event::Token { text, .. } => {
                    print!("{text}");
                    answer.push_str(&text);
                }
                Event::Done { text, .. } => {
                    print!("{text}");
                    answer.push_str(&text);
                    break;
                }
                Event::Error(e) => bail!(e),
            }
            std::io::stdout().flush()?;
        }
        println!();
        messages.push(serde_json::json!({"role": "assistant", "content": answer}));
    }
}

//! One typed configuration (TOML), its defaults, environment overrides and validation.
//! `config/default.toml` documents every field.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The default model: SmolLM2-135M-Instruct (Q4_1), fetched by `scripts/fetch-model.sh`.
pub const DEFAULT_MODEL_PATH: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
/// The default embedding model: all-MiniLM-L6-v2, fetched by `scripts/fetch-model.sh`.
pub const DEFAULT_EMBEDDING_PATH: &str = "models/all-MiniLM-L6-v2";
pub const DEFAULT_MODEL_NAME: &str = "smollm2";

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub engine: EngineSection,
    pub kv: KvSection,
    /// Named agents: `[agents.NAME] priority = N`.
    pub agents: std::collections::BTreeMap<String, AgentConfig>,
    pub models: Vec<ModelConfig>,
    pub embeddings: EmbeddingsSection,
    pub memory: MemorySection,
    pub auth: AuthSection,
    pub limits: LimitsSection,
    pub kv_events: KvEventsSection,
    /// Remote OpenAI-compatible backends models may spill over to: `[[providers]]`.
    pub providers: Vec<ProviderConfig>,
    /// The exact-match response cache.
    pub cache: CacheSection,
}

/// Answers to repeated deterministic requests (temperature 0, `top_k = 1` or a fixed seed),
/// kept per agent and served again without running the model or calling a provider.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSection {
    pub enabled: bool,
    /// Seconds an answer stays servable after it was stored.
    pub ttl_secs: u64,
    /// Most answers kept; past it (or past `max_bytes`) the least recently used go first.
    pub max_entries: usize,
    /// Most bytes of answers (their JSON) kept.
    pub max_bytes: usize,
}

impl Default for CacheSection {
    fn default() -> Self {
        Self {
            enabled: false,
            ttl_secs: 300,
            max_entries: 1024,
            max_bytes: 64 << 20,
        }
    }
}

/// A remote backend speaking the OpenAI API (OpenAI, Groq, DeepSeek, vLLM, Ollama, another aios).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub name: String,
    /// `openai` (any OpenAI-compatible API) or `anthropic` (the Messages API, translated).
    #[serde(default = "default_provider_kind")]
    pub kind: String,
    /// The API root, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// The environment variable holding the API key (the key itself is never in the config).
    #[serde(default)]
    pub api_key_env: String,
    /// Our model name → the provider's (a model not listed keeps its name).
    #[serde(default)]
    pub models: std::collections::BTreeMap<String, String>,
    /// Seconds a whole answer may take (retries and rate-limit waits included); a stream has
    /// no total limit but may not stall longer than this between bytes.
    #[serde(default = "default_provider_timeout")]
    pub timeout_secs: u64,
    /// Requests in flight to this provider, at most (0: no limit).
    #[serde(default)]
    pub max_concurrency: usize,
    /// Token buckets; past them requests wait (up to the timeout) rather than fail.
    #[serde(default)]
    pub requests_per_minute: u32,
    #[serde(default)]
    pub tokens_per_minute: u64,
    /// Retries of a failed call (connection errors, 429, 5xx), with backoff or `Retry-After`.
    #[serde(default = "default_provider_retries")]
    pub max_retries: u32,
    /// After this many failed calls in a row the provider rests for `cooldown_secs`.
    #[serde(default = "default_provider_cooldown_after")]
    pub cooldown_after_failures: u32,
    #[serde(default = "default_provider_cooldown")]
    pub cooldown_secs: u64,
    /// US dollars per million input and output tokens, for the cost ledger.
    #[serde(default)]
    pub price_input_per_mtok: f64,
    #[serde(default)]
    pub price_output_per_mtok: f64,
}

fn default_provider_kind() -> String {
    "openai".into()
}
fn default_provider_timeout() -> u64 {
    60
}
fn default_provider_retries() -> u32 {
    2
}
fn default_provider_cooldown_after() -> u32 {
    3
}
fn default_provider_cooldown() -> u64 {
    30
}

/// Prefix-cache changes published in vLLM's KV-event format (ZeroMQ PUB), for routers.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KvEventsSection {
    pub enabled: bool,
    /// `tcp://HOST:PORT`; `*` binds every interface, port 0 any free port.
    pub endpoint: String,
    /// This replica's name in the topic `kv@<instance-id>@<model>` (default: the host name).
    pub instance_id: String,
}

impl Default for KvEventsSection {
    fn default() -> Self {
        Self {
            enabled: false,
            endpoint: "tcp://*:5557".into(),
            instance_id: String::new(),
        }
    }
}

/// Who may call: API keys (stored as SHA-256 digests) decide the agent identity.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    /// SHA-256 (hex) of the admin key: admin routes (`/admin/*`), and acting as any agent.
    pub admin_key_sha256: String,
    /// A file of keys, one `NAME SHA256HEX` per line (`@admin` names the admin key; `#`
    /// comments). `aios key NAME` prints a fresh key and its line.
    pub key_file: String,
    /// Serve beyond loopback with no key configured (anyone who reaches the port is any agent).
    pub allow_unauthenticated: bool,
}

/// Limits for every agent (an agent's own section may override the per-agent ones) and for the
/// server as a whole. 0 means no limit.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Requests an agent may start per minute (429 with Retry-After past it).
    pub requests_per_minute: u32,
    /// Prompt and output tokens an agent may use per minute.
    pub tokens_per_minute: u64,
    /// Generation requests (streamed or not) an agent may have in flight at once.
    pub max_streams: u32,
    /// Largest share of a model's KV pool one request of an agent may need (0 to 1).
    pub max_kv_share: f64,
    /// US dollars an agent may spend on remote backends (0: no limit); then no spill-over.
    pub cloud_budget_usd: f64,
    /// Longest prompt accepted, in tokens, whatever the model's context.
    pub max_prompt_tokens: usize,
    /// A request still running after this many seconds is ended (504, or an error event).
    pub request_timeout_secs: u64,
    /// Largest total size of a request's headers, in bytes (431 above it).
    pub max_header_bytes: usize,
    /// On SIGTERM, how long in-flight requests may run before the server stops anyway.
    pub drain_secs: u64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            requests_per_minute: 0,
            tokens_per_minute: 0,
            max_streams: 0,
            max_kv_share: 1.0,
            cloud_budget_usd: 0.0,
            max_prompt_tokens: 0,
            request_timeout_secs: 600,
            max_header_bytes: 16 * 1024,
            drain_secs: 30,
        }
    }
}

/// Per-agent long-term memory (`/v1/memories`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MemorySection {
    /// The SQLite file; empty turns memory off.
    pub path: String,
}

impl Default for MemorySection {
    fn default() -> Self {
        Self {
            path: "data/memory.sqlite".into(),
        }
    }
}

/// The model behind `/v1/embeddings`: a sentence-transformers folder (BERT).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddingsSection {
    /// The name clients use in `"model"`.
    pub name: String,
    /// The model folder; empty turns embeddings off.
    pub path: String,
}

impl Default for EmbeddingsSection {
    fn default() -> Self {
        Self {
            name: "all-minilm-l6-v2".into(),
            path: DEFAULT_EMBEDDING_PATH.into(),
        }
    }
}

/// What the configuration says of one agent (the `X-Agent-Id` it sends).
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Priority under the `priority` policy when a request has no `X-Priority` header.
    pub priority: i32,
    /// SHA-256 (hex) of this agent's API key.
    pub key_sha256: String,
    /// This agent's own limits, instead of `[limits]`.
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
    pub max_streams: Option<u32>,
    pub max_kv_share: Option<f64>,
    pub cloud_budget_usd: Option<f64>,
}

/// The KV pool of each model: fixed 16-token blocks allocated once, from `bytes` when set,
/// else from `memory_fraction` of the memory available at start.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KvSection {
    pub bytes: u64,
    pub memory_fraction: f64,
    /// `swap` (to host memory and back) or `recompute` (prefill again).
    pub preemption: crate::engine::Preemption,
    /// Reuse the KV of earlier sequences' identical prefixes (whole blocks).
    pub prefix_cache: bool,
    /// Host memory for the KV of idle contexts pushed out of the pool (the host tier).
    pub host_bytes: u64,
    /// Directory for context snapshots (the disk tier, one subdirectory per model); empty for
    /// none. Snapshots there survive a restart.
    pub disk_dir: String,
    /// Most bytes of snapshots in the disk tier.
    pub disk_bytes: u64,
    /// Pool memory committed at start (in the background) rather than on first use; past it,
    /// the next 512 MB are committed in the background before use reaches them.
    pub prefault_bytes: u64,
    /// How KV rows are stored: `f16` (default) or `q8` (8-bit with a scale per row: half the
    /// memory and memory traffic, answers within rounding of f16's).
    pub dtype: crate::kv::KvDtype,
}

impl Default for KvSection {
    fn default() -> Self {
        Self {
            bytes: 0,
            memory_fraction: 0.25,
            preemption: crate::engine::Preemption::Swap,
            prefix_cache: true,
            host_bytes: 4 << 30,
            disk_dir: String::new(),
            disk_bytes: 64 << 30,
            prefault_bytes: 1 << 30,
            dtype: Default::default(),
        }
    }
}

impl KvSection {
    pub fn budget(&self) -> crate::engine::KvBudget {
        if self.bytes > 0 {
            crate::engine::KvBudget::Bytes(self.bytes)
        } else {
            crate::engine::KvBudget::FractionOfFree(self.memory_fraction)
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EngineSection {
    /// Most tokens one engine step feeds the model (decode tokens first, then prompt chunks).
    pub max_batched_tokens: usize,
    /// Most sequences served per step; the policy chooses when more are live.
    pub max_running: usize,
    /// Most sequences waiting beyond max_running; past it requests get 503 with Retry-After.
    pub max_queued: usize,
    /// fifo, round_robin, priority, sjf or fair.
    pub policy: crate::engine::PolicyKind,
    /// Tokens per agent turn under round_robin.
    pub round_robin_quantum: usize,
    /// Seconds of waiting worth one priority level (priority) or halving a job's length (sjf).
    pub aging_secs: f64,
}

impl Default for EngineSection {
    fn default() -> Self {
        let d = crate::engine::EngineConfig::default();
        Self {
            max_batched_tokens: d.max_batched_tokens,
            max_running: d.max_running,
            max_queued: d.max_queued,
            policy: d.policy,
            round_robin_quantum: d.policy_params.quantum,
            aging_secs: d.policy_params.aging_secs,
        }
    }
}

impl Config {
    /// What the engine of each model runs with.
    pub fn engine_config(&self) -> crate::engine::EngineConfig {
        let e = &self.engine;
        crate::engine::EngineConfig {
            max_batched_tokens: e.max_batched_tokens,
            max_running: e.max_running,
            max_queued: e.max_queued,
            policy: e.policy,
            policy_params: crate::engine::PolicyParams {
                quantum: e.round_robin_quantum,
                aging_secs: e.aging_secs,
            },
            kv: self.kv.budget(),
            preemption: self.kv.preemption,
            prefix_cache: self.kv.prefix_cache,
            host_bytes: self.kv.host_bytes,
            snapshot_dir: None,
            disk_bytes: self.kv.disk_bytes,
            prefault_bytes: self.kv.prefault_bytes,
            kv_dtype: self.kv.dtype,
            agent_priority: std::sync::Arc::new(
                self.agents
                    .iter()
                    .map(|(name, a)| (name.clone(), a.priority))
                    .collect(),
            ),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on. Loopback by default.
    pub host: String,
    /// TCP port; 0 picks a free one (the address is printed at start).
    pub port: u16,
    /// Compute threads for the model; 0 means one per CPU core.
    pub threads: usize,
    /// Largest request body accepted, in bytes (413 above it).
    pub max_body_bytes: usize,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The name clients put in `"model"`.
    pub name: String,
    /// Other names accepted for this model.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// A `.gguf` file, a model directory, or a Hugging Face repo id in the local cache.
    pub path: String,
    /// A `tokenizer.json` to use instead of the model's own vocabulary.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// A Jinja file to use instead of the model's own chat template.
    #[serde(default)]
    pub chat_template: Option<PathBuf>,
    /// Serve at most this many tokens per sequence (default: the model's limit).
    #[serde(default)]
    pub context_length: Option<usize>,
    /// `cpu`, `cuda:N` or `auto`.
    #[serde(default = "default_device")]
    pub device: String,
    /// This model's scheduling policy, instead of `[engine] policy`.
    #[serde(default)]
    pub policy: Option<crate::engine::PolicyKind>,
    /// Providers (by name) to spill over to, in order, when this model cannot take a request.
    #[serde(default)]
    pub fallbacks: Vec<String>,
    /// Spill over when the predicted wait in the local queue is longer than this (0: only
    /// when the local engine refuses or fails).
    #[serde(default)]
    pub max_queue_ms: u64,
}

fn default_device() -> String {
    "cpu".into()
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8000,
            threads: 0,
            max_body_bytes: 4 * 1024 * 1024,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::default(),
            engine: EngineSection::default(),
            kv: KvSection::default(),
            agents: Default::default(),
            models: vec![ModelConfig::for_path(
                DEFAULT_MODEL_NAME,
                DEFAULT_MODEL_PATH,
            )],
            embeddings: EmbeddingsSection::default(),
            memory: MemorySection::default(),
            auth: AuthSection::default(),
            limits: LimitsSection::default(),
            kv_events: KvEventsSection::default(),
            providers: Vec::new(),
            cache: CacheSection::default(),
        }
    }
}

impl ModelConfig {
    pub fn for_path(name: &str, path: &str) -> Self {
        Self {
            name: name.into(),
            aliases: vec![],
            path: path.into(),
            tokenizer: None,
            chat_template: None,
            context_length: None,
            device: default_device(),
            policy: None,
            fallbacks: Vec::new(),
            max_queue_ms: 0,
        }
    }
}

/// A configuration problem, naming the field.
#[derive(Debug, thiserror::Error)]
#[error("config: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Parse TOML text (missing fields take their defaults).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError(e.to_string()))
    }

    /// Read a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        Self::from_toml(&text).map_err(|e| ConfigError(format!("{}: {}", path.display(), e.0)))
    }

    /// Apply `AIOS_*` environment overrides (`AIOS_HOST`, `AIOS_PORT`, `AIOS_THREADS`,
    /// `AIOS_MAX_BODY_BYTES`, `AIOS_MODEL`).
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        fn num<T: std::str::FromStr>(key: &str, v: String) -> Result<T, ConfigError> {
            v.parse()
                .map_err(|_| ConfigError(format!("{key}={v:?} is not a valid number")))
        }
        if let Some(v) = get("AIOS_HOST") {
            self.server.host = v;
        }
        if let Some(v) = get("AIOS_PORT") {
            self.server.port = num("AIOS_PORT", v)?;
        }
        if let Some(v) = get("AIOS_THREADS") {
            self.server.threads = num("AIOS_THREADS", v)?;
        }
        if let Some(v) = get("AIOS_MAX_BODY_BYTES") {
            self.server.max_body_bytes = num("AIOS_MAX_BODY_BYTES", v)?;
        }
        if let Some(v) = get("AIOS_MODEL") {
            self.set_model(&v);
        }
        if let Some(v) = get("AIOS_ADMIN_KEY") {
            self.auth.admin_key_sha256 = crate::auth::digest_hex(v.trim());
        }
        Ok(())
    }

    /// Serve `spec` (a configured name or alias, or a path / repo id) as the first model.
    pub fn set_model(&mut self, spec: &str) {
        if let Some(i) = self
            .models
            .iter()
            .position(|m| m.name == spec || m.aliases.iter().any(|a| a == spec))
        {
            let m = self.models.remove(i);
            self.models.insert(0, m);
            return;
        }
        let stem = Path::new(spec)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| spec.to_string());
        let mut m = ModelConfig::for_path(&stem, spec);
        let repo = spec.split(':').next().unwrap_or(spec);
        if !Path::new(spec).exists() && crate::model::resolve::looks_like_repo_id(repo) {
            m.name = spec.to_string(); // a repo id names itself
        }
        if spec == DEFAULT_MODEL_PATH {
            m.aliases.push(DEFAULT_MODEL_NAME.into());
        }
        self.models.insert(0, m);
    }

    /// Check every field; the message names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if s.host.trim().is_empty() {
            return Err(ConfigError("server.host must not be empty".into()));
        }
        if s.threads > 1024 {
            return Err(ConfigError(format!(
                "server.threads = {} is too large",
                s.threads
            )));
        }
        if s.max_body_bytes < 1024 {
            return Err(ConfigError(format!(
                "server.max_body_bytes = {} is below the minimum of 1024",
                s.max_body_bytes
            )));
        }
        if self.engine.max_batched_tokens < 16 {
            return Err(ConfigError(format!(
                "engine.max_batched_tokens = {} is below the minimum of 16",
                self.engine.max_batched_tokens
            )));
        }
        if self.engine.max_running == 0 || self.engine.round_robin_quantum == 0 {
            return Err(ConfigError(
                "engine.max_running and engine.round_robin_quantum must be positive".into(),
            ));
        }
        if self.engine.aging_secs.is_nan() || self.engine.aging_secs <= 0.0 {
            return Err(ConfigError(format!(
                "engine.aging_secs = {} must be positive",
                self.engine.aging_secs
            )));
        }
        let f = self.kv.memory_fraction;
        if f.is_nan() || f <= 0.0 || f > 0.95 {
            return Err(ConfigError(format!(
                "kv.memory_fraction = {f} must be above 0 and at most 0.95"
            )));
        }
        let shares = std::iter::once(("limits".to_string(), Some(self.limits.max_kv_share))).chain(
            self.agents
                .iter()
                .map(|(n, a)| (format!("agents.{n}"), a.max_kv_share)),
        );
        for (at, share) in shares {
            if let Some(f) = share {
                if f.is_nan() || f <= 0.0 || f > 1.0 {
                    return Err(ConfigError(format!(
                        "{at}.max_kv_share = {f} must be above 0 and at most 1"
                    )));
                }
            }
        }
        if self.cache.enabled
            && (self.cache.ttl_secs == 0
                || self.cache.max_entries == 0
                || self.cache.max_bytes == 0)
        {
            return Err(ConfigError(
                "cache.ttl_secs, cache.max_entries and cache.max_bytes must be positive when the cache is enabled".into(),
            ));
        }
        crate::auth::KeyTable::from_config(self).map_err(ConfigError)?;
        let mut providers = std::collections::HashSet::new();
        for (i, p) in self.providers.iter().enumerate() {
            if p.name.trim().is_empty() || !providers.insert(p.name.as_str()) {
                return Err(ConfigError(format!(
                    "providers[{i}].name {:?} is empty or used twice",
                    p.name
                )));
            }
            if p.kind != "openai" && p.kind != "anthropic" {
                return Err(ConfigError(format!(
                    "providers[{i}].kind {:?} is not one of openai, anthropic",
                    p.kind
                )));
            }
            if !(p.base_url.starts_with("http://") || p.base_url.starts_with("https://")) {
                return Err(ConfigError(format!(
                    "providers[{i}].base_url {:?} must start with http:// or https://",
                    p.base_url
                )));
            }
        }
        for m in &self.models {
            if let Some(f) = m.fallbacks.iter().find(|f| !providers.contains(f.as_str())) {
                return Err(ConfigError(format!(
                    "models '{}': fallback {f:?} is not a configured provider",
                    m.name
                )));
            }
        }
        if self.models.is_empty() {
            return Err(ConfigError(
                "models: at least one model must be configured".into(),
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, m) in self.models.iter().enumerate() {
            if m.name.trim().is_empty() {
                return Err(ConfigError(format!("models[{i}].name must not be empty")));
            }
            if m.path.trim().is_empty() {
                return Err(ConfigError(format!("models[{i}].path must not be empty")));
            }
            for n in std::iter::once(&m.name).chain(&m.aliases) {
                if !names.insert(n.clone()) {
                    return Err(ConfigError(format!(
                        "models[{i}]: the name {n:?} is used by two models"
                    )));
                }
            }
            if m.context_length == Some(0) {
                return Err(ConfigError(format!(
                    "models[{i}].context_length must be positive"
                )));
            }
            crate::devices::DeviceChoice::parse(&m.device)
                .map_err(|e| ConfigError(format!("models[{i}].device: {e}")))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_default_toml_equals_builtin_defaults() {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml"),
        )
        .unwrap();
        let cfg = Config::from_toml(&text).unwrap();
        let mut want = Config::default();
        want.models[0].context_length = cfg.models[0].context_length;
        assert_eq!(cfg.server, want.server);
        assert_eq!(cfg.engine, want.engine);
        assert_eq!(cfg.models[0].name, want.models[0].name);
        assert_eq!(cfg.models[0].path, want.models[0].path);
        assert_eq!(cfg.cache, want.cache);
        cfg.validate().unwrap();
    }

    #[test]
    fn errors_name_the_field() {
        let e = Config::from_toml("[server]\nport = \"x\"").unwrap_err().0;
        assert!(e.contains("port"), "{e}");
        let e = Config::from_toml("[engine]\npolicy = \"lottery\"")
            .unwrap_err()
            .0;
        assert!(e.contains("policy") && e.contains("lottery"), "{e}");
        let e = Config::from_toml("[server]\nprot = 1").unwrap_err().0;
        assert!(e.contains("prot"), "{e}");
        let mut c = Config::default();
        c.server.max_body_bytes = 10;
        assert!(c
            .validate()
            .unwrap_err()
            .0
            .contains("server.max_body_bytes"));
        let mut c = Config::default();
        c.models.push(c.models[0].clone());
        assert!(c.validate().unwrap_err().0.contains("models[1]"));
        let mut c = Config::default();
        c.models[0].device = "tpu".into();
        assert!(c.validate().unwrap_err().0.contains("models[0].device"));
    }

    #[test]
    fn env_overrides_apply_and_are_checked() {
        let mut c = Config::default();
        let env = |k: &str| match k {
            "AIOS_PORT" => Some("9001".to_string()),
            "AIOS_MODEL" => Some("/tmp/x/other.gguf".to_string()),
            _ => None,
        };
        c.apply_env(env).unwrap();
        assert_eq!(c.server.port, 9001);
        assert_eq!(c.models[0].name, "other");
        assert_eq!(c.models[0].path, "/tmp/x/other.gguf");
        let bad = |k: &str| (k == "AIOS_PORT").then(|| "eighty".to_string());
        assert!(Config::default()
            .apply_env(bad)
            .unwrap_err()
            .0
            .contains("AIOS_PORT"));
    }
}

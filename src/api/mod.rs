//! The HTTP layer: OpenAI-compatible routes on axum. It parses and checks requests, finds the
//! model's engine, and streams the engine's events back; it never touches tensors.

mod admin;
mod aios;
pub mod cache;
mod cached;
mod chat;
mod completions;
mod contexts;
mod embeddings;
pub mod error;
mod gate;
mod generate;
mod memories;
mod params;
mod spill;
mod structured;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::json;

use crate::engine::EngineHandle;
use error::ApiError;

/// Marks responses from this build (OpenAI's `system_fingerprint`).
pub const FINGERPRINT: &str = concat!("aios-", env!("CARGO_PKG_VERSION"));

/// A configured model and how far its loading got.
pub struct ModelSlot {
    pub name: String,
    pub aliases: Vec<String>,
    pub created: u64,
    pub state: RwLock<SlotState>,
}

pub enum SlotState {
    Loading,
    Ready(EngineHandle),
    Failed(String),
}

pub struct AppState {
    /// The first model is the default one.
    pub models: Vec<ModelSlot>,
    /// The embedding model, loading in the background like the others.
    pub embeddings: RwLock<EmbedSlot>,
    /// Long-term memory; None when off.
    pub memory: Option<Arc<crate::memory::MemoryStore>>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Every agent's limits state and usage.
    pub governor: Arc<crate::limits::Governor>,
    /// What a reload may change: keys, limits, agents, policies.
    live: RwLock<Arc<Live>>,
    /// Re-reads the configuration for a reload (set by the command line that started us).
    pub reload_source: std::sync::OnceLock<ConfigSource>,
    /// Set on SIGTERM: new requests get 503 and `/health` turns unready.
    pub draining: std::sync::atomic::AtomicBool,
    /// Requests in flight, bodies included; `idle` is notified when it drops to zero.
    pub inflight: std::sync::atomic::AtomicUsize,
    pub idle: tokio::sync::Notify,
    /// The KV-event publisher, when on.
    pub kv_events: Option<Arc<crate::kv_events::Publisher>>,
    /// Each model's spill-over: its providers in order, and the queue wait that triggers it.
    pub fallbacks: std::collections::HashMap<String, ModelFallback>,
    /// Answers to deterministic requests (`[cache]`, whose settings are read per request).
    pub cache: Arc<cache::ResponseCache>,
}

/// Where a model's requests go when the local engine cannot take them.
#[derive(Clone)]
pub struct ModelFallback {
    pub providers: Vec<Arc<crate::providers::Provider>>,
    pub max_queue_ms: u64,
}

/// How to read the configuration again (file, environment, command line), validated.
pub type ConfigSource = Box<dyn Fn() -> Result<crate::config::Config, String> + Send + Sync>;

/// The part of the configuration a reload replaces.
pub struct Live {
    pub config: crate::config::Config,
    pub keys: crate::auth::KeyTable,
    pub limits: crate::limits::Limits,
}

impl Live {
    pub fn new(config: crate::config::Config) -> Result<Self, String> {
        Ok(Self {
            keys: crate::auth::KeyTable::from_config(&config)?,
            limits: crate::limits::Limits::from_config(&config),
            config,
        })
    }
}

/// Where the embedding model stands.
pub enum EmbedSlot {
    Off,
    Loading,
    Ready(Arc<crate::embed::Embedder>),
    Failed(String),
}

impl AppState {
    /// State for `cfg` with these model slots (loading or not).
    pub fn new(
        cfg: &crate::config::Config,
        models: Vec<ModelSlot>,
        embeddings: EmbedSlot,
        memory: Option<Arc<crate::memory::MemoryStore>>,
        kv_events: Option<Arc<crate::kv_events::Publisher>>,
    ) -> Result<Self, String> {
        Ok(Self {
            models,
            embeddings: RwLock::new(embeddings),
            memory,
            metrics: Arc::new(crate::metrics::Metrics::new()),
            governor: Arc::default(),
            live: RwLock::new(Arc::new(Live::new(cfg.clone())?)),
            reload_source: std::sync::OnceLock::new(),
            draining: Default::default(),
            inflight: Default::default(),
            idle: tokio::sync::Notify::new(),
            kv_events,
            fallbacks: Self::fallbacks(cfg)?,
            cache: Arc::default(),
        })
    }

    fn fallbacks(
        cfg: &crate::config::Config,
    ) -> Result<std::collections::HashMap<String, ModelFallback>, String> {
        let mut providers = std::collections::HashMap::new();
        for p in &cfg.providers {
            providers.insert(
                p.name.clone(),
                Arc::new(crate::providers::Provider::new(p.clone())?),
            );
        }
        Ok(cfg
            .models
            .iter()
            .filter(|m| !m.fallbacks.is_empty())
            .map(|m| {
                let list = m
                    .fallbacks
                    .iter()
                    .filter_map(|f| providers.get(f).cloned())
                    .collect();
                let fb = ModelFallback {
                    providers: list,
                    max_queue_ms: m.max_queue_ms,
                };
                (m.name.clone(), fb)
            })
            .collect())
    }

    /// The keys, limits and settings in force now.
    pub fn live(&self) -> Arc<Live> {
        self.live.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_live(&self, live: Live) {
        *self.live.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(live);
    }

    /// Every model that is ready, with its engine.
    pub fn ready_engines(&self) -> Vec<(String, EngineHandle)> {
        self.models
            .iter()
            .filter_map(
                |m| match &*m.state.read().unwrap_or_else(|p| p.into_inner()) {
                    SlotState::Ready(h) => Some((m.name.clone(), h.clone())),
                    _ => None,
                },
            )
            .collect()
    }

    /// The configured model a request names (`None`: the default model), aliases resolved.
    pub fn slot(&self, name: Option<&str>) -> Option<&ModelSlot> {
        match name {
            None | Some("") => self.models.first(),
            Some(n) => self
                .models
                .iter()
                .find(|m| m.name == n || m.aliases.iter().any(|a| a == n)),
        }
    }

    /// The engine for the requested model name (`None`: the default model). A model that is
    /// loading or failed to load is an error the model's fallbacks may take over.
    pub fn engine_for(&self, name: Option<&str>) -> Result<(String, EngineHandle), ApiError> {
        let slot = self
            .slot(name)
            .ok_or_else(|| ApiError::model_not_found(name.unwrap_or("")))?;
        let state = slot.state.read().unwrap_or_else(|p| p.into_inner());
        let mut e = match &*state {
            SlotState::Ready(h) => return Ok((slot.name.clone(), h.clone())),
            SlotState::Loading => {
                ApiError::unavailable(format!("model '{}' is still loading", slot.name))
            }
            SlotState::Failed(e) => {
                ApiError::unavailable(format!("model '{}' failed to load: {e}", slot.name))
            }
        };
        e.local_capacity = true;
        Err(e)
    }
}

/// Parse a chat or completion request body as the handlers do, up to the point where a model
/// is needed: JSON, generation parameters, messages, response format, tools. The request
/// fuzz target's way in; the error is the message a client would get.
#[doc(hidden)]
pub fn parse_request_body(bytes: &[u8]) -> Result<(), String> {
    let run = || -> Result<(), ApiError> {
        let b = params::Body::parse(bytes)?;
        let keys = ["max_completion_tokens", "max_tokens"];
        params::GenParams::read(&b, &axum::http::HeaderMap::new(), &keys)?;
        if b.get("messages").is_some() {
            chat::read_messages(&b)?;
        }
        structured::response_schema(&b)?;
        structured::Tools::read(&b)?;
        Ok(())
    };
    run().map_err(|e| e.message)
}

/// The routes, with the body size limit applied.
pub fn router(state: Arc<AppState>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/chat/completions/render", post(chat::render))
        .route("/v1/completions/render", post(completions::render))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/health", get(health))
        .route("/v1/contexts", post(contexts::create).get(contexts::list))
        .route(
            "/v1/contexts/{id}",
            get(contexts::get).delete(contexts::delete),
        )
        .route("/v1/contexts/{id}/fork", post(contexts::fork))
        .route("/v1/contexts/{id}/snapshot", post(contexts::snapshot))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/query", post(aios::query))
        .route("/core/llms/list", get(aios::llms_list))
        .route("/v1/memories", post(memories::create).get(memories::list))
        .route("/v1/memories/search", post(memories::search_route))
        .route("/metrics", get(admin::metrics))
        .route("/v1/usage", get(admin::own_usage))
        .route("/v1/devices", get(admin::devices))
        .route("/admin/usage", get(admin::all_usage))
        .route("/admin/reload", post(admin::reload))
        .route(
            "/v1/memories/{id}",
            get(memories::get)
                .patch(memories::patch)
                .delete(memories::delete),
        )
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(axum::middleware::map_response(json_errors))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            gate::gate,
        ))
        .with_state(state)
}

/// Errors raised by axum itself (body too large, wrong method) become OpenAI error JSON.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| {
            v.as_bytes().starts_with(b"application/json")
                || v.as_bytes().starts_with(b"text/event-stream")
        });
    if status.is_success() || is_json {
        return resp;
    }
    let message = match status {
        StatusCode::PAYLOAD_TOO_LARGE => {
            "request body is larger than the configured limit".to_string()
        }
        StatusCode::METHOD_NOT_ALLOWED => "method not allowed on this route".to_string(),
        s => s.canonical_reason().unwrap_or("error").to_string(),
    };
    ApiError::new(status, "invalid_request_error", message).into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "no such route",
    )
}

fn model_json(m: &ModelSlot) -> serde_json::Value {
    let state = m.state.read().unwrap_or_else(|p| p.into_inner());
    let mut v = json!({"id": m.name, "object": "model", "created": m.created, "owned_by": "aios"});
    if let SlotState::Ready(h) = &*state {
        v["max_model_len"] = json!(h.model.context_length);
    }
    v
}

async fn list_models(State(state): State<Arc<AppState>>) -> Response {
    let data: Vec<_> = state.models.iter().map(model_json).collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn get_model(
    State(state): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    match state
        .models
        .iter()
        .find(|m| m.name == id || m.aliases.contains(&id))
    {
        Some(m) => axum::Json(model_json(m)).into_response(),
        None => ApiError::model_not_found(&id).into_response(),
    }
}

/// 200 when every model is ready, 503 while any is loading or failed.
async fn health(State(state): State<Arc<AppState>>) -> Response {
    let mut status = "ok";
    let mut models = serde_json::Map::new();
    let mut kv = serde_json::Map::new();
    for m in &state.models {
        let s = match &*m.state.read().unwrap_or_else(|p| p.into_inner()) {
            SlotState::Ready(h) => {
                kv.insert(m.name.clone(), json!(h.kv_usage()));
                json!("ready")
            }
            SlotState::Loading => {
                status = "loading";
                json!("loading")
            }
            SlotState::Failed(e) => {
                status = if status == "ok" { "error" } else { status };
                json!({"error": e})
            }
        };
        models.insert(m.name.clone(), s);
    }
    if state.draining.load(std::sync::atomic::Ordering::Acquire) {
        status = "draining";
    }
    let code = if status == "ok" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        axum::Json(json!({"status": status, "models": models, "kv": kv})),
    )
        .into_response()
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A fresh response id like `chatcmpl-3f9a…`.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:032x}", rand::random::<u128>())
}

/// A running server: its address and a way to stop it.
pub struct Server {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Bind `host:port` and serve `state` in the background (on the current tokio runtime).
    pub async fn start(
        state: Arc<AppState>,
        host: &str,
        port: u16,
        max_body_bytes: usize,
    ) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind((host, port)).await?;
        let addr = listener.local_addr()?;
        let app = router(state.clone(), max_body_bytes);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let app = app.into_make_service_with_connect_info::<SocketAddr>();
            let r = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
            if let Err(e) = r {
                tracing::error!("server error: {e}");
            }
        });
        Ok(Self {
            addr,
            state,
            shutdown: Some(tx),
            task,
        })
    }

    /// Drain, then stop: new requests get 503 and `/health` turns unready while requests in
    /// flight get up to `grace` to finish; then the listener closes, open connections end, and
    /// every context still in memory goes to the disk tier (where there is one), so it
    /// survives the restart.
    pub async fn stop(mut self, grace: std::time::Duration) {
        use std::sync::atomic::Ordering;
        self.state.draining.store(true, Ordering::Release);
        let drained = async {
            loop {
                let idle = self.state.idle.notified();
                if self.state.inflight.load(Ordering::Acquire) == 0 {
                    return;
                }
                idle.await;
            }
        };
        if tokio::time::timeout(grace, drained).await.is_err() {
            tracing::warn!(
                "{} requests still in flight after {}s; stopping anyway",
                self.state.inflight.load(Ordering::Acquire),
                grace.as_secs()
            );
        }
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        // Connections still open past the grace (a stream that never ends) are cut.
        if tokio::time::timeout(std::time::Duration::from_secs(5), &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
        for m in &self.state.models {
            let engine = match &*m.state.read().unwrap_or_else(|p| p.into_inner()) {
                SlotState::Ready(h) => h.clone(),
                _ => continue,
            };
            match engine.context(crate::engine::ContextOp::PersistAll).await {
                Ok(saved) if !saved.is_empty() => {
                    tracing::info!("model '{}': {} contexts saved to disk", m.name, saved.len())
                }
                Ok(_) => {}
                Err(e) => tracing::error!("model '{}': contexts not saved: {e}", m.name),
            }
        }
    }
}

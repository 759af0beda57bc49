//! aios: an inference kernel for many AI agents. Local Llama-family models (GGUF,
//! safetensors) behind the OpenAI HTTP API, with our own forward pass over external KV storage.
//!
//! Layers, top to bottom: [`api`] (HTTP) → [`engine`] (one thread per model, sampling) →
//! [`model`] (loading, tokenizer, forward pass) → [`kv`] and [`ops`].

pub mod api;
pub mod auth;
pub mod bench;
pub mod config;
pub mod devices;
pub mod embed;
pub mod engine;
pub mod kv;
pub mod kv_events;
pub mod limits;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod providers;

use std::sync::{Arc, RwLock};

use api::{AppState, ModelSlot, SlotState};
use config::{Config, ModelConfig};
use model::{LoadOptions, LoadedModel};

/// Size the compute thread pools once per process (`0` = one thread per physical core).
///
/// candle's matmuls and our attention share candle's persistent barrier pool, sized from
/// `CANDLE_NUM_THREADS` when it is first used; set here for a program that has not started any
/// other thread yet (`aios` calls this first thing). rayon's pool serves candle's other ops.
pub fn init_process_threads(threads: usize) {
    if threads > 0 && std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
    }
    init_threads(threads);
}

/// Size rayon's pool (`0` = one thread per core); safe to call from any thread, any number of
/// times (later calls find the pool built).
pub fn init_threads(threads: usize) {
    let mut b = rayon::ThreadPoolBuilder::new().thread_name(|i| format!("aios-compute-{i}"));
    if threads > 0 {
        b = b.num_threads(threads);
    }
    // A second call (tests) finds the pool already built; that is fine.
    let _ = b.build_global();
}

/// Resolve and load one configured model (blocking; call from a worker thread).
pub fn load_configured(m: &ModelConfig) -> Result<LoadedModel, String> {
    let path = model::resolve::resolve(&m.path).map_err(|e| e.to_string())?;
    // The weights' size, for `auto` placement (a safetensors directory: its files together).
    let weight_bytes = std::fs::metadata(&path)
        .map(|md| {
            if md.is_dir() {
                std::fs::read_dir(&path)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            } else {
                md.len()
            }
        })
        .unwrap_or(0);
    let device = devices::DeviceChoice::parse(&m.device)?.open(weight_bytes)?;
    let chat_template = match &m.chat_template {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| format!("chat_template {}: {e}", p.display()))?,
        ),
        None => None,
    };
    let opts = LoadOptions {
        device,
        tokenizer: m.tokenizer.clone(),
        chat_template,
        context_length: m.context_length,
    };
    model::load_model(&path, &opts).map_err(|e| e.to_string())
}

/// The server state for `cfg`, with every model loading in the background. `/health` answers
/// 503 until they are ready.
pub fn start_loading(
    cfg: &Config,
    kv_events: Option<Arc<kv_events::Publisher>>,
) -> Result<Arc<AppState>, String> {
    let created = api::unix_now();
    let embeddings_on = !cfg.embeddings.path.is_empty();
    let memory = if cfg.memory.path.is_empty() {
        None
    } else {
        match memory::MemoryStore::open(std::path::Path::new(&cfg.memory.path)) {
            Ok(m) => Some(Arc::new(m)),
            Err(e) => {
                tracing::error!("long-term memory is off: {e}");
                None
            }
        }
    };
    let slots = cfg
        .models
        .iter()
        .map(|m| ModelSlot {
            name: m.name.clone(),
            aliases: m.aliases.clone(),
            created,
            state: RwLock::new(SlotState::Loading),
        })
        .collect();
    let embed = if embeddings_on {
        api::EmbedSlot::Loading
    } else {
        api::EmbedSlot::Off
    };
    let state = Arc::new(AppState::new(cfg, slots, embed, memory, kv_events)?);
    if embeddings_on {
        let (state, e) = (state.clone(), cfg.embeddings.clone());
        std::thread::spawn(move || {
            let dir = std::path::Path::new(&e.path);
            let next = match embed::Embedder::load(dir, &e.name) {
                Ok(m) => {
                    tracing::info!("embedding model '{}' ready: {}", e.name, e.path);
                    api::EmbedSlot::Ready(Arc::new(m))
                }
                Err(why) => {
                    tracing::warn!("embedding model '{}' not loaded: {why}", e.name);
                    api::EmbedSlot::Failed(why)
                }
            };
            *state.embeddings.write().unwrap_or_else(|p| p.into_inner()) = next;
        });
    }
    let engine_cfg = cfg.engine_config();
    for (i, m) in cfg.models.iter().cloned().enumerate() {
        let state = state.clone();
        let engine_cfg = engine_cfg.clone();
        let kv_dir = cfg.kv.disk_dir.clone();
        std::thread::spawn(move || {
            let t0 = std::time::Instant::now();
            let next = match load_configured(&m) {
                Ok(loaded) => {
                    tracing::info!(
                        "model '{}' ready: {} ({}) in {:.2}s",
                        m.name,
                        loaded.source,
                        loaded.format,
                        t0.elapsed().as_secs_f64()
                    );
                    let mut engine_cfg = engine_cfg;
                    if let Some(p) = m.policy {
                        engine_cfg.policy = p;
                    }
                    if !kv_dir.is_empty() {
                        engine_cfg.snapshot_dir = Some(std::path::Path::new(&kv_dir).join(&m.name));
                    }
                    let handle = engine::spawn(loaded, engine_cfg);
                    if let Some(p) = &state.kv_events {
                        handle.set_kv_event_sink(p.sink(&m.name));
                    }
                    SlotState::Ready(handle)
                }
                Err(e) => {
                    tracing::error!("model '{}' failed to load: {e}", m.name);
                    SlotState::Failed(e)
                }
            };
            *state.models[i]
                .state
                .write()
                .unwrap_or_else(|p| p.into_inner()) = next;
        });
    }
    Ok(state)
}

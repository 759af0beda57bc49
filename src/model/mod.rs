//! Models: finding them (path, directory or Hugging Face cache), loading them (GGUF or
//! safetensors), their tokenizer and chat template, and our own Llama-family forward pass.
//!
//! The model knows nothing of HTTP, agents or scheduling: it takes a batch of new tokens with
//! each sequence's KV storage and returns logits.

pub mod chat_template;
pub mod config;
pub mod linear;
pub mod llama;
mod load;
pub mod resolve;
pub mod tokenizer;

pub use chat_template::ChatTemplate;
pub use config::LlamaConfig;
pub use llama::{Llama, SeqInput};
pub use load::{load_model, read_gguf_config, LoadOptions};
pub use tokenizer::Tokenizer;

/// Everything about a model that can go wrong before it serves, each naming what failed.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model not found: {0}")]
    NotFound(String),
    #[error("{path}: {reason}")]
    BadFile { path: String, reason: String },
    #[error("tokenizer ({path}): {reason}")]
    Tokenizer { path: String, reason: String },
    #[error("chat template: {0}")]
    Template(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("forward pass: {0}")]
    Compute(#[from] candle_core::Error),
}

/// A loaded model with everything needed to serve it.
pub struct LoadedModel {
    pub llama: Llama,
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
    /// Where it came from (file or directory).
    pub source: String,
    /// Weight format, e.g. "gguf Q4_1" or "safetensors F32".
    pub format: String,
}

//! Hyper-parameters of a Llama-family model, read from GGUF metadata or `config.json`.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value as G;
use serde_json::Value;

use super::ModelError;
use crate::ops::rope::RopeStyle;

#[derive(Clone, Debug)]
pub struct LlamaConfig {
    pub arch: String,
    pub vocab_size: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rms_eps: f32,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    /// Per-pair RoPE frequency divisors (Llama 3 / linear scaling); `None`: unscaled.
    pub rope_freq_divisors: Option<Vec<f32>>,
    pub context_length: usize,
}

impl LlamaConfig {
    pub fn from_gguf(md: &HashMap<String, G>, path: &str) -> Result<Self, ModelError> {
        let bad = |reason: String| ModelError::BadFile {
            path: path.to_string(),
            reason,
        };
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok().cloned())
            .ok_or_else(|| bad("no general.architecture in metadata".into()))?;
        let rope_style = match arch.as_str() {
            "llama" | "mistral" => RopeStyle::Interleaved,
            "qwen2" => RopeStyle::Neox,
            other => {
                return Err(ModelError::Unsupported(format!(
                    "{path}: architecture '{other}' (llama, mistral and qwen2 are supported)"
                )))
            }
        };
        let int = |key: &str| -> Option<usize> {
            md.get(&format!("{arch}.{key}")).and_then(|v| {
                v.to_u64()
                    .ok()
                    .or_else(|| v.to_u32().ok().map(u64::from))
                    .or_else(|| v.to_i32().ok().map(|x| x.max(0) as u64))
                    .map(|x| x as usize)
            })
        };
        let need = |key: &str| int(key).ok_or_else(|| bad(format!("missing {arch}.{key}")));
        let float = |key: &str| {
            md.get(&format!("{arch}.{key}"))
                .and_then(|v| v.to_f32().ok())
        };
        let hidden = need("embedding_length")?;
        let n_heads = need("attention.head_count")?;
        let head_dim = int("attention.key_length").unwrap_or(hidden / n_heads.max(1));
        let rope_dim = int("rope.dimension_count").unwrap_or(head_dim);
        let rope_freq_divisors = match md
            .get(&format!("{arch}.rope.scaling.type"))
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
        {
            None | Some("none") => None,
            Some("linear") => float("rope.scaling.factor").map(|f| vec![f; rope_dim / 2]),
            Some(other) => {
                return Err(ModelError::Unsupported(format!(
                    "{path}: RoPE scaling '{other}' (linear and llama3 are supported)"
                )))
            }
        };
        let vocab_size = match md.get("tokenizer.ggml.tokens") {
            Some(G::Array(a)) => a.len(),
            _ => need("vocab_size")?,
        };
        Self {
            vocab_size,
            hidden,
            intermediate: need("feed_forward_length")?,
            n_layers: need("block_count")?,
            n_heads,
            n_kv_heads: int("attention.head_count_kv").unwrap_or(n_heads),
            head_dim,
            rms_eps: float("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: float("rope.freq_base").unwrap_or(10000.0),
            rope_style,
            rope_freq_divisors,
            context_length: int("context_length").unwrap_or(4096),
            arch,
        }
        .validated(path)
    }

    pub fn from_hf_json(v: &Value, path: &str) -> Result<Self, ModelError> {
        let bad = |reason: String| ModelError::BadFile {
            path: path.to_string(),
            reason,
        };
        let arch = v["model_type"].as_str().unwrap_or("llama").to_string();
        if !matches!(arch.as_str(), "llama" | "mistral" | "qwen2") {
            return Err(ModelError::Unsupported(format!(
                "{path}: model_type '{arch}' (llama, mistral and qwen2 are supported)"
            )));
        }
        let int = |k: &str| v[k].as_u64().map(|x| x as usize);
        let need = |k: &str| int(k).ok_or_else(|| bad(format!("missing {k}")));
        let hidden = need("hidden_size")?;
        let n_heads = need("num_attention_heads")?;
        let head_dim = int("head_dim").unwrap_or(hidden / n_heads.max(1));
        let rope_theta = v["rope_theta"].as_f64().unwrap_or(10000.0) as f32;
        let scaling = &v["rope_scaling"];
        let kind = scaling["rope_type"].as_str().or(scaling["type"].as_str());
        let num = |k: &str, d: f64| scaling[k].as_f64().unwrap_or(d) as f32;
        let rope_freq_divisors = match kind {
            None | Some("default") => None,
            Some("linear") => Some(vec![num("factor", 1.0); head_dim / 2]),
            Some("llama3") => Some(crate::ops::rope::llama3_divisors(
                head_dim,
                rope_theta,
                num("factor", 8.0),
                num("low_freq_factor", 1.0),
                num("high_freq_factor", 4.0),
                scaling["original_max_position_embeddings"]
                    .as_u64()
                    .unwrap_or(8192) as usize,
            )),
            Some(other) => {
                return Err(ModelError::Unsupported(format!(
                    "{path}: rope_scaling type '{other}' (linear and llama3 are supported)"
                )))
            }
        };
        Self {
            vocab_size: need("vocab_size")?,
            hidden,
            intermediate: need("intermediate_size")?,
            n_layers: need("num_hidden_layers")?,
            n_heads,
            n_kv_heads: int("num_key_value_heads").unwrap_or(n_heads),
            head_dim,
            rms_eps: v["rms_norm_eps"].as_f64().unwrap_or(1e-5) as f32,
            rope_theta,
            rope_style: RopeStyle::Neox,
            rope_freq_divisors,
            context_length: int("max_position_embeddings").unwrap_or(4096),
            arch,
        }
        .validated(path)
    }

    fn validated(self, path: &str) -> Result<Self, ModelError> {
        let ok = self.n_heads > 0
            && self.n_kv_heads > 0
            && self.n_heads.is_multiple_of(self.n_kv_heads)
            && self.head_dim > 0
            && self.head_dim.is_multiple_of(2)
            && self.n_layers > 0
            && self.vocab_size > 0
            && self.context_length > 0;
        if ok {
            Ok(self)
        } else {
            Err(ModelError::BadFile {
                path: path.to_string(),
                reason: format!("inconsistent hyper-parameters: {self:?}"),
            })
        }
    }
}

//! Reading weights from GGUF files and safetensors directories into [`Llama`].

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{DType, Device, Tensor};

use super::linear::Linear;
use super::llama::{Embedding, Layer, Llama};
use super::{ChatTemplate, LlamaConfig, LoadedModel, ModelError, Tokenizer};
use crate::ops::rope::Rope;

/// What the caller may set beyond the model files themselves.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub device: Device,
    /// A `tokenizer.json` to use instead of the one found with the model.
    pub tokenizer: Option<PathBuf>,
    /// A Jinja chat template (source text) to use instead of the model's own.
    pub chat_template: Option<String>,
    /// Serve at most this many tokens per sequence (default: the model's own limit).
    pub context_length: Option<usize>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            tokenizer: None,
            chat_template: None,
            context_length: None,
        }
    }
}

/// Load a model from a `.gguf` file or a directory (safetensors with `config.json`, or one
/// holding a `.gguf` file).
pub fn load_model(path: &Path, opts: &LoadOptions) -> Result<LoadedModel, ModelError> {
    if path.is_dir() {
        if path.join("config.json").is_file() {
            return load_safetensors(path, opts);
        }
        let mut ggufs: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| bad(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
            .collect();
        ggufs.sort();
        return match ggufs.first() {
            Some(p) => load_gguf(p, opts),
            None => Err(ModelError::NotFound(format!(
                "{}: neither config.json with safetensors nor a .gguf file",
                path.display()
            ))),
        };
    }
    if !path.exists() {
        return Err(ModelError::NotFound(path.display().to_string()));
    }
    load_gguf(path, opts)
}

fn bad(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::BadFile {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// Read a GGUF header (metadata and tensor index) from `bytes` and the model configuration in
/// it, as loading does first. The GGUF fuzz target's way in.
pub fn read_gguf_config(bytes: &[u8]) -> Result<LlamaConfig, ModelError> {
    let mut r = std::io::Cursor::new(bytes);
    let ct = gguf_file::Content::read(&mut r).map_err(|e| ModelError::BadFile {
        path: "<bytes>".into(),
        reason: format!("not a readable GGUF file: {e}"),
    })?;
    LlamaConfig::from_gguf(&ct.metadata, "<bytes>")
}

fn load_gguf(path: &Path, opts: &LoadOptions) -> Result<LoadedModel, ModelError> {
    let mut file = BufReader::new(File::open(path).map_err(|e| bad(path, e))?);
    let ct = gguf_file::Content::read(&mut file)
        .map_err(|e| bad(path, format!("not a readable GGUF file: {e}")))?;
    let pstr = path.display().to_string();
    let mut cfg = LlamaConfig::from_gguf(&ct.metadata, &pstr)?;
    if let Some(n) = opts.context_length {
        cfg.context_length = cfg.context_length.min(n);
    }
    let dev = &opts.device;
    let mut qtensor = |name: &str| -> Result<Arc<QTensor>, ModelError> {
        ct.tensor(&mut file, name, dev)
            .map(Arc::new)
            .map_err(|e| bad(path, format!("tensor {name}: {e}")))
    };
    let mut kinds = std::collections::BTreeSet::new();
    let embed = qtensor("token_embd.weight")?;
    let lm_head = if ct.tensor_infos.contains_key("output.weight") {
        qtensor("output.weight")?
    } else {
        embed.clone()
    };
    let dense = |q: Arc<QTensor>| q.dequantize(dev).map_err(|e| bad(path, e));
    let mut layers = Vec::with_capacity(cfg.n_layers);
    for i in 0..cfg.n_layers {
        let mut lin = |name: &str| -> Result<Linear, ModelError> {
            let w = qtensor(&format!("blk.{i}.{name}.weight"))?;
            kinds.insert(format!("{:?}", w.dtype()));
            let bias_name = format!("blk.{i}.{name}.bias");
            let b = if ct.tensor_infos.contains_key(&bias_name) {
                Some(qtensor(&bias_name)?.dequantize(dev)?)
            } else {
                None
            };
            Ok(Linear::quantized(w, b, dev)?)
        };
        layers.push(Layer {
            wq: lin("attn_q")?,
            wk: lin("attn_k")?,
            wv: lin("attn_v")?,
            wo: lin("attn_output")?,
            w_gate: lin("ffn_gate")?,
            w_up: lin("ffn_up")?,
            w_down: lin("ffn_down")?,
            attn_norm: vec1(dense(qtensor(&format!("blk.{i}.attn_norm.weight"))?)?)?,
            ffn_norm: vec1(dense(qtensor(&format!("blk.{i}.ffn_norm.weight"))?)?)?,
        });
    }
    let norm = vec1(dense(qtensor("output_norm.weight")?)?)?;
    // Llama 3.1+ GGUF files carry their RoPE scaling as per-pair frequency divisors.
    if ct.tensor_infos.contains_key("rope_freqs.weight") {
        let f = dense(qtensor("rope_freqs.weight")?)?;
        cfg.rope_freq_divisors = Some(f.flatten_all()?.to_vec1::<f32>()?);
    }
    let tokenizer = match &opts.tokenizer {
        Some(p) => Tokenizer::from_json_file(p)?,
        None => Tokenizer::from_gguf(&ct.metadata)?,
    };
    let template_src = opts.chat_template.clone().or_else(|| {
        ct.metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok().cloned())
    });
    let format = format!("gguf {}", kinds.into_iter().collect::<Vec<_>>().join("+"));
    let lm_head = Linear::quantized(lm_head, None, dev)?;
    let parts = Parts {
        cfg,
        embed: Embedding::Quantized(embed),
        layers,
        norm,
        lm_head,
    };
    parts.finish(dev, tokenizer, template_src, pstr, format)
}

/// The weights of a model, before the pieces every format shares are added.
struct Parts {
    cfg: LlamaConfig,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: Linear,
}

/// A 1-D weight (norm scales) as plain values.
fn vec1(t: Tensor) -> Result<Vec<f32>, ModelError> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?)
}

impl Parts {
    /// Add the chat template and RoPE tables, and assemble the model.
    fn finish(
        self,
        dev: &Device,
        tokenizer: Tokenizer,
        template_src: Option<String>,
        source: String,
        format: String,
    ) -> Result<LoadedModel, ModelError> {
        check_vocab(&self.cfg, &tokenizer, &source)?;
        let template = template_src
            .map(|s| ChatTemplate::new(&s, tokenizer.special_tokens()))
            .transpose()?;
        let cfg = self.cfg;
        let rope = Rope::new(
            cfg.rope_style,
            cfg.head_dim,
            cfg.rope_theta,
            cfg.context_length,
            cfg.rope_freq_divisors.as_deref(),
        );
        Ok(LoadedModel {
            llama: Llama {
                embed: self.embed,
                layers: self.layers,
                norm: self.norm,
                lm_head: self.lm_head,
                rope,
                device: dev.clone(),
                cfg,
            },
            tokenizer,
            template,
            source,
            format,
        })
    }
}

fn check_vocab(cfg: &LlamaConfig, tok: &Tokenizer, path: &str) -> Result<(), ModelError> {
    if tok.vocab_size() > cfg.vocab_size {
        return Err(ModelError::BadFile {
            path: path.into(),
            reason: format!(
                "the tokenizer has {} tokens but the model only {}",
                tok.vocab_size(),
                cfg.vocab_size
            ),
        });
    }
    Ok(())
}

fn load_safetensors(dir: &Path, opts: &LoadOptions) -> Result<LoadedModel, ModelError> {
    let cfg_path = dir.join("config.json");
    let cfg_json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).map_err(|e| bad(&cfg_path, e))?)
            .map_err(|e| bad(&cfg_path, e))?;
    let mut cfg = LlamaConfig::from_hf_json(&cfg_json, &cfg_path.display().to_string())?;
    if let Some(n) = opts.context_length {
        cfg.context_length = cfg.context_length.min(n);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| bad(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ModelError::NotFound(format!(
            "{}: config.json but no .safetensors files",
            dir.display()
        )));
    }
    let dev = &opts.device;
    let mut weights: HashMap<String, Tensor> = HashMap::new();
    let mut dtypes = std::collections::BTreeSet::new();
    for f in &files {
        let map = candle_core::safetensors::load(f, &Device::Cpu).map_err(|e| bad(f, e))?;
        for (name, t) in map {
            dtypes.insert(format!("{:?}", t.dtype()).to_uppercase());
            weights.insert(name, t);
        }
    }
    let dir_s = dir.display().to_string();
    let mut take = |name: &str| -> Result<Tensor, ModelError> {
        let t = weights.remove(name).ok_or_else(|| ModelError::BadFile {
            path: dir_s.clone(),
            reason: format!("missing tensor {name}"),
        })?;
        Ok(t.to_dtype(DType::F32)?.to_device(dev)?)
    };
    let embed = take("model.embed_tokens.weight")?;
    let mut layers = Vec::with_capacity(cfg.n_layers);
    let has_bias = cfg.arch == "qwen2";
    for i in 0..cfg.n_layers {
        let p = format!("model.layers.{i}");
        let mut lin = |name: &str, bias: bool| -> Result<Linear, ModelError> {
            let b = if bias {
                Some(take(&format!("{p}.{name}.bias"))?)
            } else {
                None
            };
            Ok(Linear::dense(take(&format!("{p}.{name}.weight"))?, b)?)
        };
        layers.push(Layer {
            wq: lin("self_attn.q_proj", has_bias)?,
            wk: lin("self_attn.k_proj", has_bias)?,
            wv: lin("self_attn.v_proj", has_bias)?,
            wo: lin("self_attn.o_proj", false)?,
            w_gate: lin("mlp.gate_proj", false)?,
            w_up: lin("mlp.up_proj", false)?,
            w_down: lin("mlp.down_proj", false)?,
            attn_norm: vec1(take(&format!("{p}.input_layernorm.weight"))?)?,
            ffn_norm: vec1(take(&format!("{p}.post_attention_layernorm.weight"))?)?,
        });
    }
    let norm = vec1(take("model.norm.weight")?)?;
    let lm_head = match take("lm_head.weight") {
        Ok(t) => t,
        Err(_) => embed.clone(),
    };
    let tok_path = opts
        .tokenizer
        .clone()
        .unwrap_or_else(|| dir.join("tokenizer.json"));
    let tokenizer = Tokenizer::from_json_file(&tok_path)?;
    let template_src = opts
        .chat_template
        .clone()
        .or_else(|| template_from_dir(dir));
    let format = format!(
        "safetensors {}",
        dtypes.into_iter().collect::<Vec<_>>().join("+")
    );
    let parts = Parts {
        cfg,
        embed: Embedding::Dense(embed),
        layers,
        norm,
        lm_head: Linear::dense(lm_head, None)?,
    };
    parts.finish(dev, tokenizer, template_src, dir_s, format)
}

/// `chat_template.jinja`, or `chat_template` in `tokenizer_config.json`.
fn template_from_dir(dir: &Path) -> Option<String> {
    if let Ok(s) = std::fs::read_to_string(dir.join("chat_template.jinja")) {
        return Some(s);
    }
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("tokenizer_config.json")).ok()?).ok()?;
    match &cfg["chat_template"] {
        serde_json::Value::String(s) => Some(s.clone()),
        // A list of named templates: take "default".
        serde_json::Value::Array(list) => list
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str().map(String::from)),
        _ => None,
    }
}

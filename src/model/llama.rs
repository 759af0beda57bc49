//! Our Llama-family forward pass (Llama, SmolLM, Mistral, Qwen2) on candle tensors.
//!
//! All new tokens of a step, from every sequence, go through each linear layer as one
//! `[n_tokens, hidden]` matrix, so the weights are read once per step. Attention is per
//! sequence, against that sequence's own KV storage, which the caller owns.

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor};

use super::config::LlamaConfig;
use super::ModelError;
use crate::kv::{KvLayout, KvSeq};
use crate::ops::attention::{attention, AttnSeq, Heads};
use crate::ops::rope::Rope;

/// A linear layer: quantised or dense weights, optional bias (Qwen2's QKV).
pub struct Linear {
    pub w: QMatMul,
    pub b: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.w.forward(x)?;
        match &self.b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// Token embeddings: a quantised table read row by row, or a dense one.
pub enum Embedding {
    Quantized(std::sync::Arc<candle_core::quantized::QTensor>),
    Dense(Tensor),
}

pub struct Layer {
    pub attn_norm: Tensor,
    pub wq: Linear,
    pub wk: Linear,
    pub wv: Linear,
    pub wo: Linear,
    pub ffn_norm: Tensor,
    pub w_gate: Linear,
    pub w_up: Linear,
    pub w_down: Linear,
}

pub struct Llama {
    pub cfg: LlamaConfig,
    pub embed: Embedding,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    pub lm_head: QMatMul,
    pub rope: Rope,
    pub device: Device,
}

/// One sequence's share of a step: its next `tokens.len()` tokens, at positions
/// `kv.len()..`, and whether the logits of its last token are wanted.
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    pub kv: &'a mut KvSeq,
    pub want_logits: bool,
}

impl Llama {
    pub fn kv_layout(&self) -> KvLayout {
        KvLayout {
            n_layers: self.cfg.n_layers,
            n_kv_heads: self.cfg.n_kv_heads,
            head_dim: self.cfg.head_dim,
        }
    }

    pub fn context_length(&self) -> usize {
        self.cfg.context_length
    }

    /// Run one step. Every sequence's KV grows by its token count. Returns logits `[n, vocab]`,
    /// one row per sequence with `want_logits`, in order; `None` when no row was wanted.
    pub fn forward(&self, seqs: &mut [SeqInput<'_>]) -> Result<Option<Tensor>, ModelError> {
        let cfg = &self.cfg;
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        let mut logit_rows = Vec::new();
        for s in seqs.iter_mut() {
            let start = s.kv.len();
            if start + s.tokens.len() > self.rope.max_positions() {
                return Err(ModelError::Unsupported(format!(
                    "sequence of {} tokens exceeds the context length {}",
                    start + s.tokens.len(),
                    self.rope.max_positions()
                )));
            }
            if s.tokens.is_empty() {
                continue;
            }
            tokens.extend_from_slice(s.tokens);
            positions.extend(start..start + s.tokens.len());
            if s.want_logits {
                logit_rows.push((tokens.len() - 1) as u32);
            }
            s.kv.reserve(s.tokens.len());
        }
        let n = tokens.len();
        if n == 0 {
            return Ok(None);
        }
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(ModelError::Unsupported(format!(
                "token id {bad} is outside the vocabulary ({})",
                cfg.vocab_size
            )));
        }
        let ids = Tensor::new(tokens.as_slice(), &self.device)?;
        let mut x = match &self.embed {
            Embedding::Quantized(q) => q.embedding(&ids)?,
            Embedding::Dense(t) => t.index_select(&ids, 0)?,
        };
        let heads = Heads {
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
        };
        let (q_width, kv_width) = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim);
        for (li, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, cfg.rms_eps)?;
            let mut q = layer.wq.forward(&h)?.flatten_all()?.to_vec1::<f32>()?;
            let mut k = layer.wk.forward(&h)?.flatten_all()?.to_vec1::<f32>()?;
            let v = layer.wv.forward(&h)?.flatten_all()?.to_vec1::<f32>()?;
            for (t, &pos) in positions.iter().enumerate() {
                self.rope
                    .apply(&mut q[t * q_width..][..q_width], cfg.head_dim, pos);
                self.rope
                    .apply(&mut k[t * kv_width..][..kv_width], cfg.head_dim, pos);
            }
            let mut row = 0;
            for s in seqs.iter_mut() {
                let m = s.tokens.len();
                s.kv.write(
                    li,
                    &k[row * kv_width..(row + m) * kv_width],
                    &v[row * kv_width..(row + m) * kv_width],
                );
                row += m;
            }
            let mut attn_seqs = Vec::with_capacity(seqs.len());
            let mut row = 0;
            for s in seqs.iter() {
                attn_seqs.push(AttnSeq {
                    kv: s.kv,
                    row,
                    n_tokens: s.tokens.len(),
                    first_pos: s.kv.len(),
                });
                row += s.tokens.len();
            }
            let att = attention(&q, &attn_seqs, li, heads);
            let att = Tensor::from_vec(att, (n, q_width), &self.device)?;
            x = (x + layer.wo.forward(&att)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, cfg.rms_eps)?;
            let gate = candle_nn::ops::silu(&layer.w_gate.forward(&h)?)?;
            let up = layer.w_up.forward(&h)?;
            x = (x + layer.w_down.forward(&(gate * up)?)?)?;
        }
        for s in seqs.iter_mut() {
            let m = s.tokens.len();
            s.kv.advance(m);
        }
        if logit_rows.is_empty() {
            return Ok(None);
        }
        let rows = Tensor::new(logit_rows.as_slice(), &self.device)?;
        let last = x.index_select(&rows, 0)?;
        let last = candle_nn::ops::rms_norm(&last, &self.norm, cfg.rms_eps)?;
        let logits = self.lm_head.forward(&last)?.to_dtype(DType::F32)?;
        Ok(Some(logits))
    }
}

//! Our Llama-family forward pass (Llama, SmolLM, Mistral, Qwen2) on candle tensors.
//!
//! All new tokens of a step, from every sequence, go through each linear layer as one
//! `[n_tokens, hidden]` matrix, so the weights are read once per step. Attention is per
//! sequence, against that sequence's own KV storage, which the caller owns.

use candle_core::{Device, Tensor};

use super::config::LlamaConfig;
use super::linear::{forward_many, Input, Linear};
use super::ModelError;
use crate::kv::{KvLayout, KvSeq};
use crate::ops::attention::{attention, AttnSeq, Heads};
use crate::ops::rope::Rope;
use crate::ops::{add_assign, par_chunks_mut, rms_norm, rows_per_task, silu_mul};

/// Token embeddings: a quantised table read row by row, or a dense one.
pub enum Embedding {
    Quantized(std::sync::Arc<candle_core::quantized::QTensor>),
    Dense(Tensor),
}

pub struct Layer {
    pub attn_norm: Vec<f32>,
    pub wq: Linear,
    pub wk: Linear,
    pub wv: Linear,
    pub wo: Linear,
    pub ffn_norm: Vec<f32>,
    pub w_gate: Linear,
    pub w_up: Linear,
    pub w_down: Linear,
}

pub struct Llama {
    pub cfg: LlamaConfig,
    pub embed: Embedding,
    pub layers: Vec<Layer>,
    pub norm: Vec<f32>,
    pub lm_head: Linear,
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
    /// The KV rows this model writes, stored as f16 (the engine may choose another row type).
    pub fn kv_layout(&self) -> KvLayout {
        KvLayout {
            n_layers: self.cfg.n_layers,
            n_kv_heads: self.cfg.n_kv_heads,
            head_dim: self.cfg.head_dim,
            dtype: crate::kv::KvDtype::F16,
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
            s.kv.reserve(s.tokens.len())
                .map_err(|e| ModelError::Unsupported(e.to_string()))?;
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
        let x = match &self.embed {
            Embedding::Quantized(q) => q.embedding(&ids)?,
            Embedding::Dense(t) => t.index_select(&ids, 0)?,
        };
        let mut x: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let dev = &self.device;
        let hidden = cfg.hidden;
        let heads = Heads {
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
        };
        let (q_width, kv_width) = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim);
        let mut h = vec![0f32; n * hidden];
        // The matmuls' outputs, reused by every layer.
        let mut qkv = [(); 3].map(|_| Vec::new());
        let mut gate_up = [(); 2].map(|_| Vec::new());
        let (mut o, mut down) = ([Vec::new()], [Vec::new()]);
        for (li, layer) in self.layers.iter().enumerate() {
            rms_norm(&x, &layer.attn_norm, cfg.rms_eps, &mut h);
            let inp = Input::new(&h, n, hidden);
            forward_many(&[&layer.wq, &layer.wk, &layer.wv], &inp, dev, &mut qkv)?;
            let [q, k, v] = &mut qkv;
            for (x, width) in [(&mut *q, q_width), (&mut *k, kv_width)] {
                let rows = rows_per_task(width);
                par_chunks_mut(x, rows * width, |i, x| {
                    for (t, row) in x.chunks_exact_mut(width).enumerate() {
                        self.rope.apply(row, cfg.head_dim, positions[i * rows + t]);
                    }
                });
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
            let att = attention(q, &attn_seqs, li, heads);
            forward_many(&[&layer.wo], &Input::new(&att, n, q_width), dev, &mut o)?;
            add_assign(&mut x, &o[0]);
            rms_norm(&x, &layer.ffn_norm, cfg.rms_eps, &mut h);
            let inp = Input::new(&h, n, hidden);
            forward_many(&[&layer.w_gate, &layer.w_up], &inp, dev, &mut gate_up)?;
            let [gate, up] = &mut gate_up;
            silu_mul(gate, up);
            let inp = Input::new(gate, n, cfg.intermediate);
            forward_many(&[&layer.w_down], &inp, dev, &mut down)?;
            add_assign(&mut x, &down[0]);
        }
        for s in seqs.iter_mut() {
            let m = s.tokens.len();
            s.kv.advance(m);
        }
        if logit_rows.is_empty() {
            return Ok(None);
        }
        let mut last = Vec::with_capacity(logit_rows.len() * hidden);
        for &r in &logit_rows {
            last.extend_from_slice(&x[r as usize * hidden..][..hidden]);
        }
        let mut normed = vec![0f32; last.len()];
        rms_norm(&last, &self.norm, cfg.rms_eps, &mut normed);
        let logits = self
            .lm_head
            .forward(&Input::new(&normed, logit_rows.len(), hidden), dev)?;
        Ok(Some(Tensor::from_vec(
            logits,
            (logit_rows.len(), cfg.vocab_size),
            dev,
        )?))
    }
}

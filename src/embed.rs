//! Sentence embeddings: a BERT sentence-transformer (all-MiniLM-L6-v2 by default) run with
//! candle-transformers' BERT, mean-pooled over the real tokens and L2-normalised, as the
//! sentence-transformers pipeline of that model does (modules: Transformer → Pooling(mean) →
//! Normalize).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};

/// Inputs embedded in one forward pass.
const BATCH: usize = 32;

/// A loaded embedding model.
pub struct Embedder {
    pub name: String,
    pub dims: usize,
    /// Longest input in tokens (the model's `max_seq_length`).
    pub max_tokens: usize,
    model: BertModel,
    tokenizer: tokenizers::Tokenizer,
    device: Device,
}

impl Embedder {
    /// Load `dir` (a sentence-transformers folder: `config.json`, `model.safetensors`,
    /// `tokenizer.json`, optional `sentence_bert_config.json`).
    pub fn load(dir: &Path, name: &str) -> Result<Self, String> {
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f))
                .map_err(|e| format!("{}: {e}", dir.join(f).display()))
        };
        let cfg: BertConfig = serde_json::from_str(&read("config.json")?)
            .map_err(|e| format!("{}: {e}", dir.join("config.json").display()))?;
        let max_tokens = read("sentence_bert_config.json")
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["max_seq_length"].as_u64())
            .map_or(cfg.max_position_embeddings, |m| m as usize)
            .min(cfg.max_position_embeddings);
        let mut tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| format!("{}: {e}", dir.join("tokenizer.json").display()))?;
        // Lengths are checked (an input over the limit is the client's error, not cut short);
        // padding is done here, per batch.
        tokenizer.with_truncation(None).map_err(|e| e.to_string())?;
        tokenizer.with_padding(None);
        let device = Device::Cpu;
        let weights = dir.join("model.safetensors");
        // SAFETY: the file is mapped read-only and not modified while the model lives.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, &device) }
            .map_err(|e| format!("{}: {e}", weights.display()))?;
        let model = BertModel::load(vb, &cfg).map_err(|e| format!("{}: {e}", weights.display()))?;
        Ok(Self {
            name: name.to_string(),
            dims: cfg.hidden_size,
            max_tokens,
            model,
            tokenizer,
            device,
        })
    }

    /// Token ids of each input (with the model's [CLS]/[SEP]).
    pub fn tokenize(&self, texts: &[String]) -> Result<Vec<Vec<u32>>, String> {
        texts
            .iter()
            .map(|t| {
                self.tokenizer
                    .encode(t.as_str(), true)
                    .map(|e| e.get_ids().to_vec())
                    .map_err(|e| e.to_string())
            })
            .collect()
    }

    /// Unit-length embeddings of tokenised inputs, in order.
    pub fn embed(&self, inputs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, String> {
        let mut out = Vec::with_capacity(inputs.len());
        // Similar lengths batch together (less padding); results go back in input order.
        let mut order: Vec<usize> = (0..inputs.len()).collect();
        order.sort_by_key(|&i| inputs[i].len());
        let mut results = vec![Vec::new(); inputs.len()];
        for chunk in order.chunks(BATCH) {
            let batch: Vec<&[u32]> = chunk.iter().map(|&i| inputs[i].as_slice()).collect();
            for (&i, e) in chunk
                .iter()
                .zip(self.embed_batch(&batch).map_err(|e| e.to_string())?)
            {
                results[i] = e;
            }
        }
        out.extend(results);
        Ok(out)
    }

    fn embed_batch(&self, batch: &[&[u32]]) -> candle_core::Result<Vec<Vec<f32>>> {
        let len = batch.iter().map(|b| b.len()).max().unwrap_or(0).max(1);
        let mut ids = Vec::with_capacity(batch.len() * len);
        let mut mask = Vec::with_capacity(batch.len() * len);
        for b in batch {
            ids.extend_from_slice(b);
            ids.extend(std::iter::repeat_n(0u32, len - b.len()));
            mask.extend(std::iter::repeat_n(1u32, b.len()));
            mask.extend(std::iter::repeat_n(0u32, len - b.len()));
        }
        let shape = (batch.len(), len);
        let ids = Tensor::from_vec(ids, shape, &self.device)?;
        let mask = Tensor::from_vec(mask, shape, &self.device)?;
        let types = ids.zeros_like()?;
        let hidden = self.model.forward(&ids, &types, Some(&mask))?; // [b, len, dims]
                                                                     // Mean over the real tokens, then unit length.
        let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&m)?.sum(1)?;
        let counts = m.sum(1)?;
        let mean = summed.broadcast_div(&counts)?;
        let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?;
        mean.broadcast_div(&norm)?.to_vec2::<f32>()
    }
}

/// Standard base64 (with padding) of `bytes`, for `encoding_format: "base64"`.
pub fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for k in 0..4 {
            if k <= c.len() {
                out.push(ABC[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_the_standard_alphabet_and_padding() {
        assert_eq!(super::base64(b""), "");
        assert_eq!(super::base64(b"f"), "Zg==");
        assert_eq!(super::base64(b"fo"), "Zm8=");
        assert_eq!(super::base64(b"foo"), "Zm9v");
        assert_eq!(super::base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(super::base64(&[0xff, 0xfe, 0x00]), "//4A");
    }
}

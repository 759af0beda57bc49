//! Text ↔ token ids. Wraps the `tokenizers` crate, built either from a `tokenizer.json` or from
//! the vocabulary stored in a GGUF file, and keeps a table of each token's raw bytes so the
//! detokenizer can stream output without ever splitting a UTF-8 character.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{json, Value};

use super::ModelError;

/// How a vocabulary spells bytes in its token strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Spelling {
    /// GPT-2 byte-level BPE: each byte is mapped to a printable character.
    ByteLevel,
    /// SentencePiece: `▁` stands for a space, `<0xNN>` for a raw byte.
    SentencePiece,
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Raw bytes each token produces in output; empty for control tokens.
    token_bytes: Vec<Vec<u8>>,
    /// The token's own spelling (control tokens included), for logprobs.
    token_text: Vec<String>,
    special: Vec<bool>,
    eog: Vec<u32>,
    bos: Option<u32>,
    add_bos: bool,
}

/// Token ids and strings a chat template refers to.
#[derive(Clone, Debug, Default)]
pub struct SpecialTokens {
    pub bos: Option<String>,
    pub eos: Option<String>,
}

impl Tokenizer {
    /// Load a `tokenizer.json`, with `tokenizer_config.json` beside it when present (for
    /// bos/eos and `add_bos_token`).
    pub fn from_json_file(path: &Path) -> Result<Self, ModelError> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| ModelError::Tokenizer {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let cfg: Value = path
            .parent()
            .map(|d| d.join("tokenizer_config.json"))
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        let tok_str = |key: &str| -> Option<String> {
            match &cfg[key] {
                Value::String(s) => Some(s.clone()),
                Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
                _ => None,
            }
        };
        let bos = tok_str("bos_token").and_then(|t| inner.token_to_id(&t));
        let eos = tok_str("eos_token").and_then(|t| inner.token_to_id(&t));
        let add_bos = cfg["add_bos_token"].as_bool().unwrap_or(false);
        let decoder = inner
            .get_decoder()
            .and_then(|d| serde_json::to_string(d).ok())
            .unwrap_or_default();
        let spelling = if decoder.contains("ByteLevel") {
            Spelling::ByteLevel
        } else {
            Spelling::SentencePiece
        };
        let n = inner.get_vocab_size(true);
        let added = inner.get_added_tokens_decoder();
        let mut texts = Vec::with_capacity(n);
        let mut special = Vec::with_capacity(n);
        for id in 0..n as u32 {
            texts.push(inner.id_to_token(id).unwrap_or_default());
            special.push(added.get(&id).map(|t| t.special).unwrap_or(false));
        }
        Ok(Self::assemble(
            inner, texts, special, spelling, eos, bos, add_bos,
        ))
    }

    /// Build the tokenizer from GGUF metadata (`tokenizer.ggml.*`).
    pub fn from_gguf(
        md: &HashMap<String, candle_core::quantized::gguf_file::Value>,
    ) -> Result<Self, ModelError> {
        use candle_core::quantized::gguf_file::Value as G;
        let err = |reason: String| ModelError::Tokenizer {
            path: "GGUF metadata".into(),
            reason,
        };
        let strings = |key: &str| -> Result<Vec<String>, ModelError> {
            match md.get(key) {
                Some(G::Array(a)) => a
                    .iter()
                    .map(|v| {
                        v.to_string()
                            .cloned()
                            .map_err(|e| err(format!("{key}: {e}")))
                    })
                    .collect(),
                _ => Err(err(format!("missing {key}"))),
            }
        };
        let u32_of = |key: &str| md.get(key).and_then(|v| v.to_u32().ok());
        let model = md
            .get("tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_default();
        let pre = md
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_else(|| "default".into());
        let tokens = strings("tokenizer.ggml.tokens")?;
        let types: Vec<i64> = match md.get("tokenizer.ggml.token_type") {
            Some(G::Array(a)) => a
                .iter()
                .map(|v| v.to_i32().map(i64::from).unwrap_or(1))
                .collect(),
            _ => vec![1; tokens.len()],
        };
        // llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
        let added: Vec<Value> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
            .map(|(i, t)| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": types[i] == 3})
            })
            .collect();
        let (spec, spelling) = match model.as_str() {
            "gpt2" => {
                let merges = strings("tokenizer.ggml.merges")?;
                let vocab: serde_json::Map<String, Value> = tokens
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (t.clone(), json!(i)))
                    .collect();
                let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
                                        "trim_offsets": false, "use_regex": false});
                let split = |pattern: &str| {
                    json!({"type": "Split", "pattern": {"Regex": pattern},
                           "behavior": "Isolated", "invert": false})
                };
                let pre_tok = match pre.as_str() {
                    // GPT-2's own regex, with digits split one by one first.
                    "smollm" => json!({"type": "Sequence", "pretokenizers": [
                        {"type": "Digits", "individual_digits": true},
                        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true}]}),
                    "gpt2" | "default" | "gpt-2" | "starcoder" | "refact" => {
                        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true})
                    }
                    "llama3" | "llama-bpe" | "llama-v3" | "dbrx" | "smaug-bpe" => json!({"type": "Sequence", "pretokenizers": [
                        split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
                        byte_level]}),
                    "qwen2" | "deepseek-r1-qwen" => json!({"type": "Sequence", "pretokenizers": [
                        split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
                        byte_level]}),
                    other => {
                        return Err(err(format!(
                            "pre-tokenizer '{other}' is not supported; put the model's tokenizer.json beside the GGUF file"
                        )))
                    }
                };
                let spec = json!({
                    "version": "1.0", "truncation": null, "padding": null,
                    "added_tokens": added, "normalizer": null, "pre_tokenizer": pre_tok,
                    "post_processor": null,
                    "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
                    "model": {"type": "BPE", "dropout": null, "unk_token": null,
                              "continuing_subword_prefix": null, "end_of_word_suffix": null,
                              "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                              "vocab": vocab, "merges": merges}
                });
                (spec, Spelling::ByteLevel)
            }
            "llama" => {
                // SentencePiece vocabularies: a Unigram model over the stored scores with byte
                // fallback approximates SentencePiece's BPE closely; a tokenizer.json beside the
                // GGUF file takes precedence when exact ids matter.
                let scores: Vec<f64> = match md.get("tokenizer.ggml.scores") {
                    Some(G::Array(a)) => {
                        a.iter().map(|v| v.to_f32().unwrap_or(0.0) as f64).collect()
                    }
                    _ => vec![0.0; tokens.len()],
                };
                let vocab: Vec<Value> = tokens
                    .iter()
                    .zip(scores)
                    .map(|(t, s)| json!([t, s]))
                    .collect();
                let add_space = md
                    .get("tokenizer.ggml.add_space_prefix")
                    .and_then(|v| v.to_bool().ok())
                    .unwrap_or(true);
                let mut norms = vec![];
                if add_space {
                    norms.push(json!({"type": "Prepend", "prepend": "▁"}));
                }
                norms.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}));
                let spec = json!({
                    "version": "1.0", "truncation": null, "padding": null,
                    "added_tokens": added,
                    "normalizer": {"type": "Sequence", "normalizers": norms},
                    "pre_tokenizer": null, "post_processor": null,
                    "decoder": {"type": "Sequence", "decoders": [
                        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                        {"type": "ByteFallback"}, {"type": "Fuse"}]},
                    "model": {"type": "Unigram", "unk_id": u32_of("tokenizer.ggml.unknown_token_id"),
                              "vocab": vocab, "byte_fallback": true}
                });
                (spec, Spelling::SentencePiece)
            }
            other => {
                return Err(err(format!(
                    "tokenizer model '{other}' is not supported (gpt2 and llama are)"
                )))
            }
        };
        let inner = tokenizers::Tokenizer::from_bytes(spec.to_string().as_bytes())
            .map_err(|e| err(format!("building the tokenizer: {e}")))?;
        let special = (0..tokens.len())
            .map(|i| types.get(i) == Some(&3))
            .collect();
        let eos = u32_of("tokenizer.ggml.eos_token_id");
        let bos = u32_of("tokenizer.ggml.bos_token_id");
        let add_bos = md
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(model == "llama");
        Ok(Self::assemble(
            inner, tokens, special, spelling, eos, bos, add_bos,
        ))
    }

    fn assemble(
        inner: tokenizers::Tokenizer,
        texts: Vec<String>,
        special: Vec<bool>,
        spelling: Spelling,
        eos: Option<u32>,
        bos: Option<u32>,
        add_bos: bool,
    ) -> Self {
        let byte_of = gpt2_unicode_to_byte();
        let token_bytes = texts
            .iter()
            .zip(&special)
            .map(|(t, &sp)| {
                if sp {
                    Vec::new()
                } else {
                    spell_bytes(t, spelling, &byte_of)
                }
            })
            .collect();
        // End-of-generation tokens: the declared EOS plus the control tokens that end a turn
        // in common chat formats (as llama.cpp does).
        const EOG: [&str; 8] = [
            "<|endoftext|>",
            "<|im_end|>",
            "<|eot_id|>",
            "<|end|>",
            "</s>",
            "<end_of_turn>",
            "<|end_of_text|>",
            "<|eom_id|>",
        ];
        let mut eog: Vec<u32> = eos.into_iter().collect();
        for (i, t) in texts.iter().enumerate() {
            if special[i] && EOG.contains(&t.as_str()) && !eog.contains(&(i as u32)) {
                eog.push(i as u32);
            }
        }
        Self {
            inner,
            token_bytes,
            token_text: texts,
            special,
            eog,
            bos,
            add_bos,
        }
    }

    /// Token ids of `text`; special tokens written in the text (e.g. `<|im_start|>`) are
    /// recognised. A BOS token is prepended when the model asks for one.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, ModelError> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| ModelError::Tokenizer {
                path: "encode".into(),
                reason: e.to_string(),
            })?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_bos && self.add_bos {
            if let Some(b) = self.bos {
                if enc.get_ids().first() != Some(&b) {
                    ids.push(b);
                }
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Output text of `ids` (control tokens skipped, invalid UTF-8 replaced).
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&i| self.token_bytes(i).iter().copied())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The raw bytes `id` contributes to output text.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.token_bytes
            .get(id as usize)
            .map(|v| v.as_slice())
            .unwrap_or(&[])
    }

    /// How the token reads in logprobs: its output text, or its own spelling for control tokens.
    pub fn token_str(&self, id: u32) -> String {
        match self.special.get(id as usize) {
            Some(true) => self.token_text[id as usize].clone(),
            Some(false) => String::from_utf8_lossy(self.token_bytes(id)).into_owned(),
            None => String::new(),
        }
    }

    /// The spelling of a control token (`<|im_end|>`); None for tokens that are text.
    pub fn control_text(&self, id: u32) -> Option<&str> {
        match self.special.get(id as usize) {
            Some(true) => Some(&self.token_text[id as usize]),
            _ => None,
        }
    }

    /// Write the tokenizer as a `tokenizer.json`.
    pub fn save_json(&self, path: &Path) -> Result<(), ModelError> {
        self.inner
            .save(path, false)
            .map_err(|e| ModelError::Tokenizer {
                path: path.display().to_string(),
                reason: e.to_string(),
            })
    }

    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }

    /// Tokens that end generation.
    pub fn eog_ids(&self) -> &[u32] {
        &self.eog
    }

    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    pub fn special_tokens(&self) -> SpecialTokens {
        let text = |id: Option<u32>| id.and_then(|i| self.token_text.get(i as usize).cloned());
        SpecialTokens {
            bos: text(self.bos),
            eos: text(self.eog.first().copied()),
        }
    }
}

/// GPT-2's reversible byte ↔ printable character map, inverted: character → byte.
fn gpt2_unicode_to_byte() -> HashMap<char, u8> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..=255u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    printable
        .into_iter()
        .zip(chars)
        .map(|(b, c)| (char::from_u32(c).expect("valid char"), b as u8))
        .collect()
}

fn spell_bytes(token: &str, spelling: Spelling, byte_of: &HashMap<char, u8>) -> Vec<u8> {
    match spelling {
        Spelling::ByteLevel => {
            let mut out = Vec::with_capacity(token.len());
            for c in token.chars() {
                match byte_of.get(&c) {
                    Some(b) => out.push(*b),
                    None => out.extend_from_slice(c.to_string().as_bytes()),
                }
            }
            out
        }
        Spelling::SentencePiece => {
            if token.len() == 6 && token.starts_with("<0x") && token.ends_with('>') {
                if let Ok(b) = u8::from_str_radix(&token[3..5], 16) {
                    return vec![b];
                }
            }
            token.replace('▁', " ").into_bytes()
        }
    }
}

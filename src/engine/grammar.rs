//! Constrained decoding: a JSON schema becomes a per-sequence matcher that, before each sampled
//! token, says which tokens keep the output inside the grammar. The grammar engine is
//! llguidance (an Earley parser over a lexer of derivative-based regexes, walking a token trie):
//! masks cost tens of microseconds per token for our vocabulary and need no per-schema
//! vocabulary pass, so a new schema is ready in milliseconds.

use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, InferenceCapabilities, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

use crate::model::Tokenizer;

/// How JSON is laid out under a constraint: one space after `,` and `:`, no other whitespace.
/// Free whitespace lets a small model wander into endless newlines; this layout is the one
/// `json.dumps` writes, which models have seen most.
fn layout() -> Value {
    json!({
        "whitespace_flexible": false,
        "item_separator": ", ",
        "key_separator": ": ",
    })
}

/// The grammar compiler of one model, built from its vocabulary on first use.
#[derive(Default)]
pub struct Grammars {
    factory: OnceLock<Result<Arc<ParserFactory>, String>>,
}

impl Grammars {
    fn factory(&self, tok: &Tokenizer) -> Result<Arc<ParserFactory>, String> {
        self.factory
            .get_or_init(|| build_factory(tok).map(Arc::new))
            .clone()
    }

    /// Compile `schema` (a JSON Schema object) into a fresh constraint. The error says what in
    /// the schema is unsupported or wrong.
    pub fn json_schema(&self, tok: &Tokenizer, schema: &Value) -> Result<Constraint, String> {
        let Some(obj) = schema.as_object() else {
            return Err("the schema must be a JSON object".into());
        };
        let mut schema = Value::Object(obj.clone());
        schema["x-guidance"] = layout();
        let factory = self.factory(tok)?;
        let grammar = TopLevelGrammar::from_json_schema(schema);
        // The compiler is a large third-party state machine: a panic on an odd schema must
        // become a 400 for that request, not a dead handler.
        let parser = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            factory.create_parser(grammar)
        }))
        .map_err(|_| "the schema could not be compiled (internal error in the grammar compiler)")?
        .map_err(|e| e.to_string())?;
        Ok(Constraint {
            matcher: Box::new(Matcher::new(Ok(parser))),
            mask: None,
        })
    }
}

fn build_factory(tok: &Tokenizer) -> Result<ParserFactory, String> {
    let n = tok.vocab_size();
    // Control tokens are marked so that no grammar text can match them.
    let words: Vec<Vec<u8>> = (0..n as u32)
        .map(|id| match tok.control_text(id) {
            Some(t) => [&[TokTrie::SPECIAL_TOKEN_MARKER][..], t.as_bytes()].concat(),
            None => tok.token_bytes(id).to_vec(),
        })
        .collect();
    let eos = *tok
        .eog_ids()
        .first()
        .ok_or("the model declares no end-of-text token, so a grammar could never end")?;
    let info = TokRxInfo::new(n as u32, eos);
    let trie = TokTrie::from(&info, &words);
    let env: llguidance::toktrie::TokEnv = Arc::new(ApproximateTokEnv::new(trie));
    let caps = InferenceCapabilities::default();
    let mut factory = ParserFactory::new(
        &env,
        caps,
        &llguidance::earley::SlicedBiasComputer::general_slices(),
    )
    .map_err(|e| format!("building the grammar engine for this vocabulary: {e}"))?;
    factory.quiet();
    Ok(factory)
}

/// One sequence's grammar state, with the mask for its next token once computed.
pub struct Constraint {
    matcher: Box<Matcher>,
    mask: Option<Result<llguidance::toktrie::SimpleVob, String>>,
}

impl Clone for Constraint {
    fn clone(&self) -> Self {
        Self {
            matcher: Box::new(self.matcher.deep_clone()),
            mask: None,
        }
    }
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Constraint")
    }
}

impl Constraint {
    /// Work out which tokens may come next (the costly part; may run beside the forward pass).
    pub fn prepare(&mut self) {
        if self.mask.is_none() {
            let m = if self.matcher.is_stopped() {
                self.matcher
                    .compute_mask_or_eos()
                    .map_err(|e| e.to_string())
            } else {
                self.matcher.compute_mask().map_err(|e| e.to_string())
            };
            self.mask = Some(m);
        }
    }

    /// Forbid every token the grammar does not allow next.
    pub fn apply(&mut self, logits: &mut [f32]) -> Result<(), String> {
        self.prepare();
        let mask = match self.mask.take() {
            Some(Ok(m)) => m,
            Some(Err(e)) => return Err(format!("constrained decoding failed: {e}")),
            None => unreachable!("prepare sets the mask"),
        };
        // One bit per token, 32 to a word: whole words of forbidden tokens are the common case.
        let mut any = false;
        for (&word, chunk) in mask.as_slice().iter().zip(logits.chunks_mut(32)) {
            if word == u32::MAX {
                any = true;
                continue;
            }
            for (b, l) in chunk.iter_mut().enumerate() {
                if word >> b & 1 == 0 {
                    *l = f32::NEG_INFINITY;
                } else {
                    any = true;
                }
            }
        }
        for l in logits.iter_mut().skip(mask.as_slice().len() * 32) {
            *l = f32::NEG_INFINITY;
        }
        if !any {
            return Err("constrained decoding failed: the grammar allows no token here".into());
        }
        Ok(())
    }

    /// Advance past the sampled token. Returns true when the grammar is complete.
    pub fn commit(&mut self, token: u32) -> Result<bool, String> {
        self.mask = None;
        self.matcher
            .consume_token(token)
            .map_err(|e| format!("constrained decoding failed: {e}"))?;
        Ok(self.matcher.is_stopped())
    }
}

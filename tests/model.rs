//! Batch consistency of our forward pass, the tokenizer and chat template against llama.cpp's
//! reference, and bad model files. (The logit oracle is in tests/oracle.rs.)

mod common;

use std::sync::OnceLock;

use aios::kv::KvSeq;
use aios::model::{load_model, LoadOptions, LoadedModel, SeqInput};
use serde_json::Value;

fn model() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| {
        aios::init_threads(2);
        load_model(&common::default_model_path(), &LoadOptions::default()).unwrap()
    })
}

/// Logits of the last token of `tokens`, prefilled at once into a fresh KV.
fn our_logits(tokens: &[u32]) -> (Vec<f32>, KvSeq) {
    let m = model();
    let mut kv = KvSeq::new(m.llama.kv_layout(), tokens.len());
    let out = m
        .llama
        .forward(&mut [SeqInput {
            tokens,
            kv: &mut kv,
            want_logits: true,
        }])
        .unwrap()
        .unwrap();
    (out.squeeze(0).unwrap().to_vec1().unwrap(), kv)
}

fn argmax(v: &[f32]) -> u32 {
    aios::engine::sampler::argmax(v)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn a_batch_gives_each_sequence_what_it_gets_alone() {
    let m = model();
    let a = m.tokenizer.encode("Once upon a time", false).unwrap();
    let b = m
        .tokenizer
        .encode("def fibonacci(n):\n    return", false)
        .unwrap();
    let (alone_a, mut kv_a) = our_logits(&a);
    let (alone_b, _) = our_logits(&b);
    // Batch: a's next decode token together with b's whole prefill.
    let next = argmax(&alone_a);
    let (ref_next, _) = our_logits(&[a.clone(), vec![next]].concat());
    let mut kv_b = KvSeq::new(m.llama.kv_layout(), 4);
    let out = m
        .llama
        .forward(&mut [
            SeqInput {
                tokens: &[next],
                kv: &mut kv_a,
                want_logits: true,
            },
            SeqInput {
                tokens: &b,
                kv: &mut kv_b,
                want_logits: true,
            },
        ])
        .unwrap()
        .unwrap();
    let rows: Vec<Vec<f32>> = out.to_vec2().unwrap();
    assert!(
        max_abs_diff(&rows[0], &ref_next) < 0.05,
        "decode row differs from a full prefill"
    );
    assert!(
        max_abs_diff(&rows[1], &alone_b) < 0.05,
        "prefill row differs in a batch"
    );
    assert_eq!(kv_a.len(), a.len() + 1);
    assert_eq!(kv_b.len(), b.len());
}

#[test]
fn tokenizer_matches_llama_cpp() {
    let reference = common::reference();
    let tok = &model().tokenizer;
    for case in reference["tokenize"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(tok.encode(text, true).unwrap(), want, "ids of {text:?}");
        assert_eq!(
            tok.decode(&want),
            text.replace("<|im_start|>", "").replace("<|im_end|>", "")
        );
    }
}

#[test]
fn chat_template_matches_llama_cpp() {
    let reference = common::reference();
    let m = model();
    let t = m
        .template
        .as_ref()
        .expect("the default model has a chat template");
    for key in ["chat_template", "chat_template_multi"] {
        let case = &reference[key];
        let messages: Vec<Value> = case["messages"].as_array().unwrap().clone();
        let rendered = t.render(&messages, None, true).unwrap();
        assert_eq!(rendered, case["rendered"].as_str().unwrap(), "{key}");
        if let Some(ids) = case.get("ids") {
            let want: Vec<u32> = serde_json::from_value(ids.clone()).unwrap();
            assert_eq!(m.tokenizer.encode(&rendered, true).unwrap(), want);
        }
    }
}

#[test]
fn truncated_or_garbage_model_files_give_errors_naming_the_file() {
    let dir = std::env::temp_dir().join(format!("aios-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let full = std::fs::read(common::default_model_path()).unwrap();
    for (name, bytes) in [
        ("truncated.gguf", full[..full.len() / 2].to_vec()),
        ("header-only.gguf", full[..5000].to_vec()),
        ("garbage.gguf", b"this is not a model".to_vec()),
        ("empty.gguf", vec![]),
    ] {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        let err = match load_model(&p, &LoadOptions::default()) {
            Ok(_) => panic!("{name} loaded"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(name), "{name}: {err}");
    }
    let err = load_model(&dir.join("missing.gguf"), &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("missing.gguf"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// llama.cpp's greedy continuations are our top tokens, step by step, near ties aside (see
/// `common::check_llama_cpp_greedy`); tests/portable.rs does the same on the portable kernels.
#[test]
fn llama_cpp_greedy_continuations_are_our_top_tokens_up_to_near_ties() {
    common::check_llama_cpp_greedy(model());
}

/// The same with the KV stored as 8-bit rows (`[kv] dtype = "q8"`). Its rounding moves the
/// two near ties of the reference (measured: " New" 0.20 → 0.27, "1" 0.08 → 0.11 logits behind
/// our top token; 2026-12-02 on AVX2, f16 " New" 0.05, q8 with the float kernels " New" 0.28,
/// with the integer ones, whose 16-bit queries and weights round too, " New" 0.02 and "1"
/// 0.10) and leaves every other step exact; a wrong scale or row layout would move logits by
/// whole units.
#[test]
fn with_8_bit_kv_llama_cpp_greedy_continuations_are_still_our_top_tokens() {
    common::check_llama_cpp_greedy_on(model(), aios::kv::KvDtype::Q8, 0.35);
}

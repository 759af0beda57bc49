//! Safetensors directories and the Hugging Face cache: the default model's GGUF weights are
//! written out as an HF-layout checkpoint (F16, Q/K un-permuted, tokenizer.json,
//! tokenizer_config.json with the chat template), then served through a repo id in a local HF
//! cache, and must compute what the GGUF model computes.

mod common;

use std::collections::HashMap;
use std::path::Path;

use aios::engine::sampler::argmax;
use aios::kv::KvSeq;
use aios::model::{load_model, LoadOptions, LoadedModel, SeqInput};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use serde_json::json;

/// llama.cpp stores Q and K rows permuted for interleaved RoPE; undo that for the HF layout.
fn unpermute(w: &Tensor, n_head: usize) -> Tensor {
    let (out, inp) = w.dims2().unwrap();
    w.reshape((n_head, out / n_head / 2, 2, inp))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((out, inp))
        .unwrap()
}

fn write_hf_checkpoint(dir: &Path, gguf: &LoadedModel) {
    let path = common::default_model_path();
    let mut f = std::fs::File::open(&path).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let cfg = &gguf.llama.cfg;
    let mut out: HashMap<String, Tensor> = HashMap::new();
    let mut put = |name: String, t: Tensor| {
        out.insert(name, t.to_dtype(DType::F16).unwrap());
    };
    let mut get = |name: &str| {
        ct.tensor(&mut f, name, &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap()
    };
    put("model.embed_tokens.weight".into(), get("token_embd.weight"));
    put("model.norm.weight".into(), get("output_norm.weight"));
    for i in 0..cfg.n_layers {
        let p = format!("model.layers.{i}");
        put(
            format!("{p}.self_attn.q_proj.weight"),
            unpermute(&get(&format!("blk.{i}.attn_q.weight")), cfg.n_heads),
        );
        put(
            format!("{p}.self_attn.k_proj.weight"),
            unpermute(&get(&format!("blk.{i}.attn_k.weight")), cfg.n_kv_heads),
        );
        for (hf, gg) in [
            ("self_attn.v_proj", "attn_v"),
            ("self_attn.o_proj", "attn_output"),
            ("mlp.gate_proj", "ffn_gate"),
            ("mlp.up_proj", "ffn_up"),
            ("mlp.down_proj", "ffn_down"),
            ("input_layernorm", "attn_norm"),
            ("post_attention_layernorm", "ffn_norm"),
        ] {
            put(
                format!("{p}.{hf}.weight"),
                get(&format!("blk.{i}.{gg}.weight")),
            );
        }
    }
    candle_core::safetensors::save(&out, dir.join("model.safetensors")).unwrap();
    let config = json!({
        "model_type": "llama", "hidden_size": cfg.hidden, "intermediate_size": cfg.intermediate,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "rms_norm_eps": cfg.rms_eps, "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.context_length, "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": true, "torch_dtype": "float16",
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    gguf.tokenizer
        .save_json(&dir.join("tokenizer.json"))
        .unwrap();
    let template = ct.metadata["tokenizer.chat_template"]
        .to_string()
        .unwrap()
        .clone();
    let tok_cfg = json!({"chat_template": template, "eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "add_bos_token": false});
    std::fs::write(dir.join("tokenizer_config.json"), tok_cfg.to_string()).unwrap();
}

fn logits(m: &LoadedModel, kv: &mut KvSeq, tokens: &[u32]) -> Vec<f32> {
    let t = m
        .llama
        .forward(&mut [SeqInput {
            tokens,
            kv,
            want_logits: true,
        }])
        .unwrap()
        .unwrap();
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn a_safetensors_checkpoint_in_the_hf_cache_computes_what_the_gguf_computes() {
    // Compare dense against dense: the GGUF weights dequantised, as the checkpoint holds them.
    unsafe { std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1") };
    aios::init_threads(2);
    let gguf = load_model(&common::default_model_path(), &LoadOptions::default()).unwrap();

    let root = std::env::temp_dir().join(format!("aios-hf-cache-{}", std::process::id()));
    let repo = root.join("models--test-org--smol-f16");
    let snap = repo.join("snapshots").join("0123abcd");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    write_hf_checkpoint(&snap, &gguf);

    unsafe { std::env::set_var("HF_HUB_CACHE", &root) };
    let resolved = aios::model::resolve::resolve("test-org/smol-f16").unwrap();
    assert_eq!(resolved, snap);
    let st = load_model(&resolved, &LoadOptions::default()).unwrap();
    assert!(st.format.contains("safetensors F16"), "{}", st.format);

    // Same tokenizer and template, read from tokenizer.json / tokenizer_config.json.
    let reference = common::reference();
    let case = &reference["chat_template"];
    let messages: Vec<serde_json::Value> = case["messages"].as_array().unwrap().clone();
    let rendered = st
        .template
        .as_ref()
        .unwrap()
        .render(&messages, None, true)
        .unwrap();
    assert_eq!(rendered, case["rendered"].as_str().unwrap());
    let ids = st.tokenizer.encode(&rendered, true).unwrap();
    let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
    assert_eq!(ids, want);
    assert!(st.tokenizer.is_eog(2));

    // Same logits (up to F16 weight rounding) and the same greedy continuation.
    let prompt = st.tokenizer.encode("Once upon a time", true).unwrap();
    let (mut kv_a, mut kv_b) = (
        KvSeq::new(st.llama.kv_layout(), 64),
        KvSeq::new(gguf.llama.kv_layout(), 64),
    );
    let (mut la, mut lb) = (
        logits(&st, &mut kv_a, &prompt),
        logits(&gguf, &mut kv_b, &prompt),
    );
    let diff = la
        .iter()
        .zip(&lb)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(diff < 0.25, "max |logit difference| = {diff}");
    let (mut a, mut b) = (vec![], vec![]);
    for _ in 0..12 {
        a.push(argmax(&la));
        b.push(argmax(&lb));
        la = logits(&st, &mut kv_a, &[*a.last().unwrap()]);
        lb = logits(&gguf, &mut kv_b, &[*b.last().unwrap()]);
    }
    assert_eq!(st.tokenizer.decode(&a), gguf.tokenizer.decode(&b));

    // A truncated weights file is refused, naming the file.
    let file = snap.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_model(&snap, &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    std::fs::remove_dir_all(root).unwrap();
}

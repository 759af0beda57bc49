//! Single-stream speed of our forward pass on the default model, against stock candle
//! (candle-transformers' quantized_llama) in the same process.
//!
//!     cargo bench --bench model                 # 2 threads
//!     AIOS_BENCH_THREADS=1 cargo bench --bench model
//!     AIOS_BENCH_KV=q8 cargo bench --bench model  # KV stored as 8-bit rows
//!     AIOS_BENCH_WEIGHTS=Q8_0,Q6K cargo bench --bench model
//!
//! `AIOS_BENCH_WEIGHTS=MAIN,DOWN` times the default model re-quantised: every matrix to
//! `MAIN` but `ffn_down` to `DOWN` (GGUF type names as candle spells them: Q4_0, Q8_0, Q4K,
//! Q6K, ...), written once to `target/bench-models/`.
//!
//! Reports prefill (pp512, and 2,000 tokens), decode (tg128 after a short prompt, and 64
//! tokens after 2,000 tokens of context) and batched decode at B = 1..32, in tokens/s, then
//! the same as one JSON line.

use std::time::Instant;

use aios::kv::KvSeq;
use aios::model::{load_model, LoadOptions, SeqInput};
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};

#[path = "../tests/common/requant.rs"]
mod requant;

/// A GGUF type by candle's name for it (`Q6K`, `Q8_0`, ...).
fn ggml_type(name: &str) -> GgmlDType {
    use GgmlDType::*;
    [
        F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2K, Q3K, Q4K, Q5K, Q6K, Q8K,
    ]
    .into_iter()
    .find(|t| format!("{t:?}") == name.trim())
    .unwrap_or_else(|| panic!("unknown GGUF type {name}"))
}

fn tokens(n: usize, tok: &aios::model::Tokenizer) -> Vec<u32> {
    let text = "The quick brown fox jumps over the lazy dog while the scheduler batches every agent's request into one step. ";
    let base = tok.encode(text, false).unwrap();
    base.iter().cycle().take(n).copied().collect()
}

fn main() {
    let threads: usize = std::env::var("AIOS_BENCH_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    aios::init_threads(threads);
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut path = root.join(aios::config::DEFAULT_MODEL_PATH);
    if let Ok(spec) = std::env::var("AIOS_BENCH_WEIGHTS") {
        let (main, down) = spec.split_once(',').unwrap_or((&spec, &spec));
        let out = root.join(format!("target/bench-models/smollm2-{main}-{down}.gguf"));
        if !out.exists() {
            std::fs::create_dir_all(out.parent().unwrap()).unwrap();
            let tmp = out.with_extension("part");
            requant::requantize(&path, &tmp, ggml_type(main), ggml_type(down));
            std::fs::rename(&tmp, &out).unwrap();
        }
        path = out;
    }
    let m = load_model(&path, &LoadOptions::default()).expect("run scripts/fetch-model.sh first");
    let dtype = match std::env::var("AIOS_BENCH_KV").as_deref() {
        Ok("q8") => aios::kv::KvDtype::Q8,
        _ => aios::kv::KvDtype::F16,
    };
    let layout = aios::kv::KvLayout {
        dtype,
        ..m.llama.kv_layout()
    };
    println!(
        "model: {} ({}), threads: {threads}, KV: {}",
        m.source,
        m.format,
        dtype.name()
    );

    let ours_prefill = |n: usize| -> (f64, KvSeq) {
        let toks = tokens(n, &m.tokenizer);
        let mut kv = KvSeq::new(layout, n + 128);
        let t = Instant::now();
        m.llama
            .forward(&mut [SeqInput {
                tokens: &toks,
                kv: &mut kv,
                want_logits: true,
            }])
            .unwrap();
        (n as f64 / t.elapsed().as_secs_f64(), kv)
    };
    let ours_decode = |kv: &mut KvSeq, n: usize| -> f64 {
        let t = Instant::now();
        let mut tok = 504u32;
        for _ in 0..n {
            let l = m
                .llama
                .forward(&mut [SeqInput {
                    tokens: &[tok],
                    kv,
                    want_logits: true,
                }])
                .unwrap()
                .unwrap();
            tok = aios::engine::sampler::argmax(&l.squeeze(0).unwrap().to_vec1::<f32>().unwrap());
        }
        n as f64 / t.elapsed().as_secs_f64()
    };

    let _ = ours_prefill(64); // warm up
    let (pp512, _) = ours_prefill(512);
    let (pp2000, mut kv2000) = ours_prefill(2000);
    let (_, mut kv_short) = ours_prefill(16);
    let tg128 = ours_decode(&mut kv_short, 128);
    let tg_at2000 = ours_decode(&mut kv2000, 64);

    // Batched decode (as llama-batched-bench's S_TG): B sequences after a 16-token prompt each,
    // 32 steps, every step one token of each sequence through the model as one batch.
    let batched: Vec<(usize, f64)> = [1usize, 4, 8, 16, 32]
        .iter()
        .map(|&b| {
            let prompt = tokens(16, &m.tokenizer);
            let mut kvs: Vec<KvSeq> = (0..b).map(|_| KvSeq::new(layout, 64)).collect();
            let mut inputs: Vec<SeqInput> = kvs
                .iter_mut()
                .map(|kv| SeqInput {
                    tokens: &prompt,
                    kv,
                    want_logits: true,
                })
                .collect();
            m.llama.forward(&mut inputs).unwrap();
            let steps = 32;
            let next = [504u32];
            let t = Instant::now();
            for _ in 0..steps {
                let mut inputs: Vec<SeqInput> = kvs
                    .iter_mut()
                    .map(|kv| SeqInput {
                        tokens: &next,
                        kv,
                        want_logits: true,
                    })
                    .collect();
                m.llama.forward(&mut inputs).unwrap();
            }
            (b, (b * steps) as f64 / t.elapsed().as_secs_f64())
        })
        .collect();
    for (b, tps) in &batched {
        println!("batched decode B={b:<2}: {tps:>7.1} tokens/s");
    }

    // Attention alone: one decode token against 2,000 positions, every layer.
    let heads = aios::ops::attention::Heads {
        n_heads: m.llama.cfg.n_heads,
        n_kv_heads: m.llama.cfg.n_kv_heads,
        head_dim: m.llama.cfg.head_dim,
    };
    let q = vec![0.1f32; heads.n_heads * heads.head_dim];
    let t = Instant::now();
    let reps = 20;
    for _ in 0..reps {
        for layer in 0..layout.n_layers {
            let seqs = [aios::ops::attention::AttnSeq {
                kv: &kv2000,
                row: 0,
                n_tokens: 1,
                first_pos: kv2000.len() - 1,
            }];
            std::hint::black_box(aios::ops::attention::attention(&q, &seqs, layer, heads));
        }
    }
    let attn_ms = t.elapsed().as_secs_f64() * 1000.0 / reps as f64;
    println!(
        "attention of one token at {} ctx, all layers: {attn_ms:.2} ms",
        kv2000.len()
    );

    // Stock candle on the same file.
    let mut f = std::fs::File::open(&path).unwrap();
    let ct = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let mut stock = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
        ct,
        &mut f,
        &Device::Cpu,
    )
    .unwrap();
    let s_pp512 = stock_prefill(&mut stock, &tokens(512, &m.tokenizer));
    let s_pp2000 = stock_prefill(&mut stock, &tokens(2000, &m.tokenizer));
    let s_tg_at2000 = stock_decode(&mut stock, 2000, 64);
    stock_prefill(&mut stock, &tokens(16, &m.tokenizer));
    let s_tg128 = stock_decode(&mut stock, 16, 128);

    println!(
        "{:<28} {:>10} {:>10} {:>7}",
        "tokens/s", "aios", "candle", "ratio"
    );
    for (name, a, b) in [
        ("prefill pp512", pp512, s_pp512),
        ("prefill 2000", pp2000, s_pp2000),
        ("decode tg128 (short ctx)", tg128, s_tg128),
        ("decode at 2000 ctx", tg_at2000, s_tg_at2000),
    ] {
        println!("{name:<28} {a:>10.1} {b:>10.1} {:>6.2}x", a / b);
    }
    // One line for scripts (scripts/bench-vs-llama-cpp.sh).
    let mut json = serde_json::json!({
        "pp512": pp512, "pp2000": pp2000, "tg128": tg128, "tg_at2000": tg_at2000,
        "attention_ms_at_2064": attn_ms,
    });
    for (b, tps) in batched {
        json[format!("batched_b{b}")] = tps.into();
    }
    println!("{json}");
}

type Stock = candle_transformers::models::quantized_llama::ModelWeights;

fn stock_prefill(stock: &mut Stock, toks: &[u32]) -> f64 {
    let x = Tensor::new(toks, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let t = Instant::now();
    stock.forward(&x, 0).unwrap();
    toks.len() as f64 / t.elapsed().as_secs_f64()
}

/// Decode `n` tokens at positions `start..`, after a prefill of `start` tokens.
fn stock_decode(stock: &mut Stock, start: usize, n: usize) -> f64 {
    let t = Instant::now();
    for i in 0..n {
        let x = Tensor::new(&[504u32], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        stock.forward(&x, start + i).unwrap();
    }
    n as f64 / t.elapsed().as_secs_f64()
}

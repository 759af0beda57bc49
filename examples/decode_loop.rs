//! Decode alone on the default model, for a profiler (`perf record`): a prompt of CTX tokens,
//! then N greedy decode steps, timed; no stock-candle comparison in the same process.
//!
//!     cargo build --release --example decode_loop
//!     CTX=2000 N=100 KV=q8 target/release/examples/decode_loop
//!
//! CTX (default 16), N (default 300), KV (`f16` or `q8`, default f16), THREADS (default 2).
//! Several lengths (`CTX=16,2000`) take turns a step at a time, each truncated back to its
//! length after every step, and the ratio of their step times is printed: figures from the
//! same minutes of a noisy machine.
//!
//!     CTX=16,2000 N=200 target/release/examples/decode_loop
//! STEP=k (k > 1) times an agent's next turn instead: each step feeds k new tokens after the
//! CTX-token context and truncates back to it, so every step sees the same context.
//!
//!     CTX=1400 STEP=3 N=50 target/release/examples/decode_loop

use std::time::Instant;

use aios::kv::{KvDtype, KvSeq};
use aios::model::{load_model, LoadOptions, SeqInput};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn main() {
    aios::init_threads(env("THREADS", 2));
    let path =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(aios::config::DEFAULT_MODEL_PATH);
    let m = load_model(&path, &LoadOptions::default()).expect("run scripts/fetch-model.sh first");
    let (n, step) = (env("N", 300), env("STEP", 1).max(1));
    let ctxs: Vec<usize> = std::env::var("CTX")
        .unwrap_or_else(|_| "16".into())
        .split(',')
        .map(|c| {
            c.trim()
                .parse()
                .expect("CTX: token counts separated by commas")
        })
        .collect();
    let mut layout = m.llama.kv_layout();
    if std::env::var("KV").as_deref() == Ok("q8") {
        layout.dtype = KvDtype::Q8;
    }
    // One sequence per context length, each prefilled with its own prompt.
    let mut seqs: Vec<KvSeq> = ctxs
        .iter()
        .map(|&ctx| {
            let mut kv = KvSeq::new(layout, ctx + n + step);
            let prompt: Vec<u32> = (0..ctx as u32).map(|i| 100 + i % 1000).collect();
            m.llama
                .forward(&mut [SeqInput {
                    tokens: &prompt,
                    kv: &mut kv,
                    want_logits: true,
                }])
                .expect("prefill");
            kv
        })
        .collect();
    // Several lengths take turns a step at a time, each truncated back to its length, so they
    // are timed over the same stretch of a noisy machine and their ratio holds.
    let fixed = step > 1 || ctxs.len() > 1;
    let mut secs = vec![0f64; ctxs.len()];
    let mut tok = 504u32;
    for _ in 0..n {
        for (i, kv) in seqs.iter_mut().enumerate() {
            let started = Instant::now();
            if fixed {
                kv.truncate(ctxs[i]);
            }
            let turn: Vec<u32> = (0..step as u32).map(|i| tok + i).collect();
            let logits = m
                .llama
                .forward(&mut [SeqInput {
                    tokens: &turn,
                    kv,
                    want_logits: true,
                }])
                .expect("decode step")
                .expect("logits");
            let row: Vec<f32> = logits.squeeze(0).unwrap().to_vec1().unwrap();
            tok = aios::engine::sampler::argmax(&row);
            secs[i] += started.elapsed().as_secs_f64();
        }
    }
    for (ctx, secs) in ctxs.iter().zip(&secs) {
        println!(
            "{} KV, {ctx} tokens of context, {step} new a step: {:.1} steps/s ({:.2} ms a step)",
            layout.dtype.name(),
            n as f64 / secs,
            secs * 1e3 / n as f64
        );
    }
    if secs.len() > 1 {
        let ratios: Vec<String> = secs[1..]
            .iter()
            .map(|s| format!("{:.3}", s / secs[0]))
            .collect();
        println!("step time against the first length: {}", ratios.join(", "));
    }
}

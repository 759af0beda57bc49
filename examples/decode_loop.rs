//! Decode alone on the default model, for a profiler (`perf record`): a prompt of CTX tokens,
//! then N greedy decode steps, timed; no stock-candle comparison in the same process.
//!
//!     cargo build --release --example decode_loop
//!     CTX=2000 N=100 KV=q8 target/release/examples/decode_loop
//!
//! CTX (default 16), N (default 300), KV (`f16` or `q8`, default f16), THREADS (default 2).
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
    let (ctx, n, step) = (env("CTX", 16), env("N", 300), env("STEP", 1).max(1));
    let mut layout = m.llama.kv_layout();
    if std::env::var("KV").as_deref() == Ok("q8") {
        layout.dtype = KvDtype::Q8;
    }
    let mut kv = KvSeq::new(layout, ctx + n + step);
    let prompt: Vec<u32> = (0..ctx as u32).map(|i| 100 + i % 1000).collect();
    m.llama
        .forward(&mut [SeqInput {
            tokens: &prompt,
            kv: &mut kv,
            want_logits: true,
        }])
        .expect("prefill");
    let started = Instant::now();
    let mut tok = 504u32;
    for _ in 0..n {
        if step > 1 {
            kv.truncate(ctx);
        }
        let turn: Vec<u32> = (0..step as u32).map(|i| tok + i).collect();
        let logits = m
            .llama
            .forward(&mut [SeqInput {
                tokens: &turn,
                kv: &mut kv,
                want_logits: true,
            }])
            .expect("decode step")
            .expect("logits");
        let row: Vec<f32> = logits.squeeze(0).unwrap().to_vec1().unwrap();
        tok = aios::engine::sampler::argmax(&row);
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{} KV, {ctx} tokens of context, {step} new a step: {:.1} steps/s ({:.2} ms a step)",
        layout.dtype.name(),
        n as f64 / secs,
        secs * 1e3 / n as f64
    );
}

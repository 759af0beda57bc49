use aios::kv::KvSeq;
use aios::model::{load_model, LoadOptions, SeqInput};
fn main() {
    aios::init_threads(2);
    let m = load_model(
        std::path::Path::new("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
        &LoadOptions::default(),
    )
    .unwrap();
    let b: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let n: usize = std::env::var("N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let mut kvs: Vec<KvSeq> = (0..b)
        .map(|_| KvSeq::new(m.llama.kv_layout(), n + 16))
        .collect();
    let t = std::time::Instant::now();
    let toks: Vec<[u32; 1]> = (0..b).map(|i| [504 + i as u32]).collect();
    for _ in 0..n {
        let mut inp: Vec<SeqInput> = kvs
            .iter_mut()
            .zip(&toks)
            .map(|(kv, t)| SeqInput {
                tokens: t,
                kv,
                want_logits: true,
            })
            .collect();
        m.llama.forward(&mut inp).unwrap();
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "B={b}: {:.1} tok/s ({:.2} ms/step)",
        (n * b) as f64 / s,
        s * 1e3 / n as f64
    );
}

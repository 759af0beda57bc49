//! Quantised matmul kernels alone: memory bandwidth for matrix × vector (decode) and
//! arithmetic rate for matrix × small matrix (batched decode, prefill chunks), against the
//! memory bandwidth measured in the same run and candle's `QMatMul` on the same weights.
//!
//!     cargo bench --bench kernels                 # 2 threads
//!     AIOS_BENCH_THREADS=1 cargo bench --bench kernels
//!     AIOS_CPU_KERNELS=portable cargo bench --bench kernels
//!     AIOS_BENCH_ONLY=matmul AIOS_BENCH_FORMATS=Q6K,Q4K cargo bench --bench kernels
//!
//!     AIOS_BENCH_VS=avxvnni cargo bench --bench kernels
//!
//! `AIOS_BENCH_ONLY` is `attention` or `matmul` (both by default); `AIOS_BENCH_FORMATS` lists the
//! weight formats to time (all eight by default). `AIOS_BENCH_VS=NAME` times our kernels on the
//! kernel set in use and on `NAME` alternately, fifteen times each in the same process (a fair
//! comparison on a machine whose speed drifts), instead of the table.
//!
//! The weight matrices (65,536 × 1,024) are larger than the last-level cache, so decode figures
//! are DRAM figures. Attention is timed twice: repeated over the same KV (in cache), and "cold",
//! after writing 512 MB to flush the caches, as in a model's step, where the weights stream
//! through them between two reads of a layer's KV.

use std::time::Instant;

use aios::ops::quant::{isa, QActs, QWeight};
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

const ROWS: usize = 65_536;
const COLS: usize = 1_024;

/// Best of `reps` timings, in seconds.
fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Best of `reps` timings of `f`, each after `before` (untimed), in seconds.
fn best_after(reps: usize, before: &mut impl FnMut(), mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            before();
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Pushes everything else out of the caches: writes a buffer larger than the last-level cache
/// this machine reports (at least 512 MB).
fn evictor() -> impl FnMut() {
    let mut buf = vec![0u64; (512 << 20) >> 3];
    let mut pass = 0u64;
    move || {
        pass += 1;
        for x in buf.iter_mut().step_by(8) {
            *x = pass;
        }
        std::hint::black_box(&buf);
    }
}

/// Read bandwidth of this machine with `threads` threads streaming a 256 MB buffer.
fn memory_bandwidth(threads: usize) -> f64 {
    let words: usize = (256 << 20) >> 3;
    let buf: Vec<u64> = (0..words as u64).collect();
    let secs = best(5, || {
        std::thread::scope(|s| {
            for part in buf.chunks(words.div_ceil(threads)) {
                s.spawn(move || {
                    let (chunks, _) = part.as_chunks::<8>();
                    let mut acc = [0u64; 8];
                    for c in chunks {
                        for i in 0..8 {
                            acc[i] = acc[i].wrapping_add(c[i]);
                        }
                    }
                    std::hint::black_box(acc);
                });
            }
        })
    });
    (words * 8) as f64 / secs / 1e9
}

fn main() {
    let threads: usize = std::env::var("AIOS_BENCH_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    // candle's pool (ours too) is sized from this when first used.
    std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
    aios::init_threads(threads);
    let bw = memory_bandwidth(threads);
    println!(
        "threads: {threads}, kernels: {}, memory read bandwidth: {bw:.1} GB/s",
        isa().name()
    );
    println!(
        "{:<6} {:>9} {:>9} {:>7} {:>8} | {:>11} {:>11} {:>8} | {:>11} {:>8} {:>8}",
        "format",
        "MB",
        "M=1 GB/s",
        "of bw",
        "vs cndl",
        "M=16 GFLOP",
        "M=64 GFLOP",
        "vs cndl",
        "candle M=1",
        "cndl M=16",
        "cndl M=64"
    );
    let only = std::env::var("AIOS_BENCH_ONLY").ok();
    if only.as_deref() != Some("matmul") {
        attention_bench(bw);
    }
    if only.as_deref() == Some("attention") {
        return;
    }
    let formats = std::env::var("AIOS_BENCH_FORMATS").ok();
    let dev = Device::Cpu;
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let wf: Vec<f32> = (0..ROWS * COLS).map(|_| next()).collect();
    let w = Tensor::from_vec(wf, (ROWS, COLS), &dev).unwrap();
    for kind in aios::ops::quant::QKind::ALL.map(|k| k.ggml()) {
        if formats
            .as_deref()
            .is_some_and(|f| !f.split(',').any(|f| f.trim() == format!("{kind:?}")))
        {
            continue;
        }
        let q = QTensor::quantize(&w, kind).unwrap();
        let ours = QWeight::from_qtensor(&q).unwrap();
        if let Some(other) = std::env::var("AIOS_BENCH_VS").ok().as_deref().map(|n| {
            aios::ops::quant::Isa::parse(n)
                .filter(|i| aios::ops::quant::Isa::available().contains(i))
                .unwrap_or_else(|| panic!("AIOS_BENCH_VS={n}: not a kernel set this CPU runs"))
        }) {
            for m in [1, 16, 64] {
                let x: Vec<f32> = (0..m * COLS).map(|_| next()).collect();
                let acts = QActs::quantize(&x, m, COLS);
                let mut times = [Vec::new(), Vec::new()];
                for _ in 0..15 {
                    for (t, set) in times.iter_mut().zip([isa(), other]) {
                        let start = Instant::now();
                        std::hint::black_box(ours.matmul_with(set, &acts));
                        t.push(start.elapsed().as_secs_f64());
                    }
                }
                let median = |t: &mut Vec<f64>| {
                    t.sort_by(f64::total_cmp);
                    2.0 * (ROWS * COLS * m) as f64 / t[t.len() / 2] / 1e9
                };
                let (a, b) = (median(&mut times[0]), median(&mut times[1]));
                println!(
                    "{kind:?} M={m:<2}: {} {a:.1}, {} {b:.1} GFLOP/s (medians), {:.2}x",
                    isa().name(),
                    other.name(),
                    a / b
                );
            }
            continue;
        }
        let theirs = QMatMul::from_qtensor(q).unwrap();
        let mb = ours.bytes() as f64 / 1e6;
        let gflop = |m: usize, secs: f64| 2.0 * (ROWS * COLS * m) as f64 / secs / 1e9;
        let mut ours_at = |m: usize, reps: usize| {
            let x: Vec<f32> = (0..m * COLS).map(|_| next()).collect();
            let acts = QActs::quantize(&x, m, COLS);
            best(reps, || {
                std::hint::black_box(ours.matmul(&acts));
            })
        };
        let (o1, o16, o64) = (ours_at(1, 20), ours_at(16, 5), ours_at(64, 3));
        let theirs_at = |m: usize, reps: usize| {
            let x = Tensor::ones((m, COLS), candle_core::DType::F32, &dev).unwrap();
            best(reps, || {
                std::hint::black_box(theirs.forward(&x).unwrap());
            })
        };
        let (t1, t16, t64) = (theirs_at(1, 10), theirs_at(16, 2), theirs_at(64, 2));
        let gbs = ours.bytes() as f64 / o1 / 1e9;
        println!(
            "{:<6} {:>9.1} {:>9.1} {:>6.0}% {:>7.2}x | {:>11.1} {:>11.1} {:>7.2}x | {:>11.1} {:>8.1} {:>8.1}",
            format!("{kind:?}"),
            mb,
            gbs,
            100.0 * gbs / bw,
            t1 / o1,
            gflop(16, o16),
            gflop(64, o64),
            t16 / o16,
            ours.bytes() as f64 / t1 / 1e9,
            gflop(16, t16),
            gflop(64, t64),
        );
    }
}

/// Attention of new query rows over a sequence's stored KV (f16, then q8), with the default
/// model's shapes (30 layers, 9 query heads sharing 3 KV heads of 64): a decode step reads every
/// layer's K and V rows once, so its rate is given as GB/s of KV read, against the measured
/// bandwidth.
fn attention_bench(bw: f64) {
    use aios::kv::KvDtype;
    for dtype in [KvDtype::F16, KvDtype::Q8] {
        if std::env::var("AIOS_BENCH_KV").is_ok_and(|d| d != dtype.name()) {
            continue;
        }
        attention_bench_of(bw, dtype);
    }
}

fn attention_bench_of(bw: f64, dtype: aios::kv::KvDtype) {
    use aios::kv::{KvLayout, KvSeq};
    use aios::ops::attention::{attention, AttnSeq, Heads};
    let layout = KvLayout {
        n_layers: 30,
        n_kv_heads: 3,
        head_dim: 64,
        dtype,
    };
    let h = Heads {
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
    };
    let width = h.n_heads * h.head_dim;
    println!(
        "attention (30 layers, 9 heads / 3 KV heads of 64, {:>3} KV): {:>6} {:>6} {:>9} {:>8} {:>7} {:>9} {:>8} {:>7}",
        dtype.name(),
        "ctx",
        "new",
        "ms/step",
        "KV GB/s",
        "of bw",
        "cold ms",
        "GB/s",
        "of bw"
    );
    let mut evict = evictor();
    // AIOS_BENCH_ATTN=2000x1 times one shape only, any context and new tokens (for a profiler,
    // or a shape the table leaves out).
    let only: Option<(usize, usize)> = std::env::var("AIOS_BENCH_ATTN").ok().map(|o| {
        let parsed = o
            .split_once('x')
            .and_then(|(c, n)| Some((c.parse().ok()?, n.parse().ok()?)));
        parsed.unwrap_or_else(|| panic!("AIOS_BENCH_ATTN={o}: want CONTEXTxNEW, as 2000x1"))
    });
    let table = [
        (16, 1),
        (500, 1),
        (2000, 1),
        (4000, 1),
        (1400, 2),
        (1400, 16),
    ];
    for (ctx, new) in only.map_or(table.to_vec(), |shape| vec![shape]) {
        let total = ctx + new;
        let mut kv = KvSeq::new(layout, total);
        kv.reserve(total).unwrap();
        let kvw = h.n_kv_heads * h.head_dim;
        let vals: Vec<f32> = (0..total * kvw)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        for layer in 0..layout.n_layers {
            kv.write(layer, &vals, &vals);
        }
        let q: Vec<f32> = (0..new * width)
            .map(|i| ((i * 31) % 97) as f32 / 97.0 - 0.5)
            .collect();
        let seqs = [AttnSeq {
            kv: &kv,
            row: 0,
            n_tokens: new,
            first_pos: ctx,
        }];
        let reps = if only.is_some() { 500 } else { 20 };
        let step = || {
            for layer in 0..layout.n_layers {
                std::hint::black_box(attention(&q, &seqs, layer, h));
            }
        };
        let secs = best(reps, step);
        // As in a model's step, where the weights stream through the caches between two reads
        // of a layer's KV: the caches flushed before each timing.
        let cold = best_after(reps.min(40), &mut evict, step);
        let bytes = (total * layout.bytes_per_token()) as f64;
        let gbs = bytes / secs / 1e9;
        let cold_gbs = bytes / cold / 1e9;
        println!(
            "{:>66} {:>6} {:>9.3} {:>8.1} {:>6.0}% {:>9.3} {:>8.1} {:>6.0}%",
            ctx,
            new,
            secs * 1e3,
            gbs,
            100.0 * gbs / bw,
            cold * 1e3,
            cold_gbs,
            100.0 * cold_gbs / bw
        );
    }
}

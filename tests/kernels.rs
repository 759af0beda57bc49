//! Quantised matmul kernels against a straightforward reference: candle dequantises the GGUF
//! weights to f32, our activation blocks are dequantised to f32, and the product is summed in
//! f64. Every instruction set this machine has is checked, the portable path included, over
//! odd shapes (1, 2 and 3 rows, counts not a multiple of the tile, more activation rows than one
//! task takes) and the default model's real widths.

use aios::ops::quant::{Isa, QActs, QKind, QWeight};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

fn random(n: usize, rng: &mut rand::rngs::StdRng) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Quantise random weights with candle; returns ours and the dequantised reference.
fn weight(kind: GgmlDType, rows: usize, cols: usize, seed: u64) -> (QWeight, Vec<f32>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let w = Tensor::from_vec(random(rows * cols, &mut rng), (rows, cols), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&w, kind).unwrap();
    let reference = q
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let kind = QKind::from_ggml(q.dtype()).expect("supported kind");
    let data = q.data().unwrap().into_owned();
    (
        QWeight::from_bytes(kind, rows, cols, data).unwrap(),
        reference,
    )
}

fn check(kind: GgmlDType, rows: usize, cols: usize, m: usize, isa: Isa, interleave: bool) {
    let seed = (rows * 31 + cols * 7 + m) as u64;
    let (w, wf) = weight(kind, rows, cols, seed);
    let w = if interleave { w.interleaved() } else { w };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 1);
    let x = random(m * cols, &mut rng);
    let acts = QActs::quantize(&x, m, cols);
    let xf = acts.dequantize();
    // Activation quantisation is close to the input (8 bits, per-block scale).
    for (a, b) in xf.iter().zip(&x) {
        assert!(
            (a - b).abs() <= 1.0 / 127.0 + 1e-6,
            "activation block error"
        );
    }
    let y = w.matmul_with(isa, &acts);
    assert_eq!(y.len(), m * rows);
    for j in 0..m {
        for r in 0..rows {
            let (mut exact, mut mag) = (0f64, 0f64);
            for c in 0..cols {
                let p = wf[r * cols + c] as f64 * xf[j * cols + c] as f64;
                exact += p;
                mag += p.abs();
            }
            let got = y[j * rows + r] as f64;
            assert!(
                (got - exact).abs() <= 2e-3 * mag + 1e-4,
                "{kind:?} {isa:?} interleaved={interleave} rows={rows} cols={cols} m={m}: cell ({j},{r}) = {got}, want {exact}"
            );
        }
    }
}

#[test]
fn every_kernel_matches_the_dequantised_reference_on_every_path() {
    let of_len = |n| QKind::ALL.into_iter().filter(move |k| k.block_len() == n);
    let small: Vec<GgmlDType> = of_len(32).map(QKind::ggml).collect();
    let k: Vec<GgmlDType> = of_len(256).map(QKind::ggml).collect();
    for (isa, interleave) in Isa::available()
        .into_iter()
        .flat_map(|i| [(i, false), (i, true)])
    {
        for &kind in &small {
            for (rows, cols, m) in [
                (1, 32, 1),
                (2, 64, 1),
                (3, 96, 2),
                (5, 576, 3),
                (7, 576, 4),
                (67, 576, 5),
                (9, 1536, 9),
                (130, 64, 70),
            ] {
                check(kind, rows, cols, m, isa, interleave);
            }
        }
        for &kind in &k {
            for (rows, cols, m) in [
                (1, 256, 1),
                (3, 512, 2),
                (5, 256, 4),
                (67, 768, 3),
                (9, 1536, 70),
            ] {
                check(kind, rows, cols, m, isa, interleave);
            }
        }
    }
}

#[test]
fn a_rows_result_does_not_depend_on_its_tile() {
    // With AVX-512, pairs of interleaved groups run on 512-bit registers and a group left over
    // on 256-bit ones, and up to four activation rows share a tile. A row's result must be the
    // same bits whichever (the model's batch invariance rests on it). Rows 16..24 of a 24-row
    // matrix are a lone group; as rows 8..16 of its last 16 rows, half of a pair.
    let cols = 512;
    for kind in QKind::ALL.map(QKind::ggml) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let w = Tensor::from_vec(random(24 * cols, &mut rng), (24, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, kind).unwrap();
        let kind = QKind::from_ggml(kind).unwrap();
        let data = q.data().unwrap().into_owned();
        let row_bytes = data.len() / 24;
        let all = QWeight::from_bytes(kind, 24, cols, data.clone())
            .unwrap()
            .interleaved();
        let last = QWeight::from_bytes(kind, 16, cols, data[8 * row_bytes..].to_vec())
            .unwrap()
            .interleaved();
        let x = random(5 * cols, &mut rng);
        let five = QActs::quantize(&x, 5, cols);
        let one = QActs::quantize(&x[..cols], 1, cols);
        for isa in Isa::available() {
            let y_all = all.matmul_with(isa, &five);
            let y_last = last.matmul_with(isa, &five);
            let y_one = all.matmul_with(isa, &one);
            for j in 0..5 {
                for r in 8..24 {
                    assert_eq!(
                        y_all[j * 24 + r].to_bits(),
                        y_last[j * 16 + r - 8].to_bits(),
                        "{kind:?} {isa:?} activation row {j}, weight row {r}"
                    );
                }
            }
            for r in 0..24 {
                assert_eq!(y_all[r].to_bits(), y_one[r].to_bits(), "{kind:?} {isa:?}");
            }
        }
    }
}

#[test]
fn paths_agree_on_the_default_models_shapes() {
    // The Q/K/V, output, FFN and vocabulary projections of SmolLM2-135M (vocabulary cut to
    // keep the test quick), one decode row and a small batch.
    let paths = Isa::available();
    for (kind, rows, cols) in [
        (GgmlDType::Q4_1, 576, 576),
        (GgmlDType::Q4_1, 192, 576),
        (GgmlDType::Q4_1, 1536, 576),
        (GgmlDType::Q4_1, 576, 1536),
        (GgmlDType::Q8_0, 4096, 576),
    ] {
        let (plain, _) = weight(kind, rows, cols, 7);
        let (w, _) = weight(kind, rows, cols, 7);
        let w = w.interleaved();
        for m in [1, 16] {
            let mut rng = rand::rngs::StdRng::seed_from_u64(m as u64);
            let acts = QActs::quantize(&random(m * cols, &mut rng), m, cols);
            let outs: Vec<Vec<f32>> = paths
                .iter()
                .flat_map(|&isa| [w.matmul_with(isa, &acts), plain.matmul_with(isa, &acts)])
                .collect();
            for o in &outs[1..] {
                for (a, b) in o.iter().zip(&outs[0]) {
                    assert!(
                        (a - b).abs() <= 1e-3 * (1.0 + b.abs()),
                        "{kind:?} {a} vs {b}"
                    );
                }
            }
        }
    }
}

#[test]
fn unsupported_shapes_and_kinds_are_left_to_candle() {
    let w = Tensor::zeros((4, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
    let q4 = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
    assert!(QWeight::from_qtensor(&q4).is_some());
    // Q3_K has no kernel here; K formats need widths in multiples of 256.
    let w256 = Tensor::zeros((4, 256), candle_core::DType::F32, &Device::Cpu).unwrap();
    let q3k = QTensor::quantize(&w256, GgmlDType::Q3K).unwrap();
    assert!(QWeight::from_qtensor(&q3k).is_none());
    let q5 = QTensor::quantize(&w, GgmlDType::Q5_0).unwrap();
    assert!(QWeight::from_qtensor(&q5).is_some());
    assert!(QWeight::from_bytes(QKind::Q4_1, 4, 64, vec![0; 10]).is_none());
    assert!(QWeight::from_bytes(QKind::Q4K, 1, 64, vec![0; 36]).is_none());
}

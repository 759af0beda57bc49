//! The logit oracle: our forward pass against candle-transformers' `quantized_llama` on the
//! default model.
//!
//! Both run with the GGUF weights dequantised to f32 (`CANDLE_DEQUANTIZE_ALL`), so the only
//! differences left are summation order and our f16 KV cache. With quantised activations
//! (Q8_1) a difference in the last bit can flip a rounding step and grow through 30 layers,
//! which would make logit comparisons meaningless; the quantised path is checked instead
//! against llama.cpp's greedy continuations (tests/api.rs).

mod common;

use aios::engine::sampler::argmax;
use aios::kv::KvSeq;
use aios::model::{load_model, LoadOptions, SeqInput};
use candle_core::{Device, Tensor};

fn row(t: Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn logits_and_32_greedy_tokens_match_candle_transformers() {
    // Read by candle when each QMatMul is built; this binary holds only this test.
    unsafe { std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1") };
    aios::init_threads(2);
    let path = common::default_model_path();
    let ours = load_model(&path, &LoadOptions::default()).unwrap();
    let mut f = std::fs::File::open(&path).unwrap();
    let ct = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let mut oracle = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
        ct,
        &mut f,
        &Device::Cpu,
    )
    .unwrap();
    let dev = Device::Cpu;
    let prompts = [
        "The capital of France is",
        "Once upon a time",
        "def add(a, b):\n   ",
    ];
    for prompt in prompts {
        let ids = ours.tokenizer.encode(prompt, false).unwrap();
        let x = Tensor::new(ids.as_slice(), &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let mut theirs_l = row(oracle.forward(&x, 0).unwrap());
        let mut kv = KvSeq::new(ours.llama.kv_layout(), ids.len());
        let mut ours_l = row(ours
            .llama
            .forward(&mut [SeqInput {
                tokens: &ids,
                kv: &mut kv,
                want_logits: true,
            }])
            .unwrap()
            .unwrap());
        let diff = ours_l
            .iter()
            .zip(&theirs_l)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(diff < 0.05, "{prompt:?}: max |logit difference| = {diff}");
        let (mut a, mut b) = (vec![], vec![]);
        for i in 0..32 {
            let (ta, tb) = (argmax(&ours_l), argmax(&theirs_l));
            a.push(ta);
            b.push(tb);
            let x = Tensor::new(&[tb], &dev).unwrap().unsqueeze(0).unwrap();
            theirs_l = row(oracle.forward(&x, ids.len() + i).unwrap());
            ours_l = row(ours
                .llama
                .forward(&mut [SeqInput {
                    tokens: &[ta],
                    kv: &mut kv,
                    want_logits: true,
                }])
                .unwrap()
                .unwrap());
        }
        assert_eq!(
            a,
            b,
            "{prompt:?}: {:?} vs {:?}",
            ours.tokenizer.decode(&a),
            ours.tokenizer.decode(&b)
        );
    }
}

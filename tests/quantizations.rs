//! Every GGUF quantisation family loads and computes: the default model's weights are
//! re-quantised to each type (K-quants where the row length allows: ffn_down, 1536 = 6 x 256)
//! and written as a new GGUF file, which must still know that Paris is the capital of France.

mod common;
#[path = "common/requant.rs"]
mod requant;

use aios::engine::sampler::argmax;
use aios::kv::KvSeq;
use aios::model::{load_model, LoadOptions, SeqInput};
use candle_core::quantized::GgmlDType;

#[test]
fn requantised_models_load_and_know_paris() {
    aios::init_threads(2);
    let dir = std::env::temp_dir().join(format!("aios-quants-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        (GgmlDType::Q8_0, GgmlDType::Q6K, "Q8_0"),
        (GgmlDType::Q5_1, GgmlDType::Q4K, "Q5_1"),
        (GgmlDType::Q5_0, GgmlDType::Q5K, "Q5_0"),
        (GgmlDType::F16, GgmlDType::Q8_0, "F16"),
    ];
    for (main, down, name) in cases {
        let path = dir.join(format!("smollm2-{name}.gguf"));
        requant::requantize(&common::default_model_path(), &path, main, down);
        let m = load_model(&path, &LoadOptions::default()).unwrap();
        assert!(m.format.contains(&format!("{main:?}")), "{}", m.format);
        assert!(m.format.contains(&format!("{down:?}")), "{}", m.format);
        let prompt = m
            .tokenizer
            .encode("The capital of France is", false)
            .unwrap();
        let mut kv = KvSeq::new(m.llama.kv_layout(), 16);
        let logits = m
            .llama
            .forward(&mut [SeqInput {
                tokens: &prompt,
                kv: &mut kv,
                want_logits: true,
            }])
            .unwrap()
            .unwrap();
        let next = argmax(&logits.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert_eq!(m.tokenizer.decode(&[next]), " Paris", "{name}");
        std::fs::remove_file(&path).unwrap();
    }
    std::fs::remove_dir_all(dir).unwrap();
}

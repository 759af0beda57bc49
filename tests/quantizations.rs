//! Every GGUF quantisation family loads and computes: the default model's weights are
//! re-quantised to each type (K-quants where the row length allows: ffn_down, 1536 = 6 x 256)
//! and written as a new GGUF file, which must still know that Paris is the capital of France.

mod common;

use aios::engine::sampler::argmax;
use aios::kv::KvSeq;
use aios::model::{load_model, LoadOptions, SeqInput};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Device;

fn requantize(out: &std::path::Path, main: GgmlDType, ffn_down: GgmlDType) {
    let mut f = std::fs::File::open(common::default_model_path()).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let mut names: Vec<&String> = ct.tensor_infos.keys().collect();
    names.sort();
    let tensors: Vec<(String, QTensor)> = names
        .into_iter()
        .map(|name| {
            let q = ct.tensor(&mut f, name, &Device::Cpu).unwrap();
            if q.shape().rank() < 2 {
                return (name.clone(), q);
            }
            let target = if name.contains("ffn_down") {
                ffn_down
            } else {
                main
            };
            let dense = q.dequantize(&Device::Cpu).unwrap();
            (name.clone(), QTensor::quantize(&dense, target).unwrap())
        })
        .collect();
    let metadata: Vec<(&str, &gguf_file::Value)> =
        ct.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut w = std::io::BufWriter::new(std::fs::File::create(out).unwrap());
    gguf_file::write(&mut w, &metadata, &refs).unwrap();
}

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
        requantize(&path, main, down);
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

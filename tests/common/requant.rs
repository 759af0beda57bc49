//! The default model's weights re-quantised to other GGUF types and written as a new GGUF
//! file (shared by tests/quantizations.rs and benches/model.rs).

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Device;

/// Write the GGUF file `from` to `out` with every matrix re-quantised to `main`, except the
/// `ffn_down` ones, to `ffn_down` (the only matrices of the default model whose rows,
/// 1536 = 6 x 256 values, fit the K-quants' super-blocks).
pub fn requantize(
    from: &std::path::Path,
    out: &std::path::Path,
    main: GgmlDType,
    ffn_down: GgmlDType,
) {
    let mut f = std::fs::File::open(from).unwrap();
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

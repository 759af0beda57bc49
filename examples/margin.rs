use aios::kv::KvSeq;
use aios::model::{load_model, LoadOptions, SeqInput};
fn main() {
    aios::init_threads(2);
    let m = load_model(
        std::path::Path::new("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
        &LoadOptions::default(),
    )
    .unwrap();
    for p in [
        "Once upon a time, the city of",
        "The capital of France is Paris.\n\nThe",
    ] {
        let ids = m.tokenizer.encode(p, false).unwrap();
        let mut kv = KvSeq::new(m.llama.kv_layout(), ids.len());
        let l: Vec<f32> = m
            .llama
            .forward(&mut [SeqInput {
                tokens: &ids,
                kv: &mut kv,
                want_logits: true,
            }])
            .unwrap()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut idx: Vec<usize> = (0..l.len()).collect();
        idx.sort_by(|a, b| l[*b].partial_cmp(&l[*a]).unwrap());
        for &i in &idx[..3] {
            println!("{p:?} {:?} {}", m.tokenizer.decode(&[i as u32]), l[i]);
        }
    }
}

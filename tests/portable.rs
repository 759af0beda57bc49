//! The default model on the portable (scalar) kernels, the path a CPU without AVX2 takes:
//! llama.cpp's greedy continuations are still our top tokens, near ties aside.

mod common;

use aios::model::{load_model, LoadOptions};
use aios::ops::quant::{set_isa, Isa};

#[test]
fn the_default_model_on_the_portable_kernels_tracks_llama_cpp() {
    // Chosen before loading: the weights keep the file's layout for the portable kernels.
    set_isa(Isa::Portable);
    aios::init_threads(2);
    let m = load_model(&common::default_model_path(), &LoadOptions::default()).unwrap();
    common::check_llama_cpp_greedy(&m);
    // And with 8-bit KV rows (as in tests/model.rs).
    common::check_llama_cpp_greedy_on(&m, aios::kv::KvDtype::Q8, 0.35);
}

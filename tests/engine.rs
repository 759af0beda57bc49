//! The engine with the real default model: continuous batching and chunked prefill do not
//! change what any sequence produces.

mod common;

use aios::engine::{spawn, EngineConfig, EngineHandle, Event, GenRequest, SamplingParams};
use aios::model::{load_model, LoadOptions};

fn engine(max_batched_tokens: usize) -> EngineHandle {
    aios::init_threads(2);
    let m = load_model(&common::default_model_path(), &LoadOptions::default()).unwrap();
    spawn(m, EngineConfig { max_batched_tokens })
}

fn request(e: &EngineHandle, text: &str, max_tokens: usize) -> GenRequest {
    GenRequest {
        prompt: e.model.tokenizer.encode(text, true).unwrap(),
        sampling: SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
        max_tokens,
        stop: vec![],
        stop_token_ids: vec![],
        ignore_eos: true,
    }
}

type Rx = tokio::sync::mpsc::UnboundedReceiver<Event>;

fn submit(e: &EngineHandle, req: GenRequest) -> Rx {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    e.submit(req, tx).unwrap();
    rx
}

fn collect(mut rx: Rx) -> Vec<u32> {
    let mut ids = vec![];
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Token { id, .. } => ids.push(id),
            Event::Done { .. } => return ids,
            Event::Error(e) => panic!("{e}"),
        }
    }
    panic!("stream ended without Done")
}

fn prompts() -> Vec<String> {
    let mut p: Vec<String> = [
        "The capital of France is",
        "Once upon a time",
        "1, 2, 3, 4,",
        "def fibonacci(n):",
        "The quick brown fox",
        "In the beginning",
        "Rust is a language that",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Longer than one step's token budget: prefilled in chunks while the others decode.
    p.push("Tell me about the history of the printing press. ".repeat(60));
    p
}

#[test]
fn concurrent_greedy_requests_give_what_each_gives_alone() {
    let e = engine(512);
    let alone: Vec<Vec<u32>> = prompts()
        .iter()
        .map(|p| collect(submit(&e, request(&e, p, 24))))
        .collect();
    let rxs: Vec<Rx> = prompts()
        .iter()
        .map(|p| submit(&e, request(&e, p, 24)))
        .collect();
    let together: Vec<Vec<u32>> = rxs.into_iter().map(collect).collect();
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a.len(), 24);
        assert_eq!(
            a,
            b,
            "prompt {i}: {:?} vs {:?}",
            e.model.tokenizer.decode(a),
            e.model.tokenizer.decode(b)
        );
    }
}

#[test]
fn chunked_prefill_gives_the_same_tokens() {
    let (small, large) = (engine(16), engine(4096));
    let text = prompts().pop().unwrap();
    let req = request(&small, &text, 16);
    assert!(req.prompt.len() > 500);
    let a = collect(submit(&small, req.clone()));
    let b = collect(submit(&large, req));
    assert_eq!(a, b);
}

#[test]
fn a_dropped_receiver_cancels_and_the_engine_goes_on() {
    let e = engine(512);
    let rx = submit(&e, request(&e, "Once upon a time", 5000));
    drop(rx);
    let out = collect(submit(&e, request(&e, "1, 2, 3, 4,", 16)));
    assert_eq!(e.model.tokenizer.decode(&out), " 5, 6, 7, 8, 9, ");
}

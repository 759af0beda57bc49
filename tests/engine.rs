//! The engine with the real default model: continuous batching and chunked prefill do not
//! change what any sequence produces.

mod common;

use std::time::Instant;

use aios::engine::{
    spawn, EngineConfig, EngineHandle, Event, GenRequest, KvBudget, PolicyKind, PolicyParams,
    Preemption, SamplingParams,
};
use aios::model::{load_model, LoadOptions};

fn engine(max_batched_tokens: usize) -> EngineHandle {
    aios::init_threads(2);
    let m = load_model(&common::default_model_path(), &LoadOptions::default()).unwrap();
    spawn(
        m,
        EngineConfig {
            max_batched_tokens,
            ..Default::default()
        },
    )
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
        agent: "test".into(),
        priority: 0,
        context: None,
        constraint: None,
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

/// An engine serving one sequence at a time under `policy`, so the order is the policy's.
fn one_at_a_time(policy: PolicyKind, quantum: usize, aging_secs: f64) -> EngineHandle {
    aios::init_threads(2);
    let m = load_model(&common::default_model_path(), &LoadOptions::default()).unwrap();
    let cfg = EngineConfig {
        max_running: 1,
        policy,
        policy_params: PolicyParams {
            quantum,
            aging_secs,
        },
        ..Default::default()
    };
    spawn(m, cfg)
}

fn job(e: &EngineHandle, agent: &str, priority: i32, max_tokens: usize) -> GenRequest {
    GenRequest {
        agent: agent.into(),
        priority,
        ..request(e, "Once upon a time", max_tokens)
    }
}

/// Submit all at once; returns for each the arrival times of its tokens.
fn run_all(e: &EngineHandle, reqs: Vec<GenRequest>) -> Vec<Vec<Instant>> {
    let rxs: Vec<Rx> = reqs.into_iter().map(|r| submit(e, r)).collect();
    let threads: Vec<_> = rxs
        .into_iter()
        .map(|mut rx| {
            std::thread::spawn(move || {
                let mut times = vec![];
                while let Some(ev) = rx.blocking_recv() {
                    match ev {
                        Event::Token { .. } => times.push(Instant::now()),
                        Event::Done { .. } => break,
                        Event::Error(e) => panic!("{e}"),
                    }
                }
                times
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

fn done(times: &[Instant]) -> Instant {
    *times.last().unwrap()
}

#[test]
fn priority_serves_a_late_high_priority_request_first() {
    let e = one_at_a_time(PolicyKind::Priority, 32, 1e6);
    let r = run_all(
        &e,
        vec![
            job(&e, "a", 0, 12),
            job(&e, "b", 0, 12),
            job(&e, "c", 0, 12),
            job(&e, "vip", 5, 12),
        ],
    );
    assert!(
        done(&r[3]) < done(&r[1]) && done(&r[3]) < done(&r[2]),
        "the high-priority request was not served first"
    );
}

/// A low-priority request, then a sustained stream of high-priority ones (one every 50 ms,
/// each queued behind the last). Returns (low done, last high done).
fn low_under_high_stream(aging_secs: f64) -> (Instant, Instant) {
    let e = one_at_a_time(PolicyKind::Priority, 32, aging_secs);
    let watch = |rx: Rx| {
        std::thread::spawn(move || {
            collect(rx);
            Instant::now()
        })
    };
    let low = watch(submit(&e, job(&e, "low", 0, 8)));
    let mut highs = vec![];
    for i in 0..8 {
        highs.push(watch(submit(&e, job(&e, &format!("high{i}"), 1, 16))));
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let last = highs.into_iter().map(|h| h.join().unwrap()).max().unwrap();
    (low.join().unwrap(), last)
}

#[test]
fn priority_aging_lets_low_priority_work_finish_under_a_high_priority_stream() {
    // Without aging, high-priority work submitted just after a low-priority request preempts it
    // and all finishes first (a burst: no sleeps, so a loaded machine cannot open a gap in the
    // stream that the low request would finish in).
    let e = one_at_a_time(PolicyKind::Priority, 32, 1e6);
    let mut reqs = vec![job(&e, "low", 0, 32)];
    reqs.extend((0..4).map(|i| job(&e, &format!("high{i}"), 1, 16)));
    let r = run_all(&e, reqs);
    for high in &r[1..] {
        assert!(
            done(&r[0]) > done(high),
            "without aging the low-priority request should wait for every high one"
        );
    }
    // With aging, it finishes while high-priority requests keep arriving.
    let (low, last_high) = low_under_high_stream(0.05);
    assert!(
        low < last_high,
        "with aging the low-priority request must not starve"
    );
}

#[test]
fn sjf_runs_the_short_job_first() {
    let e = one_at_a_time(PolicyKind::Sjf, 32, 1e6);
    let r = run_all(&e, vec![job(&e, "long", 0, 60), job(&e, "short", 0, 4)]);
    assert!(done(&r[1]) < done(&r[0]));
}

#[test]
fn fair_share_does_not_let_a_busy_agent_crowd_out_a_quiet_one() {
    let e = one_at_a_time(PolicyKind::Fair, 32, 30.0);
    let mut reqs: Vec<GenRequest> = (0..10).map(|_| job(&e, "busy", 0, 8)).collect();
    reqs.push(job(&e, "quiet", 0, 8));
    let r = run_all(&e, reqs);
    let quiet_done = done(&r[10]);
    let busy_before = r[..10].iter().filter(|t| done(t) < quiet_done).count();
    // FIFO would finish all ten first; fair share serves the quiet agent after at most two.
    assert!(
        busy_before <= 2,
        "{busy_before} busy requests finished before the quiet one"
    );
}

#[test]
fn round_robin_interleaves_agents() {
    let e = one_at_a_time(PolicyKind::RoundRobin, 4, 30.0);
    let r = run_all(&e, vec![job(&e, "a", 0, 24), job(&e, "b", 0, 24)]);
    let mut all: Vec<(Instant, char)> = r[0]
        .iter()
        .map(|t| (*t, 'a'))
        .chain(r[1].iter().map(|t| (*t, 'b')))
        .collect();
    all.sort();
    let order: String = all.iter().map(|x| x.1).collect();
    let switches = order.as_bytes().windows(2).filter(|w| w[0] != w[1]).count();
    assert!(switches >= 6, "agents did not take turns: {order}");
}

#[test]
fn the_queue_is_bounded_and_places_come_back() {
    aios::init_threads(2);
    let m = load_model(&common::default_model_path(), &LoadOptions::default()).unwrap();
    let e = spawn(
        m,
        EngineConfig {
            max_running: 1,
            max_queued: 1,
            ..Default::default()
        },
    );
    let long = || request(&e, "Once upon a time", 4000);
    let a = submit(&e, long());
    let b = submit(&e, long());
    assert_eq!(e.live(), 2);
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    assert!(matches!(
        e.submit(long(), tx),
        Err(aios::engine::SubmitError::Full(2))
    ));
    // All or nothing: two more do not fit even after one place frees up.
    drop(a);
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    while e.live() > 1 {
        assert!(
            Instant::now() < deadline,
            "a cancelled sequence kept its place"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let pair = (0..2)
        .map(|_| (long(), tokio::sync::mpsc::unbounded_channel().0))
        .collect();
    assert!(e.submit_all(pair).is_err());
    assert_eq!(e.live(), 1);
    drop(b);
    let out = collect(submit(&e, request(&e, "1, 2, 3, 4,", 16)));
    assert_eq!(e.model.tokenizer.decode(&out), " 5, 6, 7, 8, 9, ");
}

/// An engine whose KV pool holds only `blocks` blocks.
fn small_pool(blocks: usize, policy: PolicyKind) -> EngineHandle {
    small_pool_with(blocks, policy, Preemption::Swap)
}

fn small_pool_with(blocks: usize, policy: PolicyKind, preemption: Preemption) -> EngineHandle {
    aios::init_threads(2);
    let m = load_model(&common::default_model_path(), &LoadOptions::default()).unwrap();
    let bytes = blocks * m.llama.kv_layout().bytes_per_block();
    spawn(
        m,
        EngineConfig {
            policy,
            kv: KvBudget::Bytes(bytes as u64),
            preemption,
            ..Default::default()
        },
    )
}

#[test]
fn sequences_preempted_when_blocks_run_out_resume_with_identical_tokens() {
    preempted_sequences_resume_unchanged(Preemption::Swap);
}

#[test]
fn preemption_by_recomputation_gives_identical_tokens_too() {
    preempted_sequences_resume_unchanged(Preemption::Recompute);
}

/// The three prompts of the preemption tests.
const PREEMPTED: [&str; 3] = [
    "Once upon a time",
    "The capital of France is",
    "def fibonacci(n):",
];

/// Each of [`PREEMPTED`]'s 40 greedy tokens, run one at a time.
fn alone_outputs(e: &EngineHandle) -> Vec<Vec<u32>> {
    PREEMPTED
        .iter()
        .map(|t| collect(submit(e, request(e, t, 40))))
        .collect()
}

fn preempted_sequences_resume_unchanged(preemption: Preemption) {
    // Eight blocks (128 tokens); three sequences of ~8 + 40 tokens need nine between them
    // once they grow, so the lowest-ranked are swapped out to host memory and back.
    let e = small_pool_with(8, PolicyKind::Fifo, preemption);
    assert_eq!(
        e.model.context_length, 128,
        "a sequence must fit the pool alone"
    );
    let alone = alone_outputs(&e);
    assert_eq!(
        e.kv_usage().swap_outs + e.kv_usage().recomputes,
        0,
        "one at a time fits"
    );
    let rxs: Vec<Rx> = PREEMPTED
        .iter()
        .map(|t| submit(&e, request(&e, t, 40)))
        .collect();
    let together: Vec<Vec<u32>> = rxs.into_iter().map(collect).collect();
    let u = e.kv_usage();
    let preempted = match preemption {
        Preemption::Swap => u.swap_outs,
        Preemption::Recompute => u.recomputes,
    };
    assert!(preempted > 0, "nothing was preempted: {u:?}");
    assert_eq!(alone, together);
    wait_for_no_blocks(&e);
}

#[test]
fn clients_leaving_while_their_kv_is_copied_out_or_back_leak_nothing() {
    // Eight blocks (128 tokens) and twelve sequences of ~8 + 40 tokens under round-robin: the
    // preempted are copied to host memory and back on copier threads all the time. A third of
    // the clients leave part-way, some while their KV is in flight; the rest get what they get
    // alone, and every block and host copy comes back.
    use rand::{Rng, SeedableRng};
    let e = small_pool(8, PolicyKind::RoundRobin);
    let alone = alone_outputs(&e);
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let watchers: Vec<_> = (0..12)
        .map(|i| {
            let mut rx = submit(&e, request(&e, PREEMPTED[i % 3], 40));
            let leave_after = rng.random_bool(1.0 / 3.0).then(|| rng.random_range(1..30));
            let want = alone[i % 3].clone();
            std::thread::spawn(move || {
                let mut ids = vec![];
                while let Some(ev) = rx.blocking_recv() {
                    match ev {
                        Event::Token { id, .. } => ids.push(id),
                        Event::Done { .. } => break,
                        Event::Error(err) => panic!("{err}"),
                    }
                    if Some(ids.len()) == leave_after {
                        return;
                    }
                }
                assert_eq!(ids, want, "a preempted sequence changed its output");
            })
        })
        .collect();
    for w in watchers {
        w.join().unwrap();
    }
    assert!(e.kv_usage().swap_outs > 0, "nothing was preempted");
    wait_for_no_blocks(&e);
}

#[test]
fn priority_preempts_lower_priority_work_when_blocks_run_out() {
    let e = small_pool(8, PolicyKind::Priority);
    // A low-priority sequence that grows to fill the pool: a ~90-token prompt and 30 more.
    let low_req = GenRequest {
        agent: "low".into(),
        ..request(
            &e,
            &"The quick brown fox jumps over the lazy dog. ".repeat(9),
            30,
        )
    };
    assert!(low_req.prompt.len() > 80);
    let low_alone = collect(submit(&e, low_req.clone()));
    let low = submit(&e, low_req);
    // Once its prompt is in the pool, a high-priority request arrives; between them they
    // need more blocks than there are.
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    while e.kv_usage().blocks_used < 6 {
        assert!(
            Instant::now() < deadline,
            "the low-priority prompt never ran"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let high = submit(&e, job(&e, "high", 5, 40));
    let high = std::thread::spawn(move || {
        collect(high);
        Instant::now()
    });
    let low = std::thread::spawn(move || (collect(low), Instant::now()));
    let high_done = high.join().unwrap();
    let (low_tokens, low_done) = low.join().unwrap();
    assert!(high_done < low_done, "the high-priority request waited");
    assert!(e.kv_usage().swap_outs > 0, "nothing was preempted");
    assert_eq!(
        low_tokens, low_alone,
        "the preempted sequence changed its output"
    );
    wait_for_no_blocks(&e);
}

fn wait_for_no_blocks(e: &EngineHandle) {
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let u = e.kv_usage();
        if u.blocks_used == 0 && u.swapped == 0 && e.live() == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "KV blocks leaked: {u:?}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn no_kv_block_leaks_after_200_requests_with_random_cancellations() {
    use rand::{Rng, SeedableRng};
    let e = small_pool(64, PolicyKind::Fifo);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let texts = [
        "Once upon a time",
        "1, 2, 3, 4,",
        "The quick brown fox",
        "Hello",
    ];
    let mut watchers = vec![];
    for i in 0..200 {
        let req = request(&e, texts[i % texts.len()], rng.random_range(1..24));
        let mut rx = submit(&e, req);
        // A third are dropped: at once, or after a few tokens.
        let cancel_after = rng.random_bool(1.0 / 3.0).then(|| rng.random_range(0..4));
        watchers.push(std::thread::spawn(move || {
            if cancel_after == Some(0) {
                return;
            }
            let mut n = 0;
            while let Some(ev) = rx.blocking_recv() {
                match ev {
                    Event::Token { .. } => n += 1,
                    Event::Done { .. } => return,
                    Event::Error(err) => panic!("{err}"),
                }
                if Some(n) == cancel_after {
                    return;
                }
            }
        }));
        if i % 16 == 15 {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    for w in watchers {
        w.join().unwrap();
    }
    wait_for_no_blocks(&e);
}

#[test]
fn configured_agents_have_their_priority() {
    aios::init_threads(2);
    let m = load_model(&common::default_model_path(), &LoadOptions::default()).unwrap();
    let e = spawn(
        m,
        EngineConfig {
            agent_priority: std::sync::Arc::new([("ci-bot".to_string(), 3)].into()),
            ..Default::default()
        },
    );
    assert_eq!(e.agent_priority("ci-bot"), 3);
    assert_eq!(e.agent_priority("someone-else"), 0);
}

#[test]
fn fair_keeps_two_backlogged_agents_within_a_bounded_gap() {
    // "busy" sends ten times the requests of "calm"; both stay backlogged for the whole
    // window. One sequence runs at a time, so every step is the policy's choice.
    let e = one_at_a_time(PolicyKind::Fair, 32, 30.0);
    let mut reqs: Vec<GenRequest> = (0..20).map(|_| job(&e, "busy", 0, 12)).collect();
    reqs.extend((0..2).map(|_| job(&e, "calm", 0, 120)));
    let prompt = reqs[0].prompt.len() as i64;
    let r = run_all(&e, reqs);
    // Service as the policy weighs it: prompt tokens 1 each (counted when the first output
    // token shows the prefill happened), output tokens 2 each.
    let mut events: Vec<(Instant, bool, i64)> = r
        .iter()
        .enumerate()
        .flat_map(|(i, times)| {
            times
                .iter()
                .enumerate()
                .map(move |(k, t)| (*t, i < 20, 2 + if k == 0 { prompt } else { 0 }))
        })
        .collect();
    events.sort();
    // From the moment both are served (an arriving agent is lifted to the current minimum, so
    // it gets no credit for the time before it came) until either runs out of work.
    let start = r[20..].iter().map(|t| t[0]).min().unwrap();
    let end = done(r[..20].iter().max_by_key(|t| done(t)).unwrap())
        .min(done(r[20..].iter().max_by_key(|t| done(t)).unwrap()));
    let (mut busy, mut calm, mut worst) = (0i64, 0i64, 0i64);
    for (t, is_busy, w) in events {
        if t < start || t > end {
            continue;
        }
        if is_busy {
            busy += w;
        } else {
            calm += w;
        }
        worst = worst.max((busy - calm).abs());
    }
    assert!(busy >= 200 && calm >= 200, "busy {busy}, calm {calm}");
    // A prompt and a few tokens at most, however long the run and whatever the rates (FIFO
    // would let the busy agent run hundreds ahead). Tokens are timed where each receiving
    // thread sees them, which can lag a step or two on a loaded machine: hence the slack
    // (measured here: 10, with a 4-token prompt).
    assert!(
        worst <= 2 * prompt + 16,
        "served-token gap reached {worst} (prompt {prompt})"
    );
}

//! Unit tests of contexts: snapshots written off the engine thread.
use super::*;
use crate::kv::{KvDtype, KvLayout, BLOCK_TOKENS};

const LAYOUT: KvLayout = KvLayout {
    n_layers: 2,
    n_kv_heads: 1,
    head_dim: 4,
    dtype: KvDtype::F16,
};

/// A context holding `n` tokens of KV in the pool.
fn context(cx: &mut Contexts, n: usize) -> String {
    let id = cx
        .apply(ContextOp::Create { owner: "a".into() }, &mut None)
        .unwrap()[0]
        .id
        .clone();
    let rows: Vec<f32> = (0..n * 4).map(|i| i as f32).collect();
    turn(cx, &id, &rows);
    id
}

/// A turn on context `id` ended with these K and V rows (one of 4 values a token, the same in
/// both layers) in its KV; returns the sequence's KV, which shares the context's blocks.
fn turn(cx: &mut Contexts, id: &str, rows: &[f32]) -> KvSeq {
    let n = rows.len() / 4;
    let mut kv = KvSeq::in_pool(cx.pool.clone());
    kv.reserve(n).unwrap();
    for layer in 0..2 {
        kv.write(layer, rows, rows);
    }
    kv.advance(n);
    cx.finish(id, &(0..n as u32).collect::<Vec<u32>>(), &kv);
    kv
}

/// Contexts over a pool of 8 blocks, with host memory to spare and no disk tier, and the
/// queue their copier threads report to.
fn memory_only() -> (Arc<KvPool>, mpsc::Receiver<Command>, Contexts) {
    let pool = KvPool::new(LAYOUT, 8);
    let (tx, rx) = mpsc::channel();
    let cx = Contexts::new(pool.clone(), None, 1 << 30, 0, tx);
    (pool, rx, cx)
}

fn wait_written(rx: &mpsc::Receiver<Command>) -> u64 {
    match rx.recv_timeout(std::time::Duration::from_secs(30)) {
        Ok(Command::Written(t)) => t,
        _ => panic!("no write ended"),
    }
}

#[test]
fn snapshots_are_written_off_the_engine_thread_and_settled_when_done() {
    let dir = std::env::temp_dir().join(format!("aios-ctx-writes-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = DiskStore::new(&dir, "m", LAYOUT).unwrap();
    let pool = KvPool::new(LAYOUT, 16);
    let (tx, rx) = mpsc::channel();
    let mut cx = Contexts::new(pool.clone(), Some(store), 1 << 30, 1 << 30, tx);
    let file = |id: &str| dir.join(format!("{id}.kvctx"));

    // Under way: shown on disk, a request on it waits.
    let a = context(&mut cx, 20);
    assert_eq!(pool.usage().blocks_used, 2);
    cx.move_to_disk(&a, false, &mut None).unwrap();
    assert_eq!(cx.map[&a].tier(), "disk");
    assert!(matches!(cx.start(&a, &[0, 1, 2], &[]), Start::Wait));
    // Done: the writer gave the blocks back (it copied the KV out of the pool itself), the
    // file has its name and a request on the context reads it back.
    let t = wait_written(&rx);
    assert_eq!(pool.usage().blocks_used, 0);
    assert_eq!(cx.written(t).as_deref(), Some(a.as_str()));
    assert!(file(&a).exists());
    assert!(matches!(cx.start(&a, &[0, 1, 2], &[]), Start::Load(_, 20)));
    assert_eq!(
        cx.tiers().disk_bytes,
        std::fs::metadata(file(&a)).unwrap().len()
    );

    // Run and extended while it was written: the stale write is dropped, the new KV kept.
    let b = context(&mut cx, 20);
    cx.move_to_disk(&b, false, &mut None).unwrap();
    let kv = turn(&mut cx, &b, &[0.5; 40 * 4]);
    let t = wait_written(&rx);
    cx.written(t);
    assert!(!file(&b).exists());
    assert_eq!((cx.map[&b].tier(), cx.map[&b].kv.len()), ("pool", 40));

    // Deleted while it was written: no file is left.
    let c = context(&mut cx, 20);
    cx.move_to_disk(&c, false, &mut None).unwrap();
    cx.apply(
        ContextOp::Delete {
            id: c.clone(),
            owner: "a".into(),
        },
        &mut None,
    )
    .unwrap();
    cx.written(wait_written(&rx));
    assert!(!file(&c).exists());

    // A stop waits for the writes under way and writes the rest.
    let d = context(&mut cx, 20);
    cx.move_to_disk(&d, false, &mut None).unwrap();
    let saved = cx.apply(ContextOp::PersistAll, &mut None).unwrap();
    let ids: Vec<&str> = saved.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, vec![b.as_str(), d.as_str()], "{ids:?}");
    assert!(file(&b).exists() && file(&d).exists());
    assert_eq!(cx.map[&d].tier(), "disk");
    drop(kv);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn wait_filled(rx: &mpsc::Receiver<Command>) -> (String, Arc<Vec<u8>>, KvSeq) {
    match rx.recv_timeout(std::time::Duration::from_secs(30)) {
        Ok(Command::Filled(id, from, kv)) => (id, from, kv),
        _ => panic!("no copy into the pool ended"),
    }
}

/// `POST /v1/contexts/{id}/snapshot` to host memory, and its copy out of the pool settled.
fn to_host(cx: &mut Contexts, rx: &mpsc::Receiver<Command>, id: &str) {
    let op = ContextOp::Snapshot {
        id: id.into(),
        owner: "a".into(),
        tier: Tier::Host,
    };
    let (tx, mut answer) = tokio::sync::oneshot::channel();
    cx.request(op, tx);
    assert!(answer.try_recv().is_err(), "answered when the copy is done");
    cx.evicted(wait_evicted(rx), &[]);
    assert_eq!(answer.try_recv().unwrap().unwrap()[0].tier, "host");
}

/// The bytes of a context's KV as a swap-out lays them out.
fn host_bytes_of(kv: &KvSeq) -> Vec<u8> {
    let mut copy = kv.fork();
    copy.swap_out();
    copy.host_data().unwrap().to_vec()
}

#[test]
fn a_context_in_host_memory_is_copied_into_the_pool_off_the_engine_thread() {
    let (pool, rx, mut cx) = memory_only();
    let host = |cx: &mut Contexts, id: &str| to_host(cx, &rx, id);

    // The request waits while the copy runs; a second one starts no second copy.
    let a = context(&mut cx, 20);
    let before = host_bytes_of(&cx.map[&a].kv);
    host(&mut cx, &a);
    assert_eq!((cx.map[&a].tier(), pool.usage().blocks_used), ("host", 0));
    let prompt: Vec<u32> = (0..25).collect();
    assert!(matches!(cx.start(&a, &prompt, &[]), Start::Wait));
    assert!(matches!(cx.start(&a, &prompt, &[]), Start::Wait));
    assert_eq!(
        pool.usage().blocks_used,
        2,
        "blocks taken once, for one copy"
    );
    assert_eq!(
        cx.map[&a].tier(),
        "host",
        "the context keeps its host copy meanwhile"
    );
    // Done: the context is in the pool, bit for bit, and a request runs on its blocks.
    let (id, from, kv) = wait_filled(&rx);
    cx.filled(&id, &from, kv);
    assert_eq!(cx.map[&a].tier(), "pool");
    assert_eq!(host_bytes_of(&cx.map[&a].kv), before);
    match cx.start(&a, &prompt, &[]) {
        Start::Kv(kv) => assert_eq!((kv.len(), kv.is_swapped()), (20, false)),
        _ => panic!("a context in the pool starts at once"),
    }
    assert_eq!(pool.usage().blocks_used, 2);

    // Deleted while it was copied: the copy's blocks go back to the pool.
    host(&mut cx, &a);
    assert!(matches!(cx.start(&a, &prompt, &[]), Start::Wait));
    let del = ContextOp::Delete {
        id: a.clone(),
        owner: "a".into(),
    };
    cx.apply(del, &mut None).unwrap();
    let (id, from, kv) = wait_filled(&rx);
    cx.filled(&id, &from, kv);
    assert_eq!(pool.usage().blocks_used, 0);

    // No free blocks for it: the sequence takes the host copy, for the scheduler to swap in.
    let b = context(&mut cx, 20);
    host(&mut cx, &b);
    let held = KvSeq::for_fill(pool.clone(), 8 * BLOCK_TOKENS).unwrap();
    match cx.start(&b, &prompt, &[]) {
        Start::Kv(kv) => assert_eq!((kv.len(), kv.is_swapped()), (20, true)),
        _ => panic!("without free blocks the request takes the host copy"),
    }
    assert!(rx.try_recv().is_err(), "no copy was started");
    drop(held);
}

fn wait_evicted(rx: &mpsc::Receiver<Command>) -> Evicted {
    match rx.recv_timeout(std::time::Duration::from_secs(30)) {
        Ok(Command::Evicted(e)) => *e,
        _ => panic!("no copy out of the pool ended"),
    }
}

#[test]
fn idle_contexts_are_copied_out_of_the_pool_off_the_engine_thread() {
    let (pool, rx, mut cx) = memory_only();

    // Least recently used first, each once; the blocks stay until the copy is adopted.
    let a = context(&mut cx, 20);
    let b = context(&mut cx, 20);
    let before = [&a, &b].map(|id| host_bytes_of(&cx.map[id].kv));
    assert!(cx.evict_one(&[b.as_str()]), "a is idle");
    assert!(!cx.evict_one(&[b.as_str()]), "a is under way and b busy");
    assert!(cx.evict_one(&[]));
    assert!(!cx.evict_one(&[]));
    assert_eq!(cx.evicting_blocks(), 4);
    assert_eq!((cx.map[&a].tier(), pool.usage().blocks_used), ("pool", 4));
    let mut done = vec![wait_evicted(&rx), wait_evicted(&rx)];
    done.sort_by_key(|e| e.id != a);
    assert_eq!(done[0].id, a, "the least recently used went first");
    for e in done {
        cx.evicted(e, &[]);
    }
    assert_eq!(cx.evicting_blocks(), 0);
    assert_eq!(pool.usage().blocks_used, 0);
    for (id, bytes) in [&a, &b].into_iter().zip(&before) {
        assert_eq!(cx.map[id].tier(), "host");
        assert_eq!(cx.map[id].kv.host_data().unwrap(), &bytes[..]);
    }

    // A turn ran on it while it was copied: the copy is stale and dropped, the new KV kept.
    let c = context(&mut cx, 20);
    assert!(cx.evict_one(&[]));
    drop(turn(&mut cx, &c, &[0.5; 40 * 4]));
    cx.evicted(wait_evicted(&rx), &[]);
    assert_eq!((cx.map[&c].tier(), cx.map[&c].kv.len()), ("pool", 40));
    assert_eq!(
        pool.usage().blocks_used,
        3,
        "the old blocks and the copy are gone"
    );
}

#[test]
fn a_context_coming_back_without_room_waits_for_an_idle_one_to_be_copied_out() {
    let (pool, rx, mut cx) = memory_only();
    let back = context(&mut cx, 20);
    to_host(&mut cx, &rx, &back);
    let (idle, busy) = (context(&mut cx, 20), context(&mut cx, 20));
    let held = KvSeq::for_fill(pool.clone(), 4 * BLOCK_TOKENS).unwrap();
    assert_eq!(pool.free_blocks(), 0);

    // The idle context is copied out (not the busy one), and the request waits for its blocks.
    let prompt: Vec<u32> = (0..25).collect();
    assert!(matches!(
        cx.start(&back, &prompt, &[busy.as_str()]),
        Start::Wait
    ));
    assert!(cx.waits_for_room(&back));
    assert_eq!(cx.evicting_blocks(), 2);
    let e = wait_evicted(&rx);
    assert_eq!(e.id, idle);
    cx.evicted(e, &[busy.as_str()]);
    assert_eq!((cx.map[&idle].tier(), pool.free_blocks()), ("host", 2));
    // Tried again, it is copied into the freed blocks.
    assert!(matches!(
        cx.start(&back, &prompt, &[busy.as_str()]),
        Start::Wait
    ));
    assert!(!cx.waits_for_room(&back));
    let (id, from, kv) = wait_filled(&rx);
    cx.filled(&id, &from, kv);
    assert_eq!(cx.map[&back].tier(), "pool");
    drop(held);
}

//! Unit tests of contexts: snapshots written off the engine thread.
use super::*;
use crate::kv::{KvDtype, KvLayout};

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
    let mut kv = KvSeq::in_pool(cx.pool.clone());
    kv.reserve(n).unwrap();
    let rows: Vec<f32> = (0..n * 4).map(|i| i as f32).collect();
    for layer in 0..2 {
        kv.write(layer, &rows, &rows);
    }
    kv.advance(n);
    let tokens: Vec<u32> = (0..n as u32).collect();
    cx.finish(&id, &tokens, &kv);
    id
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

    // Under way: shown on disk, its blocks given back, a request on it waits.
    let a = context(&mut cx, 20);
    assert_eq!(pool.usage().blocks_used, 2);
    cx.move_to_disk(&a, false, &mut None).unwrap();
    assert_eq!(cx.map[&a].tier(), "disk");
    assert_eq!(pool.usage().blocks_used, 0);
    assert!(matches!(cx.start(&a, &[0, 1, 2]), Start::Wait));
    // Done: the file has its name and a request on the context reads it back.
    let t = wait_written(&rx);
    assert_eq!(cx.written(t).as_deref(), Some(a.as_str()));
    assert!(file(&a).exists());
    assert!(matches!(cx.start(&a, &[0, 1, 2]), Start::Load(_, 20)));
    assert_eq!(
        cx.tiers().disk_bytes,
        std::fs::metadata(file(&a)).unwrap().len()
    );

    // Run and extended while it was written: the stale write is dropped, the new KV kept.
    let b = context(&mut cx, 20);
    cx.move_to_disk(&b, false, &mut None).unwrap();
    let mut kv = KvSeq::in_pool(pool.clone());
    kv.reserve(40).unwrap();
    let rows = vec![0.5f32; 40 * 4];
    for layer in 0..2 {
        kv.write(layer, &rows, &rows);
    }
    kv.advance(40);
    cx.finish(&b, &(0..40).collect::<Vec<u32>>(), &kv);
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

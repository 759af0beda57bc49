//! Unit tests of the KV pool: blocks, swapping, forks and the prefix cache.
use super::*;

const LAYOUT: KvLayout = KvLayout {
    n_layers: 2,
    n_kv_heads: 2,
    head_dim: 4,
    dtype: KvDtype::F16,
};

/// Write `n` tokens whose values encode (layer, position, head, element).
fn write(kv: &mut KvSeq, n: usize) {
    let start = kv.len();
    kv.reserve(n).unwrap();
    for layer in 0..2 {
        let vals: Vec<f32> = (0..n * 8)
            .map(|i| (layer * 1000 + start * 8 + i) as f32)
            .collect();
        kv.write(layer, &vals, &vals);
    }
    kv.advance(n);
}

/// K rows of one layer and head, after checking that V (written with the same values) reads
/// back the same: K is stored transposed, V row by row.
fn read(kv: &KvSeq, layer: usize, head: usize) -> Vec<f32> {
    let (k, v) = kv.rows_f32(layer, head, kv.len());
    assert_eq!(k, v, "K and V written alike read back alike");
    k
}

fn check(kv: &KvSeq, upto: usize) {
    let k = read(kv, 1, 1);
    assert_eq!(k.len(), kv.len() * 4);
    for t in 0..upto {
        for e in 0..4 {
            assert_eq!(k[t * 4 + e], (1000 + t * 8 + 4 + e) as f32, "token {t}");
        }
    }
}

#[test]
fn write_grow_and_read_back_across_blocks() {
    let mut kv = KvSeq::new(LAYOUT, 1);
    // 40 tokens over three blocks, more than the private pool first held.
    write(&mut kv, 17);
    write(&mut kv, 3);
    write(&mut kv, 20);
    assert_eq!(kv.len(), 40);
    assert_eq!(kv.blocks(), 3);
    check(&kv, 40);
}

#[test]
fn a_shared_pool_runs_out_and_blocks_come_back() {
    let pool = KvPool::new(LAYOUT, 4);
    let mut a = KvSeq::in_pool(pool.clone());
    let mut b = KvSeq::in_pool(pool.clone());
    write(&mut a, 33); // 3 blocks
    assert_eq!(pool.usage().blocks_used, 3);
    let err = b.reserve(32).unwrap_err();
    assert_eq!(err, KvFull { needed: 2, free: 1 });
    assert_eq!(b.blocks(), 0, "all or nothing");
    a.truncate(16);
    assert_eq!(pool.usage().blocks_used, 1);
    b.reserve(32).unwrap();
    drop(a);
    drop(b);
    assert_eq!(pool.usage().blocks_used, 0);
}

#[test]
fn swap_out_and_in_restores_the_same_bits() {
    let pool = KvPool::new(LAYOUT, 4);
    let mut a = KvSeq::in_pool(pool.clone());
    write(&mut a, 20);
    let before = read(&a, 0, 1);
    a.swap_out();
    assert!(a.is_swapped());
    assert_eq!(pool.usage().blocks_used, 0);
    assert_eq!(pool.usage().swapped, 1);
    // Someone else uses (and dirties) the blocks meanwhile.
    let mut b = KvSeq::in_pool(pool.clone());
    write(&mut b, 64);
    drop(b);
    a.swap_in().unwrap();
    assert_eq!(pool.usage().swapped, 0);
    assert_eq!(read(&a, 0, 1), before);
    write(&mut a, 5);
    check(&a, 25);
}

#[test]
fn a_sequence_filled_from_swapped_bytes_in_odd_pieces_reads_back_the_same() {
    let pool = KvPool::new(LAYOUT, 8);
    let mut a = KvSeq::in_pool(pool.clone());
    write(&mut a, 37); // 3 blocks, the last one part full
    let (k, v) = (read(&a, 1, 0), read(&a, 0, 1));
    a.swap_out();
    let data = a.host_data().unwrap().to_vec();
    let mut b = KvSeq::for_fill(pool.clone(), 37).unwrap();
    assert_eq!(pool.usage().blocks_used, 3);
    // Pieces that start and end inside segments, and one that spans blocks.
    let mut at = 0;
    for n in [1, 5, 63, 200, 1000, usize::MAX].iter().cycle() {
        let n = (*n).min(data.len() - at);
        b.fill(at, &data[at..at + n]);
        at += n;
        if at == data.len() {
            break;
        }
    }
    assert_eq!((read(&b, 1, 0), read(&b, 0, 1)), (k, v));
    write(&mut b, 3);
    check(&b, 40);
    // More blocks than the pool has left: refused, nothing taken.
    assert!(KvSeq::for_fill(pool.clone(), 16 * 6).is_err());
    assert_eq!(pool.usage().blocks_used, 3);
    drop(b);
    assert_eq!(pool.usage().blocks_used, 0);
}

#[test]
fn forks_share_blocks_until_one_writes() {
    let pool = KvPool::new(LAYOUT, 8);
    let mut a = KvSeq::in_pool(pool.clone());
    write(&mut a, 20); // 2 blocks, the second partly filled
    let mut b = a.fork();
    assert_eq!(pool.usage().blocks_used, 2);
    // b writes into the shared partial block: it gets its own copy.
    write(&mut b, 4);
    assert_eq!(pool.usage().blocks_used, 3);
    check(&a, 20);
    check(&b, 24);
    drop(a);
    assert_eq!(pool.usage().blocks_used, 2);
    drop(b);
    assert_eq!(pool.usage().blocks_used, 0);
}

#[test]
fn the_prefix_cache_reuses_full_blocks_and_evicts_the_least_recent() {
    let pool = KvPool::new(LAYOUT, 6);
    let tokens: Vec<u32> = (0..40).collect();
    let mut a = KvSeq::in_pool(pool.clone());
    write(&mut a, 40);
    a.register_blocks(&tokens); // blocks 0 and 1 are full; block 2 is not
    let want = read(&a, 1, 1);
    drop(a);
    assert_eq!(pool.usage().blocks_used, 0);
    assert_eq!(pool.cached_idle_blocks(), 2);
    // Same first 33 tokens: two blocks reused, and never the last token's block.
    let mut b = KvSeq::in_pool(pool.clone());
    assert_eq!(b.attach_prefix(&tokens[..33]), 32);
    assert_eq!(b.len(), 32);
    assert_eq!(pool.usage().blocks_used, 2);
    assert_eq!(read(&b, 1, 1), want[..32 * 4]);
    let mut c = KvSeq::in_pool(pool.clone());
    assert_eq!(
        c.attach_prefix(&tokens[..32]),
        16,
        "the last token is always computed"
    );
    // A different first block: nothing reused.
    let other: Vec<u32> = (100..140).collect();
    let mut d = KvSeq::in_pool(pool.clone());
    assert_eq!(d.attach_prefix(&other), 0);
    drop((b, c));
    // Pressure: all six blocks wanted; the cached ones are evicted.
    d.reserve(96).unwrap();
    assert_eq!(pool.cached_idle_blocks(), 0);
    drop(d);
    let mut e = KvSeq::in_pool(pool.clone());
    assert_eq!(e.attach_prefix(&tokens), 0, "evicted blocks are forgotten");
}

#[test]
fn a_truncated_block_leaves_the_cache_before_it_is_rewritten() {
    let pool = KvPool::new(LAYOUT, 4);
    let tokens: Vec<u32> = (0..32).collect();
    let mut a = KvSeq::in_pool(pool.clone());
    write(&mut a, 32);
    a.register_blocks(&tokens);
    a.truncate(20); // block 1 will be written again
    drop(a);
    let mut b = KvSeq::in_pool(pool.clone());
    assert_eq!(b.attach_prefix(&tokens), 16);
}

#[test]
fn q8_rows_round_trip_within_half_a_step_and_swap_bit_for_bit() {
    let layout = KvLayout {
        dtype: KvDtype::Q8,
        ..LAYOUT
    };
    assert_eq!(layout.bytes_per_token(), 2 * 2 * 2 * (4 + 4));
    let pool = KvPool::new(layout, 4);
    let mut kv = KvSeq::in_pool(pool.clone());
    let n = 20;
    kv.reserve(n).unwrap();
    let vals: Vec<f32> = (0..n * 8).map(|i| ((i * 37) % 23) as f32 - 11.3).collect();
    for layer in 0..2 {
        kv.write(layer, &vals, &vals);
    }
    kv.advance(n);
    let before: Vec<Vec<f32>> = (0..2)
        .flat_map(|l| (0..2).map(move |h| (l, h)))
        .map(|(l, h)| read(&kv, l, h))
        .collect();
    for head in 0..2 {
        let got = &before[2 + head];
        for t in 0..n {
            let row = &vals[(t * 2 + head) * 4..][..4];
            let step = row.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
            for e in 0..4 {
                let err = (got[t * 4 + e] - row[e]).abs();
                assert!(
                    err <= step / 2.0 + 1e-6,
                    "token {t}: {} vs {}",
                    got[t * 4 + e],
                    row[e]
                );
            }
        }
    }
    kv.swap_out();
    assert_eq!(pool.usage().blocks_used, 0);
    assert_eq!(kv.host_data().unwrap().len(), 2 * layout.bytes_per_block());
    kv.swap_in().unwrap();
    let after: Vec<Vec<f32>> = (0..2)
        .flat_map(|l| (0..2).map(move |h| (l, h)))
        .map(|(l, h)| read(&kv, l, h))
        .collect();
    assert_eq!(before, after);
}

/// Whether the pages of block `b`'s first segment are all resident (`mincore`).
#[cfg(target_os = "linux")]
fn resident(pool: &KvPool, b: u32) -> bool {
    resident_seg(pool, b, 0)
}

/// Whether the pages of block `b`'s segment `seg` are all resident (`mincore`).
#[cfg(target_os = "linux")]
fn resident_seg(pool: &KvPool, b: u32, seg: usize) -> bool {
    let page = 4096usize;
    let start = pool.base as usize + pool.seg_at(b, seg);
    let a = start / page * page;
    let end = start + pool.seg_bytes();
    let pages = (end - a).div_ceil(page);
    let mut vec = vec![0u8; pages];
    // SAFETY: the range is inside the pool's allocation; `vec` has a byte per page.
    let r = unsafe { libc::mincore(a as *mut libc::c_void, end - a, vec.as_mut_ptr()) };
    assert_eq!(r, 0, "mincore");
    vec.iter().all(|v| v & 1 == 1)
}

/// Whether `MADV_POPULATE_WRITE` commits a fresh page here (qemu's user-mode emulation
/// accepts it and does nothing).
#[cfg(target_os = "linux")]
fn populate_works() -> bool {
    // SAFETY: a private anonymous page of our own, unmapped before returning.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return false;
        }
        let mut v = 0u8;
        let ok = libc::madvise(p, 4096, libc::MADV_POPULATE_WRITE) == 0
            && libc::mincore(p, 4096, &mut v) == 0
            && v & 1 == 1;
        libc::munmap(p, 4096);
        ok
    }
}

/// Wait (up to 10 s) until the pool has committed its first `blocks` blocks.
fn wait_populated(pool: &KvPool, blocks: usize) {
    let t = std::time::Instant::now();
    while pool.populated.load(Ordering::Acquire) < blocks {
        assert!(
            t.elapsed().as_secs() < 10,
            "blocks 0..{blocks} never committed"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Fresh blocks are committed in bands before allocation reaches them, in the background,
/// so that a request does not pay the first-touch page faults (a quarter of this small pool
/// a band: 1,024 blocks of 8 KB).
#[cfg(target_os = "linux")]
#[test]
fn fresh_pool_memory_is_committed_ahead_of_use() {
    let layout = KvLayout {
        n_layers: 2,
        n_kv_heads: 1,
        head_dim: 64,
        dtype: KvDtype::F16,
    };
    let pool = KvPool::new(layout, 4096);
    assert_eq!(pool.band_blocks(), 1024);
    if !populate_works() {
        eprintln!(
            "MADV_POPULATE_WRITE does nothing here (Linux before 5.14, or emulated): skipped"
        );
        return;
    }
    assert!(!resident(&pool, 3000), "a fresh pool is lazy");
    let mut held = pool.alloc(1).unwrap();
    wait_populated(&pool, 1025);
    assert!(
        resident(&pool, 0) && resident(&pool, 1000),
        "the first band"
    );
    // (Past the next 2 MB: a huge page may commit the one the band ends in.)
    assert!(!resident(&pool, 2500), "nothing past the band yet");
    // Use up to block 599: within half a band of the end, so the next band follows.
    held.extend(pool.alloc(599).unwrap());
    assert_eq!(held.iter().max(), Some(&599));
    wait_populated(&pool, 1624);
    assert!(resident(&pool, 1600), "the second band");
    // The pool is the segments' regions one after another (8 MB each here), each committed
    // for the first 2,049 blocks at most (4 MB), and a huge page may carry that up to 2 MB
    // further either way: only the last region's last blocks are out of reach of both.
    let last = pool.segs_per_block() - 1;
    assert!(!resident_seg(&pool, 4095, last), "not the whole pool");
    pool.release(&held);
}

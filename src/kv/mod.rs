//! KV storage: where each sequence's keys and values live between steps.
//!
//! A [`KvPool`] is allocated once per model from a budget: fixed blocks of [`BLOCK_TOKENS`]
//! tokens, each holding every layer's K and V rows for those tokens. A sequence ([`KvSeq`]) is
//! a block table into a pool; blocks have reference counts, so a block can be shared between
//! sequences (a forked prefix) and is copied before a sharer writes into it. Attention reads a
//! sequence as a list of row segments, one per block.
//!
//! A sequence can be swapped out to host memory ([`KvSeq::swap_out`]), giving its blocks back
//! to the pool, and swapped in again bit for bit: a preempted sequence resumes with exactly the
//! KV it had.
//!
//! Memory layout: `[layer][K, V][kv_head][block][BLOCK_TOKENS rows]`. A block is the same
//! index in every (layer, K/V, head) region, so a sequence whose blocks were allocated in order
//! reads each head's rows as one contiguous stream, as attention wants (a layout with each
//! block's layers together would scatter 2 KB reads hundreds of KB apart).
//!
//! Rows are stored as f16 (`[kv] dtype = "f16"`, the default) or as 8-bit integers with one f32
//! scale per row (`"q8"`: half the bytes, so half the memory traffic of attention over a long
//! context, twice the tokens per pool, and half the bytes to move between tiers). A q8
//! segment is its `BLOCK_TOKENS` rows of `head_dim` i8 values followed by their scales.
//!
//! K segments are stored transposed: element `c` of row `r` at `c * BLOCK_TOKENS + r`, so a
//! block's column `c` is `BLOCK_TOKENS` adjacent values (one 512-bit vector of f32 once
//! widened). A query's scores against a block are then `head_dim` vector multiply-adds, one
//! lane per row, with no sum across lanes; V segments stay row by row, as the weighted sum of
//! V rows wants them.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use half::f16;

/// The element type f16 KV rows are stored in.
pub type KvElem = f16;

/// How KV rows are stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    /// Half precision, exactly what attention computed in f32 rounded once.
    #[default]
    F16,
    /// Symmetric 8-bit integers, one f32 scale (absolute maximum / 127) per row.
    Q8,
}

impl KvDtype {
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F16 => "f16",
            KvDtype::Q8 => "q8",
        }
    }

    /// Bytes of one row of `d` values (with its scale).
    pub fn row_bytes(self, d: usize) -> usize {
        match self {
            KvDtype::F16 => 2 * d,
            KvDtype::Q8 => d + 4,
        }
    }
}

/// One segment's rows (a block's rows of one layer, K or V, and head) as stored.
#[derive(Clone, Copy, Debug)]
pub enum KvRows<'a> {
    F16(&'a [KvElem]),
    /// `q[r * d..][..d]` times `scale[r]` is row `r`.
    Q8 {
        q: &'a [i8],
        scale: &'a [f32],
    },
}

impl<'a> KvRows<'a> {
    /// The first `n` values as f32, 8-bit rows without their scales (attention applies them
    /// to its scores and weights instead).
    pub fn widen_unscaled(self, n: usize, dst: &mut [f32]) {
        match self {
            KvRows::F16(r) => widen(&r[..n], &mut dst[..n]),
            KvRows::Q8 { q, .. } => {
                for (o, &x) in dst[..n].iter_mut().zip(&q[..n]) {
                    *o = x as f32;
                }
            }
        }
    }

    /// The first `rows` rows of `d` values as f32, scales applied (tests, diagnostics); K
    /// segments (`transposed`, a whole block) are given back row by row too.
    pub fn to_f32(self, rows: usize, d: usize, transposed: bool) -> Vec<f32> {
        let mut v = vec![0f32; rows * d];
        if transposed {
            let mut cols = vec![0f32; BLOCK_TOKENS * d];
            self.widen_unscaled(BLOCK_TOKENS * d, &mut cols);
            for (r, row) in v.chunks_exact_mut(d).enumerate() {
                for (c, x) in row.iter_mut().enumerate() {
                    *x = cols[c * BLOCK_TOKENS + r];
                }
            }
        } else {
            self.widen_unscaled(rows * d, &mut v);
        }
        for (row, &s) in v.chunks_exact_mut(d).zip(self.scales()) {
            row.iter_mut().for_each(|x| *x *= s);
        }
        v
    }

    /// The rows' scales (q8); empty for f16 rows.
    pub fn scales(self) -> &'a [f32] {
        match self {
            KvRows::F16(_) => &[],
            KvRows::Q8 { scale, .. } => scale,
        }
    }

    /// Start address of the rows (for prefetching and contiguity checks) and their bytes.
    pub fn byte_range(self) -> std::ops::Range<*const u8> {
        match self {
            KvRows::F16(r) => {
                let r = r.as_ptr_range();
                r.start.cast()..r.end.cast()
            }
            KvRows::Q8 { q, scale } => q.as_ptr().cast()..scale.as_ptr_range().end.cast(),
        }
    }
}

/// Store one row of f32 values into a segment's row `r` in `dtype`; with `transposed` (K
/// segments) element `c` goes to `c * BLOCK_TOKENS + r` instead of `r * d + c`.
fn store_row(dtype: KvDtype, seg: &mut [u8], r: usize, row: &[f32], transposed: bool) {
    let d = row.len();
    let (at, step) = if transposed {
        (r, BLOCK_TOKENS)
    } else {
        (r * d, 1)
    };
    match dtype {
        KvDtype::F16 => {
            // SAFETY: segments are 8-byte aligned and even-sized; every bit pattern is an f16.
            let h = unsafe {
                std::slice::from_raw_parts_mut(seg.as_mut_ptr().cast::<KvElem>(), seg.len() / 2)
            };
            for (o, x) in h[at..].iter_mut().step_by(step).zip(row) {
                *o = f16::from_f32(*x);
            }
        }
        KvDtype::Q8 => {
            let amax = row.iter().fold(0f32, |m, x| m.max(x.abs()));
            let scale = amax / 127.0;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let (q, scales) = seg.split_at_mut(BLOCK_TOKENS * d);
            for (o, x) in q[at..].iter_mut().step_by(step).zip(row) {
                *o = ((x * inv).round() as i8) as u8;
            }
            scales[r * 4..][..4].copy_from_slice(&scale.to_ne_bytes());
        }
    }
}

/// Tokens per block.
pub const BLOCK_TOKENS: usize = 16;

/// Widen stored KV elements to f32 (vectorised F16C conversion where the CPU has it).
#[inline]
pub fn widen(src: &[KvElem], dst: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    src.convert_to_f32_slice(dst);
}

/// Shape of the KV rows a model writes: one row per token, layer and KV head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub dtype: KvDtype,
}

impl KvLayout {
    /// Bytes one token occupies across all layers (K and V, with their scales).
    pub fn bytes_per_token(&self) -> usize {
        2 * self.n_layers * self.n_kv_heads * self.dtype.row_bytes(self.head_dim)
    }

    /// Bytes of one block.
    pub fn bytes_per_block(&self) -> usize {
        self.bytes_per_token() * BLOCK_TOKENS
    }
}

/// The pool has no free block left for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the KV pool is full ({needed} more blocks needed, {free} free)")]
pub struct KvFull {
    pub needed: usize,
    pub free: usize,
}

/// Blocks in use and in total, for the scheduler and for `/health`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct KvUsage {
    pub blocks_total: usize,
    pub blocks_used: usize,
    pub block_tokens: usize,
    pub bytes_per_block: usize,
    /// How rows are stored (`f16` or `q8`).
    pub dtype: KvDtype,
    /// Sequences whose KV is swapped out to host memory now.
    pub swapped: usize,
    /// Swap-outs since the pool was made (preemptions when blocks ran out).
    pub swap_outs: usize,
    /// Preemptions that dropped a sequence's KV to recompute it later.
    pub recomputes: usize,
}

struct FreeList {
    free: Vec<u32>,
    refs: Vec<u32>,
    /// Prefix cache: the chain hash of each block that holds a full, cached run of tokens.
    hash: Vec<Option<u64>>,
    by_hash: HashMap<u64, u32>,
    /// Cached blocks no sequence holds, least recently released first (tick → block); they
    /// count as free and are evicted when the free list runs dry.
    lru: BTreeMap<u64, u32>,
    released_at: Vec<u64>,
    tick: u64,
}

impl FreeList {
    /// Take block `b` out of the prefix cache; returns the hash it was cached under.
    fn forget(&mut self, b: u32) -> Option<u64> {
        let h = self.hash[b as usize].take()?;
        self.by_hash.remove(&h);
        Some(h)
    }
}

/// A change to the prefix cache, for routers that track which replica holds which prefix
/// (published in vLLM's KV-event format by `crate::kv_events`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvEvent {
    /// A full block entered the cache: its chain hash, the previous block's (None for the
    /// first block of a sequence) and its tokens.
    Stored {
        hash: u64,
        parent: Option<u64>,
        tokens: Vec<u32>,
    },
    /// A block left the cache (evicted or rewritten).
    Removed { hash: u64 },
    /// The cache is empty (a fresh pool).
    Cleared,
}

/// Where a pool reports its cache changes; it must not block (the engine step calls it).
pub type KvEventSink = Arc<dyn Fn(KvEvent) + Send + Sync>;

/// Ask for the pool's memory in 2 MB pages where Linux's transparent huge pages are enabled
/// for regions that ask (`madvise`, the usual default): attention streams a sequence's rows
/// from memory every step, and with 4 KB pages each page costs a TLB miss (a two-level walk
/// in a virtual machine). Measured 3-8% faster attention over 500-4,000 rows from memory
/// (`AIOS_BENCH_ONLY=attention cargo bench --bench kernels`, cold columns). A hint: without
/// huge pages nothing changes. Called before the memory is first written.
fn huge_pages(start: *mut u8, bytes: usize) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = start as usize;
        let (a, b) = (start.div_ceil(HUGE) * HUGE, (start + bytes) / HUGE * HUGE);
        if b > a {
            // SAFETY: the range lies inside the caller's allocation; the advice changes no
            // contents.
            unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (start, bytes);
}

/// A fixed pool of KV blocks.
///
/// Blocks are written only by the sequence that holds them alone, through `&mut KvSeq`; a
/// block shared by several sequences is only read (a writer copies it first).
pub struct KvPool {
    layout: KvLayout,
    /// `n_blocks * block_bytes()` bytes; a block with one reference belongs to one sequence,
    /// which alone writes it (through `&mut KvSeq`); shared blocks are only read.
    /// Zeroed with `calloc` (pages come as they are written); `u64` for 8-byte alignment.
    _data: Vec<u64>,
    /// Start of `_data`; blocks are reached only through raw slices of their own range.
    base: *mut u8,
    n_blocks: usize,
    state: Mutex<FreeList>,
    used: AtomicUsize,
    swapped: AtomicUsize,
    swap_outs: AtomicUsize,
    recomputes: AtomicUsize,
    /// A private pool (one sequence, tests and benches) grows instead of running out.
    growable: bool,
    events: std::sync::OnceLock<KvEventSink>,
    /// Blocks `0..populated` have their memory committed ([`KvPool::prefault`]).
    populated: AtomicUsize,
    /// A thread is committing the next band of blocks.
    populating: std::sync::atomic::AtomicBool,
    /// This pool, for the thread that commits memory ahead of use (dangling for private
    /// pools, which do not).
    me: std::sync::Weak<KvPool>,
}

// SAFETY: element access goes through block ownership (see `data`); the free list is behind
// a mutex and the counters are atomic.
unsafe impl Sync for KvPool {}
unsafe impl Send for KvPool {}

impl KvPool {
    /// A pool of `n_blocks` blocks (allocated now; pages are committed as they are written).
    pub fn new(layout: KvLayout, n_blocks: usize) -> Arc<KvPool> {
        Arc::new_cyclic(|me| KvPool {
            me: me.clone(),
            ..Self::with(layout, n_blocks, false)
        })
    }

    /// A pool with as many blocks as `bytes` holds (at least one).
    pub fn with_bytes(layout: KvLayout, bytes: usize) -> Arc<KvPool> {
        Self::new(layout, (bytes / layout.bytes_per_block()).max(1))
    }

    fn with(layout: KvLayout, n_blocks: usize, growable: bool) -> KvPool {
        let bytes = n_blocks * layout.bytes_per_block();
        let mut data = vec![0u64; bytes.div_ceil(8)];
        huge_pages(data.as_mut_ptr().cast(), bytes);
        KvPool {
            layout,
            base: data.as_mut_ptr().cast::<u8>(),
            _data: data,
            n_blocks,
            state: Mutex::new(FreeList {
                free: (0..n_blocks as u32).rev().collect(),
                refs: vec![0; n_blocks],
                hash: vec![None; n_blocks],
                by_hash: HashMap::new(),
                lru: BTreeMap::new(),
                released_at: vec![0; n_blocks],
                tick: 0,
            }),
            used: AtomicUsize::new(0),
            swapped: AtomicUsize::new(0),
            swap_outs: AtomicUsize::new(0),
            recomputes: AtomicUsize::new(0),
            growable,
            events: std::sync::OnceLock::new(),
            populated: AtomicUsize::new(0),
            populating: Default::default(),
            me: std::sync::Weak::new(),
        }
    }

    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    pub fn usage(&self) -> KvUsage {
        KvUsage {
            blocks_total: self.n_blocks,
            blocks_used: self.used.load(Ordering::Acquire),
            block_tokens: BLOCK_TOKENS,
            bytes_per_block: self.layout.bytes_per_block(),
            dtype: self.layout.dtype,
            swapped: self.swapped.load(Ordering::Acquire),
            swap_outs: self.swap_outs.load(Ordering::Acquire),
            recomputes: self.recomputes.load(Ordering::Acquire),
        }
    }

    /// Commit the memory of the first `blocks` blocks now (the pool is allocated lazily: a
    /// block's first use otherwise costs a page fault in each of its 2 × layers × heads regions,
    /// some 30 ms for 1,400 tokens of this model, paid by whoever first writes there; the
    /// lowest-numbered free blocks are handed out first, so these are the ones used). Safe
    /// beside running sequences: the kernel populates pages without changing their contents.
    /// A no-op where `MADV_POPULATE_WRITE` is unknown (Linux before 5.14, other systems).
    pub fn prefault(&self, blocks: usize) {
        let from = self.populated.load(Ordering::Acquire);
        self.populate(from, blocks);
    }

    /// Blocks committed per band ahead of use: 512 MB, or a quarter of a smaller pool.
    fn band_blocks(&self) -> usize {
        ((512 << 20) / self.block_bytes())
            .min(self.n_blocks / 4)
            .max(1)
    }

    /// Block `top` was just handed out: when it is within half a band of the committed
    /// memory's end, commit the next band on a background thread, so that no request pays
    /// the first-touch page faults of fresh pool memory. Without this, once a busy pool had
    /// used its first prefaulted gigabyte (cached prefixes keep their blocks; fresh ones are
    /// taken first), every new sequence faulted its pages in: a next turn's swap-in from host
    /// memory went from 9 to 28-57 ms. A pool without `me` (private) or fully committed does
    /// nothing.
    fn populate_ahead(&self, top: usize) {
        let done = self.populated.load(Ordering::Acquire);
        let band = self.band_blocks();
        if done >= self.n_blocks || top + band / 2 < done {
            return;
        }
        if let Some(pool) = self.me.upgrade() {
            Self::populate_in_background(pool, move |from| from.max(top + 1) + band);
        }
    }

    /// Commit blocks from the committed end up to `to(end)` on a thread named `kv-prefault`,
    /// unless such a thread is already at work.
    fn populate_in_background(pool: Arc<Self>, to: impl FnOnce(usize) -> usize + Send + 'static) {
        if pool.populating.swap(true, Ordering::AcqRel) {
            return;
        }
        let worker = pool.clone();
        let spawned = std::thread::Builder::new()
            .name("kv-prefault".into())
            .spawn(move || {
                let from = worker.populated.load(Ordering::Acquire);
                worker.populate(from, to(from));
                worker.populating.store(false, Ordering::Release);
            });
        if spawned.is_err() {
            pool.populating.store(false, Ordering::Release);
        }
    }

    /// Commit the memory of blocks `from..to` (clamped to the pool) and record that
    /// `0..to` is committed.
    fn populate(&self, from: usize, to: usize) {
        let to = to.min(self.n_blocks);
        if from >= to {
            return;
        }
        #[cfg(target_os = "linux")]
        {
            let page = 4096usize;
            let base = self.base as usize;
            let end_all = base + self.n_blocks * self.block_bytes();
            for seg in 0..self.segs_per_block() {
                let start = base + self.seg_at(from as u32, seg);
                let end = start + (to - from) * self.seg_bytes();
                // Whole pages around the range (a neighbouring region's page is populated
                // too, harmlessly), inside the allocation.
                let a = (start / page * page).max(base.div_ceil(page) * page);
                let b = (end.div_ceil(page) * page).min(end_all / page * page);
                if b > a {
                    // SAFETY: the range lies inside the pool; populating changes no contents.
                    let r = unsafe {
                        libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_POPULATE_WRITE)
                    };
                    if r != 0 {
                        // Not supported here: pages come on first use, and no thread tries again.
                        self.populated.store(self.n_blocks, Ordering::Release);
                        return;
                    }
                }
            }
        }
        self.populated.fetch_max(to, Ordering::AcqRel);
    }

    pub fn free_blocks(&self) -> usize {
        self.n_blocks - self.used.load(Ordering::Acquire)
    }

    /// Tokens the whole pool holds.
    pub fn capacity_tokens(&self) -> usize {
        self.n_blocks * BLOCK_TOKENS
    }

    fn block_bytes(&self) -> usize {
        self.layout.bytes_per_block()
    }

    fn alloc(&self, n: usize) -> Result<Vec<u32>, KvFull> {
        let mut st = self.state.lock().expect("kv pool lock");
        if st.free.len() + st.lru.len() < n {
            return Err(KvFull {
                needed: n,
                free: st.free.len() + st.lru.len(),
            });
        }
        // Evict the least recently used cached blocks to make up the difference.
        while st.free.len() < n {
            let (_, b) = st.lru.pop_first().expect("counted above");
            if let Some(h) = st.forget(b) {
                self.emit(KvEvent::Removed { hash: h });
            }
            st.free.push(b);
        }
        let at = st.free.len() - n;
        // The free list is a stack with the lowest block on top: a fresh pool hands out
        // ascending runs, which attention streams through.
        let mut got: Vec<u32> = st.free.split_off(at);
        got.reverse();
        for &b in &got {
            st.refs[b as usize] = 1;
            if let Some(h) = st.forget(b) {
                self.emit(KvEvent::Removed { hash: h });
            }
        }
        self.used.fetch_add(n, Ordering::AcqRel);
        drop(st);
        if let Some(&top) = got.iter().max() {
            self.populate_ahead(top as usize);
        }
        Ok(got)
    }

    fn retain(&self, blocks: &[u32]) {
        let mut st = self.state.lock().expect("kv pool lock");
        for &b in blocks {
            st.refs[b as usize] += 1;
        }
    }

    fn release(&self, blocks: &[u32]) {
        let mut st = self.state.lock().expect("kv pool lock");
        let mut freed = 0;
        for &b in blocks {
            let r = &mut st.refs[b as usize];
            *r -= 1;
            if *r == 0 {
                if st.hash[b as usize].is_some() {
                    let t = st.tick;
                    st.tick += 1;
                    st.lru.insert(t, b);
                    st.released_at[b as usize] = t;
                } else {
                    st.free.push(b);
                }
                freed += 1;
            }
        }
        self.used.fetch_sub(freed, Ordering::AcqRel);
    }

    /// The cached blocks of the longest prefix of `hashes` (chain hashes of full blocks), each
    /// now referenced by the caller.
    fn lookup(&self, hashes: &[u64]) -> Vec<u32> {
        let mut st = self.state.lock().expect("kv pool lock");
        let mut got = Vec::new();
        for h in hashes {
            let Some(&b) = st.by_hash.get(h) else { break };
            if st.refs[b as usize] == 0 {
                let t = st.released_at[b as usize];
                st.lru.remove(&t);
                self.used.fetch_add(1, Ordering::AcqRel);
            }
            st.refs[b as usize] += 1;
            got.push(b);
        }
        got
    }

    /// Offer block `b`, full with the tokens whose chain hash is `h`, to the prefix cache.
    fn register(&self, b: u32, h: u64, parent: u64, tokens: &[u32]) {
        let mut st = self.state.lock().expect("kv pool lock");
        if st.hash[b as usize].is_none() && !st.by_hash.contains_key(&h) {
            st.by_hash.insert(h, b);
            st.hash[b as usize] = Some(h);
            if self.events.get().is_some() {
                self.emit(KvEvent::Stored {
                    hash: h,
                    parent: (parent != 0).then_some(parent),
                    tokens: tokens.to_vec(),
                });
            }
        }
    }

    /// Report prefix-cache changes to `sink` from now on (once per pool); it hears first that
    /// the cache is empty.
    pub fn set_event_sink(&self, sink: KvEventSink) {
        let empty = self.state.lock().expect("kv pool lock").by_hash.is_empty();
        if self.events.set(sink).is_ok() && empty {
            self.emit(KvEvent::Cleared);
        }
    }

    fn emit(&self, e: KvEvent) {
        if let Some(sink) = self.events.get() {
            sink(e);
        }
    }

    /// Take block `b` out of the prefix cache (its owner is about to rewrite it).
    fn unregister(&self, b: u32) {
        if let Some(h) = self.state.lock().expect("kv pool lock").forget(b) {
            self.emit(KvEvent::Removed { hash: h });
        }
    }

    /// Cached blocks no sequence holds (reusable, evicted first-released-first).
    pub fn cached_idle_blocks(&self) -> usize {
        self.state.lock().expect("kv pool lock").lru.len()
    }

    fn refs(&self, b: u32) -> u32 {
        self.state.lock().expect("kv pool lock").refs[b as usize]
    }

    /// Number of (layer, K/V, head) segments of a block.
    fn segs_per_block(&self) -> usize {
        2 * self.layout.n_layers * self.layout.n_kv_heads
    }

    /// Bytes of one segment: `BLOCK_TOKENS` rows (and their scales).
    fn seg_bytes(&self) -> usize {
        BLOCK_TOKENS * self.layout.dtype.row_bytes(self.layout.head_dim)
    }

    /// Byte offset of segment `seg` (`(layer * 2 + kv) * n_kv_heads + head`) of block `b`.
    fn seg_at(&self, b: u32, seg: usize) -> usize {
        assert!((b as usize) < self.n_blocks && seg < self.segs_per_block());
        (seg * self.n_blocks + b as usize) * self.seg_bytes()
    }

    /// The rows of block `b` for one layer, K (`kv = 0`) or V (`1`), and head.
    ///
    /// # Safety
    /// No one may write the block while the slice lives.
    unsafe fn seg(&self, b: u32, layer: usize, kv: usize, head: usize) -> KvRows<'_> {
        let seg = (layer * 2 + kv) * self.layout.n_kv_heads + head;
        let bytes = self.seg_n(b, seg);
        let d = self.layout.head_dim;
        match self.layout.dtype {
            // Segments start 8-byte aligned: the allocation is, and a segment is 32 * d (f16)
            // or 16 * d + 64 (q8) bytes; q8 scales start at 16 * d, 4-byte aligned.
            KvDtype::F16 => KvRows::F16(std::slice::from_raw_parts(
                bytes.as_ptr().cast::<KvElem>(),
                BLOCK_TOKENS * d,
            )),
            KvDtype::Q8 => KvRows::Q8 {
                q: std::slice::from_raw_parts(bytes.as_ptr().cast::<i8>(), BLOCK_TOKENS * d),
                scale: std::slice::from_raw_parts(
                    bytes.as_ptr().add(BLOCK_TOKENS * d).cast::<f32>(),
                    BLOCK_TOKENS,
                ),
            },
        }
    }

    unsafe fn seg_n(&self, b: u32, seg: usize) -> &[u8] {
        std::slice::from_raw_parts(self.base.add(self.seg_at(b, seg)), self.seg_bytes())
    }

    /// Writable bytes of block `b`, segment `seg`.
    ///
    /// # Safety
    /// The caller must own the block alone (one reference) and no one may read it meanwhile.
    #[allow(clippy::mut_from_ref)]
    unsafe fn seg_n_mut(&self, b: u32, seg: usize) -> &mut [u8] {
        std::slice::from_raw_parts_mut(self.base.add(self.seg_at(b, seg)), self.seg_bytes())
    }

    /// Copy block `from` of pool `src` into block `to` of this pool.
    ///
    /// # Safety
    /// `to` must be ours alone; `from` is only read.
    unsafe fn copy_block(&self, to: u32, src: &KvPool, from: u32) {
        for seg in 0..self.segs_per_block() {
            self.seg_n_mut(to, seg)
                .copy_from_slice(src.seg_n(from, seg));
        }
    }
}

/// Copy `src` into `dst` (of the same length) with streaming stores where the CPU has them:
/// KV brought back from host memory or disk is written once and read later, and going around
/// the cache spares reading every destination line first (2 KB segments scattered over the
/// pool's regions filled in half the time, measured on the AVX2 machine class). Call
/// [`stream_fence`] before another thread may read `dst`.
fn copy_streaming(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len());
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
        let head = dst.as_ptr().align_offset(16).min(dst.len());
        dst[..head].copy_from_slice(&src[..head]);
        let end = head + (dst.len() - head) / 16 * 16;
        for i in (head..end).step_by(16) {
            // SAFETY: `i + 16 <= end <= len` for both slices, `dst + i` is 16-byte aligned,
            // and SSE2 is part of every x86-64 CPU.
            unsafe {
                let v = _mm_loadu_si128(src.as_ptr().add(i).cast::<__m128i>());
                _mm_stream_si128(dst.as_mut_ptr().add(i).cast::<__m128i>(), v);
            }
        }
        dst[end..].copy_from_slice(&src[end..]);
    }
    #[cfg(not(target_arch = "x86_64"))]
    dst.copy_from_slice(src);
}

/// Make the streaming stores of [`copy_streaming`] visible before anything written after
/// them (they are weakly ordered, even against a later release store).
fn stream_fence() {
    // SAFETY: SSE2 is part of every x86-64 CPU.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
}

mod seq;
pub use seq::{CopyOut, FillIn, HostCopy, KvSeq, SwappedKv};

pub mod snapshot;

#[cfg(test)]
mod tests;

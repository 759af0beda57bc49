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
//! Memory layout: `[layer][K, V][kv_head][block][BLOCK_TOKENS][head_dim]`. A block is the same
//! index in every (layer, K/V, head) region, so a sequence whose blocks were allocated in order
//! reads each head's rows as one contiguous stream, as attention wants (a layout with each
//! block's layers together would scatter 2 KB reads hundreds of KB apart).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use half::f16;

/// The element type KV rows are stored in.
pub type KvElem = f16;

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
}

impl KvLayout {
    /// Bytes one token occupies across all layers (K and V, f16).
    pub fn bytes_per_token(&self) -> usize {
        self.elems_per_token() * std::mem::size_of::<KvElem>()
    }

    fn elems_per_token(&self) -> usize {
        2 * self.n_layers * self.n_kv_heads * self.head_dim
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

/// A fixed pool of KV blocks.
///
/// Blocks are written only by the sequence that holds them alone, through `&mut KvSeq`; a
/// block shared by several sequences is only read (a writer copies it first).
pub struct KvPool {
    layout: KvLayout,
    /// `n_blocks * block_elems()` elements; a block with one reference belongs to one sequence,
    /// which alone writes it (through `&mut KvSeq`); shared blocks are only read.
    /// Zeroed with `calloc` (pages come as they are written); `u16` is `f16`'s layout.
    _data: Vec<u16>,
    /// Start of `_data`; blocks are reached only through raw slices of their own range.
    base: *mut KvElem,
    n_blocks: usize,
    state: Mutex<FreeList>,
    used: AtomicUsize,
    swapped: AtomicUsize,
    swap_outs: AtomicUsize,
    recomputes: AtomicUsize,
    /// A private pool (one sequence, tests and benches) grows instead of running out.
    growable: bool,
    events: std::sync::OnceLock<KvEventSink>,
}

// SAFETY: element access goes through block ownership (see `data`); the free list is behind
// a mutex and the counters are atomic.
unsafe impl Sync for KvPool {}
unsafe impl Send for KvPool {}

impl KvPool {
    /// A pool of `n_blocks` blocks (allocated now; pages are committed as they are written).
    pub fn new(layout: KvLayout, n_blocks: usize) -> Arc<KvPool> {
        Arc::new(Self::with(layout, n_blocks, false))
    }

    /// A pool with as many blocks as `bytes` holds (at least one).
    pub fn with_bytes(layout: KvLayout, bytes: usize) -> Arc<KvPool> {
        Self::new(layout, (bytes / layout.bytes_per_block()).max(1))
    }

    fn with(layout: KvLayout, n_blocks: usize, growable: bool) -> KvPool {
        let elems = n_blocks * layout.elems_per_token() * BLOCK_TOKENS;
        let mut data = vec![0u16; elems];
        KvPool {
            layout,
            base: data.as_mut_ptr().cast::<KvElem>(),
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
        #[cfg(target_os = "linux")]
        {
            let blocks = blocks.min(self.n_blocks);
            let page = 4096usize;
            for seg in 0..self.segs_per_block() {
                // SAFETY: address arithmetic inside the pool's allocation.
                let start = unsafe { self.base.add(self.seg_at(0, seg)) } as usize;
                let end = start + blocks * self.seg_elems() * std::mem::size_of::<KvElem>();
                let (a, b) = (start.div_ceil(page) * page, end / page * page);
                if b > a {
                    // SAFETY: the range lies inside the pool; populating changes no contents.
                    let r = unsafe {
                        libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_POPULATE_WRITE)
                    };
                    if r != 0 {
                        return;
                    }
                }
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = blocks;
    }

    pub fn free_blocks(&self) -> usize {
        self.n_blocks - self.used.load(Ordering::Acquire)
    }

    /// Tokens the whole pool holds.
    pub fn capacity_tokens(&self) -> usize {
        self.n_blocks * BLOCK_TOKENS
    }

    fn block_elems(&self) -> usize {
        self.layout.elems_per_token() * BLOCK_TOKENS
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

    /// Elements of one segment: `BLOCK_TOKENS` rows.
    fn seg_elems(&self) -> usize {
        BLOCK_TOKENS * self.layout.head_dim
    }

    /// Offset of segment `seg` (`(layer * 2 + kv) * n_kv_heads + head`) of block `b`.
    fn seg_at(&self, b: u32, seg: usize) -> usize {
        assert!((b as usize) < self.n_blocks && seg < self.segs_per_block());
        (seg * self.n_blocks + b as usize) * self.seg_elems()
    }

    /// The rows of block `b` for one layer, K (`kv = 0`) or V (`1`), and head.
    ///
    /// # Safety
    /// No one may write the block while the slice lives.
    unsafe fn seg(&self, b: u32, layer: usize, kv: usize, head: usize) -> &[KvElem] {
        let seg = (layer * 2 + kv) * self.layout.n_kv_heads + head;
        self.seg_n(b, seg)
    }

    unsafe fn seg_n(&self, b: u32, seg: usize) -> &[KvElem] {
        std::slice::from_raw_parts(self.base.add(self.seg_at(b, seg)), self.seg_elems())
    }

    /// Writable rows of block `b`, segment `seg`.
    ///
    /// # Safety
    /// The caller must own the block alone (one reference) and no one may read it meanwhile.
    #[allow(clippy::mut_from_ref)]
    unsafe fn seg_n_mut(&self, b: u32, seg: usize) -> &mut [KvElem] {
        std::slice::from_raw_parts_mut(self.base.add(self.seg_at(b, seg)), self.seg_elems())
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

mod seq;
pub use seq::{KvSeq, SwappedKv};

pub mod snapshot;

#[cfg(test)]
mod tests;

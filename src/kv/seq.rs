//! One sequence's view of the pool: its block table, swapping to host memory and back, and
//! its part in the prefix cache.

use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::*;

/// A sequence's KV held in host memory while its blocks are given back to the pool.
pub struct SwappedKv {
    len: usize,
    /// The blocks' segments as the pool stores them; shared with a thread copying them into
    /// the pool (see [`KvSeq::host_shared`]).
    data: Arc<Vec<u8>>,
}

/// A swap-out job (see [`KvSeq::copy_out_job`]): a fork of the sequence, sharing its blocks.
pub struct CopyOut(KvSeq);

impl CopyOut {
    /// Copy the blocks to host memory; the fork's references go when this returns.
    pub fn run(self) -> HostCopy {
        HostCopy {
            data: self.0.copy_to_host(),
            blocks: self.0.blocks.clone(),
            len: self.0.len,
        }
    }
}

/// A swap-in job (see [`KvSeq::fill_job`]): blocks taken for a swapped-out sequence, and its
/// host copy.
pub struct FillIn {
    into: KvSeq,
    from: Arc<Vec<u8>>,
}

impl FillIn {
    /// Copy the host copy into the blocks; returns both, for [`KvSeq::swap_in_with`].
    pub fn run(mut self) -> (Arc<Vec<u8>>, KvSeq) {
        self.into.fill_all(&self.from);
        (self.from, self.into)
    }
}

/// What a [`CopyOut`] job copied: the blocks and length it copied, and the bytes.
pub struct HostCopy {
    blocks: Vec<u32>,
    len: usize,
    data: Vec<u8>,
}

/// One sequence's keys and values: a block table into a pool.
pub struct KvSeq {
    pool: Arc<KvPool>,
    blocks: Vec<u32>,
    len: usize,
    swapped: Option<SwappedKv>,
    /// Chain hashes of the leading full blocks offered to (or taken from) the prefix cache.
    hashes: Vec<u64>,
}

/// The chain hash of a block of tokens after the block whose hash is `prev`.
fn chain_hash(prev: u64, tokens: &[u32]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    prev.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

impl KvSeq {
    /// A sequence with a private pool of room for `capacity` tokens that grows as needed
    /// (tests, benchmarks, single-sequence use).
    pub fn new(layout: KvLayout, capacity: usize) -> Self {
        let blocks = capacity.div_ceil(BLOCK_TOKENS).max(1);
        Self::in_pool(Arc::new(KvPool::with(layout, blocks, true)))
    }

    /// An empty sequence in a shared pool.
    pub fn in_pool(pool: Arc<KvPool>) -> Self {
        Self {
            pool,
            blocks: Vec::new(),
            len: 0,
            swapped: None,
            hashes: Vec::new(),
        }
    }

    pub fn layout(&self) -> KvLayout {
        self.pool.layout
    }

    /// Tokens whose K/V are stored (all layers have been written up to here).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Blocks this sequence holds in its pool.
    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// The pool blocks it holds, in order.
    pub fn block_ids(&self) -> &[u32] {
        &self.blocks
    }

    /// Blocks it holds that no other sequence shares: those a swap-out would free.
    pub fn sole_blocks(&self) -> usize {
        self.blocks
            .iter()
            .filter(|&&b| self.pool.refs(b) == 1)
            .count()
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(tokens: usize) -> usize {
        tokens.div_ceil(BLOCK_TOKENS)
    }

    /// More blocks this sequence needs to hold `n` more tokens (after a swap-in, if swapped).
    pub fn blocks_needed(&self, n: usize) -> usize {
        Self::blocks_for(self.len + n).saturating_sub(self.blocks.len())
    }

    pub fn is_swapped(&self) -> bool {
        self.swapped.is_some()
    }

    /// Make room for `n` more tokens: all the blocks, or none and an error.
    pub fn reserve(&mut self, n: usize) -> Result<(), KvFull> {
        assert!(!self.is_swapped(), "reserve on a swapped-out sequence");
        let need = self.blocks_needed(n);
        if need == 0 {
            return Ok(());
        }
        if self.pool.growable && self.pool.free_blocks() < need {
            self.grow(need);
        }
        let got = self.pool.alloc(need)?;
        self.blocks.extend(got);
        Ok(())
    }

    /// A private pool grows: a new pool with more blocks, this sequence's blocks copied over.
    fn grow(&mut self, need: usize) {
        let old = self.pool.clone();
        let n = (old.n_blocks * 2).max(old.n_blocks + need);
        let pool = Arc::new(KvPool::with(old.layout, n, true));
        let fresh = pool.alloc(self.blocks.len()).expect("a larger pool");
        for (&from, &to) in self.blocks.iter().zip(&fresh) {
            // SAFETY: the new pool's blocks are ours alone; the old ones are only read.
            unsafe { pool.copy_block(to, &old, from) };
        }
        old.release(&self.blocks);
        self.blocks = fresh;
        self.pool = pool;
        self.hashes.clear();
    }

    /// Write the K and V rows of `n` tokens at positions `len..len+n` of `layer`.
    /// `k` and `v` are `[n][n_kv_heads][head_dim]` in f32. Call [`KvSeq::reserve`] first and
    /// [`KvSeq::advance`] after every layer has been written.
    pub fn write(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let l = self.pool.layout;
        let (h, d) = (l.n_kv_heads, l.head_dim);
        let dtype = l.dtype;
        let n = k.len() / (h * d);
        assert!(
            self.len + n <= self.blocks.len() * BLOCK_TOKENS,
            "reserve() before write()"
        );
        let mut owned = None;
        for t in 0..n {
            let pos = self.len + t;
            let b = self.own_block_once(&mut owned, pos / BLOCK_TOKENS);
            let r = pos % BLOCK_TOKENS;
            for (kv, src) in [k, v].into_iter().enumerate() {
                for head in 0..h {
                    let row = &src[(t * h + head) * d..][..d];
                    // SAFETY: `own_block` made the block ours alone; `&mut self` keeps
                    // readers away.
                    let seg = unsafe { self.pool.seg_n_mut(b, (layer * 2 + kv) * h + head) };
                    store_row(dtype, seg, r, row, kv == 0);
                }
            }
        }
    }

    /// [`own_block`](Self::own_block) settled once per block touched, not once per row (it
    /// takes the pool's lock): `last` remembers the block index last owned and its block.
    fn own_block_once(&mut self, last: &mut Option<(usize, u32)>, i: usize) -> u32 {
        match *last {
            Some((j, b)) if j == i => b,
            _ => {
                let b = self.own_block(i);
                *last = Some((i, b));
                b
            }
        }
    }

    /// The block at index `i` of the table, copied first if another sequence shares it.
    fn own_block(&mut self, i: usize) -> u32 {
        let b = self.blocks[i];
        if self.pool.refs(b) == 1 {
            return b;
        }
        let fresh = self.pool.alloc(1).expect("a block for copy-on-write")[0];
        // SAFETY: `fresh` is ours alone; `b` is shared, so only read.
        unsafe { self.pool.copy_block(fresh, &self.pool, b) };
        self.pool.release(&[b]);
        self.blocks[i] = fresh;
        fresh
    }

    /// Mark `n` tokens written by [`KvSeq::write`] as stored.
    pub fn advance(&mut self, n: usize) {
        self.len += n;
        debug_assert!(self.len <= self.blocks.len() * BLOCK_TOKENS);
    }

    /// Forget everything after the first `len` tokens, giving back blocks no longer needed.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        if let Some(sw) = &mut self.swapped {
            sw.len = sw.len.min(len);
            let keep = Self::blocks_for(sw.len) * self.pool.block_bytes();
            if sw.data.len() > keep {
                Arc::make_mut(&mut sw.data).truncate(keep);
            }
        }
        let keep = Self::blocks_for(self.len);
        if self.blocks.len() > keep {
            let gone = self.blocks.split_off(keep);
            self.pool.release(&gone);
        }
        let full = self.len / BLOCK_TOKENS;
        if self.hashes.len() > full {
            // A kept block that is no longer full will be written again: out of the cache
            // (a shared one is copied on write instead, so it stays).
            if let Some(&b) = self.blocks.get(full) {
                if self.pool.refs(b) == 1 {
                    self.pool.unregister(b);
                }
            }
            self.hashes.truncate(full);
        }
    }

    /// Start an empty sequence from the longest cached prefix of `tokens` (whole blocks, and
    /// never the last token, whose logits the caller needs). Returns the tokens reused.
    pub fn attach_prefix(&mut self, tokens: &[u32]) -> usize {
        if self.len > 0 || !self.blocks.is_empty() || self.is_swapped() || tokens.is_empty() {
            return 0;
        }
        let mut hashes = Vec::new();
        let mut prev = 0;
        for block in tokens[..tokens.len() - 1].chunks_exact(BLOCK_TOKENS) {
            prev = chain_hash(prev, block);
            hashes.push(prev);
        }
        self.blocks = self.pool.lookup(&hashes);
        self.hashes = hashes[..self.blocks.len()].to_vec();
        self.len = self.blocks.len() * BLOCK_TOKENS;
        self.len
    }

    /// Offer the full blocks written so far (holding `tokens[..len]`) to the prefix cache.
    pub fn register_blocks(&mut self, tokens: &[u32]) {
        if self.is_swapped() {
            return;
        }
        let full = (self.len / BLOCK_TOKENS).min(tokens.len() / BLOCK_TOKENS);
        for i in self.hashes.len()..full {
            let prev = self.hashes.last().copied().unwrap_or(0);
            let h = chain_hash(prev, &tokens[i * BLOCK_TOKENS..(i + 1) * BLOCK_TOKENS]);
            let block = &tokens[i * BLOCK_TOKENS..(i + 1) * BLOCK_TOKENS];
            self.pool.register(self.blocks[i], h, prev, block);
            self.hashes.push(h);
        }
    }

    /// A second sequence sharing this one's blocks (copy-on-write), e.g. a common prefix.
    pub fn fork(&self) -> KvSeq {
        assert!(!self.is_swapped(), "fork of a swapped-out sequence");
        self.pool.retain(&self.blocks);
        KvSeq {
            pool: self.pool.clone(),
            blocks: self.blocks.clone(),
            len: self.len,
            swapped: None,
            hashes: self.hashes.clone(),
        }
    }

    /// [`KvSeq::fork`], or `None` while swapped out.
    pub fn fork_resident(&self) -> Option<KvSeq> {
        (!self.is_swapped()).then(|| self.fork())
    }

    /// Copy this sequence's KV to host memory and give its blocks back to the pool.
    pub fn swap_out(&mut self) {
        if self.is_swapped() {
            return;
        }
        let data = self.copy_to_host();
        self.swapped_to(data);
    }

    /// This sequence's KV in host memory, block after block as the pool stores it (the layout
    /// of [`KvSeq::fill`] and of snapshots).
    fn copy_to_host(&self) -> Vec<u8> {
        let n = self.pool.block_bytes();
        let used = Self::blocks_for(self.len);
        // Copied by two threads, half the blocks each, into a buffer left uninitialised (a
        // zeroed one costs a memset when the allocator reuses memory): 32 MB in 2.6-3.0 ms
        // where one thread took 5.0-6.7, and 8.7-9.5 ms where it took 16.4-18.8 when the
        // buffer's pages are fresh.
        let mut data: Vec<u8> = Vec::with_capacity(used * n);
        let (pool, seg) = (&*self.pool, self.pool.seg_bytes());
        let copy = |blocks: &[u32], out: &mut [std::mem::MaybeUninit<u8>]| {
            for (&b, dst) in blocks.iter().zip(out.chunks_exact_mut(n)) {
                for (s, piece) in dst.chunks_exact_mut(seg).enumerate() {
                    // SAFETY: reading a block we hold a reference to.
                    let src = unsafe { pool.seg_n(b, s) };
                    // SAFETY: `piece` is `seg` bytes of the buffer's spare room, as is `src`.
                    unsafe {
                        std::ptr::copy_nonoverlapping(src.as_ptr(), piece.as_mut_ptr().cast(), seg)
                    };
                }
            }
        };
        let (head, tail) = self.blocks[..used].split_at(used / 2);
        let (first, rest) = data.spare_capacity_mut()[..used * n].split_at_mut(head.len() * n);
        std::thread::scope(|scope| {
            scope.spawn(|| copy(tail, rest));
            copy(head, first);
        });
        // SAFETY: both halves were written, every byte.
        unsafe { data.set_len(used * n) };
        data
    }

    /// Give the blocks back, keeping `data` (this sequence's KV) in host memory.
    fn swapped_to(&mut self, data: Vec<u8>) {
        self.pool.release(&self.blocks);
        self.blocks.clear();
        self.swapped = Some(SwappedKv {
            len: self.len,
            data: Arc::new(data),
        });
        self.pool.swapped.fetch_add(1, Ordering::AcqRel);
        self.pool.swap_outs.fetch_add(1, Ordering::AcqRel);
    }

    /// A swap-out to run on another thread ([`CopyOut::run`], then [`KvSeq::swap_out_with`] on
    /// this sequence), so that the caller goes on meanwhile. The job holds its own references
    /// to the blocks (a fork), which stay intact whatever becomes of this sequence; `None`
    /// while swapped out.
    pub fn copy_out_job(&self) -> Option<CopyOut> {
        self.fork_resident().map(CopyOut)
    }

    /// Finish a swap-out with the copy a [`CopyOut`] job made: the blocks go back to the
    /// pool. False, changing nothing, unless this sequence still holds what was copied.
    pub fn swap_out_with(&mut self, copy: HostCopy) -> bool {
        if self.is_swapped() || self.blocks != copy.blocks || self.len != copy.len {
            return false;
        }
        self.swapped_to(copy.data);
        true
    }

    /// A swap-in to run on another thread ([`FillIn::run`], then [`KvSeq::swap_in_with`] on
    /// this sequence): pool blocks taken now, to be filled from the host copy. `Ok(None)` when
    /// not swapped out.
    pub fn fill_job(&self) -> Result<Option<FillIn>, KvFull> {
        let Some(from) = self.host_shared() else {
            return Ok(None);
        };
        Ok(Some(FillIn {
            into: KvSeq::for_fill(self.pool.clone(), self.len)?,
            from,
        }))
    }

    /// Finish a swap-in with blocks `into` filled from host copy `from`. False, changing
    /// nothing (and `into`'s blocks go back to the pool), unless this sequence is still
    /// swapped out with that copy.
    pub fn swap_in_with(&mut self, from: &Arc<Vec<u8>>, into: KvSeq) -> bool {
        let same = self
            .swapped
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(&s.data, from) && s.len == into.len);
        if same {
            // The swapped-out self is dropped (its count of swapped sequences with it); the
            // fresh blocks are offered to the prefix cache again by `register_blocks`.
            *self = into;
        }
        same
    }

    /// Give all blocks back and forget the KV: the sequence's tokens are to be prefilled again
    /// (preemption by recomputation).
    pub fn drop_for_recompute(&mut self) {
        self.truncate(0);
        self.pool.recomputes.fetch_add(1, Ordering::AcqRel);
    }

    /// A sequence of `len` tokens whose KV is `data` in host memory (as [`KvSeq::swap_out`]
    /// leaves it, e.g. read back from a snapshot file); [`KvSeq::swap_in`] brings it into `pool`.
    pub fn from_host(pool: Arc<KvPool>, len: usize, data: Vec<u8>) -> Result<Self, String> {
        let want = Self::blocks_for(len) * pool.block_bytes();
        if data.len() != want {
            return Err(format!(
                "{len} tokens of KV take {want} bytes in this layout, not {}",
                data.len()
            ));
        }
        pool.swapped.fetch_add(1, Ordering::AcqRel);
        Ok(Self {
            pool,
            blocks: Vec::new(),
            len,
            swapped: Some(SwappedKv {
                len,
                data: Arc::new(data),
            }),
            hashes: Vec::new(),
        })
    }

    /// A sequence of `len` tokens whose blocks are taken from the pool now and whose rows are
    /// then written by [`KvSeq::fill`]: a snapshot read from disk straight into the pool, with
    /// no buffer in host memory and no swap-in copy after it.
    pub fn for_fill(pool: Arc<KvPool>, len: usize) -> Result<Self, KvFull> {
        let blocks = pool.alloc(Self::blocks_for(len))?;
        Ok(Self {
            pool,
            blocks,
            len,
            swapped: None,
            hashes: Vec::new(),
        })
    }

    /// Write `bytes` at byte `offset` of this sequence's KV laid out as [`KvSeq::swap_out`] lays
    /// it out (block after block, each block's segments in turn), the layout of a snapshot.
    /// Panics past the blocks the sequence holds.
    pub fn fill(&mut self, mut offset: usize, mut bytes: &[u8]) {
        let (seg, per) = (self.pool.seg_bytes(), self.pool.segs_per_block());
        let mut owned = None;
        while !bytes.is_empty() {
            let (s, at) = (offset / seg, offset % seg);
            let b = self.own_block_once(&mut owned, s / per);
            let n = (seg - at).min(bytes.len());
            // SAFETY: `own_block` made the block ours alone; `&mut self` keeps readers away.
            let dst = unsafe { &mut self.pool.seg_n_mut(b, s % per)[at..at + n] };
            super::copy_streaming(dst, &bytes[..n]);
            bytes = &bytes[n..];
            offset += n;
        }
        super::stream_fence();
    }

    /// Write all of this sequence's KV from `bytes`, laid out as [`KvSeq::swap_out`] lays it
    /// out, on two threads each taking half the blocks: one core's copy is limited by how many
    /// cache misses it keeps in flight, and two copy 32 MB about 1.5x faster here.
    pub fn fill_all(&mut self, bytes: &[u8]) {
        let per = self.pool.block_bytes();
        let n = Self::blocks_for(self.len);
        assert_eq!(bytes.len(), n * per, "the KV of {} tokens", self.len);
        for i in 0..n {
            self.own_block(i);
        }
        let (pool, seg) = (&*self.pool, self.pool.seg_bytes());
        let copy = |blocks: &[u32], bytes: &[u8]| {
            for (&b, src) in blocks.iter().zip(bytes.chunks_exact(per)) {
                for (s, piece) in src.chunks_exact(seg).enumerate() {
                    // SAFETY: `own_block` made every block ours alone, `&mut self` keeps
                    // readers away, and the two threads write disjoint blocks.
                    super::copy_streaming(unsafe { pool.seg_n_mut(b, s) }, piece);
                }
            }
            super::stream_fence();
        };
        let (head, tail) = self.blocks[..n].split_at(n / 2);
        let (first, rest) = bytes.split_at(head.len() * per);
        std::thread::scope(|scope| {
            scope.spawn(|| copy(tail, rest));
            copy(head, first);
        });
    }

    /// The KV in host memory while swapped out.
    pub fn host_data(&self) -> Option<&[u8]> {
        self.swapped.as_ref().map(|s| s.data.as_slice())
    }

    /// The KV in host memory while swapped out, shared: a thread can copy it into blocks
    /// taken with [`KvSeq::for_fill`] while this sequence keeps it (and stays swapped out).
    pub fn host_shared(&self) -> Option<Arc<Vec<u8>>> {
        self.swapped.as_ref().map(|s| s.data.clone())
    }

    /// Bring a swapped-out sequence back into the pool, bit for bit.
    pub fn swap_in(&mut self) -> Result<(), KvFull> {
        let Some(sw) = &self.swapped else {
            return Ok(());
        };
        let blocks = self.pool.alloc(Self::blocks_for(sw.len))?;
        let data = self.swapped.take().expect("checked above").data;
        self.blocks = blocks;
        self.fill_all(&data);
        // Fresh blocks: offered to the prefix cache again by the next `register_blocks`.
        self.hashes.clear();
        self.pool.swapped.fetch_sub(1, Ordering::AcqRel);
        Ok(())
    }

    /// The first `upto` rows of K and V for one layer and KV head as f32, row by row, scales
    /// applied (tests, diagnostics).
    pub fn rows_f32(&self, layer: usize, kv_head: usize, upto: usize) -> (Vec<f32>, Vec<f32>) {
        let d = self.pool.layout.head_dim;
        let (mut k, mut v) = (Vec::new(), Vec::new());
        for (i, (ks, vs)) in self.block_segments(layer, kv_head, 0, upto).enumerate() {
            let rows = (upto - i * BLOCK_TOKENS).min(BLOCK_TOKENS);
            k.extend(ks.to_f32(rows, d, true));
            v.extend(vs.to_f32(rows, d, false));
        }
        (k, v)
    }

    /// K and V of one layer and KV head for the blocks holding rows `from..upto` (`from` a
    /// multiple of `BLOCK_TOKENS`), whole: `BLOCK_TOKENS` rows each, the last block's rows past
    /// `upto` included (whatever they hold), so a kernel may read a block in fixed-size steps
    /// and ignore what it does not need.
    pub fn block_segments(
        &self,
        layer: usize,
        kv_head: usize,
        from: usize,
        upto: usize,
    ) -> impl Iterator<Item = (KvRows<'_>, KvRows<'_>)> + '_ {
        assert!(
            upto <= self.blocks.len() * BLOCK_TOKENS,
            "rows beyond the blocks"
        );
        assert!(
            from.is_multiple_of(BLOCK_TOKENS),
            "a range starting inside a block"
        );
        self.blocks[..upto.div_ceil(BLOCK_TOKENS)]
            .iter()
            .skip(from / BLOCK_TOKENS)
            .map(move |&b| {
                // SAFETY: writers hold `&mut KvSeq`; this borrow of `self` keeps them away.
                unsafe {
                    (
                        self.pool.seg(b, layer, 0, kv_head),
                        self.pool.seg(b, layer, 1, kv_head),
                    )
                }
            })
    }
}

impl Drop for KvSeq {
    fn drop(&mut self) {
        self.pool.release(&self.blocks);
        if self.swapped.take().is_some() {
            self.pool.swapped.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

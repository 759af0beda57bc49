//! Causal attention of new query rows against a sequence's stored K/V rows (f16, or 8-bit with
//! a scale per row).
//!
//! Grouped-query heads read their shared KV head directly (no `repeat_kv` copies); the cost of
//! a decode step is linear in the context. Work is split over (sequence, KV head, query chunk)
//! and run on candle's persistent thread pool, the one its matmuls use.

use super::{exp_nonpositive, max, max_lanes, sum};
use crate::kv::{KvRows, KvSeq, BLOCK_TOKENS};
use kernels::Rows;

/// One sequence's part of a batch, as attention sees it.
pub struct AttnSeq<'a> {
    pub kv: &'a KvSeq,
    /// Index of this sequence's first query row in the batch.
    pub row: usize,
    /// Number of query rows (new tokens) of this sequence.
    pub n_tokens: usize,
    /// Position of the first new token; token `i` attends to positions `0..=first_pos + i`.
    pub first_pos: usize,
}

/// Shape of the attention heads.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// Query rows per task: enough to amortise converting K/V to f32, small enough to parallelise.
const Q_CHUNK: usize = 16;
/// Long contexts are split into ranges of this many K/V rows, at fixed positions, each its own
/// task; the partial softmax results are merged in order. Fixed boundaries make a sequence's
/// result independent of how the batch around it is formed (batch invariance).
const SPLIT_ROWS: usize = 512;

/// One unit of work: query rows `t0..t0 + n` of sequence `s` and the heads sharing KV head
/// `g`, against K/V rows `lo..hi`.
#[derive(Clone, Copy)]
struct Task {
    s: usize,
    g: usize,
    t0: usize,
    n: usize,
    lo: usize,
    hi: usize,
}

/// `q` is `[n_rows][n_heads][head_dim]` (RoPE applied); the K/V rows of every new token must
/// already be written to `layer`. Returns the attention output in the same layout as `q`.
///
/// Work is split by sequence, KV head, query chunk and K/V range, so a single decode stream on
/// a long context still keeps every core busy.
pub fn attention(q: &[f32], seqs: &[AttnSeq], layer: usize, h: Heads) -> Vec<f32> {
    let width = h.n_heads * h.head_dim;
    let group = h.n_heads / h.n_kv_heads;
    let mut tasks = Vec::new();
    for (s, seq) in seqs.iter().enumerate() {
        for g in 0..h.n_kv_heads {
            for t0 in (0..seq.n_tokens).step_by(Q_CHUNK) {
                let n = Q_CHUNK.min(seq.n_tokens - t0);
                let end = seq.first_pos + t0 + n;
                for lo in (0..end).step_by(SPLIT_ROWS) {
                    let hi = (lo + SPLIT_ROWS).min(end);
                    tasks.push(Task {
                        s,
                        g,
                        t0,
                        n,
                        lo,
                        hi,
                    });
                }
            }
        }
    }
    let scale = 1.0 / (h.head_dim as f32).sqrt();
    let run = |t: &Task| {
        let seq = &seqs[t.s];
        SCRATCH.with_borrow_mut(|s| {
            s.q.clear();
            for i in t.t0..t.t0 + t.n {
                let row = &q[(seq.row + i) * width..][..width];
                let heads = &row[t.g * group * h.head_dim..][..group * h.head_dim];
                s.q.extend(heads.iter().map(|x| x * scale));
            }
            let first = seq.first_pos + t.t0;
            attend_range(
                &s.q,
                t.n,
                group,
                first,
                seq.kv,
                layer,
                t.g,
                h.head_dim,
                t.lo,
                t.hi,
                &mut s.bufs,
            )
        })
    };
    // candle's persistent pool, the one its matmuls use: one set of threads for the whole step,
    // none spinning while another pool works.
    let slots: Vec<std::sync::OnceLock<Partial>> =
        tasks.iter().map(|_| Default::default()).collect();
    candle_core::utils::barrier_pool().execute_chunked(tasks.len(), |range| {
        for i in range {
            let _ = slots[i].set(run(&tasks[i]));
        }
    });
    let parts: Vec<Partial> = slots
        .into_iter()
        .map(|s| s.into_inner().expect("every attention task ran"))
        .collect();
    let mut out = vec![0f32; q.len()];
    let mut i = 0;
    while i < tasks.len() {
        // Tasks of one (sequence, KV head, query chunk) are adjacent: merge their partials.
        let t = tasks[i];
        let mut merged = parts[i].clone();
        i += 1;
        while i < tasks.len() && (tasks[i].s, tasks[i].g, tasks[i].t0) == (t.s, t.g, t.t0) {
            merged.merge(&parts[i], h.head_dim);
            i += 1;
        }
        let res = merged.finish(h.head_dim);
        let seq = &seqs[t.s];
        for r in 0..t.n {
            let dst = (seq.row + t.t0 + r) * width + t.g * group * h.head_dim;
            let src = &res[r * group * h.head_dim..][..group * h.head_dim];
            out[dst..dst + src.len()].copy_from_slice(src);
        }
    }
    out
}

/// Buffers of a thread's attention tasks, kept from task to task (a long decode step runs a few
/// hundred tasks; allocating and zeroing them each time was a few percent of it).
#[derive(Default)]
struct Scratch {
    /// The task's queries, scaled by `1 / sqrt(head_dim)`.
    q: Vec<f32>,
    bufs: Bufs,
}

/// `attend_range`'s working space, of any content on entry.
#[derive(Default)]
struct Bufs {
    /// Scores, then weights (see `attend_range`).
    w: Vec<f32>,
    /// A block widened to f32.
    buf: Vec<f32>,
    /// The queries as 16-bit integers and their scales, for 8-bit K scored in integers.
    qi: Vec<i16>,
    qscale: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = Default::default();
}

/// The first `n` values of `v`, grown (zeroed) if shorter; what an earlier task left there
/// stays: callers write every value they read.
fn scratch(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// Softmax attention over part of the rows, not yet normalised: per query the running max
/// score, the sum of `exp(score - max)`, and the value rows weighted by the same.
#[derive(Clone)]
struct Partial {
    max: Vec<f32>,
    sum: Vec<f32>,
    acc: Vec<f32>,
}

impl Partial {
    fn merge(&mut self, other: &Partial, d: usize) {
        for j in 0..self.max.len() {
            let m = self.max[j].max(other.max[j]);
            if m == f32::NEG_INFINITY {
                continue;
            }
            let (a, b) = ((self.max[j] - m).exp(), (other.max[j] - m).exp());
            self.sum[j] = self.sum[j] * a + other.sum[j] * b;
            for (x, y) in self.acc[j * d..][..d]
                .iter_mut()
                .zip(&other.acc[j * d..][..d])
            {
                *x = *x * a + y * b;
            }
            self.max[j] = m;
        }
    }

    fn finish(mut self, d: usize) -> Vec<f32> {
        for (j, s) in self.sum.iter().enumerate() {
            let inv = if *s > 0.0 { 1.0 / s } else { 0.0 };
            self.acc[j * d..][..d].iter_mut().for_each(|x| *x *= inv);
        }
        self.acc
    }
}

/// K/V rows whose scores sit together (two blocks): a query's weights over a chunk are summed
/// as one vector of this many lanes, zeros past what it sees, so the summation order is the
/// same whichever queries share the chunk.
const CHUNK: usize = 2 * BLOCK_TOKENS;
const _: () = assert!(SPLIT_ROWS.is_multiple_of(CHUNK) && CHUNK.is_multiple_of(BLOCK_TOKENS));

/// Blocks ahead of the one being read whose rows are prefetched.
const AHEAD: usize = 2;

/// Attention for `n` consecutive tokens (first at position `first`) and the `group` query heads
/// that share KV head `g`, against K/V rows `lo..hi` only. `q` is `[n][group][d]`, already
/// scaled by `1 / sqrt(d)`.
///
/// Two passes over the range's blocks: every query's scores against all K rows (K is stored
/// transposed, so a block's 16 scores are one vector summed column by column), then, with the
/// softmax over the range's scores known, the weighted sum of the V rows. Each pass reads one
/// stream of rows (a head's blocks are adjacent in the pool when they were taken in order),
/// prefetched [`AHEAD`] blocks ahead, where one pass alternating K and V blocks would switch
/// streams every few kilobytes; in a model's step the rows come from memory, not from cache
/// (the weights stream through it between two layers), so the streams matter. The scores
/// (at most `SPLIT_ROWS` a query) stay in cache between the passes.
///
/// A decode step reads the rows as stored; a prefill chunk's many queries widen each block once.
/// 8-bit rows are used as integers (exact in f32) and their scales applied to the scores (in
/// the score kernel) and weights, in the same order either way: both give the same bits.
/// Where [`kernels::int8_kernels`] says so, 8-bit rows go through the integer kernels instead
/// (the queries, and each block's weights, rounded to 16 bits; exact integer sums), read as
/// stored by a decode step and a prefill chunk alike.
#[allow(clippy::too_many_arguments)]
fn attend_range(
    q: &[f32],
    n: usize,
    group: usize,
    first: usize,
    kv: &KvSeq,
    layer: usize,
    g: usize,
    d: usize,
    lo: usize,
    hi: usize,
    bufs: &mut Bufs,
) -> Partial {
    debug_assert!(lo.is_multiple_of(CHUNK));
    let nq = n * group;
    // The end (exclusive, absolute) of the rows query j sees.
    let visible = |j: usize| (first + j / group + 1).min(hi);
    // The range's blocks: `segs[i]` holds rows `lo + i * BLOCK_TOKENS..`.
    let segs: Vec<Seg> = kv.block_segments(layer, g, lo, hi).collect();
    let rows_in = |i: usize| BLOCK_TOKENS.min(hi - lo - i * BLOCK_TOKENS);
    let quantised = segs
        .first()
        .is_some_and(|s| matches!(s.0, KvRows::Q8 { .. }));
    // Scores, then weights: `[chunk][query][CHUNK]`; block `i`'s rows start at `at(i)`.
    let n_chunks = (hi - lo).div_ceil(CHUNK);
    // Every value read below is written first: each block's scores by the score kernel, each
    // chunk whole by the softmax (zeros past what a query sees).
    let w = scratch(&mut bufs.w, n_chunks * nq * CHUNK);
    let at = |i: usize| {
        let r = i * BLOCK_TOKENS;
        r / CHUNK * nq * CHUNK + r % CHUNK
    };
    let int8 = quantised && kernels::int8_kernels(d);
    if int8 {
        kernels::quantize_queries(q, nq, d, &mut bufs.qi, &mut bufs.qscale);
    }
    // Rows widened once for many queries (a prefill chunk); a decode step reads them in place.
    let widen_once = nq > 3 && !int8;
    let buf = scratch(&mut bufs.buf, if widen_once { BLOCK_TOKENS * d } else { 0 });
    let mut p = Partial {
        max: vec![f32::NEG_INFINITY; nq],
        sum: vec![0.0; nq],
        acc: vec![0.0; nq * d],
    };
    // Pass 1: the scores. The last blocks prefetch the first V blocks.
    for (i, &(k, _)) in segs.iter().enumerate() {
        match segs.get(i + AHEAD) {
            Some(&(nk, _)) => prefetch(nk),
            None => {
                if let Some(&(_, nv)) = segs.get(i + AHEAD - segs.len()) {
                    prefetch(nv);
                }
            }
        }
        let out = &mut w[at(i)..];
        if let (true, KvRows::Q8 { q: k8, scale }) = (int8, k) {
            kernels::scores_i8(&bufs.qi, &bufs.qscale, nq, d, k8, scale, out);
        } else if widen_once {
            // K is stored transposed: the whole block, whatever rows it holds.
            k.widen_unscaled(BLOCK_TOKENS * d, buf);
            kernels::scores(q, nq, d, Rows::F32(buf), k.scales(), out);
        } else {
            kernels::scores(q, nq, d, Rows::stored(k), k.scales(), out);
        }
    }
    // The softmax over the range: its maximum, then the weights and their sum (zeros past what
    // the query sees).
    for j in 0..nq {
        let seen = visible(j).saturating_sub(lo);
        (p.max[j], p.sum[j]) = softmax_row(w, nq, n_chunks, j, seen);
    }
    // Pass 2: the weighted V rows (8-bit rows' weights times their scales, the rows then used
    // as integers).
    for (i, &(_, v)) in segs.iter().enumerate() {
        if let Some(&(_, nv)) = segs.get(i + AHEAD) {
            prefetch(nv);
        }
        let cnt = rows_in(i);
        let wi = &mut w[at(i)..];
        if let (true, KvRows::Q8 { q: v8, scale }) = (int8, v) {
            kernels::accumulate_i8(wi, nq, d, v8, scale, cnt, &mut p.acc);
            continue;
        }
        if quantised {
            for j in 0..nq {
                for (x, s) in wi[j * CHUNK..][..cnt].iter_mut().zip(v.scales()) {
                    *x *= s;
                }
            }
        }
        if widen_once {
            v.widen_unscaled(cnt * d, buf);
            kernels::accumulate(wi, nq, d, Rows::F32(buf), cnt, &mut p.acc);
        } else {
            kernels::accumulate(wi, nq, d, Rows::stored(v), cnt, &mut p.acc);
        }
    }
    p
}

/// Query `j`'s softmax over a range's scores (`w` as `attend_range` lays it out, `[chunk]
/// [query][CHUNK]`), of which it sees the first `seen`: each score becomes `e^(score - max)`,
/// unseen ones 0; returns the maximum and the sum. The maximum and the sum are kept in eight
/// lanes over all the chunks and folded once; in 512-bit registers where the kernels in use
/// are the AVX-512 ones (the same operations a lane, so the same bits as the 256-bit loop the
/// build otherwise vectorises to). The folds and exponentials were a seventh of a long
/// prefill chunk.
fn softmax_row(w: &mut [f32], nq: usize, n_chunks: usize, j: usize, seen: usize) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if crate::ops::quant::isa() == crate::ops::quant::Isa::Avx512 {
        // SAFETY: the AVX-512 kernel set is chosen only where the CPU has AVX-512F/VL.
        return unsafe { softmax_row_avx512(w, nq, n_chunks, j, seen) };
    }
    softmax_row_lanes::<false>(w, nq, n_chunks, j, seen)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn softmax_row_avx512(
    w: &mut [f32],
    nq: usize,
    n_chunks: usize,
    j: usize,
    seen: usize,
) -> (f32, f32) {
    softmax_row_lanes::<true>(w, nq, n_chunks, j, seen)
}

/// The softmax of [`softmax_row`]; `AVX`: called from a function compiled for AVX-512.
#[inline(always)]
fn softmax_row_lanes<const AVX: bool>(
    w: &mut [f32],
    nq: usize,
    n_chunks: usize,
    j: usize,
    seen: usize,
) -> (f32, f32) {
    let seen = |c: usize| seen.saturating_sub(c * CHUNK).min(CHUNK);
    let row = |c: usize| c * nq * CHUNK + j * CHUNK;
    let mut lanes = [f32::NEG_INFINITY; 8];
    for c in 0..n_chunks {
        max_lanes(&mut lanes, &w[row(c)..][..seen(c)]);
    }
    let m = max(&lanes);
    // Whole chunks of fixed size (values past what the query sees computed, then zeroed), so
    // the loops vectorise whole and the sums stay in a register.
    let mut sums = [0f32; 8];
    for c in 0..n_chunks {
        let seen = seen(c);
        let chunk: &mut [f32; CHUNK] = (&mut w[row(c)..][..CHUNK]).try_into().expect("a chunk");
        for x in chunk.iter_mut() {
            *x = exp_nonpositive(*x - m);
        }
        if seen < CHUNK {
            chunk[seen..].fill(0.0);
        }
        #[cfg(target_arch = "x86_64")]
        if AVX {
            // SAFETY: `AVX` only from the caller compiled with AVX-512F/VL (CPU checked);
            // the loads and the store stay inside `chunk` and `sums`. The same additions, lane
            // for lane, as the loop below (which the compiler kept on 2-lane registers here).
            unsafe {
                use std::arch::x86_64::*;
                let mut acc = _mm256_loadu_ps(sums.as_ptr());
                for v in chunk.as_chunks::<8>().0 {
                    acc = _mm256_add_ps(acc, _mm256_loadu_ps(v.as_ptr()));
                }
                _mm256_storeu_ps(sums.as_mut_ptr(), acc);
            }
            continue;
        }
        for v in chunk.as_chunks::<8>().0 {
            for i in 0..8 {
                sums[i] += v[i];
            }
        }
    }
    (m, sum(&sums))
}

/// One block's K and V rows for one layer and KV head.
type Seg<'a> = (KvRows<'a>, KvRows<'a>);

/// Ask the CPU to start loading a block's rows: a sequence's blocks need not be adjacent in
/// the pool, and where they are, the hardware prefetcher still starts each 4 KB page late.
fn prefetch(rows: KvRows) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let range = rows.byte_range();
        let ptr = range.start.cast::<i8>();
        for off in (0..range.end as usize - range.start as usize).step_by(64) {
            // SAFETY: a prefetch is only a hint; the address is inside `rows`.
            unsafe { _mm_prefetch(ptr.add(off), _MM_HINT_T0) };
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        let range = rows.byte_range();
        let ptr = range.start.cast::<u8>();
        for off in (0..range.end as usize - range.start as usize).step_by(64) {
            // SAFETY: a prefetch is only a hint, reads nothing and cannot fault; the address
            // is inside `rows`.
            unsafe {
                std::arch::asm!(
                    "prfm pldl1keep, [{p}]",
                    p = in(reg) ptr.add(off),
                    options(nostack, readonly, preserves_flags)
                )
            };
        }
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let _ = rows;
}

/// The two inner loops, scores and the weighted sum of V (kernels.rs).
mod kernels;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{KvDtype, KvLayout};
    use half::f16;

    /// Straightforward reference: full softmax(q k^T / sqrt(d)) v per head with repeat_kv.
    fn reference(q: &[f32], k: &[f32], v: &[f32], n: usize, first: usize, h: Heads) -> Vec<f32> {
        let (d, group) = (h.head_dim, h.n_heads / h.n_kv_heads);
        let mut out = vec![0f32; n * h.n_heads * d];
        for t in 0..n {
            for head in 0..h.n_heads {
                let g = head / group;
                let qv = &q[(t * h.n_heads + head) * d..][..d];
                let visible = first + t + 1;
                let s: Vec<f32> = (0..visible)
                    .map(|p| {
                        let kr = &k[(p * h.n_kv_heads + g) * d..][..d];
                        qv.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() / (d as f32).sqrt()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f32 = e.iter().sum();
                for (p, w) in e.iter().enumerate() {
                    let vr = &v[(p * h.n_kv_heads + g) * d..][..d];
                    for i in 0..d {
                        out[(t * h.n_heads + head) * d + i] += w / z * vr[i];
                    }
                }
            }
        }
        out
    }

    #[test]
    fn matches_reference_for_prefill_then_decode() {
        // Heads of 16 (one vector a row), 24 (a run of 16 values and one of 8) and 64 (the
        // default model's).
        for dtype in [KvDtype::F16, KvDtype::Q8] {
            for d in [16, 24, 64] {
                check(150, 149, dtype, d);
                // Long enough that a decode step is split across threads and merged.
                check(1100, 1098, dtype, d);
            }
        }
    }

    /// What the cache gives back for rows of `d` values stored as `dtype`.
    fn stored(x: &[f32], dtype: KvDtype, d: usize) -> Vec<f32> {
        match dtype {
            KvDtype::F16 => x.iter().map(|a| f16::from_f32(*a).to_f32()).collect(),
            KvDtype::Q8 => x
                .chunks(d)
                .flat_map(|row| {
                    let s = row.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                    let inv = 1.0 / s;
                    row.iter().map(move |v| (v * inv).round() * s)
                })
                .collect(),
        }
    }

    fn check(total: usize, prefill: usize, dtype: KvDtype, d: usize) {
        let h = Heads {
            n_heads: 6,
            n_kv_heads: 2,
            head_dim: d,
        };
        let layout = KvLayout {
            n_layers: 1,
            n_kv_heads: 2,
            head_dim: d,
            dtype,
        };
        // Widths of a token's K (or V) and Q rows.
        let (kw, qw) = (2 * d, 6 * d);
        let mut rng = 12345u64;
        let mut rand = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % 2000) as f32 / 1000.0 - 1.0
        };
        let k: Vec<f32> = (0..total * kw).map(|_| rand()).collect();
        let v: Vec<f32> = (0..total * kw).map(|_| rand()).collect();
        let q: Vec<f32> = (0..total * qw).map(|_| rand()).collect();
        // Round K/V as the cache stores them, so the reference sees the same rows.
        let want = reference(
            &q,
            &stored(&k, dtype, d),
            &stored(&v, dtype, d),
            total,
            0,
            h,
        );

        let mut kv = KvSeq::new(layout, 8);
        kv.reserve(prefill).unwrap();
        kv.write(0, &k[..prefill * kw], &v[..prefill * kw]);
        let seqs = [AttnSeq {
            kv: &kv,
            row: 0,
            n_tokens: prefill,
            first_pos: 0,
        }];
        let got = attention(&q[..prefill * qw], &seqs, 0, h);
        kv.advance(prefill);
        let mut got = got;
        for pos in prefill..total {
            kv.reserve(1).unwrap();
            kv.write(0, &k[pos * kw..][..kw], &v[pos * kw..][..kw]);
            let seqs = [AttnSeq {
                kv: &kv,
                row: 0,
                n_tokens: 1,
                first_pos: pos,
            }];
            got.extend(attention(&q[pos * qw..][..qw], &seqs, 0, h));
            kv.advance(1);
        }
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!((a - b).abs() < 1e-4, "{dtype:?} d={d} row {i}: {a} vs {b}");
        }
        // Batch invariance: the same tokens computed in one prefill of the whole sequence
        // (many queries per task, blocks widened once) give the decode steps' bits exactly.
        let seqs = [AttnSeq {
            kv: &kv,
            row: 0,
            n_tokens: total,
            first_pos: 0,
        }];
        let whole = attention(&q, &seqs, 0, h);
        assert!(
            whole[prefill * qw..] == got[prefill * qw..],
            "{dtype:?} d={d}: a decode step differs from the same token in a prefill"
        );
    }
}

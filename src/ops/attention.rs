//! Causal attention of new query rows against a sequence's stored f16 K/V rows.
//!
//! Grouped-query heads read their shared KV head directly (no `repeat_kv` copies); the cost of
//! a decode step is linear in the context. Work is split over (sequence, KV head, query chunk)
//! and run on candle's persistent thread pool, the one its matmuls use.

use super::{axpy, axpy4, dot, dot4, dot8, exp_nonpositive, sum};
use crate::kv::{widen, KvElem, KvSeq};

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
/// K/V rows converted to f32 at a time.
const KV_CHUNK: usize = 64;
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
    let run = |t: &Task| {
        let seq = &seqs[t.s];
        let mut qs = Vec::with_capacity(t.n * group * h.head_dim);
        for i in t.t0..t.t0 + t.n {
            let row = &q[(seq.row + i) * width..][..width];
            qs.extend_from_slice(&row[t.g * group * h.head_dim..][..group * h.head_dim]);
        }
        let first = seq.first_pos + t.t0;
        attend_range(
            &qs, t.n, group, first, seq.kv, layer, t.g, h.head_dim, t.lo, t.hi,
        )
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

/// Attention for `n` consecutive tokens (first at position `first`) and the `group` query heads
/// that share KV head `g`, against K/V rows `lo..hi` only. `qs` is `[n][group][d]`.
#[allow(clippy::too_many_arguments)]
fn attend_range(
    qs: &[f32],
    n: usize,
    group: usize,
    first: usize,
    kv: &KvSeq,
    layer: usize,
    g: usize,
    d: usize,
    lo: usize,
    hi: usize,
) -> Partial {
    let scale = 1.0 / (d as f32).sqrt();
    let nq = n * group;
    let width = hi - lo;
    // Rows query j sees, relative to `lo`.
    let visible = |j: usize| (first + j / group + 1).min(hi).saturating_sub(lo);
    let mut scores = vec![0f32; nq * width];
    let mut kf = vec![0f32; KV_CHUNK * d];
    let k_segs = kv.segments(layer, g, hi).map(|(k, _)| k);
    for_each_widened(k_segs, lo, hi, d, &mut kf, |r0, chunk| {
        let row = |r: usize| &chunk[(r - r0) * d..][..d];
        for j in 0..nq {
            let q = &qs[j * d..][..d];
            let srow = &mut scores[j * width..][..width];
            let end = visible(j).min(r0 + chunk.len() / d);
            let mut r = r0;
            while r + 8 <= end {
                let s8 = dot8(q, &chunk[(r - r0) * d..(r - r0 + 8) * d]);
                for (k, x) in s8.iter().enumerate() {
                    srow[r + k] = x * scale;
                }
                r += 8;
            }
            while r + 4 <= end {
                let s4 = dot4(q, [row(r), row(r + 1), row(r + 2), row(r + 3)]);
                for (k, x) in s4.iter().enumerate() {
                    srow[r + k] = x * scale;
                }
                r += 4;
            }
            while r < end {
                srow[r] = dot(q, row(r)) * scale;
                r += 1;
            }
        }
    });
    let mut p = Partial {
        max: vec![f32::NEG_INFINITY; nq],
        sum: vec![0.0; nq],
        acc: vec![0.0; nq * d],
    };
    for j in 0..nq {
        let srow = &mut scores[j * width..][..visible(j)];
        if srow.is_empty() {
            continue;
        }
        let max = srow.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        // Exponentials first (a vectorised loop), then their sum.
        for s in srow.iter_mut() {
            *s = exp_nonpositive(*s - max);
        }
        let sum = sum(srow);
        p.max[j] = max;
        p.sum[j] = sum;
    }
    let v_segs = kv.segments(layer, g, hi).map(|(_, v)| v);
    for_each_widened(v_segs, lo, hi, d, &mut kf, |r0, chunk| {
        let row = |r: usize| &chunk[(r - r0) * d..][..d];
        for j in 0..nq {
            let o = &mut p.acc[j * d..][..d];
            let end = visible(j).min(r0 + chunk.len() / d);
            let w = &scores[j * width..];
            let mut r = r0;
            while r + 4 <= end {
                let ws = [w[r], w[r + 1], w[r + 2], w[r + 3]];
                axpy4(o, ws, [row(r), row(r + 1), row(r + 2), row(r + 3)]);
                r += 4;
            }
            while r < end {
                axpy(o, w[r], row(r));
                r += 1;
            }
        }
    });
    p
}

/// Walk rows `lo..hi` of a sequence stored as `segments` (whole rows of `d` elements), widening
/// up to `KV_CHUNK` rows at a time into `buf`; `f` gets the first row's index relative to `lo`
/// and the widened rows.
fn for_each_widened<'a>(
    segments: impl IntoIterator<Item = &'a [KvElem]>,
    lo: usize,
    hi: usize,
    d: usize,
    buf: &mut [f32],
    mut f: impl FnMut(usize, &[f32]),
) {
    // Rows are gathered across segments (16-row blocks) into chunks of up to `KV_CHUNK`, so
    // the loops over them run long whatever the block size.
    let (mut base, mut filled, mut first) = (0, 0, lo);
    for seg in segments {
        let seg_rows = seg.len() / d;
        let (from, to) = (lo.max(base), hi.min(base + seg_rows));
        let mut c0 = from;
        while c0 < to {
            let rows = (KV_CHUNK - filled).min(to - c0);
            let at = (c0 - base) * d;
            widen(
                &seg[at..at + rows * d],
                &mut buf[filled * d..(filled + rows) * d],
            );
            filled += rows;
            c0 += rows;
            if filled == KV_CHUNK {
                f(first - lo, &buf[..filled * d]);
                first += filled;
                filled = 0;
            }
        }
        base += seg_rows;
        if base >= hi {
            break;
        }
    }
    if filled > 0 {
        f(first - lo, &buf[..filled * d]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvLayout;
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
        check(150, 149);
        // Long enough that a decode step is split across threads and merged.
        check(1100, 1098);
    }

    fn check(total: usize, prefill: usize) {
        let h = Heads {
            n_heads: 6,
            n_kv_heads: 2,
            head_dim: 16,
        };
        let layout = KvLayout {
            n_layers: 1,
            n_kv_heads: 2,
            head_dim: 16,
        };
        let mut rng = 12345u64;
        let mut rand = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % 2000) as f32 / 1000.0 - 1.0
        };
        let k: Vec<f32> = (0..total * 32).map(|_| rand()).collect();
        let v: Vec<f32> = (0..total * 32).map(|_| rand()).collect();
        let q: Vec<f32> = (0..total * 96).map(|_| rand()).collect();
        // Round K/V through f16 so the reference sees what the cache stores.
        let r16 =
            |x: &Vec<f32>| -> Vec<f32> { x.iter().map(|a| f16::from_f32(*a).to_f32()).collect() };
        let (k16, v16) = (r16(&k), r16(&v));
        let want = reference(&q, &k16, &v16, total, 0, h);

        let mut kv = KvSeq::new(layout, 8);
        kv.reserve(prefill).unwrap();
        kv.write(0, &k[..prefill * 32], &v[..prefill * 32]);
        let seqs = [AttnSeq {
            kv: &kv,
            row: 0,
            n_tokens: prefill,
            first_pos: 0,
        }];
        let got = attention(&q[..prefill * 96], &seqs, 0, h);
        kv.advance(prefill);
        let mut got = got;
        for pos in prefill..total {
            kv.reserve(1).unwrap();
            kv.write(
                0,
                &k[pos * 32..(pos + 1) * 32],
                &v[pos * 32..(pos + 1) * 32],
            );
            let seqs = [AttnSeq {
                kv: &kv,
                row: 0,
                n_tokens: 1,
                first_pos: pos,
            }];
            got.extend(attention(&q[pos * 96..(pos + 1) * 96], &seqs, 0, h));
            kv.advance(1);
        }
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!((a - b).abs() < 1e-4, "row {i}: {a} vs {b}");
        }
    }
}

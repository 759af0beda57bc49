//! Causal attention of new query rows against a sequence's stored f16 K/V rows.
//!
//! Grouped-query heads read their shared KV head directly (no `repeat_kv` copies); the cost of
//! a decode step is linear in the context. Work is split over (sequence, KV head, query chunk)
//! and run on rayon's pool.

use rayon::prelude::*;

use super::{axpy, dot};
use crate::kv::{widen, KvSeq};

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

/// `q` is `[n_rows][n_heads][head_dim]` (RoPE applied); the K/V rows of every new token must
/// already be written to `layer`. Returns the attention output in the same layout as `q`.
pub fn attention(q: &[f32], seqs: &[AttnSeq], layer: usize, h: Heads) -> Vec<f32> {
    let width = h.n_heads * h.head_dim;
    let group = h.n_heads / h.n_kv_heads;
    let mut tasks = Vec::new();
    for (s, seq) in seqs.iter().enumerate() {
        for g in 0..h.n_kv_heads {
            let mut t = 0;
            while t < seq.n_tokens {
                let n = Q_CHUNK.min(seq.n_tokens - t);
                tasks.push((s, g, t, n));
                t += n;
            }
        }
    }
    let results: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(s, g, t0, n)| {
            let seq = &seqs[s];
            let mut qs = Vec::with_capacity(n * group * h.head_dim);
            for t in t0..t0 + n {
                let row = &q[(seq.row + t) * width..][..width];
                qs.extend_from_slice(&row[g * group * h.head_dim..][..group * h.head_dim]);
            }
            let first = seq.first_pos + t0;
            attend_group(&qs, n, group, first, seq.kv, layer, g, h.head_dim)
        })
        .collect();
    let mut out = vec![0f32; q.len()];
    for (&(s, g, t0, n), res) in tasks.iter().zip(results) {
        let seq = &seqs[s];
        for i in 0..n {
            let dst = (seq.row + t0 + i) * width + g * group * h.head_dim;
            let src = &res[i * group * h.head_dim..][..group * h.head_dim];
            out[dst..dst + src.len()].copy_from_slice(src);
        }
    }
    out
}

/// Attention for `n` consecutive tokens (first at position `first`) and the `group` query heads
/// that share KV head `g`. `qs` is `[n][group][d]`; returns the same layout.
#[allow(clippy::too_many_arguments)]
fn attend_group(
    qs: &[f32],
    n: usize,
    group: usize,
    first: usize,
    kv: &KvSeq,
    layer: usize,
    g: usize,
    d: usize,
) -> Vec<f32> {
    let scale = 1.0 / (d as f32).sqrt();
    let total = first + n; // rows visible to the last token
    let nq = n * group;
    let mut scores = vec![f32::NEG_INFINITY; nq * total];
    let mut kf = vec![0f32; KV_CHUNK * d];
    let mut out = vec![0f32; nq * d];
    let mut base = 0;
    for (k_seg, _) in kv.segments(layer, g, total) {
        let seg_rows = k_seg.len() / d;
        // Scores: q . k for every visible row.
        for c0 in (0..seg_rows).step_by(KV_CHUNK) {
            let rows = KV_CHUNK.min(seg_rows - c0);
            convert(&k_seg[c0 * d..(c0 + rows) * d], &mut kf[..rows * d]);
            for j in 0..nq {
                let limit = first + j / group + 1; // rows visible to this query
                let q = &qs[j * d..][..d];
                let srow = &mut scores[j * total..][..total];
                for r in 0..rows {
                    let pos = base + c0 + r;
                    if pos >= limit {
                        break;
                    }
                    srow[pos] = dot(q, &kf[r * d..][..d]) * scale;
                }
            }
        }
        base += seg_rows;
    }
    // Softmax over each query's visible rows.
    for j in 0..nq {
        let limit = first + j / group + 1;
        let srow = &mut scores[j * total..][..limit];
        let max = srow.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for s in srow.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        srow.iter_mut().for_each(|s| *s *= inv);
    }
    // Weighted sum of V rows.
    let mut base = 0;
    for (_, v_seg) in kv.segments(layer, g, total) {
        let seg_rows = v_seg.len() / d;
        for c0 in (0..seg_rows).step_by(KV_CHUNK) {
            let rows = KV_CHUNK.min(seg_rows - c0);
            convert(&v_seg[c0 * d..(c0 + rows) * d], &mut kf[..rows * d]);
            for j in 0..nq {
                let limit = first + j / group + 1;
                let o = &mut out[j * d..][..d];
                for r in 0..rows {
                    let pos = base + c0 + r;
                    if pos >= limit {
                        break;
                    }
                    axpy(o, scores[j * total + pos], &kf[r * d..][..d]);
                }
            }
        }
        base += seg_rows;
    }
    out
}

fn convert(src: &[crate::kv::KvElem], dst: &mut [f32]) {
    widen(src, dst);
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
        let total = 150; // spans several KV chunks and query chunks
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
        let prefill = 149;
        kv.reserve(prefill);
        kv.write(0, &k[..prefill * 32], &v[..prefill * 32]);
        let seqs = [AttnSeq {
            kv: &kv,
            row: 0,
            n_tokens: prefill,
            first_pos: 0,
        }];
        let got = attention(&q[..prefill * 96], &seqs, 0, h);
        kv.advance(prefill);
        kv.reserve(1);
        kv.write(0, &k[prefill * 32..], &v[prefill * 32..]);
        let seqs = [AttnSeq {
            kv: &kv,
            row: 0,
            n_tokens: 1,
            first_pos: prefill,
        }];
        let got_last = attention(&q[prefill * 96..], &seqs, 0, h);
        let got: Vec<f32> = got.into_iter().chain(got_last).collect();
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!((a - b).abs() < 1e-4, "row {i}: {a} vs {b}");
        }
    }
}

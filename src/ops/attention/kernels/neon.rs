use super::CHUNK;
use crate::kv::{KvElem, BLOCK_TOKENS};
use std::arch::aarch64::*;

/// Eight consecutive values as two f32 vectors.
pub trait Load8 {
    /// # Safety
    /// Eight values must be readable at `p`.
    unsafe fn load8(p: *const Self) -> [float32x4_t; 2];
}

impl Load8 for f32 {
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> [float32x4_t; 2] {
        [vld1q_f32(p), vld1q_f32(p.add(4))]
    }
}

impl Load8 for KvElem {
    #[inline(always)]
    unsafe fn load8(p: *const KvElem) -> [float32x4_t; 2] {
        crate::ops::quant::neon::widen8(vld1q_u16(p.cast()))
    }
}

impl Load8 for i8 {
    #[inline(always)]
    unsafe fn load8(p: *const i8) -> [float32x4_t; 2] {
        let w = vmovl_s8(vld1_s8(p));
        [
            vcvtq_f32_s32(vmovl_s16(vget_low_s16(w))),
            vcvtq_f32_s32(vmovl_high_s16(w)),
        ]
    }
}

/// Independent sums a row's score is taken in (column `c` into sum `c % PARTS`).
const PARTS: usize = 2;

/// The scores of `Q` queries against a block's 16 rows, at `out + i * CHUNK` for query
/// `i`: each column of the block (four vectors) times each query's value for it, added
/// into one of `PARTS` sums (`8 * Q` accumulators and a column: 28 registers at most).
#[inline(always)]
unsafe fn block<const Q: usize, T: Load8>(
    out: *mut f32,
    q: *const f32,
    k: *const T,
    d: usize,
    sc: *const f32,
) {
    let mut a = [[[vdupq_n_f32(0.0); 4]; PARTS]; Q];
    let mut c = 0;
    while c < d {
        for p in 0..PARTS {
            if c + p < d {
                let col = k.add((c + p) * BLOCK_TOKENS);
                let [k0, k1] = T::load8(col);
                let [k2, k3] = T::load8(col.add(8));
                let kc = [k0, k1, k2, k3];
                for (i, ai) in a.iter_mut().enumerate() {
                    let x = *q.add(i * d + c + p);
                    for (acc, kv) in ai[p].iter_mut().zip(kc) {
                        *acc = vfmaq_n_f32(*acc, kv, x);
                    }
                }
            }
        }
        c += PARTS;
    }
    for (i, [p0, p1]) in a.iter().enumerate() {
        for (v, (x, y)) in p0.iter().zip(p1).enumerate() {
            let mut s = vaddq_f32(*x, *y);
            if !sc.is_null() {
                s = vmulq_f32(s, vld1q_f32(sc.add(4 * v)));
            }
            vst1q_f32(out.add(i * CHUNK + 4 * v), s);
        }
    }
}

scores_by_block!(Load8);

/// Add the weighted rows to columns `c..c + 8 * V` of `Q` queries' accumulators.
#[inline(always)]
unsafe fn add_rows<const Q: usize, const V: usize, T: Load8>(
    w: *const f32,
    v: *const T,
    acc: *mut f32,
    d: usize,
    cnt: usize,
    c: usize,
) {
    let mut a = [[[vdupq_n_f32(0.0); 2]; V]; Q];
    for (i, ai) in a.iter_mut().enumerate() {
        for (x, av) in ai.iter_mut().enumerate() {
            let p = acc.add(i * d + c + 8 * x);
            *av = [vld1q_f32(p), vld1q_f32(p.add(4))];
        }
    }
    for r in 0..cnt {
        let wr: [f32; Q] = std::array::from_fn(|i| *w.add(i * CHUNK + r));
        #[allow(clippy::needless_range_loop)]
        for x in 0..V {
            let [v0, v1] = T::load8(v.add(r * d + c + 8 * x));
            for i in 0..Q {
                a[i][x][0] = vfmaq_n_f32(a[i][x][0], v0, wr[i]);
                a[i][x][1] = vfmaq_n_f32(a[i][x][1], v1, wr[i]);
            }
        }
    }
    for (i, ai) in a.iter().enumerate() {
        for (x, av) in ai.iter().enumerate() {
            let p = acc.add(i * d + c + 8 * x);
            vst1q_f32(p, av[0]);
            vst1q_f32(p.add(4), av[1]);
        }
    }
}

// 2·Q·V accumulators, 2·V row vectors and Q weights: 19 registers at most.
accumulate_driver!(Load8, 8, 2);

//! The two inner loops of attention: scores of queries against a block of K rows (stored
//! transposed, a column of the block's rows per vector), and the weighted sum of a block of V
//! rows. AVX2+FMA (or AVX-512F) where the CPU has it and NEON on aarch64, where the head width
//! is a multiple of 8 (16 for AVX-512), else portable loops. Every query's dot products and
//! sums are computed in the same order whichever queries are processed together, so results
//! are batch invariant. With the AVX2 kernel set, 8-bit rows go through integer versions of
//! both loops instead (`scores_i8`, `accumulate_i8`: exact sums, so invariant as well).

use super::CHUNK;
use crate::kv::{widen, KvElem, KvRows, BLOCK_TOKENS};
use crate::ops::quant::isa;
use crate::ops::{axpy, dot};

/// A block's K or V rows: as stored (8-bit rows without their scales, which the caller
/// applies), or widened once when many queries read them.
#[derive(Clone, Copy)]
pub enum Rows<'a> {
    F16(&'a [KvElem]),
    I8(&'a [i8]),
    F32(&'a [f32]),
}

impl<'a> Rows<'a> {
    pub fn stored(r: KvRows<'a>) -> Self {
        match r {
            KvRows::F16(r) => Rows::F16(r),
            KvRows::Q8 { q, .. } => Rows::I8(q),
        }
    }

    fn widened(self, n: usize) -> std::borrow::Cow<'a, [f32]> {
        match self {
            Rows::F16(r) => {
                let mut f = vec![0f32; n];
                widen(&r[..n], &mut f);
                f.into()
            }
            Rows::I8(r) => r[..n].iter().map(|&x| x as f32).collect::<Vec<_>>().into(),
            Rows::F32(r) => r[..n].into(),
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn fast(d: usize) -> bool {
    d.is_multiple_of(8) && isa().is_avx2()
}

/// The 512-bit kernels: where the kernels in use are the AVX-512 ones and a head is whole
/// 16-lane vectors.
#[cfg(target_arch = "x86_64")]
fn wide(d: usize) -> bool {
    d.is_multiple_of(16) && isa() == crate::ops::quant::Isa::Avx512
}

/// The NEON kernels: on aarch64 with the NEON kernel set and a head of whole 8-value runs.
#[cfg(target_arch = "aarch64")]
fn neon(d: usize) -> bool {
    d.is_multiple_of(8) && isa().is_neon()
}

/// `w[j * CHUNK + r] = q_j · k_r` for every query `j < nq` and each of the block's
/// `BLOCK_TOKENS` rows `r` (rows the caller does not use included); `k` is a whole block
/// stored transposed, element `c` of row `r` at `c * BLOCK_TOKENS + r`. `scales` (8-bit
/// rows: the block's `BLOCK_TOKENS` row scales; empty for f16) multiply each row's sum.
///
/// Every row's sum is taken in the same order whichever queries share the call: in the vector
/// kernels column `c` is added into partial sum `c % PARTS` (the instruction set's number of
/// independent sums), the partials then added pairwise; the portable loop takes each row's
/// dot product as [`dot`] does.
pub fn scores(q: &[f32], nq: usize, d: usize, k: Rows, scales: &[f32], w: &mut [f32]) {
    assert!(scales.is_empty() || scales.len() >= BLOCK_TOKENS);
    let sc = if scales.is_empty() {
        std::ptr::null()
    } else {
        scales.as_ptr()
    };
    #[cfg(target_arch = "x86_64")]
    if wide(d) {
        // SAFETY: AVX-512F checked with the instruction set; `d` is a multiple of 16;
        // lengths asserted.
        unsafe {
            match k {
                Rows::F16(k) => avx512::scores(q, nq, d, k, sc, w),
                Rows::I8(k) => avx512::scores(q, nq, d, k, sc, w),
                Rows::F32(k) => avx512::scores(q, nq, d, k, sc, w),
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if fast(d) {
        // SAFETY: AVX2, FMA and F16C checked; `d` is a multiple of 8; lengths asserted.
        unsafe {
            match k {
                Rows::F16(k) => avx2::scores(q, nq, d, k, sc, w),
                Rows::I8(k) => avx2::scores(q, nq, d, k, sc, w),
                Rows::F32(k) => avx2::scores(q, nq, d, k, sc, w),
            }
        }
        return;
    }
    #[cfg(target_arch = "aarch64")]
    if neon(d) {
        // SAFETY: NEON is the aarch64 baseline; `d` is a multiple of 8; lengths asserted.
        unsafe {
            match k {
                Rows::F16(k) => neon::scores(q, nq, d, k, sc, w),
                Rows::I8(k) => neon::scores(q, nq, d, k, sc, w),
                Rows::F32(k) => neon::scores(q, nq, d, k, sc, w),
            }
        }
        return;
    }
    // Row by row: each row gathered from the columns, then one dot product per query.
    let kf = k.widened(BLOCK_TOKENS * d);
    let mut row = vec![0f32; d];
    for r in 0..BLOCK_TOKENS {
        for (c, x) in row.iter_mut().enumerate() {
            *x = kf[c * BLOCK_TOKENS + r];
        }
        for j in 0..nq {
            let s = dot(&q[j * d..][..d], &row);
            w[j * CHUNK + r] = if sc.is_null() { s } else { s * scales[r] };
        }
    }
}

/// Whether 8-bit rows go through the integer kernels ([`scores_i8`], [`accumulate_i8`]) here:
/// with the AVX2 or AVX-512 kernel set (the float loops convert every 8-bit value to f32 and
/// spend a multiply-add on it per query; `vpmaddwd`, or `vpdpwssd` on AVX-512, takes two
/// values at once), for heads of up to 256 values (the 32-bit sums cannot overflow).
pub fn int8_kernels(d: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        fast(d) && d <= 256
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = d;
        false
    }
}

/// Queries as 16-bit integers for [`scores_i8`]: query `j`'s value `c` is about
/// `qi[j * d + c] * scale[j]`, each query scaled to its largest magnitude (32,767), so the
/// rounding is a 65,534th of that magnitude at most: well under the 8-bit rows' own.
pub fn quantize_queries(q: &[f32], nq: usize, d: usize, qi: &mut Vec<i16>, scale: &mut Vec<f32>) {
    qi.clear();
    scale.clear();
    for row in q[..nq * d].chunks_exact(d) {
        let m = row.iter().fold(0f32, |m, x| m.max(x.abs()));
        let inv = if m > 0.0 { 32767.0 / m } else { 0.0 };
        qi.extend(row.iter().map(|x| (x * inv).round() as i16));
        scale.push(m / 32767.0);
    }
}

/// [`scores`] for a block of 8-bit K rows and queries from [`quantize_queries`]:
/// `w[j * CHUNK + r] = (qi_j · k_r) * qscale[j] * scales[r]`, the dot product summed exactly in
/// 32-bit integers (so in no particular order: the same bits whichever queries share the
/// call). Only where [`int8_kernels`] says so.
pub fn scores_i8(
    qi: &[i16],
    qscale: &[f32],
    nq: usize,
    d: usize,
    k: &[i8],
    scales: &[f32],
    w: &mut [f32],
) {
    assert!(int8_kernels(d));
    assert!(k.len() >= BLOCK_TOKENS * d && scales.len() >= BLOCK_TOKENS);
    assert!(qi.len() >= nq * d && qscale.len() >= nq);
    assert!(w.len() >= (nq - 1) * CHUNK + BLOCK_TOKENS);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX2 checked by `int8_kernels`, the AVX-512 set (F, BW, VNNI) by `wide`; `d` is
    // even (a multiple of 8; of 16 for AVX-512); lengths asserted.
    unsafe {
        if wide(d) {
            avx512::scores_i8(qi, qscale, nq, d, k, scales, w)
        } else {
            avx2::scores_i8(qi, qscale, nq, d, k, scales, w)
        }
    }
}

/// [`accumulate`] for a block of 8-bit V rows and their scales (where [`int8_kernels`] says so):
/// `acc_j += sum over r < cnt of u_jr * v_r`, where `u_jr = w[j * CHUNK + r] * scales[r]`.
/// Each query's `u` over the block is rounded to 16-bit integers against its
/// largest (the rounding a 65,534th of the block's largest weight at most), the products of
/// two rows at once summed exactly in 32-bit integers, and the block's sum added to `acc` times
/// that scale: the same bits whichever queries share the call.
pub fn accumulate_i8(
    w: &[f32],
    nq: usize,
    d: usize,
    v: &[i8],
    scales: &[f32],
    cnt: usize,
    acc: &mut [f32],
) {
    assert!(int8_kernels(d));
    assert!(cnt <= BLOCK_TOKENS && w.len() >= (nq - 1) * CHUNK + BLOCK_TOKENS);
    assert!(scales.len() >= BLOCK_TOKENS);
    assert!(v.len() >= BLOCK_TOKENS * d && acc.len() >= nq * d);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX2 checked by `int8_kernels`, the AVX-512 set by `wide`; `d` a multiple of 8
    // (AVX2: 16-column runs, then one of 8) or 16 (AVX-512: runs of 64, 32, then 16); the
    // block's 16 rows are readable; lengths asserted.
    unsafe {
        if wide(d) {
            avx512::accumulate_i8(w, nq, d, v, scales, cnt, acc)
        } else {
            avx2::accumulate_i8(w, nq, d, v, scales, cnt, acc)
        }
    }
}

/// `acc_j += sum over r < cnt of w[j * CHUNK + r] * v_r` for every query `j < nq`.
pub fn accumulate(w: &[f32], nq: usize, d: usize, v: Rows, cnt: usize, acc: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if wide(d) {
        // SAFETY: as for `scores`.
        unsafe {
            match v {
                Rows::F16(v) => avx512::accumulate(w, nq, d, v, cnt, acc),
                Rows::I8(v) => avx512::accumulate(w, nq, d, v, cnt, acc),
                Rows::F32(v) => avx512::accumulate(w, nq, d, v, cnt, acc),
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if fast(d) {
        // SAFETY: as for `scores`.
        unsafe {
            match v {
                Rows::F16(v) => avx2::accumulate(w, nq, d, v, cnt, acc),
                Rows::I8(v) => avx2::accumulate(w, nq, d, v, cnt, acc),
                Rows::F32(v) => avx2::accumulate(w, nq, d, v, cnt, acc),
            }
        }
        return;
    }
    #[cfg(target_arch = "aarch64")]
    if neon(d) {
        // SAFETY: as for `scores`.
        unsafe {
            match v {
                Rows::F16(v) => neon::accumulate(w, nq, d, v, cnt, acc),
                Rows::I8(v) => neon::accumulate(w, nq, d, v, cnt, acc),
                Rows::F32(v) => neon::accumulate(w, nq, d, v, cnt, acc),
            }
        }
        return;
    }
    let vf = v.widened(cnt * d);
    for j in 0..nq {
        let o = &mut acc[j * d..][..d];
        for r in 0..cnt {
            axpy(o, w[j * CHUNK + r], &vf[r * d..][..d]);
        }
    }
}

/// The weighted-sum driver of a vector module, shared by every instruction set: queries three
/// at a time; the head's columns in runs of `$wide` vectors of `$lanes` values (one
/// `add_rows::<Q, $wide, T>` pass each), then single vectors. Expanded inside the module, after
/// its attributes (the target features), with its load trait `$Load` and its `add_rows`.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
macro_rules! accumulate_driver {
    ($(#[$attr:meta])* $Load:ident, $lanes:literal, $wide:literal) => {
        $(#[$attr])*
        pub unsafe fn accumulate<T: $Load>(
            w: &[f32],
            nq: usize,
            d: usize,
            v: &[T],
            cnt: usize,
            acc: &mut [f32],
        ) {
            assert!(cnt <= CHUNK && w.len() >= (nq - 1) * CHUNK + cnt);
            assert!(v.len() >= cnt * d && acc.len() >= nq * d);
            let (wp, vp, ap) = (w.as_ptr(), v.as_ptr(), acc.as_mut_ptr());
            let mut j = 0;
            while j < nq {
                let qs = (nq - j).min(3);
                let (wj, aj) = (wp.add(j * CHUNK), ap.add(j * d));
                let mut c = 0;
                while c < d {
                    let wide = d - c >= $lanes * $wide;
                    match (qs, wide) {
                        (3, true) => add_rows::<3, $wide, T>(wj, vp, aj, d, cnt, c),
                        (2, true) => add_rows::<2, $wide, T>(wj, vp, aj, d, cnt, c),
                        (_, true) => add_rows::<1, $wide, T>(wj, vp, aj, d, cnt, c),
                        (3, false) => add_rows::<3, 1, T>(wj, vp, aj, d, cnt, c),
                        (2, false) => add_rows::<2, 1, T>(wj, vp, aj, d, cnt, c),
                        (_, false) => add_rows::<1, 1, T>(wj, vp, aj, d, cnt, c),
                    }
                    c += if wide { $lanes * $wide } else { $lanes };
                }
                j += qs;
            }
        }
    };
}

/// The scores driver of every vector module: queries three at a time, each group's scores
/// against the block computed and stored by the module's `block::<Q, T>(out, q, k, d, sc)`
/// (`sc`: the rows' scales, or null).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
macro_rules! scores_by_block {
    ($(#[$attr:meta])* $Load:ident) => {
        $(#[$attr])*
        pub unsafe fn scores<T: $Load>(
            q: &[f32],
            nq: usize,
            d: usize,
            k: &[T],
            sc: *const f32,
            w: &mut [f32],
        ) {
            assert!(k.len() >= BLOCK_TOKENS * d && q.len() >= nq * d);
            assert!(w.len() >= (nq - 1) * CHUNK + BLOCK_TOKENS);
            let (qp, kp, wp) = (q.as_ptr(), k.as_ptr(), w.as_mut_ptr());
            let mut j = 0;
            while j < nq {
                let qs = (nq - j).min(3);
                let (qj, out) = (qp.add(j * d), wp.add(j * CHUNK));
                match qs {
                    3 => block::<3, T>(out, qj, kp, d, sc),
                    2 => block::<2, T>(out, qj, kp, d, sc),
                    _ => block::<1, T>(out, qj, kp, d, sc),
                }
                j += qs;
            }
        }
    };
}

/// The integer scores driver of the x86 modules: queries three at a time, each group's scores
/// against a block of 8-bit K computed and stored by the module's
/// `block_i8::<Q>(out, qi, qscale, k, d, scales)`.
#[cfg(target_arch = "x86_64")]
macro_rules! scores_i8_by_block {
    ($(#[$attr:meta])*) => {
        $(#[$attr])*
        pub unsafe fn scores_i8(
            qi: &[i16],
            qscale: &[f32],
            nq: usize,
            d: usize,
            k: &[i8],
            scales: &[f32],
            w: &mut [f32],
        ) {
            let (qp, kp, sp, wp) = (qi.as_ptr(), k.as_ptr(), scales.as_ptr(), w.as_mut_ptr());
            let mut j = 0;
            while j < nq {
                let qs = (nq - j).min(3);
                let (qj, sj, out) = (qp.add(j * d), qscale.as_ptr().add(j), wp.add(j * CHUNK));
                match qs {
                    3 => block_i8::<3>(out, qj, sj, kp, d, sp),
                    2 => block_i8::<2>(out, qj, sj, kp, d, sp),
                    _ => block_i8::<1>(out, qj, sj, kp, d, sp),
                }
                j += qs;
            }
        }
    };
}

/// The loops on AVX2+FMA (eight f32 lanes, 16 registers), and integer ones for 8-bit rows.
#[cfg(target_arch = "x86_64")]
mod avx2;

/// The same loops on 512-bit registers (AVX-512F): 16 values per instruction, and with 32
/// registers a whole 64-wide head's accumulators for three queries stay in registers.
#[cfg(target_arch = "x86_64")]
mod avx512;

/// The same loops on NEON (aarch64): eight values per step as two 128-bit vectors, and with
/// 32 registers the scores of three queries against four rows in one pass.
#[cfg(target_arch = "aarch64")]
mod neon;

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// The AVX-512 integer kernels give the AVX2 ones' bits (the sums are exact and the
    /// products after them the same), over heads that take every run of columns (16, 32, 48,
    /// 64, 80, 96, 256), one to seven queries, and blocks partly filled. Only where this CPU
    /// has both sets; the kernels' results against a float reference are the attention
    /// test's (`matches_reference_for_prefill_then_decode`), on whichever set is in use.
    #[test]
    fn integer_kernels_agree_across_instruction_sets() {
        use crate::ops::quant::Isa;
        if !Isa::available().contains(&Isa::Avx512) {
            eprintln!("no AVX-512 (F, BW, VL, VNNI) here: nothing to compare");
            return;
        }
        let mut rng = 99u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for d in [16, 32, 48, 64, 80, 96, 256] {
            for nq in 1..=7 {
                for cnt in [1, 7, 16] {
                    let k: Vec<i8> = (0..BLOCK_TOKENS * d).map(|_| next() as i8).collect();
                    let scales: Vec<f32> = (0..BLOCK_TOKENS)
                        .map(|_| (next() % 1000) as f32 / 997.0)
                        .collect();
                    let q: Vec<f32> = (0..nq * d)
                        .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
                        .collect();
                    let (mut qi, mut qs) = (Vec::new(), Vec::new());
                    quantize_queries(&q, nq, d, &mut qi, &mut qs);
                    let len = (nq - 1) * CHUNK + BLOCK_TOKENS;
                    let (mut w2, mut w5) = (vec![0f32; len], vec![0f32; len]);
                    // SAFETY: both sets checked above; `d` a multiple of 16; lengths as the
                    // safe wrappers assert.
                    unsafe {
                        avx2::scores_i8(&qi, &qs, nq, d, &k, &scales, &mut w2);
                        avx512::scores_i8(&qi, &qs, nq, d, &k, &scales, &mut w5);
                    }
                    assert!(w2 == w5, "scores differ: d={d} nq={nq}");
                    let start: Vec<f32> = (0..nq * d).map(|i| i as f32 / 7.0).collect();
                    let (mut a2, mut a5) = (start.clone(), start);
                    // SAFETY: as above.
                    unsafe {
                        avx2::accumulate_i8(&w2, nq, d, &k, &scales, cnt, &mut a2);
                        avx512::accumulate_i8(&w2, nq, d, &k, &scales, cnt, &mut a5);
                    }
                    assert!(a2 == a5, "weighted sums differ: d={d} nq={nq} cnt={cnt}");
                }
            }
        }
    }
}

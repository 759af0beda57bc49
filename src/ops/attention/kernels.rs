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
/// with the AVX2 kernel set (its float loops convert every 8-bit value to f32 and spend a
/// multiply-add on it per query; `vpmaddwd` takes two values at once), for heads of up to 256
/// values (the 32-bit sums cannot overflow).
pub fn int8_kernels(d: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        fast(d) && !wide(d) && d <= 256
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
    // SAFETY: AVX2 checked by `int8_kernels`; `d` is even (a multiple of 8); lengths asserted.
    unsafe {
        avx2::scores_i8(qi, qscale, nq, d, k, scales, w)
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
    // SAFETY: AVX2 checked by `int8_kernels`; `d` a multiple of 8 (16-column runs, then one of
    // 8); the block's 16 rows are readable; lengths asserted.
    unsafe {
        avx2::accumulate_i8(w, nq, d, v, scales, cnt, acc)
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

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::CHUNK;
    use crate::kv::{KvElem, BLOCK_TOKENS};
    use std::arch::x86_64::*;

    /// Eight consecutive values as f32 lanes.
    pub trait Load8 {
        /// # Safety
        /// Eight values must be readable at `p`; AVX and F16C must be present.
        unsafe fn load8(p: *const Self) -> __m256;
    }

    impl Load8 for f32 {
        #[inline(always)]
        unsafe fn load8(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
    }

    impl Load8 for KvElem {
        #[inline(always)]
        unsafe fn load8(p: *const KvElem) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
        }
    }

    impl Load8 for i8 {
        #[inline(always)]
        unsafe fn load8(p: *const i8) -> __m256 {
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p.cast())))
        }
    }

    /// Independent sums a row's score is taken in (column `c` into sum `c % PARTS`).
    const PARTS: usize = 2;

    /// The scores of `Q` queries against a block's 16 rows, at `out + i * CHUNK` for query
    /// `i`: each column of the block (two vectors of eight rows) times each query's value for
    /// it, added into one of `PARTS` sums (`4 * Q` accumulators, two columns and a query
    /// value: 15 registers at most).
    #[inline(always)]
    unsafe fn block<const Q: usize, T: Load8>(
        out: *mut f32,
        q: *const f32,
        k: *const T,
        d: usize,
        sc: *const f32,
    ) {
        let mut a = [[[_mm256_setzero_ps(); 2]; PARTS]; Q];
        let mut c = 0;
        while c < d {
            for p in 0..PARTS {
                if c + p < d {
                    let col = k.add((c + p) * BLOCK_TOKENS);
                    let kc = [T::load8(col), T::load8(col.add(8))];
                    for (i, ai) in a.iter_mut().enumerate() {
                        let x = _mm256_broadcast_ss(&*q.add(i * d + c + p));
                        ai[p][0] = _mm256_fmadd_ps(x, kc[0], ai[p][0]);
                        ai[p][1] = _mm256_fmadd_ps(x, kc[1], ai[p][1]);
                    }
                }
            }
            c += PARTS;
        }
        for (i, [p0, p1]) in a.iter().enumerate() {
            for (h, (x, y)) in p0.iter().zip(p1).enumerate() {
                let mut v = _mm256_add_ps(*x, *y);
                if !sc.is_null() {
                    v = _mm256_mul_ps(v, _mm256_loadu_ps(sc.add(8 * h)));
                }
                _mm256_storeu_ps(out.add(i * CHUNK + 8 * h), v);
            }
        }
    }

    scores_by_block!(
        #[target_feature(enable = "avx2,fma,f16c")]
        Load8
    );

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
        let mut a = [[_mm256_setzero_ps(); V]; Q];
        for (i, ai) in a.iter_mut().enumerate() {
            for (x, av) in ai.iter_mut().enumerate() {
                *av = _mm256_loadu_ps(acc.add(i * d + c + 8 * x));
            }
        }
        for r in 0..cnt {
            let wr: [__m256; Q] =
                std::array::from_fn(|i| _mm256_broadcast_ss(&*w.add(i * CHUNK + r)));
            #[allow(clippy::needless_range_loop)]
            for x in 0..V {
                let vx = T::load8(v.add(r * d + c + 8 * x));
                for i in 0..Q {
                    a[i][x] = _mm256_fmadd_ps(wr[i], vx, a[i][x]);
                }
            }
        }
        for (i, ai) in a.iter().enumerate() {
            for (x, av) in ai.iter().enumerate() {
                _mm256_storeu_ps(acc.add(i * d + c + 8 * x), *av);
            }
        }
    }

    /// [`super::scores_i8`] three queries at a time.
    #[target_feature(enable = "avx2,fma,f16c")]
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

    /// The scores of `Q` queries against a block's 16 rows of 8-bit K, two columns at a time:
    /// both columns widened to 16 bits and interleaved, so each 32-bit lane holds one row's
    /// pair, and `vpmaddwd` with the queries' pair of values adds both products into it.
    /// The unpacking leaves rows 0-3 and 8-11 in one sum and 4-7 and 12-15 in the other,
    /// put back in order once at the end.
    #[inline(always)]
    unsafe fn block_i8<const Q: usize>(
        out: *mut f32,
        qi: *const i16,
        qscale: *const f32,
        k: *const i8,
        d: usize,
        sc: *const f32,
    ) {
        let mut lo = [_mm256_setzero_si256(); Q];
        let mut hi = [_mm256_setzero_si256(); Q];
        let mut c = 0;
        while c < d {
            let a = _mm256_cvtepi8_epi16(_mm_loadu_si128(k.add(c * BLOCK_TOKENS).cast()));
            let b = _mm256_cvtepi8_epi16(_mm_loadu_si128(k.add((c + 1) * BLOCK_TOKENS).cast()));
            let (pl, ph) = (_mm256_unpacklo_epi16(a, b), _mm256_unpackhi_epi16(a, b));
            for i in 0..Q {
                // Values c and c + 1 of query i, the first in the low half of each lane.
                let qp = _mm256_set1_epi32(qi.add(i * d + c).cast::<i32>().read_unaligned());
                lo[i] = _mm256_add_epi32(lo[i], _mm256_madd_epi16(pl, qp));
                hi[i] = _mm256_add_epi32(hi[i], _mm256_madd_epi16(ph, qp));
            }
            c += 2;
        }
        let (s0, s1) = (_mm256_loadu_ps(sc), _mm256_loadu_ps(sc.add(8)));
        for i in 0..Q {
            let (l, h) = (_mm256_cvtepi32_ps(lo[i]), _mm256_cvtepi32_ps(hi[i]));
            let x = _mm256_set1_ps(*qscale.add(i));
            let rows = [
                _mm256_permute2f128_ps(l, h, 0x20),
                _mm256_permute2f128_ps(l, h, 0x31),
            ];
            for (half, (r, s)) in rows.into_iter().zip([s0, s1]).enumerate() {
                let v = _mm256_mul_ps(_mm256_mul_ps(r, x), s);
                _mm256_storeu_ps(out.add(i * CHUNK + 8 * half), v);
            }
        }
    }

    /// [`super::accumulate_i8`] three queries at a time.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn accumulate_i8(
        w: &[f32],
        nq: usize,
        d: usize,
        v: &[i8],
        scales: &[f32],
        cnt: usize,
        acc: &mut [f32],
    ) {
        // The queries' weights as 16-bit integers (rows from `cnt` on zero) and their scales.
        let mut ui = [[0i16; BLOCK_TOKENS]; 3];
        let mut scale = [0f32; 3];
        let live = [
            _mm256_cmpgt_epi32(
                _mm256_set1_epi32(cnt as i32),
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            ),
            _mm256_cmpgt_epi32(
                _mm256_set1_epi32(cnt as i32),
                _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15),
            ),
        ];
        let (wp, vp, ap) = (w.as_ptr(), v.as_ptr(), acc.as_mut_ptr());
        let sc = [
            _mm256_loadu_ps(scales.as_ptr()),
            _mm256_loadu_ps(scales.as_ptr().add(8)),
        ];
        let mut j = 0;
        while j < nq {
            let qs = (nq - j).min(3);
            for i in 0..qs {
                scale[i] = weights_i16(wp.add((j + i) * CHUNK), sc, live, &mut ui[i]);
            }
            let aj = ap.add(j * d);
            let mut c = 0;
            while c < d {
                let wide = d - c >= 16;
                match (qs, wide) {
                    (3, true) => add_rows_i8::<3, 16>(&ui, &scale, vp, aj, d, cnt, c),
                    (2, true) => add_rows_i8::<2, 16>(&ui, &scale, vp, aj, d, cnt, c),
                    (_, true) => add_rows_i8::<1, 16>(&ui, &scale, vp, aj, d, cnt, c),
                    (3, false) => add_rows_i8::<3, 8>(&ui, &scale, vp, aj, d, cnt, c),
                    (2, false) => add_rows_i8::<2, 8>(&ui, &scale, vp, aj, d, cnt, c),
                    (_, false) => add_rows_i8::<1, 8>(&ui, &scale, vp, aj, d, cnt, c),
                }
                c += if wide { 16 } else { 8 };
            }
            j += qs;
        }
    }

    /// A query's 16 weights at `w` times the rows' scales `sc` (rows outside `live` taken as
    /// zero), rounded to 16-bit integers against the largest magnitude, into `out`; returns the
    /// scale they are in.
    #[inline(always)]
    unsafe fn weights_i16(
        w: *const f32,
        sc: [__m256; 2],
        live: [__m256i; 2],
        out: &mut [i16; BLOCK_TOKENS],
    ) -> f32 {
        let u = |h: usize| {
            let x = _mm256_mul_ps(_mm256_loadu_ps(w.add(8 * h)), sc[h]);
            _mm256_and_ps(x, _mm256_castsi256_ps(live[h]))
        };
        let (w0, w1) = (u(0), u(1));
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let m = _mm256_max_ps(_mm256_and_ps(w0, abs), _mm256_and_ps(w1, abs));
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
        let inv = _mm256_set1_ps(if m > 0.0 { 32767.0 / m } else { 0.0 });
        let i0 = _mm256_cvtps_epi32(_mm256_mul_ps(w0, inv));
        let i1 = _mm256_cvtps_epi32(_mm256_mul_ps(w1, inv));
        // packs works within 128-bit lanes: put the four 64-bit quarters back in order.
        let p = _mm256_permute4x64_epi64(_mm256_packs_epi32(i0, i1), 0b11_01_10_00);
        _mm256_storeu_si256(out.as_mut_ptr().cast(), p);
        m / 32767.0
    }

    /// Add the block's weighted 8-bit rows to columns `c..c + C` (`C`: 16, or 8) of `Q`
    /// queries' accumulators: rows two at a time, widened to 16 bits and interleaved, so each
    /// 32-bit lane holds one column's pair and `vpmaddwd` with the two rows' weights adds
    /// both products into it. The unpacking leaves columns 0-3 and 8-11 of a run in one sum and
    /// 4-7 and 12-15 in the other, put back in order at the end.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn add_rows_i8<const Q: usize, const C: usize>(
        ui: &[[i16; BLOCK_TOKENS]; 3],
        scale: &[f32; 3],
        v: *const i8,
        acc: *mut f32,
        d: usize,
        cnt: usize,
        c: usize,
    ) {
        let load = |r: usize| {
            let p = v.add(r * d + c).cast();
            if C == 16 {
                _mm256_cvtepi8_epi16(_mm_loadu_si128(p))
            } else {
                _mm256_cvtepi8_epi16(_mm_loadl_epi64(p))
            }
        };
        let mut lo = [_mm256_setzero_si256(); Q];
        let mut hi = [_mm256_setzero_si256(); Q];
        let mut r = 0;
        while r < cnt {
            let (a, b) = (load(r), load(r + 1));
            let (pl, ph) = (_mm256_unpacklo_epi16(a, b), _mm256_unpackhi_epi16(a, b));
            for i in 0..Q {
                let wp = _mm256_set1_epi32(ui[i].as_ptr().add(r).cast::<i32>().read_unaligned());
                lo[i] = _mm256_add_epi32(lo[i], _mm256_madd_epi16(pl, wp));
                hi[i] = _mm256_add_epi32(hi[i], _mm256_madd_epi16(ph, wp));
            }
            r += 2;
        }
        for i in 0..Q {
            let (l, h) = (_mm256_cvtepi32_ps(lo[i]), _mm256_cvtepi32_ps(hi[i]));
            let x = _mm256_set1_ps(scale[i]);
            let dst = acc.add(i * d + c);
            if C == 16 {
                let cols = [
                    _mm256_permute2f128_ps(l, h, 0x20),
                    _mm256_permute2f128_ps(l, h, 0x31),
                ];
                for (half, s) in cols.into_iter().enumerate() {
                    let o = dst.add(8 * half);
                    _mm256_storeu_ps(o, _mm256_fmadd_ps(s, x, _mm256_loadu_ps(o)));
                }
            } else {
                // Eight columns: 0-3 in the low lane of `l`, 4-7 in that of `h`.
                let s = _mm256_permute2f128_ps(l, h, 0x20);
                _mm256_storeu_ps(dst, _mm256_fmadd_ps(s, x, _mm256_loadu_ps(dst)));
            }
        }
    }

    // Q·V accumulators, V row vectors and Q weights: 11 registers at most.
    accumulate_driver!(
        #[target_feature(enable = "avx2,fma,f16c")]
        Load8,
        8,
        2
    );
}

/// The same loops on 512-bit registers (AVX-512F): 16 values per instruction, and with 32
/// registers a whole 64-wide head's accumulators for three queries stay in registers.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::CHUNK;
    use crate::kv::{KvElem, BLOCK_TOKENS};
    use std::arch::x86_64::*;

    /// Sixteen consecutive values as f32 lanes.
    pub trait Load16 {
        /// # Safety
        /// Sixteen values must be readable at `p`; AVX-512F must be present.
        unsafe fn load16(p: *const Self) -> __m512;
    }

    impl Load16 for f32 {
        #[inline(always)]
        unsafe fn load16(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
    }

    impl Load16 for KvElem {
        #[inline(always)]
        unsafe fn load16(p: *const KvElem) -> __m512 {
            _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
        }
    }

    impl Load16 for i8 {
        #[inline(always)]
        unsafe fn load16(p: *const i8) -> __m512 {
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.cast())))
        }
    }

    /// Independent sums a row's score is taken in (column `c` into sum `c % PARTS`).
    const PARTS: usize = 4;

    /// The scores of `Q` queries against a block's 16 rows, at `out + i * CHUNK` for query
    /// `i`: each column of the block (one vector) times each query's value for it, added into
    /// one of `PARTS` sums, which then are added pairwise.
    #[inline(always)]
    unsafe fn block<const Q: usize, T: Load16>(
        out: *mut f32,
        q: *const f32,
        k: *const T,
        d: usize,
        sc: *const f32,
    ) {
        let mut a = [[_mm512_setzero_ps(); PARTS]; Q];
        let mut c = 0;
        while c < d {
            for p in 0..PARTS {
                if c + p < d {
                    let kc = T::load16(k.add((c + p) * BLOCK_TOKENS));
                    for (i, ai) in a.iter_mut().enumerate() {
                        let x = _mm512_set1_ps(*q.add(i * d + c + p));
                        ai[p] = _mm512_fmadd_ps(x, kc, ai[p]);
                    }
                }
            }
            c += PARTS;
        }
        for (i, ai) in a.iter().enumerate() {
            let s = _mm512_add_ps(_mm512_add_ps(ai[0], ai[1]), _mm512_add_ps(ai[2], ai[3]));
            let s = if sc.is_null() {
                s
            } else {
                _mm512_mul_ps(s, _mm512_loadu_ps(sc))
            };
            _mm512_storeu_ps(out.add(i * CHUNK), s);
        }
    }

    scores_by_block!(
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        Load16
    );

    /// Add the weighted rows to columns `c..c + 16 * V` of `Q` queries' accumulators.
    #[inline(always)]
    unsafe fn add_rows<const Q: usize, const V: usize, T: Load16>(
        w: *const f32,
        v: *const T,
        acc: *mut f32,
        d: usize,
        cnt: usize,
        c: usize,
    ) {
        let mut a = [[_mm512_setzero_ps(); V]; Q];
        for (i, ai) in a.iter_mut().enumerate() {
            for (x, av) in ai.iter_mut().enumerate() {
                *av = _mm512_loadu_ps(acc.add(i * d + c + 16 * x));
            }
        }
        for r in 0..cnt {
            let wr: [__m512; Q] = std::array::from_fn(|i| _mm512_set1_ps(*w.add(i * CHUNK + r)));
            #[allow(clippy::needless_range_loop)]
            for x in 0..V {
                let vx = T::load16(v.add(r * d + c + 16 * x));
                for i in 0..Q {
                    a[i][x] = _mm512_fmadd_ps(wr[i], vx, a[i][x]);
                }
            }
        }
        for (i, ai) in a.iter().enumerate() {
            for (x, av) in ai.iter().enumerate() {
                _mm512_storeu_ps(acc.add(i * d + c + 16 * x), *av);
            }
        }
    }

    // Q·V accumulators, V row vectors and Q weights: 19 registers at most.
    accumulate_driver!(
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        Load16,
        16,
        4
    );
}

/// The same loops on NEON (aarch64): eight values per step as two 128-bit vectors, and with
/// 32 registers the scores of three queries against four rows in one pass.
#[cfg(target_arch = "aarch64")]
mod neon {
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
}

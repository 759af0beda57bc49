//! The two inner loops of attention: scores of queries against a block of K rows, and the
//! weighted sum of a block of V rows. AVX2+FMA (or AVX-512F) where the CPU has it and NEON on
//! aarch64, where the head width is a multiple of 8 (16 for AVX-512), else portable loops. Every query's dot products and sums are computed in the
//! same order whichever queries are processed together, so results are batch invariant.

use super::CHUNK;
use crate::kv::{widen, KvElem, KvRows};
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

/// `w[j * CHUNK + r] = q_j · k_r` for every query `j < nq` and row `r < cnt` (rows up to
/// `cnt` rounded up to 4 may be written too; `k` holds a whole block).
pub fn scores(q: &[f32], nq: usize, d: usize, k: Rows, cnt: usize, w: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if wide(d) {
        // SAFETY: AVX-512F checked with the instruction set; `d` is a multiple of 16;
        // lengths asserted.
        unsafe {
            match k {
                Rows::F16(k) => avx512::scores(q, nq, d, k, cnt, w),
                Rows::I8(k) => avx512::scores(q, nq, d, k, cnt, w),
                Rows::F32(k) => avx512::scores(q, nq, d, k, cnt, w),
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if fast(d) {
        // SAFETY: AVX2, FMA and F16C checked; `d` is a multiple of 8; lengths asserted.
        unsafe {
            match k {
                Rows::F16(k) => avx2::scores(q, nq, d, k, cnt, w),
                Rows::I8(k) => avx2::scores(q, nq, d, k, cnt, w),
                Rows::F32(k) => avx2::scores(q, nq, d, k, cnt, w),
            }
        }
        return;
    }
    #[cfg(target_arch = "aarch64")]
    if neon(d) {
        // SAFETY: NEON is the aarch64 baseline; `d` is a multiple of 8; lengths asserted.
        unsafe {
            match k {
                Rows::F16(k) => neon::scores(q, nq, d, k, cnt, w),
                Rows::I8(k) => neon::scores(q, nq, d, k, cnt, w),
                Rows::F32(k) => neon::scores(q, nq, d, k, cnt, w),
            }
        }
        return;
    }
    let kf = k.widened(cnt * d);
    for j in 0..nq {
        let qj = &q[j * d..][..d];
        for r in 0..cnt {
            w[j * CHUNK + r] = dot(qj, &kf[r * d..][..d]);
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

/// The scores driver of every vector module: queries three at a time, rows four at a time (`k`
/// holds a whole block), each group's sums computed and stored by the module's
/// `four_rows::<Q, T>(out, q, k, d)`.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
macro_rules! scores_by_four {
    ($(#[$attr:meta])* $Load:ident) => {
        $(#[$attr])*
        pub unsafe fn scores<T: $Load>(
            q: &[f32],
            nq: usize,
            d: usize,
            k: &[T],
            cnt: usize,
            w: &mut [f32],
        ) {
            assert!(cnt <= CHUNK && k.len() >= cnt.next_multiple_of(4) * d);
            assert!(q.len() >= nq * d && w.len() >= (nq - 1) * CHUNK + cnt.next_multiple_of(4));
            let (qp, kp, wp) = (q.as_ptr(), k.as_ptr(), w.as_mut_ptr());
            let mut j = 0;
            while j < nq {
                let qs = (nq - j).min(3);
                let qj = qp.add(j * d);
                for r in (0..cnt).step_by(4) {
                    let out = wp.add(j * CHUNK + r);
                    let kr = kp.add(r * d);
                    match qs {
                        3 => four_rows::<3, T>(out, qj, kr, d),
                        2 => four_rows::<2, T>(out, qj, kr, d),
                        _ => four_rows::<1, T>(out, qj, kr, d),
                    }
                }
                j += qs;
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::CHUNK;
    use crate::kv::KvElem;
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

    /// The eight lanes of each of four vectors summed, in one fixed order for every lane.
    #[inline(always)]
    unsafe fn sum4(a: __m256, b: __m256, c: __m256, d: __m256) -> __m128 {
        let g = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
        _mm_add_ps(_mm256_castps256_ps128(g), _mm256_extractf128_ps(g, 1))
    }

    /// Dot products of `Q` queries (from `q`) with `R` rows (from `k`), each `d` long, as
    /// eight partial sums each (reduced by the caller with `sum4`).
    #[inline(always)]
    unsafe fn dots<const Q: usize, const R: usize, T: Load8>(
        q: *const f32,
        k: *const T,
        d: usize,
    ) -> [[__m256; R]; Q] {
        // Q * R accumulators, Q query vectors and a K vector or two live: at most 16
        // registers (Q = 3 with R = 4 would need 17, and the spilled accumulator's trip
        // through memory each step halved the speed).
        let mut a = [[_mm256_setzero_ps(); R]; Q];
        for c in (0..d).step_by(8) {
            #[allow(clippy::needless_range_loop)]
            for r in 0..R {
                let kv = T::load8(k.add(r * d + c));
                for (i, ai) in a.iter_mut().enumerate() {
                    ai[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(i * d + c)), kv, ai[r]);
                }
            }
        }
        a
    }

    /// The scores of `Q` queries against four rows, at `out + i * CHUNK` for query `i`. Three
    /// queries take the rows two at a time ([q0 r0, q0 r1, q1 r0, q1 r1] and [q2 r0, q2 r1,
    /// ..]): 12 accumulators would not leave registers for the loads.
    #[inline(always)]
    unsafe fn four_rows<const Q: usize, T: Load8>(
        out: *mut f32,
        q: *const f32,
        k: *const T,
        d: usize,
    ) {
        if Q == 3 {
            for r in [0, 2] {
                let [a0, a1, a2] = dots::<3, 2, T>(q, k.add(r * d), d);
                let out = out.add(r).cast::<f64>();
                let v01 = _mm_castps_pd(sum4(a0[0], a0[1], a1[0], a1[1]));
                let v2 = _mm_castps_pd(sum4(a2[0], a2[1], a2[0], a2[1]));
                _mm_storel_pd(out, v01);
                _mm_storeh_pd(out.add(CHUNK / 2), v01);
                _mm_storel_pd(out.add(CHUNK), v2);
            }
        } else {
            for (i, a) in dots::<Q, 4, T>(q, k, d).iter().enumerate() {
                _mm_storeu_ps(out.add(i * CHUNK), sum4(a[0], a[1], a[2], a[3]));
            }
        }
    }

    scores_by_four!(
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
    use crate::kv::KvElem;
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

    /// Four accumulators' sums: each folded to eight lanes (lane `i` + lane `i + 8`), then
    /// the eight summed in one fixed order for every accumulator.
    #[inline(always)]
    unsafe fn sum4(a: __m512, b: __m512, c: __m512, d: __m512) -> __m128 {
        let fold = |x: __m512| {
            _mm256_add_ps(
                _mm512_castps512_ps256(x),
                _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)),
            )
        };
        let g = _mm256_hadd_ps(
            _mm256_hadd_ps(fold(a), fold(b)),
            _mm256_hadd_ps(fold(c), fold(d)),
        );
        _mm_add_ps(_mm256_castps256_ps128(g), _mm256_extractf128_ps(g, 1))
    }

    /// Dot products of `Q` queries with four rows from `k`, each `d` long, as 16 partial
    /// sums each.
    #[inline(always)]
    unsafe fn dots<const Q: usize, T: Load16>(
        q: *const f32,
        k: *const T,
        d: usize,
    ) -> [[__m512; 4]; Q] {
        let mut a = [[_mm512_setzero_ps(); 4]; Q];
        for c in (0..d).step_by(16) {
            #[allow(clippy::needless_range_loop)]
            for r in 0..4 {
                let kv = T::load16(k.add(r * d + c));
                for (i, ai) in a.iter_mut().enumerate() {
                    ai[r] = _mm512_fmadd_ps(_mm512_loadu_ps(q.add(i * d + c)), kv, ai[r]);
                }
            }
        }
        a
    }

    /// The scores of `Q` queries against four rows, at `out + i * CHUNK` for query `i`.
    #[inline(always)]
    unsafe fn four_rows<const Q: usize, T: Load16>(
        out: *mut f32,
        q: *const f32,
        k: *const T,
        d: usize,
    ) {
        for (i, a) in dots::<Q, T>(q, k, d).iter().enumerate() {
            _mm_storeu_ps(out.add(i * CHUNK), sum4(a[0], a[1], a[2], a[3]));
        }
    }

    scores_by_four!(
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
    use crate::kv::KvElem;
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

    /// The four lanes of each of four vectors summed, `(l0 + l1) + (l2 + l3)` for every one.
    #[inline(always)]
    unsafe fn sum4(a: float32x4_t, b: float32x4_t, c: float32x4_t, d: float32x4_t) -> float32x4_t {
        vpaddq_f32(vpaddq_f32(a, b), vpaddq_f32(c, d))
    }

    /// Dot products of `Q` queries with four rows from `k`, each `d` long, as four partial
    /// sums each.
    #[inline(always)]
    unsafe fn dots<const Q: usize, T: Load8>(
        q: *const f32,
        k: *const T,
        d: usize,
    ) -> [[float32x4_t; 4]; Q] {
        // 4Q accumulators, two K vectors and the queries' two: at most 20 registers.
        let mut a = [[vdupq_n_f32(0.0); 4]; Q];
        for c in (0..d).step_by(8) {
            #[allow(clippy::needless_range_loop)]
            for r in 0..4 {
                let [k0, k1] = T::load8(k.add(r * d + c));
                for (i, ai) in a.iter_mut().enumerate() {
                    let qi = q.add(i * d + c);
                    ai[r] = vfmaq_f32(ai[r], vld1q_f32(qi), k0);
                    ai[r] = vfmaq_f32(ai[r], vld1q_f32(qi.add(4)), k1);
                }
            }
        }
        a
    }

    /// The scores of `Q` queries against four rows, at `out + i * CHUNK` for query `i`.
    #[inline(always)]
    unsafe fn four_rows<const Q: usize, T: Load8>(
        out: *mut f32,
        q: *const f32,
        k: *const T,
        d: usize,
    ) {
        for (i, a) in dots::<Q, T>(q, k, d).iter().enumerate() {
            vst1q_f32(out.add(i * CHUNK), sum4(a[0], a[1], a[2], a[3]));
        }
    }

    scores_by_four!(Load8);

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

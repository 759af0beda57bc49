//! AVX-512 kernels that take two interleaved groups (sixteen rows) at once: group `g` in the
//! low half of each 512-bit register, group `g + 1` in the high half. Row `i` of either group
//! keeps its 32-bit lane, so a lane's arithmetic is that of the eight-row VNNI kernels (the
//! same integer sums, the same f32 steps in the same order: a row's result does not depend on
//! which kernel computed it), while one activation broadcast and one unpacking serve sixteen
//! rows instead of eight.

use std::arch::x86_64::*;

use super::x86::q4k_scale_min;
use crate::ops::quant::{ActBlock, QKind};

/// Sixteen rows (groups at `g0` and `g1`, `nb` blocks each) against `A` activation rows.
///
/// # Safety
/// The CPU must have AVX-512F, VL and VNNI besides AVX2, FMA and F16C; `kind` must be one of
/// [`super::pairs_groups`]; both groups and the activation rows must hold `nb` blocks.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
pub unsafe fn x16<const A: usize>(
    kind: QKind,
    g0: *const u8,
    g1: *const u8,
    ap: [*const ActBlock; A],
    nb: usize,
) -> [[f32; 16]; A] {
    match kind {
        QKind::Q4_0 => q4_x16::<A, false>(g0, g1, ap, nb),
        QKind::Q4_1 => q4_x16::<A, true>(g0, g1, ap, nb),
        QKind::Q8_0 => q8_0_x16::<A>(g0, g1, ap, nb),
        QKind::Q4K => q4k_x16::<A>(g0, g1, ap, nb),
        _ => unreachable!("no sixteen-row kernel for {kind:?}"),
    }
}

/// 32 bytes at `at` of each group, group `g0`'s in the low half.
#[inline(always)]
unsafe fn both(g0: *const u8, g1: *const u8, at: usize) -> __m512i {
    _mm512_inserti64x4::<1>(
        _mm512_castsi256_si512(_mm256_loadu_si256(g0.add(at) as *const __m256i)),
        _mm256_loadu_si256(g1.add(at) as *const __m256i),
    )
}

/// The eight f16 values at `at` of each group, as sixteen f32 lanes.
#[inline(always)]
unsafe fn both_f16(g0: *const u8, g1: *const u8, at: usize) -> __m512 {
    _mm512_cvtph_ps(_mm256_inserti128_si256::<1>(
        _mm256_castsi128_si256(_mm_loadu_si128(g0.add(at) as *const __m128i)),
        _mm_loadu_si128(g1.add(at) as *const __m128i),
    ))
}

/// Four activation bytes `at..at + 4`, repeated in every 32-bit lane.
#[inline(always)]
unsafe fn bcast4(ab: &ActBlock, at: usize) -> __m512i {
    _mm512_set1_epi32((ab.qs.as_ptr().add(at) as *const i32).read_unaligned())
}

#[inline(always)]
unsafe fn lanes<const A: usize>(acc: [__m512; A]) -> [[f32; 16]; A] {
    let mut out = [[0f32; 16]; A];
    for k in 0..A {
        _mm512_storeu_ps(out[k].as_mut_ptr(), acc[k]);
    }
    out
}

/// Q4_0 and Q4_1 (`HAS_MIN`), as the eight-row `q4_x8` with VNNI.
#[inline(always)]
unsafe fn q4_x16<const A: usize, const HAS_MIN: bool>(
    g0: *const u8,
    g1: *const u8,
    ap: [*const ActBlock; A],
    nb: usize,
) -> [[f32; 16]; A] {
    let hdr = if HAS_MIN { 32 } else { 16 };
    let bytes = hdr + 128;
    let mask = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); A];
    for b in 0..nb {
        let (p0, p1) = (g0.add(b * bytes), g1.add(b * bytes));
        let d = both_f16(p0, p1, 0);
        let m = if HAS_MIN {
            both_f16(p0, p1, 16)
        } else {
            _mm512_mul_ps(d, _mm512_set1_ps(-8.0))
        };
        let mut isum = [_mm512_setzero_si512(); A];
        for s in 0..4 {
            let q = both(p0, p1, hdr + 32 * s);
            let lo = _mm512_and_si512(q, mask);
            let hi = _mm512_and_si512(_mm512_srli_epi32::<4>(q), mask);
            for k in 0..A {
                let ab = &*ap[k].add(b);
                isum[k] = _mm512_dpbusd_epi32(isum[k], lo, bcast4(ab, 4 * s));
                isum[k] = _mm512_dpbusd_epi32(isum[k], hi, bcast4(ab, 16 + 4 * s));
            }
        }
        for k in 0..A {
            let ab = &*ap[k].add(b);
            let dot = _mm512_cvtepi32_ps(isum[k]);
            acc[k] = _mm512_fmadd_ps(_mm512_mul_ps(d, _mm512_set1_ps(ab.d)), dot, acc[k]);
            acc[k] = _mm512_fmadd_ps(m, _mm512_set1_ps(ab.s), acc[k]);
        }
    }
    lanes(acc)
}

/// Q8_0, as the eight-row `q8_0_x8` with VNNI: weights made unsigned by their top bit, sums
/// started at `-128 Σ x`.
#[inline(always)]
unsafe fn q8_0_x16<const A: usize>(
    g0: *const u8,
    g1: *const u8,
    ap: [*const ActBlock; A],
    nb: usize,
) -> [[f32; 16]; A] {
    let mut acc = [_mm512_setzero_ps(); A];
    for b in 0..nb {
        let (p0, p1) = (g0.add(b * 272), g1.add(b * 272));
        let d = both_f16(p0, p1, 0);
        let mut isum: [__m512i; A] = std::array::from_fn(|k| {
            let hs = (*ap[k].add(b)).half_sums;
            _mm512_set1_epi32(-128 * (hs[0] as i32 + hs[1] as i32))
        });
        for s in 0..8 {
            let q = _mm512_xor_si512(both(p0, p1, 16 + 32 * s), _mm512_set1_epi8(-128));
            for k in 0..A {
                isum[k] = _mm512_dpbusd_epi32(isum[k], q, bcast4(&*ap[k].add(b), 4 * s));
            }
        }
        for k in 0..A {
            let ab = &*ap[k].add(b);
            let dot = _mm512_cvtepi32_ps(isum[k]);
            acc[k] = _mm512_fmadd_ps(_mm512_mul_ps(d, _mm512_set1_ps(ab.d)), dot, acc[k]);
        }
    }
    lanes(acc)
}

/// Two groups' bytes (a `u64` plane each) as sixteen f32 lanes.
#[inline(always)]
unsafe fn planes_f32(lo: u64, hi: u64) -> __m512 {
    _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_set_epi64x(hi as i64, lo as i64)))
}

/// Q4_K, as the eight-row `q4k_x8` with VNNI.
#[inline(always)]
unsafe fn q4k_x16<const A: usize>(
    g0: *const u8,
    g1: *const u8,
    ap: [*const ActBlock; A],
    nb: usize,
) -> [[f32; 16]; A] {
    let mask = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); A];
    for b in 0..nb {
        let (p0, p1) = (g0.add(b * 1152), g1.add(b * 1152));
        let d = both_f16(p0, p1, 0);
        let dmin = both_f16(p0, p1, 16);
        for pair in 0..4 {
            let mut lo_sum = [_mm512_setzero_si512(); A];
            let mut hi_sum = [_mm512_setzero_si512(); A];
            for t in 0..8 {
                let q = both(p0, p1, 128 + 256 * pair + 32 * t);
                let lo = _mm512_and_si512(q, mask);
                let hi = _mm512_and_si512(_mm512_srli_epi32::<4>(q), mask);
                for k in 0..A {
                    let a0 = &*ap[k].add(b * 8 + 2 * pair);
                    let a1 = &*ap[k].add(b * 8 + 2 * pair + 1);
                    lo_sum[k] = _mm512_dpbusd_epi32(lo_sum[k], lo, bcast4(a0, 4 * t));
                    hi_sum[k] = _mm512_dpbusd_epi32(hi_sum[k], hi, bcast4(a1, 4 * t));
                }
            }
            for (half, sums) in [lo_sum, hi_sum].iter().enumerate() {
                let sub = 2 * pair + half;
                let (sc0, mn0) = q4k_scale_min(p0.add(32), sub);
                let (sc1, mn1) = q4k_scale_min(p1.add(32), sub);
                let scale = _mm512_mul_ps(d, planes_f32(sc0, sc1));
                let min = _mm512_mul_ps(dmin, planes_f32(mn0, mn1));
                for k in 0..A {
                    let ab = &*ap[k].add(b * 8 + sub);
                    let dot = _mm512_cvtepi32_ps(sums[k]);
                    let f = _mm512_mul_ps(scale, _mm512_set1_ps(ab.d));
                    acc[k] = _mm512_fmadd_ps(f, dot, acc[k]);
                    acc[k] = _mm512_fnmadd_ps(min, _mm512_set1_ps(ab.s), acc[k]);
                }
            }
        }
    }
    lanes(acc)
}

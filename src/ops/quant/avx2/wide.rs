//! AVX-512 kernels on 512-bit registers. Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K and Q5_K take two
//! interleaved groups (sixteen rows) at once: group `g` in the low half of each register,
//! group `g + 1` in the high half. Row `i` of either group
//! keeps its 32-bit lane, so a lane's arithmetic is that of the eight-row VNNI kernels (the
//! same integer sums, the same f32 steps in the same order: a row's result does not depend on
//! which kernel computed it), while one activation broadcast and one unpacking serve sixteen
//! rows instead of eight. Q6_K takes one group, two runs of it to a register.

use std::arch::x86_64::*;

use super::x86::{prefetch_ahead, q4k_scale_min};
use crate::ops::quant::{q6k_high_at, q6k_low_at, ActBlock, QKind};

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
        QKind::Q4_0 => q4_x16::<A, false, false>(g0, g1, ap, nb),
        QKind::Q4_1 => q4_x16::<A, true, false>(g0, g1, ap, nb),
        QKind::Q5_0 => q4_x16::<A, false, true>(g0, g1, ap, nb),
        QKind::Q5_1 => q4_x16::<A, true, true>(g0, g1, ap, nb),
        QKind::Q8_0 => q8_0_x16::<A>(g0, g1, ap, nb),
        QKind::Q4K => q4k_x16::<A, false>(g0, g1, ap, nb),
        QKind::Q5K => q4k_x16::<A, true>(g0, g1, ap, nb),
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

/// Q4_0 and Q4_1 (`HAS_MIN`), as the eight-row `q4_x8` with VNNI; Q5_0 and Q5_1 (`FIVE`) as
/// `q5_x8`, the fifth bits shifted into place from the reordered high-bit words and merged by
/// one `vpternlogd` per run.
#[inline(always)]
unsafe fn q4_x16<const A: usize, const HAS_MIN: bool, const FIVE: bool>(
    g0: *const u8,
    g1: *const u8,
    ap: [*const ActBlock; A],
    nb: usize,
) -> [[f32; 16]; A] {
    let hdr = if HAS_MIN { 32 } else { 16 } + if FIVE { 32 } else { 0 };
    let bytes = hdr + 128;
    let mask = _mm512_set1_epi8(0x0F);
    let bit4 = _mm512_set1_epi8(0x10);
    let count = |n: usize| _mm_cvtsi32_si128(n as i32);
    let mut acc = [_mm512_setzero_ps(); A];
    for b in 0..nb {
        let (p0, p1) = (g0.add(b * bytes), g1.add(b * bytes));
        prefetch_ahead(p0, bytes);
        prefetch_ahead(p1, bytes);
        let d = both_f16(p0, p1, 0);
        let m = if HAS_MIN {
            both_f16(p0, p1, 16)
        } else {
            _mm512_mul_ps(d, _mm512_set1_ps(if FIVE { -16.0 } else { -8.0 }))
        };
        let qh = if FIVE {
            both(p0, p1, hdr - 32)
        } else {
            _mm512_setzero_si512()
        };
        let mut isum = [_mm512_setzero_si512(); A];
        for s in 0..4 {
            let q = both(p0, p1, hdr + 32 * s);
            let (lo, hi) = if FIVE {
                let hl = _mm512_and_si512(_mm512_sll_epi32(qh, count(4 - s)), bit4);
                let hh = _mm512_and_si512(_mm512_srl_epi32(qh, count(s)), bit4);
                // (q & 0x0F) | high
                (
                    _mm512_ternarylogic_epi32::<0xEA>(q, mask, hl),
                    _mm512_ternarylogic_epi32::<0xEA>(_mm512_srli_epi32::<4>(q), mask, hh),
                )
            } else {
                (
                    _mm512_and_si512(q, mask),
                    _mm512_and_si512(_mm512_srli_epi32::<4>(q), mask),
                )
            };
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
        prefetch_ahead(p0, 272);
        prefetch_ahead(p1, 272);
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

/// The fifth bits `bit` (0..8) of sixteen rows' high-bit runs, moved to bit 4 of each byte.
#[inline(always)]
unsafe fn q5k_high(h: __m512i, bit: usize) -> __m512i {
    let moved = if bit <= 4 {
        _mm512_sll_epi32(h, _mm_cvtsi32_si128(4 - bit as i32))
    } else {
        _mm512_srl_epi32(h, _mm_cvtsi32_si128(bit as i32 - 4))
    };
    _mm512_and_si512(moved, _mm512_set1_epi8(0x10))
}

/// Q4_K, as the eight-row `q4k_x8` with VNNI; Q5_K (`FIVE`) as `q5k_x8`, the fifth bits
/// merged into the nibbles by one `vpternlogd` per run.
#[inline(always)]
unsafe fn q4k_x16<const A: usize, const FIVE: bool>(
    g0: *const u8,
    g1: *const u8,
    ap: [*const ActBlock; A],
    nb: usize,
) -> [[f32; 16]; A] {
    let mask = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); A];
    let (bytes, values) = if FIVE { (1408, 384) } else { (1152, 128) };
    for b in 0..nb {
        let (p0, p1) = (g0.add(b * bytes), g1.add(b * bytes));
        prefetch_ahead(p0, bytes);
        prefetch_ahead(p1, bytes);
        let d = both_f16(p0, p1, 0);
        let dmin = both_f16(p0, p1, 16);
        for pair in 0..4 {
            let mut lo_sum = [_mm512_setzero_si512(); A];
            let mut hi_sum = [_mm512_setzero_si512(); A];
            for t in 0..8 {
                let q = both(p0, p1, values + 256 * pair + 32 * t);
                let (lo, hi) = if FIVE {
                    let h = both(p0, p1, 128 + 32 * t);
                    // (q & 0x0F) | high
                    (
                        _mm512_ternarylogic_epi32::<0xEA>(q, mask, q5k_high(h, 2 * pair)),
                        _mm512_ternarylogic_epi32::<0xEA>(
                            _mm512_srli_epi32::<4>(q),
                            mask,
                            q5k_high(h, 2 * pair + 1),
                        ),
                    )
                } else {
                    (
                        _mm512_and_si512(q, mask),
                        _mm512_and_si512(_mm512_srli_epi32::<4>(q), mask),
                    )
                };
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

/// Eight interleaved Q6_K rows against `A` activation rows. A register holds two runs side
/// by side ([`crate::ops::quant::q6k_slot`]): run `u` of a chunk in lanes 0-7 and run `u + 4`
/// in lanes 8-15 (row `i` in lanes `i` and `i + 8`), so one 64-byte load of the low bits and
/// one of the high bits give a chunk's values for eight rows, eight values each:
/// `(low & 0x0F) | (high & 0x30)` after a shift of each into place (one `vpternlogd` for the
/// merge). The 6-bit values (0..63) are unsigned bytes, so one `vpdpbusd` multiplies them
/// into the activations, whose register repeats values `4u..4u + 4` in the low half and
/// `4u + 16..4u + 20` in the high one (one `vpermd`; a copy of the activations laid out so,
/// made once per step, was slower: more bytes to read per product).
///
/// Over the chunk's four pairs of runs, the low half of the 32-bit sums is the first
/// sub-block (16 values), the high half the second. They start from `-32 Σ x` over their
/// sub-block (the values' offset of 32), are converted once per chunk and scaled by
/// `d · scale` (f32, per row and sub-block) and the activation's scale. The two halves of
/// the accumulators are added at the end.
///
/// # Safety
/// As [`x16`], for one group.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
pub unsafe fn q6k_x8<const A: usize>(
    grp: *const u8,
    ap: [*const ActBlock; A],
    nb: usize,
) -> [[f32; 8]; A] {
    let mut acc = [_mm512_setzero_ps(); A];
    for b in 0..nb {
        let p = grp.add(b * 1680);
        prefetch_ahead(p, 1680);
        // The eight rows' scales, repeated in both halves.
        let d = _mm512_cvtph_ps(_mm256_broadcastsi128_si256(_mm_loadu_si128(
            p as *const __m128i,
        )));
        for n in 0..2 {
            let at = |c: usize| ap.map(|a| a.add(b * 8 + 4 * n + c));
            q6k_chunk_wide::<0, A>(p, n, d, at(0), &mut acc);
            q6k_chunk_wide::<1, A>(p, n, d, at(1), &mut acc);
            q6k_chunk_wide::<2, A>(p, n, d, at(2), &mut acc);
            q6k_chunk_wide::<3, A>(p, n, d, at(3), &mut acc);
        }
    }
    let mut out = [[0f32; 8]; A];
    for k in 0..A {
        let lo = _mm512_castps512_ps256(acc[k]);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc[k])));
        _mm256_storeu_ps(out[k].as_mut_ptr(), _mm256_add_ps(lo, hi));
    }
    out
}

/// Chunk `4n + C` (32 values: low bits in the low (`C` < 2) or high nibbles of the low-bit
/// runs `h = C % 2`, high bits at `2C` in the high-bit runs) of one Q6_K super-block of
/// eight rows against activation blocks `ab`, added into `acc` (see [`q6k_x8`]).
#[inline(always)]
unsafe fn q6k_chunk_wide<const C: usize, const A: usize>(
    p: *const u8,
    n: usize,
    d: __m512,
    ab: [*const ActBlock; A],
    acc: &mut [__m512; A],
) {
    let m4 = _mm512_set1_epi8(0x0F);
    let m30 = _mm512_set1_epi8(0x30);
    let shift = |x: usize| _mm_cvtsi32_si128(x as i32);
    let x: [__m512i; A] = std::array::from_fn(|k| {
        _mm512_castsi256_si512(_mm256_loadu_si256((*ab[k]).qs.as_ptr() as *const __m256i))
    });
    let mut isum: [__m512i; A] = std::array::from_fn(|k| {
        let hs = (*ab[k]).half_sums;
        _mm512_mask_blend_epi32(
            0xFF00,
            _mm512_set1_epi32(-32 * hs[0] as i32),
            _mm512_set1_epi32(-32 * hs[1] as i32),
        )
    });
    let ql = p.add(q6k_low_at(n, C % 2));
    let qh = p.add(q6k_high_at(n));
    for u in 0..4 {
        let lo = _mm512_loadu_si512(ql.add(64 * u) as *const _);
        let hi = _mm512_loadu_si512(qh.add(64 * u) as *const _);
        let lo = _mm512_srl_epi32(lo, shift(4 * (C / 2)));
        let hi = _mm512_sll_epi32(_mm512_srl_epi32(hi, shift(2 * C)), shift(4));
        // (lo & 0x0F) | (hi & 0x30)
        let v = _mm512_ternarylogic_epi32::<0xEA>(lo, m4, _mm512_and_si512(hi, m30));
        let pick = _mm512_inserti64x4::<1>(
            _mm512_castsi256_si512(_mm256_set1_epi32(u as i32)),
            _mm256_set1_epi32(u as i32 + 4),
        );
        for k in 0..A {
            let xs = _mm512_permutexvar_epi32(pick, x[k]);
            isum[k] = _mm512_dpbusd_epi32(isum[k], v, xs);
        }
    }
    // Sub-blocks 2c and 2c + 1: adjacent planes.
    let sub = _mm_loadu_si128(p.add(16 + 16 * (4 * n + C)) as *const __m128i);
    let sc = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sub)), d);
    for k in 0..A {
        let f = _mm512_mul_ps(sc, _mm512_set1_ps((*ab[k]).d));
        acc[k] = _mm512_fmadd_ps(f, _mm512_cvtepi32_ps(isum[k]), acc[k]);
    }
}

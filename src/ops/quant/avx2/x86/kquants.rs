//! The eight-row kernels of the K formats (Q4_K, Q5_K, Q6_K) on 256-bit registers: super-
//! blocks of 256 values with packed sub-scales, decoded for eight interleaved rows at once.

use std::arch::x86_64::*;

use super::{bcast4, lanes, prefetch_ahead, IntDot};
use crate::ops::quant::{q6k_high_at, q6k_low_at, q6k_slot, ActBlock};

/// Byte `k` of eight rows as the eight bytes of a `u64` (one plane of an interleaved
/// header).
#[inline(always)]
unsafe fn plane(p: *const u8, k: usize) -> u64 {
    (p.add(8 * k) as *const u64).read_unaligned()
}

/// Sub-scale and sub-min `j` (0..8) of eight interleaved Q4_K rows, a byte each, from the
/// planes of their packed 6-bit scales at `pl` (as GGUF packs them).
#[inline(always)]
pub(in crate::ops::quant::avx2) unsafe fn q4k_scale_min(pl: *const u8, j: usize) -> (u64, u64) {
    const LO6: u64 = 0x3F3F_3F3F_3F3F_3F3F;
    const LO4: u64 = 0x0F0F_0F0F_0F0F_0F0F;
    const LO2: u64 = 0x0303_0303_0303_0303;
    if j < 4 {
        (plane(pl, j) & LO6, plane(pl, j + 4) & LO6)
    } else {
        (
            (plane(pl, j + 4) & LO4) | (((plane(pl, j - 4) >> 6) & LO2) << 4),
            ((plane(pl, j + 4) >> 4) & LO4) | (((plane(pl, j) >> 6) & LO2) << 4),
        )
    }
}

/// Eight rows' bytes (a `u64` plane) as eight f32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn plane_f32(x: u64) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(x as i64)))
}

/// Sub-block `sub`'s integer sums (i32 lanes, one per row) of super-block `b` at `p`, scaled
/// by the rows' `d · scale` and the activations' scale, less `dmin · min` times the
/// activations' sum, into `acc` (Q4_K and Q5_K alike).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn add_sub_block<const A: usize>(
    acc: &mut [__m256; A],
    sums: &[__m256i; A],
    d: __m256,
    dmin: __m256,
    p: *const u8,
    sub: usize,
    ap: [*const ActBlock; A],
    b: usize,
) {
    let (sc, mn) = q4k_scale_min(p.add(32), sub);
    let scale = _mm256_mul_ps(d, plane_f32(sc));
    let min = _mm256_mul_ps(dmin, plane_f32(mn));
    for k in 0..A {
        let ab = &*ap[k].add(b * 8 + sub);
        let dot = _mm256_cvtepi32_ps(sums[k]);
        let f = _mm256_mul_ps(scale, _mm256_set1_ps(ab.d));
        acc[k] = _mm256_fmadd_ps(f, dot, acc[k]);
        acc[k] = _mm256_fnmadd_ps(min, _mm256_set1_ps(ab.s), acc[k]);
    }
}

/// Eight interleaved Q4_K rows. Per super-block: the eight rows' scales, mins and packed
/// 6-bit sub-scales (decoded for all eight rows at once, eight bytes to a `u64`), then the
/// values of sub-blocks `2p` (low nibbles) and `2p + 1` (high nibbles) in runs of four per
/// row, summed in 16-bit lanes over a sub-block.
#[inline(always)]
pub(super) unsafe fn q4k_x8<const A: usize, D: IntDot>(
    grp: *const u8,
    ap: [*const ActBlock; A],
    nb: usize,
) -> [[f32; 8]; A] {
    let mask = _mm256_set1_epi8(0x0F);
    let mut acc = [_mm256_setzero_ps(); A];
    for b in 0..nb {
        let p = grp.add(b * 1152);
        prefetch_ahead(p, 1152);
        let d = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
        let dmin = _mm256_cvtph_ps(_mm_loadu_si128(p.add(16) as *const __m128i));
        for pair in 0..4 {
            let mut lo_sum = [_mm256_setzero_si256(); A];
            let mut hi_sum = [_mm256_setzero_si256(); A];
            let q0 = p.add(128 + 256 * pair);
            for t in 0..8 {
                let q = _mm256_loadu_si256(q0.add(32 * t) as *const __m256i);
                let lo = _mm256_and_si256(q, mask);
                let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), mask);
                for k in 0..A {
                    let a0 = &*ap[k].add(b * 8 + 2 * pair);
                    let a1 = &*ap[k].add(b * 8 + 2 * pair + 1);
                    lo_sum[k] = D::add(lo_sum[k], lo, bcast4(a0, 4 * t));
                    hi_sum[k] = D::add(hi_sum[k], hi, bcast4(a1, 4 * t));
                }
            }
            for (half, sums) in [lo_sum, hi_sum].iter().enumerate() {
                let mut finished = [_mm256_setzero_si256(); A];
                for k in 0..A {
                    finished[k] = D::finish(sums[k]);
                }
                add_sub_block(&mut acc, &finished, d, dmin, p, 2 * pair + half, ap, b);
            }
        }
    }
    lanes(acc)
}

/// The fifth bits `bit` (0..8) of eight rows' high-bit run `h`, moved to bit 4 of each byte.
#[inline(always)]
unsafe fn q5k_high(h: __m256i, bit: usize) -> __m256i {
    let moved = if bit <= 4 {
        _mm256_sll_epi32(h, _mm_cvtsi32_si128(4 - bit as i32))
    } else {
        _mm256_srl_epi32(h, _mm_cvtsi32_si128(bit as i32 - 4))
    };
    _mm256_and_si256(moved, _mm256_set1_epi8(0x10))
}

/// Eight interleaved Q5_K rows: [`q4k_x8`] with each value's fifth bit from the rows'
/// high-bit runs (bit `j` for sub-block `j`: quarter `p`'s low nibbles are sub-block `2p`,
/// its high nibbles `2p + 1`). The 16-bit sums take four runs at a time
/// (4 · 2 · 31 · 127 = 31,496).
#[inline(always)]
pub(super) unsafe fn q5k_x8<const A: usize, D: IntDot>(
    grp: *const u8,
    ap: [*const ActBlock; A],
    nb: usize,
) -> [[f32; 8]; A] {
    let mask = _mm256_set1_epi8(0x0F);
    let mut acc = [_mm256_setzero_ps(); A];
    for b in 0..nb {
        let p = grp.add(b * 1408);
        prefetch_ahead(p, 1408);
        let d = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
        let dmin = _mm256_cvtph_ps(_mm_loadu_si128(p.add(16) as *const __m128i));
        // One sub-block at a time (low nibbles of quarter `p`, then its high nibbles), so
        // that the 16-bit and 32-bit sums of four activation rows fit AVX2's 16 registers.
        for sub in 0..8 {
            let (pair, high) = (sub / 2, sub % 2);
            let q0 = p.add(384 + 256 * pair);
            let mut sums = [_mm256_setzero_si256(); A];
            for t0 in [0, 4] {
                let mut part = [_mm256_setzero_si256(); A];
                for t in t0..t0 + 4 {
                    let q = _mm256_loadu_si256(q0.add(32 * t) as *const __m256i);
                    let h = _mm256_loadu_si256(p.add(128 + 32 * t) as *const __m256i);
                    let q = if high == 1 {
                        _mm256_srli_epi16(q, 4)
                    } else {
                        q
                    };
                    let v = _mm256_or_si256(_mm256_and_si256(q, mask), q5k_high(h, sub));
                    for k in 0..A {
                        let ab = &*ap[k].add(b * 8 + sub);
                        part[k] = D::add(part[k], v, bcast4(ab, 4 * t));
                    }
                }
                for k in 0..A {
                    sums[k] = _mm256_add_epi32(sums[k], D::finish(part[k]));
                }
            }
            add_sub_block(&mut acc, &sums, d, dmin, p, sub, ap, b);
        }
    }
    lanes(acc)
}

/// The eight rows' 6-bit values of chunk `c0 = 4n + h` (low nibbles) and `c0 + 2` (high
/// nibbles) for run `t` (values `4t..4t + 4` of each chunk).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k_run(p: *const u8, n: usize, h: usize, t: usize) -> (__m256i, __m256i) {
    let m4 = _mm256_set1_epi8(0x0F);
    let m30 = _mm256_set1_epi8(0x30);
    let u = q6k_slot(t);
    let ql = _mm256_loadu_si256(p.add(q6k_low_at(n, h) + 32 * u) as *const __m256i);
    let qh = _mm256_loadu_si256(p.add(q6k_high_at(n) + 32 * u) as *const __m256i);
    // Chunk `4n + h`'s two high bits sit at bits `2h`, chunk `4n + h + 2`'s at `2h + 4`:
    // each moved to bits 4..6 by one shift (bits a 16-bit shift carries across bytes are
    // masked off).
    let (h0, h1) = if h == 0 {
        (_mm256_slli_epi16(qh, 4), qh)
    } else {
        (_mm256_slli_epi16(qh, 2), _mm256_srli_epi16(qh, 2))
    };
    let q0 = _mm256_or_si256(_mm256_and_si256(ql, m4), _mm256_and_si256(h0, m30));
    let q1 = _mm256_or_si256(
        _mm256_and_si256(_mm256_srli_epi16(ql, 4), m4),
        _mm256_and_si256(h1, m30),
    );
    (q0, q1)
}

/// Eight interleaved Q6_K rows. Per super-block: the eight rows' scales and 16 sub-scales
/// (planes), then for each half `n` of the values the high-bit runs (two bits per chunk)
/// followed by the low-bit runs (`h` = 0, 1: low nibbles are chunk `4n + h`, high nibbles
/// chunk `4n + h + 2`), read front to back. Values are 0..63, stored minus 32: Σ (q − 32)·x = Σ q·x − 32 Σ x, with Σ x per
/// 16 values kept in the activation blocks.
///
/// Two runs' products are summed in 16-bit lanes (at most 2 · 2 · 63 · 127 = 32,004), then
/// multiplied by the row's sub-scale and summed in 32 bits by one `madd` (the sub-scale
/// repeated in both 16-bit halves of the row's lane); the 32 offset is taken off in 32 bits.
/// Only a chunk's total (two sub-blocks) is converted to f32.
#[inline(always)]
pub(super) unsafe fn q6k_x8<const A: usize>(
    grp: *const u8,
    ap: [*const ActBlock; A],
    nb: usize,
) -> [[f32; 8]; A] {
    let mut acc = [_mm256_setzero_ps(); A];
    // Sub-scale `s` of the eight rows: as i32 lanes, and repeated in both 16-bit halves.
    let sub = |p: *const u8, s: usize| -> (__m256i, __m256i) {
        let v = _mm256_cvtepi8_epi32(_mm_cvtsi64_si128(plane(p.add(16), s) as i64));
        let lo = _mm256_and_si256(v, _mm256_set1_epi32(0xFFFF));
        (v, _mm256_or_si256(lo, _mm256_slli_epi32(v, 16)))
    };
    for b in 0..nb {
        let p = grp.add(b * 1680);
        prefetch_ahead(p, 1680);
        let d = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
        for n in 0..2 {
            for h in 0..2 {
                let (c0, c1) = (4 * n + h, 4 * n + h + 2);
                let mut i0 = [_mm256_setzero_si256(); A];
                let mut i1 = [_mm256_setzero_si256(); A];
                for half in 0..2 {
                    let (sc0, sd0) = sub(p, 2 * c0 + half);
                    let (sc1, sd1) = sub(p, 2 * c1 + half);
                    for pair in 0..2 {
                        let t = 4 * half + 2 * pair;
                        let (qa0, qa1) = q6k_run(p, n, h, t);
                        let (qb0, qb1) = q6k_run(p, n, h, t + 1);
                        let at = 16 * half + 8 * pair;
                        for k in 0..A {
                            let a0 = &*ap[k].add(b * 8 + c0);
                            let a1 = &*ap[k].add(b * 8 + c1);
                            let x0 = _mm256_add_epi16(
                                _mm256_maddubs_epi16(qa0, bcast4(a0, at)),
                                _mm256_maddubs_epi16(qb0, bcast4(a0, at + 4)),
                            );
                            let x1 = _mm256_add_epi16(
                                _mm256_maddubs_epi16(qa1, bcast4(a1, at)),
                                _mm256_maddubs_epi16(qb1, bcast4(a1, at + 4)),
                            );
                            i0[k] = _mm256_add_epi32(i0[k], _mm256_madd_epi16(x0, sd0));
                            i1[k] = _mm256_add_epi32(i1[k], _mm256_madd_epi16(x1, sd1));
                        }
                    }
                    for k in 0..A {
                        let a0 = &*ap[k].add(b * 8 + c0);
                        let a1 = &*ap[k].add(b * 8 + c1);
                        let o0 = _mm256_set1_epi32(32 * a0.half_sums[half] as i32);
                        let o1 = _mm256_set1_epi32(32 * a1.half_sums[half] as i32);
                        i0[k] = _mm256_sub_epi32(i0[k], _mm256_mullo_epi32(sc0, o0));
                        i1[k] = _mm256_sub_epi32(i1[k], _mm256_mullo_epi32(sc1, o1));
                    }
                }
                for k in 0..A {
                    let a0 = &*ap[k].add(b * 8 + c0);
                    let a1 = &*ap[k].add(b * 8 + c1);
                    let f0 = _mm256_mul_ps(d, _mm256_set1_ps(a0.d));
                    let f1 = _mm256_mul_ps(d, _mm256_set1_ps(a1.d));
                    acc[k] = _mm256_fmadd_ps(f0, _mm256_cvtepi32_ps(i0[k]), acc[k]);
                    acc[k] = _mm256_fmadd_ps(f1, _mm256_cvtepi32_ps(i1[k]), acc[k]);
                }
            }
        }
    }
    lanes(acc)
}

//! The AVX2 kernels for weights in the file's own block layout: the rows past the last full
//! interleaved group, and weights loaded without interleaving. One row's block at a time, its
//! products summed within the row (a horizontal sum per row at the end).

use std::arch::x86_64::*;

use super::super::ActBlock;

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16(p: *const u8) -> f32 {
    let bits = u16::from_le_bytes([*p, *p.add(1)]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// 16 bytes of packed nibbles as 32 bytes: low nibbles (values 0..16), then high nibbles.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let q = _mm_loadu_si128(p as *const __m128i);
    let both = _mm256_set_m128i(_mm_srli_epi16(q, 4), q);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn act(ab: &ActBlock) -> __m256i {
    _mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i)
}

/// Σ of pairs of i16 lanes as eight i32 lanes, in f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pairs_f32(p16: __m256i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn finish<const R: usize, const A: usize>(
    acc: [[__m256; A]; R],
    off: [[f32; A]; R],
) -> [[f32; A]; R] {
    let mut out = [[0f32; A]; R];
    for i in 0..R {
        for k in 0..A {
            out[i][k] = hsum(acc[i][k]) + off[i][k];
        }
    }
    out
}

/// The 32-value formats with 4-bit values: `d·q + m` (Q4_1) or `d·(q − 8)` (Q4_0).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4<const R: usize, const A: usize, const HAS_MIN: bool>(
    wp: [*const u8; R],
    ap: [*const ActBlock; A],
    nb: usize,
) -> [[f32; A]; R] {
    let bytes = if HAS_MIN { 20 } else { 18 };
    let qs_at = if HAS_MIN { 4 } else { 2 };
    let mut acc = [[_mm256_setzero_ps(); A]; R];
    let mut off = [[0f32; A]; R];
    for b in 0..nb {
        let mut wq = [_mm256_setzero_si256(); R];
        let mut d = [0f32; R];
        let mut m = [0f32; R];
        for i in 0..R {
            let p = wp[i].add(b * bytes);
            d[i] = f16(p);
            m[i] = if HAS_MIN { f16(p.add(2)) } else { -8.0 * d[i] };
            wq[i] = nibbles(p.add(qs_at));
        }
        for k in 0..A {
            let ab = &*ap[k].add(b);
            let x = act(ab);
            for i in 0..R {
                let s = pairs_f32(_mm256_maddubs_epi16(wq[i], x));
                acc[i][k] = _mm256_fmadd_ps(_mm256_set1_ps(d[i] * ab.d), s, acc[i][k]);
                off[i][k] += m[i] * ab.s;
            }
        }
    }
    finish(acc, off)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q4_1<const R: usize, const A: usize>(
    wp: [*const u8; R],
    ap: [*const ActBlock; A],
    nb: usize,
) -> [[f32; A]; R] {
    q4::<R, A, true>(wp, ap, nb)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q4_0<const R: usize, const A: usize>(
    wp: [*const u8; R],
    ap: [*const ActBlock; A],
    nb: usize,
) -> [[f32; A]; R] {
    q4::<R, A, false>(wp, ap, nb)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q8_0<const R: usize, const A: usize>(
    wp: [*const u8; R],
    ap: [*const ActBlock; A],
    nb: usize,
) -> [[f32; A]; R] {
    let mut acc = [[_mm256_setzero_ps(); A]; R];
    for b in 0..nb {
        let mut wq = [_mm256_setzero_si256(); R];
        let mut wabs = [_mm256_setzero_si256(); R];
        let mut d = [0f32; R];
        for i in 0..R {
            let p = wp[i].add(b * 34);
            d[i] = f16(p);
            wq[i] = _mm256_loadu_si256(p.add(2) as *const __m256i);
            wabs[i] = _mm256_sign_epi8(wq[i], wq[i]);
        }
        for k in 0..A {
            let ab = &*ap[k].add(b);
            let x = act(ab);
            for i in 0..R {
                // |w| · (x · sign w) = w · x, with the unsigned operand first.
                let s = pairs_f32(_mm256_maddubs_epi16(wabs[i], _mm256_sign_epi8(x, wq[i])));
                acc[i][k] = _mm256_fmadd_ps(_mm256_set1_ps(d[i] * ab.d), s, acc[i][k]);
            }
        }
    }
    finish(acc, [[0f32; A]; R])
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q4k<const R: usize, const A: usize>(
    wp: [*const u8; R],
    ap: [*const ActBlock; A],
    nb: usize,
) -> [[f32; A]; R] {
    let mask = _mm256_set1_epi8(0x0F);
    let mut acc = [[_mm256_setzero_ps(); A]; R];
    let mut off = [[0f32; A]; R];
    for b in 0..nb {
        let mut d = [[0f32; 8]; R];
        let mut m = [[0f32; 8]; R];
        for i in 0..R {
            let p = wp[i].add(b * 144);
            let (dd, dmin) = (f16(p), f16(p.add(2)));
            let scales = std::slice::from_raw_parts(p.add(4), 12);
            for s in 0..8 {
                let (sc, mn) = super::super::q4k_scale_min(s, scales);
                d[i][s] = dd * sc as f32;
                m[i][s] = -dmin * mn as f32;
            }
        }
        for pair in 0..4 {
            let mut lo = [_mm256_setzero_si256(); R];
            let mut hi = [_mm256_setzero_si256(); R];
            for i in 0..R {
                let q = _mm256_loadu_si256(wp[i].add(b * 144 + 16 + 32 * pair) as *const _);
                lo[i] = _mm256_and_si256(q, mask);
                hi[i] = _mm256_and_si256(_mm256_srli_epi16(q, 4), mask);
            }
            for k in 0..A {
                for (half, wq) in [lo, hi].iter().enumerate() {
                    let s = 2 * pair + half;
                    let ab = &*ap[k].add(b * 8 + s);
                    let x = act(ab);
                    for i in 0..R {
                        let p = pairs_f32(_mm256_maddubs_epi16(wq[i], x));
                        acc[i][k] = _mm256_fmadd_ps(_mm256_set1_ps(d[i][s] * ab.d), p, acc[i][k]);
                        off[i][k] += m[i][s] * ab.s;
                    }
                }
            }
        }
    }
    finish(acc, off)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q6k<const R: usize, const A: usize>(
    wp: [*const u8; R],
    ap: [*const ActBlock; A],
    nb: usize,
) -> [[f32; A]; R] {
    let m4 = _mm256_set1_epi8(0x0F);
    let m2 = _mm256_set1_epi8(0x03);
    let mut acc = [[_mm256_setzero_ps(); A]; R];
    let mut off = [[0f32; A]; R];
    for b in 0..nb {
        for c in 0..8 {
            let (n, t) = (c / 4, c % 4);
            let mut wq = [_mm256_setzero_si256(); R];
            let mut sc = [_mm256_setzero_si256(); R];
            let mut scs = [[0i32; 2]; R];
            let mut d = [0f32; R];
            for i in 0..R {
                let p = wp[i].add(b * 210);
                let lo = _mm256_loadu_si256(p.add(64 * n + 32 * (t % 2)) as *const _);
                let lo = if t < 2 {
                    _mm256_and_si256(lo, m4)
                } else {
                    _mm256_and_si256(_mm256_srli_epi16(lo, 4), m4)
                };
                let qh = _mm256_loadu_si256(p.add(128 + 32 * n) as *const _);
                let shift = _mm_cvtsi32_si128(2 * t as i32);
                let hi = _mm256_and_si256(_mm256_srl_epi16(qh, shift), m2);
                wq[i] = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
                let (s0, s1) = (*p.add(192 + 2 * c) as i8, *p.add(193 + 2 * c) as i8);
                scs[i] = [s0 as i32, s1 as i32];
                sc[i] = _mm256_set_m128i(_mm_set1_epi16(s1 as i16), _mm_set1_epi16(s0 as i16));
                d[i] = f16(p.add(208));
            }
            for k in 0..A {
                let ab = &*ap[k].add(b * 8 + c);
                let x = act(ab);
                for i in 0..R {
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(wq[i], x), sc[i]);
                    let dd = d[i] * ab.d;
                    acc[i][k] =
                        _mm256_fmadd_ps(_mm256_set1_ps(dd), _mm256_cvtepi32_ps(p), acc[i][k]);
                    // Values are q − 32: subtract 32 · Σ scale · x over each half.
                    let corr =
                        scs[i][0] * ab.half_sums[0] as i32 + scs[i][1] * ab.half_sums[1] as i32;
                    off[i][k] -= dd * (32 * corr) as f32;
                }
            }
        }
    }
    finish(acc, off)
}

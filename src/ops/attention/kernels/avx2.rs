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
        let wr: [__m256; Q] = std::array::from_fn(|i| _mm256_broadcast_ss(&*w.add(i * CHUNK + r)));
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

// [`super::scores_i8`] three queries at a time.
scores_i8_by_block!(
    #[target_feature(enable = "avx2,fma,f16c")]
);

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
pub(super) unsafe fn add_rows_i8<const Q: usize, const C: usize>(
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

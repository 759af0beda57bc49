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

// [`super::scores_i8`] on 512-bit registers, three queries at a time; the same bits as the
// AVX2 kernel (exact integer sums, then the same two products).
scores_i8_by_block!(
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
);

/// Where lane `2r` of a widened pair of K columns (`c` then `c + 1`, 16 rows each) takes
/// column `c` of row `r`, and lane `2r + 1` column `c + 1`.
const PAIR_ROWS: [i16; 32] = {
    let mut t = [0i16; 32];
    let mut r = 0;
    while r < 16 {
        t[2 * r] = r as i16;
        t[2 * r + 1] = 16 + r as i16;
        r += 1;
    }
    t
};

/// The scores of `Q` queries against a block's 16 rows of 8-bit K, two columns (32
/// consecutive bytes, as stored) at a time: widened to 16 bits and permuted so each 32-bit
/// lane holds one row's pair, then `vpdpwssd` with the query's two values adds both products
/// into that row's lane, in row order. Column pairs alternate between two sums per query.
#[inline(always)]
unsafe fn block_i8<const Q: usize>(
    out: *mut f32,
    qi: *const i16,
    qscale: *const f32,
    k: *const i8,
    d: usize,
    sc: *const f32,
) {
    let idx = _mm512_loadu_si512(PAIR_ROWS.as_ptr().cast());
    let mut s = [[_mm512_setzero_si512(); 2]; Q];
    let mut c = 0;
    // `d` is a multiple of 16: whole groups of four columns.
    while c < d {
        for (p, cc) in [c, c + 2].into_iter().enumerate() {
            let pair = _mm512_cvtepi8_epi16(_mm256_loadu_si256(k.add(cc * BLOCK_TOKENS).cast()));
            let pair = _mm512_permutexvar_epi16(idx, pair);
            for (i, si) in s.iter_mut().enumerate() {
                let qp = _mm512_set1_epi32(qi.add(i * d + cc).cast::<i32>().read_unaligned());
                si[p] = _mm512_dpwssd_epi32(si[p], pair, qp);
            }
        }
        c += 4;
    }
    let scv = _mm512_loadu_ps(sc);
    for (i, [a, b]) in s.iter().enumerate() {
        let t = _mm512_cvtepi32_ps(_mm512_add_epi32(*a, *b));
        let v = _mm512_mul_ps(_mm512_mul_ps(t, _mm512_set1_ps(*qscale.add(i))), scv);
        _mm512_storeu_ps(out.add(i * CHUNK), v);
    }
}

/// [`super::accumulate_i8`] on 512-bit registers, three queries at a time; the same bits as
/// the AVX2 kernel.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub unsafe fn accumulate_i8(
    w: &[f32],
    nq: usize,
    d: usize,
    v: &[i8],
    scales: &[f32],
    cnt: usize,
    acc: &mut [f32],
) {
    let mut ui = [[0i16; BLOCK_TOKENS]; 3];
    let mut scale = [0f32; 3];
    let live: __mmask16 = if cnt >= 16 { !0 } else { (1 << cnt) - 1 };
    let (wp, vp, ap) = (w.as_ptr(), v.as_ptr(), acc.as_mut_ptr());
    let sc = _mm512_loadu_ps(scales.as_ptr());
    let mut j = 0;
    while j < nq {
        let qs = (nq - j).min(3);
        for i in 0..qs {
            scale[i] = weights_i16(wp.add((j + i) * CHUNK), sc, live, &mut ui[i]);
        }
        let aj = ap.add(j * d);
        let mut c = 0;
        while c < d {
            let n = if d - c >= 64 { 64 } else { (d - c).min(32) };
            match (qs, n) {
                (3, 64) => add_rows_i8::<3, 2>(&ui, &scale, vp, aj, d, cnt, c),
                (2, 64) => add_rows_i8::<2, 2>(&ui, &scale, vp, aj, d, cnt, c),
                (_, 64) => add_rows_i8::<1, 2>(&ui, &scale, vp, aj, d, cnt, c),
                (3, 32) => add_rows_i8::<3, 1>(&ui, &scale, vp, aj, d, cnt, c),
                (2, 32) => add_rows_i8::<2, 1>(&ui, &scale, vp, aj, d, cnt, c),
                (_, 32) => add_rows_i8::<1, 1>(&ui, &scale, vp, aj, d, cnt, c),
                // The last 16 columns: the AVX2 kernel's run (the same sums).
                (3, _) => super::avx2::add_rows_i8::<3, 16>(&ui, &scale, vp, aj, d, cnt, c),
                (2, _) => super::avx2::add_rows_i8::<2, 16>(&ui, &scale, vp, aj, d, cnt, c),
                (_, _) => super::avx2::add_rows_i8::<1, 16>(&ui, &scale, vp, aj, d, cnt, c),
            }
            c += n;
        }
        j += qs;
    }
}

/// A query's 16 weights at `w` times the rows' scales `sc` (rows outside `live` taken as
/// zero), rounded to 16-bit integers against the largest magnitude, into `out`; returns the
/// scale they are in. The AVX2 kernel's rounding, on one register.
#[inline(always)]
unsafe fn weights_i16(
    w: *const f32,
    sc: __m512,
    live: __mmask16,
    out: &mut [i16; BLOCK_TOKENS],
) -> f32 {
    let x = _mm512_maskz_mul_ps(live, _mm512_loadu_ps(w), sc);
    let m = _mm512_reduce_max_ps(_mm512_abs_ps(x));
    let inv = _mm512_set1_ps(if m > 0.0 { 32767.0 / m } else { 0.0 });
    let i = _mm512_cvtps_epi32(_mm512_mul_ps(x, inv));
    _mm256_storeu_si256(out.as_mut_ptr().cast(), _mm512_cvtsepi32_epi16(i));
    m / 32767.0
}

/// Output columns 0-15 and 16-31 of a 32-column run from its two sums: `lo` holds columns
/// `8L..8L + 4` in lanes `4L..4L + 4`, `hi` columns `8L + 4..8L + 8` (the 128-bit lanes of the
/// unpacking).
const RUN_COLS: [[i32; 16]; 2] = [
    [0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23],
    [8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31],
];

/// Add the block's weighted 8-bit rows to columns `c..c + 32 * U` of `Q` queries'
/// accumulators: rows two at a time, each run of 32 columns widened to 16 bits and the two
/// rows interleaved, so each 32-bit lane holds one column's pair and `vpdpwssd` with the two
/// rows' weights adds both products into it; the columns put back in order at the end.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn add_rows_i8<const Q: usize, const U: usize>(
    ui: &[[i16; BLOCK_TOKENS]; 3],
    scale: &[f32; 3],
    v: *const i8,
    acc: *mut f32,
    d: usize,
    cnt: usize,
    c: usize,
) {
    let load = |r: usize, u: usize| {
        _mm512_cvtepi8_epi16(_mm256_loadu_si256(v.add(r * d + c + 32 * u).cast()))
    };
    let mut lo = [[_mm512_setzero_si512(); U]; Q];
    let mut hi = [[_mm512_setzero_si512(); U]; Q];
    let mut r = 0;
    while r < cnt {
        let mut pl = [_mm512_setzero_si512(); U];
        let mut ph = [_mm512_setzero_si512(); U];
        for u in 0..U {
            let (a, b) = (load(r, u), load(r + 1, u));
            pl[u] = _mm512_unpacklo_epi16(a, b);
            ph[u] = _mm512_unpackhi_epi16(a, b);
        }
        for i in 0..Q {
            let wp = _mm512_set1_epi32(ui[i].as_ptr().add(r).cast::<i32>().read_unaligned());
            for u in 0..U {
                lo[i][u] = _mm512_dpwssd_epi32(lo[i][u], pl[u], wp);
                hi[i][u] = _mm512_dpwssd_epi32(hi[i][u], ph[u], wp);
            }
        }
        r += 2;
    }
    let idx = RUN_COLS.map(|t| _mm512_loadu_si512(t.as_ptr().cast()));
    for i in 0..Q {
        let x = _mm512_set1_ps(scale[i]);
        for u in 0..U {
            let (l, h) = (_mm512_cvtepi32_ps(lo[i][u]), _mm512_cvtepi32_ps(hi[i][u]));
            for (half, ix) in idx.iter().enumerate() {
                let s = _mm512_permutex2var_ps(l, *ix, h);
                let o = acc.add(i * d + c + 32 * u + 16 * half);
                _mm512_storeu_ps(o, _mm512_fmadd_ps(s, x, _mm512_loadu_ps(o)));
            }
        }
    }
}

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

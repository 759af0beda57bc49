//! Activations quantised to 8-bit blocks of 32, once per step, for every weight matrix that
//! reads them.
//!
//! On x86 with AVX2 a block is quantised in registers (eight values an instruction), on
//! aarch64 with NEON (four); the portable loop is the reference, and all give the same bytes. Large inputs (prefill chunks)
//! are split over the thread pool: a model step otherwise quantised them on one core while the
//! other waited.

use std::mem::MaybeUninit;

use super::{Isa, QK};
use crate::ops::par_chunks_mut;
use half::f16;

/// One block of 32 activations: `x[i] ≈ d * qs[i]`.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct ActBlock {
    pub d: f32,
    /// `d * Σ qs`, for formats with a per-block offset (Q4_0, Q4_1, Q4_K).
    pub s: f32,
    /// `Σ qs` over each half of 16 values (Q6_K's scales cover 16 values).
    pub half_sums: [i16; 2],
    pub qs: [i8; QK],
}

impl ActBlock {
    /// The block from its scale and values (the sums derived), as llama.cpp's Q8_1: the scale
    /// and the sum are kept at f16 precision (the values are quantised with the f32 scale), so
    /// our logits track llama.cpp's to the last bit that matters.
    fn new(d: f32, qs: [i8; QK], lo: i32, hi: i32) -> ActBlock {
        ActBlock {
            d: f16::from_f32(d).to_f32(),
            s: f16::from_f32(d * (lo + hi) as f32).to_f32(),
            half_sums: [lo as i16, hi as i16],
            qs,
        }
    }
}

/// A matrix of activations, quantised row by row.
pub struct QActs {
    pub rows: usize,
    pub cols: usize,
    pub blocks: Vec<ActBlock>,
}

/// Blocks quantised by one task of a parallel pass (a decode step's are fewer: one task, on
/// the calling thread).
const BLOCKS_PER_TASK: usize = 256;

impl QActs {
    /// Quantise `rows` rows of `cols` values (`cols` a multiple of 32).
    pub fn quantize(x: &[f32], rows: usize, cols: usize) -> QActs {
        Self::quantize_with(super::isa(), x, rows, cols)
    }

    /// As [`QActs::quantize`], with the given kernel set's quantiser (tests compare them).
    pub fn quantize_with(isa: Isa, x: &[f32], rows: usize, cols: usize) -> QActs {
        assert_eq!(x.len(), rows * cols, "activation shape");
        assert!(
            cols.is_multiple_of(QK),
            "activation width must be a multiple of {QK}"
        );
        let n = x.len() / QK;
        // Written once, by the quantiser (not zeroed first: a prefill chunk's blocks are
        // megabytes).
        let mut blocks = Vec::with_capacity(n);
        let out = &mut blocks.spare_capacity_mut()[..n];
        let per = BLOCKS_PER_TASK * QK;
        par_chunks_mut(out, BLOCKS_PER_TASK, |i, out| {
            quantize_blocks(isa, &x[i * per..][..out.len() * QK], out)
        });
        // SAFETY: the pass above wrote all `n` blocks.
        unsafe { blocks.set_len(n) };
        QActs { rows, cols, blocks }
    }

    pub(super) fn row(&self, j: usize) -> &[ActBlock] {
        let nb = self.cols / QK;
        &self.blocks[j * nb..(j + 1) * nb]
    }

    /// The values these blocks stand for (tests compare kernels against this).
    pub fn dequantize(&self) -> Vec<f32> {
        self.blocks
            .iter()
            .flat_map(|b| b.qs.map(|q| q as f32 * b.d))
            .collect()
    }
}

fn quantize_blocks(isa: Isa, x: &[f32], out: &mut [MaybeUninit<ActBlock>]) {
    let blocks = x.chunks_exact(QK).zip(out);
    #[cfg(target_arch = "x86_64")]
    if isa.is_avx2() {
        for (x, o) in blocks {
            // SAFETY: AVX2 is present (the kernel set needs it); `x` is one block.
            o.write(unsafe { x86::quantize_block(x.try_into().expect("a block")) });
        }
        return;
    }
    #[cfg(target_arch = "aarch64")]
    if isa.is_neon() {
        for (x, o) in blocks {
            // SAFETY: NEON is the aarch64 baseline; `x` is one block.
            o.write(unsafe { arm::quantize_block(x.try_into().expect("a block")) });
        }
        return;
    }
    let _ = isa;
    for (x, o) in blocks {
        o.write(quantize_block(x));
    }
}

/// The portable quantiser: scale `max |x| / 127`, values rounded half to even.
fn quantize_block(x: &[f32]) -> ActBlock {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; QK];
    for (q, v) in qs.iter_mut().zip(x) {
        *q = (v * inv).round_ties_even() as i8;
    }
    let lo: i32 = qs[..16].iter().map(|&q| q as i32).sum();
    let hi: i32 = qs[16..].iter().map(|&q| q as i32).sum();
    ActBlock::new(d, qs, lo, hi)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{ActBlock, QK};
    use std::arch::x86_64::*;

    /// [`super::quantize_block`] in AVX2 registers, to the same bytes: the maximum ignores
    /// NaN as `f32::max` does, rounding is half to even, and a NaN product becomes 0 as the
    /// saturating cast makes it.
    #[target_feature(enable = "avx2")]
    pub unsafe fn quantize_block(x: &[f32; QK]) -> ActBlock {
        let p = x.as_ptr();
        let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(p.add(8 * i)));
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
        // `max_ps(a, b)` is `b` when either is NaN: the running maximum goes second.
        let mut m = _mm256_setzero_ps();
        for vi in v {
            m = _mm256_max_ps(_mm256_and_ps(vi, abs), m);
        }
        let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
        let d = amax / 127.0;
        let inv = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        let q: [__m256i; 4] = v.map(|vi| {
            let y = _mm256_mul_ps(vi, inv);
            let y = _mm256_and_ps(y, _mm256_cmp_ps(y, y, _CMP_ORD_Q));
            _mm256_cvtps_epi32(_mm256_round_ps(
                y,
                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
            ))
        });
        // Packing interleaves the four vectors by 128-bit lanes and 32-bit groups; the
        // permutation puts the groups back in order.
        let packed = _mm256_packs_epi16(
            _mm256_packs_epi32(q[0], q[1]),
            _mm256_packs_epi32(q[2], q[3]),
        );
        let ordered =
            _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        let mut qs = [0i8; QK];
        _mm256_storeu_si256(qs.as_mut_ptr().cast(), ordered);
        let sum = |a: __m256i, b: __m256i| {
            let s = _mm256_add_epi32(a, b);
            let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
            let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
            _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 1)))
        };
        ActBlock::new(d, qs, sum(q[0], q[1]), sum(q[2], q[3]))
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use super::{ActBlock, QK};
    use std::arch::aarch64::*;

    /// [`super::quantize_block`] in NEON registers, to the same bytes: `fmaxnm` ignores NaN as
    /// `f32::max` does, `fcvtns` rounds half to even and turns NaN into 0.
    pub unsafe fn quantize_block(x: &[f32; QK]) -> ActBlock {
        let p = x.as_ptr();
        let v: [float32x4_t; 8] = std::array::from_fn(|i| vld1q_f32(p.add(4 * i)));
        let mut m = vdupq_n_f32(0.0);
        for vi in v {
            m = vmaxnmq_f32(m, vabsq_f32(vi));
        }
        let amax = vmaxnmvq_f32(m);
        let d = amax / 127.0;
        let inv = vdupq_n_f32(if d > 0.0 { 1.0 / d } else { 0.0 });
        let q: [int32x4_t; 8] = v.map(|vi| vcvtnq_s32_f32(vmulq_f32(vi, inv)));
        let half = |k: usize| {
            let h = |i: usize| vcombine_s16(vqmovn_s32(q[i]), vqmovn_s32(q[i + 1]));
            vcombine_s8(vqmovn_s16(h(k)), vqmovn_s16(h(k + 2)))
        };
        let mut qs = [0i8; QK];
        vst1q_s8(qs.as_mut_ptr(), half(0));
        vst1q_s8(qs.as_mut_ptr().add(16), half(4));
        let sum = |k: usize| {
            vaddvq_s32(vaddq_s32(
                vaddq_s32(q[k], q[k + 1]),
                vaddq_s32(q[k + 2], q[k + 3]),
            ))
        };
        ActBlock::new(d, qs, sum(0), sum(4))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel set's quantiser gives the portable one's bytes: random blocks, blocks of
    /// exact halves (rounding ties), zeros, tiny and huge values, and NaN.
    #[test]
    fn quantisers_agree() {
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        let mut x: Vec<f32> = (0..QK * 1024).map(|_| rnd() * 3.0).collect();
        // Ties: the largest value 127 (d = 1), the rest k + 0.5.
        for b in 0..20 {
            let blk = &mut x[b * QK..][..QK];
            for (i, v) in blk.iter_mut().enumerate() {
                *v = (i as f32 - 16.0 + 0.5) * if b % 2 == 0 { 1.0 } else { -1.0 };
            }
            blk[b % QK] = 127.0;
        }
        x[20 * QK..21 * QK].fill(0.0);
        x[21 * QK..22 * QK].iter_mut().for_each(|v| *v *= 1e-30);
        x[22 * QK..23 * QK].iter_mut().for_each(|v| *v *= 1e30);
        x[23 * QK + 5] = f32::NAN;
        x[24 * QK] = -0.0;
        let want: Vec<ActBlock> = x.chunks_exact(QK).map(quantize_block).collect();
        for isa in Isa::available() {
            // 1,024 blocks: a parallel pass of four tasks.
            let got = QActs::quantize_with(isa, &x, 256, 4 * QK);
            for (i, (g, w)) in got.blocks.iter().zip(&want).enumerate() {
                assert_eq!(g.qs, w.qs, "{isa:?} block {i}");
                assert_eq!(g.half_sums, w.half_sums, "{isa:?} block {i}");
                assert_eq!(g.d.to_bits(), w.d.to_bits(), "{isa:?} block {i}");
                assert_eq!(g.s.to_bits(), w.s.to_bits(), "{isa:?} block {i}");
            }
        }
    }
}

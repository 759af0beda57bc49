//! CPU kernels the model calls between candle's matmuls: rotary embeddings and attention over
//! the f16 KV rows of each sequence.

pub mod attention;
pub mod quant;
pub mod rope;

/// `a * b + c`, fused where the build target has FMA (a software `fmaf` would be far slower).
#[inline(always)]
fn fmadd(a: f32, b: f32, c: f32) -> f32 {
    if cfg!(any(target_feature = "fma", target_arch = "aarch64")) {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Dot product with eight independent accumulators, so the compiler can vectorise it.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (ca, ra) = a[..n].as_chunks::<8>();
    let (cb, rb) = b[..n].as_chunks::<8>();
    let mut acc = [0f32; 8];
    for (x, y) in ca.iter().zip(cb) {
        for i in 0..8 {
            acc[i] = fmadd(x[i], y[i], acc[i]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s = fmadd(*x, *y, s);
    }
    s
}

/// Sum with eight independent accumulators (vectorises, unlike a plain fold).
#[inline]
pub fn sum(a: &[f32]) -> f32 {
    let (c, r) = a.as_chunks::<8>();
    let mut acc = [0f32; 8];
    for x in c {
        for i in 0..8 {
            acc[i] += x[i];
        }
    }
    acc.iter().sum::<f32>() + r.iter().sum::<f32>()
}

/// Largest value, ignoring NaN as `f32::max` does (eight lanes, so it vectorises, where a fold
/// over `f32::max` stays scalar); negative infinity for an empty slice.
pub fn max(x: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 8];
    max_lanes(&mut m, x);
    m.iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

/// Fold `x` into eight running maxima (lane `i` takes values `8k + i`, a tail lane 0),
/// ignoring NaN: several slices' maximum with one fold at the end.
#[inline(always)]
pub fn max_lanes(lanes: &mut [f32; 8], x: &[f32]) {
    let (c, r) = x.as_chunks::<8>();
    for v in c {
        for i in 0..8 {
            lanes[i] = if v[i] > lanes[i] { v[i] } else { lanes[i] };
        }
    }
    for &v in r {
        lanes[0] = if v > lanes[0] { v } else { lanes[0] };
    }
}

/// Dot products of `q` with eight consecutive rows of `q.len()` values (`rows` holds them
/// back to back). AVX2 where the CPU has it and the width is a multiple of 8: the eight sums
/// come out of one transposing reduction instead of eight horizontal ones.
#[inline]
pub fn dot8(q: &[f32], rows: &[f32]) -> [f32; 8] {
    let d = q.len();
    assert!(rows.len() >= 8 * d);
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(8) && simd::avx2() {
        // SAFETY: AVX2 and FMA checked; `rows` holds 8 rows of `d` values, `d` a multiple of 8.
        return unsafe { simd::dot8_avx2(q, rows) };
    }
    std::array::from_fn(|i| dot(q, &rows[i * d..(i + 1) * d]))
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    pub fn avx2() -> bool {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot8_avx2(q: &[f32], rows: &[f32]) -> [f32; 8] {
        let d = q.len();
        let (qp, rp) = (q.as_ptr(), rows.as_ptr());
        let mut a = [_mm256_setzero_ps(); 8];
        for c in (0..d).step_by(8) {
            let qv = _mm256_loadu_ps(qp.add(c));
            for (i, acc) in a.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(qv, _mm256_loadu_ps(rp.add(i * d + c)), *acc);
            }
        }
        let h0 = _mm256_hadd_ps(a[0], a[1]);
        let h1 = _mm256_hadd_ps(a[2], a[3]);
        let h2 = _mm256_hadd_ps(a[4], a[5]);
        let h3 = _mm256_hadd_ps(a[6], a[7]);
        let g0 = _mm256_hadd_ps(h0, h1);
        let g1 = _mm256_hadd_ps(h2, h3);
        let sums = _mm256_add_ps(
            _mm256_permute2f128_ps(g0, g1, 0x20),
            _mm256_permute2f128_ps(g0, g1, 0x31),
        );
        let mut out = [0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), sums);
        out
    }
}

/// Four dot products of `q` with four rows at once: independent accumulators give the CPU four
/// reductions to overlap, and `q` is loaded once for all four.
#[inline]
pub fn dot4(q: &[f32], rows: [&[f32]; 4]) -> [f32; 4] {
    let n = q.len();
    let (cq, _) = q.as_chunks::<8>();
    let c: [&[[f32; 8]]; 4] = rows.map(|r| r[..n].as_chunks::<8>().0);
    let mut acc = [[0f32; 8]; 4];
    for (i, x) in cq.iter().enumerate() {
        for (a, row) in acc.iter_mut().zip(&c) {
            let y = &row[i];
            for l in 0..8 {
                a[l] = fmadd(x[l], y[l], a[l]);
            }
        }
    }
    let mut out = acc.map(|a| a.iter().sum::<f32>());
    for (o, r) in out.iter_mut().zip(rows) {
        for k in cq.len() * 8..n {
            *o = fmadd(q[k], r[k], *o);
        }
    }
    out
}

/// `acc += w[0] * x[0] + ... + w[3] * x[3]`, element-wise: one pass over `acc` for four rows.
#[inline]
pub fn axpy4(acc: &mut [f32], w: [f32; 4], x: [&[f32]; 4]) {
    let n = acc.len();
    // Equal lengths up front, so the loop has no bounds checks and vectorises.
    let (x0, x1, x2, x3) = (&x[0][..n], &x[1][..n], &x[2][..n], &x[3][..n]);
    for i in 0..n {
        let mut v = acc[i];
        v = fmadd(w[0], x0[i], v);
        v = fmadd(w[1], x1[i], v);
        v = fmadd(w[2], x2[i], v);
        v = fmadd(w[3], x3[i], v);
        acc[i] = v;
    }
}

/// `acc += w * x`, element-wise.
#[inline]
pub fn axpy(acc: &mut [f32], w: f32, x: &[f32]) {
    for (a, v) in acc.iter_mut().zip(x) {
        *a = fmadd(w, *v, *a);
    }
}

/// `e^x` for `x <= 0` (softmax after subtracting the maximum), branch-free so loops over it
/// vectorise: range reduction to `2^n * e^r` with `|r| <= ln2/2` and a degree-6 polynomial;
/// relative error below 2e-7. Underflows to 0 below -87.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5 * 2^23 rounds to an integer (ties to even) kept in the low mantissa bits: no
    // float-to-int conversion, whose saturating semantics kept the loops over this scalar.
    const SHIFT: f32 = 12_582_912.0;
    let x = x.max(-87.0);
    let t = x * LOG2E + SHIFT;
    let n = t - SHIFT;
    let ni = t.to_bits().wrapping_sub(SHIFT.to_bits()) as i32;
    let r = fmadd(-n, LN2_LO, fmadd(-n, LN2_HI, x));
    let mut p = 1.0 / 720.0;
    p = fmadd(p, r, 1.0 / 120.0);
    p = fmadd(p, r, 1.0 / 24.0);
    p = fmadd(p, r, 1.0 / 6.0);
    p = fmadd(p, r, 0.5);
    p = fmadd(p, r, 1.0);
    p = fmadd(p, r, 1.0);
    p * f32::from_bits((ni.wrapping_add(127) as u32) << 23)
}

/// Values an element-wise pass gives each task of the thread pool; a pass over fewer (a decode
/// step's rows) stays on the calling thread, where it costs less than waking the pool.
pub const PAR_VALUES: usize = 16 * 1024;

/// Rows of `width` values per task of a parallel pass over rows (at least one).
pub fn rows_per_task(width: usize) -> usize {
    (PAR_VALUES / width.max(1)).max(1)
}

/// `f(i, piece)` for the pieces of `chunk` values that `data` splits into (piece `i` starts at
/// `i * chunk`; the last may be shorter), on candle's thread pool when there are several: the
/// element-wise steps between matmuls (norms, RoPE, SwiGLU) of a prefill chunk would otherwise
/// run on one core while the others wait.
pub fn par_chunks_mut<T: Send>(data: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let chunk = chunk.max(1);
    let (len, pieces) = (data.len(), data.len().div_ceil(chunk));
    if pieces <= 1 {
        if len > 0 {
            f(0, data);
        }
        return;
    }
    let base = SendPtr(data.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(pieces, |range| {
        for i in range {
            let at = i * chunk;
            // SAFETY: pieces are disjoint and inside `data`, which outlives the pass.
            f(i, unsafe { base.slice(at, chunk.min(len - at)) });
        }
    });
}

struct SendPtr<T>(*mut T);
// SAFETY: used only to hand disjoint pieces of one slice to the pool's threads.
unsafe impl<T: Send> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// # Safety
    /// `at..at + len` must be inside the slice and used by no one else meanwhile.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, at: usize, len: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(at), len)
    }
}

/// RMS normalisation of each row of `x` (rows of `w.len()` values), scaled by `w`, into `out`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    let per = rows_per_task(d) * d;
    par_chunks_mut(out, per, |i, out| {
        let x = &x[i * per..][..out.len()];
        for (row, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            // Sum of squares in f64, as llama.cpp does: rounding here moves every logit.
            let ss: f64 = row.iter().map(|&v| (v * v) as f64).sum();
            let inv = 1.0 / ((ss / d as f64) as f32 + eps).sqrt();
            for ((o, &v), &g) in o.iter_mut().zip(row).zip(w) {
                *o = v * inv * g;
            }
        }
    });
}

/// `x += y`, element-wise.
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    par_chunks_mut(x, PAR_VALUES, |i, x| {
        for (a, b) in x.iter_mut().zip(&y[i * PAR_VALUES..]) {
            *a += b;
        }
    });
}

/// `gate = silu(gate) * up`, the SwiGLU of the feed-forward block. The sigmoid is taken from
/// `e = exp(-|x|)` (`1 / (1 + e)`, or `e / (1 + e)` for negative `x`), so the loop vectorises
/// with [`exp_nonpositive`] instead of calling `expf` a value at a time (relative error below
/// 1e-6; values under 1e-35 may come out as 0).
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    par_chunks_mut(gate, PAR_VALUES, |i, gate| {
        silu_mul_serial(gate, &up[i * PAR_VALUES..])
    });
}

fn silu_mul_serial(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        let e = exp_nonpositive(-x.abs());
        // Below -87 `e` stops shrinking (see exp_nonpositive): silu(x) is 0 to f32 there.
        let top = if x >= 0.0 {
            1.0
        } else if x > -87.0 {
            e
        } else {
            0.0
        };
        *g = x * top / (1.0 + e) * u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate() {
        let mut x = 0.0f32;
        while x > -87.0 {
            let (got, want) = (exp_nonpositive(x), x.exp());
            assert!(
                (got - want).abs() <= want * 3e-7 + 1e-37,
                "exp({x}) = {got}, want {want}"
            );
            x -= 0.013;
        }
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-1000.0), exp_nonpositive(-87.0));
    }

    #[test]
    fn silu_matches_its_definition() {
        let mut x: Vec<f32> = (-2000..2000).map(|i| i as f32 * 0.05).collect();
        x.extend([0.0, -0.0, 1e-30, -1e-30, 200.0, -200.0, f32::MAX, f32::MIN]);
        let up: Vec<f32> = (0..x.len()).map(|i| 1.0 + (i % 7) as f32 * 0.5).collect();
        let mut got = x.clone();
        silu_mul(&mut got, &up);
        for ((&x, &u), &g) in x.iter().zip(&up).zip(&got) {
            let want = (x as f64 / (1.0 + (-x as f64).exp()) * u as f64) as f32;
            assert!(
                g == want || (g - want).abs() <= want.abs() * 1e-6 + 1e-35,
                "silu({x}) * {u} = {g}, want {want}"
            );
        }
    }

    #[test]
    fn dot_and_axpy_match_plain_loops() {
        let a: Vec<f32> = (0..67).map(|i| i as f32 * 0.25 - 3.0).collect();
        let b: Vec<f32> = (0..67).map(|i| (i as f32).sin()).collect();
        let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - want).abs() < 1e-4);
        let rows: Vec<f32> = (0..8 * 64).map(|i| (i as f32 * 0.37).cos()).collect();
        let eight = dot8(&rows[..64], &rows);
        for (i, e) in eight.iter().enumerate() {
            let want: f32 = rows[..64]
                .iter()
                .zip(&rows[i * 64..])
                .map(|(x, y)| x * y)
                .sum();
            assert!((e - want).abs() < 1e-3, "row {i}: {e} vs {want}");
        }
        let four = dot4(&a, [&a, &b, &b, &a]);
        let aa: f32 = a.iter().map(|x| x * x).sum();
        for (got, want) in four.iter().zip([aa, want, want, aa]) {
            assert!(
                (got - want).abs() < 1e-3 * want.abs().max(1.0),
                "{got} vs {want}"
            );
        }
        let mut acc4 = b.clone();
        axpy4(&mut acc4, [1.0, 0.5, 0.25, 0.25], [&a, &a, &a, &a]);
        for i in 0..67 {
            assert!((acc4[i] - (b[i] + 2.0 * a[i])).abs() < 1e-5);
        }
        let mut acc = b.clone();
        axpy(&mut acc, 2.0, &a);
        for i in 0..67 {
            assert!((acc[i] - (b[i] + 2.0 * a[i])).abs() < 1e-5);
        }
    }
}

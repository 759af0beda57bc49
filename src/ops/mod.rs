//! CPU kernels the model calls between candle's matmuls: rotary embeddings and attention over
//! the f16 KV rows of each sequence.

pub mod attention;
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
    let x = x.max(-87.0);
    let n = (x * LOG2E).round();
    let r = fmadd(-n, LN2_LO, fmadd(-n, LN2_HI, x));
    let mut p = 1.0 / 720.0;
    p = fmadd(p, r, 1.0 / 120.0);
    p = fmadd(p, r, 1.0 / 24.0);
    p = fmadd(p, r, 1.0 / 6.0);
    p = fmadd(p, r, 0.5);
    p = fmadd(p, r, 1.0);
    p = fmadd(p, r, 1.0);
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
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
    fn dot_and_axpy_match_plain_loops() {
        let a: Vec<f32> = (0..67).map(|i| i as f32 * 0.25 - 3.0).collect();
        let b: Vec<f32> = (0..67).map(|i| (i as f32).sin()).collect();
        let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - want).abs() < 1e-4);
        let mut acc = b.clone();
        axpy(&mut acc, 2.0, &a);
        for i in 0..67 {
            assert!((acc[i] - (b[i] + 2.0 * a[i])).abs() < 1e-5);
        }
    }
}

//! Rotary position embeddings, applied in place to rows of `[n_heads][head_dim]`.

/// How the two halves of a rotated pair are laid out in a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs are adjacent elements `(2i, 2i+1)`: GGUF Llama files (llama.cpp permutes Q/K).
    Interleaved,
    /// Pairs are `(i, i + d/2)`: Hugging Face checkpoints and GGUF Qwen2 (GPT-NeoX style).
    Neox,
}

/// Precomputed cos/sin for every position up to the context length.
#[derive(Debug, Clone)]
pub struct Rope {
    style: RopeStyle,
    rot_dim: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    /// `rot_dim` is the number of rotated dimensions per head (usually the head size).
    /// `freq_divisors`, one per rotated pair, stretch the wavelengths (Llama 3 / linear RoPE
    /// scaling); `None` means no scaling.
    pub fn new(
        style: RopeStyle,
        rot_dim: usize,
        theta: f32,
        max_pos: usize,
        freq_divisors: Option<&[f32]>,
    ) -> Self {
        let half = rot_dim / 2;
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        for p in 0..max_pos {
            for i in 0..half {
                let div = freq_divisors.and_then(|f| f.get(i)).copied().unwrap_or(1.0) as f64;
                let freq = 1.0 / (theta as f64).powf(2.0 * i as f64 / rot_dim as f64) / div;
                let angle = p as f64 * freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Self {
            style,
            rot_dim,
            cos,
            sin,
        }
    }

    pub fn max_positions(&self) -> usize {
        self.cos.len() / (self.rot_dim / 2).max(1)
    }

    /// Rotate every head of one token at position `pos`. `x` is `[n_heads][head_dim]`.
    pub fn apply(&self, x: &mut [f32], head_dim: usize, pos: usize) {
        let half = self.rot_dim / 2;
        let cos = &self.cos[pos * half..][..half];
        let sin = &self.sin[pos * half..][..half];
        for head in x.chunks_exact_mut(head_dim) {
            match self.style {
                RopeStyle::Interleaved => {
                    for i in 0..half {
                        let (a, b) = (head[2 * i], head[2 * i + 1]);
                        head[2 * i] = a * cos[i] - b * sin[i];
                        head[2 * i + 1] = a * sin[i] + b * cos[i];
                    }
                }
                RopeStyle::Neox => {
                    for i in 0..half {
                        let (a, b) = (head[i], head[i + half]);
                        head[i] = a * cos[i] - b * sin[i];
                        head[i + half] = a * sin[i] + b * cos[i];
                    }
                }
            }
        }
    }
}

/// Llama 3's RoPE scaling as per-pair frequency divisors: high frequencies kept, low ones
/// divided by `factor`, a smooth ramp in between.
pub fn llama3_divisors(
    rot_dim: usize,
    theta: f32,
    factor: f32,
    low_freq_factor: f32,
    high_freq_factor: f32,
    original_context: usize,
) -> Vec<f32> {
    let old = original_context as f64;
    let (low_wavelen, high_wavelen) = (old / low_freq_factor as f64, old / high_freq_factor as f64);
    (0..rot_dim / 2)
        .map(|i| {
            let freq = 1.0 / (theta as f64).powf(2.0 * i as f64 / rot_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (old / wavelen - low_freq_factor as f64)
                    / (high_freq_factor - low_freq_factor) as f64;
                let scaled = (1.0 - smooth) * freq / factor as f64 + smooth * freq;
                (freq / scaled) as f32
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_zero_is_identity_and_norm_is_kept() {
        for style in [RopeStyle::Interleaved, RopeStyle::Neox] {
            let rope = Rope::new(style, 8, 10000.0, 64, None);
            let orig: Vec<f32> = (0..16).map(|i| i as f32 * 0.3 - 1.0).collect();
            let mut x = orig.clone();
            rope.apply(&mut x, 8, 0);
            assert_eq!(x, orig);
            rope.apply(&mut x, 8, 37);
            let n0: f32 = orig.iter().map(|v| v * v).sum();
            let n1: f32 = x.iter().map(|v| v * v).sum();
            assert!((n0 - n1).abs() < 1e-3, "{style:?}: {n0} vs {n1}");
        }
    }

    #[test]
    fn llama3_scaling_stretches_only_low_frequencies() {
        let f = llama3_divisors(64, 500000.0, 8.0, 1.0, 4.0, 8192);
        assert_eq!(f[0], 1.0); // the fastest rotation is kept
        assert_eq!(*f.last().unwrap(), 8.0); // the slowest is divided by the factor
        assert!(f.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn styles_agree_up_to_permutation() {
        // Interleaved on a permuted head equals Neox on the original head, permuted.
        let (d, pos) = (8, 5);
        let a = Rope::new(RopeStyle::Interleaved, d, 10000.0, 16, None);
        let b = Rope::new(RopeStyle::Neox, d, 10000.0, 16, None);
        let x: Vec<f32> = (0..d).map(|i| (i as f32).sin()).collect();
        // permutation: interleaved index 2i <- i, 2i+1 <- i + d/2
        let perm = |v: &[f32]| -> Vec<f32> {
            (0..d)
                .map(|j| {
                    if j % 2 == 0 {
                        v[j / 2]
                    } else {
                        v[j / 2 + d / 2]
                    }
                })
                .collect()
        };
        let mut xi = perm(&x);
        a.apply(&mut xi, d, pos);
        let mut xn = x.clone();
        b.apply(&mut xn, d, pos);
        for (p, q) in xi.iter().zip(perm(&xn)) {
            assert!((p - q).abs() < 1e-6);
        }
    }
}

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
    pub fn new(style: RopeStyle, rot_dim: usize, theta: f32, max_pos: usize) -> Self {
        let half = rot_dim / 2;
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        for p in 0..max_pos {
            for i in 0..half {
                let freq = 1.0 / (theta as f64).powf(2.0 * i as f64 / rot_dim as f64);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_zero_is_identity_and_norm_is_kept() {
        for style in [RopeStyle::Interleaved, RopeStyle::Neox] {
            let rope = Rope::new(style, 8, 10000.0, 64);
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
    fn styles_agree_up_to_permutation() {
        // Interleaved on a permuted head equals Neox on the original head, permuted.
        let (d, pos) = (8, 5);
        let a = Rope::new(RopeStyle::Interleaved, d, 10000.0, 16);
        let b = Rope::new(RopeStyle::Neox, d, 10000.0, 16);
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

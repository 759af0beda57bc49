//! Turning one row of logits into the next token: penalties, temperature, top-k, top-p, min-p,
//! seeded randomness, and the log-probabilities clients ask for.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling settings of one sequence (OpenAI's names, plus llama.cpp's extras).
#[derive(Clone, Debug)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 means off.
    pub top_k: usize,
    pub min_p: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// 1.0 means off; applied to every token seen (prompt and output), as llama.cpp does.
    pub repetition_penalty: f32,
    pub logit_bias: HashMap<u32, f32>,
    pub seed: Option<u64>,
    /// Number of top alternatives to report per token (with `logprobs`).
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: HashMap::new(),
            seed: None,
            logprobs: None,
        }
    }
}

/// The log-probability of a chosen token and of the most likely alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    /// `(token id, logprob)`, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Per-sequence sampler state: its RNG and the counts the penalties need.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// How often each token appeared in the output so far.
    output_counts: HashMap<u32, u32>,
    /// Every token seen (prompt and output), for the repetition penalty.
    seen: std::collections::HashSet<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        let seen = if params.repetition_penalty != 1.0 {
            prompt.iter().copied().collect()
        } else {
            Default::default()
        };
        Self {
            params,
            rng,
            output_counts: HashMap::new(),
            seen,
        }
    }

    /// Choose the next token from `logits` (modified in place) and report logprobs if asked.
    pub fn sample(&mut self, logits: &mut [f32]) -> (u32, Option<TokenLogprobs>) {
        let want_lp = self.params.logprobs;
        // Logprobs describe the model's own distribution, before any sampling adjustment.
        let raw = want_lp.map(|k| (logits.to_vec(), log_sum_exp(logits), top_n(logits, k)));
        self.apply_penalties(logits);
        let token = if self.params.temperature <= 0.0 || self.params.top_k == 1 {
            argmax(logits)
        } else {
            self.sample_random(logits)
        };
        *self.output_counts.entry(token).or_insert(0) += 1;
        if self.params.repetition_penalty != 1.0 {
            self.seen.insert(token);
        }
        let lp = raw.map(|(raw, z, top)| TokenLogprobs {
            logprob: raw[token as usize] - z,
            top: top.into_iter().map(|(i, l)| (i, l - z)).collect(),
        });
        (token, lp)
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
        for (&t, &bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += bias;
            }
        }
        if p.repetition_penalty != 1.0 {
            for &t in &self.seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &c) in &self.output_counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * c as f32;
                }
            }
        }
    }

    fn sample_random(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let max = crate::ops::max(logits);
        let weight = |i: u32| weight_of(logits[i as usize], max, inv_t);
        // Every token's weight, computed once where the whole vocabulary is needed.
        let all_weights =
            || -> Vec<f32> { logits.iter().map(|&x| weight_of(x, max, inv_t)).collect() };
        let truncating = p.top_k > 0 || p.top_p < 1.0 || p.min_p > 0.0;
        if !truncating {
            return self.draw(&all_weights(), None);
        }
        // Candidates, most likely first. top_k (or a first guess of 256 for top_p / min_p)
        // bounds the sort; when the cut does not fall inside the guess, sort everything.
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
        let k = if p.top_k > 0 { p.top_k } else { 256 }.min(idx.len());
        if k < idx.len() {
            idx.select_nth_unstable_by(k - 1, by_logit);
        }
        let mut cand: Vec<u32> = idx[..k].to_vec();
        cand.sort_unstable_by(by_logit);
        let mut w: Vec<f32> = cand.iter().map(|&i| weight(i)).collect();
        // Mass the probabilities are normalised by: the top-k set, or the whole vocabulary.
        let mut total: f32 = w.iter().sum();
        if p.top_k == 0 && k < logits.len() {
            let all = all_weights();
            let z: f32 = crate::ops::sum(&all);
            let nucleus_inside = p.top_p >= 1.0 || total / z >= p.top_p;
            let min_p_inside = p.min_p <= 0.0 || w[k - 1] < p.min_p * w[0];
            if !(nucleus_inside && min_p_inside) {
                idx.sort_unstable_by(by_logit);
                cand = idx;
                w = cand.iter().map(|&i| all[i as usize]).collect();
            }
            total = z;
        }
        let mut keep = w.len();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, x) in w.iter().enumerate() {
                acc += x / total;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let floor = p.min_p * w[0];
            keep = keep.min(w.iter().take_while(|&&x| x >= floor).count().max(1));
        }
        self.draw(&w[..keep], Some(&cand))
    }

    /// Draw an index proportionally to `w`; map it through `ids` when given. An index of
    /// weight 0 (a token a grammar forbids) is never drawn, even when the random number is 0.
    fn draw(&mut self, w: &[f32], ids: Option<&[u32]>) -> u32 {
        let total = crate::ops::sum(w);
        let mut r = self.rng.random::<f32>() * total;
        // Past the end only by rounding: the last index that can be drawn.
        let mut pick = w.iter().rposition(|&x| x > 0.0).unwrap_or(w.len() - 1);
        for (i, x) in w.iter().enumerate() {
            r -= x;
            if r < 0.0 {
                pick = i;
                break;
            }
        }
        ids.map_or(pick as u32, |ids| ids[pick])
    }
}

/// A token's unnormalised probability, `exp((x - max) / t)`, with the vectorising
/// [`crate::ops::exp_nonpositive`] (relative error under 2e-7) in place of `expf` per token;
/// exactly 0 below `e^-87` (a forbidden token's negative infinity among them).
#[inline]
fn weight_of(x: f32, max: f32, inv_t: f32) -> f32 {
    let t = (x - max) * inv_t;
    let e = crate::ops::exp_nonpositive(t);
    if t > -87.0 {
        e
    } else {
        0.0
    }
}

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn log_sum_exp(v: &[f32]) -> f32 {
    let max = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    max + v.iter().map(|x| (x - max).exp()).sum::<f32>().ln()
}

/// The `n` largest entries as `(index, value)`, largest first.
fn top_n(v: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..v.len() as u32).collect();
    let n = n.min(v.len());
    let cmp = |a: &u32, b: &u32| v[*b as usize].total_cmp(&v[*a as usize]);
    if n > 0 && n < idx.len() {
        idx.select_nth_unstable_by(n - 1, cmp);
    }
    idx.truncate(n);
    idx.sort_unstable_by(cmp);
    idx.into_iter().map(|i| (i, v[i as usize])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        (0..1000)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0)
            .collect()
    }

    #[test]
    fn greedy_takes_the_argmax_and_reports_logprobs() {
        let params = SamplingParams {
            temperature: 0.0,
            logprobs: Some(3),
            ..Default::default()
        };
        let mut s = Sampler::new(params, &[]);
        let mut l = logits();
        let want = argmax(&l);
        let (tok, lp) = s.sample(&mut l);
        assert_eq!(tok, want);
        let lp = lp.unwrap();
        assert_eq!(lp.top.len(), 3);
        assert_eq!(lp.top[0].0, tok);
        assert!((lp.top[0].1 - lp.logprob).abs() < 1e-6);
        assert!(lp.top[0].1 >= lp.top[1].1 && lp.top[1].1 >= lp.top[2].1);
        assert!(lp.logprob < 0.0);
    }

    #[test]
    fn same_seed_same_tokens_and_top_k_bounds_choices() {
        let params = SamplingParams {
            temperature: 1.5,
            top_k: 5,
            seed: Some(7),
            ..Default::default()
        };
        let run = || {
            let mut s = Sampler::new(params.clone(), &[]);
            (0..50)
                .map(|_| s.sample(&mut logits()).0)
                .collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run());
        let allowed: Vec<u32> = top_n(&logits(), 5).into_iter().map(|x| x.0).collect();
        assert!(a.iter().all(|t| allowed.contains(t)));
        assert!(a.iter().collect::<std::collections::HashSet<_>>().len() > 1);
    }

    /// Full-vocabulary sampling follows the softmax (frequencies over 20,000 draws within a
    /// few standard deviations) and never draws a forbidden (negative infinity) token.
    #[test]
    fn plain_sampling_follows_the_softmax_and_skips_forbidden_tokens() {
        let params = SamplingParams {
            temperature: 0.5,
            seed: Some(3),
            ..Default::default()
        };
        let mut s = Sampler::new(params, &[]);
        let base = [f32::NEG_INFINITY, 0.0, 0.5, 1.0, f32::NEG_INFINITY, -0.5];
        let z: f64 = base.iter().map(|&x| (2.0 * x as f64).exp()).sum();
        let mut counts = [0usize; 6];
        let n = 20_000;
        for _ in 0..n {
            counts[s.sample(&mut base.clone()).0 as usize] += 1;
        }
        assert_eq!(
            (counts[0], counts[4]),
            (0, 0),
            "forbidden tokens drawn: {counts:?}"
        );
        for (i, &x) in base.iter().enumerate().filter(|(_, x)| x.is_finite()) {
            let p = (2.0 * x as f64).exp() / z;
            let sd = (n as f64 * p * (1.0 - p)).sqrt();
            let dev = (counts[i] as f64 - n as f64 * p).abs();
            assert!(
                dev < 5.0 * sd,
                "token {i}: {} draws, want {:.0}",
                counts[i],
                n as f64 * p
            );
        }
        assert_eq!(weight_of(f32::NEG_INFINITY, 1.0, 2.0), 0.0);
        assert_eq!(weight_of(1.0, 1.0, 2.0), 1.0);
    }

    #[test]
    fn top_p_and_min_p_keep_only_the_head() {
        // Two dominant tokens, the rest negligible.
        let mut base = vec![-20.0f32; 5000];
        base[10] = 5.0;
        base[20] = 5.0;
        for params in [
            SamplingParams {
                top_p: 0.9,
                seed: Some(1),
                ..Default::default()
            },
            SamplingParams {
                min_p: 0.5,
                seed: Some(1),
                ..Default::default()
            },
        ] {
            let mut s = Sampler::new(params, &[]);
            for _ in 0..40 {
                let t = s.sample(&mut base.clone()).0;
                assert!(t == 10 || t == 20, "{t}");
            }
        }
    }

    #[test]
    fn penalties_push_repeated_tokens_down() {
        let params = SamplingParams {
            temperature: 0.0,
            frequency_penalty: 2.0,
            ..Default::default()
        };
        let mut s = Sampler::new(params, &[]);
        let mut l = vec![0.0f32; 10];
        l[3] = 1.0;
        l[4] = 0.5;
        assert_eq!(s.sample(&mut l.clone()).0, 3);
        assert_eq!(s.sample(&mut l.clone()).0, 4);
        let rep = SamplingParams {
            temperature: 0.0,
            repetition_penalty: 3.0,
            ..Default::default()
        };
        let mut s = Sampler::new(rep, &[3]);
        assert_eq!(s.sample(&mut l).0, 4);
    }
}

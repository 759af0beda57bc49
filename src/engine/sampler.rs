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
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let weight = |i: u32| ((logits[i as usize] - max) * inv_t).exp();
        let truncating = p.top_k > 0 || p.top_p < 1.0 || p.min_p > 0.0;
        if !truncating {
            let w: Vec<f32> = (0..logits.len() as u32).map(weight).collect();
            return self.draw(&w, None);
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
            let z: f32 = (0..logits.len() as u32).map(weight).sum();
            let nucleus_inside = p.top_p >= 1.0 || total / z >= p.top_p;
            let min_p_inside = p.min_p <= 0.0 || w[k - 1] < p.min_p * w[0];
            if !(nucleus_inside && min_p_inside) {
                idx.sort_unstable_by(by_logit);
                cand = idx;
                w = cand.iter().map(|&i| weight(i)).collect();
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

    /// Draw an index proportionally to `w`; map it through `ids` when given.
    fn draw(&mut self, w: &[f32], ids: Option<&[u32]>) -> u32 {
        let total: f32 = w.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        let mut pick = w.len() - 1;
        for (i, x) in w.iter().enumerate() {
            r -= x;
            if r <= 0.0 {
                pick = i;
                break;
            }
        }
        ids.map_or(pick as u32, |ids| ids[pick])
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

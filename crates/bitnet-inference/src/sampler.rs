//! Picking the next token from a row of logits.
//!
//! The pipeline follows llama.cpp's usual chain, in this order: repetition penalty, top-k,
//! temperature and softmax, top-p, min-p, then a draw from a seeded generator. A temperature of
//! zero (or below) skips everything after the penalty and takes the argmax, so greedy decoding
//! is exact and reproducible.
//!
//! NaN logits are treated as negative infinity: a model bug must not turn into a panic or into
//! a NaN probability mass that silently picks token 0.

use crate::{Error, Result};

/// The knobs of [`Sampler`]. Values out of range are tolerated by [`Sampler::sample`] (see
/// each field); [`SamplerConfig::validate`] reports them for a caller that wants to refuse.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerConfig {
    /// Softmax temperature; `<= 0` (or NaN) means greedy argmax.
    pub temperature: f32,
    /// Keep only the `top_k` highest logits; 0 disables the filter.
    pub top_k: usize,
    /// Keep the smallest set of most probable tokens whose probabilities sum to at least
    /// `top_p`; `>= 1` disables the filter, `<= 0` keeps only the most probable token.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the largest; `<= 0` disables.
    pub min_p: f32,
    /// CTRL-style repetition penalty; 1 disables it. Ignored unless finite and positive.
    pub repeat_penalty: f32,
    /// How many of the most recent history tokens the penalty looks at; 0 disables it.
    pub repeat_last_n: usize,
    /// Seed of the random generator, so runs can be repeated exactly.
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 299_792_458,
        }
    }
}

impl SamplerConfig {
    /// Greedy decoding: always the most likely token, no penalty.
    pub fn greedy() -> Self {
        SamplerConfig {
            temperature: 0.0,
            ..SamplerConfig::default()
        }
    }

    /// Checks that every field is in its meaningful range, so a command line can reject a
    /// typo instead of sampling with a silently clamped value.
    pub fn validate(&self) -> Result<()> {
        if self.temperature.is_nan() || self.temperature.is_infinite() {
            return Err(Error::InvalidInput(format!(
                "temperature must be finite, got {}",
                self.temperature
            )));
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return Err(Error::InvalidInput(format!(
                "top_p must be in [0, 1], got {}",
                self.top_p
            )));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(Error::InvalidInput(format!(
                "min_p must be in [0, 1], got {}",
                self.min_p
            )));
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            return Err(Error::InvalidInput(format!(
                "repeat_penalty must be finite and positive, got {}",
                self.repeat_penalty
            )));
        }
        Ok(())
    }
}

/// One surviving token during a stochastic draw.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    id: u32,
    logit: f32,
    prob: f32,
}

/// Orders candidates by logit, highest first, breaking ties by the lower id so the result
/// never depends on the unstable sort.
fn by_logit_desc(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id))
}

/// xoshiro256** seeded through SplitMix64: small, fast, and good enough for sampling.
#[derive(Debug, Clone)]
struct Rng {
    s: [u64; 4],
}

impl Rng {
    fn new(seed: u64) -> Rng {
        // SplitMix64 spreads any seed, including 0, over a state that is never all zero.
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Rng {
            s: [next(), next(), next(), next()],
        }
    }

    fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Chooses tokens from logits according to a [`SamplerConfig`].
///
/// Holds the random state, so one sampler per generated sequence gives a reproducible
/// sequence for a given seed. After the first call, sampling allocates nothing: its working
/// buffers are kept and only grow.
#[derive(Debug, Clone)]
pub struct Sampler {
    cfg: SamplerConfig,
    rng: Rng,
    candidates: Vec<Candidate>,
    recent: Vec<u32>,
}

impl Sampler {
    /// A sampler with its generator seeded from `cfg.seed`.
    pub fn new(cfg: SamplerConfig) -> Sampler {
        let rng = Rng::new(cfg.seed);
        Sampler {
            cfg,
            rng,
            candidates: Vec::new(),
            recent: Vec::new(),
        }
    }

    /// The configuration this sampler was built with.
    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// Picks the next token id from `logits` (one per vocabulary entry).
    ///
    /// `history` is the sequence so far (prompt and generated tokens); its last
    /// `repeat_last_n` entries are penalised **in place** in `logits`, as llama.cpp does, so
    /// the caller sees the logits that were actually sampled from. History ids outside the
    /// vocabulary are ignored.
    ///
    /// Never panics. NaN logits count as negative infinity. When no logit is finite, or one
    /// is positive infinity, the draw is skipped and the argmax is returned (lowest id among
    /// ties, so 0 when all are NaN or negative infinity). Empty `logits` return 0.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        self.apply_repeat_penalty(logits, history);

        let t = self.cfg.temperature;
        if t.is_nan() || t <= 0.0 {
            return argmax(logits);
        }

        self.candidates.clear();
        let mut max_logit = f32::NEG_INFINITY;
        for (id, &logit) in logits.iter().enumerate() {
            // NaN and -inf can never be drawn; leaving them out keeps the softmax finite.
            if logit > f32::NEG_INFINITY {
                max_logit = max_logit.max(logit);
                self.candidates.push(Candidate {
                    id: id as u32,
                    logit,
                    prob: 0.0,
                });
            }
        }
        if self.candidates.is_empty() || max_logit == f32::INFINITY {
            return argmax(logits);
        }

        let k = self.cfg.top_k;
        let mut sorted = false;
        if k > 0 && k < self.candidates.len() {
            self.candidates.select_nth_unstable_by(k - 1, by_logit_desc);
            self.candidates.truncate(k);
        }
        // Top-p needs the descending order; without it, any fixed order draws the same.
        if self.cfg.top_p < 1.0 {
            self.candidates.sort_unstable_by(by_logit_desc);
            sorted = true;
        }

        let max_logit = self
            .candidates
            .iter()
            .fold(f32::NEG_INFINITY, |m, c| m.max(c.logit));
        let inv_t = 1.0 / t;
        let mut sum = 0.0f64;
        for c in self.candidates.iter_mut() {
            // With an infinite temperature an overflowing logit gap gives 0 * -inf = NaN;
            // the limit of that softmax is uniform, hence weight 1.
            let z = (c.logit - max_logit) * inv_t;
            c.prob = if z.is_nan() { 1.0 } else { z.exp() };
            sum += f64::from(c.prob);
        }
        let mut max_prob = 0.0f32;
        for c in self.candidates.iter_mut() {
            c.prob = (f64::from(c.prob) / sum) as f32;
            max_prob = max_prob.max(c.prob);
        }

        if sorted {
            let p = f64::from(self.cfg.top_p);
            let mut cumulative = 0.0f64;
            let mut keep = self.candidates.len();
            for (i, c) in self.candidates.iter().enumerate() {
                cumulative += f64::from(c.prob);
                if cumulative >= p {
                    keep = i + 1;
                    break;
                }
            }
            // Sorted descending, so the first candidate (the most probable) always survives.
            self.candidates.truncate(keep.max(1));
        }

        if self.cfg.min_p > 0.0 {
            let threshold = self.cfg.min_p * max_prob;
            // A min_p above 1 would drop everything; the most probable token always stays.
            let threshold = threshold.min(max_prob);
            self.candidates.retain(|c| c.prob >= threshold);
        }

        let total: f64 = self.candidates.iter().map(|c| f64::from(c.prob)).sum();
        let mut target = self.rng.next_f64() * total;
        for c in &self.candidates {
            target -= f64::from(c.prob);
            if target < 0.0 {
                return c.id;
            }
        }
        // Rounding can leave a sliver of mass past the last candidate; it belongs to the last.
        self.candidates.last().map_or(0, |c| c.id)
    }

    fn apply_repeat_penalty(&mut self, logits: &mut [f32], history: &[u32]) {
        let penalty = self.cfg.repeat_penalty;
        let n = self.cfg.repeat_last_n;
        if n == 0 || penalty == 1.0 || !(penalty.is_finite() && penalty > 0.0) {
            return;
        }
        let window = &history[history.len().saturating_sub(n)..];
        // Each distinct token is penalised once, however often it recurs.
        self.recent.clear();
        self.recent.extend_from_slice(window);
        self.recent.sort_unstable();
        self.recent.dedup();
        for &id in &self.recent {
            if let Some(l) = logits.get_mut(id as usize) {
                if *l > 0.0 {
                    *l /= penalty;
                } else {
                    *l *= penalty;
                }
            }
        }
    }
}

/// The index of the largest logit, lowest id among ties; NaN counts as negative infinity.
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_val = f32::NEG_INFINITY;
    for (i, &l) in logits.iter().enumerate() {
        if l > best_val {
            best = i;
            best_val = l;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(temperature: f32, top_k: usize, top_p: f32, min_p: f32) -> SamplerConfig {
        SamplerConfig {
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 7,
        }
    }

    fn counts(s: &mut Sampler, logits: &[f32], draws: usize) -> Vec<usize> {
        let mut c = vec![0; logits.len()];
        let mut buf = logits.to_vec();
        for _ in 0..draws {
            buf.copy_from_slice(logits);
            c[s.sample(&mut buf, &[]) as usize] += 1;
        }
        c
    }

    const LOGITS: [f32; 6] = [0.5, 2.0, -1.0, 1.9, 0.0, 1.0];

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplerConfig::greedy());
        assert_eq!(s.sample(&mut LOGITS.clone(), &[]), 1);
        // Ties go to the lowest id.
        assert_eq!(s.sample(&mut [0.0, 3.0, 3.0, 1.0], &[]), 1);
        // Negative temperature is greedy too.
        let mut s = Sampler::new(cfg(-1.0, 0, 1.0, 0.0));
        assert_eq!(s.sample(&mut LOGITS.clone(), &[]), 1);
    }

    #[test]
    fn top_k_one_is_argmax() {
        let mut s = Sampler::new(cfg(1.5, 1, 1.0, 0.0));
        let c = counts(&mut s, &LOGITS, 500);
        assert_eq!(c[1], 500);
    }

    #[test]
    fn tiny_top_p_is_argmax() {
        let mut s = Sampler::new(cfg(1.0, 0, 1e-6, 0.0));
        let c = counts(&mut s, &LOGITS, 500);
        assert_eq!(c[1], 500);
        let mut s = Sampler::new(cfg(1.0, 0, 0.0, 0.0));
        let c = counts(&mut s, &LOGITS, 100);
        assert_eq!(c[1], 100);
    }

    #[test]
    fn top_p_keeps_smallest_sufficient_prefix() {
        // Probabilities 0.5, 0.3, 0.2: top_p 0.8 keeps the first two (cumulative exactly 0.8
        // is within rounding, so use 0.79 to stay on the safe side), never the third.
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let mut s = Sampler::new(cfg(1.0, 0, 0.79, 0.0));
        let c = counts(&mut s, &logits, 20_000);
        assert_eq!(c[2], 0);
        // Renormalised over {0.5, 0.3}: token 0 has probability 0.625.
        let f = c[0] as f64 / 20_000.0;
        assert!((f - 0.625).abs() < 0.02, "{f}");
    }

    #[test]
    fn top_k_limits_support() {
        let mut s = Sampler::new(cfg(100.0, 3, 1.0, 0.0));
        let c = counts(&mut s, &LOGITS, 5_000);
        // The three highest logits are ids 1, 3 and 5; a near-flat temperature reaches all.
        for (id, &n) in c.iter().enumerate() {
            assert_eq!(n > 0, [1, 3, 5].contains(&id), "id {id}: {c:?}");
        }
    }

    #[test]
    fn min_p_excludes_low_probability_tokens() {
        // Probabilities proportional to 10, 5, 1, 0.5: with min_p 0.08 the threshold is
        // 0.8 in these units, so only ids 0, 1 and 2 survive.
        let logits = [10f32.ln(), 5f32.ln(), 1f32.ln(), 0.5f32.ln()];
        let mut s = Sampler::new(cfg(1.0, 0, 1.0, 0.08));
        let c = counts(&mut s, &logits, 20_000);
        assert_eq!(c[3], 0, "{c:?}");
        assert!(c[2] > 0, "{c:?}");
        // Renormalised over 16 units: token 2 gets 1/16.
        let f = c[2] as f64 / 20_000.0;
        assert!((f - 1.0 / 16.0).abs() < 0.01, "{f}");
    }

    #[test]
    fn draws_follow_softmax() {
        let logits = [1f32.ln(), 3f32.ln()];
        let mut s = Sampler::new(cfg(1.0, 0, 1.0, 0.0));
        let c = counts(&mut s, &logits, 20_000);
        let f = c[1] as f64 / 20_000.0;
        assert!((f - 0.75).abs() < 0.02, "{f}");
    }

    #[test]
    fn temperature_sharpens() {
        // At temperature 0.5 the weights 1:3 become 1:9, so token 1 has probability 0.9.
        let logits = [1f32.ln(), 3f32.ln()];
        let mut s = Sampler::new(cfg(0.5, 0, 1.0, 0.0));
        let c = counts(&mut s, &logits, 20_000);
        let f = c[1] as f64 / 20_000.0;
        assert!((f - 0.9).abs() < 0.015, "{f}");
    }

    #[test]
    fn repeat_penalty_changes_argmax() {
        let mut c = SamplerConfig::greedy();
        c.repeat_penalty = 2.0;
        c.repeat_last_n = 2;
        let mut s = Sampler::new(c);
        // Token 0 (3.0 -> 1.5) loses to token 1 (2.0); token 2 (-1.0 -> -2.0) is pushed down.
        let mut logits = [3.0, 2.0, -1.0, -1.5];
        assert_eq!(s.sample(&mut logits, &[0, 0, 2]), 1);
        // Penalised once per distinct token (0 appears twice in the window), in place.
        assert_eq!(logits, [1.5, 2.0, -2.0, -1.5]);
        // Only the last two history tokens count: token 3 is outside the window.
        let mut logits = [3.0, 2.0, -1.0, -1.5];
        assert_eq!(s.sample(&mut logits, &[3, 0, 0]), 1);
        assert_eq!(logits, [1.5, 2.0, -1.0, -1.5]);
        // Out-of-vocabulary history ids are ignored.
        let mut logits = [3.0, 2.0];
        assert_eq!(s.sample(&mut logits, &[9, 99]), 0);
        // Penalty 1 leaves the logits alone.
        let mut s = Sampler::new(SamplerConfig::greedy());
        let mut logits = [3.0, 2.0];
        assert_eq!(s.sample(&mut logits, &[0]), 0);
        assert_eq!(logits, [3.0, 2.0]);
    }

    #[test]
    fn seed_determines_sequence() {
        let flat = [0.0f32; 16];
        let run = |seed: u64| {
            let mut c = cfg(1.0, 0, 1.0, 0.0);
            c.seed = seed;
            let mut s = Sampler::new(c);
            (0..50)
                .map(|_| s.sample(&mut flat.clone(), &[]))
                .collect::<Vec<_>>()
        };
        let a = run(1);
        assert_eq!(a, run(1));
        assert_ne!(a, run(2));
        // A flat distribution over 16 tokens visits many of them in 50 draws.
        let mut seen = a.clone();
        seen.sort_unstable();
        seen.dedup();
        assert!(seen.len() > 8, "{seen:?}");
    }

    #[test]
    fn nan_and_infinite_logits_do_not_panic() {
        let mut s = Sampler::new(SamplerConfig::default());
        let mut g = Sampler::new(SamplerConfig::greedy());
        // NaN is never chosen while a finite logit exists.
        let row = [f32::NAN, -5.0, f32::NAN, -6.0];
        for _ in 0..200 {
            assert!(matches!(s.sample(&mut row.clone(), &[]), 1 | 3));
        }
        assert_eq!(g.sample(&mut row.clone(), &[]), 1);
        // Nothing finite: documented fallback is the lowest id.
        assert_eq!(s.sample(&mut [f32::NAN; 4], &[]), 0);
        assert_eq!(s.sample(&mut [f32::NEG_INFINITY; 4], &[]), 0);
        assert_eq!(g.sample(&mut [f32::NAN; 4], &[]), 0);
        // A +inf logit wins outright.
        assert_eq!(s.sample(&mut [0.0, f32::INFINITY, 1.0], &[]), 1);
        assert_eq!(s.sample(&mut [], &[]), 0);
        // Degenerate temperatures stay panic-free.
        let mut c = cfg(f32::NAN, 0, 1.0, 0.0);
        assert_eq!(Sampler::new(c.clone()).sample(&mut [0.0, 1.0], &[]), 1);
        c.temperature = f32::INFINITY;
        let id = Sampler::new(c).sample(&mut [0.0, 1.0, f32::NEG_INFINITY], &[]);
        assert!(id < 2);
    }

    #[test]
    fn default_and_validate() {
        let d = SamplerConfig::default();
        assert_eq!(d.temperature, 0.8);
        assert_eq!(d.top_k, 40);
        assert_eq!(d.repeat_penalty, 1.0);
        assert!(d.validate().is_ok());
        assert!(SamplerConfig::greedy().validate().is_ok());
        let bad = [
            SamplerConfig {
                top_p: 1.5,
                ..d.clone()
            },
            SamplerConfig {
                min_p: -0.1,
                ..d.clone()
            },
            SamplerConfig {
                temperature: f32::NAN,
                ..d.clone()
            },
            SamplerConfig {
                repeat_penalty: 0.0,
                ..d.clone()
            },
        ];
        for b in bad {
            assert!(matches!(b.validate(), Err(Error::InvalidInput(_))), "{b:?}");
        }
    }

    #[test]
    fn buffers_are_reused() {
        let mut s = Sampler::new(SamplerConfig {
            repeat_penalty: 1.1,
            ..SamplerConfig::default()
        });
        let logits: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
        let history: Vec<u32> = (0..100).collect();
        s.sample(&mut logits.clone(), &history);
        let caps = (s.candidates.capacity(), s.recent.capacity());
        for _ in 0..20 {
            s.sample(&mut logits.clone(), &history);
        }
        assert_eq!((s.candidates.capacity(), s.recent.capacity()), caps);
    }

    #[test]
    fn rng_matches_reference_vectors() {
        // SplitMix64 from seed 0 gives 0xE220A8397B1DCDAF first (Vigna's reference output),
        // which is s[0] here; checking it pins the seeding, so seeds mean the same forever.
        let r = Rng::new(0);
        assert_eq!(r.s[0], 0xE220_A839_7B1D_CDAF);
        let mut r = Rng::new(0);
        for _ in 0..1000 {
            let x = r.next_f64();
            assert!((0.0..1.0).contains(&x));
        }
    }
}

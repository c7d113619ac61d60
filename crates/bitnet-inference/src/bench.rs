//! Throughput measurement in the manner of llama-bench: prompt processing (one batched forward
//! pass of `p` tokens from an empty cache) and generation (`n` single-token steps from an empty
//! cache, or from a cache already holding an untimed prefix of `tg_prefix` tokens, where the
//! attention over a long context shows), each repeated, reported as medians with their spread.

use std::time::Instant;

use bitnet_core::{CpuFeatures, ScratchArena};

use crate::model::{LogitsFor, Model, SeqStep};
use crate::Result;

/// What to measure.
#[derive(Debug, Clone, Copy)]
pub struct BenchConfig {
    /// Prompt tokens per prompt-processing run (0 skips the phase).
    pub prompt_tokens: usize,
    /// Tokens per generation run (0 skips the phase).
    pub gen_tokens: usize,
    /// Tokens in the cache before each generation run (processed in one untimed batch).
    pub tg_prefix: usize,
    /// Runs of each phase.
    pub reps: usize,
}

/// Median and spread of a set of rates.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Rate {
    /// Median tokens per second.
    pub median: f64,
    /// Slowest run.
    pub min: f64,
    /// Fastest run.
    pub max: f64,
}

impl Rate {
    fn of(mut v: Vec<f64>) -> Option<Rate> {
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Rate {
            median,
            min: v[0],
            max: v[n - 1],
        })
    }
}

/// The measurements.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    /// Prompt tokens per run.
    pub prompt_tokens: usize,
    /// Generated tokens per run.
    pub gen_tokens: usize,
    /// Tokens in the cache before each generation run.
    pub tg_prefix: usize,
    /// Runs of each phase.
    pub reps: usize,
    /// Worker threads.
    pub threads: usize,
    /// Prompt processing rate, if measured.
    pub pp: Option<Rate>,
    /// Generation rate, if measured.
    pub tg: Option<Rate>,
    /// Weight bytes streamed per generated token (ternary layers and the head).
    pub bytes_per_token: usize,
    /// The kernel set used.
    pub kernels: String,
    /// The runtime layout of the ternary weights (`2bit` or `base3`).
    pub weight_layout: String,
    /// The CPU features detected.
    pub cpu_features: String,
}

impl BenchReport {
    /// Memory bandwidth the median generation rate implies, in GB/s.
    pub fn tg_bandwidth_gbs(&self) -> Option<f64> {
        self.tg
            .map(|r| r.median * self.bytes_per_token as f64 / 1e9)
    }
}

/// Deterministic token ids spread over the vocabulary (the content does not change the work).
fn bench_tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut s: u64 = seed;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab as u64) as u32
        })
        .collect()
}

/// Runs the benchmark on `model` with the current thread pool.
pub fn run_bench(model: &Model, cfg: &BenchConfig) -> Result<BenchReport> {
    let vocab = model.config().vocab_size;
    let reps = cfg.reps.max(1);
    let mut scratch = ScratchArena::new();
    let mut logits = vec![0f32; vocab];
    let capacity = cfg
        .prompt_tokens
        .max(cfg.tg_prefix.saturating_add(cfg.gen_tokens))
        .max(1);
    let max_positions = model.config().max_position_embeddings;
    if capacity > max_positions {
        return Err(crate::Error::InvalidInput(format!(
            "the benchmark needs {capacity} positions (-p {}, or --tg-prefix {} plus -n {}), \
             but the model's context is {max_positions}",
            cfg.prompt_tokens, cfg.tg_prefix, cfg.gen_tokens
        )));
    }
    let mut cache = model.new_cache(capacity)?;
    let prompt = bench_tokens(cfg.prompt_tokens, vocab, 0x9E37_79B9_7F4A_7C15);
    let gen = bench_tokens(cfg.gen_tokens, vocab, 0x9E37_79B9_7F4A_7C15);
    let prefix = bench_tokens(cfg.tg_prefix, vocab, 0xD1B5_4A32_D192_ED03);
    // Tokens per second feeding `tokens`, `step` at a time, after `prefix` (untimed).
    let mut rate = |prefix: &[u32], tokens: &[u32], step: usize| -> Result<f64> {
        cache.clear();
        if !prefix.is_empty() {
            model.forward(
                &mut [SeqStep {
                    tokens: prefix,
                    cache: &mut cache,
                    logits: LogitsFor::Last,
                }],
                &mut scratch,
                &mut logits,
            )?;
        }
        let t = Instant::now();
        for chunk in tokens.chunks(step) {
            model.forward(
                &mut [SeqStep {
                    tokens: chunk,
                    cache: &mut cache,
                    logits: LogitsFor::Last,
                }],
                &mut scratch,
                &mut logits,
            )?;
        }
        Ok(tokens.len() as f64 / t.elapsed().as_secs_f64())
    };
    // One untimed warm-up of each phase sizes the arena and faults the weights in.
    let mut pp = Vec::new();
    let mut tg = Vec::new();
    for rep in 0..=reps {
        if cfg.prompt_tokens > 0 {
            let r = rate(&[], &prompt, prompt.len())?;
            if rep > 0 {
                pp.push(r);
            }
        }
        if cfg.gen_tokens > 0 {
            let r = rate(&prefix, &gen, 1)?;
            if rep > 0 {
                tg.push(r);
            }
        }
    }
    Ok(BenchReport {
        prompt_tokens: cfg.prompt_tokens,
        gen_tokens: cfg.gen_tokens,
        tg_prefix: cfg.tg_prefix,
        reps,
        threads: rayon::current_num_threads(),
        pp: Rate::of(pp),
        tg: Rate::of(tg),
        bytes_per_token: model.weight_bytes_per_token(),
        kernels: model.kernels().name.to_string(),
        weight_layout: model.weight_layout().name().to_string(),
        cpu_features: CpuFeatures::get().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        let r = Rate::of(vec![3.0, 1.0, 2.0]).unwrap();
        assert_eq!((r.median, r.min, r.max), (2.0, 1.0, 3.0));
        assert_eq!(Rate::of(vec![4.0, 1.0, 2.0, 3.0]).unwrap().median, 2.5);
        assert!(Rate::of(vec![]).is_none());
        let t = bench_tokens(100, 7, 1);
        assert!(t.iter().all(|&x| x < 7) && t.iter().any(|&x| x != t[0]));
    }
}

//! Text generation: prompt in, streamed text out.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use bitnet_core::ScratchArena;

use crate::model::{LogitsFor, Model, SeqStep};
use crate::sampler::{Sampler, SamplerConfig};
use crate::tokenizer::{StreamDecoder, Tokenizer};
use crate::{Error, Result};

/// What to generate and how to sample it.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// The most tokens to generate after the prompt.
    pub max_tokens: usize,
    /// Sampling parameters (temperature, top-k, top-p, min-p, repetition penalty, seed).
    pub sampler: SamplerConfig,
    /// Stop at an end-of-sequence token (it is not printed).
    pub stop_at_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 128,
            sampler: SamplerConfig::default(),
            stop_at_eos: true,
        }
    }
}

/// Counts and timings of one generation.
#[derive(Debug, Clone, Default)]
pub struct GenerateStats {
    /// Tokens in the prompt (BOS included).
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub generated_tokens: usize,
    /// Time spent processing the prompt (up to the first sampled token).
    pub prompt_time: Duration,
    /// Time spent generating after the first token.
    pub generation_time: Duration,
    /// The generated token ids.
    pub tokens: Vec<u32>,
}

impl GenerateStats {
    /// Prompt tokens per second.
    pub fn prompt_tokens_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prompt_time.as_secs_f64().max(1e-9)
    }

    /// Generated tokens per second, counting the tokens after the first (whose cost is the
    /// prompt's).
    pub fn generation_tokens_per_s(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64
            / self.generation_time.as_secs_f64().max(1e-9)
    }
}

/// Generates text after `prompt` (tokenized with BOS as the tokenizer's template adds it),
/// calling `on_text` with each piece of text as soon as it forms whole characters; generation
/// stops early when `on_text` returns [`ControlFlow::Break`] (its reader has gone, say).
pub fn generate(
    model: &Model,
    tokenizer: &Tokenizer,
    prompt: &str,
    opts: &GenerateOptions,
    mut on_text: impl FnMut(&str) -> ControlFlow<()>,
) -> Result<GenerateStats> {
    let prompt_ids = tokenizer.encode(prompt, true)?;
    generate_from_ids(model, tokenizer, &prompt_ids, opts, &mut on_text)
}

/// [`generate`] from token ids.
pub fn generate_from_ids(
    model: &Model,
    tokenizer: &Tokenizer,
    prompt_ids: &[u32],
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
) -> Result<GenerateStats> {
    if prompt_ids.is_empty() {
        return Err(Error::InvalidInput(
            "the prompt is empty and the tokenizer adds no BOS token".into(),
        ));
    }
    opts.sampler.validate()?;
    let cfg = model.config();
    let mut cache = model.new_cache(prompt_ids.len() + opts.max_tokens)?;
    let mut scratch = ScratchArena::new();
    let mut logits = vec![0f32; cfg.vocab_size];
    let mut sampler = Sampler::new(opts.sampler.clone());
    let mut history: Vec<u32> = Vec::with_capacity(prompt_ids.len() + opts.max_tokens);
    history.extend_from_slice(prompt_ids);
    let mut decoder = StreamDecoder::new(true);
    let mut stats = GenerateStats {
        prompt_tokens: prompt_ids.len(),
        ..Default::default()
    };
    let start = Instant::now();
    let mut first_token_at = None;
    let mut pending: &[u32] = prompt_ids;
    let mut last = [0u32; 1];
    while stats.generated_tokens < opts.max_tokens {
        model.forward(
            &mut [SeqStep {
                tokens: pending,
                cache: &mut cache,
                logits: LogitsFor::Last,
            }],
            &mut scratch,
            &mut logits,
        )?;
        let next = sampler.sample(&mut logits, &history);
        if first_token_at.is_none() {
            first_token_at = Some(Instant::now());
        }
        if opts.stop_at_eos && cfg.eos_token_ids.contains(&next) {
            break;
        }
        stats.generated_tokens += 1;
        history.push(next);
        if let Some(text) = decoder.push(tokenizer, next)? {
            if on_text(&text).is_break() {
                break;
            }
        }
        last[0] = next;
        pending = &last;
    }
    if let Some(text) = decoder.finish(tokenizer)? {
        // The last piece: nothing is left to stop.
        let _ = on_text(&text);
    }
    let end = Instant::now();
    let first = first_token_at.unwrap_or(end);
    stats.prompt_time = first - start;
    stats.generation_time = end - first;
    stats.tokens = history[prompt_ids.len()..].to_vec();
    Ok(stats)
}

//! Perplexity of a model on a text, by independent non-overlapping windows.

use bitnet_core::ScratchArena;

use crate::model::{LogitsFor, Model, SeqStep};
use crate::{Error, Result};

/// The result of [`perplexity`].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PerplexityReport {
    /// Tokens scored (every token but the first of each window).
    pub n_tokens_scored: usize,
    /// Mean negative log-likelihood per scored token, in nats.
    pub mean_nll: f64,
    /// `exp(mean_nll)`.
    pub ppl: f64,
    /// Total NLL divided by the text's length in bytes: comparable across tokenizers.
    pub nats_per_byte: f64,
    /// Windows evaluated.
    pub windows: usize,
}

/// Scores `ids` (the tokenized text, BOS first) in consecutive non-overlapping windows of
/// `ctx` tokens, each an independent forward pass from an empty cache; the logits at position
/// `j` of a window score token `j + 1`. `text_bytes` is the text's length for nats per byte.
///
/// NLL is `logsumexp(logits) - logits[target]`, computed in f64 from the f32 logits.
pub fn perplexity(
    model: &Model,
    ids: &[u32],
    ctx: usize,
    text_bytes: usize,
) -> Result<PerplexityReport> {
    if ctx < 2 {
        return Err(Error::InvalidInput(format!(
            "the window must hold at least 2 tokens, got {ctx}"
        )));
    }
    let vocab = model.config().vocab_size;
    let mut cache = model.new_cache(ctx)?;
    let mut scratch = ScratchArena::new();
    let mut logits = vec![0f32; ctx * vocab];
    let (mut nll_sum, mut scored, mut windows) = (0f64, 0usize, 0usize);
    for window in ids.chunks(ctx) {
        cache.clear();
        let out = &mut logits[..window.len() * vocab];
        model.forward(
            &mut [SeqStep {
                tokens: window,
                cache: &mut cache,
                logits: LogitsFor::All,
            }],
            &mut scratch,
            out,
        )?;
        for (row, &target) in out.chunks_exact(vocab).zip(&window[1..]) {
            nll_sum += token_nll(row, target as usize);
            scored += 1;
        }
        windows += 1;
    }
    if scored == 0 {
        return Err(Error::InvalidInput(
            "the text is too short to score: it needs at least 2 tokens".into(),
        ));
    }
    let mean_nll = nll_sum / scored as f64;
    Ok(PerplexityReport {
        n_tokens_scored: scored,
        mean_nll,
        ppl: mean_nll.exp(),
        nats_per_byte: nll_sum / text_bytes.max(1) as f64,
        windows,
    })
}

/// `logsumexp(row) - row[target]` in f64.
fn token_nll(row: &[f32], target: usize) -> f64 {
    let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
    let s: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
    m + s.ln() - row[target] as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nll_closed_form() {
        // Uniform logits over 4 tokens: NLL = ln 4 for any target.
        let row = [0.5f32; 4];
        assert!((token_nll(&row, 2) - 4f64.ln()).abs() < 1e-12);
        let row = [0.0f32, 2f32.ln()];
        assert!((token_nll(&row, 1) - (3f64 / 2.0).ln()).abs() < 1e-7);
    }
}

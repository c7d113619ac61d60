//! Scoring text with a candle model the way `bitnet perplexity` scores it with the engine:
//! `<|endoftext|>` first, consecutive non-overlapping windows of `ctx` tokens, each scored
//! from an empty context; total NLL divided by the text's bytes.

use candle_core::{Tensor, D};
use tokenizers::Tokenizer;

use crate::model::Transformer;
use crate::{Result, TrainError};

/// Nats per byte and mean NLL per token of `text`.
pub fn nats_per_byte(
    model: &Transformer,
    tok: &Tokenizer,
    text: &str,
    ctx: usize,
) -> Result<(f64, f64)> {
    if ctx < 2 {
        return Err(TrainError::Invalid("ctx must be at least 2".into()));
    }
    let mut ids = vec![0u32];
    ids.extend(crate::data::encode(tok, text)?);
    let (mut nll, mut n) = (0f64, 0usize);
    for w in ids.chunks(ctx) {
        if w.len() < 2 {
            continue;
        }
        let t = Tensor::from_vec(w.to_vec(), (1, w.len()), model.device())?;
        let logits = model.forward(&t)?.squeeze(0)?; // [len, vocab]
        let logp =
            candle_nn::ops::log_softmax(&logits.to_dtype(candle_core::DType::F32)?, D::Minus1)?;
        let rows = logp.to_vec2::<f32>()?;
        for (row, &target) in rows.iter().zip(&w[1..]) {
            nll -= row[target as usize] as f64;
            n += 1;
        }
    }
    Ok((nll / text.len().max(1) as f64, nll / n.max(1) as f64))
}

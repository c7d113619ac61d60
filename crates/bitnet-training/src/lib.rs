//! Quantization-aware training of BitNet b1.58 models on candle.
//!
//! - [`bitlinear`]: the BitLinear layer with the straight-through estimator, usable in any
//!   candle model;
//! - [`model`]: the b1.58 transformer the engine runs, from a [`config::ModelShape`];
//! - [`attention`], [`fused`] and [`fused_linear`]: the CPU's fused operations (attention with
//!   RoPE and grouped KV heads, RMSNorm, cross-entropy, the gate, and BitLinear itself on the
//!   engine's integer kernels); a training step of the quantized model on the CPU
//!   ([`model::Transformer::loss_and_grads`]) runs each block as one operation built from them,
//!   with a hand-written backward pass;
//! - [`optim`] and [`config::Recipe`]: AdamW, clipping, BitNet's two-stage schedule (or cosine);
//! - [`data`]: byte-level BPE tokenizer training and shuffled windows;
//! - [`train`]: the loop with validation, logs and [`checkpoint`]s that resume bit for bit;
//! - [`plot`]: the loss curves of a run's `log.csv` as a PNG (`loss.png`).

pub mod attention;
pub mod bitlinear;
mod block;
pub mod checkpoint;
pub mod config;
pub mod data;
mod error;
pub mod eval;
pub mod export;
pub mod fused;
pub mod fused_linear;
pub mod model;
pub mod optim;
pub mod plot;
pub mod rng;
mod scratch;
#[cfg(test)]
mod testing;
pub mod train;

pub use error::{Result, TrainError};

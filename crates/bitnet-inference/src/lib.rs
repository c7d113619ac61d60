//! Loading and running BitNet b1.58 models.
//!
//! The data flows one way: [`formats`] opens and validates a model file, [`model::Model`]
//! maps its tensors onto the b1.58 transformer and repacks ternary weights once, the forward
//! pass produces logits for the positions asked for, [`sampler`] picks tokens and
//! [`tokenizer`] turns them into text.

pub mod bench;
pub mod builtin;
pub mod config;
pub mod convert;
pub mod formats;
pub mod generate;
pub mod kv_cache;
pub mod loader;
pub mod model;
pub mod npy;
pub mod perplexity;
pub mod sampler;
pub mod synth;
pub mod tokenizer;

pub use bitnet_core::{Error, Result};

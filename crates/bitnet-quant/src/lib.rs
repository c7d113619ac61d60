//! The numerics of BitNet b1.58: ternary weights {-1, 0, +1} and int8 activations.
//!
//! - [`quantize`]: the exact quantizers (absmean ternary weights, per-token absmax int8
//!   activations, round half to even).
//! - [`hf_packed`]: the Hugging Face packed layout (four 2-bit codes per byte, row blocks).
//! - [`TernaryMatrix`]: the runtime layout every kernel streams.
//! - [`kernels`]: ternary x int8 products behind one dispatch table, with the scalar reference.
//! - [`BitLinear`]: an inference linear layer built from the above.

pub mod bitlinear;
pub mod hf_packed;
pub mod kernels;
pub mod quantize;
pub mod ternary;

pub use bitlinear::{BitLinear, WeightScale};
pub use quantize::{quantize_activations, quantize_weights, weight_scale};
pub use ternary::{TernaryMatrix, BLOCK_BYTES, BLOCK_ELEMS};

/// Errors of the quantization layer are the workspace's one error type.
pub use bitnet_core::{Error, Result};

//! The numerics of BitNet b1.58: ternary weights {-1, 0, +1} and int8 activations.
//!
//! - [`quantize`]: the exact quantizers (absmean ternary weights, per-token absmax int8
//!   activations, round half to even).
//! - [`hf_packed`]: the Hugging Face packed layout (four 2-bit codes per byte, row blocks).
//! - [`tq`] and [`i2s`]: the GGUF ternary formats of llama.cpp (TQ1_0, TQ2_0) and bitnet.cpp
//!   (I2_S).
//! - [`TernaryMatrix`]: the runtime layout every kernel streams; [`Base3Matrix`] the denser
//!   one (1.6 bits per weight) for memory-bound decoding.
//! - [`kernels`]: ternary x int8 products behind one dispatch table, with the scalar reference.
//! - [`BitLinear`]: an inference linear layer built from the above.
//! - [`sgemm`]: f32 matrix products on the kernel sets' tiles (the trainer's gradients).

pub mod base3;
pub mod bitlinear;
pub mod hf_packed;
pub mod i2s;
pub mod kernels;
pub mod q6_k;
pub mod q8_0;
pub mod quantize;
pub mod sgemm;
pub mod ternary;
pub mod tq;

pub use base3::Base3Matrix;
pub use bitlinear::BlockScales;
pub use bitlinear::{BitLinear, PackedWeights, WeightLayout, WeightScale};
pub use quantize::{quantize_activations, quantize_weights, round_half_even_small, weight_scale};
pub use ternary::{
    block_offset, holds_code_3, TernaryMatrix, BLOCK_BYTES, BLOCK_ELEMS, ROW_GROUP, ZERO_BYTE,
};

/// Errors of the quantization layer are the workspace's one error type.
pub use bitnet_core::{Error, Result};

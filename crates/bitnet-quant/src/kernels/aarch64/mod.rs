//! AArch64 SIMD kernel sets. Each set is used only where the CPU reports its features, and each
//! safe entry point checks them again, so calling one on another CPU falls back to a set it can
//! run instead of executing unsupported instructions.

pub mod attention;
pub mod base3;
pub mod neon;
pub mod norm;
pub mod sgemm;

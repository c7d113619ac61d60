//! x86-64 SIMD kernel sets. Each set is used only where the CPU reports its features, and each
//! safe entry point checks them again, so calling one on another CPU falls back to [`scalar`]
//! instead of executing unsupported instructions.
//!
//! [`scalar`]: super::scalar

pub mod amx;
pub mod attention;
pub mod avx2;
pub mod avx512;
pub mod avxvnni;
pub mod base3;
pub mod norm;
pub mod sgemm;

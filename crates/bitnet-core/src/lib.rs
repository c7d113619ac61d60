//! Memory and machine foundations shared by every BitNet-Rust crate.
//!
//! - [`Storage`]: tensor bytes that live either in an aligned heap buffer or in a read-only
//!   memory map of the model file, so weights are never copied unless they must be repacked.
//! - [`DType`] and [`Shape`]: what the bytes mean.
//! - [`ScratchArena`]: the reusable working memory of a forward pass.
//! - [`CpuFeatures`]: what the CPU can do, detected once.
//! - [`Error`]: the one error type of the libraries.
//! - [`heap`]: allocator tuning for programs that churn through large buffers (training).

mod arena;
mod cpu;
mod dtype;
mod error;
pub mod heap;
mod shape;
mod storage;
mod threads;

pub use arena::ScratchArena;
pub use cpu::{cpu_model_name, CpuFeatures};
pub use dtype::DType;
pub use error::{Error, Result};
pub use shape::Shape;
pub use storage::{AlignedBuffer, MappedFile, Storage};
pub use threads::{default_thread_count, init_global_pool, ThreadPool};

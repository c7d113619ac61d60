//! Model file formats: validated, zero-copy readers.

pub mod gguf;
pub mod safetensors;

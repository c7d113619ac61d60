//! Model file formats: validated, zero-copy readers.

pub mod gguf;
pub mod gguf_tokenizer;
pub mod gguf_writer;
pub mod safetensors;

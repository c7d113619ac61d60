//! Helpers shared by the integration tests: fixture paths and reference readers.
#![allow(dead_code)]

use std::path::PathBuf;

use bitnet_core::ScratchArena;
use bitnet_inference::formats::safetensors::SafetensorsCheckpoint;
use bitnet_inference::model::{LogitsFor, Model, SeqStep};
use bitnet_inference::npy;

/// A path under the repo's copy of the tiny-bitnet fixtures.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../testdata/tiny-bitnet"
    ))
    .join(rel)
}

/// A reference safetensors file from `ref/`.
pub fn reference(name: &str) -> SafetensorsCheckpoint {
    let mut c = SafetensorsCheckpoint::default();
    c.add_file(&fixture(&format!("ref/{name}"))).unwrap();
    c
}

/// An f32 tensor of a reference file.
pub fn ref_f32(c: &SafetensorsCheckpoint, name: &str) -> Vec<f32> {
    c.get(name).unwrap().to_f32().unwrap()
}

/// An i8 tensor of a reference file.
pub fn ref_i8(c: &SafetensorsCheckpoint, name: &str) -> Vec<i8> {
    c.get(name)
        .unwrap()
        .storage
        .bytes()
        .iter()
        .map(|&b| b as i8)
        .collect()
}

/// A float32 .npy reference and its shape.
pub fn npy_f32(rel: &str) -> (Vec<usize>, Vec<f32>) {
    let a = npy::read(&fixture(rel)).unwrap();
    let shape = a.shape.clone();
    (shape, a.into_f32().unwrap())
}

/// The prompt's token ids (BOS first).
pub fn prompt_ids() -> Vec<u32> {
    npy::read(&fixture("ref/prompt_ids.npy"))
        .unwrap()
        .into_i64()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect()
}

/// Largest absolute difference between two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Logits of every position of `ids`, in one forward pass from an empty cache.
pub fn logits_all(m: &Model, ids: &[u32]) -> Vec<f32> {
    let mut cache = m.new_cache(ids.len()).unwrap();
    let mut out = vec![0.0; ids.len() * m.config().vocab_size];
    m.forward(
        &mut [SeqStep {
            tokens: ids,
            cache: &mut cache,
            logits: LogitsFor::All,
        }],
        &mut ScratchArena::new(),
        &mut out,
    )
    .unwrap();
    out
}

/// Logits of every position of `ids`, fed one token at a time through the KV cache.
pub fn logits_incremental(m: &Model, ids: &[u32]) -> Vec<f32> {
    let v = m.config().vocab_size;
    let mut cache = m.new_cache(ids.len()).unwrap();
    let mut out = vec![0.0; ids.len() * v];
    let mut scratch = ScratchArena::new();
    for (i, id) in ids.iter().enumerate() {
        m.forward(
            &mut [SeqStep {
                tokens: std::slice::from_ref(id),
                cache: &mut cache,
                logits: LogitsFor::Last,
            }],
            &mut scratch,
            &mut out[i * v..(i + 1) * v],
        )
        .unwrap();
    }
    out
}

//! The key/value cache of one sequence.

use half::f16;

use crate::config::ModelConfig;
use crate::{Error, Result};

/// How the cache stores keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvType {
    /// f32: exactly what the layers computed (the default; the reference's numbers).
    #[default]
    F32,
    /// f16 (llama.cpp's default): half the memory, and half the bytes each generated token
    /// reads back, which is most of a long context's cost; keys and values rounded to f16.
    F16,
}

impl KvType {
    /// Parses `f32` or `f16`.
    pub fn parse(s: &str) -> Result<KvType> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" => Ok(KvType::F32),
            "f16" => Ok(KvType::F16),
            other => Err(Error::InvalidInput(format!(
                "unknown KV cache type {other:?}: expected f32 or f16"
            ))),
        }
    }
}

/// The keys and values of one layer, `[capacity, kv_dim]` each.
#[derive(Debug, Clone, Copy)]
pub enum KvLayer<'a> {
    /// An f32 cache's rows.
    F32 {
        /// Keys (after RoPE).
        keys: &'a [f32],
        /// Values.
        values: &'a [f32],
    },
    /// An f16 cache's rows.
    F16 {
        /// Keys (after RoPE).
        keys: &'a [f16],
        /// Values.
        values: &'a [f16],
    },
}

#[derive(Debug, Clone)]
enum Store {
    F32 { k: Vec<f32>, v: Vec<f32> },
    F16 { k: Vec<f16>, v: Vec<f16> },
}

/// Keys and values (after RoPE) of every layer for the positions a sequence has seen.
///
/// Memory for `capacity` positions is allocated once, up front, so decoding never allocates.
/// Layout per layer: `[capacity, kv_heads * head_dim]`, positions contiguous.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: usize,
    kv_dim: usize,
    capacity: usize,
    len: usize,
    store: Store,
}

impl KvCache {
    /// An f32 cache for up to `capacity` positions of a model with configuration `cfg`.
    pub fn new(cfg: &ModelConfig, capacity: usize) -> Result<Self> {
        Self::with_type(cfg, capacity, KvType::F32)
    }

    /// A cache of `kv_type` for up to `capacity` positions of a model with configuration `cfg`.
    pub fn with_type(cfg: &ModelConfig, capacity: usize, kv_type: KvType) -> Result<Self> {
        let kv_dim = cfg.kv_dim();
        let per = capacity
            .checked_mul(kv_dim)
            .and_then(|n| n.checked_mul(cfg.num_layers))
            .ok_or_else(|| {
                Error::InvalidInput(format!("a KV cache of {capacity} positions is too large"))
            })?;
        Ok(KvCache {
            layers: cfg.num_layers,
            kv_dim,
            capacity,
            len: 0,
            store: match kv_type {
                KvType::F32 => Store::F32 {
                    k: vec![0.0; per],
                    v: vec![0.0; per],
                },
                KvType::F16 => Store::F16 {
                    k: vec![f16::ZERO; per],
                    v: vec![f16::ZERO; per],
                },
            },
        })
    }

    /// How keys and values are stored.
    pub fn kv_type(&self) -> KvType {
        match self.store {
            Store::F32 { .. } => KvType::F32,
            Store::F16 { .. } => KvType::F16,
        }
    }

    /// Positions stored so far (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most positions this cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Positions still free.
    pub fn remaining(&self) -> usize {
        self.capacity - self.len
    }

    /// Forgets every position (the memory is kept for the next sequence).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Forgets positions from `len` on (to rewind a sequence); no-op if already shorter.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Whether this cache fits a model with `cfg`'s layer count and KV width.
    pub fn fits(&self, cfg: &ModelConfig) -> bool {
        self.layers == cfg.num_layers && self.kv_dim == cfg.kv_dim()
    }

    pub(crate) fn advance(&mut self, n: usize) {
        debug_assert!(self.len + n <= self.capacity);
        self.len += n;
    }

    fn span(&self, layer: usize) -> std::ops::Range<usize> {
        let n = self.capacity * self.kv_dim;
        layer * n..(layer + 1) * n
    }

    /// Keys and values of `layer`, `[capacity, kv_dim]` each.
    pub fn layer(&self, layer: usize) -> KvLayer<'_> {
        let span = self.span(layer);
        match &self.store {
            Store::F32 { k, v } => KvLayer::F32 {
                keys: &k[span.clone()],
                values: &v[span],
            },
            Store::F16 { k, v } => KvLayer::F16 {
                keys: &k[span.clone()],
                values: &v[span],
            },
        }
    }

    /// Stores the key and value rows (`kv_dim` each) of `layer` at position `pos`, rounded to
    /// the cache's type.
    pub(crate) fn write_row(&mut self, layer: usize, pos: usize, key: &[f32], value: &[f32]) {
        let at = self.span(layer).start + pos * self.kv_dim;
        let rows = at..at + self.kv_dim;
        match &mut self.store {
            Store::F32 { k, v } => {
                k[rows.clone()].copy_from_slice(key);
                v[rows].copy_from_slice(value);
            }
            Store::F16 { k, v } => {
                for (d, &s) in k[rows.clone()].iter_mut().zip(key) {
                    *d = f16::from_f32(s);
                }
                for (d, &s) in v[rows].iter_mut().zip(value) {
                    *d = f16::from_f32(s);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_stored_in_the_cache_type() {
        let cfg = ModelConfig::from_hf_json(&serde_json::json!({
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32,
            "rms_norm_eps": 1e-5, "hidden_act": "relu2"
        }))
        .unwrap();
        let kvd = cfg.kv_dim();
        let key: Vec<f32> = (0..kvd).map(|i| i as f32 * 0.1 + 1e-4).collect();
        let value: Vec<f32> = (0..kvd).map(|i| -(i as f32) * 0.3).collect();
        for kv_type in [KvType::F32, KvType::F16] {
            let mut c = KvCache::with_type(&cfg, 3, kv_type).unwrap();
            assert_eq!(c.kv_type(), kv_type);
            c.write_row(1, 2, &key, &value);
            let at = 2 * kvd..3 * kvd;
            match (kv_type, c.layer(1)) {
                (KvType::F32, KvLayer::F32 { keys, values }) => {
                    assert_eq!(&keys[at.clone()], &key[..]);
                    assert_eq!(&values[at], &value[..]);
                }
                (KvType::F16, KvLayer::F16 { keys, values }) => {
                    for (i, (&k, &v)) in keys[at.clone()].iter().zip(&values[at]).enumerate() {
                        assert_eq!(k, f16::from_f32(key[i]));
                        assert_eq!(v, f16::from_f32(value[i]));
                    }
                }
                (t, _) => panic!("{t:?} cache gave the other type's rows"),
            }
        }
        assert_eq!(KvType::parse(" F16 ").unwrap(), KvType::F16);
        assert!(KvType::parse("q8_0")
            .unwrap_err()
            .to_string()
            .contains("f32 or f16"));
    }
}

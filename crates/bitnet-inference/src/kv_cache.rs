//! The key/value cache of one sequence.

use crate::config::ModelConfig;
use crate::{Error, Result};

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
    k: Vec<f32>,
    v: Vec<f32>,
}

impl KvCache {
    /// A cache for up to `capacity` positions of a model with configuration `cfg`.
    pub fn new(cfg: &ModelConfig, capacity: usize) -> Result<Self> {
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
            k: vec![0.0; per],
            v: vec![0.0; per],
        })
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

    /// Keys of `layer`, `[capacity, kv_dim]`.
    pub fn keys(&self, layer: usize) -> &[f32] {
        &self.k[self.span(layer)]
    }

    /// Values of `layer`, `[capacity, kv_dim]`.
    pub fn values(&self, layer: usize) -> &[f32] {
        &self.v[self.span(layer)]
    }

    /// Writable key and value rows of `layer` at position `pos`.
    pub(crate) fn row_mut(&mut self, layer: usize, pos: usize) -> (&mut [f32], &mut [f32]) {
        let at = layer * self.capacity * self.kv_dim + pos * self.kv_dim;
        (
            &mut self.k[at..at + self.kv_dim],
            &mut self.v[at..at + self.kv_dim],
        )
    }
}

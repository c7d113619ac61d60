//! Model shape and training recipe, with the presets `bitnet train --preset` offers.

use serde::{Deserialize, Serialize};

use crate::{Result, TrainError};

/// The transformer's shape: the same b1.58 architecture the engine runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelShape {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the feed-forward block.
    pub intermediate_size: usize,
    /// Transformer blocks.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Vocabulary size; the tokenizer is trained to this size.
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// RoPE base.
    pub rope_theta: f32,
    /// Whether the head is the embedding matrix.
    pub tie_word_embeddings: bool,
}

impl ModelShape {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Parameters in the model (embedding counted once when tied).
    pub fn param_count(&self) -> usize {
        let (d, f, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let kv = self.num_kv_heads * self.head_dim();
        let per_layer = 2 * d * d + 2 * d * kv + 3 * d * f + 3 * d + f;
        let head = if self.tie_word_embeddings { 0 } else { v * d };
        v * d + head + self.num_layers * per_layer + d
    }

    /// Checks that the shape is one the model and the exporters accept.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Invalid(m));
        if self.hidden_size == 0 || self.num_layers == 0 || self.intermediate_size == 0 {
            return bad("hidden_size, intermediate_size and num_layers must be positive".into());
        }
        if self.num_heads == 0 || !self.hidden_size.is_multiple_of(self.num_heads) {
            return bad(format!(
                "hidden_size {} is not a multiple of num_heads {}",
                self.hidden_size, self.num_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim()
            ));
        }
        if self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_heads {} is not a multiple of num_kv_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.vocab_size < 2 {
            return bad("vocab_size must be at least 2".into());
        }
        Ok(())
    }
}

/// How the learning rate and weight decay move over the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// BitNet b1.58's two stages: linear decay in each half with a drop at the midpoint;
    /// weight decay in the first half only.
    TwoStage,
    /// Cosine decay to `lr_final * lr` with constant weight decay (for full-precision models).
    Cosine,
}

/// The optimisation recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Optimizer steps.
    pub steps: u64,
    /// Sequences per step.
    pub batch_size: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warm-up steps from 0 to `lr`.
    pub warmup_steps: u64,
    /// Two-stage: the learning rate reached at the midpoint, as a fraction of `lr`.
    pub lr_stage1_end: f64,
    /// Two-stage: the learning rate right after the midpoint drop, as a fraction of `lr`.
    pub lr_stage2_start: f64,
    /// The learning rate at the last step, as a fraction of `lr`.
    pub lr_final: f64,
    /// Weight decay of the first stage (cosine: of the whole run).
    pub weight_decay: f64,
    /// AdamW beta1.
    pub beta1: f64,
    /// AdamW beta2.
    pub beta2: f64,
    /// AdamW epsilon.
    pub adam_eps: f64,
    /// Global gradient-norm clip (0 disables).
    pub grad_clip: f64,
    /// The schedule.
    pub schedule: ScheduleKind,
    /// `false` trains the full-precision twin: the same model with no quantizers.
    pub quantize: bool,
    /// Seed of the initialisation and the data order.
    pub seed: u64,
    /// Validation every this many steps (0: only at the end).
    pub eval_every: u64,
    /// Held-out windows scored per validation.
    pub eval_windows: usize,
    /// Checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: u64,
}

/// Everything a run is made from: shape and recipe. Written as `train_config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// The model.
    pub model: ModelShape,
    /// The recipe.
    pub recipe: Recipe,
}

impl TrainConfig {
    /// A named preset: `tiny` (seconds, for tests and smoke runs) or `default` (the built-in
    /// model's configuration).
    pub fn preset(name: &str) -> Result<TrainConfig> {
        match name {
            "tiny" => Ok(TrainConfig {
                model: ModelShape {
                    hidden_size: 64,
                    intermediate_size: 256,
                    num_layers: 2,
                    num_heads: 4,
                    num_kv_heads: 2,
                    vocab_size: 256 + 16,
                    rms_norm_eps: 1e-5,
                    rope_theta: 10000.0,
                    tie_word_embeddings: true,
                },
                recipe: Recipe {
                    steps: 200,
                    batch_size: 8,
                    seq_len: 64,
                    lr: 3e-3,
                    warmup_steps: 10,
                    ..Recipe::base()
                },
            }),
            "default" => Ok(TrainConfig {
                model: ModelShape {
                    hidden_size: 256,
                    intermediate_size: 768,
                    num_layers: 4,
                    num_heads: 8,
                    num_kv_heads: 4,
                    vocab_size: 2048,
                    rms_norm_eps: 1e-5,
                    rope_theta: 10000.0,
                    tie_word_embeddings: true,
                },
                recipe: Recipe {
                    steps: 6000,
                    batch_size: 16,
                    seq_len: 256,
                    lr: 3e-3,
                    warmup_steps: 200,
                    ..Recipe::base()
                },
            }),
            other => Err(TrainError::Invalid(format!(
                "unknown preset {other:?}: expected tiny or default"
            ))),
        }
    }

    /// Reads a JSON config file.
    pub fn from_file(path: &std::path::Path) -> Result<TrainConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
        let c: TrainConfig = serde_json::from_str(&text)
            .map_err(|e| TrainError::Invalid(format!("{}: {e}", path.display())))?;
        c.validate()?;
        Ok(c)
    }

    /// Checks shape and recipe.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        let r = &self.recipe;
        if r.steps == 0 || r.batch_size == 0 || r.seq_len < 2 {
            return Err(TrainError::Invalid(
                "steps and batch_size must be positive and seq_len at least 2".into(),
            ));
        }
        if !(r.lr > 0.0 && r.lr.is_finite()) {
            return Err(TrainError::Invalid(format!(
                "lr must be positive, got {}",
                r.lr
            )));
        }
        Ok(())
    }
}

impl Recipe {
    /// The settings every preset shares.
    fn base() -> Recipe {
        Recipe {
            steps: 1,
            batch_size: 1,
            seq_len: 2,
            lr: 1e-3,
            warmup_steps: 0,
            lr_stage1_end: 0.5,
            lr_stage2_start: 0.25,
            lr_final: 0.0,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            adam_eps: 1e-8,
            grad_clip: 1.0,
            schedule: ScheduleKind::TwoStage,
            quantize: true,
            seed: 1234,
            eval_every: 250,
            eval_windows: 32,
            checkpoint_every: 500,
        }
    }

    /// Learning rate and weight decay for optimizer step `step` (0-based).
    pub fn lr_wd(&self, step: u64) -> (f64, f64) {
        let total = self.steps.max(1) as f64;
        let s = step as f64;
        if step < self.warmup_steps {
            let wd = self.weight_decay;
            return (self.lr * (s + 1.0) / self.warmup_steps as f64, wd);
        }
        match self.schedule {
            ScheduleKind::TwoStage => {
                let mid = total / 2.0;
                if s < mid {
                    let w = self.warmup_steps as f64;
                    let t = ((s - w) / (mid - w).max(1.0)).clamp(0.0, 1.0);
                    let f = 1.0 + (self.lr_stage1_end - 1.0) * t;
                    (self.lr * f, self.weight_decay)
                } else {
                    let t = ((s - mid) / (total - mid - 1.0).max(1.0)).clamp(0.0, 1.0);
                    let f = self.lr_stage2_start + (self.lr_final - self.lr_stage2_start) * t;
                    (self.lr * f, 0.0)
                }
            }
            ScheduleKind::Cosine => {
                let w = self.warmup_steps as f64;
                let t = ((s - w) / (total - w - 1.0).max(1.0)).clamp(0.0, 1.0);
                let c = 0.5 * (1.0 + (std::f64::consts::PI * t).cos());
                let f = self.lr_final + (1.0 - self.lr_final) * c;
                (self.lr * f, self.weight_decay)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_stage_schedule_shape() {
        let mut r = TrainConfig::preset("default").unwrap().recipe;
        r.steps = 1000;
        r.warmup_steps = 100;
        assert_eq!(r.lr_wd(0).0, r.lr / 100.0);
        assert_eq!(r.lr_wd(99), (r.lr, 0.1));
        assert_eq!(r.lr_wd(100), (r.lr, 0.1));
        let (before, wd_before) = r.lr_wd(499);
        let (after, wd_after) = r.lr_wd(500);
        assert!((before - r.lr * r.lr_stage1_end).abs() < r.lr * 0.01);
        assert_eq!(after, r.lr * r.lr_stage2_start);
        assert_eq!((wd_before, wd_after), (0.1, 0.0));
        assert!((r.lr_wd(999).0 - r.lr * r.lr_final).abs() < 1e-12);
    }

    #[test]
    fn cosine_schedule_ends_at_final() {
        let mut r = TrainConfig::preset("tiny").unwrap().recipe;
        r.schedule = ScheduleKind::Cosine;
        r.lr_final = 0.1;
        let (lr_end, wd) = r.lr_wd(r.steps - 1);
        assert!((lr_end - 0.1 * r.lr).abs() < 1e-12);
        assert_eq!(wd, r.weight_decay);
        assert_eq!(r.lr_wd(r.warmup_steps).0, r.lr);
    }

    #[test]
    fn presets_validate_and_default_size() {
        for p in ["tiny", "default"] {
            TrainConfig::preset(p).unwrap().validate().unwrap();
        }
        let n = TrainConfig::preset("default").unwrap().model.param_count();
        assert!((3_000_000..=5_000_000).contains(&n), "{n}");
        assert!(TrainConfig::preset("huge").is_err());
    }
}

//! Checkpoints: latent weights, optimizer moments, schedule position and data cursor, enough
//! for `--resume` to continue bit for bit.
//!
//! A checkpoint is a folder with `state.safetensors` (parameters under their names, moments
//! under `adam.m.<name>` / `adam.v.<name>`) and `state.json`. Both are written to temporary
//! names and renamed, so an interruption while saving leaves the previous checkpoint intact.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::data::DataCursor;
use crate::model::Transformer;
use crate::optim::{AdamW, Moments};
use crate::{Result, TrainError};

/// The non-tensor part of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// Optimizer steps completed.
    pub step: u64,
    /// Where the data sampler stands.
    pub cursor: DataCursor,
    /// Training tokens consumed.
    pub tokens_seen: u64,
    /// Training seconds spent so far (all sessions).
    pub train_seconds: f64,
    /// The run's configuration.
    pub config: TrainConfig,
}

const STATE_FILE: &str = "state.safetensors";
const META_FILE: &str = "state.json";

/// Whether `dir` holds a checkpoint.
pub fn exists(dir: &Path) -> bool {
    dir.join(STATE_FILE).is_file() && dir.join(META_FILE).is_file()
}

/// Writes model, optimizer and `meta` to `dir`.
pub fn save(dir: &Path, model: &Transformer, opt: &AdamW, meta: &CheckpointMeta) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, v) in model.named_params() {
        tensors.insert(name, v.as_tensor().clone());
    }
    for (name, m) in opt.state() {
        tensors.insert(format!("adam.m.{name}"), m.m.clone());
        tensors.insert(format!("adam.v.{name}"), m.v.clone());
    }
    let tmp = dir.join("state.safetensors.tmp");
    candle_core::safetensors::save(&tensors, &tmp)?;
    let json = serde_json::to_string_pretty(meta).expect("meta serializes");
    let tmp_meta = dir.join("state.json.tmp");
    std::fs::write(&tmp_meta, json).map_err(|e| TrainError::io(&tmp_meta, e))?;
    let state = dir.join(STATE_FILE);
    std::fs::rename(&tmp, &state).map_err(|e| TrainError::io(&state, e))?;
    let meta_path = dir.join(META_FILE);
    std::fs::rename(&tmp_meta, &meta_path).map_err(|e| TrainError::io(&meta_path, e))?;
    Ok(())
}

/// Reads a checkpoint: the model, the optimizer (over the model's parameters) and the meta.
pub fn load(dir: &Path, device: &Device) -> Result<(Transformer, AdamW, CheckpointMeta)> {
    let meta_path = dir.join(META_FILE);
    let text = std::fs::read_to_string(&meta_path).map_err(|e| TrainError::io(&meta_path, e))?;
    let meta: CheckpointMeta = serde_json::from_str(&text)
        .map_err(|e| TrainError::Invalid(format!("{}: {e}", meta_path.display())))?;
    meta.config.validate()?;
    let mut tensors = candle_core::safetensors::load(dir.join(STATE_FILE), device)?;
    let shape = &meta.config.model;
    let mut take = |name: &str| {
        tensors.remove(name).ok_or_else(|| {
            TrainError::Invalid(format!("checkpoint {} lacks tensor {name}", dir.display()))
        })
    };
    let mut params = Vec::new();
    let mut moments = Vec::new();
    for (name, _) in Transformer::param_shapes(shape) {
        params.push((name.clone(), take(&name)?));
        moments.push(Moments {
            m: take(&format!("adam.m.{name}"))?,
            v: take(&format!("adam.v.{name}"))?,
        });
    }
    let model = Transformer::from_tensors(shape, meta.config.recipe.quantize, params, device)?;
    let r = &meta.config.recipe;
    let mut opt = AdamW::new(model.named_params(), r.beta1, r.beta2, r.adam_eps)?;
    opt.set_state(moments, meta.step)?;
    Ok((model, opt, meta))
}

//! Building a [`Model`] from a Hugging Face folder (FORMATS.md section 3).

use rayon::prelude::*;
use std::path::Path;

use bitnet_core::DType;
use bitnet_quant::{hf_packed, quantize_weights, BitLinear, TernaryMatrix, WeightScale};

use super::{DenseMatrix, Layer, Model};
use crate::config::{ModelConfig, WeightFormat};
use crate::formats::safetensors::{SafetensorsCheckpoint, TensorEntry};
use crate::{Error, Result};

fn float_vector(ckpt: &SafetensorsCheckpoint, name: &str, len: usize) -> Result<Vec<f32>> {
    let e = ckpt.get(name)?;
    e.expect_shape(&[len])?;
    e.to_f32()
}

fn dense(
    ckpt: &SafetensorsCheckpoint,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<DenseMatrix> {
    let e = ckpt.get(name)?;
    e.expect_shape(&[rows, cols])?;
    DenseMatrix::from_dtype(name, e.dtype, rows, cols, e.storage.clone())
}

/// The single value of a `weight_scale` tensor (shape `[1]` or `[]`).
fn scalar(e: &TensorEntry) -> Result<f32> {
    if e.numel() != 1 {
        return Err(Error::TensorShape {
            name: e.name.clone(),
            expected: vec![1],
            found: e.shape.clone(),
        });
    }
    let v = e.to_f32()?[0];
    if !(v.is_finite() && v > 0.0) {
        return Err(Error::InvalidInput(format!(
            "tensor `{}` holds the weight scale {v}; it must be positive and finite",
            e.name
        )));
    }
    Ok(v)
}

fn linear(
    ckpt: &SafetensorsCheckpoint,
    format: WeightFormat,
    prefix: &str,
    out: usize,
    cols: usize,
) -> Result<BitLinear> {
    let name = format!("{prefix}.weight");
    let e = ckpt.get(&name)?;
    match format {
        WeightFormat::Master => {
            e.expect_shape(&[out, cols])?;
            let w = e.to_f32()?;
            let (codes, s_w) = quantize_weights(&w);
            let m = TernaryMatrix::from_codes(&codes, out, cols)?;
            Ok(BitLinear::new(m, WeightScale::Inverse(s_w)))
        }
        WeightFormat::PackedInverseScale | WeightFormat::PackedDirectScale => {
            if e.dtype != DType::U8 {
                return Err(Error::TensorDType {
                    name,
                    expected: "U8 (packed ternary codes, as the config's quantization_config says)"
                        .into(),
                    found: e.dtype.to_string(),
                });
            }
            if !out.is_multiple_of(4) {
                return Err(Error::Config(format!(
                    "`{name}`: packed weights need out_features divisible by 4, got {out}"
                )));
            }
            e.expect_shape(&[out / 4, cols])?;
            let codes = hf_packed::unpack(e.storage.bytes(), out, cols)
                .map_err(|err| Error::InvalidInput(format!("tensor `{name}`: {err}")))?;
            let m = TernaryMatrix::from_codes(&codes, out, cols)?;
            let s = scalar(ckpt.get(&format!("{prefix}.weight_scale"))?)?;
            let scale = if format == WeightFormat::PackedInverseScale {
                WeightScale::Inverse(s)
            } else {
                WeightScale::Direct(s)
            };
            Ok(BitLinear::new(m, scale))
        }
    }
}

impl Model {
    /// Loads a Hugging Face BitNet folder: `config.json` (+ `generation_config.json` when
    /// present) and `model.safetensors` or its shards. Master weights are quantized here,
    /// once; packed weights are unpacked into the runtime layout.
    pub fn from_hf_folder(dir: &Path) -> Result<Model> {
        let mut cfg = ModelConfig::from_hf_file(&dir.join("config.json"))?;
        let gen = dir.join("generation_config.json");
        if gen.is_file() {
            cfg.apply_generation_config(&gen)?;
            cfg.validate()?;
        }
        let ckpt = SafetensorsCheckpoint::open_folder(dir)?;
        Self::from_checkpoint(cfg, &ckpt)
    }

    /// Builds the model from an opened checkpoint and its configuration.
    pub fn from_checkpoint(cfg: ModelConfig, ckpt: &SafetensorsCheckpoint) -> Result<Model> {
        let (h, qd, kvd, f, v) = (
            cfg.hidden_size,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.intermediate_size,
            cfg.vocab_size,
        );
        let embed = dense(ckpt, "model.embed_tokens.weight", v, h)?;
        let head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(dense(ckpt, "lm_head.weight", v, h)?)
        };
        let norm = float_vector(ckpt, "model.norm.weight", h)?;
        let fmt = cfg.weight_format;
        let layers = (0..cfg.num_layers)
            .into_par_iter()
            .map(|i| {
                let p = format!("model.layers.{i}");
                Ok(Layer {
                    attn_norm: float_vector(ckpt, &format!("{p}.input_layernorm.weight"), h)?,
                    q: linear(ckpt, fmt, &format!("{p}.self_attn.q_proj"), qd, h)?,
                    k: linear(ckpt, fmt, &format!("{p}.self_attn.k_proj"), kvd, h)?,
                    v: linear(ckpt, fmt, &format!("{p}.self_attn.v_proj"), kvd, h)?,
                    attn_sub_norm: float_vector(
                        ckpt,
                        &format!("{p}.self_attn.attn_sub_norm.weight"),
                        qd,
                    )?,
                    o: linear(ckpt, fmt, &format!("{p}.self_attn.o_proj"), h, qd)?,
                    ffn_norm: float_vector(
                        ckpt,
                        &format!("{p}.post_attention_layernorm.weight"),
                        h,
                    )?,
                    gate: linear(ckpt, fmt, &format!("{p}.mlp.gate_proj"), f, h)?,
                    up: linear(ckpt, fmt, &format!("{p}.mlp.up_proj"), f, h)?,
                    ffn_sub_norm: float_vector(ckpt, &format!("{p}.mlp.ffn_sub_norm.weight"), f)?,
                    down: linear(ckpt, fmt, &format!("{p}.mlp.down_proj"), h, f)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Model::new(cfg, embed, head, norm, layers)
    }
}

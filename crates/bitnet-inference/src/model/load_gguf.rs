//! Building a [`Model`] from a GGUF file: llama.cpp's `bitnet` architecture and bitnet.cpp's
//! `bitnet-b1.58` / `bitnet-25`, with TQ1_0, TQ2_0, I2_S or float linears (FORMATS.md
//! section 4).

use bitnet_quant::i2s::{decode_i2s, I2sLayout};
use bitnet_quant::tq::{repack_tq1_0, repack_tq2_0, RepackedTq, TQ_BLOCK};
use bitnet_quant::{quantize_weights, BitLinear, BlockScales, TernaryMatrix, WeightScale};
use rayon::prelude::*;

use super::{DenseFormat, DenseMatrix, Layer, Model};
use crate::config::{Activation, ModelConfig, WeightFormat};
use crate::formats::gguf::{GgmlType, GgufFile, GgufTensorInfo};
use crate::{Error, Result};

/// Architectures whose tensors and keys we map (`general.architecture`).
pub const GGUF_ARCHITECTURES: [&str; 3] = ["bitnet", "bitnet-b1.58", "bitnet-25"];

/// Choices a GGUF file cannot always express.
#[derive(Debug, Clone, Copy, Default)]
pub struct GgufOptions {
    /// The FFN activation, overriding `<arch>.hidden_activation` (1bitLLM-style models need
    /// SiLU, and llama.cpp's converter writes no key).
    pub activation: Option<Activation>,
    /// The block layout of I2_S tensors (the type id is shared by two layouts). `None`: the
    /// file's [`I2S_LAYOUT_KEY`] if it has one (files we write do), else x86.
    pub i2s_layout: Option<I2sLayout>,
}

/// Metadata key (after `<arch>.`) in which we record the I2_S block layout of files we write,
/// so a reader can tell; bitnet.cpp's own files do not have it.
pub const I2S_LAYOUT_KEY: &str = "i2s_block_layout";

/// The I2_S layout to read `g` with: the file's record and the user's choice must agree.
fn i2s_layout(g: &GgufFile, opts: &GgufOptions) -> Result<I2sLayout> {
    let arch = g.architecture().unwrap_or_default();
    let recorded = match g
        .get(&format!("{arch}.{I2S_LAYOUT_KEY}"))
        .and_then(|v| v.as_str())
    {
        Some(s) => Some(I2sLayout::parse(s)?),
        None => None,
    };
    match (recorded, opts.i2s_layout) {
        (Some(r), Some(u)) if r != u => Err(bad(
            g,
            format!("the file records I2_S layout {r:?}, but {u:?} was asked for"),
        )),
        (r, u) => Ok(u.or(r).unwrap_or_default()),
    }
}

fn bad(g: &GgufFile, reason: impl Into<String>) -> Error {
    Error::format(g.path(), reason)
}

/// Reads the model configuration from GGUF metadata.
pub fn config_from_gguf(g: &GgufFile, opts: &GgufOptions) -> Result<ModelConfig> {
    let arch = g
        .architecture()
        .ok_or_else(|| bad(g, "no general.architecture key"))?;
    if !GGUF_ARCHITECTURES.contains(&arch) {
        return Err(bad(
            g,
            format!(
                "architecture `{arch}` is not a BitNet model (expected one of {})",
                GGUF_ARCHITECTURES.join(", ")
            ),
        ));
    }
    let key = |k: &str| format!("{arch}.{k}");
    let req = |k: &str| -> Result<usize> { Ok(g.require_u64(&key(k))? as usize) };
    let opt_u = |k: &str| g.get(&key(k)).and_then(|v| v.as_u64()).map(|v| v as usize);
    let hidden = req("embedding_length")?;
    let heads = req("attention.head_count")?;
    if heads == 0 || hidden % heads != 0 && opt_u("attention.key_length").is_none() {
        return Err(Error::Config(format!(
            "embedding_length {hidden} is not divisible by head_count {heads}"
        )));
    }
    let embd = g
        .tensor("token_embd.weight")
        .ok_or_else(|| Error::MissingTensor {
            name: "token_embd.weight".into(),
        })?;
    let vocab = match opt_u("vocab_size") {
        Some(v) => v,
        None => *embd
            .dims
            .get(1)
            .ok_or_else(|| bad(g, "token_embd.weight is not 2-D"))? as usize,
    };
    if let Some(kind) = g.get(&key("rope.scaling.type")).and_then(|v| v.as_str()) {
        let factor = g
            .get(&key("rope.scaling.factor"))
            .and_then(|v| v.as_f32())
            .unwrap_or(1.0);
        if !(kind == "none" || factor == 1.0) {
            return Err(Error::Config(format!(
                "RoPE scaling `{kind}` with factor {factor} is not supported"
            )));
        }
    }
    let activation = match opts.activation {
        Some(a) => a,
        None => match g.get(&key("hidden_activation")).and_then(|v| v.as_str()) {
            Some(a) => Activation::parse(a)?,
            None => Activation::Relu2,
        },
    };
    let token = |k: &str| {
        g.get(&format!("tokenizer.ggml.{k}"))
            .and_then(|v| v.as_u64())
            .map(|v| v as u32)
    };
    let cfg = ModelConfig {
        hidden_size: hidden,
        intermediate_size: req("feed_forward_length")?,
        num_layers: req("block_count")?,
        num_heads: heads,
        num_kv_heads: opt_u("attention.head_count_kv").unwrap_or(heads),
        head_dim: opt_u("attention.key_length").unwrap_or(hidden / heads),
        vocab_size: vocab,
        rms_norm_eps: g
            .get(&key("attention.layer_norm_rms_epsilon"))
            .and_then(|v| v.as_f32())
            .unwrap_or(1e-5),
        rope_theta: g
            .get(&key("rope.freq_base"))
            .and_then(|v| v.as_f32())
            .unwrap_or(10000.0),
        max_position_embeddings: opt_u("context_length").unwrap_or(4096),
        tie_word_embeddings: g.tensor("output.weight").is_none(),
        activation,
        weight_format: WeightFormat::Master,
        bos_token_id: token("bos_token_id"),
        eos_token_ids: token("eos_token_id").into_iter().collect(),
    };
    cfg.validate()?;
    Ok(cfg)
}

/// The tensor `name`, checked to have ggml dims `[cols, rows]` (or `[cols]` when `rows` is
/// `None`).
fn tensor<'a>(
    g: &'a GgufFile,
    name: &str,
    cols: usize,
    rows: Option<usize>,
) -> Result<&'a GgufTensorInfo> {
    let t = g.tensor(name).ok_or_else(|| Error::MissingTensor {
        name: name.to_string(),
    })?;
    let want: Vec<u64> = std::iter::once(cols as u64)
        .chain(rows.map(|r| r as u64))
        .collect();
    if t.dims != want {
        // Report shapes outermost first, as everywhere else.
        return Err(Error::TensorShape {
            name: name.to_string(),
            expected: want.iter().rev().map(|&d| d as usize).collect(),
            found: t.dims.iter().rev().map(|&d| d as usize).collect(),
        });
    }
    Ok(t)
}

/// The dense format of a full-precision tensor, or an error naming it.
fn dense_format(t: &GgufTensorInfo) -> Result<DenseFormat> {
    Ok(match t.ggml_type {
        GgmlType::F32 => DenseFormat::F32,
        GgmlType::F16 => DenseFormat::F16,
        GgmlType::BF16 => DenseFormat::BF16,
        GgmlType::Q8_0 => DenseFormat::Q8_0,
        GgmlType::Q6_K => DenseFormat::Q6_K,
        other => {
            return Err(Error::TensorDType {
                name: t.name.clone(),
                expected: "F32, F16, BF16, Q8_0 or Q6_K".into(),
                found: other.name().to_string(),
            })
        }
    })
}

fn float_values(g: &GgufFile, t: &GgufTensorInfo) -> Result<Vec<f32>> {
    let format = dense_format(t)?;
    let n = t.n_elements() as usize;
    let m = DenseMatrix::new(&t.name, format, 1, n, g.tensor_storage(t)?)?;
    let mut out = vec![0f32; n];
    m.row_to_f32(0, &mut out);
    Ok(out)
}

fn norm(g: &GgufFile, name: &str, len: usize) -> Result<Vec<f32>> {
    float_values(g, tensor(g, name, len, None)?)
}

fn dense(g: &GgufFile, name: &str, rows: usize, cols: usize) -> Result<DenseMatrix> {
    let t = tensor(g, name, cols, Some(rows))?;
    let format = dense_format(t)?;
    DenseMatrix::new(name, format, rows, cols, g.tensor_storage(t)?)
}

/// Ternary weights with block scales: one per-tensor scale when every block that holds a
/// non-zero weight has the same step (files converted from BitNet models), else per block.
fn block_ternary_linear(tq: RepackedTq) -> Result<BitLinear> {
    let mut step = None;
    let mut uniform = true;
    for (&d, _) in tq.scales.iter().zip(&tq.nonzero).filter(|(_, &nz)| nz) {
        match step {
            None => step = Some(d),
            Some(s) if s.to_bits() == d.to_bits() => {}
            Some(_) => uniform = false,
        }
    }
    if uniform {
        return Ok(BitLinear::new(
            tq.matrix,
            WeightScale::Direct(step.unwrap_or(0.0)),
        ));
    }
    BitLinear::with_block_scales(
        tq.matrix,
        BlockScales {
            block: TQ_BLOCK,
            scales: tq.scales,
        },
    )
}

/// Float weights: ternary-valued ones (`{-a, 0, +a}`, written by converters from packed
/// models) keep `a` exactly as their step; others are quantized with the absmean formula.
fn float_linear(values: &[f32], rows: usize, cols: usize) -> Result<BitLinear> {
    let a = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    if a > 0.0 && values.iter().all(|&v| v == 0.0 || v.abs() == a) {
        let codes: Vec<i8> = values
            .iter()
            .map(|&v| {
                if v == 0.0 {
                    0
                } else if v > 0.0 {
                    1
                } else {
                    -1
                }
            })
            .collect();
        let m = TernaryMatrix::from_codes(&codes, rows, cols)?;
        return Ok(BitLinear::new(m, WeightScale::Direct(a)));
    }
    let (codes, s_w) = quantize_weights(values);
    let m = TernaryMatrix::from_codes(&codes, rows, cols)?;
    Ok(BitLinear::new(m, WeightScale::Inverse(s_w)))
}

fn linear(
    g: &GgufFile,
    layout: I2sLayout,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<BitLinear> {
    let t = tensor(g, name, cols, Some(rows))?;
    let named = |e: Error| Error::InvalidInput(format!("tensor `{name}`: {e}"));
    match t.ggml_type {
        GgmlType::TQ2_0 => {
            block_ternary_linear(repack_tq2_0(g.tensor_data(t), rows, cols).map_err(named)?)
        }
        GgmlType::TQ1_0 => {
            block_ternary_linear(repack_tq1_0(g.tensor_data(t), rows, cols).map_err(named)?)
        }
        GgmlType::I2_S => {
            let scale = g.i2s_scale(t)?;
            if !(scale.is_finite() && scale >= 0.0) {
                return Err(bad(
                    g,
                    format!("tensor `{name}` has the I2_S scale {scale}"),
                ));
            }
            let m = if layout == I2sLayout::X86 && cols.is_multiple_of(bitnet_quant::BLOCK_ELEMS) {
                // The x86 I2_S block is the runtime block: only the row groups need regrouping.
                TernaryMatrix::from_row_major(g.tensor_data(t), rows, cols)?
            } else {
                let codes = decode_i2s(g.tensor_data(t), rows * cols, layout).map_err(named)?;
                TernaryMatrix::from_codes(&codes, rows, cols)?
            };
            if m.bytes().iter().any(|&b| bitnet_quant::holds_code_3(b)) {
                return Err(bad(
                    g,
                    format!(
                        "tensor `{name}` holds the unused I2_S code 3: the file is corrupt or \
                         its layout is not {:?} (see --i2s-layout)",
                        layout
                    ),
                ));
            }
            Ok(BitLinear::new(m, WeightScale::Direct(scale)))
        }
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0 | GgmlType::Q6_K => {
            float_linear(&float_values(g, t)?, rows, cols)
        }
        other => Err(Error::TensorDType {
            name: name.into(),
            expected: "TQ1_0, TQ2_0, I2_S, F32, F16, BF16, Q8_0 or Q6_K".into(),
            found: other.name().to_string(),
        }),
    }
}

impl Model {
    /// Loads a BitNet model from an opened GGUF file.
    pub fn from_gguf(g: &GgufFile, opts: &GgufOptions) -> Result<Model> {
        let cfg = config_from_gguf(g, opts)?;
        let layout = i2s_layout(g, opts)?;
        let (h, qd, kvd, f, v) = (
            cfg.hidden_size,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.intermediate_size,
            cfg.vocab_size,
        );
        let embed = dense(g, "token_embd.weight", v, h)?;
        let head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(dense(g, "output.weight", v, h)?)
        };
        let out_norm = norm(g, "output_norm.weight", h)?;
        let layers = (0..cfg.num_layers)
            .into_par_iter()
            .map(|i| {
                let n = |s: &str| format!("blk.{i}.{s}.weight");
                Ok(Layer {
                    attn_norm: norm(g, &n("attn_norm"), h)?,
                    q: linear(g, layout, &n("attn_q"), qd, h)?,
                    k: linear(g, layout, &n("attn_k"), kvd, h)?,
                    v: linear(g, layout, &n("attn_v"), kvd, h)?,
                    attn_sub_norm: norm(g, &n("attn_sub_norm"), qd)?,
                    o: linear(g, layout, &n("attn_output"), h, qd)?,
                    ffn_norm: norm(g, &n("ffn_norm"), h)?,
                    gate: linear(g, layout, &n("ffn_gate"), f, h)?,
                    up: linear(g, layout, &n("ffn_up"), f, h)?,
                    ffn_sub_norm: norm(g, &n("ffn_sub_norm"), f)?,
                    down: linear(g, layout, &n("ffn_down"), h, f)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Model::new(cfg, embed, head, out_norm, layers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ternary_valued_floats_keep_their_step() {
        let a = 0.037f32;
        let l = float_linear(&[a, 0.0, -a, a], 1, 4).unwrap();
        assert_eq!(l.scale(), WeightScale::Direct(a));
        assert_eq!(l.weight().to_codes(), vec![1, 0, -1, 1]);
        // Not ternary-valued: absmean quantization.
        let l = float_linear(&[0.5, -0.25, 0.0, 1.0], 1, 4).unwrap();
        assert!(matches!(l.scale(), WeightScale::Inverse(_)));
    }

    #[test]
    fn uneven_block_scales_stay_per_block() {
        let tq = |codes: &[i8], scales: &[f32]| {
            let bytes = bitnet_quant::tq::encode_tq2_0(codes, scales, 1, 512).unwrap();
            repack_tq2_0(&bytes, 1, 512).unwrap()
        };
        let codes = vec![1i8; 512];
        let l = block_ternary_linear(tq(&codes, &[0.5, 0.25])).unwrap();
        assert!(l.block_scales().is_some());
        let mut zero_block = codes;
        zero_block[256..].fill(0);
        let l = block_ternary_linear(tq(&zero_block, &[0.5, 0.0])).unwrap();
        assert_eq!(l.scale(), WeightScale::Direct(0.5));
    }
}

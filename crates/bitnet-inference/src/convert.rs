//! Writing any loaded model as GGUF: TQ1_0, TQ2_0, I2_S or F16 linears, with the tokenizer,
//! the chat template and the FFN activation in the metadata.

use std::path::Path;

use bitnet_quant::i2s::{encode_i2s, i2s_trailer, I2sLayout};
use bitnet_quant::tq::{encode_tq1_0, encode_tq2_0, TQ_BLOCK};
use bitnet_quant::BitLinear;
use half::f16;

use crate::formats::gguf::{GgmlType, GgufValue};
use crate::formats::gguf_tokenizer::gguf_tokenizer_metadata;
use crate::formats::gguf_writer::GgufWriter;
use crate::loader::LoadedModel;
use crate::model::{DenseFormat, DenseMatrix, I2S_LAYOUT_KEY};
use crate::{Error, Result};

/// The type of the ternary linears in the written file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinearType {
    /// llama.cpp's base-3 packing, 1.69 bits a weight, one f16 scale per 256.
    Tq1_0,
    /// llama.cpp's 2-bit packing, one f16 scale per 256.
    Tq2_0,
    /// bitnet.cpp's 2-bit packing with one f32 scale per tensor.
    I2S,
    /// f16 values `code * step` (readable by every tool, 8x larger).
    F16,
}

impl LinearType {
    /// Parses `tq1_0`, `tq2_0`, `i2_s` or `f16`.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "tq1_0" => LinearType::Tq1_0,
            "tq2_0" => LinearType::Tq2_0,
            "i2_s" => LinearType::I2S,
            "f16" => LinearType::F16,
            other => {
                return Err(Error::InvalidInput(format!(
                    "unknown type `{other}` (expected tq1_0, tq2_0, i2_s or f16)"
                )))
            }
        })
    }

    /// llama.cpp's `general.file_type` for a file of this type (bitnet.cpp's for I2_S).
    fn file_type(self) -> u32 {
        match self {
            LinearType::F16 => 1,
            LinearType::Tq1_0 => 36,
            LinearType::Tq2_0 => 37,
            LinearType::I2S => 40,
        }
    }
}

/// The type of the embedding (and untied head) in the written file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbeddingType {
    /// f16 (what llama.cpp's converter writes).
    F16,
    /// ggml Q8_0.
    Q8_0,
    /// ggml Q6_K (rows a multiple of 256 values), llama.cpp's default for heads.
    #[allow(non_camel_case_types)] // ggml's name
    Q6_K,
    /// f32 (exact for f16/bf16/f32 sources).
    F32,
}

impl EmbeddingType {
    /// Parses `f16`, `q8_0`, `q6_k` or `f32`.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "f16" => EmbeddingType::F16,
            "q8_0" => EmbeddingType::Q8_0,
            "q6_k" => EmbeddingType::Q6_K,
            "f32" => EmbeddingType::F32,
            other => {
                return Err(Error::InvalidInput(format!(
                    "unknown embedding type `{other}` (expected f16, q8_0, q6_k or f32)"
                )))
            }
        })
    }
}

/// What to write.
#[derive(Debug, Clone, Copy)]
pub struct ConvertOptions {
    /// Type of the ternary linears.
    pub linear: LinearType,
    /// Type of the embedding and untied head.
    pub embedding: EmbeddingType,
    /// Block layout of I2_S output.
    pub i2s_layout: I2sLayout,
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| f16::from_f32(x).to_le_bytes())
        .collect()
}

fn dense_tensor(m: &DenseMatrix, ty: EmbeddingType) -> Result<(GgmlType, Vec<u8>)> {
    let (format, ggml) = match ty {
        EmbeddingType::F32 => (DenseFormat::F32, GgmlType::F32),
        EmbeddingType::F16 => (DenseFormat::F16, GgmlType::F16),
        EmbeddingType::Q8_0 => (DenseFormat::Q8_0, GgmlType::Q8_0),
        EmbeddingType::Q6_K => (DenseFormat::Q6_K, GgmlType::Q6_K),
    };
    let row_bytes = format.row_bytes(m.cols()).ok_or_else(|| {
        Error::InvalidInput(format!(
            "rows of {} values do not fit {} blocks",
            m.cols(),
            format.name()
        ))
    })?;
    let mut out = vec![0u8; m.rows() * row_bytes];
    m.encode_rows(format, &mut out);
    Ok((ggml, out))
}

/// One scale per 256-weight block: the layer's own, or its single step repeated.
fn tq_scales(lin: &BitLinear, name: &str) -> Result<Vec<f32>> {
    let (rows, cols) = (lin.out_features(), lin.in_features());
    if cols % TQ_BLOCK != 0 {
        return Err(Error::InvalidInput(format!(
            "`{name}` has {cols} inputs; TQ types need a multiple of {TQ_BLOCK} (use i2_s or f16)"
        )));
    }
    match lin.block_scales() {
        Some(bs) if bs.block == TQ_BLOCK => Ok(bs.scales.clone()),
        Some(bs) => Err(Error::InvalidInput(format!(
            "`{name}` has scales per {} weights, which TQ cannot hold",
            bs.block
        ))),
        None => Ok(vec![lin.scale().step(); rows * cols / TQ_BLOCK]),
    }
}

fn linear_tensor(
    lin: &BitLinear,
    name: &str,
    opts: &ConvertOptions,
) -> Result<(GgmlType, Vec<u8>)> {
    let (rows, cols) = (lin.out_features(), lin.in_features());
    let codes = lin.weight().to_codes();
    Ok(match opts.linear {
        LinearType::Tq2_0 => (
            GgmlType::TQ2_0,
            encode_tq2_0(&codes, &tq_scales(lin, name)?, rows, cols)?,
        ),
        LinearType::Tq1_0 => (
            GgmlType::TQ1_0,
            encode_tq1_0(&codes, &tq_scales(lin, name)?, rows, cols)?,
        ),
        LinearType::I2S => {
            if lin.block_scales().is_some() {
                return Err(Error::InvalidInput(format!(
                    "`{name}` has per-block scales, which I2_S (one scale per tensor) cannot hold"
                )));
            }
            let mut bytes = encode_i2s(&codes, opts.i2s_layout)
                .map_err(|e| Error::InvalidInput(format!("`{name}`: {e}")))?;
            bytes.extend_from_slice(&i2s_trailer(lin.scale().step()));
            (GgmlType::I2_S, bytes)
        }
        LinearType::F16 => {
            let per_row = lin.block_scales().map(|bs| (bs.block, &bs.scales));
            let step = lin.scale().step();
            let values: Vec<f32> = codes
                .iter()
                .enumerate()
                .map(|(i, &c)| {
                    let d = match per_row {
                        Some((block, s)) => s[(i / cols) * (cols / block) + (i % cols) / block],
                        None => step,
                    };
                    c as f32 * d
                })
                .collect();
            (GgmlType::F16, f16_bytes(&values))
        }
    })
}

/// Writes `m` as a GGUF file at `out`.
pub fn convert_to_gguf(m: &LoadedModel, opts: &ConvertOptions, out: &Path) -> Result<()> {
    let model = &m.model;
    let cfg = model.config();
    // bitnet.cpp reads I2_S under its own architecture name; llama.cpp reads TQ under `bitnet`.
    let arch = if opts.linear == LinearType::I2S {
        "bitnet-b1.58"
    } else {
        "bitnet"
    };
    let mut w = GgufWriter::new();
    let s = |v: &str| GgufValue::String(v.to_string());
    let u = |v: usize| -> Result<GgufValue> {
        u32::try_from(v)
            .map(GgufValue::U32)
            .map_err(|_| Error::InvalidInput(format!("{v} does not fit a GGUF u32")))
    };
    let name = m
        .source
        .file_stem()
        .and_then(|n| n.to_str())
        .unwrap_or("bitnet");
    w.add_metadata("general.architecture", s(arch))?;
    w.add_metadata("general.type", s("model"))?;
    w.add_metadata("general.name", s(name))?;
    w.add_metadata("general.file_type", GgufValue::U32(opts.linear.file_type()))?;
    w.add_metadata("general.quantization_version", GgufValue::U32(2))?;
    let k = |key: &str| format!("{arch}.{key}");
    w.add_metadata(k("vocab_size"), u(cfg.vocab_size)?)?;
    w.add_metadata(k("context_length"), u(cfg.max_position_embeddings)?)?;
    w.add_metadata(k("embedding_length"), u(cfg.hidden_size)?)?;
    w.add_metadata(k("feed_forward_length"), u(cfg.intermediate_size)?)?;
    w.add_metadata(k("block_count"), u(cfg.num_layers)?)?;
    w.add_metadata(k("attention.head_count"), u(cfg.num_heads)?)?;
    w.add_metadata(k("attention.head_count_kv"), u(cfg.num_kv_heads)?)?;
    w.add_metadata(k("attention.key_length"), u(cfg.head_dim)?)?;
    w.add_metadata(k("attention.value_length"), u(cfg.head_dim)?)?;
    w.add_metadata(k("rope.dimension_count"), u(cfg.head_dim)?)?;
    w.add_metadata(k("rope.freq_base"), GgufValue::F32(cfg.rope_theta))?;
    w.add_metadata(
        k("attention.layer_norm_rms_epsilon"),
        GgufValue::F32(cfg.rms_norm_eps),
    )?;
    w.add_metadata(k("hidden_activation"), s(cfg.activation.name()))?;
    if opts.linear == LinearType::I2S {
        let layout = match opts.i2s_layout {
            I2sLayout::X86 => "x86",
            I2sLayout::Arm => "arm",
        };
        w.add_metadata(k(I2S_LAYOUT_KEY), s(layout))?;
    }
    let eos = cfg.eos_token_ids.first().copied();
    for (key, value) in gguf_tokenizer_metadata(&m.tokenizer, cfg.bos_token_id, eos)? {
        w.add_metadata(key, value)?;
    }
    if let Some(t) = &m.chat_template {
        w.add_metadata("tokenizer.chat_template", s(t))?;
    }

    let h = cfg.hidden_size as u64;
    let (ety, ebytes) = dense_tensor(model.embedding(), opts.embedding)?;
    w.add_tensor(
        "token_embd.weight",
        &[h, cfg.vocab_size as u64],
        ety,
        ebytes,
    )?;
    if !cfg.tie_word_embeddings {
        let (ty, bytes) = dense_tensor(model.head(), opts.embedding)?;
        w.add_tensor("output.weight", &[h, cfg.vocab_size as u64], ty, bytes)?;
    }
    w.add_tensor(
        "output_norm.weight",
        &[h],
        GgmlType::F32,
        f32_bytes(model.final_norm()),
    )?;
    for (i, layer) in model.layers().iter().enumerate() {
        let norms = [
            ("attn_norm", &layer.attn_norm),
            ("attn_sub_norm", &layer.attn_sub_norm),
            ("ffn_norm", &layer.ffn_norm),
            ("ffn_sub_norm", &layer.ffn_sub_norm),
        ];
        for (n, v) in norms {
            w.add_tensor(
                format!("blk.{i}.{n}.weight"),
                &[v.len() as u64],
                GgmlType::F32,
                f32_bytes(v),
            )?;
        }
        let names = [
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ];
        for (n, (_, lin)) in names.iter().zip(layer.linears()) {
            let tname = format!("blk.{i}.{n}.weight");
            let (ty, bytes) = linear_tensor(lin, &tname, opts)?;
            w.add_tensor(
                tname,
                &[lin.in_features() as u64, lin.out_features() as u64],
                ty,
                bytes,
            )?;
        }
    }
    w.write_to(out)
}

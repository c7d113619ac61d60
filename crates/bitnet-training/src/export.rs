//! Export of a trained b1.58 model to the formats the engine (and transformers, llama.cpp)
//! read: a Hugging Face folder with packed `bitlinear` weights, and GGUF.
//!
//! The HF folder is lossless: the codes are those of the forward pass and each
//! `weight_scale` is the forward pass's `s_w` in f32 (the `bitlinear` format stores the
//! inverse of the step), norms and embedding stay f32. GGUF goes through the engine's writer
//! from that folder, so its caveats apply (TQ1_0/TQ2_0 store each step as f16; I2_S keeps f32).

use std::collections::HashMap;
use std::path::Path;

use bitnet_inference::convert::{convert_to_gguf, ConvertOptions};
use bitnet_inference::loader::{self, LoadOptions};
use candle_core::Tensor;
use serde_json::json;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::Tokenizer;

use crate::bitlinear::ternary_codes;
use crate::data::EOS_TOKEN;
use crate::model::Transformer;
use crate::{Result, TrainError};

/// Encoded tensor bytes for `safetensors::serialize_to_file`.
struct Raw {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &Raw {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn f32_raw(t: &Tensor) -> Result<Raw> {
    let v = t.flatten_all()?.to_vec1::<f32>()?;
    Ok(Raw {
        dtype: safetensors::Dtype::F32,
        shape: t.dims().to_vec(),
        data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    })
}

/// The ternary codes (`[out, in]` row-major, -1/0/1) and `s_w` of a latent weight, exactly as
/// the forward pass quantizes it.
pub fn linear_codes(w: &Tensor) -> Result<(Vec<i8>, f32)> {
    let (codes, s) = ternary_codes(w)?;
    let codes = codes
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|c| c as i8)
        .collect();
    Ok((codes, s.to_scalar::<f32>()?))
}

/// The run's tokenizer with `<|endoftext|>` put first by its post-processor: models trained
/// here see that separator before every document, so generation and scoring start with it.
pub fn tokenizer_with_bos(tok: &Tokenizer) -> Result<Tokenizer> {
    let mut tok = tok.clone();
    let template = TemplateProcessing::builder()
        .try_single(format!("{EOS_TOKEN} $A"))
        .and_then(|b| {
            b.special_tokens(vec![(EOS_TOKEN, 0u32)])
                .build()
                .map_err(|e| e.to_string())
        })
        .map_err(TrainError::Tokenizer)?;
    tok.with_post_processor(Some(template));
    Ok(tok)
}

/// Writes `model` as a Hugging Face BitNet folder: `config.json` (with `quantization_config`
/// `bitlinear` / `offline`), `generation_config.json`, `model.safetensors` (uint8 packed
/// linears `[out / 4, in]` with f32 `weight_scale = s_w`, f32 norms and embedding) and
/// `tokenizer.json`. `max_positions` is the context the config advertises.
pub fn export_hf(
    model: &Transformer,
    tok: &Tokenizer,
    max_positions: usize,
    dir: &Path,
) -> Result<()> {
    if !model.is_quantized() {
        return Err(TrainError::Invalid(
            "only b1.58 (quantized) models export to the BitNet formats; this is a \
             full-precision twin"
                .into(),
        ));
    }
    let s = model.shape();
    for (name, dims) in Transformer::param_shapes(s) {
        if dims.len() == 2 && name.contains("layers.") && dims[0] % 4 != 0 {
            return Err(TrainError::Invalid(format!(
                "{name} has {} outputs; the packed format needs a multiple of 4",
                dims[0]
            )));
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    let mut tensors: Vec<(String, Raw)> = Vec::new();
    for (name, var) in model.named_params() {
        let t = var.as_tensor();
        let is_linear = t.rank() == 2 && name.contains(".layers.");
        if !is_linear {
            tensors.push((name, f32_raw(t)?));
            continue;
        }
        let (out, cols) = t.dims2()?;
        let (codes, s_w) = linear_codes(t)?;
        let packed = bitnet_quant::hf_packed::pack(&codes, out, cols)
            .map_err(|e| TrainError::Invalid(format!("{name}: {e}")))?;
        let scale_name = name.replace(".weight", ".weight_scale");
        tensors.push((
            name,
            Raw {
                dtype: safetensors::Dtype::U8,
                shape: vec![out / 4, cols],
                data: packed,
            },
        ));
        tensors.push((
            scale_name,
            Raw {
                dtype: safetensors::Dtype::F32,
                shape: vec![1],
                data: s_w.to_le_bytes().to_vec(),
            },
        ));
    }
    let st_path = dir.join("model.safetensors");
    let info = HashMap::from([("format".to_string(), "pt".to_string())]);
    let views: Vec<(&str, &Raw)> = tensors.iter().map(|(n, r)| (n.as_str(), r)).collect();
    safetensors::serialize_to_file(views, Some(info), &st_path)
        .map_err(|e| TrainError::Invalid(format!("cannot write {}: {e}", st_path.display())))?;

    let config = json!({
        "architectures": ["BitNetForCausalLM"],
        "model_type": "bitnet",
        "attention_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "hidden_act": "relu2",
        "hidden_size": s.hidden_size,
        "head_dim": s.head_dim(),
        "initializer_range": 0.02,
        "intermediate_size": s.intermediate_size,
        "max_position_embeddings": max_positions,
        "num_attention_heads": s.num_heads,
        "num_hidden_layers": s.num_layers,
        "num_key_value_heads": s.num_kv_heads,
        "rms_norm_eps": s.rms_norm_eps,
        "rope_theta": s.rope_theta,
        "tie_word_embeddings": s.tie_word_embeddings,
        "torch_dtype": "float32",
        "use_cache": true,
        "vocab_size": s.vocab_size,
        "quantization_config": {
            "quant_method": "bitnet",
            "linear_class": "bitlinear",
            "quantization_mode": "offline"
        }
    });
    crate::train::write_json(&dir.join("config.json"), &config)?;
    crate::train::write_json(
        &dir.join("generation_config.json"),
        &json!({ "bos_token_id": 0, "eos_token_id": 0 }),
    )?;
    let tok_path = dir.join("tokenizer.json");
    tokenizer_with_bos(tok)?
        .save(&tok_path, true)
        .map_err(|e| TrainError::Tokenizer(format!("{}: {e}", tok_path.display())))?;
    Ok(())
}

/// Writes a GGUF file from an exported HF folder with the engine's converter.
pub fn export_gguf(hf_dir: &Path, opts: &ConvertOptions, out: &Path) -> Result<()> {
    let loaded = loader::load(hf_dir, &LoadOptions::default())?;
    convert_to_gguf(&loaded, opts, out)?;
    Ok(())
}

/// A finished run read back: its configuration, final model and tokenizer.
pub struct FinishedRun {
    /// `train_config.json`.
    pub config: crate::config::TrainConfig,
    /// The model of `model.safetensors`.
    pub model: Transformer,
    /// `tokenizer.json`.
    pub tokenizer: Tokenizer,
}

/// Reads the final model of the run in `dir`.
pub fn load_run(dir: &Path) -> Result<FinishedRun> {
    let config: crate::config::TrainConfig =
        crate::train::read_json(&dir.join("train_config.json"))?;
    config.validate()?;
    let weights = dir.join("model.safetensors");
    if !weights.is_file() {
        return Err(TrainError::Invalid(format!(
            "{} has no model.safetensors: the run has not finished (resume it with --resume)",
            dir.display()
        )));
    }
    let device = candle_core::Device::Cpu;
    let mut tensors = candle_core::safetensors::load(&weights, &device)?;
    let mut named = Vec::new();
    for (name, _) in Transformer::param_shapes(&config.model) {
        let t = tensors.remove(&name).ok_or_else(|| {
            TrainError::Invalid(format!("{} lacks tensor {name}", weights.display()))
        })?;
        named.push((name, t));
    }
    let model = Transformer::from_tensors(&config.model, config.recipe.quantize, named, &device)?;
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = Tokenizer::from_file(&tok_path)
        .map_err(|e| TrainError::Tokenizer(format!("{}: {e}", tok_path.display())))?;
    Ok(FinishedRun {
        config,
        model,
        tokenizer,
    })
}

/// What [`export_run`] wrote.
#[derive(Debug, Clone)]
pub struct ExportedFiles {
    /// The HF folder.
    pub hf: std::path::PathBuf,
    /// GGUF files written (I2_S always; TQ2_0 when every linear's width allows it).
    pub gguf: Vec<std::path::PathBuf>,
}

/// Exports the finished b1.58 run in `dir` to `dir/hf` and GGUF files `dir/model-i2_s.gguf`
/// (lossless scales) and `dir/model-tq2_0.gguf` (when all input widths are multiples of 256).
pub fn export_run(dir: &Path) -> Result<ExportedFiles> {
    use bitnet_inference::convert::{EmbeddingType, LinearType};
    let run = load_run(dir)?;
    let hf = dir.join("hf");
    export_hf(&run.model, &run.tokenizer, run.config.recipe.seq_len, &hf)?;
    let mut gguf = Vec::new();
    let s = &run.config.model;
    let mut kinds = vec![(LinearType::I2S, "i2_s")];
    if s.hidden_size % 256 == 0 && s.intermediate_size % 256 == 0 {
        kinds.push((LinearType::Tq2_0, "tq2_0"));
    }
    for (linear, name) in kinds {
        let path = dir.join(format!("model-{name}.gguf"));
        let opts = ConvertOptions {
            linear,
            embedding: EmbeddingType::F32,
            i2s_layout: bitnet_quant::i2s::I2sLayout::X86,
        };
        export_gguf(&hf, &opts, &path)?;
        gguf.push(path);
    }
    Ok(ExportedFiles { hf, gguf })
}

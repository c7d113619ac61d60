//! One entry point that opens any model we can run, with its tokenizer.

use std::path::{Path, PathBuf};

use crate::formats::gguf::GgufFile;
use crate::formats::gguf_tokenizer::{chat_template, tokenizer_from_gguf};
use crate::model::{DenseFormat, GgufOptions, Model};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use bitnet_quant::WeightLayout;

/// A model ready to generate: the network and its tokenizer.
pub struct LoadedModel {
    /// The network.
    pub model: Model,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// The chat template, when the model ships one.
    pub chat_template: Option<String>,
    /// Where it was loaded from.
    pub source: PathBuf,
}

/// Choices the user can make at load time.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// GGUF only: the FFN activation and the I2_S block layout.
    pub gguf: GgufOptions,
    /// Re-encode the output head in this format (`None`: keep the file's).
    pub head: Option<DenseFormat>,
    /// The runtime layout of the ternary layers (default: 2-bit).
    pub weight_layout: WeightLayout,
}

/// The kinds of model path we recognise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// A Hugging Face folder (`config.json`, safetensors, `tokenizer.json`).
    HfFolder,
    /// A GGUF file.
    Gguf,
}

/// Tells what `path` holds: a folder is an HF checkpoint; a file starting with the GGUF magic
/// is GGUF.
pub fn detect(path: &Path) -> Result<ModelKind> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return Ok(ModelKind::HfFolder);
    }
    let mut magic = [0u8; 4];
    use std::io::Read;
    let read = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut magic))
        .map_err(|e| Error::io(path, e))?;
    if read == 4 && &magic == b"GGUF" {
        Ok(ModelKind::Gguf)
    } else {
        Err(Error::format(
            path,
            "not a model: expected a Hugging Face folder or a GGUF file",
        ))
    }
}

/// Loads the model at `path` (an HF folder or a GGUF file) and its tokenizer.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    let mut loaded = match detect(path)? {
        ModelKind::HfFolder => LoadedModel {
            model: Model::from_hf_folder(path)?,
            tokenizer: Tokenizer::from_file(&path.join("tokenizer.json"))?,
            chat_template: hf_chat_template(path)?,
            source: path.to_path_buf(),
        },
        ModelKind::Gguf => return load_gguf(GgufFile::open(path)?, opts),
    };
    check_vocab(&loaded.model, &loaded.tokenizer, path)?;
    apply(&mut loaded.model, opts)?;
    Ok(loaded)
}

/// The options that change a loaded model: the head's format and the weights' layout.
fn apply(model: &mut Model, opts: &LoadOptions) -> Result<()> {
    if let Some(f) = opts.head {
        model.set_head_format(f)?;
    }
    if opts.weight_layout != model.weight_layout() {
        model.set_weight_layout(opts.weight_layout)?;
    }
    Ok(())
}

/// Loads a parsed GGUF file (from disk or built into the program) and its tokenizer.
pub fn load_gguf(gguf: GgufFile, opts: &LoadOptions) -> Result<LoadedModel> {
    let path = gguf.path().to_path_buf();
    let mut loaded = LoadedModel {
        model: Model::from_gguf(&gguf, &opts.gguf)?,
        tokenizer: tokenizer_from_gguf(&gguf)?,
        chat_template: chat_template(&gguf),
        source: path.clone(),
    };
    check_vocab(&loaded.model, &loaded.tokenizer, &path)?;
    apply(&mut loaded.model, opts)?;
    Ok(loaded)
}

/// The `chat_template` string of an HF folder's `tokenizer_config.json`, if any.
fn hf_chat_template(dir: &Path) -> Result<Option<String>> {
    let p = dir.join("tokenizer_config.json");
    if !p.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(&p, format!("not valid JSON: {e}")))?;
    Ok(v.get("chat_template")
        .and_then(|t| t.as_str())
        .map(str::to_string))
}

/// A tokenizer whose ids run past the embedding would index outside it.
fn check_vocab(model: &Model, tokenizer: &Tokenizer, path: &Path) -> Result<()> {
    let (m, t) = (model.config().vocab_size, tokenizer.vocab_size());
    if t > m {
        return Err(Error::format(
            path,
            format!("the tokenizer has {t} tokens but the model's vocabulary is only {m}"),
        ));
    }
    Ok(())
}

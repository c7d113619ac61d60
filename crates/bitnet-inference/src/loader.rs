//! One entry point that opens any model we can run, with its tokenizer.

use std::path::{Path, PathBuf};

use crate::model::Model;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// A model ready to generate: the network and its tokenizer.
pub struct LoadedModel {
    /// The network.
    pub model: Model,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Where it was loaded from.
    pub source: PathBuf,
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

/// Loads the model at `path` and its tokenizer.
pub fn load(path: &Path) -> Result<LoadedModel> {
    match detect(path)? {
        ModelKind::HfFolder => {
            let model = Model::from_hf_folder(path)?;
            let tokenizer = Tokenizer::from_file(&path.join("tokenizer.json"))?;
            check_vocab(&model, &tokenizer, path)?;
            Ok(LoadedModel {
                model,
                tokenizer,
                source: path.to_path_buf(),
            })
        }
        ModelKind::Gguf => Err(Error::format(
            path,
            "GGUF models cannot be run yet: convert it to a Hugging Face folder or use one",
        )),
    }
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

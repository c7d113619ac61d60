//! The training crate's error type.

use std::path::{Path, PathBuf};

/// Everything that can go wrong while preparing data, training, checkpointing or exporting.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A file could not be read or written.
    #[error("{path}: {err}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        err: std::io::Error,
    },
    /// A tensor operation failed in candle.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    /// The inference crate rejected something (export, evaluation).
    #[error(transparent)]
    Inference(#[from] bitnet_core::Error),
    /// The tokenizer could not be trained, saved or applied.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A configuration, checkpoint or argument is invalid.
    #[error("{0}")]
    Invalid(String),
}

impl TrainError {
    /// An I/O error about `path`.
    pub fn io(path: &Path, err: std::io::Error) -> Self {
        TrainError::Io {
            path: path.to_path_buf(),
            err,
        }
    }
}

/// Result with [`TrainError`].
pub type Result<T> = std::result::Result<T, TrainError>;

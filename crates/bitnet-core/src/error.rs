use std::path::PathBuf;

/// The error type of every BitNet-Rust library crate.
///
/// Each variant names what was wrong in words a user can act on: the file, the tensor, the
/// field. Binaries wrap it with context; libraries never panic on bad input.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened, mapped or read.
    #[error("cannot read {path}: {err}")]
    Io {
        /// The file in question.
        path: PathBuf,
        /// What the operating system said (part of the message, so not also a `source`).
        err: std::io::Error,
    },
    /// A model file is malformed: truncated, inconsistent or of an unknown layout.
    #[error("invalid model file {path}: {reason}")]
    Format {
        /// The file in question.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor the model needs is absent.
    #[error("tensor `{name}` is missing from the model")]
    MissingTensor {
        /// The tensor's name as the file format spells it.
        name: String,
    },
    /// A tensor has the wrong shape for the configuration.
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    TensorShape {
        /// The tensor's name.
        name: String,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A tensor has a dtype this role does not accept.
    #[error("tensor `{name}` has dtype {found}, expected {expected}")]
    TensorDType {
        /// The tensor's name.
        name: String,
        /// The dtypes this role accepts.
        expected: String,
        /// The dtype in the file.
        found: String,
    },
    /// The model configuration is incomplete or self-contradictory.
    #[error("invalid model configuration: {0}")]
    Config(String),
    /// The tokenizer could not be loaded or failed on its input.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// A caller passed something the operation cannot accept (token ids out of range, a
    /// sequence longer than its cache, an empty batch...).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A thread pool could not be created.
    #[error("thread pool: {0}")]
    Threads(String),
    /// A computation produced NaN or infinity where a model gives finite numbers: in practice
    /// a weight, scale or norm in the file that is itself NaN or infinite.
    #[error("non-finite result: {0}")]
    NonFinite(String),
}

/// Shorthand for results carrying [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Builds a [`Error::Format`] for `path`.
    pub fn format(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// Builds a [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err,
        }
    }
}

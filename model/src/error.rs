//! The one error type of the model crate.

use std::path::PathBuf;

/// Everything that can go wrong loading, running or training a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A model file is malformed or lacks something the loader needs.
    #[error("{path}: {reason}")]
    BadModel {
        /// The model file or directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The model's architecture is not one HiveMind runs.
    #[error("unsupported architecture {arch:?} (supported: llama, qwen2)")]
    UnsupportedArch {
        /// The architecture named by the model.
        arch: String,
    },
    /// A `--model` argument names nothing we can find.
    #[error("model not found: {spec} ({hint})")]
    ModelNotFound {
        /// What the user passed.
        spec: String,
        /// Where we looked and what to do.
        hint: String,
    },
    /// Fetching the default model failed.
    #[error("could not fetch the default model: {reason}. Pass --model PATH to use a local GGUF file or model directory")]
    Fetch {
        /// What went wrong.
        reason: String,
    },
    /// A fetched or cached file does not have the expected hash.
    #[error("{path}: sha256 is {actual}, expected {expected}; delete it and pull again, or pass --model PATH")]
    HashMismatch {
        /// The file.
        path: PathBuf,
        /// The hash we require.
        expected: String,
        /// The hash we found.
        actual: String,
    },
    /// An adapter does not fit the model it is applied to.
    #[error("adapter does not fit the model: {reason}")]
    AdapterMismatch {
        /// What does not fit.
        reason: String,
    },
    /// A prompt and its answer would not fit the model's context.
    #[error("the prompt is {prompt} tokens; with {new_tokens} new tokens it exceeds the model's context of {limit} tokens")]
    ContextTooLong {
        /// Prompt tokens.
        prompt: usize,
        /// Tokens asked for.
        new_tokens: usize,
        /// The model's context length.
        limit: usize,
    },
    /// The chat template failed to render.
    #[error("chat template: {0}")]
    Template(String),
    /// The tokenizer failed.
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    /// Adapter I/O or aggregation failed.
    #[error(transparent)]
    Adapter(#[from] crate::adapter::AdapterError),
    /// A prompt does not fit the context.
    #[error("prompt of {tokens} tokens does not fit the context of {max} tokens")]
    ContextFull {
        /// Tokens needed.
        tokens: usize,
        /// The model's context length.
        max: usize,
    },
    /// A training data file is unreadable or malformed; `index` is the 0-based item (array element
    /// or JSONL line) when one item is at fault.
    #[error("{}: {}{reason}", path.display(), index.map(|i| format!("item {i}: ")).unwrap_or_default())]
    Dataset {
        /// The data file.
        path: PathBuf,
        /// The item at fault, if any.
        index: Option<usize>,
        /// What is wrong.
        reason: String,
    },
    /// Training cannot run with these settings or inputs.
    #[error("training: {reason}")]
    Training {
        /// What is wrong.
        reason: String,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    pub(crate) fn bad(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        ModelError::BadModel {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }
}

/// The model crate's result type.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

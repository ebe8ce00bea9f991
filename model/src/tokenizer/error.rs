//! Errors of the tokenizer.

use std::path::PathBuf;

/// Errors of the tokenizer module.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerError {
    /// A required GGUF metadata key is absent.
    #[error("GGUF metadata has no `{key}`")]
    MissingKey {
        /// The key.
        key: &'static str,
    },
    /// A GGUF metadata value has the wrong type.
    #[error("GGUF metadata `{key}` is not {expected}")]
    WrongType {
        /// The key.
        key: &'static str,
        /// What it should have been.
        expected: &'static str,
    },
    /// The tokenizer is neither byte-level BPE nor SentencePiece BPE.
    #[error(
        "unsupported tokenizer: {what} (only byte-level BPE and SentencePiece BPE are supported)"
    )]
    Unsupported {
        /// What was found.
        what: String,
    },
    /// Two per-token arrays disagree in length.
    #[error("GGUF `{key}` has {found} entries but the vocabulary has {expected} tokens")]
    LengthMismatch {
        /// The shorter or longer array.
        key: &'static str,
        /// The vocabulary size.
        expected: usize,
        /// The array's length.
        found: usize,
    },
    /// A merge rule is not two tokens separated by one space.
    #[error("merge rule #{index} is malformed: {rule:?}")]
    BadMerge {
        /// Its position in `tokenizer.ggml.merges`.
        index: usize,
        /// The rule.
        rule: String,
    },
    /// A token id outside the vocabulary (in decode input or in metadata).
    #[error("token id {id} is outside the vocabulary of {vocab_size} tokens")]
    UnknownId {
        /// The id.
        id: u32,
        /// The vocabulary size.
        vocab_size: usize,
    },
    /// `add_bos` was asked for but the tokenizer has no BOS token.
    #[error("a BOS token was requested but the tokenizer has none")]
    NoBos,
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A tokenizer file could not be parsed.
    #[error("{path}: {reason}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The `tokenizers` library failed.
    #[error("tokenizers ({context}): {message}")]
    Library {
        /// What was being done.
        context: &'static str,
        /// The library's message.
        message: String,
    },
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, TokenizerError>;

pub(super) fn lib_err(context: &'static str) -> impl FnOnce(tokenizers::Error) -> TokenizerError {
    move |e| TokenizerError::Library {
        context,
        message: e.to_string(),
    }
}

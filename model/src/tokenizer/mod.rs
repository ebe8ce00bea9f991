//! The tokenizer: byte-level BPE (GPT-2 style, as SmolLM2, Qwen2 and Llama 3 use) and SentencePiece
//! BPE (Llama-2, TinyLlama: `tokenizer.ggml.model = llama`), built from GGUF metadata
//! (`tokenizer.ggml.*`) or read from a Hugging Face `tokenizer.json`.
//!
//! ```text
//!  GGUF metadata ──► from_gguf ──┐                      ┌──► encode(text) -> ids
//!                                ├─► Tokenizer ─────────┼──► decode(ids)  -> text
//!  tokenizer.json ─► from_file ──┘   (tokenizers crate  └──► TokenStream: id -> newly completed text
//!                                     + byte pieces)
//! ```
//!
//! Encoding runs through the `tokenizers` crate: a BPE model over the vocabulary and merges, the
//! pre-tokenization that llama.cpp uses for the model's `tokenizer.ggml.pre` (for `smollm`: digits
//! split one by one, then the GPT-2 regex) and GPT-2's byte-to-unicode mapping. Control and
//! user-defined tokens (`<|im_start|>`) are matched verbatim in the input text. Decoding maps every
//! id to the raw bytes it stands for, so the streaming decoder can hold back a multi-byte character
//! that is split over several tokens (emoji, Chinese) until it is complete.
//!
//! SentencePiece vocabularies (GGUF `llama`) have no merge list: llama.cpp's SPM tokenizer starts
//! from single characters and repeatedly merges the adjacent pair whose concatenation is a token
//! with the highest score (leftmost first on ties). The same is a BPE model whose merges are every
//! split `a + b` of every token, ranked by that token's score; characters that are not tokens
//! fall back to the byte tokens `<0x00>`..`<0xFF>`. Text is normalized as llama.cpp does: each
//! stretch of text between special tokens gets a leading space (`add_space_prefix`), and spaces
//! become `▁`. Decoding turns `▁` back into spaces, byte tokens into their byte, and drops the one
//! leading space of the output that the prefix added (Hugging Face's `Strip` decoder).
//!
//! Files: `gguf` (from GGUF metadata), `pieces` (byte map, SentencePiece parts, special tokens,
//! shared with the `tokenizer.json` path here), `stream` (streaming decode), `tiny` (test
//! vocabulary), `error`.

use std::collections::HashMap;
use std::path::Path;

use tokenizers::{DecoderWrapper, Model, ModelWrapper};

mod error;
mod gguf;
mod pieces;
mod stream;
mod tiny;

pub use error::{Result, TokenizerError};
pub use stream::TokenStream;
pub use tiny::{tiny_gguf_tokenizer_metadata, tiny_tokenizer_json};

use error::lib_err;
use pieces::{byte_to_char, spm_byte, spm_decoder_layout, spm_text, token_bytes};

/// A byte-level BPE or SentencePiece BPE tokenizer (see the module docs).
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// For every id, the bytes it decodes to.
    pieces: Vec<Vec<u8>>,
    /// For every id, whether `skip_special` drops it (control tokens).
    special: Vec<bool>,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    /// Whether decoding drops one leading space (SentencePiece's added space prefix).
    strip_leading_space: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Reads a Hugging Face `tokenizer.json`: a BPE model with a byte-level decoder, or Llama-2's
    /// SentencePiece layout (BPE with `byte_fallback`, normalizer `Prepend("▁")` +
    /// `Replace(" ", "▁")`, decoder `Replace("▁", " ")` / `ByteFallback` / `Fuse` /
    /// `Strip(" ", 1, 0)`). BOS/EOS come
    /// from a `tokenizer_config.json` beside it (`bos_token`, `eos_token`, `add_bos_token`), if
    /// there is one.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let inner: tokenizers::Tokenizer =
            text.parse()
                .map_err(|e: tokenizers::Error| TokenizerError::BadFile {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })?;
        let mut tok = Self::from_hf(inner)?;
        let config = path.with_file_name("tokenizer_config.json");
        if config.is_file() {
            let text = std::fs::read_to_string(&config).map_err(|source| TokenizerError::Io {
                path: config.clone(),
                source,
            })?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| TokenizerError::BadFile {
                    path: config.clone(),
                    reason: e.to_string(),
                })?;
            let named = |key: &str| -> Option<u32> {
                let name = match v.get(key)? {
                    serde_json::Value::String(s) => s.as_str(),
                    obj => obj.get("content")?.as_str()?,
                };
                tok.token_id(name)
            };
            let (bos, eos) = (named("bos_token"), named("eos_token"));
            tok.bos = bos;
            tok.eos = eos;
            tok.add_bos = v.get("add_bos_token").and_then(|b| b.as_bool()) == Some(true);
        }
        Ok(tok)
    }

    /// Wraps a `tokenizers::Tokenizer` (BPE model, byte-level or Llama-2 SentencePiece decoder);
    /// no BOS/EOS are set.
    fn from_hf(inner: tokenizers::Tokenizer) -> Result<Self> {
        if !matches!(inner.get_model(), ModelWrapper::BPE(_)) {
            return Err(TokenizerError::Unsupported {
                what: "a tokenizer.json whose model is not BPE".into(),
            });
        }
        let spm = match inner.get_decoder() {
            Some(DecoderWrapper::ByteLevel(_)) => None,
            Some(d @ DecoderWrapper::Sequence(_)) => Some(spm_decoder_layout(d)?),
            _ => {
                return Err(TokenizerError::Unsupported {
                    what: "a tokenizer.json whose decoder is neither ByteLevel nor the \
                           Llama-2 sequence (Replace ▁, ByteFallback, Fuse, Strip)"
                        .into(),
                })
            }
        };
        let added = inner.get_added_tokens_decoder();
        let n = inner
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&m| m as usize + 1);
        let char_to_byte: HashMap<char, u8> = (0..=255u8)
            .zip(byte_to_char())
            .map(|(b, c)| (c, b))
            .collect();
        let byte_fallback = matches!(inner.get_model(), ModelWrapper::BPE(b) if b.byte_fallback);
        let mut pieces = Vec::with_capacity(n);
        let mut special = Vec::with_capacity(n);
        for id in (0u32..).take(n) {
            if let Some(a) = added.get(&id) {
                pieces.push(a.content.as_bytes().to_vec());
                special.push(a.special);
            } else {
                let piece = inner.get_model().id_to_token(id).map(|t| match spm {
                    None => token_bytes(&t, &char_to_byte).unwrap_or_else(|| t.into_bytes()),
                    Some(_) => match spm_byte(&t).filter(|_| byte_fallback) {
                        Some(b) => vec![b],
                        None => spm_text(&t),
                    },
                });
                pieces.push(piece.unwrap_or_default());
                special.push(false);
            }
        }
        Ok(Tokenizer {
            inner,
            pieces,
            special,
            bos: None,
            eos: None,
            add_bos: false,
            strip_leading_space: spm.is_some_and(|strip| strip),
        })
    }

    /// Token ids of `text`, with the BOS token first if `add_bos`. Special tokens written in the
    /// text (`<|im_start|>`) become their ids.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(lib_err("encoding"))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_bos {
            ids.push(self.bos.ok_or(TokenizerError::NoBos)?);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// The text of `ids`; control tokens are left out if `skip_special`. Byte sequences that are
    /// not valid UTF-8 become U+FFFD. For SentencePiece tokenizers one leading space of the output
    /// is dropped (the space prefix that `encode` added), as Hugging Face's Llama-2 decoder does.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let mut bytes = Vec::new();
        for &id in ids {
            if let Some(piece) = self.piece(id, skip_special)? {
                bytes.extend_from_slice(piece);
            }
        }
        let start = usize::from(self.strip_leading_space && bytes.first() == Some(&b' '));
        Ok(String::from_utf8_lossy(&bytes[start..]).into_owned())
    }

    /// The bytes of one token, `None` if it is skipped.
    fn piece(&self, id: u32, skip_special: bool) -> Result<Option<&[u8]>> {
        let i = id as usize;
        let piece = self.pieces.get(i).ok_or(TokenizerError::UnknownId {
            id,
            vocab_size: self.pieces.len(),
        })?;
        Ok((!(skip_special && self.special[i])).then_some(piece.as_slice()))
    }

    /// The id of a token given by its vocabulary string (`"<|im_end|>"`, or a byte-level piece).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The beginning-of-sequence token, if the tokenizer has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// The end-of-sequence token, if the tokenizer has one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Whether the model asks for a BOS token at the start of a prompt
    /// (`tokenizer.ggml.add_bos_token`, `add_bos_token`).
    pub fn add_bos_by_default(&self) -> bool {
        self.add_bos
    }

    /// Number of token ids (the embedding's row count): largest id plus one.
    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// Whether `id` is a control token (dropped by `decode(.., skip_special = true)`).
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn hf(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

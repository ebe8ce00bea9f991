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

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::prepend::Prepend;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::utils::Sequence as NormalizerSequence;
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, Model, ModelWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
};

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

fn lib_err(context: &'static str) -> impl FnOnce(tokenizers::Error) -> TokenizerError {
    move |e| TokenizerError::Library {
        context,
        message: e.to_string(),
    }
}

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
mod token_type {
    pub(super) const NORMAL: i64 = 1;
    pub(super) const UNKNOWN: i64 = 2;
    pub(super) const CONTROL: i64 = 3;
    pub(super) const USER_DEFINED: i64 = 4;
    pub(super) const BYTE: i64 = 6;
}

/// Qwen2's regex, with the case-insensitive contractions spelled out as llama.cpp does.
const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's regex (digits in groups of up to three), spelled as llama.cpp does.
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenization of a GGUF `tokenizer.ggml.pre` name, following llama.cpp's table, and
/// whether BPE takes a whole pre-token that is in the vocabulary without merging (`ignore_merges`).
/// `ByteLevel(use_regex)` applies the GPT-2 regex
/// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
fn pre_tokenizer_for(pre: Option<&str>) -> Result<(PreTokenizerWrapper, bool)> {
    let byte_level_gpt2 = || ByteLevel::new(false, true, true);
    let regex_then_bytes = |regex: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(
            SplitPattern::Regex(regex.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(lib_err("compiling the pre-tokenizer regex"))?;
        Ok(Sequence::new(vec![
            split.into(),
            ByteLevel::new(false, false, false).into(),
        ])
        .into())
    };
    Ok(match pre {
        Some(
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b",
        ) => (
            Sequence::new(vec![Digits::new(true).into(), byte_level_gpt2().into()]).into(),
            false,
        ),
        Some("qwen2" | "deepseek-r1-qwen" | "stablelm2" | "hunyuan") => {
            (regex_then_bytes(QWEN2_REGEX)?, false)
        }
        Some("llama3" | "llama-v3" | "llama-bpe" | "falcon3") => {
            (regex_then_bytes(LLAMA3_REGEX)?, true)
        }
        Some("dbrx" | "smaug-bpe") => (regex_then_bytes(LLAMA3_REGEX)?, false),
        Some("gpt2" | "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais" | "default") | None => {
            (byte_level_gpt2().into(), false)
        }
        Some(other) => {
            tracing::warn!(
                pre = other,
                "unknown tokenizer.ggml.pre; using the GPT-2 regex"
            );
            (byte_level_gpt2().into(), false)
        }
    })
}

/// GPT-2's reversible map from bytes to printable characters: printable Latin-1 bytes stand for
/// themselves, the others are shifted to U+0100 and up, in byte order.
fn byte_to_char() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        table[usize::from(b)] = if printable(b) {
            char::from(b)
        } else {
            let c = char::from_u32(next).unwrap_or('\0');
            next += 1;
            c
        };
    }
    table
}

/// The bytes a byte-level token stands for; `None` if a character is outside GPT-2's alphabet.
fn token_bytes(token: &str, char_to_byte: &HashMap<char, u8>) -> Option<Vec<u8>> {
    token
        .chars()
        .map(|c| char_to_byte.get(&c).copied())
        .collect()
}

fn as_u32(v: &Value) -> Option<u32> {
    match *v {
        Value::U8(x) => Some(u32::from(x)),
        Value::U16(x) => Some(u32::from(x)),
        Value::U32(x) => Some(x),
        Value::U64(x) => u32::try_from(x).ok(),
        Value::I8(x) => u32::try_from(x).ok(),
        Value::I16(x) => u32::try_from(x).ok(),
        Value::I32(x) => u32::try_from(x).ok(),
        Value::I64(x) => u32::try_from(x).ok(),
        _ => None,
    }
}

fn as_i64(v: &Value) -> Option<i64> {
    match *v {
        Value::U8(x) => Some(i64::from(x)),
        Value::U16(x) => Some(i64::from(x)),
        Value::U32(x) => Some(i64::from(x)),
        Value::U64(x) => i64::try_from(x).ok(),
        Value::I8(x) => Some(i64::from(x)),
        Value::I16(x) => Some(i64::from(x)),
        Value::I32(x) => Some(i64::from(x)),
        Value::I64(x) => Some(x),
        _ => None,
    }
}

fn string_array<'a>(md: &'a HashMap<String, Value>, key: &'static str) -> Result<Vec<&'a str>> {
    let v = md.get(key).ok_or(TokenizerError::MissingKey { key })?;
    let wrong = || TokenizerError::WrongType {
        key,
        expected: "an array of strings",
    };
    let Value::Array(items) = v else {
        return Err(wrong());
    };
    items
        .iter()
        .map(|x| match x {
            Value::String(s) => Ok(s.as_str()),
            _ => Err(wrong()),
        })
        .collect()
}

fn float_array(md: &HashMap<String, Value>, key: &'static str) -> Result<Vec<f32>> {
    let v = md.get(key).ok_or(TokenizerError::MissingKey { key })?;
    let wrong = || TokenizerError::WrongType {
        key,
        expected: "an array of numbers",
    };
    let Value::Array(items) = v else {
        return Err(wrong());
    };
    items
        .iter()
        .map(|x| match *x {
            Value::F32(f) => Ok(f),
            // Scores are f32 in GGUF (llama.cpp also reads int32 ones).
            #[allow(clippy::cast_possible_truncation)]
            Value::F64(f) => Ok(f as f32),
            #[allow(clippy::cast_precision_loss)]
            _ => as_i64(x).map(|i| i as f32).ok_or_else(wrong),
        })
        .collect()
}

/// `tokenizer.ggml.token_type`, or all normal if absent.
fn token_types(md: &HashMap<String, Value>, n: usize) -> Result<Vec<i64>> {
    const KEY: &str = "tokenizer.ggml.token_type";
    let wrong = || TokenizerError::WrongType {
        key: KEY,
        expected: "an array of integers",
    };
    let types: Vec<i64> = match md.get(KEY) {
        None => vec![token_type::NORMAL; n],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| as_i64(v).ok_or_else(wrong))
            .collect::<Result<_>>()?,
        Some(_) => return Err(wrong()),
    };
    if types.len() != n {
        return Err(TokenizerError::LengthMismatch {
            key: KEY,
            expected: n,
            found: types.len(),
        });
    }
    Ok(types)
}

/// A token id from the metadata, checked against the vocabulary size `n`; `None` if absent.
fn special_id(md: &HashMap<String, Value>, key: &'static str, n: usize) -> Result<Option<u32>> {
    match md.get(key) {
        None => Ok(None),
        Some(v) => {
            let id = as_u32(v).ok_or(TokenizerError::WrongType {
                key,
                expected: "a token id",
            })?;
            if usize::try_from(id).map_or(true, |i| i >= n) {
                return Err(TokenizerError::UnknownId { id, vocab_size: n });
            }
            Ok(Some(id))
        }
    }
}

/// Registers control / unknown tokens (skipped by decode's `skip_special`) and user-defined
/// tokens as added tokens, matched verbatim in input text and never split; returns which ids are
/// special.
fn add_special_tokens(
    inner: &mut tokenizers::Tokenizer,
    tokens: &[&str],
    types: &[i64],
) -> Vec<bool> {
    let mut added = Vec::new();
    let mut special = vec![false; tokens.len()];
    for (i, (tok, &ty)) in tokens.iter().zip(types).enumerate() {
        let is_control = ty == token_type::CONTROL || ty == token_type::UNKNOWN;
        if is_control || ty == token_type::USER_DEFINED {
            special[i] = is_control;
            added.push(AddedToken::from(*tok, is_control).normalized(false));
        }
    }
    inner.add_tokens(&added);
    special
}

/// SentencePiece's stand-in for a space.
const SPM_SPACE: &str = "\u{2581}";

/// The text of a SentencePiece piece: `▁` is a space.
fn spm_text(token: &str) -> Vec<u8> {
    token.replace(SPM_SPACE, " ").into_bytes()
}

/// The byte of a byte-fallback token `<0xAB>`.
fn spm_byte(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2)
        .then(|| u8::from_str_radix(hex, 16).ok())
        .flatten()
}

/// BPE merges equivalent to llama.cpp's SPM tokenizer: every split `a + b` of a token `t` where
/// `a` and `b` are tokens too, ranked by `t`'s score (highest first), then by `t`'s id and the
/// split point, so the order is total and deterministic. Byte tokens are never a part: in llama.cpp
/// they only appear as output, never as symbols that merge further.
///
/// One difference remains: llama.cpp breaks a tie between equal scores by position (leftmost
/// first), BPE by rank; SentencePiece BPE vocabularies give every merged piece its own score.
fn spm_merges(
    tokens: &[&str],
    scores: &[f32],
    types: &[i64],
    vocab: &tokenizers::models::bpe::Vocab,
) -> Vec<(String, String)> {
    let is_part = |s: &str| {
        vocab
            .get(s)
            .is_some_and(|&id| types.get(id as usize) != Some(&token_type::BYTE))
    };
    let mut ranked: Vec<(f32, u32, usize)> = Vec::new();
    for (id, tok) in (0u32..).zip(tokens) {
        // A duplicated string: only its last id is reachable, as in llama.cpp.
        if vocab.get(*tok) != Some(&id) {
            continue;
        }
        for (k, _) in tok.char_indices().skip(1) {
            let (a, b) = tok.split_at(k);
            if is_part(a) && is_part(b) {
                ranked.push((scores[id as usize], id, k));
            }
        }
    }
    ranked.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    ranked
        .into_iter()
        .map(|(_, id, k)| {
            let (a, b) = tokens[id as usize].split_at(k);
            (a.to_string(), b.to_string())
        })
        .collect()
}

/// llama.cpp's SPM normalization (Hugging Face's Llama-2 normalizer): a `▁` before each stretch
/// of text between special tokens if `add_space_prefix`, then every space becomes `▁`.
fn spm_normalizer(add_space_prefix: bool) -> Result<NormalizerWrapper> {
    let replace = Replace::new(" ", SPM_SPACE).map_err(lib_err("building the normalizer"))?;
    Ok(match add_space_prefix {
        true => NormalizerSequence::new(vec![
            Prepend::new(SPM_SPACE.to_string()).into(),
            replace.into(),
        ])
        .into(),
        false => replace.into(),
    })
}

/// Hugging Face's Llama-2 decoder: `▁` to space, byte tokens to bytes, and the leading space that
/// the normalizer added removed.
fn spm_decoder(add_space_prefix: bool) -> Result<DecoderWrapper> {
    let replace = Replace::new(SPM_SPACE, " ").map_err(lib_err("building the decoder"))?;
    let mut steps: Vec<DecoderWrapper> = vec![
        replace.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        steps.push(Strip::new(' ', 1, 0).into());
    }
    Ok(DecoderSequence::new(steps).into())
}

/// Checks that a `tokenizer.json` decoder is Hugging Face's Llama-2 SentencePiece sequence:
/// `Replace("▁", " ")`, `ByteFallback`, `Fuse`, and optionally `Strip(" ", 1, 0)`; returns whether
/// the `Strip` is there (one leading space dropped).
fn spm_decoder_layout(decoder: &DecoderWrapper) -> Result<bool> {
    let unsupported = |what: String| TokenizerError::Unsupported { what };
    let json = serde_json::to_value(decoder)
        .map_err(|e| unsupported(format!("a tokenizer.json decoder ({e})")))?;
    let steps = json
        .get("decoders")
        .and_then(|d| d.as_array())
        .ok_or_else(|| unsupported(format!("a tokenizer.json decoder {json}")))?;
    let (mut replace, mut byte_fallback, mut strip) = (false, false, false);
    for step in steps {
        let kind = step
            .get("type")
            .and_then(|t| t.as_str())
            .unwrap_or_default();
        let ok = match kind {
            "Replace" => {
                replace = step.pointer("/pattern/String").and_then(|p| p.as_str())
                    == Some(SPM_SPACE)
                    && step.get("content").and_then(|c| c.as_str()) == Some(" ");
                replace
            }
            "ByteFallback" => {
                byte_fallback = true;
                true
            }
            "Fuse" => true,
            "Strip" => {
                strip = step.get("content").and_then(|c| c.as_str()) == Some(" ")
                    && step.get("start").and_then(|s| s.as_u64()) == Some(1)
                    && step.get("stop").and_then(|s| s.as_u64()) == Some(0);
                strip
            }
            _ => false,
        };
        if !ok {
            return Err(unsupported(format!("a tokenizer.json decoder step {step}")));
        }
    }
    if !(replace && byte_fallback) {
        return Err(unsupported(format!(
            "a tokenizer.json decoder {json} (needs Replace ▁ and ByteFallback)"
        )));
    }
    Ok(strip)
}

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
    /// Builds the tokenizer of a GGUF file from its metadata.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        Self::from_gguf_metadata(&content.metadata)
    }

    /// Builds the tokenizer from GGUF metadata: `tokenizer.ggml.{model, pre, tokens, merges,
    /// scores, token_type, bos_token_id, eos_token_id, unknown_token_id, add_bos_token,
    /// add_space_prefix}`. `model` is `gpt2` (byte-level BPE, with `merges`) or `llama`
    /// (SentencePiece BPE, with `scores`).
    pub fn from_gguf_metadata(md: &HashMap<String, Value>) -> Result<Self> {
        let model = match md.get("tokenizer.ggml.model") {
            Some(Value::String(s)) => s.as_str(),
            Some(_) => {
                return Err(TokenizerError::WrongType {
                    key: "tokenizer.ggml.model",
                    expected: "a string",
                })
            }
            None => {
                return Err(TokenizerError::MissingKey {
                    key: "tokenizer.ggml.model",
                })
            }
        };
        match model {
            "gpt2" => Self::byte_level_from_gguf(md),
            "llama" => Self::spm_from_gguf(md),
            _ => Err(TokenizerError::Unsupported {
                what: format!("GGUF tokenizer.ggml.model = {model:?}"),
            }),
        }
    }

    /// A byte-level BPE tokenizer (`tokenizer.ggml.model = gpt2`).
    fn byte_level_from_gguf(md: &HashMap<String, Value>) -> Result<Self> {
        let pre = match md.get("tokenizer.ggml.pre") {
            Some(Value::String(s)) => Some(s.as_str()),
            _ => None,
        };
        let tokens = string_array(md, "tokenizer.ggml.tokens")?;
        let n = tokens.len();
        let merges = string_array(md, "tokenizer.ggml.merges")?;
        let types = token_types(md, n)?;
        let bos = special_id(md, "tokenizer.ggml.bos_token_id", n)?;
        let eos = special_id(md, "tokenizer.ggml.eos_token_id", n)?;
        // llama.cpp's default for Llama 3 vocabularies is to add BOS; the metadata key overrides.
        let add_bos = match md.get("tokenizer.ggml.add_bos_token") {
            Some(Value::Bool(b)) => *b,
            _ => matches!(pre, Some("llama3" | "llama-v3" | "llama-bpe" | "falcon3")),
        };

        // Vocabulary and merges. A duplicated token string keeps its last id, as in llama.cpp.
        let mut vocab = tokenizers::models::bpe::Vocab::with_capacity(n);
        for (id, tok) in (0u32..).zip(&tokens) {
            vocab.insert((*tok).to_string(), id);
        }
        let merges = merges
            .iter()
            .enumerate()
            .map(|(index, rule)| match rule.split_once(' ') {
                Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => {
                    Ok((a.to_string(), b.to_string()))
                }
                _ => Err(TokenizerError::BadMerge {
                    index,
                    rule: (*rule).to_string(),
                }),
            })
            .collect::<Result<Vec<_>>>()?;
        let (pre_tokenizer, ignore_merges) = pre_tokenizer_for(pre)?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(ignore_merges)
            .build()
            .map_err(lib_err("building the BPE model"))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let special = add_special_tokens(&mut inner, &tokens, &types);

        let char_to_byte: HashMap<char, u8> = (0..=255u8)
            .zip(byte_to_char())
            .map(|(b, c)| (c, b))
            .collect();
        let pieces = tokens
            .iter()
            .zip(&types)
            .map(|(tok, &ty)| {
                let raw = ty == token_type::CONTROL
                    || ty == token_type::UNKNOWN
                    || ty == token_type::USER_DEFINED;
                match raw {
                    true => tok.as_bytes().to_vec(),
                    false => {
                        token_bytes(tok, &char_to_byte).unwrap_or_else(|| tok.as_bytes().to_vec())
                    }
                }
            })
            .collect();
        Ok(Tokenizer {
            inner,
            pieces,
            special,
            bos,
            eos,
            add_bos,
            strip_leading_space: false,
        })
    }

    /// A SentencePiece BPE tokenizer (`tokenizer.ggml.model = llama`), as llama.cpp's SPM
    /// tokenizer: see the module docs.
    fn spm_from_gguf(md: &HashMap<String, Value>) -> Result<Self> {
        let tokens = string_array(md, "tokenizer.ggml.tokens")?;
        let n = tokens.len();
        let scores = float_array(md, "tokenizer.ggml.scores")?;
        if scores.len() != n {
            return Err(TokenizerError::LengthMismatch {
                key: "tokenizer.ggml.scores",
                expected: n,
                found: scores.len(),
            });
        }
        let types = token_types(md, n)?;
        // llama.cpp's defaults for `llama` vocabularies: <unk> = 0, <s> = 1, </s> = 2, add BOS,
        // add the space prefix.
        let default_id = |id: u32| (usize::try_from(id).is_ok_and(|i| i < n)).then_some(id);
        let bos = special_id(md, "tokenizer.ggml.bos_token_id", n)?.or(default_id(1));
        let eos = special_id(md, "tokenizer.ggml.eos_token_id", n)?.or(default_id(2));
        let unk = special_id(md, "tokenizer.ggml.unknown_token_id", n)?.or(default_id(0));
        let flag = |key: &'static str, default: bool| match md.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(TokenizerError::WrongType {
                key,
                expected: "a bool",
            }),
        };
        let add_bos = flag("tokenizer.ggml.add_bos_token", true)?;
        let add_space_prefix = flag("tokenizer.ggml.add_space_prefix", true)?;

        // A duplicated token string keeps its last id, as in llama.cpp.
        let mut vocab = tokenizers::models::bpe::Vocab::with_capacity(n);
        for (id, tok) in (0u32..).zip(&tokens) {
            vocab.insert((*tok).to_string(), id);
        }
        let merges = spm_merges(&tokens, &scores, &types, &vocab);
        let mut builder = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .byte_fallback(true)
            .fuse_unk(true);
        if let Some(unk) = unk.and_then(|id| tokens.get(id as usize)) {
            builder = builder.unk_token((*unk).to_string());
        }
        let bpe = builder.build().map_err(lib_err("building the BPE model"))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_normalizer(Some(spm_normalizer(add_space_prefix)?));
        inner.with_decoder(Some(spm_decoder(add_space_prefix)?));
        let special = add_special_tokens(&mut inner, &tokens, &types);

        // What llama.cpp's token_to_piece gives: normal tokens with `▁` as a space, byte tokens
        // as their byte, control / unknown / user-defined tokens as written, others nothing.
        let pieces = tokens
            .iter()
            .zip(&types)
            .map(|(tok, &ty)| match ty {
                token_type::NORMAL => spm_text(tok),
                token_type::BYTE => spm_byte(tok).map_or_else(|| spm_text(tok), |b| vec![b]),
                token_type::CONTROL | token_type::UNKNOWN | token_type::USER_DEFINED => {
                    tok.as_bytes().to_vec()
                }
                _ => Vec::new(),
            })
            .collect();
        Ok(Tokenizer {
            inner,
            pieces,
            special,
            bos,
            eos,
            add_bos,
            strip_leading_space: add_space_prefix,
        })
    }

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

/// Streaming detokenizer: push ids one at a time, get the text they complete.
///
/// Bytes of a character split over several tokens are held back until the character is whole,
/// so every returned piece is valid UTF-8 and the concatenation of all pieces plus
/// [`finish`](Self::finish) equals [`Tokenizer::decode`] of all ids.
#[derive(Debug)]
pub struct TokenStream<'a> {
    tokenizer: &'a Tokenizer,
    skip_special: bool,
    pending: Vec<u8>,
    /// Whether the next byte, if it is the first of the output and a space, is dropped.
    strip_leading_space: bool,
}

impl<'a> TokenStream<'a> {
    /// A stream that leaves control tokens out.
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        Self::with_special(tokenizer, true)
    }

    /// A stream that leaves control tokens out if `skip_special`, or writes them as text.
    pub fn with_special(tokenizer: &'a Tokenizer, skip_special: bool) -> Self {
        TokenStream {
            tokenizer,
            skip_special,
            pending: Vec::new(),
            strip_leading_space: tokenizer.strip_leading_space,
        }
    }

    /// Adds one token; returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        if let Some(mut piece) = self.tokenizer.piece(id, self.skip_special)? {
            if self.strip_leading_space && !piece.is_empty() {
                self.strip_leading_space = false;
                piece = piece.strip_prefix(b" ").unwrap_or(piece);
            }
            self.pending.extend_from_slice(piece);
        }
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // The prefix was just checked to be UTF-8.
                    out.push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                    match e.error_len() {
                        // An incomplete character at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..valid);
                            break;
                        }
                        // Bytes that can never be UTF-8: one replacement character, as decode does.
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
        Ok((!out.is_empty()).then_some(out))
    }

    /// Ends the stream: returns the held-back bytes of an unfinished character as U+FFFD, if any.
    pub fn finish(&mut self) -> Result<Option<String>> {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        Ok((!out.is_empty()).then_some(out))
    }
}

/// Tiny vocabulary shared by [`tiny_gguf_tokenizer_metadata`] and [`tiny_tokenizer_json`]:
/// (tokens, token types, merges).
fn tiny_vocab() -> (Vec<String>, Vec<i32>, Vec<String>) {
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    let merges = [
        "Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ Ġ", "Ċ Ċ", "Ġ s",
        // Never applied: `smollm` pre-tokenization splits digits one by one.
        "1 2",
    ];
    let mut tokens: Vec<String> = specials.iter().map(|s| s.to_string()).collect();
    let mut types = vec![token_type::CONTROL as i32; specials.len()];
    tokens.extend(byte_to_char().iter().map(|c| c.to_string()));
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    types.resize(tokens.len(), 1);
    (
        tokens,
        types,
        merges.iter().map(|m| m.to_string()).collect(),
    )
}

const TINY_CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// GGUF metadata of a tiny byte-level BPE tokenizer for tests: 3 control tokens
/// (`<|endoftext|>` = 0, `<|im_start|>` = 1 = BOS, `<|im_end|>` = 2 = EOS), the 256 byte tokens
/// (ids 3..=258, in byte order) and 11 merges (ids 259..=269); `pre` = `smollm`; a ChatML chat template.
#[doc(hidden)]
pub fn tiny_gguf_tokenizer_metadata() -> Vec<(String, Value)> {
    let (tokens, types, merges) = tiny_vocab();
    let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
        ("tokenizer.ggml.tokens".into(), strings(tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".into(), strings(merges)),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.padding_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        (
            "tokenizer.chat_template".into(),
            Value::String(TINY_CHATML.into()),
        ),
    ]
}

/// A Hugging Face `tokenizer.json` equivalent to [`tiny_gguf_tokenizer_metadata`] (SmolLM2's
/// layout: `Digits` then `ByteLevel` pre-tokenizers, ByteLevel decoder).
#[doc(hidden)]
pub fn tiny_tokenizer_json() -> String {
    let (tokens, types, merges) = tiny_vocab();
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, &ty))| i64::from(ty) == token_type::CONTROL)
        .map(|(id, (content, _))| {
            serde_json::json!({
                "id": id, "content": content, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true,
            })
        })
        .collect();
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.clone(), serde_json::Value::from(id)))
        .collect();
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            ],
        },
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_is_a_bijection_onto_printable_chars() {
        let table = byte_to_char();
        let mut seen: Vec<char> = table.to_vec();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 256);
        assert!(table.iter().all(|c| !c.is_whitespace() && !c.is_control()));
        assert_eq!(table[usize::from(b' ')], 'Ġ');
        assert_eq!(table[usize::from(b'\n')], 'Ċ');
        assert_eq!(table[usize::from(b'a')], 'a');
    }
}

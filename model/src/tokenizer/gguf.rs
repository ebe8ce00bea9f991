//! Building the tokenizer from GGUF metadata (`tokenizer.ggml.*`): llama.cpp's pre-tokenizer
//! table, the metadata readers, and byte-level and SentencePiece BPE.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{self, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{PreTokenizerWrapper, SplitDelimiterBehavior};

use super::error::{lib_err, Result, TokenizerError};
use super::pieces::{
    add_special_tokens, byte_to_char, spm_byte, spm_decoder, spm_merges, spm_normalizer, spm_text,
    token_bytes, token_type,
};
use super::Tokenizer;

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
}

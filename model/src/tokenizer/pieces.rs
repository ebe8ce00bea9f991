//! What each token stands for, shared by the GGUF and `tokenizer.json` paths: GPT-2's byte map,
//! SentencePiece pieces, merges, normalizer and decoder, and the special tokens.

use std::collections::HashMap;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::normalizers::prepend::Prepend;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::utils::Sequence as NormalizerSequence;
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::{AddedToken, DecoderWrapper};

use super::error::{lib_err, Result, TokenizerError};

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
pub(super) mod token_type {
    pub(in crate::tokenizer) const NORMAL: i64 = 1;
    pub(in crate::tokenizer) const UNKNOWN: i64 = 2;
    pub(in crate::tokenizer) const CONTROL: i64 = 3;
    pub(in crate::tokenizer) const USER_DEFINED: i64 = 4;
    pub(in crate::tokenizer) const BYTE: i64 = 6;
}

/// GPT-2's reversible map from bytes to printable characters: printable Latin-1 bytes stand for
/// themselves, the others are shifted to U+0100 and up, in byte order.
pub(super) fn byte_to_char() -> [char; 256] {
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
pub(super) fn token_bytes(token: &str, char_to_byte: &HashMap<char, u8>) -> Option<Vec<u8>> {
    token
        .chars()
        .map(|c| char_to_byte.get(&c).copied())
        .collect()
}

/// Registers control / unknown tokens (skipped by decode's `skip_special`) and user-defined
/// tokens as added tokens, matched verbatim in input text and never split; returns which ids are
/// special.
pub(super) fn add_special_tokens(
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
pub(super) const SPM_SPACE: &str = "\u{2581}";

/// The text of a SentencePiece piece: `▁` is a space.
pub(super) fn spm_text(token: &str) -> Vec<u8> {
    token.replace(SPM_SPACE, " ").into_bytes()
}

/// The byte of a byte-fallback token `<0xAB>`.
pub(super) fn spm_byte(token: &str) -> Option<u8> {
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
pub(super) fn spm_merges(
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
pub(super) fn spm_normalizer(add_space_prefix: bool) -> Result<NormalizerWrapper> {
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
pub(super) fn spm_decoder(add_space_prefix: bool) -> Result<DecoderWrapper> {
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
pub(super) fn spm_decoder_layout(decoder: &DecoderWrapper) -> Result<bool> {
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

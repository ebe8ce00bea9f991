//! A tiny byte-level vocabulary as GGUF metadata and as `tokenizer.json`, for tests.

use candle_core::quantized::gguf_file::Value;

use super::pieces::{byte_to_char, token_type};

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

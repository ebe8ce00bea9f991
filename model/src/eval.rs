//! How well a model (with whatever adapter is applied to its decoder) knows a chat dataset:
//! the mean cross-entropy and perplexity over reply tokens, and the greedy answer to each
//! item's last user turn scored by exact match and by containment.
//!
//! ```text
//!  Conversation ─encode_conversation─▶ ids + targets ─forward_hidden, head─▶ loss per reply token
//!               └─render(turns before the last reply)─▶ greedy generate ─▶ exact / contains
//! ```
//!
//! The loss runs on the inference decoder (the one chat uses), not the trainer's forward, so the
//! two are independent computations of the same number (`tests/eval.rs` compares them).

use std::path::Path;

use candle_core::{DType, Tensor};
use serde::Serialize;

use crate::chat::Role;
use crate::dataset::{encode_conversation, model_template, Conversation};
use crate::error::{ModelError, Result};
use crate::generate::{generate, Sampler, SamplingParams};
use crate::loader::BaseModel;

/// How to evaluate.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Conversations are cut to this many tokens for the loss (as `train` does).
    pub max_len: usize,
    /// Upper bound of tokens per greedy answer.
    pub max_new_tokens: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            max_len: 512,
            max_new_tokens: 64,
        }
    }
}

/// The scores of one item.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ItemScore {
    /// Index of the item in the dataset.
    pub index: usize,
    /// The last user turn.
    pub prompt: String,
    /// The last assistant turn (the reference answer).
    pub expected: String,
    /// The model's greedy answer.
    pub answer: String,
    /// Mean cross-entropy over the item's reply tokens (nats).
    pub loss: f64,
    /// Reply tokens the loss is over.
    pub targets: usize,
    /// The answer equals the reference, up to surrounding whitespace.
    pub exact: bool,
    /// The answer contains the reference, ignoring case and a final full stop.
    pub contains: bool,
}

/// The scores of a dataset.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalReport {
    /// Items evaluated.
    pub items: usize,
    /// Reply tokens over all items.
    pub targets: usize,
    /// Mean cross-entropy per reply token over all items (nats).
    pub mean_loss: f64,
    /// `exp(mean_loss)`.
    pub perplexity: f64,
    /// Fraction of items answered exactly.
    pub exact_match: f64,
    /// Fraction of items whose answer contains the reference.
    pub contains: f64,
    /// Per item.
    pub scores: Vec<ItemScore>,
}

impl EvalReport {
    /// The report of `scores` (token-weighted loss, item-weighted match rates).
    pub fn of(scores: Vec<ItemScore>) -> EvalReport {
        let targets: usize = scores.iter().map(|s| s.targets).sum();
        let loss_sum: f64 = scores.iter().map(|s| s.loss * s.targets as f64).sum();
        let mean_loss = loss_sum / targets.max(1) as f64;
        let n = scores.len().max(1) as f64;
        EvalReport {
            items: scores.len(),
            targets,
            mean_loss,
            perplexity: mean_loss.exp(),
            exact_match: scores.iter().filter(|s| s.exact).count() as f64 / n,
            contains: scores.iter().filter(|s| s.contains).count() as f64 / n,
            scores,
        }
    }

    /// Exact-match rate over the items whose index `keep` accepts (0 when none is).
    pub fn exact_match_of(&self, keep: impl Fn(usize) -> bool) -> f64 {
        let kept: Vec<&ItemScore> = self.scores.iter().filter(|s| keep(s.index)).collect();
        kept.iter().filter(|s| s.exact).count() as f64 / kept.len().max(1) as f64
    }
}

/// Evaluates `model` on `convs` (read from `path`, named in errors), calling `on_item(done, total)`
/// after each item. Every item needs an assistant turn (the last one is the reference answer); an
/// item that does not have one is an error naming it.
pub fn evaluate(
    model: &BaseModel,
    path: &Path,
    convs: &[Conversation],
    opts: &EvalOptions,
    mut on_item: impl FnMut(usize, usize),
) -> Result<EvalReport> {
    if opts.max_len < 2 {
        return Err(ModelError::Dataset {
            path: path.to_path_buf(),
            index: None,
            reason: format!("max sequence length {} is too short", opts.max_len),
        });
    }
    let template = model_template(model)?;
    let mut scores = Vec::with_capacity(convs.len());
    for (index, conv) in convs.iter().enumerate() {
        let bad = |reason: String| ModelError::Dataset {
            path: path.to_path_buf(),
            index: Some(index),
            reason,
        };
        let last = conv
            .messages
            .iter()
            .rposition(|m| m.role == Role::Assistant)
            .ok_or_else(|| bad("no assistant turn to compare with".into()))?;
        let expected = conv.messages[last].content.clone();
        let prompt = conv.messages[..last]
            .iter()
            .rev()
            .find(|m| m.role == Role::User)
            .map(|m| m.content.clone())
            .unwrap_or_default();

        let mut ex = encode_conversation(&model.tokenizer, &template, conv)
            .map_err(|e| bad(e.to_string()))?;
        ex.ids.truncate(opts.max_len);
        ex.targets.truncate(opts.max_len);
        let (loss_sum, targets) = reply_loss(model, &ex.ids, &ex.targets)?;

        let text = template.render(&conv.messages[..last], true)?;
        let ids = model.tokenizer.encode(&text, false)?;
        let answer = greedy(model, &ids, opts.max_new_tokens)?;
        scores.push(ItemScore {
            index,
            exact: answer.trim() == expected.trim(),
            contains: contains(&answer, &expected),
            prompt,
            expected,
            answer,
            loss: loss_sum / targets.max(1) as f64,
            targets,
        });
        on_item(index + 1, convs.len());
    }
    Ok(EvalReport::of(scores))
}

/// The summed cross-entropy of the target tokens of `ids` (token `i` predicted from `..i`) and
/// their count.
fn reply_loss(model: &BaseModel, ids: &[u32], targets: &[bool]) -> Result<(f64, usize)> {
    let rows: Vec<u32> = (1..ids.len())
        .filter(|&i| targets[i])
        .map(|i| (i - 1) as u32)
        .collect();
    if rows.is_empty() {
        return Ok((0.0, 0));
    }
    let dec = &model.decoder;
    let mut cache = dec.new_cache();
    let hidden = dec.forward_hidden(ids, &mut cache)?.squeeze(0)?;
    let picked = hidden.index_select(&Tensor::new(rows.as_slice(), hidden.device())?, 0)?;
    let logits = dec.head(&picked)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let mut sum = 0.0f64;
    for (row, &pos) in logits.iter().zip(&rows) {
        let target = ids[pos as usize + 1] as usize;
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max
            + row
                .iter()
                .map(|&l| (l as f64 - max).exp())
                .sum::<f64>()
                .ln();
        let logit = *row.get(target).ok_or_else(|| ModelError::Training {
            reason: format!("token id {target} is outside the vocabulary"),
        })? as f64;
        sum += lse - logit;
    }
    Ok((sum, rows.len()))
}

/// The greedy continuation of `prompt` (no repeat penalty), decoded without special tokens.
fn greedy(model: &BaseModel, prompt: &[u32], max_new_tokens: usize) -> Result<String> {
    let mut out = greedy_tokens(model, prompt, max_new_tokens)?;
    out.retain(|t| !model.eos_ids.contains(t));
    Ok(model.tokenizer.decode(&out, true)?)
}

/// The tokens of the greedy continuation of `prompt` (no repeat penalty), ending with the
/// end-of-sequence token when the model stopped before `max_new_tokens`.
pub(crate) fn greedy_tokens(
    model: &BaseModel,
    prompt: &[u32],
    max_new_tokens: usize,
) -> Result<Vec<u32>> {
    let mut sampler = Sampler::new(SamplingParams {
        temperature: 0.0,
        repeat_penalty: 1.0,
        ..Default::default()
    });
    let mut cache = model.decoder.new_cache();
    let mut history = Vec::new();
    let mut out = Vec::new();
    generate(
        model,
        &mut cache,
        prompt,
        max_new_tokens,
        &mut sampler,
        &mut history,
        |t| {
            out.push(t);
            true
        },
    )?;
    Ok(out)
}

/// Whether `answer` contains `expected`, ignoring case, surrounding whitespace and a final full
/// stop of the reference.
pub fn contains(answer: &str, expected: &str) -> bool {
    let e = expected.trim().trim_end_matches('.').to_lowercase();
    !e.is_empty() && answer.to_lowercase().contains(&e)
}

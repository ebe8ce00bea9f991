//! Token generation: sampling (temperature, top-k, top-p, repeat penalty; temperature 0 is greedy)
//! and a chat session that streams tokens and reuses its attention cache across turns.

use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::chat::{ChatTemplate, Message, Role};
use crate::decoder::Cache;
use crate::error::Result;
use crate::loader::BaseModel;
use crate::tokenizer::TokenStream;

/// How to pick the next token.
#[derive(Debug, Clone)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f64,
    /// Nucleus sampling mass (1.0 disables).
    pub top_p: f64,
    /// Keep only the k most likely tokens (0 disables).
    pub top_k: usize,
    /// Penalty on tokens seen in the last `repeat_last_n` (1.0 disables).
    pub repeat_penalty: f32,
    /// Window of the repeat penalty (and of the frequency and presence penalties).
    pub repeat_last_n: usize,
    /// Subtracted from a token's logit once per time it occurs in the window (OpenAI's
    /// `frequency_penalty`; 0 disables).
    pub frequency_penalty: f32,
    /// Subtracted from the logit of every token that occurs in the window (OpenAI's
    /// `presence_penalty`; 0 disables).
    pub presence_penalty: f32,
    /// RNG seed.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.7,
            top_p: 0.9,
            top_k: 40,
            repeat_penalty: 1.1,
            repeat_last_n: 64,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: 42,
        }
    }
}

/// Picks tokens from logits.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// A sampler seeded from `params.seed`.
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Sampler { params, rng }
    }

    /// The next token given `logits` and the tokens so far.
    pub fn sample(&mut self, mut logits: Vec<f32>, history: &[u32]) -> u32 {
        let p = &self.params;
        let frequency = p.frequency_penalty != 0.0 || p.presence_penalty != 0.0;
        if p.repeat_penalty != 1.0 || frequency {
            // One pass over the window's tokens, each with how often it occurs, as llama.cpp's
            // penalties sampler does: the repeat penalty scales a seen token's logit, then the
            // frequency and presence penalties subtract from it.
            let start = history.len().saturating_sub(p.repeat_last_n);
            let mut seen: Vec<u32> = history[start..].to_vec();
            seen.sort_unstable();
            for run in seen.chunk_by(|a, b| a == b) {
                let Some(l) = logits.get_mut(run[0] as usize) else {
                    continue;
                };
                if p.repeat_penalty != 1.0 {
                    *l = if *l > 0.0 {
                        *l / p.repeat_penalty
                    } else {
                        *l * p.repeat_penalty
                    };
                }
                if frequency {
                    *l -= run.len() as f32 * p.frequency_penalty + p.presence_penalty;
                }
            }
        }
        if p.temperature <= 0.0 {
            return argmax(&logits);
        }
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        // Sort by logit descending, ties by id, so sampling is reproducible.
        idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if p.top_k > 0 && p.top_k < idx.len() {
            idx.truncate(p.top_k);
        }
        let t = p.temperature as f32;
        let max = logits[idx[0]];
        let mut probs: Vec<f32> = idx.iter().map(|&i| ((logits[i] - max) / t).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        if p.top_p < 1.0 {
            let mut mass = 0.0;
            let mut keep = probs.len();
            for (n, q) in probs.iter().enumerate() {
                mass += q;
                if mass as f64 >= p.top_p {
                    keep = n + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.gen::<f32>() * total;
        for (n, q) in probs.iter().enumerate() {
            if r < *q {
                return idx[n] as u32;
            }
            r -= q;
        }
        idx[probs.len() - 1] as u32
    }
}

/// Index of the largest value; ties go to the lowest index.
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Timing of one generation.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GenStats {
    /// Tokens fed as prompt (not counting those reused from the cache).
    pub prompt_tokens: usize,
    /// Prompt processing speed.
    pub prompt_tokens_per_s: f64,
    /// Tokens generated.
    pub generated_tokens: usize,
    /// Generation speed.
    pub generation_tokens_per_s: f64,
}

/// Feeds `prompt` after what `cache` holds and generates up to `max_new_tokens`, calling `on_token`
/// for each new token; generation stops at an id in `stop`, or when `on_token` returns false.
pub fn generate(
    model: &BaseModel,
    cache: &mut Cache,
    prompt: &[u32],
    max_new_tokens: usize,
    sampler: &mut Sampler,
    history: &mut Vec<u32>,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<GenStats> {
    let mut stats = GenStats {
        prompt_tokens: prompt.len(),
        ..Default::default()
    };
    if max_new_tokens == 0 || prompt.is_empty() {
        return Ok(stats);
    }
    let t0 = Instant::now();
    let mut logits = model.decoder.forward_last(prompt, cache)?;
    history.extend_from_slice(prompt);
    stats.prompt_tokens_per_s = prompt.len() as f64 / t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    for n in 0..max_new_tokens {
        let next = sampler.sample(logits.to_vec1::<f32>()?, history);
        history.push(next);
        stats.generated_tokens += 1;
        if model.eos_ids.contains(&next) || !on_token(next) {
            break;
        }
        if n + 1 == max_new_tokens {
            break;
        }
        logits = model.decoder.forward_last(&[next], cache)?;
    }
    stats.generation_tokens_per_s = stats.generated_tokens as f64 / t1.elapsed().as_secs_f64();
    Ok(stats)
}

/// A conversation with a model: keeps the history and the attention cache between turns.
#[derive(Debug)]
pub struct ChatSession<'m> {
    model: &'m BaseModel,
    template: ChatTemplate,
    system: Option<String>,
    messages: Vec<Message>,
    cache: Cache,
    processed: Vec<u32>,
    sampler: Sampler,
    /// Upper bound of tokens per answer.
    pub max_new_tokens: usize,
}

impl<'m> ChatSession<'m> {
    /// A new conversation; `system` replaces the template's default system prompt.
    pub fn new(
        model: &'m BaseModel,
        system: Option<String>,
        params: SamplingParams,
        max_new_tokens: usize,
    ) -> Result<Self> {
        let template = crate::dataset::model_template(model)?;
        Ok(ChatSession {
            model,
            template,
            system,
            messages: Vec::new(),
            cache: model.decoder.new_cache(),
            processed: Vec::new(),
            sampler: Sampler::new(params),
            max_new_tokens,
        })
    }

    /// Forgets the conversation (the system prompt stays).
    pub fn clear(&mut self) {
        self.messages.clear();
        self.cache.reset();
        self.processed.clear();
    }

    /// The prompt text the template makes for the conversation plus `user`.
    pub fn render_with(&self, user: &str) -> Result<String> {
        let mut msgs = Vec::new();
        if let Some(s) = &self.system {
            msgs.push(Message::new(Role::System, s.clone()));
        }
        msgs.extend(self.messages.iter().cloned());
        msgs.push(Message::new(Role::User, user));
        self.template.render(&msgs, true)
    }

    /// Answers `user`, streaming text pieces to `on_text`; returns the answer and timings.
    pub fn ask(&mut self, user: &str, mut on_text: impl FnMut(&str)) -> Result<(String, GenStats)> {
        let text = self.render_with(user)?;
        let ids = self.model.tokenizer.encode(&text, false)?;
        // Reuse the cache when the new prompt extends what it already holds.
        let common = self
            .processed
            .iter()
            .zip(&ids)
            .take_while(|(a, b)| a == b)
            .count();
        if common < self.processed.len() || common == ids.len() {
            self.cache.reset();
            self.processed.clear();
        }
        let start = self.processed.len();
        let mut stream = TokenStream::new(&self.model.tokenizer);
        let mut answer = String::new();
        let mut history = self.processed.clone();
        let eos = self.model.eos_ids.clone();
        let stats = generate(
            self.model,
            &mut self.cache,
            &ids[start..],
            self.max_new_tokens,
            &mut self.sampler,
            &mut history,
            |id| {
                if !eos.contains(&id) {
                    if let Ok(Some(piece)) = stream.push(id) {
                        answer.push_str(&piece);
                        on_text(&piece);
                    }
                }
                true
            },
        )?;
        if let Ok(Some(rest)) = stream.finish() {
            answer.push_str(&rest);
            on_text(&rest);
        }
        // The cache now holds the prompt and every generated token but the last one fed back.
        let fed = history.len().min(self.cache.len());
        history.truncate(fed);
        self.processed = history;
        self.messages.push(Message::new(Role::User, user));
        self.messages
            .push(Message::new(Role::Assistant, answer.trim().to_string()));
        Ok((answer.trim().to_string(), stats))
    }
}

/// Why a completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Finish {
    /// The model ended its turn, or the caller stopped it (a stop string).
    Stop,
    /// It reached the token limit.
    Length,
}

/// One answer to a whole conversation, as [`complete`] returns it.
#[derive(Debug, Clone, Serialize)]
pub struct Completion {
    /// The answer's text as streamed (not trimmed).
    pub text: String,
    /// Why it ended.
    pub finish: Finish,
    /// Timings and token counts.
    pub stats: GenStats,
}

/// Answers the last turn of `messages` (system, user and assistant turns, as the chat template
/// renders them) from an empty cache: the stateless form of [`ChatSession::ask`], for servers.
/// `on_text` gets each piece of text as it is decoded and returns `false` to stop early, which
/// ends the completion with [`Finish::Stop`]. When the prompt and `max_new_tokens` do not fit
/// the model's context, `fit` cuts the answer to what fits (a default budget), else this fails
/// (a budget the caller asked for); a prompt that leaves no room fails either way.
pub fn complete(
    model: &BaseModel,
    messages: &[Message],
    params: SamplingParams,
    max_new_tokens: usize,
    fit: bool,
    mut on_text: impl FnMut(&str) -> bool,
) -> Result<Completion> {
    let template = crate::dataset::model_template(model)?;
    let prompt = template.render(messages, true)?;
    let ids = model.tokenizer.encode(&prompt, false)?;
    let limit = model.decoder.max_positions();
    let room = limit.saturating_sub(ids.len());
    let max_new_tokens = if fit && room > 0 {
        max_new_tokens.min(room)
    } else {
        max_new_tokens
    };
    if ids.len().saturating_add(max_new_tokens) > limit {
        return Err(crate::error::ModelError::ContextTooLong {
            prompt: ids.len(),
            new_tokens: max_new_tokens,
            limit,
        });
    }
    let mut cache = model.decoder.new_cache();
    let mut sampler = Sampler::new(params);
    let mut history = Vec::new();
    let mut stream = TokenStream::new(&model.tokenizer);
    let mut text = String::new();
    let mut stopped = false;
    let stats = generate(
        model,
        &mut cache,
        &ids,
        max_new_tokens,
        &mut sampler,
        &mut history,
        |id| {
            if let Ok(Some(piece)) = stream.push(id) {
                text.push_str(&piece);
                stopped = !on_text(&piece);
            }
            !stopped
        },
    )?;
    let ended = history.last().is_some_and(|id| model.eos_ids.contains(id));
    if !stopped {
        if let Ok(Some(rest)) = stream.finish() {
            text.push_str(&rest);
            on_text(&rest);
        }
    }
    let finish = if ended || stopped {
        Finish::Stop
    } else if stats.generated_tokens >= max_new_tokens {
        Finish::Length
    } else {
        Finish::Stop
    };
    Ok(Completion {
        text,
        finish,
        stats,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn greedy(frequency_penalty: f32, presence_penalty: f32, window: usize) -> u32 {
        greedy_with_repeat(1.0, frequency_penalty, presence_penalty, window)
    }

    fn greedy_with_repeat(
        repeat_penalty: f32,
        frequency_penalty: f32,
        presence_penalty: f32,
        window: usize,
    ) -> u32 {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            repeat_penalty,
            repeat_last_n: window,
            frequency_penalty,
            presence_penalty,
            ..Default::default()
        });
        // Token 0 occurs twice in the history, tokens 1 and 3 once, token 2 never.
        s.sample(vec![3.0, 2.5, 2.0, 1.0], &[0, 0, 1, 3])
    }

    /// Penalised logits are `l - count f - (count > 0) p` over the window: token 0 (3.0, twice)
    /// falls below token 2 (2.0, never) once `2 f + p` exceeds 1.0.
    #[test]
    fn frequency_and_presence_penalties_count_tokens_in_the_window() {
        assert_eq!(greedy(0.0, 0.0, 64), 0);
        assert_eq!(greedy(0.4, 0.0, 64), 0, "3.0 - 0.8 = 2.2 beats 2.1 and 2.0");
        assert_eq!(greedy(0.6, 0.0, 64), 2, "1.8, 1.9 and 2.0");
        assert_eq!(greedy(0.0, 0.7, 64), 0, "2.3 beats 2.0");
        assert_eq!(greedy(0.0, 1.2, 64), 2, "1.8, 1.3 and 2.0");
        assert_eq!(
            greedy(0.6, 0.0, 2),
            0,
            "the window holds only tokens 1 and 3"
        );
        assert_eq!(
            greedy(-1.0, 0.0, 64),
            0,
            "a negative penalty favours seen tokens"
        );
        // Both: token 0 is scaled by the repeat penalty, then penalised per occurrence.
        assert_eq!(
            greedy_with_repeat(1.25, 0.0, 0.0, 64),
            0,
            "3.0 / 1.25 = 2.4"
        );
        assert_eq!(
            greedy_with_repeat(1.25, 0.25, 0.0, 64),
            2,
            "2.4 - 0.5 = 1.9 under 2.0"
        );
    }
}

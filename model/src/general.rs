//! General instructions for measuring what an adapter makes the model forget: the base model
//! answers them, and an adapted model is scored on those answers (the loss of the base's own
//! answers, and how often its greedy answer is still the same).

use crate::chat::{Message, Role};
use crate::dataset::{model_template, Conversation, Example};
use crate::error::Result;
use crate::eval::{evaluate, greedy_tokens, EvalOptions};
use crate::loader::BaseModel;
use crate::train::{input_grams, InputGrams, ProtectedInputs};

/// Everyday instructions of the kind a small assistant is asked.
pub const GENERAL_PROMPTS: [&str; 24] = [
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Explain what photosynthesis is in one sentence.",
    "Translate 'good morning' into Spanish.",
    "What is 12 multiplied by 7?",
    "Write a haiku about the sea.",
    "Name three primary colours.",
    "What does a thermometer measure?",
    "Suggest a name for a friendly robot.",
    "How many days are there in a leap year?",
    "What is the opposite of 'ancient'?",
    "Summarise the story of Cinderella in two sentences.",
    "Why is the sky blue?",
    "List four kinds of fruit.",
    "What is the boiling point of water in Celsius?",
    "Write a short greeting for a birthday card.",
    "What language is spoken in Brazil?",
    "Give an example of a mammal that can fly.",
    "How do you make a cup of tea?",
    "What is the largest planet in the solar system?",
    "Explain what a noun is.",
    "Recommend a hobby for a rainy day.",
    "What is the square root of 81?",
    "Describe a cat in three words.",
];

/// Other everyday instructions, never scored: the base model's answers to these are what
/// training replays to keep the model's general behaviour (see [`crate::train::Replay`]).
/// Disjoint from [`GENERAL_PROMPTS`], so drift measured on those is measured on held-out prompts.
pub const REPLAY_PROMPTS: [&str; 16] = [
    "What is the capital of Japan?",
    "Give me two tips for staying focused while studying.",
    "Explain what gravity is in one sentence.",
    "Translate 'thank you' into French.",
    "What is 9 plus 15?",
    "Write a short poem about autumn leaves.",
    "Name three animals that live in the ocean.",
    "What does a compass show?",
    "Suggest a name for a small bakery.",
    "How many minutes are there in an hour?",
    "What is the opposite of 'generous'?",
    "Describe a rainbow to a child.",
    "Why do we need to drink water?",
    "List three things you can find in a kitchen.",
    "What is the freezing point of water in Fahrenheit?",
    "How do you plant a seed?",
];

/// The general prompts with the model's own greedy answers (up to `max_new_tokens` each) as
/// the reference replies: the base model's behaviour, to measure drift from.
pub fn base_answers(model: &BaseModel, max_new_tokens: usize) -> Result<Vec<Conversation>> {
    answers(model, &GENERAL_PROMPTS, max_new_tokens)
}

/// The first `count` of [`REPLAY_PROMPTS`] with the model's own greedy answers (up to
/// `max_new_tokens`), as training examples: what the model answers now, to replay while it
/// learns something else (see [`crate::train::Replay`]). Call it on the base model before
/// any adapter is applied.
pub fn replay_examples(
    model: &BaseModel,
    count: usize,
    max_new_tokens: usize,
) -> Result<Vec<Example>> {
    let n = count.min(REPLAY_PROMPTS.len());
    own_answers(model, &REPLAY_PROMPTS[..n], max_new_tokens)
}

/// Each of `prompts` as a user turn, followed by `model`'s greedy answer, in tokens: the answer
/// tokens are the targets, exactly as generated (no decode and re-encode), ending with the
/// end-of-sequence token when the model stopped, and without one when the answer was cut at
/// `max_new_tokens` (so replaying it never teaches the model to stop there).
pub fn own_answers(
    model: &BaseModel,
    prompts: &[&str],
    max_new_tokens: usize,
) -> Result<Vec<Example>> {
    let template = model_template(model)?;
    let mut out = Vec::with_capacity(prompts.len());
    for q in prompts {
        let text = template.render(&[Message::new(Role::User, *q)], true)?;
        let mut ids = model.tokenizer.encode(&text, false)?;
        let answer = greedy_tokens(model, &ids, max_new_tokens)?;
        let mut targets = vec![false; ids.len()];
        targets.extend(std::iter::repeat_n(true, answer.len()));
        ids.extend(answer);
        out.push(Example { ids, targets });
    }
    Ok(out)
}

/// `prompts` with `model`'s greedy answers (as it stands, adapter included) as replies.
fn answers(
    model: &BaseModel,
    prompts: &[&str],
    max_new_tokens: usize,
) -> Result<Vec<Conversation>> {
    let questions: Vec<Conversation> = prompts
        .iter()
        .map(|q| Conversation {
            messages: vec![
                Message::new(Role::User, *q),
                // Placeholder reply: evaluate needs one; its answers are what we keep.
                Message::new(Role::Assistant, "."),
            ],
        })
        .collect();
    let opts = EvalOptions {
        max_len: 512,
        max_new_tokens,
    };
    let report = evaluate(
        model,
        std::path::Path::new("general prompts"),
        &questions,
        &opts,
        |_, _| {},
    )?;
    Ok(report
        .scores
        .into_iter()
        .map(|s| Conversation {
            messages: vec![
                Message::new(Role::User, s.prompt),
                Message::new(Role::Assistant, s.answer),
            ],
        })
        .collect())
}

/// The most memory [`protected_inputs`] may take for its input statistics (the default model's
/// take 400 MiB; a 7B model's would take tens of GiB).
pub const PROTECT_MAX_BYTES: u64 = 1 << 30;

/// Bytes [`protected_inputs`] needs for `model`'s input statistics.
pub fn protection_bytes(model: &BaseModel) -> u64 {
    InputGrams::bytes_for(&model.decoder.cfg)
}

/// Replay prompts whose answers define the protected directions (all of them).
pub const PROTECT_PROMPTS: usize = REPLAY_PROMPTS.len();

/// The input directions a training on `model` (with whatever adapter is applied to it) should
/// leave alone ([`crate::train::ProtectedInputs`]): the principal subspaces holding `energy` of
/// each module input's energy (at most `max_dims` directions each) while the model reads its
/// own answers (up to `max_new_tokens`) to every [`REPLAY_PROMPTS`] prompt. The drift prompts
/// ([`GENERAL_PROMPTS`]) are not among them.
pub fn protected_inputs(
    model: &BaseModel,
    energy: f64,
    max_dims: usize,
    max_new_tokens: usize,
) -> Result<ProtectedInputs> {
    let bytes = protection_bytes(model);
    if bytes > PROTECT_MAX_BYTES {
        return Err(crate::ModelError::Training {
            reason: format!(
                "protecting general behaviour needs {} MiB of input statistics on {}, over the \
                 {} MiB allowed",
                bytes >> 20,
                model.name,
                PROTECT_MAX_BYTES >> 20
            ),
        });
    }
    let general = replay_examples(model, PROTECT_PROMPTS, max_new_tokens)?;
    let grams = input_grams(&model.decoder, None, &general)?;
    ProtectedInputs::from_grams(&grams, energy, max_dims)
}

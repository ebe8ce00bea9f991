//! General instructions for measuring what an adapter makes the model forget: the base model
//! answers them, and an adapted model is scored on those answers (the loss of the base's own
//! answers, and how often its greedy answer is still the same).

use crate::chat::{Message, Role};
use crate::dataset::Conversation;
use crate::error::Result;
use crate::eval::{evaluate, EvalOptions};
use crate::loader::BaseModel;

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

/// The general prompts with the model's own greedy answers (up to `max_new_tokens` each) as
/// the reference replies: the base model's behaviour, to measure drift from.
pub fn base_answers(model: &BaseModel, max_new_tokens: usize) -> Result<Vec<Conversation>> {
    let questions: Vec<Conversation> = GENERAL_PROMPTS
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

//! A personal adapter from start to finish: train a LoRA adapter on one fact, then ask the
//! base model and the adapted model the same question; prints one JSON line.
//!
//! ```sh
//! cargo run --example train_then_chat     # a tiny generated model (under a second)
//! cargo run --example train_then_chat -- --model default --steps 20 --lr 1e-3   # ~10 s
//! ```
//!
//! It shows the model library's three steps the `train` and `chat` commands wrap: encode
//! conversations with the model's chat template (`dataset::encode_conversations`), train
//! (`train::train`, which returns the adapter and its training record), and apply the adapter
//! to the decoder before a greedy `ChatSession`.

use std::sync::atomic::AtomicBool;

use anyhow::{ensure, Result};
use clap::Parser;
use hivemind_model::config::Arch;
use hivemind_model::dataset::{self, AlpacaItem};
use hivemind_model::generate::{ChatSession, SamplingParams};
use hivemind_model::testing::TinyModel;
use hivemind_model::train::{self, LoraSpec, TrainConfig};
use hivemind_model::{BaseModel, LoadOptions};

#[derive(Parser)]
struct Args {
    /// A GGUF file, a Hugging Face dir, or `default`; without it a tiny generated model.
    #[arg(long)]
    model: Option<String>,
    /// The question the adapter learns to answer.
    #[arg(long, default_value = "What is the name of our hive?")]
    question: String,
    /// Its answer.
    #[arg(long, default_value = "Our hive is called Amber.")]
    answer: String,
    /// Optimizer steps.
    #[arg(long, default_value_t = 40)]
    steps: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 5e-3)]
    lr: f64,
}

fn ask(model: &BaseModel, question: &str, max_tokens: usize) -> Result<String> {
    let greedy = SamplingParams {
        temperature: 0.0,
        ..Default::default()
    };
    let mut chat = ChatSession::new(model, None, greedy, max_tokens)?;
    Ok(chat.ask(question, |_| {})?.0)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let work = tempfile::tempdir()?;
    let path = match &args.model {
        Some(spec) => hivemind_model::pull::resolve_model(Some(spec), &mut |m| eprintln!("{m}"))?,
        None => {
            let p = work.path().join("tiny.gguf");
            TinyModel::new(Arch::Llama, 7)?.write_gguf(&p)?;
            p
        }
    };
    let mut model = BaseModel::load(&path, &LoadOptions::default())?;

    // 1. Data: one Alpaca item, encoded with the model's chat template.
    let item = AlpacaItem {
        instruction: args.question.clone(),
        input: String::new(),
        output: args.answer.clone(),
    };
    let convs = vec![item.to_conversation()];
    let (examples, _) =
        dataset::encode_conversations(&model, &path, &convs, model.decoder.cfg.max_seq_len)?;
    ensure!(
        !examples.is_empty(),
        "the fact does not fit the model's context"
    );

    // 2. Train: rank 8 on the seven projections, one example per step.
    let cfg = TrainConfig {
        lora: LoraSpec {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            ..LoraSpec::default()
        },
        lr: args.lr,
        batch_size: 1,
        grad_accum: 1,
        max_steps: Some(args.steps),
        ..TrainConfig::default()
    };
    let before = ask(&model, &args.question, 24)?;
    let stop = AtomicBool::new(false);
    let outcome = train::train(&model, &examples, &cfg, None, &stop, &mut |_| {})?;
    let adapter_dir = work.path().join("my_adapter");
    outcome.write_dir(&adapter_dir)?;

    // 3. Chat: the adapter as `chat --adapter DIR` applies it.
    let adapter = hivemind_model::adapter::LoraAdapter::read_dir(&adapter_dir)?;
    model.decoder.apply_adapter(&adapter)?;
    let after = ask(&model, &args.question, 24)?;

    let info = &outcome.info;
    let report = serde_json::json!({
        "model": model.name,
        "steps": info.steps,
        "first_loss": info.first_loss,
        "final_loss": info.final_loss,
        "answer_base": before,
        "answer_adapted": after,
        "adapted_says_the_fact": after.trim() == args.answer.trim(),
    });
    println!("{report}");
    Ok(())
}

//! `eval` on tiny generated models: its loss (inference decoder) equals the trainer's loss
//! (training forward) on the same adapter, its greedy answers are what chat answers at
//! temperature 0, training on the data raises its exact-match rate, and bad items are named.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use anyhow::Result;
use hivemind_model::config::Arch;
use hivemind_model::dataset::{self, Example};
use hivemind_model::eval::{contains, evaluate, EvalOptions};
use hivemind_model::generate::{ChatSession, SamplingParams};
use hivemind_model::testing::{random_adapter, TinyModel};
use hivemind_model::train::{self, LoraSpec, TrainConfig, Trainer};
use hivemind_model::Module;
use hivemind_model::{BaseModel, LoadOptions, ModelError};

const DATA: &str = r#"[
  {"instruction": "Who are you?", "input": "", "output": "I am HiveMind."},
  {"instruction": "Say hi", "output": "hi there"},
  {"instruction": "Add", "input": "2+2", "output": "4, of course"},
  {"instruction": "Colour of the sky?", "output": "blue"}
]"#;

fn tiny(dir: &Path) -> Result<BaseModel> {
    let path = dir.join("tiny.gguf");
    TinyModel::new(Arch::Llama, 3)?.write_gguf(&path)?;
    Ok(BaseModel::load(&path, &LoadOptions::default())?)
}

fn data() -> Result<Vec<dataset::Conversation>> {
    Ok(dataset::parse(Path::new("data.json"), DATA)?)
}

#[test]
fn eval_loss_equals_the_trainers_loss_on_the_same_adapter() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut model = tiny(dir.path())?;
    let convs = data()?;
    let (ex, _) = dataset::encode_conversations(&model, Path::new("data.json"), &convs, 256)?;
    let modules: Vec<String> = Module::ALL.iter().map(|m| m.as_str().into()).collect();
    let shape = model.decoder.cfg.adapter_shape(4, &modules)?;
    // Small values: a LoRA update of the size training makes, not one that swamps the model.
    let mut adapter = random_adapter(&shape, 8.0, 5)?;
    for t in adapter.tensors.values_mut() {
        t.data.iter_mut().for_each(|v| *v *= 0.2);
    }
    let spec = LoraSpec::from_adapter(&adapter)?;
    let mut trainer = Trainer::new(&model.decoder, &spec, Some(&adapter), 0)?;
    let per_item: Vec<(f64, usize)> = ex
        .iter()
        .map(|e| {
            let l = trainer.evaluate(&[e])?;
            Ok((l.mean(), l.targets))
        })
        .collect::<Result<_>>()?;
    drop(trainer);
    model.decoder.apply_adapter(&adapter)?;
    let report = evaluate(
        &model,
        Path::new("data.json"),
        &convs,
        &EvalOptions::default(),
        |_, _| {},
    )?;
    assert_eq!(report.items, 4);
    for (s, (loss, targets)) in report.scores.iter().zip(&per_item) {
        assert_eq!(s.targets, *targets, "item {}", s.index);
        assert!(
            (s.loss - loss).abs() < 1e-3 * loss.max(1.0),
            "item {}: eval loss {} vs trainer loss {loss}",
            s.index,
            s.loss
        );
    }
    let total: usize = per_item.iter().map(|p| p.1).sum();
    let mean = per_item.iter().map(|(l, t)| l * *t as f64).sum::<f64>() / total as f64;
    assert_eq!(report.targets, total);
    assert!((report.mean_loss - mean).abs() < 1e-3 * mean.max(1.0));
    assert!((report.perplexity - mean.exp()).abs() < 1e-2 * mean.exp());
    Ok(())
}

#[test]
fn eval_answers_are_chats_greedy_answers_and_training_raises_exact_match() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut model = tiny(dir.path())?;
    let convs = data()?;
    let opts = EvalOptions {
        max_len: 256,
        max_new_tokens: 24,
    };
    let before = evaluate(&model, Path::new("data.json"), &convs, &opts, |_, _| {})?;

    let (ex, _) = dataset::encode_conversations(&model, Path::new("data.json"), &convs, 256)?;
    let cfg = TrainConfig {
        lora: LoraSpec {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: Module::ALL.to_vec(),
        },
        lr: 1e-2,
        epochs: 40,
        batch_size: 4,
        grad_accum: 1,
        warmup_ratio: 0.0,
        schedule: train::LrSchedule::Constant,
        max_seq_len: 256,
        max_steps: None,
        seed: 1,
        weight_decay: 0.0,
        max_grad_norm: Some(1.0),
        protect: None,
    };
    let refs: Vec<Example> = ex;
    let out = train::train(
        &model,
        &refs,
        &cfg,
        None,
        &AtomicBool::new(false),
        &mut |_| {},
    )?;
    model.decoder.apply_adapter(&out.adapter)?;
    let mut seen = Vec::new();
    let after = evaluate(
        &model,
        Path::new("data.json"),
        &convs,
        &opts,
        |done, total| seen.push((done, total)),
    )?;
    assert_eq!(seen, vec![(1, 4), (2, 4), (3, 4), (4, 4)]);
    eprintln!(
        "exact match {} -> {}, loss {} -> {}",
        before.exact_match, after.exact_match, before.mean_loss, after.mean_loss
    );
    assert!(after.mean_loss < before.mean_loss / 10.0);
    assert!(
        after.exact_match >= 0.75 && after.exact_match > before.exact_match,
        "exact match {} -> {}: {:#?}",
        before.exact_match,
        after.exact_match,
        after.scores
    );
    // The same answers as chat at temperature 0 without a repeat penalty.
    for s in &after.scores {
        let params = SamplingParams {
            temperature: 0.0,
            repeat_penalty: 1.0,
            ..Default::default()
        };
        let mut chat = ChatSession::new(&model, None, params, opts.max_new_tokens)?;
        let (answer, _) = chat.ask(&s.prompt, |_| {})?;
        assert_eq!(answer.trim(), s.answer.trim(), "item {}", s.index);
        assert_eq!(s.exact, s.answer.trim() == s.expected.trim());
    }
    Ok(())
}

#[test]
fn contains_ignores_case_and_a_final_full_stop() {
    assert!(contains(
        "Sure: valentina works at veltrix labs",
        "Valentina works at Veltrix Labs."
    ));
    assert!(contains("blue", " blue "));
    assert!(!contains(
        "Valentina works at Veltrix",
        "Valentina works at Veltrix Labs."
    ));
    assert!(!contains("anything", ""));
}

#[test]
fn an_item_without_an_assistant_turn_is_named() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = tiny(dir.path())?;
    let mut convs = data()?;
    convs[2].messages.truncate(1);
    let err = evaluate(
        &model,
        Path::new("facts.json"),
        &convs,
        &EvalOptions::default(),
        |_, _| {},
    )
    .err()
    .ok_or_else(|| anyhow::anyhow!("an item without an answer was accepted"))?;
    assert!(
        matches!(err, ModelError::Dataset { index: Some(2), .. }),
        "{err}"
    );
    assert!(err.to_string().contains("facts.json"), "{err}");
    Ok(())
}

#[test]
fn the_base_model_agrees_with_its_own_general_answers_and_an_adapter_changes_them() -> Result<()> {
    use hivemind_model::general::{base_answers, GENERAL_PROMPTS};
    let dir = tempfile::tempdir()?;
    let mut model = tiny(dir.path())?;
    let general = base_answers(&model, 8)?;
    assert_eq!(general.len(), GENERAL_PROMPTS.len());
    let opts = EvalOptions {
        max_len: 256,
        max_new_tokens: 8,
    };
    let own = evaluate(&model, Path::new("general"), &general, &opts, |_, _| {})?;
    assert_eq!(
        own.exact_match, 1.0,
        "greedy answers changed between two runs"
    );
    let modules: Vec<String> = Module::ALL.iter().map(|m| m.as_str().into()).collect();
    let shape = model.decoder.cfg.adapter_shape(4, &modules)?;
    model
        .decoder
        .apply_adapter(&random_adapter(&shape, 8.0, 9)?)?;
    let drifted = evaluate(&model, Path::new("general"), &general, &opts, |_, _| {})?;
    assert!((drifted.mean_loss - own.mean_loss).abs() > 1e-3);
    assert!(drifted.exact_match < 1.0);
    Ok(())
}

//! The training loop on tiny generated models: it learns (the loss of a few examples falls by a
//! large factor), it is reproducible to the byte, its output is a PEFT adapter dir that the decoder
//! applies, it continues from an adapter, it stops cleanly; plus the data pipeline (parsing,
//! errors, assistant-only targets, batching), the schedule and AdamW against naive references.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Result;
use hivemind_model::adapter::LoraAdapter;
use hivemind_model::chat::Role;
use hivemind_model::config::Arch;
use hivemind_model::dataset::{self, Example};
use hivemind_model::testing::TinyModel;
use hivemind_model::train::{self, InputGrams, LoraSpec, ProtectedInputs, TrainConfig, Trainer};
use hivemind_model::Module;
use hivemind_model::{BaseModel, LoadOptions, ModelError};

fn tiny(arch: Arch, dir: &Path) -> Result<BaseModel> {
    let path = dir.join("tiny.gguf");
    TinyModel::new(arch, 3)?.write_gguf(&path)?;
    Ok(BaseModel::load(&path, &LoadOptions::default())?)
}

const DATA: &str = r#"[
  {"instruction": "Who are you?", "input": "", "output": "I am HiveMind."},
  {"instruction": "Say hi", "output": "hi there"},
  {"instruction": "Add", "input": "2+2", "output": "4, of course"},
  {"instruction": "Colour of the sky?", "output": "blue"}
]"#;

fn examples(model: &BaseModel) -> Result<Vec<Example>> {
    let convs = dataset::parse(Path::new("data.json"), DATA)?;
    let (ex, stats) = dataset::encode_conversations(model, Path::new("data.json"), &convs, 256)?;
    assert_eq!(stats.skipped, 0);
    Ok(ex)
}

fn config(epochs: usize, seed: u64) -> TrainConfig {
    TrainConfig {
        lora: LoraSpec {
            rank: 8,
            alpha: 16.0,
            dropout: 0.05,
            target_modules: Module::ALL.to_vec(),
        },
        lr: 1e-2,
        epochs,
        batch_size: 2,
        grad_accum: 1,
        warmup_ratio: 0.03,
        schedule: train::LrSchedule::Linear,
        max_seq_len: 256,
        max_steps: None,
        seed,
        weight_decay: 0.0,
        max_grad_norm: Some(1.0),
        protect: None,
    }
}

fn run(model: &BaseModel, ex: &[Example], cfg: &TrainConfig) -> Result<train::TrainOutcome> {
    let stop = AtomicBool::new(false);
    Ok(train::train(model, ex, cfg, None, &stop, &mut |_| {})?)
}

#[test]
fn tiny_model_overfits_a_few_examples() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = tiny(Arch::Llama, dir.path())?;
    let ex = examples(&model)?;
    let mut losses = Vec::new();
    let stop = AtomicBool::new(false);
    let out = train::train(&model, &ex, &config(40, 1), None, &stop, &mut |p| {
        losses.push(p.loss)
    })?;
    assert_eq!(out.info.steps, 80);
    assert_eq!(losses.len(), 80);
    let first = out.info.first_loss.expect("first loss");
    let last = out.info.final_loss.expect("final loss");
    // Without dropout the trained adapter's loss on the data, measured independently.
    let refs: Vec<&Example> = ex.iter().collect();
    let mut base = Trainer::new(&model.decoder, &config(1, 1).lora, None, 1)?;
    let before = base.evaluate(&refs)?.mean();
    let mut trained = Trainer::new(&model.decoder, &config(1, 1).lora, Some(&out.adapter), 1)?;
    let after = trained.evaluate(&refs)?.mean();
    assert!(
        (before - first).abs() < 0.5 * before,
        "first step loss {first} vs base loss {before}"
    );
    eprintln!("overfit: base loss {before}, first step {first}, last step {last}, trained {after}");
    assert!(
        after < before / 100.0,
        "loss fell only from {before} to {after} (last step {last})"
    );
    Ok(())
}

#[test]
fn same_data_and_seed_give_the_same_adapter_bytes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = tiny(Arch::Qwen2, dir.path())?;
    let ex = examples(&model)?;
    let a = run(&model, &ex, &config(3, 7))?;
    let b = run(&model, &ex, &config(3, 7))?;
    let c = run(&model, &ex, &config(3, 8))?;
    let bytes = |o: &train::TrainOutcome| o.adapter.to_safetensors_bytes();
    assert_eq!(bytes(&a)?, bytes(&b)?);
    assert_ne!(bytes(&a)?, bytes(&c)?);
    assert_eq!(a.info.final_loss, b.info.final_loss);
    // And through the files.
    a.write_dir(&dir.path().join("a"))?;
    b.write_dir(&dir.path().join("b"))?;
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        assert_eq!(
            std::fs::read(dir.path().join("a").join(f))?,
            std::fs::read(dir.path().join("b").join(f))?
        );
    }
    Ok(())
}

#[test]
fn output_dir_is_a_peft_adapter_the_decoder_applies() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut model = tiny(Arch::Llama, dir.path())?;
    let ex = examples(&model)?;
    let out = run(&model, &ex, &config(2, 3))?;
    let out_dir = dir.path().join("adapter");
    out.write_dir(&out_dir)?;
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("adapter_config.json"))?)?;
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["r"], 8);
    assert_eq!(cfg["lora_alpha"], 16);
    assert_eq!(cfg["lora_dropout"], 0.05);
    assert_eq!(cfg["bias"], "none");
    assert_eq!(cfg["base_model_name_or_path"], "tiny");
    let mut targets: Vec<String> = cfg["target_modules"]
        .as_array()
        .expect("list")
        .iter()
        .map(|v| v.as_str().expect("str").to_string())
        .collect();
    targets.sort();
    let mut want: Vec<String> = Module::ALL.iter().map(|m| m.to_string()).collect();
    want.sort();
    assert_eq!(targets, want);

    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("training_info.json"))?)?;
    assert_eq!(info["samples"], 4);
    assert_eq!(info["epochs"], 2);
    assert_eq!(info["steps"], 4);
    assert_eq!(info["base_model"], "tiny");
    assert_eq!(info["base_model_hash"], model.hash.to_hex());
    for key in [
        "final_loss",
        "seconds",
        "tokens_per_second",
        "peak_memory_mib",
    ] {
        assert!(
            info[key].as_f64().is_some_and(|v| v > 0.0),
            "{key}: {}",
            info[key]
        );
    }

    let read = LoraAdapter::read_dir(&out_dir)?;
    assert_eq!(read, out.adapter);
    assert_eq!(read.tensors.len(), 2 * 7 * model.decoder.cfg.num_layers);
    let a = &read.tensors["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"];
    assert_eq!(a.shape, vec![8, model.decoder.cfg.intermediate_size]);
    let b = &read.tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"];
    assert_eq!(
        b.shape,
        vec![
            model.decoder.cfg.num_kv_heads * model.decoder.cfg.head_dim,
            8
        ]
    );
    assert!(b.data.iter().any(|&v| v != 0.0), "B was trained");
    model.decoder.apply_adapter(&read)?;
    Ok(())
}

#[test]
fn training_continues_from_an_initial_adapter() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = tiny(Arch::Qwen2, dir.path())?;
    let ex = examples(&model)?;
    let mut cfg = config(10, 5);
    cfg.lora.dropout = 0.0;
    let first = run(&model, &ex, &cfg)?;
    let stop = AtomicBool::new(false);
    let mut cfg2 = cfg.clone();
    cfg2.lora = LoraSpec::from_adapter(&first.adapter)?;
    cfg2.epochs = 1;
    let cont = train::train(&model, &ex, &cfg2, Some(&first.adapter), &stop, &mut |_| {})?;
    let fresh = run(
        &model,
        &ex,
        &TrainConfig {
            epochs: 1,
            ..cfg.clone()
        },
    )?;
    let (c, f) = (
        cont.info.first_loss.expect("loss"),
        fresh.info.first_loss.expect("loss"),
    );
    assert!(
        c < f / 3.0,
        "continued run starts at {c}, a fresh one at {f}"
    );
    // A mismatching initial adapter is refused.
    let mut wrong = cfg.lora.clone();
    wrong.rank = 4;
    let Err(err) = Trainer::new(&model.decoder, &wrong, Some(&first.adapter), 1) else {
        panic!("a rank-4 spec accepted a rank-8 adapter");
    };
    assert!(matches!(err, ModelError::AdapterMismatch { .. }), "{err}");
    Ok(())
}

#[test]
fn a_stop_request_ends_after_the_current_step_with_the_adapter_so_far() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = tiny(Arch::Llama, dir.path())?;
    let ex = examples(&model)?;
    let stop = AtomicBool::new(false);
    let mut steps = 0;
    let out = train::train(&model, &ex, &config(50, 2), None, &stop, &mut |p| {
        steps = p.step;
        if p.step == 3 {
            stop.store(true, Ordering::Relaxed);
        }
    })?;
    assert_eq!(steps, 3);
    assert_eq!(out.info.steps, 3);
    assert!(out.info.interrupted);
    assert_eq!(out.info.total_steps, 100);
    Ok(())
}

#[test]
fn schedule_warms_up_from_the_first_step_then_follows_its_shape() -> Result<()> {
    use train::LrSchedule::{Constant, Cosine, Linear};
    // After the warmup, Hugging Face's get_linear_schedule_with_warmup(num_warmup_steps=2,
    // num_training_steps=10); the warmup starts at lr/2, not at 0.
    let want = [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125];
    for (s, w) in want.iter().enumerate() {
        assert!(
            (train::lr_at(1.0, s, 2, 10, Linear) - w).abs() < 1e-12,
            "step {s}"
        );
    }
    // get_cosine_schedule_with_warmup: 0.5 * (1 + cos(pi * progress)) after the warmup.
    let cosine = [
        0.5, 1.0, 1.0, 0.96194, 0.85355, 0.69134, 0.5, 0.30866, 0.14645, 0.03806,
    ];
    for (s, w) in cosine.iter().enumerate() {
        assert!(
            (train::lr_at(1.0, s, 2, 10, Cosine) - w).abs() < 1e-5,
            "step {s}"
        );
    }
    for s in 0..10 {
        let w = if s == 0 { 0.5 } else { 1.0 };
        assert_eq!(train::lr_at(1.0, s, 2, 10, Constant), w, "step {s}");
    }
    assert_eq!(train::lr_at(2e-4, 0, 0, 5, Linear), 2e-4);
    assert_eq!("cosine".parse::<train::LrSchedule>()?, Cosine);
    assert!("step".parse::<train::LrSchedule>().is_err());
    let cfg = TrainConfig::default();
    // The legacy defaults on six examples: two micro-batches an epoch, one step an epoch.
    assert_eq!(train::planned_steps(6, &cfg), 3);
    Ok(())
}

/// AdamW against a naive f64 transcription of PyTorch's update (decoupled decay, bias
/// correction), driven by the trainer's own gradients over three steps.
#[test]
fn adamw_matches_a_naive_reference() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = tiny(Arch::Llama, dir.path())?;
    let ex = examples(&model)?;
    let refs: Vec<&Example> = ex.iter().collect();
    let mut spec = config(1, 1).lora;
    spec.dropout = 0.0;
    let mut t = Trainer::new(&model.decoder, &spec, None, 9)?;
    t.set_optimizer(0.1, None);
    let params = |t: &Trainer| -> Result<Vec<(String, Vec<f64>)>> {
        Ok(t.adapter(None)?
            .tensors
            .into_iter()
            .map(|(k, v)| (k, v.data.iter().map(|&x| x as f64).collect()))
            .collect())
    };
    let mut p = params(&t)?;
    let mut m: Vec<Vec<f64>> = p.iter().map(|(_, v)| vec![0.0; v.len()]).collect();
    let mut v = m.clone();
    let (b1, b2, eps, lr, wd) = (0.9f64, 0.999f64, 1e-8f64, 1e-2f64, 0.1f64);
    for step in 1..=3 {
        t.accumulate(&refs, 0.01)?;
        let g = t.gradients();
        t.optimizer_step(lr);
        for (i, (name, pv)) in p.iter_mut().enumerate() {
            for (j, x) in pv.iter_mut().enumerate() {
                let gj = g[name][j] as f64;
                *x *= 1.0 - lr * wd;
                m[i][j] = b1 * m[i][j] + (1.0 - b1) * gj;
                v[i][j] = b2 * v[i][j] + (1.0 - b2) * gj * gj;
                let mh = m[i][j] / (1.0 - b1.powi(step));
                let vh = v[i][j] / (1.0 - b2.powi(step));
                *x -= lr * mh / (vh.sqrt() + eps);
            }
        }
        let got = params(&t)?;
        for ((name, want), (_, have)) in p.iter().zip(&got) {
            for (a, b) in want.iter().zip(have) {
                assert!((a - b).abs() < 1e-5, "step {step} {name}: {a} vs {b}");
            }
        }
    }
    assert!(
        t.gradients().values().flatten().all(|&g| g == 0.0),
        "step clears gradients"
    );
    Ok(())
}

#[test]
fn only_assistant_tokens_are_targets() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = tiny(Arch::Llama, dir.path())?;
    let text = r#"{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi!"}, {"from": "human", "value": "Name?"}, {"from": "gpt", "value": "HiveMind"}]}
{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
"#;
    let convs = dataset::parse(Path::new("chat.jsonl"), text)?;
    assert_eq!(convs.len(), 2);
    assert_eq!(convs[0].messages[0].role, Role::System);
    assert_eq!(convs[0].messages[4].role, Role::Assistant);
    let (ex, _) = dataset::encode_conversations(&model, Path::new("chat.jsonl"), &convs, 1000)?;
    let tok = &model.tokenizer;
    let learned = |e: &Example| -> Result<String> {
        let ids: Vec<u32> = e
            .ids
            .iter()
            .zip(&e.targets)
            .filter(|(_, &t)| t)
            .map(|(&i, _)| i)
            .collect();
        Ok(tok.decode(&ids, false)?)
    };
    assert_eq!(learned(&ex[0])?, "Hi!<|im_end|>\nHiveMind<|im_end|>\n");
    assert_eq!(learned(&ex[1])?, "y<|im_end|>\n");
    assert_eq!(
        tok.decode(&ex[1].ids, false)?,
        "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\ny<|im_end|>\n"
    );
    // Truncation keeps the prefix; an example with no target left is skipped.
    let limit = ex[1].len() - 1;
    let (cut, stats) = dataset::encode_conversations(&model, Path::new("c"), &convs, limit)?;
    assert_eq!(stats.truncated, 2);
    assert_eq!(
        stats.skipped, 1,
        "the first conversation's answers start after {limit} tokens"
    );
    assert_eq!(cut.len(), 1);
    assert_eq!(cut[0].ids, ex[1].ids[..limit]);
    assert_eq!(learned(&cut[0])?, "y<|im_end|>");
    Ok(())
}

#[test]
fn bad_data_names_the_file_the_item_and_the_problem() {
    let p = Path::new("/data/my.json");
    let cases = [
        (
            r#"[{"instruction": "a", "output": "b"}, {"instruction": "c"}]"#,
            Some(1),
            "missing \"output\"",
        ),
        (
            r#"[{"instruction": "a", "output": 3}]"#,
            Some(0),
            "\"output\" must be a string",
        ),
        (
            "{\"instruction\": \"a\", \"output\": \"b\"}\n\nnot json\n",
            Some(1),
            "line 3",
        ),
        (
            r#"[{"conversations": [{"from": "human", "value": "hi"}]}]"#,
            Some(0),
            "no assistant turn",
        ),
        (
            r#"[{"conversations": [{"from": "alien", "value": "hi"}]}]"#,
            Some(0),
            "unknown role \"alien\"",
        ),
        (r#"[{"text": "hi"}]"#, Some(0), "neither Alpaca"),
        (r#"[1]"#, Some(0), "expected a JSON object"),
        ("[", None, "not a JSON array"),
        ("", None, "no training items"),
    ];
    for (text, index, needle) in cases {
        let Err(err) = dataset::parse(p, text) else {
            panic!("{text}: accepted");
        };
        match &err {
            ModelError::Dataset {
                path,
                index: i,
                reason,
            } => {
                assert_eq!(path, p);
                assert_eq!(*i, index, "{text}: {err}");
                assert!(reason.contains(needle), "{text}: {reason}");
            }
            other => panic!("{text}: unexpected error {other}"),
        }
        assert!(err.to_string().starts_with("/data/my.json: "), "{err}");
    }
}

#[test]
fn batches_group_similar_lengths_and_cover_every_example_once() {
    let lens: Vec<usize> = (0..103).map(|i| (i * 37) % 101 + 1).collect();
    let a = dataset::length_grouped_batches(&lens, 4, 7, 0);
    assert_eq!(a, dataset::length_grouped_batches(&lens, 4, 7, 0));
    assert_ne!(a, dataset::length_grouped_batches(&lens, 4, 7, 1));
    let mut all: Vec<usize> = a.iter().flatten().copied().collect();
    all.sort();
    assert_eq!(all, (0..103).collect::<Vec<_>>());
    assert!(a.iter().all(|b| !b.is_empty() && b.len() <= 4));
    // Padding waste (tokens a padded batch would add) is far below a random split's.
    let waste = |bs: &[Vec<usize>]| -> usize {
        bs.iter()
            .map(|b| {
                let m = b.iter().map(|&i| lens[i]).max().unwrap_or(0);
                b.iter().map(|&i| m - lens[i]).sum::<usize>()
            })
            .sum()
    };
    let random: Vec<Vec<usize>> = (0..103)
        .collect::<Vec<_>>()
        .chunks(4)
        .map(<[usize]>::to_vec)
        .collect();
    assert!(
        waste(&a) * 4 < waste(&random),
        "{} vs {}",
        waste(&a),
        waste(&random)
    );
}

#[test]
fn the_sample_dataset_has_the_six_legacy_examples() -> Result<()> {
    let items = dataset::sample_items();
    assert_eq!(items.len(), 6);
    assert!(items[0].instruction.contains("你是谁") && items[0].output.contains("HiveMind"));
    let json = serde_json::to_string(&items)?;
    let convs = dataset::parse(Path::new("sample.json"), &json)?;
    assert_eq!(convs.len(), 6);
    Ok(())
}

/// A Hugging Face safetensors directory trains both quantized at load (Q4_1 blocks) and dense
/// (`no_4bit`), and the two runs agree closely (same weights up to 4-bit rounding).
#[test]
fn hf_directories_train_quantized_and_dense() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hf = dir.path().join("tiny-hf");
    TinyModel::new(Arch::Qwen2, 4)?.write_hf_dir(&hf)?;
    let mut finals = Vec::new();
    for no_4bit in [false, true] {
        let model = BaseModel::load(&hf, &LoadOptions { no_4bit })?;
        let quantized = matches!(
            model.decoder.layers[0].q_proj.weight,
            hivemind_model::decoder::Weight::Blocks(_)
        );
        assert_eq!(quantized, !no_4bit);
        let ex = examples(&model)?;
        let out = run(&model, &ex, &config(10, 1))?;
        let (first, last) = (
            out.info.first_loss.expect("loss"),
            out.info.final_loss.expect("loss"),
        );
        assert!(last < first / 5.0, "no_4bit={no_4bit}: {first} -> {last}");
        finals.push(out.info.first_loss.expect("loss"));
    }
    assert!(
        (finals[0] - finals[1]).abs() < 0.05 * finals[1],
        "quantized vs dense first loss {finals:?}"
    );
    Ok(())
}

/// Training on top of an adapter already applied to the decoder (a round adapter of another
/// rank): the applied pairs are frozen, the loss is the one inference sees with both applied
/// (`stack`), and the trained pairs' gradients are the matching part of the gradients of the
/// stacked adapter trained as a whole (B's times its scaling, as the stack folds it in).
#[test]
fn training_on_top_of_an_applied_adapter_sees_both_and_learns_only_its_own() -> Result<()> {
    use hivemind_model::aggregate::stack;
    use hivemind_model::eval::{evaluate, EvalOptions};
    use hivemind_model::testing::random_adapter;
    let dir = tempfile::tempdir()?;
    let mut model = tiny(Arch::Llama, dir.path())?;
    let ex = examples(&model)?;
    let refs: Vec<&Example> = ex.iter().collect();
    let all: Vec<String> = Module::ALL.iter().map(|m| m.as_str().into()).collect();
    let small = |mut a: hivemind_model::adapter::LoraAdapter, by: f32| {
        a.tensors
            .values_mut()
            .for_each(|t| t.data.iter_mut().for_each(|v| *v *= by));
        a
    };
    // The frozen one: rank 6 on every module; the trained one: rank 4 on q and v.
    let frozen = small(
        random_adapter(&model.decoder.cfg.adapter_shape(6, &all)?, 12.0, 1)?,
        0.2,
    );
    let qv: Vec<String> = vec!["q_proj".into(), "v_proj".into()];
    let trained = small(
        random_adapter(&model.decoder.cfg.adapter_shape(4, &qv)?, 8.0, 2)?,
        0.2,
    );
    let mut spec = LoraSpec::from_adapter(&trained)?;
    spec.dropout = 0.0;

    model.decoder.apply_adapter(&frozen)?;
    let mut on_top = Trainer::new(&model.decoder, &spec, Some(&trained), 0)?;
    let loss = on_top.accumulate(&refs, 1.0)?;
    let grads = on_top.gradients();
    drop(on_top);

    // Reference 1: the inference decoder with both applied.
    let both = stack(&[&frozen, &trained])?;
    model.decoder.apply_adapter(&both)?;
    let convs = dataset::parse(Path::new("data.json"), DATA)?;
    let report = evaluate(
        &model,
        Path::new("data.json"),
        &convs,
        &EvalOptions::default(),
        |_, _| {},
    )?;
    let want = report.mean_loss * report.targets as f64;
    assert!(
        (loss.loss_sum - want).abs() < 1e-3 * want,
        "trainer on top {} vs inference with both {want}",
        loss.loss_sum
    );

    // Reference 2: the stacked adapter trained as a whole on the clean decoder.
    model.decoder.remove_adapter();
    let mut whole_spec = LoraSpec::from_adapter(&both)?;
    whole_spec.dropout = 0.0;
    let mut whole = Trainer::new(&model.decoder, &whole_spec, Some(&both), 0)?;
    whole.accumulate(&refs, 1.0)?;
    let whole_grads = whole.gradients();
    let s = trained.config.scaling() as f32;
    let (r0, r1) = (frozen.config.r, trained.config.r);
    let mut checked = 0;
    for (name, g) in &grads {
        let w = &whole_grads[name];
        let t = &trained.tensors[name];
        let part: Vec<f32> = if name.contains("lora_A") {
            // Rows r0..r0+r1 of the stacked A.
            let inp = t.shape[1];
            w[r0 * inp..(r0 + r1) * inp].to_vec()
        } else {
            // Columns r0..r0+r1 of the stacked B, times the trained adapter's scaling.
            let out = t.shape[0];
            let rr = r0 + r1;
            (0..out)
                .flat_map(|i| (r0..rr).map(move |k| (i, k)))
                .map(|(i, k)| w[i * rr + k] * s)
                .collect()
        };
        let norm = part.iter().map(|x| x * x).sum::<f32>().sqrt();
        let err = g
            .iter()
            .zip(&part)
            .map(|(x, y)| (x - y).powi(2))
            .sum::<f32>()
            .sqrt();
        assert!(
            err <= 1e-3 * norm + 1e-6,
            "{name}: error {err} of norm {norm}"
        );
        checked += 1;
    }
    assert_eq!(checked, trained.tensors.len());
    Ok(())
}

/// Replaying the base model's own answers keeps them: after the same training on the data,
/// the replaying adapter still gives the base model's greedy answers (token for token) to the
/// replayed prompts and to more of the held-out general prompts than the plain adapter, the
/// data is learned as well, and the record says what was replayed. (On a random tiny model
/// this shows the mechanism; `examples/learning_bench.rs` measures drift on the default model.)
#[test]
fn replay_keeps_the_base_models_answers_while_the_data_is_learned() -> Result<()> {
    use hivemind_model::general::{own_answers, replay_examples, GENERAL_PROMPTS, REPLAY_PROMPTS};
    let dir = tempfile::tempdir()?;
    let mut model = tiny(Arch::Llama, dir.path())?;
    let ex = examples(&model)?;
    let pool = replay_examples(&model, 8, 12)?;
    assert_eq!(pool.len(), 8);
    let held_out = own_answers(&model, &GENERAL_PROMPTS, 12)?;
    let cfg = config(30, 1);
    let stop = AtomicBool::new(false);
    let plain = run(&model, &ex, &cfg)?;
    let replay = train::Replay {
        examples: &pool,
        per_step: 2,
        weight: 1.0,
    };
    let kept = train::train_with_replay(&model, &ex, Some(replay), &cfg, None, &stop, &mut |_| {})?;
    assert_eq!(
        (kept.info.replay_examples, plain.info.replay_examples),
        (8, 0)
    );
    assert!(kept.info.final_replay_loss.is_some());

    // The fraction of `base`'s answers that `adapter` gives token for token.
    let mut same = |adapter: &LoraAdapter, prompts: &[&str], base: &[Example]| -> Result<f64> {
        model.decoder.apply_adapter(adapter)?;
        let now = own_answers(&model, prompts, 12);
        model.decoder.remove_adapter();
        let now = now?;
        Ok(now.iter().zip(base).filter(|(a, b)| a.ids == b.ids).count() as f64 / base.len() as f64)
    };
    let replayed = &REPLAY_PROMPTS[..8];
    let plain_same = (
        same(&plain.adapter, replayed, &pool)?,
        same(&plain.adapter, &GENERAL_PROMPTS, &held_out)?,
    );
    let kept_same = (
        same(&kept.adapter, replayed, &pool)?,
        same(&kept.adapter, &GENERAL_PROMPTS, &held_out)?,
    );
    let data_loss = |adapter: &LoraAdapter| -> Result<f64> {
        let refs: Vec<&Example> = ex.iter().collect();
        let mut spec = cfg.lora.clone();
        spec.dropout = 0.0;
        Ok(Trainer::new(&model.decoder, &spec, Some(adapter), 1)?
            .evaluate(&refs)?
            .mean())
    };
    let (plain_loss, kept_loss) = (data_loss(&plain.adapter)?, data_loss(&kept.adapter)?);
    eprintln!(
        "same answers (replayed, held out): plain {plain_same:?}, replaying {kept_same:?}; \
         data loss: plain {plain_loss}, replaying {kept_loss}"
    );
    assert_eq!(kept_same.0, 1.0, "the replayed answers are not kept");
    assert!(
        plain_same.0 < 1.0,
        "plain training kept every replayed answer: nothing to show"
    );
    assert!(
        kept_same.1 > plain_same.1,
        "held-out answers kept: replaying {} vs plain {}",
        kept_same.1,
        plain_same.1
    );
    assert!(
        kept_loss < 0.01 && plain_loss < 0.01,
        "the data is not learned: {kept_loss}, {plain_loss}"
    );
    Ok(())
}

/// Other conversations than [`DATA`]: the "general" inputs a protected training keeps.
const GENERAL: &str = r#"[
  {"instruction": "Name a fruit", "output": "an apple"}
]"#;

#[test]
fn protected_inputs_keep_the_model_on_them_while_it_learns() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = tiny(Arch::Llama, dir.path())?;
    let ex = examples(&model)?;
    let convs = dataset::parse(Path::new("general.json"), GENERAL)?;
    let (general, _) =
        dataset::encode_conversations(&model, Path::new("general.json"), &convs, 256)?;
    let general_refs: Vec<&Example> = general.iter().collect();
    let tokens: usize = general.iter().map(Example::len).sum();
    assert!(
        tokens < 64,
        "the general inputs must leave directions free ({tokens} tokens)"
    );
    // The directions every module input takes on the general conversations.
    let lora = config(1, 1).lora;
    let mut probe = Trainer::new(&model.decoder, &lora, None, 1)?;
    let mut grams = InputGrams::default();
    probe.accumulate_input_grams(&general_refs, &mut grams)?;
    assert_eq!(grams.tokens, tokens);
    let protect = Arc::new(ProtectedInputs::from_grams(&grams, 0.99999, 128)?);
    let (energy, dims) = protect.summary();
    assert!(
        energy >= 0.99999 && dims <= tokens as f64,
        "{energy} {dims}"
    );

    let free = run(&model, &ex, &config(20, 1))?;
    let kept = run(
        &model,
        &ex,
        &TrainConfig {
            protect: Some(protect.clone()),
            ..config(20, 1)
        },
    )?;
    // Every trained A is orthogonal to its input's protected directions.
    for l in 0..model.decoder.layers.len() {
        for m in Module::ALL {
            let name = hivemind_model::lora::peft_name(l, m, "A");
            let a = &kept.adapter.tensors[&name].data;
            let mut projected = a.clone();
            protect
                .of(l, m)
                .expect("a basis")
                .project_out(&mut projected);
            let moved: f32 = a.iter().zip(&projected).map(|(x, y)| (x - y).abs()).sum();
            let size: f32 = a.iter().map(|x| x.abs()).sum();
            assert!(moved <= 1e-4 * size, "{name}: {moved} of {size}");
        }
    }
    let loss = |adapter: Option<&LoraAdapter>, on: &[&Example]| -> Result<f64> {
        Ok(Trainer::new(&model.decoder, &lora, adapter, 1)?
            .evaluate(on)?
            .mean())
    };
    let base = loss(None, &general_refs)?;
    let free_drift = (loss(Some(&free.adapter), &general_refs)? - base).abs();
    let kept_drift = (loss(Some(&kept.adapter), &general_refs)? - base).abs();
    eprintln!("general loss {base}: moved {free_drift} free, {kept_drift} protected");
    assert!(
        kept_drift < 1e-3 * base,
        "protected training moved it by {kept_drift}"
    );
    assert!(
        free_drift > 100.0 * kept_drift,
        "{free_drift} vs {kept_drift}"
    );
    // And it still learns the data.
    let refs: Vec<&Example> = ex.iter().collect();
    let (before, after) = (loss(None, &refs)?, loss(Some(&kept.adapter), &refs)?);
    assert!(after < before / 4.0, "loss {before} -> {after}");
    // Continuing an adapter under protection would erase its A's protected part: refused.
    let stop = AtomicBool::new(false);
    let cfg = TrainConfig {
        protect: Some(protect.clone()),
        ..config(1, 1)
    };
    let err = train::train(&model, &ex, &cfg, Some(&free.adapter), &stop, &mut |_| {})
        .expect_err("protected continuation");
    assert!(err.to_string().contains("fresh adapter"), "{err}");
    // And a basis of another model's width is refused, not applied to the wrong rows.
    let mut wrong = (*protect).clone();
    wrong.layers.pop();
    let cfg = TrainConfig {
        protect: Some(Arc::new(wrong)),
        ..config(1, 1)
    };
    let err = train::train(&model, &ex, &cfg, None, &stop, &mut |_| {}).expect_err("mismatch");
    assert!(err.to_string().contains("layers"), "{err}");
    Ok(())
}

//! Training speed and memory against the PEFT baseline, on the default model.
//!
//! The job (the same in tools/reference/peft_train_baseline.py): SmolLM2-135M-Instruct Q4_1, LoRA
//! r=16, alpha=32, dropout 0.05 on the seven projections, AdamW lr 2e-4, one fixed batch of 4 x 128
//! tokens (`id(b, t) = ((b*128 + t) * 7919 + 13) % vocab`, every next token a target), 5 optimizer
//! steps. Prints one JSON object: HiveMind's tokens/s and peak RSS, PEFT's (run as a child process
//! in the same session, after HiveMind finished), and the ratios against the bar (>= 1.0x PEFT's
//! tokens/s at <= 0.5x its peak RSS).
//!
//! ```text
//! cargo run --release -p hivemind-model --example bench_train -- \
//!     [--model PATH] [--steps 5] [--threads N] [--python /tmp/hfvenv/bin/python] [--no-baseline]
//!     [--batch 4 --seq 128]
//! ```
//! `--threads N` runs both sides on N threads (default: all cores, torch's default too). On a
//! loaded machine torch's OpenMP threads spin-wait and slow down far more than rayon's, so compare
//! runs on an idle machine, or with `--threads 1` for a per-core comparison.

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use hivemind_model::dataset::Example;
use hivemind_model::train::{peak_rss_bytes, LoraSpec, Trainer};
use hivemind_model::Module;
use hivemind_model::{BaseModel, LoadOptions};
use serde_json::{json, Value};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let model_path = arg(&args, "--model")
        .map(Into::into)
        .unwrap_or_else(hivemind_model::pull::default_model_path);
    let steps: usize = arg(&args, "--steps").map_or(Ok(5), |s| s.parse())?;
    let python = arg(&args, "--python").unwrap_or_else(|| "/tmp/hfvenv/bin/python".into());
    // `--batch`/`--seq` shrink the job for large models (a 7B step on 512 tokens takes minutes
    // here); the PEFT baseline runs only the 4 x 128 job.
    let batch: usize = arg(&args, "--batch").map_or(Ok(4), |s| s.parse())?;
    let seq: usize = arg(&args, "--seq").map_or(Ok(128), |s| s.parse())?;
    if batch == 0 || seq < 2 {
        anyhow::bail!("--batch must be at least 1 and --seq at least 2");
    }
    if (batch, seq) != (4, 128) && !args.iter().any(|a| a == "--no-baseline") {
        anyhow::bail!(
            "the PEFT baseline runs the 4 x 128 job: add --no-baseline with --batch/--seq"
        );
    }
    // The same thread count on both sides (default: all cores, like torch).
    let threads: usize = arg(&args, "--threads").map_or(Ok(0), |s| s.parse())?;
    if threads > 0 {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()?;
    }

    let t0 = Instant::now();
    let model = BaseModel::load(&model_path, &LoadOptions::default())
        .with_context(|| format!("loading {}", model_path.display()))?;
    let load_s = t0.elapsed().as_secs_f64();
    let vocab = model.decoder.cfg.vocab_size;
    let examples: Vec<Example> = (0..batch)
        .map(|b| Example {
            ids: (0..seq)
                .map(|t| (((b * seq + t) * 7919 + 13) % vocab) as u32)
                .collect(),
            targets: vec![true; seq],
        })
        .collect();
    let refs: Vec<&Example> = examples.iter().collect();
    let spec = LoraSpec {
        rank: 16,
        alpha: 32.0,
        dropout: 0.05,
        target_modules: Module::ALL.to_vec(),
    };
    let mut trainer = Trainer::new(&model.decoder, &spec, None, 0)?;
    // PEFT's job uses torch's AdamW without clipping.
    trainer.set_optimizer(0.01, None);
    let targets = batch * (seq - 1);
    let mut step_s = Vec::new();
    let mut losses = Vec::new();
    for _ in 0..steps {
        let s = Instant::now();
        let loss = trainer.accumulate(&refs, 1.0 / targets as f32)?;
        trainer.optimizer_step(2e-4);
        step_s.push(s.elapsed().as_secs_f64());
        losses.push(loss.mean());
    }
    // Forward only (for a breakdown; not part of the timed job).
    let s = Instant::now();
    trainer.evaluate(&refs)?;
    let forward_s = s.elapsed().as_secs_f64();
    let total: f64 = step_s.iter().sum();
    let tokens = (batch * seq * steps) as f64;
    let ours = json!({
        "impl": "hivemind",
        "tokens_per_s": tokens / total,
        "step_seconds": step_s,
        "forward_seconds": forward_s,
        "losses": losses,
        "peak_rss_mib": peak_rss_bytes().map(|b| b as f64 / 1048576.0),
        "load_seconds": load_s,
        "trainable_parameters": trainer.num_parameters(),
        "threads": rayon::current_num_threads(),
    });
    eprintln!("{ours}");

    let baseline: Option<Value> = if args.iter().any(|a| a == "--no-baseline") {
        None
    } else {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tools/reference/peft_train_baseline.py"
        );
        let out = Command::new(&python)
            .arg(script)
            .arg("--model")
            .arg(&model_path)
            .arg("--steps")
            .arg(steps.to_string())
            .arg("--threads")
            .arg(threads.to_string())
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .with_context(|| format!("running {python} {script}"))?;
        if !out.status.success() {
            anyhow::bail!(
                "PEFT baseline failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .context("no JSON from the PEFT baseline")?;
        Some(serde_json::from_str(line)?)
    };
    let mut report = json!({ "job": {
        "model": model_path.display().to_string(),
        "lora": "r16 alpha32 dropout0.05, 7 modules", "optimizer": "AdamW lr 2e-4",
        "batch": batch, "seq": seq, "steps": steps,
    }, "hivemind": ours });
    if let Some(b) = baseline {
        let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        let speed = f(&report["hivemind"], "tokens_per_s") / f(&b, "tokens_per_s");
        let memory = f(&report["hivemind"], "peak_rss_mib") / f(&b, "peak_rss_mib");
        report["peft"] = b;
        report["ratio"] = json!({
            "tokens_per_s": speed,
            "peak_rss": memory,
            "bar": "tokens_per_s >= 1.0 and peak_rss <= 0.5",
            "meets_bar": speed >= 1.0 && memory <= 0.5,
        });
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

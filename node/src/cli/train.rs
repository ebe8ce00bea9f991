//! `hive-node train`: train a LoRA adapter on local data and write it as a PEFT adapter dir, or
//! write the sample dataset with `--create-sample`.
//!
//! ```text
//!  --data FILE ──dataset::load_file──▶ conversations (bad data: error, nothing written)
//!  --model ──load_model──▶ BaseModel ──encode_conversations──▶ examples
//!  --replay N: the base model answers general prompts (before any round adapter is applied)
//!  examples (+ N replayed answers per step) ──model::train (progress bar, Ctrl-C)──▶ --output DIR
//!            (adapter_config.json, adapter_model.safetensors, training_info.json)
//! ```

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};
use clap::Args;
use hivemind_model::adapter::LoraAdapter;
use hivemind_model::dataset;
use hivemind_model::train::{self, LoraSpec, LrSchedule, Progress, Replay, TrainConfig};
use hivemind_model::Module;

use super::args::{load_model, progress, progress_bar, DataDirArg, ModelArgs, PERSONAL_ADAPTER};
use crate::clock::now_ms;
use crate::data_dir::{TrainingFile, TrainingStep};

/// Where `--create-sample` writes the sample dataset.
const SAMPLE_PATH: &str = "./data/sample_dataset.json";

/// Options of `hive-node train` (defaults as in the legacy tool).
#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// Base model options.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Training data: a JSON array or JSONL of Alpaca (instruction/input/output) or ShareGPT
    /// (conversations of from/value) items.
    #[arg(long, required_unless_present = "create_sample")]
    pub data: Option<PathBuf>,
    /// Write the sample dataset to ./data/sample_dataset.json and exit.
    #[arg(long)]
    pub create_sample: bool,
    /// Output adapter directory.
    #[arg(long, default_value = PERSONAL_ADAPTER)]
    pub output: PathBuf,
    /// Passes over the data.
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// LoRA alpha (the update is scaled by alpha / rank).
    #[arg(long, default_value_t = 32.0)]
    pub alpha: f64,
    /// Dropout on the LoRA input.
    #[arg(long, default_value_t = 0.05)]
    pub dropout: f64,
    /// Modules to adapt, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )]
    pub target_modules: Vec<String>,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 4)]
    pub grad_accum: usize,
    /// Fraction of the steps spent warming up the learning rate.
    #[arg(long, default_value_t = 0.03)]
    pub warmup_ratio: f64,
    /// The learning rate after the warmup: constant, linear (decay to 0) or cosine.
    #[arg(long, default_value = "constant")]
    pub lr_schedule: LrSchedule,
    /// Cut longer examples to this many tokens.
    #[arg(long, default_value_t = 512)]
    pub max_seq_len: usize,
    /// Stop after this many optimizer steps (overrides --epochs).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Seed of the LoRA init, shuffling and dropout (same data + seed: same adapter bytes).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Replay this many of the base model's own answers to general prompts in every step, to
    /// hold the model's general behaviour while it learns the data (0: off, the default: on
    /// the default model it halves the drift of 10-step rounds but costs fact learning, and
    /// does not hold held-out prompts after 30 steps; see examples/learning_bench.rs). The
    /// answers are generated once, before training.
    #[arg(long, default_value_t = 0)]
    pub replay: usize,
    /// Keep the model's behaviour on general text: before training, the model (with the round
    /// adapter frozen under it, if any) reads its own answers to general prompts, and every
    /// trained `lora_A` is kept orthogonal to the principal directions holding this fraction of
    /// each module input's energy on them, so the update leaves those inputs nearly as they were
    /// (0: off). Only for a fresh adapter: a run that continues one (--init-adapter, or
    /// --from-round on a fedavg network) trains unprotected, and so does a model whose
    /// statistics would exceed 1 GiB (any larger than the default). See
    /// examples/learning_bench.rs for what it keeps and costs.
    #[arg(long, default_value_t = PROTECT_ENERGY)]
    pub protect: f64,
    /// Most protected directions per module input (with --protect).
    #[arg(long, default_value_t = PROTECT_DIMS)]
    pub protect_dims: usize,
    /// Continue from this adapter dir (e.g. a round adapter); its rank, alpha and target modules
    /// replace --rank, --alpha and --target-modules.
    #[arg(long)]
    pub init_adapter: Option<PathBuf>,
    /// Train on the latest round adapter of the node in --data-dir: a fresh update on top of it
    /// (frozen) where the network's rounds build on their parent, else a continuation of it.
    /// After a round commits, a few steps of this refit what you taught to the new round
    /// (training_info.json records the round in `on_top_of`).
    #[arg(long, conflicts_with = "init_adapter")]
    pub from_round: bool,
    /// When done, hand the adapter to the node running in --data-dir, which announces it in
    /// its current round (weighted by the number of training examples).
    #[arg(long)]
    pub announce: bool,
    /// The node's data dir (for --from-round and --announce).
    #[command(flatten)]
    pub data_dir: DataDirArg,
    /// Print training_info.json on stdout when done.
    #[arg(long)]
    pub json: bool,
}

/// At least this many general prompts are answered for replay (the pool `--replay` draws from).
const REPLAY_POOL: usize = 8;
/// Tokens of each replayed answer.
const REPLAY_TOKENS: usize = 32;
/// `--protect`'s default.
const PROTECT_ENERGY: f64 = 0.98;
/// `--protect-dims`' default.
const PROTECT_DIMS: usize = 256;

static STOP: AtomicBool = AtomicBool::new(false);

/// First Ctrl-C: finish the current step and write the adapter so far. Second: exit now.
fn install_ctrlc() {
    let result = ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            eprintln!("\nhive-node: stopped without writing the adapter");
            std::process::exit(130);
        }
        eprintln!("\nhive-node: stopping after the current step (Ctrl-C again to quit now)");
    });
    if let Err(e) = result {
        tracing::warn!("cannot install the Ctrl-C handler: {e}");
    }
}

/// Writes the six sample examples to `path` (directories created).
fn write_sample(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut json = serde_json::to_vec_pretty(&dataset::sample_items())?;
    json.push(b'\n');
    std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The LoRA spec of the network's adapters, from its config.
fn network_lora(config: &hivemind_model::adapter::AdapterConfig) -> Result<LoraSpec> {
    let names = config
        .target_modules
        .names()
        .context("the network's target_modules is a pattern")?;
    Ok(LoraSpec {
        rank: config.r,
        alpha: config.scaling() * config.r as f64,
        dropout: 0.0,
        target_modules: names
            .iter()
            .map(|n| n.parse::<Module>().context("the network's target_modules"))
            .collect::<Result<_>>()?,
    })
}

fn config(args: &TrainArgs, init: Option<&LoraAdapter>) -> Result<TrainConfig> {
    let lora = match init {
        Some(a) => LoraSpec::from_adapter(a)?,
        None => LoraSpec {
            rank: args.rank,
            alpha: args.alpha,
            dropout: args.dropout,
            target_modules: args
                .target_modules
                .iter()
                .map(|s| s.trim())
                .filter(|s| !s.is_empty())
                .map(|s| s.parse::<Module>().context("--target-modules"))
                .collect::<Result<_>>()?,
        },
    };
    Ok(TrainConfig {
        lora: LoraSpec {
            dropout: args.dropout,
            ..lora
        },
        lr: args.lr,
        epochs: args.epochs,
        batch_size: args.batch_size,
        grad_accum: args.grad_accum,
        warmup_ratio: args.warmup_ratio,
        schedule: args.lr_schedule,
        max_seq_len: args.max_seq_len,
        max_steps: args.max_steps,
        seed: args.seed,
        ..TrainConfig::default()
    })
}

/// Runs the train command.
pub(super) fn run(args: TrainArgs) -> Result<()> {
    if args.create_sample {
        let path = Path::new(SAMPLE_PATH);
        write_sample(path)?;
        println!("Wrote {} (6 examples).", path.display());
        println!("Train on it with:");
        println!(
            "  hive-node train --data {} --epochs 10 --grad-accum 1 --lr 1e-3",
            path.display()
        );
        println!("then chat with the result:");
        println!("  hive-node chat --adapter ./adapters/my_adapter --temperature 0");
        return Ok(());
    }
    let Some(data) = &args.data else {
        bail!("--data FILE is required (or --create-sample to write a sample dataset)");
    };
    // Check everything cheap before loading the model; nothing is written on bad input.
    let convs = dataset::load_file(data)?;
    let data_dir = args.data_dir.dir();
    if args.announce {
        data_dir
            .running_status()
            .context("--announce needs a running node")?;
    }
    let round_dir = if args.from_round {
        let (round, dir) = data_dir.latest_round_adapter()?.with_context(|| {
            format!(
                "--from-round: no committed round in {}",
                data_dir.path().display()
            )
        })?;
        progress(&format!(
            "starting from round adapter {} ({})",
            round.version,
            &round.hash[..16]
        ));
        Some((dir, round.hash))
    } else {
        None
    };
    // On a network whose round adapters build on their parent, the round adapter is frozen
    // under training and what is trained (and announced) is an update on top of it, of the
    // network's shape; on a FedAvg network training continues from the round adapter.
    let (round_dir, on_top_of) = match round_dir {
        Some(round) if data_dir.network_rule()?.builds_on_parent() => (None, Some(round)),
        Some((dir, _)) => (Some(dir), None),
        None => (None, None),
    };
    let network_spec = match &on_top_of {
        Some(_) => Some(network_lora(&data_dir.network_config()?)?),
        None => None,
    };
    let init_dir = round_dir.as_ref().or(args.init_adapter.as_ref());
    let init = match init_dir {
        Some(dir) => Some(
            LoraAdapter::read_dir(dir)
                .with_context(|| format!("reading initial adapter {}", dir.display()))?,
        ),
        None => None,
    };
    if !(args.protect.is_finite() && (0.0..=1.0).contains(&args.protect)) {
        bail!(
            "--protect {} must be a fraction of the energy, in [0, 1]",
            args.protect
        );
    }
    let mut cfg = config(&args, init.as_ref())?;
    if let Some(spec) = network_spec {
        cfg.lora = LoraSpec {
            dropout: args.dropout,
            ..spec
        };
    }
    if init.is_some() {
        progress(&format!(
            "continuing {} (r {}, alpha {}, modules {})",
            init_dir
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            cfg.lora.rank,
            cfg.lora.alpha,
            cfg.lora
                .target_modules
                .iter()
                .map(|m| m.as_str())
                .collect::<Vec<_>>()
                .join(",")
        ));
    }

    // Training is compute-bound: use every core unless told otherwise.
    let mut margs = args.model.clone();
    if margs.threads.is_none() {
        margs.threads = Some(
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        );
    }
    margs.apply_threads();
    let mut model = load_model(&margs)?;
    // The base model's own answers, before any round adapter is applied to it.
    let replay = if args.replay > 0 {
        let pool = args.replay.max(REPLAY_POOL);
        progress(&format!(
            "answering {} general prompts with the base model, to replay {} per step",
            pool.min(hivemind_model::general::REPLAY_PROMPTS.len()),
            args.replay
        ));
        hivemind_model::general::replay_examples(&model, pool, REPLAY_TOKENS)?
    } else {
        Vec::new()
    };
    if args.from_round && !data_dir.network_runs(&model.hash) {
        bail!(
            "--from-round: the node in {} is on a network of another base model than {}",
            data_dir.path().display(),
            model.name
        );
    }
    if let Some((dir, _)) = &on_top_of {
        let round = LoraAdapter::read_dir(dir)
            .with_context(|| format!("reading round adapter {}", dir.display()))?;
        model
            .decoder
            .apply_adapter(&round)
            .with_context(|| format!("applying round adapter {}", dir.display()))?;
        progress(&format!(
            "training an update on top of the round adapter (r {}, frozen)",
            round.config.r
        ));
    }
    // Examples longer than the model's context are truncated like those over --max-seq-len.
    let max_len = args.max_seq_len.min(model.decoder.cfg.max_seq_len);
    let (examples, stats) = dataset::encode_conversations(&model, data, &convs, max_len)?;
    if examples.is_empty() {
        bail!(
            "{}: no example has an assistant token within {} tokens",
            data.display(),
            max_len
        );
    }
    let tokens: usize = examples.iter().map(|e| e.len()).sum();
    progress(&format!(
        "{} examples ({} tokens, {} truncated to {}, {} skipped) on {}",
        examples.len(),
        tokens,
        stats.truncated,
        max_len,
        stats.skipped,
        model.name
    ));

    let protect_bytes = hivemind_model::general::protection_bytes(&model);
    if args.protect > 0.0 && init.is_some() {
        progress(
            "not protecting general behaviour: it needs a fresh adapter, and this run continues \
             one (--protect 0 skips this)",
        );
    } else if args.protect > 0.0 && protect_bytes > hivemind_model::general::PROTECT_MAX_BYTES {
        progress(&format!(
            "not protecting general behaviour: its input statistics would take {} MiB on this \
             model (--protect 0 skips it)",
            protect_bytes >> 20
        ));
    } else if args.protect > 0.0 {
        progress(&format!(
            "finding the input directions general prompts use (keeping {} of their energy)",
            args.protect
        ));
        let p = hivemind_model::general::protected_inputs(
            &model,
            args.protect,
            args.protect_dims,
            REPLAY_TOKENS,
        )?;
        let (energy, dims) = p.summary();
        progress(&format!(
            "protecting {dims:.0} directions per module input ({:.1}% of the energy)",
            energy * 100.0
        ));
        cfg.protect = Some(std::sync::Arc::new(p));
    }

    install_ctrlc();
    let total = train::planned_steps(examples.len(), &cfg);
    let pb = progress_bar(total, "step");
    // The record the dashboard draws the loss curve from (written at most once a second).
    let mut record = TrainingFile {
        pid: std::process::id(),
        output: args.output.display().to_string(),
        base_model: model.name.clone(),
        examples: examples.len(),
        total_steps: total,
        steps: Vec::new(),
        finished: false,
        updated_ms: now_ms(),
    };
    let _ = data_dir.write_training(&record);
    let mut last_write = std::time::Instant::now();
    let mut on_progress = |p: &Progress| {
        record.push(TrainingStep {
            step: p.step,
            loss: p.loss,
            lr: p.lr,
            elapsed_s: p.elapsed_s,
        });
        if last_write.elapsed() >= std::time::Duration::from_secs(1) {
            record.updated_ms = now_ms();
            let _ = data_dir.write_training(&record);
            last_write = std::time::Instant::now();
        }
        pb.set_position(p.step as u64);
        pb.set_message(format!(
            "epoch {}/{} loss {:.4} {:.0} tok/s",
            p.epoch, p.epochs, p.loss, p.tokens_per_s
        ));
    };
    let outcome = train::train_with_replay(
        &model,
        &examples,
        Some(Replay {
            examples: &replay,
            per_step: args.replay,
            weight: 1.0,
        }),
        &cfg,
        init.as_ref(),
        &STOP,
        &mut on_progress,
    );
    pb.finish_and_clear();
    let mut outcome = outcome?;
    outcome.info.on_top_of = on_top_of.map(|(_, hash)| hash);
    outcome
        .write_dir(&args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    record.finished = true;
    record.updated_ms = now_ms();
    let _ = data_dir.write_training(&record);
    let info = &outcome.info;
    if info.interrupted {
        progress(&format!(
            "stopped after {} of {} steps; wrote the adapter trained so far",
            info.steps, info.total_steps
        ));
    }
    progress(&format!(
        "{} steps in {:.1} s ({:.0} tokens/s, peak {:.0} MiB), loss {:.4} -> {:.4}",
        info.steps,
        info.seconds,
        info.tokens_per_second,
        info.peak_memory_mib.unwrap_or(0.0),
        info.first_loss.unwrap_or(f64::NAN),
        info.final_loss.unwrap_or(f64::NAN),
    ));
    progress(&format!(
        "adapter written to {}; try: hive-node chat --adapter {}",
        args.output.display(),
        args.output.display()
    ));
    if args.announce {
        data_dir.hand_over(&args.output, examples.len() as u64)?;
        progress(&format!(
            "handed to the node in {}: it announces the adapter in its current round",
            data_dir.path().display()
        ));
    }
    if args.json {
        println!("{}", serde_json::to_string(info)?);
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        train: TrainArgs,
    }

    #[test]
    fn defaults_are_the_legacy_ones() -> Result<()> {
        let cli = Cli::try_parse_from(["x", "--data", "d.json"])?;
        let a = cli.train;
        assert_eq!(a.output, PathBuf::from("./adapters/my_adapter"));
        assert_eq!((a.epochs, a.batch_size, a.grad_accum), (3, 4, 4));
        assert_eq!((a.rank, a.alpha, a.dropout, a.lr), (16, 32.0, 0.05, 2e-4));
        assert_eq!(a.target_modules.len(), 7);
        assert_eq!(a.warmup_ratio, 0.03);
        assert!(!a.model.no_4bit);
        let cfg = config(&a, None)?;
        assert_eq!(cfg.lora.target_modules[6], Module::DownProj);
        assert!(Cli::try_parse_from(["x"]).is_err(), "--data is required");
        assert!(Cli::try_parse_from(["x", "--create-sample"]).is_ok());
        let b = Cli::try_parse_from([
            "x",
            "--data",
            "d",
            "--target-modules",
            "q_proj,v_proj",
            "--max-steps",
            "5",
            "--init-adapter",
            "a",
            "--no-4bit",
        ])?
        .train;
        assert_eq!(b.target_modules, vec!["q_proj", "v_proj"]);
        assert_eq!(b.max_steps, Some(5));
        assert!(b.model.no_4bit);
        Ok(())
    }

    /// The whole command on a tiny generated model: it writes the three output files, and bad
    /// data is refused before anything is written.
    #[test]
    fn trains_a_tiny_model_end_to_end_and_refuses_bad_data() -> Result<()> {
        use hivemind_model::adapter::LoraAdapter;
        use hivemind_model::config::Arch;
        use hivemind_model::testing::TinyModel;
        let dir = tempfile::tempdir()?;
        let model = dir.path().join("tiny.gguf");
        TinyModel::new(Arch::Llama, 1)?.write_gguf(&model)?;
        let data = dir.path().join("data.jsonl");
        std::fs::write(
            &data,
            "{\"instruction\": \"Who are you?\", \"output\": \"HiveMind\"}\n\
             {\"conversations\": [{\"from\": \"human\", \"value\": \"hi\"}, {\"from\": \"gpt\", \"value\": \"hello\"}]}\n",
        )?;
        let out = dir.path().join("adapter");
        let args = |data: &Path, out: &Path| -> Result<TrainArgs> {
            Ok(Cli::try_parse_from([
                "x".as_ref(),
                "--model".as_ref(),
                model.as_os_str(),
                "--data".as_ref(),
                data.as_os_str(),
                "--output".as_ref(),
                out.as_os_str(),
                "--epochs".as_ref(),
                "2".as_ref(),
                "--rank".as_ref(),
                "4".as_ref(),
                "--threads".as_ref(),
                "1".as_ref(),
            ] as [&std::ffi::OsStr; 13])?
            .train)
        };
        run(args(&data, &out)?)?;
        let adapter = LoraAdapter::read_dir(&out)?;
        assert_eq!(adapter.config.r, 4);
        let info: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("training_info.json"))?)?;
        assert_eq!(info["samples"], 2);
        assert_eq!(info["steps"], 2);

        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, r#"[{"instruction": "a"}]"#)?;
        let bad_out = dir.path().join("never");
        let err = match run(args(&bad, &bad_out)?) {
            Err(e) => e.to_string(),
            Ok(()) => anyhow::bail!("bad data was accepted"),
        };
        assert!(err.contains("bad.json") && err.contains("item 0"), "{err}");
        assert!(!bad_out.exists(), "nothing is written on bad data");
        Ok(())
    }

    #[test]
    fn sample_file_holds_six_parsable_examples() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("data").join("sample_dataset.json");
        write_sample(&p)?;
        let convs = dataset::load_file(&p)?;
        assert_eq!(convs.len(), 6);
        assert!(convs[0].messages[1].content.contains("HiveMind"));
        Ok(())
    }
}

//! `hive-node chat`: an interactive chat with streamed tokens, or one answer with `--prompt`.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use hivemind_model::adapter::LoraAdapter;
use hivemind_model::generate::{ChatSession, GenStats, SamplingParams};

use super::args::{load_model, progress, DataDirArg, ModelArgs, PERSONAL_ADAPTER};
use crate::data_dir::DataDir;

/// Options of `hive-node chat`.
#[derive(Debug, Clone, Args)]
pub struct ChatArgs {
    /// Base model options.
    #[command(flatten)]
    pub model: ModelArgs,
    /// A PEFT LoRA adapter dir (adapter_config.json + adapter_model.safetensors); wins over --use.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Which adapter to chat with when --adapter is not given: `round` (the latest round
    /// adapter of the node in --data-dir), `personal` (./adapters/my_adapter, what `train`
    /// writes by default), `none` (the base model), or `auto` (the round adapter when the
    /// data dir's network runs this base model, else none).
    #[arg(long = "use", value_enum, default_value_t = AdapterChoice::Auto)]
    pub use_adapter: AdapterChoice,
    /// The node's data dir (where round adapters are found).
    #[command(flatten)]
    pub data_dir: DataDirArg,
    /// System prompt (replaces the template's default one).
    #[arg(long)]
    pub system: Option<String>,
    /// Answer this prompt once and exit: only the reply on stdout.
    #[arg(long)]
    pub prompt: Option<String>,
    /// Upper bound of tokens per answer.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy and fully deterministic.
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f64,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f64,
    /// Sample among the k most likely tokens (0: all).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Penalty on recently generated tokens (1.0: none).
    #[arg(long, default_value_t = 1.1)]
    pub repeat_penalty: f32,
    /// Random seed.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Print one JSON line of timings on stderr after each answer.
    #[arg(long)]
    pub stats: bool,
}

#[derive(serde::Serialize)]
struct StatsLine<'a> {
    #[serde(flatten)]
    gen: &'a GenStats,
    load_seconds: f64,
}

/// Which adapter `chat` applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AdapterChoice {
    /// The round adapter if the data dir's network runs this base model, else none.
    Auto,
    /// The latest round adapter of the node's data dir.
    Round,
    /// The personal adapter `train` writes by default.
    Personal,
    /// The base model alone.
    None,
}

/// The adapter dir `chat` should apply for `choice`, given the loaded base model's hash.
fn choose_adapter(
    choice: AdapterChoice,
    data_dir: &DataDir,
    base_hash: &hivemind_protocol::Hash,
) -> Result<Option<PathBuf>> {
    let same_base = || data_dir.network_runs(base_hash);
    match choice {
        AdapterChoice::None => Ok(None),
        AdapterChoice::Personal => {
            let dir = PathBuf::from(PERSONAL_ADAPTER);
            anyhow::ensure!(
                dir.exists(),
                "no personal adapter at {PERSONAL_ADAPTER} (train one with `hive-node train`)"
            );
            Ok(Some(dir))
        }
        AdapterChoice::Round => {
            anyhow::ensure!(
                same_base(),
                "the node in {} is not on a network of this base model (join one first)",
                data_dir.path().display()
            );
            let (round, dir) = data_dir.latest_round_adapter()?.with_context(|| {
                format!("no committed round in {} yet", data_dir.path().display())
            })?;
            progress(&format!(
                "using round adapter {} ({})",
                round.version,
                &round.hash[..16]
            ));
            Ok(Some(dir))
        }
        AdapterChoice::Auto => {
            if !same_base() {
                return Ok(None);
            }
            match data_dir.latest_round_adapter() {
                Ok(Some((round, dir))) => {
                    progress(&format!(
                        "using round adapter {} ({}); --use none for the base model",
                        round.version,
                        &round.hash[..16]
                    ));
                    Ok(Some(dir))
                }
                _ => Ok(None),
            }
        }
    }
}

/// Runs the chat command.
pub(super) fn run(args: ChatArgs) -> Result<()> {
    args.model.apply_threads();
    let t0 = Instant::now();
    let mut model = load_model(&args.model)?;
    let adapter_dir = match &args.adapter {
        Some(dir) => Some(dir.clone()),
        None => choose_adapter(args.use_adapter, &args.data_dir.dir(), &model.hash)?,
    };
    if let Some(dir) = &adapter_dir {
        let adapter = LoraAdapter::read_dir(dir)
            .with_context(|| format!("loading adapter {}", dir.display()))?;
        model
            .decoder
            .apply_adapter(&adapter)
            .with_context(|| format!("applying adapter {}", dir.display()))?;
    }
    let load_seconds = t0.elapsed().as_secs_f64();
    let params = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        repeat_penalty: args.repeat_penalty,
        seed: args.seed,
        ..Default::default()
    };
    let mut session = ChatSession::new(&model, args.system.clone(), params, args.max_new_tokens)?;
    let report = |stats: &GenStats| {
        if args.stats {
            let line = StatsLine {
                gen: stats,
                load_seconds,
            };
            if let Ok(s) = serde_json::to_string(&line) {
                eprintln!("{s}");
            }
        }
    };

    if let Some(prompt) = &args.prompt {
        let mut out = std::io::stdout().lock();
        let (_, stats) = session.ask(prompt, |piece| {
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        })?;
        writeln!(out)?;
        report(&stats);
        return Ok(());
    }

    eprintln!(
        "Chatting with {} ({} layers). Type `clear` to reset the conversation, `exit` to quit.",
        model.name, model.decoder.cfg.num_layers
    );
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        eprint!("\nYou: ");
        let Some(line) = lines.next() else { break };
        let line = line?;
        let input = line.trim();
        match input {
            "" => continue,
            "exit" | "quit" => break,
            "clear" => {
                session.clear();
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        let mut out = std::io::stdout().lock();
        write!(out, "Assistant: ")?;
        out.flush()?;
        let (_, stats) = session.ask(input, |piece| {
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        })?;
        writeln!(out)?;
        report(&stats);
    }
    Ok(())
}

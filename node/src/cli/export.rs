//! `hive-node export`: a committed round adapter, checked against its hash, as a PEFT dir; or
//! a round (or any PEFT) adapter as a llama.cpp LoRA GGUF (`--gguf`), or merged into the base
//! model as one GGUF llama.cpp runs alone (`--merged`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use hivemind_model::adapter::LoraAdapter;
use hivemind_model::gguf_export::{write_lora_gguf, write_merged_gguf, MergedType};

use super::args::{progress, DataDirArg};

/// Arguments of `hive-node export`.
#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// Data directory of the node.
    #[command(flatten)]
    pub data_dir: DataDirArg,
    /// Round number (default: the latest).
    #[arg(long)]
    pub round: Option<u64>,
    /// Export this PEFT adapter dir instead of a round adapter (with --gguf or --merged).
    #[arg(long, requires = "format")]
    pub adapter: Option<PathBuf>,
    /// Output: a PEFT adapter dir, or with --gguf/--merged a .gguf file.
    #[arg(long)]
    pub output: PathBuf,
    /// Write a llama.cpp LoRA GGUF (`llama-cli -m BASE.gguf --lora OUTPUT`).
    #[arg(long, group = "format")]
    pub gguf: bool,
    /// Write the base model with the adapter merged into it, as one GGUF for llama.cpp.
    #[arg(long, group = "format")]
    pub merged: bool,
    /// How --merged stores the adapted weights: f32 (exactly what `chat` computes), f16, or
    /// q8_0 (about a quarter of f32).
    #[arg(long, value_enum, default_value_t = MergedTypeArg::F32)]
    pub merged_type: MergedTypeArg,
    /// The base model (GGUF) of --gguf and --merged: `default`, or a local GGUF file.
    #[arg(long, env = "HIVE_MODEL", default_value = "default")]
    pub model: String,
}

/// `--merged-type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MergedTypeArg {
    /// 4 bytes a weight.
    F32,
    /// 2 bytes a weight.
    F16,
    /// 8.5 bits a weight.
    #[value(name = "q8_0")]
    Q8_0,
}

/// Runs `hive-node export`.
pub(super) fn run(args: ExportArgs) -> Result<()> {
    let dir = args.data_dir.dir();
    if !args.gguf && !args.merged {
        let round = dir.export_round(args.round, &args.output)?;
        println!(
            "{}: round {} ({}, {})",
            args.output.display(),
            round.number,
            round.version,
            round.hash
        );
        return Ok(());
    }
    let base = hivemind_model::pull::resolve_model(Some(&args.model), &mut progress)?;
    let (adapter_dir, name) = match &args.adapter {
        // The dir's own name, not its path (the file may be shared).
        Some(a) => (
            a.clone(),
            a.canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "adapter".into()),
        ),
        None => {
            let base_hash = hivemind_model::model_hash(&base)?;
            anyhow::ensure!(
                dir.network_runs(&base_hash),
                "the node in {} is not on a network of the base model {} (pass --model with \
                 the network's base model)",
                dir.path().display(),
                base.display()
            );
            let (round, d) = dir
                .round_adapter(args.round)?
                .with_context(|| match args.round {
                    Some(n) => format!("no committed round {n} in {}", dir.path().display()),
                    None => format!("no committed round in {} yet", dir.path().display()),
                })?;
            (d, format!("hivemind {} ({})", round.version, round.hash))
        }
    };
    let adapter = LoraAdapter::read_dir(&adapter_dir)
        .with_context(|| format!("loading adapter {}", adapter_dir.display()))?;
    if args.merged {
        let dtype = match args.merged_type {
            MergedTypeArg::F32 => MergedType::F32,
            MergedTypeArg::F16 => MergedType::F16,
            MergedTypeArg::Q8_0 => MergedType::Q8_0,
        };
        write_merged_gguf(&base, &adapter, &name, dtype, &args.output)
            .with_context(|| format!("merging {name} into {}", base.display()))?;
        println!(
            "{}: {} merged into {}",
            args.output.display(),
            name,
            base.display()
        );
    } else {
        let cfg = hivemind_model::read_config(&base)?;
        write_lora_gguf(&adapter, &cfg, &name, &args.output)
            .with_context(|| format!("writing {name} as a LoRA GGUF"))?;
        println!(
            "{}: {} as a llama.cpp LoRA for {}",
            args.output.display(),
            name,
            base.display()
        );
    }
    Ok(())
}

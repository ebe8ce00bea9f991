//! `hive-node export`: a committed round adapter, checked against its hash, as a PEFT dir.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::args::DataDirArg;

/// Arguments of `hive-node export`.
#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// Data directory of the node.
    #[command(flatten)]
    pub data_dir: DataDirArg,
    /// Round number (default: the latest).
    #[arg(long)]
    pub round: Option<u64>,
    /// Output PEFT adapter dir.
    #[arg(long)]
    pub output: PathBuf,
}

/// Runs `hive-node export`.
pub(super) fn run(args: ExportArgs) -> Result<()> {
    let round = args.data_dir.dir().export_round(args.round, &args.output)?;
    println!(
        "{}: round {} ({}, {})",
        args.output.display(),
        round.number,
        round.version,
        round.hash
    );
    Ok(())
}

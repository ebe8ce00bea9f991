//! `hive-node contribute`: hand an adapter dir to the node running in the data dir, which
//! announces it in its current round.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::args::DataDirArg;

/// Arguments of `hive-node contribute`.
#[derive(Debug, Clone, Args)]
pub struct ContributeArgs {
    /// Data directory of the running node.
    #[command(flatten)]
    pub data_dir: DataDirArg,
    /// Training samples behind the adapter.
    #[arg(long, default_value_t = 1)]
    pub samples: u64,
    /// The PEFT adapter dir.
    pub adapter: PathBuf,
}

/// Runs `hive-node contribute`.
pub(super) fn run(args: ContributeArgs) -> Result<()> {
    args.data_dir
        .dir()
        .hand_over(&args.adapter, args.samples)
        .with_context(|| format!("handing over {}", args.adapter.display()))?;
    println!("handed to the running node");
    Ok(())
}

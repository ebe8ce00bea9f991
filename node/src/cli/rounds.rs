//! `hive-node rounds`: the committed rounds of a node (running or not).

use anyhow::Result;
use clap::Args;

use super::args::DataDirArg;

/// Arguments of `hive-node rounds`.
#[derive(Debug, Clone, Args)]
pub struct RoundsArgs {
    /// Data directory of the node.
    #[command(flatten)]
    pub data_dir: DataDirArg,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `hive-node rounds`.
pub(super) fn run(args: RoundsArgs) -> Result<()> {
    let (rounds, _) = args.data_dir.dir().rounds()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rounds)?);
    } else if rounds.is_empty() {
        println!("no committed rounds yet");
    } else {
        for r in rounds {
            println!(
                "{:>6}  {:<12} {}  {} contributors  {}",
                r.number,
                r.version,
                r.hash,
                r.contributors.len(),
                r.rule
            );
        }
    }
    Ok(())
}

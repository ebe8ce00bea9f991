//! Churn at scale: 50 `hive-node join` processes on loopback (the harness's churn plan,
//! which `tests/churn.rs` runs with 12). Each round some live nodes contribute adapters of a
//! tiny generated model; in each churn round 10% of the nodes are killed (SIGKILL) and as many
//! started, killed ones restarting on their data dirs and new ones joining in turn; then calm
//! rounds. Prints the report as JSON: per round who was killed, restarted and joined, how
//! many nodes committed and whether they agree; gossip delay from the contributor to each
//! node (p50/p99) and to all of them; window close to commit; memory per node; whether every
//! live node converged on one tip one round after the churn stopped.
//!
//! ```sh
//! cargo build --bin hive-node --example churn_bench
//! cargo run --example churn_bench -- [--nodes 50] [--churn-rounds 5] [--kill-fraction 0.1]
//! ```
//!
//! Times come from the nodes' own clocks (status.json), so the harness's polling does not
//! blur them. There is no baseline to divide by: the numbers to compare are the round
//! window (`--round-secs`) and the grace period (`grace_ms` in the report, a third of the
//! window), which bounds close-to-commit from below.

use std::path::PathBuf;

use anyhow::{ensure, Result};
use clap::Parser;
use hivemind_node::harness::churn::{self, ChurnPlan};
use hivemind_node::harness::hive_node_bin;

#[derive(Parser)]
struct Args {
    /// Nodes running at any time (node 0, the bootstrap node, is never killed).
    #[arg(long, default_value_t = 50)]
    nodes: usize,
    /// Rounds with churn.
    #[arg(long, default_value_t = 5)]
    churn_rounds: u64,
    /// Rounds without churn after them.
    #[arg(long, default_value_t = 2)]
    calm_rounds: u64,
    /// Share of the nodes killed (and started again) in each churn round.
    #[arg(long, default_value_t = 0.1)]
    kill_fraction: f64,
    /// Live nodes contributing an adapter each round.
    #[arg(long, default_value_t = 5)]
    contributors: usize,
    /// Collection window of a round, seconds.
    #[arg(long, default_value_t = 5.0)]
    round_secs: f64,
    /// How long a round may take to commit everywhere, seconds.
    #[arg(long, default_value_t = 180.0)]
    wait_secs: f64,
    /// Seed of the choices and adapters.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The `hive-node` binary (default: the one next to this example).
    #[arg(long)]
    bin: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        (0.0..0.5).contains(&args.kill_fraction),
        "--kill-fraction must be in [0, 0.5)"
    );
    let bin = hive_node_bin(args.bin.as_deref())?;
    let plan = ChurnPlan {
        nodes: args.nodes,
        churn_rounds: args.churn_rounds,
        calm_rounds: args.calm_rounds,
        kills_per_round: (args.nodes as f64 * args.kill_fraction).round() as usize,
        contributors_per_round: args.contributors,
        round_secs: args.round_secs,
        wait_secs: args.wait_secs,
        seed: args.seed,
    };
    let work = tempfile::tempdir()?;
    let report = churn::run(&bin, work.path(), &plan)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    ensure!(
        report.failure.is_none(),
        "the run failed: {:?}",
        report.failure
    );
    Ok(())
}

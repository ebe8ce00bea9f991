//! `hive-node join`: run a node of one model's network until Ctrl-C or SIGTERM.

use anyhow::Result;

use super::args::NodeArgs;

/// Runs `hive-node join`.
pub(super) fn run(args: NodeArgs) -> Result<()> {
    args.apply_threads();
    super::runtime()?.block_on(args.run_node(None, false))
}

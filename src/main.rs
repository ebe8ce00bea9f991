//! `hive-node`: parse the command line, start logging, hand over to the library.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = hivemind_node::cli::Cli::parse();
    hivemind_node::cli::init_tracing(cli.verbose);
    hivemind_node::cli::run(cli)
}

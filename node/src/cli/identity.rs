//! `hive-node identity`: print the node's PeerId (the key is created on first use).

use anyhow::Result;

use super::args::DataDirArg;

/// Runs `hive-node identity`.
pub(super) fn run(args: DataDirArg) -> Result<()> {
    println!("{}", args.dir().peer_id()?);
    Ok(())
}

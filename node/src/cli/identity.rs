//! `hive-node identity`: print the node's PeerId (the key is created on first use).

use crate::identity::keypair_of;
use anyhow::Result;

use super::args::DataDirArg;

/// Runs `hive-node identity`.
pub(super) fn run(args: DataDirArg) -> Result<()> {
    let key = args.dir().node_key()?;
    println!("{}", keypair_of(&key)?.public().to_peer_id());
    Ok(())
}

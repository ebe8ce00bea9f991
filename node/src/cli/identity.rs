//! `hive-node identity`: print the node's PeerId (the key is created on first use, with the
//! key work a network asks for when `--key-work` says so).

use std::time::Instant;

use anyhow::Result;
use clap::Args;

use super::args::DataDirArg;

/// `hive-node identity`.
#[derive(Debug, Args)]
pub struct IdentityArgs {
    #[command(flatten)]
    data_dir: DataDirArg,
    /// Make the key (on first use) with this many bits of key work, for networks that ask for
    /// it (`join --key-work`, which reads the same HIVE_KEY_WORK), and say how much work the
    /// key carries.
    #[arg(long, env = "HIVE_KEY_WORK", default_value_t = 0)]
    key_work: u32,
}

/// Runs `hive-node identity`.
pub(super) fn run(args: IdentityArgs) -> Result<()> {
    let dir = args.data_dir.dir();
    let t0 = Instant::now();
    let key = dir.node_key_with_work(args.key_work)?;
    println!("{}", dir.peer_id()?);
    if args.key_work > 0 {
        let work = key.node_id().key_work();
        let bits = args.key_work;
        let verdict = if work >= bits {
            format!("enough; a network with --key-work {bits} counts it")
        } else {
            format!(
                "too little: this key was made before, a new data dir makes one with the work; a \
                 network with --key-work {bits} would refuse it"
            )
        };
        let took = t0.elapsed().as_secs_f64();
        let took = if took > 0.5 {
            format!(" in {took:.1} s")
        } else {
            String::new()
        };
        eprintln!("key work: {work} bits ({verdict}){took}");
    }
    Ok(())
}

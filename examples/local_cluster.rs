//! A federated round in one process: three nodes on a tiny generated model, each
//! contributing a random adapter, agree on the round adapter; prints the agreed hash.
//!
//! ```sh
//! cargo run --example local_cluster -- [--nodes 3] [--round-secs 2] [--rule exact-mean]
//! ```
//!
//! It shows the library's way to run nodes: a `NodeConfig` per node, started by the
//! harness's `Cluster` (node 0 bootstraps the others) through `Node::start`, adapters handed
//! over with `Node::contribute`, and `Cluster::wait_committed` for the commit.

use std::time::Duration;

use anyhow::{ensure, Result};
use clap::Parser;
use hivemind_model::config::Arch;
use hivemind_model::testing::{random_adapter, TinyModel};
use hivemind_node::harness::{node_dirs, Cluster};
use hivemind_node::node::{LoraSettings, NodeConfig};

#[derive(Parser)]
struct Args {
    /// Nodes in the cluster.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Collection window of the round, in seconds.
    #[arg(long, default_value_t = 2.0)]
    round_secs: f64,
    /// The network's aggregation rule: iso (the default), exact-mean, tsv or fedavg.
    #[arg(long, default_value = "iso")]
    rule: String,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.nodes >= 2, "a round needs at least 2 nodes");
    let work = tempfile::tempdir()?;
    let model = work.path().join("tiny.gguf");
    let tiny = TinyModel::new(Arch::Llama, 1)?;
    tiny.write_gguf(&model)?;
    let lora = LoraSettings {
        rank: 4,
        alpha: 8.0,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        rule: args.rule.parse()?,
        ..LoraSettings::default()
    };
    let shape = tiny.cfg.adapter_shape(lora.rank, &lora.target_modules)?;
    let dirs = node_dirs(work.path(), args.nodes);
    let cluster = Cluster::start(args.nodes, |i| {
        let mut cfg = NodeConfig::new(&dirs[i], &model, args.round_secs);
        cfg.lora = lora.clone();
        cfg
    })
    .await?;
    for (i, node) in cluster.nodes().iter().enumerate() {
        let dir = work.path().join(format!("adapter-{i}"));
        random_adapter(&shape, lora.alpha, i as u64)?.write_dir(&dir)?;
        let hash = node.contribute(dir, 10).await?;
        println!("node {i} ({}) announced {}", node.peer_id(), hash.short());
    }
    let limit = Duration::from_secs_f64(args.round_secs * 6.0 + 60.0);
    let rounds = cluster.wait_committed(1, limit).await;
    cluster.shutdown().await;
    let rounds = rounds?;
    ensure!(
        rounds.iter().all(|r| r == &rounds[0]),
        "the nodes committed different round adapters: {rounds:?}"
    );
    println!(
        "all {} nodes agree on {} = blake3 {} ({} contributors)",
        rounds.len(),
        rounds[0].version,
        rounds[0].hash,
        rounds[0].contributors.len()
    );
    Ok(())
}

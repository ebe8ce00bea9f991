//! `hive-node demo`: one federated round on this machine, end to end, with the real parts.
//!
//! ```text
//!   sample data ──split──▶ shard 0 .. shard N-1
//!   hive-node train (one process per node, in turn) ──▶ adapters/node-i
//!   harness::Cluster: N nodes (Node::start, as `join` runs them) on 127.0.0.1, node 0
//!   bootstraps, each contributes its adapter ──▶ wait until every node commits round 1
//!   hive-node chat --use round (node 0's data dir) ──▶ the answer of the round adapter
//! ```
//!
//! Training and chat are child processes of the same binary, and the nodes are the same
//! `Node` that `join` starts, so the demo runs exactly what users run; the work dir keeps
//! everything for inspection (`hive-node rounds` and `export` afterwards).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

use super::args::{progress, ModelArgs};
use crate::harness::{node_dirs, Cluster};
use crate::node::NodeConfig;

/// Arguments of `hive-node demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Base model options.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Nodes on loopback; each trains on its own shard of the sample data.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Working dir: data shards, adapters, one data dir per node (node dirs start fresh).
    #[arg(long, default_value = "./hivemind-demo")]
    pub work_dir: PathBuf,
    /// Epochs of local training on each node.
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    /// Learning rate of local training.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Stop local training after this many optimizer steps (quick runs).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Collection window of the round, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub round_secs: f64,
    /// What to ask the round adapter at the end.
    #[arg(long, default_value = "你是谁？")]
    pub prompt: String,
    /// Longest answer, in tokens.
    #[arg(long, default_value_t = 96)]
    pub max_new_tokens: usize,
}

fn exe() -> Result<PathBuf> {
    std::env::current_exe().context("locating the hive-node binary")
}

fn run_child(what: &str, cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// Splits the sample examples round-robin into `n` shard files.
fn write_shards(dir: &Path, n: usize) -> Result<Vec<(PathBuf, usize)>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let items = hivemind_model::dataset::sample_items();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let shard: Vec<_> = items.iter().skip(i).step_by(n).cloned().collect();
        let path = dir.join(format!("shard-{i}.json"));
        std::fs::write(&path, serde_json::to_vec_pretty(&shard)?)
            .with_context(|| format!("writing {}", path.display()))?;
        out.push((path, shard.len()));
    }
    Ok(out)
}

/// Runs the demo.
pub(super) fn run(args: DemoArgs) -> Result<()> {
    if args.nodes < 2 {
        bail!("--nodes must be at least 2 for a federated round");
    }
    if args.nodes > 6 {
        bail!("--nodes must be at most 6 (the sample data has 6 examples)");
    }
    let t0 = Instant::now();
    let model = hivemind_model::pull::resolve_model(Some(&args.model.model), &mut progress)?;
    let work = &args.work_dir;
    let nodes_dir = work.join("nodes");
    if nodes_dir.exists() {
        std::fs::remove_dir_all(&nodes_dir)
            .with_context(|| format!("clearing {}", nodes_dir.display()))?;
    }
    let shards = write_shards(&work.join("data"), args.nodes)?;
    progress(&format!(
        "step 1/4: {} nodes each train on their own shard of the sample data ({})",
        args.nodes,
        shards
            .iter()
            .map(|(_, n)| format!("{n} examples"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let mut adapters = Vec::with_capacity(args.nodes);
    for (i, (shard, n)) in shards.iter().enumerate() {
        let out = work.join("adapters").join(format!("node-{i}"));
        progress(&format!(
            "node {i}: training on {} ({n} examples)",
            shard.display()
        ));
        let mut cmd = Command::new(exe()?);
        cmd.arg("train")
            .arg("--model")
            .arg(&model)
            .arg("--data")
            .arg(shard)
            .arg("--output")
            .arg(&out)
            .args(["--epochs", &args.epochs.to_string()])
            .args(["--lr", &args.lr.to_string()])
            .args(["--grad-accum", "1"]);
        if let Some(s) = args.max_steps {
            cmd.args(["--max-steps", &s.to_string()]);
        }
        if let Some(t) = args.model.threads {
            cmd.args(["--threads", &t.to_string()]);
        }
        if args.model.no_4bit {
            cmd.arg("--no-4bit");
        }
        run_child(&format!("training node {i}"), &mut cmd)?;
        adapters.push((out, *n));
    }

    progress(&format!(
        "step 2/4: starting {} nodes on 127.0.0.1; each announces its adapter (round window {} s)",
        args.nodes, args.round_secs
    ));
    let dirs = node_dirs(&nodes_dir, args.nodes);
    let limit = Duration::from_secs_f64(args.round_secs * 6.0 + 120.0);
    let rounds = super::runtime()?.block_on(async {
        let cluster = Cluster::start(args.nodes, |i| {
            NodeConfig::new(&dirs[i], &model, args.round_secs)
        })
        .await
        .context("starting the nodes")?;
        let boot = &cluster.node(0).listen_addrs()[0];
        progress(&format!("node 0 is the bootstrap node: {boot}"));
        for (node, (dir, n)) in cluster.nodes().iter().zip(&adapters) {
            let hash = node
                .contribute(dir.clone(), *n as u64)
                .await
                .with_context(|| format!("contributing {}", dir.display()))?;
            progress(&format!(
                "{} announced adapter {}",
                node.peer_id(),
                hash.short()
            ));
        }
        progress("step 3/4: waiting for every node to commit round 1");
        let rounds = cluster.wait_committed(1, limit).await;
        cluster.shutdown().await;
        anyhow::Ok(rounds?)
    })?;
    for (i, r) in rounds.iter().enumerate() {
        progress(&format!(
            "node {i} committed {} (blake3 {}, {} contributors)",
            r.version,
            &r.hash[..16],
            r.contributors.len()
        ));
    }
    let first = &rounds[0];
    if rounds.iter().any(|r| r != first) {
        for (i, r) in rounds.iter().enumerate() {
            eprintln!("node {i}: {r:?}");
        }
        bail!("the nodes committed different round adapters");
    }
    progress(&format!(
        "all {} nodes agree: {} = blake3 {} from {} adapters",
        rounds.len(),
        first.version,
        first.hash,
        first.contributors.len()
    ));

    progress(&format!(
        "step 4/4: asking the round adapter (node 0's data dir): {}",
        args.prompt
    ));
    let mut cmd = Command::new(exe()?);
    cmd.arg("chat")
        .arg("--model")
        .arg(&model)
        .arg("--data-dir")
        .arg(&dirs[0])
        .args(["--use", "round", "--temperature", "0"])
        .args(["--max-new-tokens", &args.max_new_tokens.to_string()])
        .args(["--prompt", &args.prompt]);
    if let Some(t) = args.model.threads {
        cmd.args(["--threads", &t.to_string()]);
    }
    run_child("chat", &mut cmd)?;
    progress(&format!(
        "done in {:.0} s; the nodes' data dirs are in {} (try: hive-node rounds --data-dir {})",
        t0.elapsed().as_secs_f64(),
        nodes_dir.display(),
        dirs[0].display()
    ));
    Ok(())
}

//! `hive-node demo`: one federated round on this machine, end to end, with the real parts.
//!
//! ```text
//!   invented personal facts ──split──▶ shard 0 .. shard N-1 (each node knows only its own)
//!   hive-node train (one process per node, in turn) ──▶ adapters/node-i
//!   harness::Cluster: N nodes (Node::start, as `join` runs them) on 127.0.0.1, node 0
//!   bootstraps, each contributes its adapter ──▶ wait until every node commits round 1
//!   hive-node eval on every fact: each node's own adapter, then the round adapter
//!   hive-node chat --use round (node 0's data dir), asked what only node 1 was taught
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
    /// Invented personal facts each node is taught (only that node sees them).
    #[arg(long, default_value_t = 4)]
    pub facts_per_node: usize,
    /// Epochs of local training on each node (one full-batch step each).
    #[arg(long, default_value_t = 30)]
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
    /// What to ask the round adapter at the end (default: a question only node 1 was taught).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Longest answer, in tokens.
    #[arg(long, default_value_t = 48)]
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

/// One shard of invented facts per node, and every fact in one file (`all-facts.json`).
fn write_shards(dir: &Path, nodes: usize, per_node: usize) -> Result<Shards> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let facts = hivemind_model::facts::facts(nodes * per_node, DEMO_SEED);
    let items: Vec<_> = facts.iter().map(|f| f.item()).collect();
    let write = |name: &str, items: &[hivemind_model::dataset::AlpacaItem]| -> Result<PathBuf> {
        let path = dir.join(name);
        std::fs::write(&path, serde_json::to_vec_pretty(items)?)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    };
    let shards = items
        .chunks(per_node)
        .enumerate()
        .map(|(i, shard)| write(&format!("shard-{i}.json"), shard))
        .collect::<Result<_>>()?;
    Ok(Shards {
        shards,
        all: write("all-facts.json", &items)?,
        facts,
    })
}

/// The demo's data files.
struct Shards {
    /// One file per node.
    shards: Vec<PathBuf>,
    /// Every node's facts.
    all: PathBuf,
    /// The facts, in shard order.
    facts: Vec<hivemind_model::facts::Fact>,
}

/// The seed of the demo's invented facts.
const DEMO_SEED: u64 = 7;

/// Runs `hive-node eval --json` on `data` with `adapter_args`: which items were answered exactly.
fn eval_exact(
    model: &Path,
    data: &Path,
    adapter_args: &[&std::ffi::OsStr],
    threads: Option<usize>,
) -> Result<Vec<bool>> {
    let mut cmd = Command::new(exe()?);
    cmd.arg("eval")
        .arg("--model")
        .arg(model)
        .arg("--data")
        .arg(data)
        .args(adapter_args)
        .args(["--max-new-tokens", "32", "--json"]);
    if let Some(t) = threads {
        cmd.args(["--threads", &t.to_string()]);
    }
    let out = cmd.output().context("starting hive-node eval")?;
    if !out.status.success() {
        bail!(
            "hive-node eval failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("reading hive-node eval --json")?;
    let scores = report["scores"]
        .as_array()
        .context("hive-node eval --json has no scores")?;
    Ok(scores.iter().map(|s| s["exact"] == true).collect())
}

/// Runs the demo.
pub(super) fn run(args: DemoArgs) -> Result<()> {
    if args.nodes < 2 {
        bail!("--nodes must be at least 2 for a federated round");
    }
    if args.facts_per_node == 0
        || args.nodes * args.facts_per_node > hivemind_model::facts::MAX_FACTS
    {
        bail!(
            "--nodes x --facts-per-node must be between 1 and {} (the invented facts)",
            hivemind_model::facts::MAX_FACTS
        );
    }
    let t0 = Instant::now();
    let model = hivemind_model::pull::resolve_model(Some(&args.model.model), &mut progress)?;
    let work = &args.work_dir;
    let nodes_dir = work.join("nodes");
    if nodes_dir.exists() {
        std::fs::remove_dir_all(&nodes_dir)
            .with_context(|| format!("clearing {}", nodes_dir.display()))?;
    }
    let data = write_shards(&work.join("data"), args.nodes, args.facts_per_node)?;
    let per = args.facts_per_node;
    progress(&format!(
        "step 1/5: {} nodes each learn {per} invented facts that only they know, e.g. node 0: \"{}\" -> \"{}\"",
        args.nodes, data.facts[0].question, data.facts[0].answer
    ));
    let mut adapters = Vec::with_capacity(args.nodes);
    for (i, shard) in data.shards.iter().enumerate() {
        let out = work.join("adapters").join(format!("node-{i}"));
        progress(&format!(
            "node {i}: training on {} ({per} facts)",
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
            .args(["--batch-size", &per.to_string()])
            .args(["--grad-accum", "1", "--dropout", "0"]);
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
        adapters.push((out, per));
    }

    progress(&format!(
        "step 2/5: starting {} nodes on 127.0.0.1; each announces its adapter (round window {} s)",
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
        progress("step 3/5: waiting for every node to commit round 1");
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
        "step 4/5: what each node's own adapter and the round adapter know, over all {} facts",
        data.facts.len()
    ));
    let mut alone = Vec::with_capacity(args.nodes);
    for (i, (dir, _)) in adapters.iter().enumerate() {
        let exact = eval_exact(
            &model,
            &data.all,
            &["--adapter".as_ref(), dir.as_os_str()],
            args.model.threads,
        )?;
        let own = exact[i * per..(i + 1) * per].iter().filter(|&&e| e).count();
        let total = exact.iter().filter(|&&e| e).count();
        progress(&format!(
            "node {i} alone: {total}/{} facts (its own {own}/{per})",
            exact.len()
        ));
        alone.push(total);
    }
    let round = eval_exact(
        &model,
        &data.all,
        &[
            "--data-dir".as_ref(),
            dirs[0].as_os_str(),
            "--use".as_ref(),
            "round".as_ref(),
        ],
        args.model.threads,
    )?;
    let by_node: Vec<String> = round
        .chunks(per)
        .map(|c| format!("{}/{per}", c.iter().filter(|&&e| e).count()))
        .collect();
    let round_total = round.iter().filter(|&&e| e).count();
    let mean_alone = alone.iter().sum::<usize>() as f64 / alone.len() as f64;
    progress(&format!(
        "round adapter ({}, on node 0): {round_total}/{} facts (by node: {}); a node alone: {mean_alone:.1} on average",
        first.version,
        round.len(),
        by_node.join(", ")
    ));

    // Node 0 never saw another node's facts: ask one the round adapter answered in step 4
    // (the first, if any; else the first of node 1's).
    let (prompt, taught) = match &args.prompt {
        Some(p) => (p.clone(), None),
        None => {
            let i = (per..round.len()).find(|&i| round[i]).unwrap_or(per);
            let f = &data.facts[i];
            (f.question.clone(), Some((i / per, f.answer.clone())))
        }
    };
    match &taught {
        Some((node, answer)) => progress(&format!(
            "step 5/5: asking node 0's round adapter what only node {node} was taught: \
             {prompt} (node {node} was taught: {answer})"
        )),
        None => progress(&format!(
            "step 5/5: asking node 0's round adapter: {prompt}"
        )),
    }
    let mut cmd = Command::new(exe()?);
    cmd.arg("chat")
        .arg("--model")
        .arg(&model)
        .arg("--data-dir")
        .arg(&dirs[0])
        .args(["--use", "round", "--temperature", "0"])
        .args(["--max-new-tokens", &args.max_new_tokens.to_string()])
        .args(["--prompt", &prompt]);
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

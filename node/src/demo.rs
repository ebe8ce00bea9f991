//! `hive-node demo`: one federated round on this machine, end to end, with the real parts.
//!
//! ```text
//!   sample data ──split──▶ shard 0 .. shard N-1
//!   hive-node train (one process per node, in turn) ──▶ adapters/node-i
//!   hive-node join  (N processes on 127.0.0.1, node 0 bootstraps, each --contribute) ──▶ round 1
//!   wait until every node's status.json shows the same committed round
//!   hive-node chat --use round (node 0's data dir) ──▶ the answer of the round adapter
//! ```
//!
//! Every step is a child process of the same binary, so the demo runs exactly what users
//! run; the work dir keeps everything for inspection (`hive-node status --data-dir ...`
//! works while the nodes run, `rounds` and `export` afterwards).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::cli::{progress, ModelArgs};
use crate::driver::RoundView;

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

/// A node process; stopped when dropped.
struct NodeProc {
    index: usize,
    child: Child,
    data_dir: PathBuf,
    addrs: mpsc::Receiver<String>,
}

impl NodeProc {
    /// Asks the node to stop (SIGTERM: it finishes cleanly), then makes sure it is gone.
    fn stop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.stop();
        }
    }
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

fn start_node(
    index: usize,
    model: &Path,
    data_dir: &Path,
    args: &DemoArgs,
    bootstrap: Option<&str>,
    adapter: &Path,
    samples: usize,
) -> Result<NodeProc> {
    let mut cmd = Command::new(exe()?);
    cmd.arg("join")
        .arg("--model")
        .arg(model)
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
        .args(["--round-secs", &args.round_secs.to_string()])
        .arg("--contribute")
        .arg(adapter)
        .args(["--samples", &samples.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(b) = bootstrap {
        cmd.args(["--bootstrap", b]);
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting node {index}"))?;
    let stdout = child.stdout.take().context("node stdout")?;
    let (tx, addrs) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("listening on ") {
                let _ = tx.send(addr.to_string());
            }
            eprintln!("  [node {index}] {line}");
        }
    });
    Ok(NodeProc {
        index,
        child,
        data_dir: data_dir.to_path_buf(),
        addrs,
    })
}

/// The committed round 1 of a running node, from its status file.
fn committed(node: &NodeProc) -> Option<RoundView> {
    let bytes = std::fs::read(node.data_dir.join(crate::driver::STATUS_FILE)).ok()?;
    let s: crate::driver::StatusFile = serde_json::from_slice(&bytes).ok()?;
    s.latest_round.filter(|r| r.number >= 1)
}

/// Runs the demo.
pub fn run(args: DemoArgs) -> Result<()> {
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
    let mut nodes: Vec<NodeProc> = Vec::with_capacity(args.nodes);
    let data_dir = |i: usize| nodes_dir.join(format!("node-{i}"));
    let boot = start_node(
        0,
        &model,
        &data_dir(0),
        &args,
        None,
        &adapters[0].0,
        adapters[0].1,
    )?;
    let addr = boot
        .addrs
        .recv_timeout(Duration::from_secs(60))
        .context("the bootstrap node did not report its address")?;
    progress(&format!("node 0 is the bootstrap node: {addr}"));
    nodes.push(boot);
    for (i, (dir, n)) in adapters.iter().enumerate().skip(1) {
        nodes.push(start_node(
            i,
            &model,
            &data_dir(i),
            &args,
            Some(&addr),
            dir,
            *n,
        )?);
    }

    progress("step 3/4: waiting for every node to commit round 1");
    let deadline = Instant::now() + Duration::from_secs_f64(args.round_secs * 6.0 + 120.0);
    let mut done: Vec<Option<RoundView>> = vec![None; nodes.len()];
    while done.iter().any(Option::is_none) {
        for (slot, node) in done.iter_mut().zip(nodes.iter_mut()) {
            if slot.is_none() {
                if let Some(r) = committed(node) {
                    progress(&format!(
                        "node {} committed {} (blake3 {}, {} contributors)",
                        node.index,
                        r.version,
                        &r.hash[..16],
                        r.contributors.len()
                    ));
                    *slot = Some(r);
                } else if let Ok(Some(status)) = node.child.try_wait() {
                    bail!("node {} exited early ({status})", node.index);
                }
            }
        }
        if Instant::now() > deadline {
            bail!("the round did not complete in time");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let rounds: Vec<RoundView> = done.into_iter().flatten().collect();
    let first = &rounds[0];
    if rounds.iter().any(|r| r != first) {
        for (i, r) in rounds.iter().enumerate() {
            eprintln!("node {i}: {r:?}");
        }
        bail!("the nodes committed different round adapters");
    }
    progress(&format!(
        "all {} nodes agree: {} = blake3 {} from {} adapters",
        nodes.len(),
        first.version,
        first.hash,
        first.contributors.len()
    ));
    for n in nodes.iter_mut() {
        n.stop();
    }

    progress(&format!(
        "step 4/4: asking the round adapter (node 0's data dir): {}",
        args.prompt
    ));
    let mut cmd = Command::new(exe()?);
    cmd.arg("chat")
        .arg("--model")
        .arg(&model)
        .arg("--data-dir")
        .arg(data_dir(0))
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
        data_dir(0).display()
    ));
    Ok(())
}

//! One harness for every program that runs several nodes: `hive-node demo`, the end-to-end
//! tests, the examples and the benchmarks. It starts nodes (in this process through
//! [`Node::start`], or as `hive-node` child processes where a test must kill one), and
//! waits for a condition with a deadline, polling; never a bare sleep.
//!
//! ```text
//!   Cluster::start(n, config_of) ─▶ node 0 (bootstrap) ─▶ nodes 1..n (bootstrap = node 0)
//!   Cluster::wait_committed(round) ─▶ every node's DriverView shows the same round
//!   NodeProcess::start(bin, args) ─▶ child process, stdout lines on a channel, status.json
//!   wait_until / wait_until_blocking ─▶ poll f() until Some, or fail naming what timed out
//!   wait_round(node, n) ─▶ what a node committed once it reached round n
//!   TinyNetwork::write(dir) ─▶ a tiny generated model, its LoRA shape, adapters, node configs
//!   churn::run(bin, root, plan) ─▶ N `join` processes killed, restarted and joined round by round
//! ```

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub mod churn;

use crate::data_dir::{DataDir, RoundView, StatusFile};
use crate::error::Result;
use crate::node::{Node, NodeConfig};

/// How often a wait polls.
const POLL: Duration = Duration::from_millis(50);

/// A wait ran past its deadline.
#[derive(Debug, thiserror::Error)]
#[error("timed out after {:.1} s waiting for {what}", after.as_secs_f64())]
pub struct TimedOut {
    /// What was awaited.
    pub what: String,
    /// How long the wait took.
    pub after: Duration,
}

/// Waits (up to `limit`) until `node` has committed round `round` or later, and returns what
/// it committed last.
pub async fn wait_round(node: &Node, round: u64, limit: Duration) -> Result<RoundView, TimedOut> {
    let view = node.view();
    wait_until(&format!("a commit of round {round}"), limit, || {
        let latest = view.borrow().latest.clone();
        async move { latest.filter(|r| r.number >= round) }
    })
    .await
}

/// Polls `f` until it returns `Some`, for at most `limit`.
pub async fn wait_until<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> Result<T, TimedOut>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let t0 = tokio::time::Instant::now();
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if t0.elapsed() > limit {
            return Err(TimedOut {
                what: what.to_string(),
                after: t0.elapsed(),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// [`wait_until`] for code without a runtime (process tests, `demo`).
pub fn wait_until_blocking<T>(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T, TimedOut> {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if t0.elapsed() > limit {
            return Err(TimedOut {
                what: what.to_string(),
                after: t0.elapsed(),
            });
        }
        std::thread::sleep(POLL);
    }
}

/// Nodes running in this process, node 0 the bootstrap node of the others.
#[derive(Debug)]
pub struct Cluster {
    nodes: Vec<Node>,
}

impl Cluster {
    /// Starts `n` nodes: node 0 with `config_of(0)`, then each other node `i` with
    /// `config_of(i)` bootstrapping from node 0 (unless its config names bootstrap peers).
    pub async fn start(n: usize, mut config_of: impl FnMut(usize) -> NodeConfig) -> Result<Self> {
        let mut nodes: Vec<Node> = Vec::with_capacity(n);
        for i in 0..n {
            let mut cfg = config_of(i);
            if let Some(first) = nodes.first() {
                if cfg.bootstrap.is_empty() {
                    cfg.bootstrap = first.listen_addrs().to_vec();
                }
            }
            match Node::start(cfg).await {
                Ok(node) => nodes.push(node),
                Err(e) => {
                    Cluster { nodes }.shutdown().await;
                    return Err(e);
                }
            }
        }
        Ok(Cluster { nodes })
    }

    /// The nodes, node 0 first.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// Waits until every node has committed round `round` or later, and returns what
    /// each committed last (equal on every node when they agree).
    pub async fn wait_committed(
        &self,
        round: u64,
        limit: Duration,
    ) -> Result<Vec<RoundView>, TimedOut> {
        let views: Vec<_> = self.nodes.iter().map(Node::view).collect();
        wait_until(
            &format!("every node to commit round {round}"),
            limit,
            || {
                let got: Option<Vec<RoundView>> = views
                    .iter()
                    .map(|v| v.borrow().latest.clone().filter(|r| r.number >= round))
                    .collect();
                async move { got }
            },
        )
        .await
    }

    /// Waits until every node has at least `min` connected peers.
    pub async fn wait_connected(&self, min: usize, limit: Duration) -> Result<(), TimedOut> {
        wait_until(
            &format!("every node to have {min} peers"),
            limit,
            || async {
                for n in &self.nodes {
                    let peers = n
                        .client()
                        .info()
                        .await
                        .map(|i| i.connected.len())
                        .unwrap_or(0);
                    if peers < min {
                        return None;
                    }
                }
                Some(())
            },
        )
        .await
    }

    /// The nodes, to stop or keep one by one.
    pub fn into_nodes(self) -> Vec<Node> {
        self.nodes
    }

    /// Stops every node and waits for their tasks.
    pub async fn shutdown(self) {
        for n in self.nodes {
            n.shutdown().await;
        }
    }
}

/// A `hive-node` child process (for tests that kill a node or check what the binary
/// prints); killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct NodeProcess {
    child: Child,
    lines: mpsc::Receiver<String>,
    data_dir: DataDir,
}

impl NodeProcess {
    /// Runs `bin <args> --data-dir <data_dir>` with stdout piped (its lines arrive on a
    /// channel) and stderr inherited.
    pub fn start(bin: &Path, args: &[String], data_dir: &Path) -> std::io::Result<Self> {
        let mut child = Command::new(bin)
            .args(args)
            .arg("--data-dir")
            .arg(data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let out = child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("child stdout is not piped"))?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Ok(NodeProcess {
            child,
            lines,
            data_dir: DataDir::new(data_dir),
        })
    }

    /// The process's data dir.
    pub fn data_dir(&self) -> &DataDir {
        &self.data_dir
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the process now (from `/proc`, Linux), in bytes.
    pub fn rss_bytes(&self) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let kb = s.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
        kb.trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<u64>()
            .ok()?
            .checked_mul(1024)
    }

    /// The process.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The rest of the next stdout line that starts with `prefix`, waiting at most `limit`.
    pub fn line(&self, prefix: &str, limit: Duration) -> Result<String, TimedOut> {
        let t0 = Instant::now();
        loop {
            let left = limit.saturating_sub(t0.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    if let Some(rest) = l.strip_prefix(prefix) {
                        return Ok(rest.to_string());
                    }
                }
                Err(_) => {
                    return Err(TimedOut {
                        what: format!(
                            "a line {prefix:?} from the node in {}",
                            self.data_dir.path().display()
                        ),
                        after: t0.elapsed(),
                    })
                }
            }
        }
    }

    /// The node's status file as last written.
    pub fn status(&self) -> Option<StatusFile> {
        self.data_dir.last_status()
    }

    /// The latest committed round, once it is `round` or later.
    pub fn committed(&self, round: u64) -> Option<RoundView> {
        self.status()?.latest_round.filter(|r| r.number >= round)
    }

    /// Asks the node to stop (SIGTERM: it shuts down cleanly) and waits up to `limit`;
    /// kills it after that.
    pub fn stop(&mut self, limit: Duration) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let exited = wait_until_blocking("the node to exit", limit, || {
            matches!(self.child.try_wait(), Ok(Some(_))).then_some(())
        });
        if exited.is_err() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `hive-node` binary next to the running example (`target/<profile>/examples/x` ->
/// `target/<profile>/hive-node`), or `explicit` when given.
pub fn hive_node_bin(explicit: Option<&Path>) -> std::io::Result<PathBuf> {
    let bin = match explicit {
        Some(b) => b.to_path_buf(),
        None => std::env::current_exe()?
            .parent()
            .and_then(Path::parent)
            .ok_or_else(|| std::io::Error::other("no directory above this program"))?
            .join("hive-node"),
    };
    if bin.exists() {
        Ok(bin)
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "{} is missing: build it with `cargo build --bin hive-node` (or pass --bin)",
                bin.display()
            ),
        ))
    }
}

/// Data dirs `<root>/node-0 .. node-{n-1}`.
pub fn node_dirs(root: &Path, n: usize) -> Vec<PathBuf> {
    (0..n).map(|i| root.join(format!("node-{i}"))).collect()
}

/// A tiny generated network for in-process tests and examples: a GGUF model written to a
/// work dir and a small LoRA shape on it (rank 4, alpha 8, `q_proj` and `v_proj`).
pub struct TinyNetwork {
    /// The model file.
    pub model: PathBuf,
    /// The LoRA shape (and rule: the default) of the network's adapters.
    pub lora: crate::node::LoraSettings,
    shape: hivemind_model::adapter::AdapterShape,
}

impl TinyNetwork {
    /// Writes the model into `dir`.
    pub fn write(dir: &Path) -> Result<TinyNetwork> {
        use hivemind_model::testing::TinyModel;
        let model = dir.join("tiny.gguf");
        let tiny = TinyModel::new(hivemind_model::config::Arch::Llama, 1)?;
        tiny.write_gguf(&model)?;
        let lora = crate::node::LoraSettings {
            rank: 4,
            alpha: 8.0,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            ..Default::default()
        };
        let shape = tiny.cfg.adapter_shape(lora.rank, &lora.target_modules)?;
        Ok(TinyNetwork { model, lora, shape })
    }

    /// A random adapter of the network's shape.
    pub fn adapter(&self, seed: u64) -> Result<hivemind_model::adapter::LoraAdapter> {
        Ok(hivemind_model::testing::random_adapter(
            &self.shape,
            self.lora.alpha,
            seed,
        )?)
    }

    /// Has each of `nodes` contribute a random adapter (seed `seed + i` for the `i`-th,
    /// written to `root/adapter-{seed + i}`), and returns the adapters' hashes in hex, in order.
    pub async fn contribute_each(
        &self,
        root: &Path,
        nodes: &[&Node],
        seed: u64,
    ) -> Result<Vec<String>> {
        let mut hashes = Vec::with_capacity(nodes.len());
        for (i, node) in nodes.iter().enumerate() {
            let seed = seed + i as u64;
            let dir = root.join(format!("adapter-{seed}"));
            self.adapter(seed)?.write_dir(&dir)?;
            hashes.push(node.contribute(dir, 10).await?.to_hex());
        }
        Ok(hashes)
    }

    /// Starts `n` nodes of this network in `root/node-i` (rounds of `round_secs`; `adjust`
    /// changes node `i`'s config), has node `i` contribute a random adapter of seed `seed + i`,
    /// and waits (up to `limit`) until every node has committed round 1.
    pub async fn start_with_round(
        &self,
        root: &Path,
        n: usize,
        round_secs: f64,
        seed: u64,
        limit: Duration,
        mut adjust: impl FnMut(usize, &mut NodeConfig),
    ) -> Result<Cluster> {
        let dirs = node_dirs(root, n);
        let cluster = Cluster::start(n, |i| {
            let mut cfg = self.node_config(&dirs[i], round_secs);
            adjust(i, &mut cfg);
            cfg
        })
        .await?;
        let committed = async {
            cluster.wait_connected(1, limit).await?;
            for (i, node) in cluster.nodes().iter().enumerate() {
                let dir = root.join(format!("adapter-{i}"));
                self.adapter(seed + i as u64)?.write_dir(&dir)?;
                node.contribute(dir, 10).await?;
            }
            cluster.wait_committed(1, limit).await?;
            Ok::<_, crate::Error>(())
        }
        .await;
        match committed {
            Ok(()) => Ok(cluster),
            Err(e) => {
                cluster.shutdown().await;
                Err(e)
            }
        }
    }

    /// The `hive-node join`/`serve` flags that put a process on this network, listening on
    /// loopback.
    pub fn join_flags(&self) -> Vec<String> {
        vec![
            "--model".into(),
            self.model.display().to_string(),
            "--listen".into(),
            "/ip4/127.0.0.1/tcp/0".into(),
            "--rank".into(),
            self.lora.rank.to_string(),
            "--alpha".into(),
            self.lora.alpha.to_string(),
            "--target-modules".into(),
            self.lora.target_modules.join(","),
        ]
    }

    /// A node of this network on `data_dir`, rounds of `round_secs`.
    pub fn node_config(&self, data_dir: impl Into<PathBuf>, round_secs: f64) -> NodeConfig {
        let mut cfg = NodeConfig::new(data_dir, &self.model, round_secs);
        cfg.lora = self.lora.clone();
        cfg
    }
}

//! What the process-level tests share: `hive-node` child processes (the harness's
//! `NodeProcess`) and waits on their `status.json`, and the tiny network every test runs (a 2-layer
//! generated GGUF model, LoRA r=4/alpha 8 on q_proj and v_proj).
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use hivemind_model::adapter::LoraAdapter;
use hivemind_model::config::Arch;
use hivemind_model::testing::TinyModel;
use hivemind_node::harness::{wait_until_blocking, NodeProcess};
use serde_json::Value;

/// The binary under test.
pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_hive-node");
/// How long any one wait may take (generous: CI is a loaded 2-core box).
pub(crate) const WAIT: Duration = Duration::from_secs(120);
/// The tiny network's LoRA rank, alpha and modules.
pub(crate) const RANK: usize = 4;
/// LoRA alpha of the tiny network.
pub(crate) const ALPHA: f64 = 8.0;
/// Target modules of the tiny network.
pub(crate) const MODULES: &str = "q_proj,v_proj";

/// The flags that put a node on the tiny network (model, LoRA shape), listening on loopback.
pub(crate) fn tiny_network_flags(model: &Path) -> Vec<String> {
    let mut v: Vec<String> = vec!["--model".into(), model.display().to_string()];
    for s in [
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--rank",
        "4",
        "--alpha",
        "8",
        "--target-modules",
        MODULES,
    ] {
        v.push(s.into());
    }
    v
}

/// Writes the tiny GGUF model (`seed` 1 is the network's model) into `dir`.
pub(crate) fn tiny_model(dir: &Path, seed: u64) -> PathBuf {
    let path = dir.join(format!("tiny-{seed}.gguf"));
    TinyModel::new(Arch::Llama, seed)
        .unwrap()
        .write_gguf(&path)
        .unwrap();
    path
}

/// A random adapter of the tiny model's shape with LoRA rank `rank` and `v_out` rows in
/// v_proj's B (32 is right, anything else is the wrong shape).
pub(crate) fn tiny_adapter(seed: u64, rank: usize, v_out: usize) -> LoraAdapter {
    let mut shape = TinyModel::new(Arch::Llama, 1)
        .unwrap()
        .cfg
        .adapter_shape(rank, &["q_proj".to_string(), "v_proj".to_string()])
        .unwrap();
    shape.modules.get_mut("v_proj").unwrap().out_features = v_out;
    hivemind_model::testing::random_adapter(&shape, ALPHA, seed).unwrap()
}

/// A `hive-node` child process of the harness, with its data dir; killed when dropped.
pub(crate) struct Proc {
    /// The process.
    pub(crate) node: NodeProcess,
    /// Its `--data-dir`.
    pub(crate) data: PathBuf,
}

impl Proc {
    /// `hive-node <args> --data-dir <data>`, stdout piped, stderr inherited.
    pub(crate) fn start(args: &[String], data: &Path) -> Proc {
        Proc {
            node: NodeProcess::start(Path::new(BIN), args, data).unwrap(),
            data: data.to_path_buf(),
        }
    }

    /// A node on the tiny network: `hive-node <args> <tiny network flags> <extra>`.
    pub(crate) fn tiny(args: &[&str], model: &Path, data: &Path, extra: &[&str]) -> Proc {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.extend(tiny_network_flags(model));
        all.extend(extra.iter().map(|s| s.to_string()));
        Proc::start(&all, data)
    }

    /// The rest of the next stdout line starting with `prefix` (waits for it).
    pub(crate) fn line(&self, prefix: &str) -> String {
        self.node.line(prefix, WAIT).unwrap()
    }

    /// The node's `status.json` as JSON, if it has written one.
    pub(crate) fn status(&self) -> Option<Value> {
        serde_json::to_value(self.node.status()?).ok()
    }

    /// The latest committed round's (number, hash), once it is at least `round`.
    pub(crate) fn committed(&self, round: u64) -> Option<(u64, String)> {
        self.node.committed(round).map(|r| (r.number, r.hash))
    }

    /// Waits for the node's current round to list adapter `hash` (hex) as a contributor.
    pub(crate) fn wait_contributor(&self, hash: &str) {
        wait_for(&format!("{} to list {hash}", self.data.display()), || {
            let s = self.node.status()?;
            s.current_contributors
                .iter()
                .any(|h| h == hash)
                .then_some(())
        });
    }
}

/// Polls `f` until it returns `Some`, for at most [`WAIT`] (the harness's wait).
pub(crate) fn wait_for<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    wait_until_blocking(what, WAIT, f).unwrap()
}

/// The `--api-key` of [`http_with_key_on_first`].
pub(crate) const API_KEY: &str = "test-key-2a9f0c41d7e3";

/// [`http_on_first`], the dashboard and chat API behind [`API_KEY`].
pub(crate) fn http_with_key_on_first(i: usize, cfg: &mut hivemind_node::NodeConfig) {
    http_on_first(i, cfg);
    if let Some(chat) = cfg.chat.as_mut() {
        chat.api_key = Some(std::sync::Arc::new(
            hivemind_node::web::ApiKey::new(API_KEY).unwrap(),
        ));
    }
}

/// For [`hivemind_node::harness::TinyNetwork::start_with_round`]: node 0 serves the dashboard
/// and the chat API on a free loopback port (`Node::http_addr`).
pub(crate) fn http_on_first(i: usize, cfg: &mut hivemind_node::NodeConfig) {
    if i == 0 {
        cfg.chat = Some(hivemind_node::node::ChatSettings::default());
        cfg.http = Some("127.0.0.1:0".into());
    }
}

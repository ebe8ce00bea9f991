//! A node's data dir. [`DataDir`] owns every path and file in it; nothing else in the
//! program spells a file name of the data dir.
//!
//! ```text
//!   <data dir>/
//!     identity.key                  ed25519 key: signs messages, is the libp2p key
//!     db/  blobs/                   the store (sled index, content-addressed blob files)
//!     network.json                  the network the node last joined  (NetworkFile)
//!     privacy.json                  rounds this node released its own adapter in (DP networks)
//!     status.json                   kept by the running node, every 300 ms (StatusFile)
//!     training.json                 the last `train` run with this data dir, as it goes
//!     evals.json                    `eval` scores of round adapters, by round hash
//!     inbox/<name>/READY            adapters handed to the running node (contribute,
//!                                   train --announce); READY holds the sample count
//!     round-adapters/<version>-<hash16>/   committed round adapters as PEFT dirs
//! ```
//!
//! A running node holds the store's database locked, so the commands that read a running
//! node (`status`, `rounds`, `export`, `chat --use round`) go through its status file and
//! read committed blobs with [`hivemind_store::Store::read_blob_unlocked`].

mod files;
mod rounds;

pub use rounds::REFIT_COMMAND;

use std::path::{Path, PathBuf};

use hivemind_model::adapter::{AdapterConfig, LoraAdapter};
use hivemind_protocol::{Hash, NodeKey};
use hivemind_store::Store;
use serde::Serialize;

pub use files::{
    AggregationView, NetworkFile, OwnAdapter, PrivacyView, RoundView, StatusFile, TrainingFile,
    TrainingStep, TransferView,
};

use crate::error::{Error, IoContext, Result};

const STATUS_FILE: &str = "status.json";
const TRAINING_FILE: &str = "training.json";
const EVALS_FILE: &str = "evals.json";
/// Round evals kept in `evals.json` (the newest).
const MAX_EVALS: usize = 256;
const NETWORK_FILE: &str = "network.json";
const PRIVACY_FILE: &str = "privacy.json";
const INBOX_DIR: &str = "inbox";
const READY_FILE: &str = "READY";
const ROUND_ADAPTERS_DIR: &str = "round-adapters";

/// A node's data dir (see the module docs for its layout).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// The data dir at `root` (nothing is created yet).
    pub fn new(root: impl Into<PathBuf>) -> DataDir {
        DataDir { root: root.into() }
    }

    /// The default place: the user's data dir + `hivemind`.
    pub fn default_path() -> PathBuf {
        dirs::data_dir()
            .unwrap_or_else(std::env::temp_dir)
            .join("hivemind")
    }

    /// The dir itself.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Creates the dir if it does not exist.
    pub fn create(&self) -> Result<()> {
        std::fs::create_dir_all(&self.root).at("creating", &self.root)
    }

    /// The node's key, created on first use (owner-only file, never printed).
    pub fn node_key(&self) -> Result<NodeKey> {
        self.node_key_with_work(0)
    }

    /// The node's signing key, created on first use with `bits` of key work
    /// ([`hivemind_protocol::NodeId::key_work`]: about 2^`bits` key generations, logged as it
    /// goes). A key that exists is loaded as it is, with whatever work it has. More than
    /// [`hivemind_protocol::MAX_KEY_WORK`] bits is an error.
    pub fn node_key_with_work(&self, bits: u32) -> Result<NodeKey> {
        check_key_work(bits)?;
        let make = || {
            if bits > 0 {
                tracing::info!(bits, "making a node key with the network's key work");
            }
            let key = NodeKey::grind(
                bits,
                || {
                    let mut secret = [0u8; 32];
                    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut secret);
                    secret
                },
                |tries| {
                    if tries.is_multiple_of(1 << 22) {
                        tracing::info!(tries, bits, "still making a node key");
                    }
                },
            );
            key.into()
        };
        Ok(NodeKey::from(hivemind_store::load_or_create_identity_with(
            &self.root, make,
        )?))
    }

    /// The node's libp2p peer id (from its key, created on first use).
    pub fn peer_id(&self) -> Result<libp2p::PeerId> {
        Ok(crate::identity::keypair_of(&self.node_key()?)?
            .public()
            .to_peer_id())
    }

    /// Opens the store (fails while a running node holds it).
    pub fn open_store(&self) -> Result<Store> {
        Ok(Store::open(&self.root)?)
    }

    /// Whether the store's blob dir exists (a node has run here).
    pub fn has_store(&self) -> bool {
        self.root.join(hivemind_store::BLOBS_DIR).exists()
    }

    /// Reads a committed blob without opening the store, verified against `hash`.
    pub fn read_blob(&self, hash: &Hash) -> Result<Vec<u8>> {
        Store::read_blob_unlocked(&self.root, hash)?.ok_or_else(|| Error::MissingBlob {
            hash: *hash,
            dir: self.root.clone(),
        })
    }

    // --- status.json -------------------------------------------------------------------

    /// Writes the running node's status file (atomically: temp file, then rename).
    pub fn write_status(&self, status: &StatusFile) -> Result<()> {
        write_json_atomic(&self.root.join(STATUS_FILE), status)
    }

    /// Removes the status file (the node stops).
    pub fn remove_status(&self) {
        let _ = std::fs::remove_file(self.root.join(STATUS_FILE));
    }

    /// The status file as last written, whether or not its writer still runs.
    pub fn last_status(&self) -> Option<StatusFile> {
        let bytes = std::fs::read(self.root.join(STATUS_FILE)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// The status of the node running in this dir.
    pub fn running_status(&self) -> Result<StatusFile> {
        let path = self.root.join(STATUS_FILE);
        let bytes = std::fs::read(&path).map_err(|e| Error::NoRunningNode {
            dir: self.root.clone(),
            why: format!("no {STATUS_FILE} ({e})"),
        })?;
        let s: StatusFile = serde_json::from_slice(&bytes).map_err(|source| Error::Json {
            what: "status file",
            path: path.clone(),
            source,
        })?;
        if !Path::new(&format!("/proc/{}", s.pid)).exists() {
            return Err(Error::NoRunningNode {
                dir: self.root.clone(),
                why: format!(
                    "the node that wrote {STATUS_FILE} (pid {}) has exited",
                    s.pid
                ),
            });
        }
        Ok(s)
    }

    // --- training.json -----------------------------------------------------------------

    /// Writes the training record (atomically), when the data dir exists.
    pub fn write_training(&self, t: &TrainingFile) -> Result<()> {
        if !self.root.is_dir() {
            return Ok(());
        }
        write_json_atomic(&self.root.join(TRAINING_FILE), t)
    }

    /// The last training record, and whether its run is still going.
    pub fn training(&self) -> Option<(TrainingFile, bool)> {
        let bytes = std::fs::read(self.root.join(TRAINING_FILE)).ok()?;
        let t: TrainingFile = serde_json::from_slice(&bytes).ok()?;
        let running = !t.finished && Path::new(&format!("/proc/{}", t.pid)).exists();
        Some((t, running))
    }

    // --- evals.json --------------------------------------------------------------------

    /// Records `eval`'s summary for the round adapter with hash `hash` (hex), keeping the
    /// newest [`MAX_EVALS`]. The summary should carry `evaluated_ms`.
    pub fn record_eval(&self, hash: &str, summary: serde_json::Value) -> Result<()> {
        let mut all = self.evals();
        all.insert(hash.to_string(), summary);
        while all.len() > MAX_EVALS {
            let oldest = all
                .iter()
                .min_by_key(|(_, v)| v["evaluated_ms"].as_u64().unwrap_or(0))
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => all.remove(&k),
                None => break,
            };
        }
        write_json_atomic(&self.root.join(EVALS_FILE), &all)
    }

    /// `eval` scores of round adapters, by round hash (hex).
    pub fn evals(&self) -> std::collections::BTreeMap<String, serde_json::Value> {
        std::fs::read(self.root.join(EVALS_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    // --- privacy.json ------------------------------------------------------------------

    /// The rounds in which this node released its own adapter under differential privacy
    /// (empty when none, or when the file is unreadable: then the count starts again, and
    /// ε is under-reported, which `status` says nothing about; the file is small and written
    /// atomically).
    pub fn released_rounds(&self) -> std::collections::BTreeSet<u64> {
        std::fs::read(self.root.join(PRIVACY_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Records the rounds of [`DataDir::released_rounds`].
    pub fn write_released_rounds(&self, rounds: &std::collections::BTreeSet<u64>) -> Result<()> {
        write_json_atomic(&self.root.join(PRIVACY_FILE), rounds)
    }

    // --- network.json ------------------------------------------------------------------

    /// Records the network the node joins.
    pub fn write_network(&self, network: &NetworkFile) -> Result<()> {
        write_json_atomic(&self.root.join(NETWORK_FILE), network)
    }

    /// The network the node last joined.
    pub fn network(&self) -> Result<NetworkFile> {
        let path = self.root.join(NETWORK_FILE);
        let bytes = std::fs::read(&path).at("reading", &path)?;
        serde_json::from_slice(&bytes).map_err(|source| Error::Json {
            what: "network file",
            path,
            source,
        })
    }

    /// The LoRA config of the network the node last joined.
    pub fn network_config(&self) -> Result<AdapterConfig> {
        serde_json::from_value(self.network()?.adapter_config).map_err(|source| Error::Json {
            what: "network file's adapter config",
            path: self.root.join(NETWORK_FILE),
            source,
        })
    }

    /// The aggregation rule of the network the node last joined.
    pub fn network_rule(&self) -> Result<crate::driver::NetRule> {
        self.network()?.rule.parse()
    }

    /// Whether the network the node last joined runs base model `base_hash`.
    pub fn network_runs(&self, base_hash: &Hash) -> bool {
        self.network()
            .is_ok_and(|n| n.base_model_hash == base_hash.to_hex())
    }

    // --- inbox/ ------------------------------------------------------------------------

    /// Hands an adapter dir to the node running here: a copy goes into the inbox under a
    /// hidden name and is renamed into place with its READY marker (`samples`, its FedAvg
    /// weight), so the node never reads a half-written adapter.
    pub fn hand_over(&self, adapter_dir: &Path, samples: u64) -> Result<()> {
        self.running_status()?;
        let adapter = LoraAdapter::read_dir(adapter_dir)?;
        let name = format!(
            "{}-{}",
            crate::clock::now_ms(),
            adapter.canonical_hash()?.short()
        );
        let inbox = self.root.join(INBOX_DIR);
        let tmp = inbox.join(format!(".{name}"));
        adapter.write_dir(&tmp)?;
        let ready = tmp.join(READY_FILE);
        std::fs::write(&ready, samples.to_string()).at("writing", &ready)?;
        std::fs::rename(&tmp, inbox.join(&name)).at("renaming into", &inbox)
    }

    /// Adapter dirs in the inbox that are ready, in name (= arrival) order.
    pub fn inbox_ready(&self) -> Vec<PathBuf> {
        let Ok(rd) = std::fs::read_dir(self.root.join(INBOX_DIR)) else {
            return Vec::new();
        };
        let mut ready: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let hidden = p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'));
                !hidden && p.join(READY_FILE).exists()
            })
            .collect();
        ready.sort();
        ready
    }

    /// The sample count of a ready inbox dir (1 when unreadable).
    pub fn inbox_samples(dir: &Path) -> u64 {
        std::fs::read_to_string(dir.join(READY_FILE))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1)
    }

    /// Removes a handled inbox dir.
    pub fn inbox_done(dir: &Path) {
        let _ = std::fs::remove_dir_all(dir);
    }

    // --- round-adapters/ ---------------------------------------------------------------

    /// Where the PEFT export of committed round `round` is cached.
    fn round_adapter_dir(&self, round: &RoundView) -> PathBuf {
        let prefix = round.hash.get(..16).unwrap_or(&round.hash);
        self.root
            .join(ROUND_ADAPTERS_DIR)
            .join(format!("{}-{prefix}", round.version))
    }
}

/// Writes `value` as JSON to `path` through a temp file and a rename.
fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let bytes = serde_json::to_vec_pretty(value).map_err(|source| Error::Json {
        what: "JSON value",
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::write(&tmp, bytes).at("writing", &tmp)?;
    std::fs::rename(&tmp, path).at("renaming into", path)
}

/// `bits` of key work is something a key can be made with: at most
/// [`hivemind_protocol::MAX_KEY_WORK`].
pub fn check_key_work(bits: u32) -> Result<()> {
    if bits > hivemind_protocol::MAX_KEY_WORK {
        return Err(Error::Config {
            option: "key-work",
            detail: format!(
                "{bits} bits is more than {}: a key would take about 2^{bits} tries to make",
                hivemind_protocol::MAX_KEY_WORK
            ),
        });
    }
    Ok(())
}

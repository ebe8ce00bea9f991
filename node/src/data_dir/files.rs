//! The JSON files of a data dir: their schemas, which scripts may rely on.

use std::collections::BTreeMap;

use hivemind_protocol::Hash;
use serde::{Deserialize, Serialize};

/// A committed round as `status.json`, `status` and `rounds` show it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RoundView {
    /// Round number.
    pub number: u64,
    /// Version name.
    pub version: String,
    /// blake3 of the round adapter, hex.
    pub hash: String,
    /// Input adapter hashes, hex, sorted.
    pub contributors: Vec<String>,
    /// The aggregation rule that made it (its metadata name, e.g. `fedavg-v2`, `iso-v3`);
    /// empty in status files written before it was recorded.
    #[serde(default)]
    pub rule: String,
}

impl RoundView {
    /// The view of a stored round.
    pub fn of(r: &hivemind_store::RoundRecord) -> Self {
        RoundView {
            number: r.number,
            version: r.version.clone(),
            hash: r.hash.to_hex(),
            contributors: r.contributors.iter().map(Hash::to_hex).collect(),
            rule: r.rule.clone(),
        }
    }
}

/// What differential privacy this node's own releases have had.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PrivacyView {
    /// L2 norm every release is clipped to.
    pub clip: f64,
    /// Noise standard deviation in units of the clip.
    pub noise_multiplier: f64,
    /// The δ of the ε figures.
    pub delta: f64,
    /// ε of one round's release.
    pub epsilon_per_round: f64,
    /// Rounds in which this node released its own adapter.
    pub rounds_released: u64,
    /// ε over all of them (RDP composition).
    pub epsilon_total: f64,
}

/// An adapter this node announced.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct OwnAdapter {
    /// The round it was announced in.
    pub round: u64,
    /// Its hash (hex blake3).
    pub hash: String,
}

/// A blob transfer in progress, as `status.json` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TransferView {
    /// The blob (hex blake3).
    pub hash: String,
    /// The peer sending it.
    pub peer: String,
    /// Bytes received.
    pub bytes: u64,
    /// Bytes in all.
    pub total: u64,
    /// Mean rate since the transfer started.
    pub bytes_per_s: f64,
}

/// An aggregation running, as `status.json` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AggregationView {
    /// The round.
    pub round: u64,
    /// Its inputs.
    pub inputs: usize,
    /// When it started (unix ms).
    pub since_ms: u64,
    /// Tries so far (a failed aggregation is retried).
    pub attempt: u32,
}

/// `status.json`: what the running node last wrote about itself.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusFile {
    /// Process id of the node.
    pub pid: u32,
    /// Peer id.
    pub peer_id: String,
    /// Listen addrs with `/p2p/<peer id>`.
    pub listen_addrs: Vec<String>,
    /// Number of connected peers.
    pub connected_peers: usize,
    /// The round being collected.
    pub current_round: u64,
    /// Adapters announced for the current round so far (hex).
    pub current_contributors: Vec<String>,
    /// When this node first held each of those announcements (unix ms, by adapter hex): its
    /// own when it published it, a peer's when gossip delivered it.
    #[serde(default)]
    pub current_seen_ms: BTreeMap<String, u64>,
    /// When the current round's window closed on this node (unix ms), once it has.
    #[serde(default)]
    pub current_closed_ms: Option<u64>,
    /// The last committed round.
    pub latest_round: Option<RoundView>,
    /// Model id (hex).
    pub model_id: String,
    /// The network's LoRA config (for `export`).
    pub adapter_config: serde_json::Value,
    /// Penalties given, by peer id.
    pub penalties: BTreeMap<String, u32>,
    /// Inbox hand-overs waiting for the next round (this round has the node's adapter).
    #[serde(default)]
    pub inbox_waiting: Vec<String>,
    /// Gossipsub scores of connected peers.
    pub scores: BTreeMap<String, f64>,
    /// How each connected peer is connected (one entry per open connection).
    #[serde(default)]
    pub links: BTreeMap<String, Vec<crate::net::Link>>,
    /// What AutoNAT concluded: `public`, `private` or `unknown`.
    #[serde(default)]
    pub reachability: String,
    /// Relays this node listens through (peer ids).
    #[serde(default)]
    pub relays: Vec<String>,
    /// Blob bytes this node has served to peers since it started, by blob (hex).
    #[serde(default)]
    pub served: BTreeMap<String, u64>,
    /// Adapters this node announced (its own and its gateway's uploads) in recent rounds.
    #[serde(default)]
    pub own_adapters: Vec<OwnAdapter>,
    /// Blob transfers in progress.
    #[serde(default)]
    pub transfers: Vec<TransferView>,
    /// Aggregations running (or waiting to retry).
    #[serde(default)]
    pub aggregating: Vec<AggregationView>,
    /// Differential privacy, in a network that has it.
    #[serde(default)]
    pub privacy: Option<PrivacyView>,
    /// All committed rounds, oldest first.
    pub rounds: Vec<RoundView>,
    /// When this node committed each of them (unix ms, by round number; the same round
    /// commits at different times on different nodes, so it is not part of [`RoundView`]).
    #[serde(default)]
    pub committed_ms: BTreeMap<u64, u64>,
    /// When this file was written (unix ms).
    pub updated_ms: u64,
}

/// `network.json`: the network the node last joined (for `chat` and `export`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetworkFile {
    /// The network's model id, hex.
    pub model_id: String,
    /// blake3 identity of the base model ([`hivemind_model::model_hash`]), hex.
    pub base_model_hash: String,
    /// The LoRA config every adapter of the network has.
    pub adapter_config: serde_json::Value,
    /// The aggregation rule (`fedavg`, `exact-mean`, `iso`, `tsv`; files written before
    /// rules were a choice have none and mean `fedavg`).
    #[serde(default = "fedavg")]
    pub rule: String,
}

fn fedavg() -> String {
    "fedavg".into()
}

/// One optimizer step of a training run, as `training.json` records it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainingStep {
    /// Steps done.
    pub step: usize,
    /// Mean loss of the step.
    pub loss: f64,
    /// Learning rate of the step.
    pub lr: f64,
    /// Seconds since training started.
    pub elapsed_s: f64,
}

/// `training.json`: the last `hive-node train` run that used this data dir, as it goes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainingFile {
    /// Process id of the training.
    pub pid: u32,
    /// Where the adapter goes.
    pub output: String,
    /// The base model trained on.
    pub base_model: String,
    /// Training examples.
    pub examples: usize,
    /// Optimizer steps planned.
    pub total_steps: usize,
    /// Steps so far (at most [`TrainingFile::MAX_STEPS`]: longer runs keep every other one).
    pub steps: Vec<TrainingStep>,
    /// Whether the run has ended (its adapter is written).
    pub finished: bool,
    /// When this file was written (unix ms).
    pub updated_ms: u64,
}

impl TrainingFile {
    /// Most steps kept.
    pub const MAX_STEPS: usize = 2000;

    /// Records a step, thinning the record to every other step when it is full.
    pub fn push(&mut self, step: TrainingStep) {
        if self.steps.len() >= Self::MAX_STEPS {
            let mut i = 0;
            self.steps.retain(|_| {
                i += 1;
                i % 2 == 0
            });
        }
        self.steps.push(step);
    }
}

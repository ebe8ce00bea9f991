//! [`SimConfig`] and [`PartitionSpec`]: the simulated scenario.

use crate::round::RoundConfig;

/// A partition of the honest nodes into two sides, healed later.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionSpec {
    /// When the partition starts (virtual ms).
    pub start_ms: u64,
    /// When it heals.
    pub heal_ms: u64,
    /// Share of honest nodes on the minority side, per mille.
    pub minority_per_mille: u32,
}

/// Simulation parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimConfig {
    /// Honest nodes.
    pub nodes: usize,
    /// Byzantine senders, on top of the honest nodes.
    pub byzantine: usize,
    /// Virtual run time.
    pub duration_ms: u64,
    /// No node starts training in the last `quiet_ms`, so the run can settle.
    pub quiet_ms: u64,
    /// Round machine configuration (all nodes).
    pub round: RoundConfig,
    /// Gossip delay range (min, max).
    pub delay_ms: (u64, u64),
    /// Gossip messages dropped, per mille per receiver.
    pub drop_per_mille: u32,
    /// Chance a node trains in a round, per mille.
    pub contribute_per_mille: u32,
    /// Training time range.
    pub train_ms: (u64, u64),
    /// Fetch time range.
    pub fetch_ms: (u64, u64),
    /// Aggregation time range.
    pub aggregate_ms: (u64, u64),
    /// Honest nodes that crash.
    pub crashes: usize,
    /// How many of the crashed nodes restart later.
    pub restarts: usize,
    /// The partition, if any.
    pub partition: Option<PartitionSpec>,
    /// Timer tick period of every node.
    pub tick_ms: u64,
    /// Period of each Byzantine sender's misbehaviour.
    pub byzantine_every_ms: u64,
    /// Byzantine senders also flood: 40 announcements at a time under distinct user ids whose
    /// blobs they never serve, with a record of them claiming a weight per user, and
    /// in-progress digests naming 512 announcements that do not exist. Off by default so the
    /// seeds of the other tests replay as before; `tests/sim.rs` runs it on small networks.
    pub sybil_floods: bool,
    /// Byzantine senders also make keys at will (Sybils): each time, a fresh key signs an
    /// announcement of the current round whose adapter the sender serves, one more
    /// contributor as far as anyone can tell. With [`RoundConfig::min_key_work`] in `round`
    /// the fresh keys carry no work (the senders' own keys do, like the honest nodes'); the
    /// report counts the committed inputs they got in ([`SimReport::sybil_inputs`]).
    ///
    /// [`SimReport::sybil_inputs`]: super::SimReport::sybil_inputs
    pub sybil_keys: bool,
    /// Byzantine senders also publish heavier committed records of the tip's round: the
    /// tip's inputs plus one more adapter of a key made at will (served by the sender), with
    /// the right result and weight. An attack that admission does not cover (each switch to
    /// such a record restarts the next round's grace period); off by default, measured by
    /// `examples/simulate.rs --sybil-records`.
    pub sybil_records: bool,
    /// The Byzantine senders collude on a forged history: each signs the same committed
    /// record of the round after the oracle's tip (for half the tips, 100 rounds after it,
    /// deeper than any node can link), on a parent no honest node made, with one input of
    /// theirs (served, valid) and a weight far above the tip's; for half the next-round
    /// records they also serve the made-up parent as a record (the tip's inputs under a
    /// made-up result). A quorum of them vouches for it; an honest node that adopts it is a
    /// violation. Off by default, measured by `examples/simulate.rs
    /// --colluding-history`.
    pub colluding_history: bool,
    /// The Byzantine senders sign honest nodes' tips (so they are among the signers of the
    /// records nodes link), and when asked for a record of such a history they lie: a
    /// variant of the record asked (its round and result) on a made-up parent, or of a
    /// forged weight, or nothing. An honest node that commits a record on a made-up parent
    /// is a violation (`SimReport::forged_adoptions`), as is one that penalises an honest
    /// node; the run must still converge. Off by default, measured by
    /// `examples/simulate.rs --lying-signers`.
    pub lying_signers: bool,
    /// Record every action of this honest node in [`SimReport::trace`] (for replays).
    ///
    /// [`SimReport::trace`]: super::SimReport::trace
    pub trace_node: Option<usize>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            nodes: 100,
            byzantine: 4,
            duration_ms: 60_000,
            quiet_ms: 16_000,
            round: RoundConfig::testing(),
            delay_ms: (10, 250),
            drop_per_mille: 30,
            contribute_per_mille: 300,
            train_ms: (100, 2_800),
            fetch_ms: (20, 300),
            aggregate_ms: (20, 200),
            crashes: 6,
            restarts: 3,
            partition: Some(PartitionSpec {
                start_ms: 10_000,
                heal_ms: 24_000,
                minority_per_mille: 400,
            }),
            tick_ms: 100,
            byzantine_every_ms: 700,
            sybil_floods: false,
            sybil_keys: false,
            sybil_records: false,
            colluding_history: false,
            lying_signers: false,
            trace_node: None,
        }
    }
}

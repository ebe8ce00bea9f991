//! [`RoundConfig`]: the timing and policy of the round machine.

use crate::RuleId;

/// Timing and policy of the round machine. Every node of a network should use the same
/// `window_ms`, `min_inputs` and `rule`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoundConfig {
    /// Collection window, from the round's opening.
    pub window_ms: u64,
    /// Commit once the input set has been stable this long after closing.
    pub grace_ms: u64,
    /// Contributors needed before the window may close on its own.
    pub min_inputs: usize,
    /// Time to wait for one fetch attempt.
    pub fetch_timeout_ms: u64,
    /// Fetch attempts before an adapter or announcement counts as unavailable.
    pub fetch_attempts: u32,
    /// Period of tip-digest republication.
    pub heartbeat_ms: u64,
    /// Announcements stamped further than this in the future are ignored.
    pub max_clock_skew_ms: u64,
    /// Announcements for up to this many rounds after the current one are kept.
    pub lookahead_rounds: u64,
    /// Distinct signers a record from another history needs before it is verified.
    pub catch_up_quorum: usize,
    /// The aggregation rule of this network.
    pub rule: RuleId,
    /// Bits of work a key must carry ([`crate::NodeId::key_work`]) for what it signs to
    /// count: announcements and digests of weaker keys are rejected and their signers
    /// penalised. 0 (the default): every key counts. Part of the network's identity
    /// ([`crate::ModelId::with_key_work`]).
    pub min_key_work: u32,
}

impl Default for RoundConfig {
    /// Production timing: one-hour rounds.
    fn default() -> Self {
        RoundConfig {
            window_ms: 60 * 60 * 1000,
            grace_ms: 5 * 60 * 1000,
            min_inputs: 1,
            fetch_timeout_ms: 2 * 60 * 1000,
            fetch_attempts: 3,
            heartbeat_ms: 60 * 1000,
            max_clock_skew_ms: 5 * 60 * 1000,
            lookahead_rounds: 2,
            catch_up_quorum: 2,
            rule: RuleId::FEDAVG,
            min_key_work: 0,
        }
    }
}

impl RoundConfig {
    /// Timing for tests and the simulator: seconds instead of hours.
    pub fn testing() -> Self {
        RoundConfig {
            window_ms: 3_000,
            grace_ms: 1_000,
            fetch_timeout_ms: 1_000,
            heartbeat_ms: 1_000,
            max_clock_skew_ms: 5_000,
            ..RoundConfig::default()
        }
    }
}

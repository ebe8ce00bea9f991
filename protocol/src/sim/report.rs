//! [`SimReport`]: what a simulation run found.

use std::fmt;

/// What a run found.
#[derive(Clone, Debug, Default)]
pub struct SimReport {
    /// Broken properties (empty when the run passed).
    pub violations: Vec<String>,
    /// Honest nodes running at the end (the ones checked).
    pub checked_nodes: usize,
    /// The common final tip round (lowest, if they differ).
    pub final_round: u64,
    /// Highest tip round at the moment the partition healed.
    pub heal_round: u64,
    /// Commit actions, all nodes (fork switches and catch-ups included).
    pub commits: u64,
    /// Of those, fork-choice switches of an already committed round.
    pub switches: u64,
    /// Penalties honest nodes gave Byzantine senders.
    pub byzantine_penalties: u64,
    /// Messages that failed decoding at a receiver (bad signatures).
    pub decode_rejects: u64,
    /// Gossip deliveries.
    pub deliveries: u64,
    /// Rounds whose records differ between checked nodes (forks; each must be
    /// resolved by the next round, except inside the partition).
    pub disagreeing_rounds: u64,
    /// Inputs of the checked nodes' committed rounds announced by keys Byzantine senders
    /// made at will ([`SimConfig::sybil_keys`](super::SimConfig::sybil_keys)).
    pub sybil_inputs: u64,
    /// Commits by honest nodes of the colluding senders' forged histories
    /// ([`SimConfig::colluding_history`](super::SimConfig::colluding_history)), or on a
    /// lying signer's made-up parent.
    pub forged_adoptions: u64,
    /// Records the lying signers served in answer to record fetches
    /// ([`SimConfig::lying_signers`](super::SimConfig::lying_signers)).
    pub lies_served: u64,
    /// The actions of [`SimConfig::trace_node`](super::SimConfig::trace_node), one line each.
    pub trace: Vec<String>,
}

impl SimReport {
    /// True when no property was broken.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

impl fmt::Display for SimReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} nodes checked, final round {}, heal round {}, {} commits ({} switches), \
             {} Byzantine penalties, {} decode rejects, {} deliveries, {} disagreeing rounds",
            self.checked_nodes,
            self.final_round,
            self.heal_round,
            self.commits,
            self.switches,
            self.byzantine_penalties,
            self.decode_rejects,
            self.deliveries,
            self.disagreeing_rounds
        )?;
        for v in &self.violations {
            write!(f, "\n  VIOLATION: {v}")?;
        }
        Ok(())
    }
}

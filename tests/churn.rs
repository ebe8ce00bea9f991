//! Churn between real `hive-node join` processes on loopback, the CI-sized run of the
//! harness's churn plan (`examples/churn_bench.rs` runs 50 nodes): 12 nodes, 3 contributors a
//! round; in each of 3 rounds 2 nodes are killed with SIGKILL (a contributor may be among
//! them) and 2 are started, a killed node restarting on its data dir and a new one joining.
//! Every round must commit on every node that ran before it; one calm round later every
//! live node, restarted ones included, must hold node 0's tip.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use hivemind_node::harness::churn::{self, ChurnPlan};

#[test]
fn rounds_commit_through_churn_and_every_node_converges_after_it() {
    let tmp = tempfile::tempdir().unwrap();
    let plan = ChurnPlan {
        nodes: 12,
        churn_rounds: 3,
        calm_rounds: 1,
        kills_per_round: 2,
        contributors_per_round: 3,
        round_secs: 3.0,
        wait_secs: 120.0,
        seed: 7,
    };
    let report = churn::run(
        Path::new(env!("CARGO_BIN_EXE_hive-node")),
        tmp.path(),
        &plan,
    )
    .unwrap();
    let json = serde_json::to_string_pretty(&report).unwrap();
    println!("{json}");
    assert_eq!(report.failure, None, "{json}");
    assert!(report.exited.is_empty(), "{json}");
    assert!(report.rounds.iter().all(|r| r.live == plan.nodes), "{json}");
    assert!(report.converged, "{json}");
    assert_eq!(report.rounds.len(), 4, "{json}");
    for r in &report.rounds {
        assert!(r.inputs >= 1, "round {} has no inputs: {json}", r.round);
        assert!(r.committed >= r.expected, "{json}");
    }
    let churned = &report.rounds[..3];
    assert!(
        churned
            .iter()
            .all(|r| r.killed == 2 && r.restarted + r.joined == 2),
        "{json}"
    );
    assert!(churned.iter().any(|r| r.restarted > 0), "{json}");
    assert!(churned.iter().any(|r| r.joined > 0), "{json}");
    let calm = &report.rounds[3];
    assert_eq!((calm.hashes, calm.newcomers_off), (1, 0), "{json}");
    assert_eq!(calm.committed, calm.live, "{json}");
    assert!(report.restarted_live > 0, "{json}");
    assert_eq!(report.restarted_caught_up, report.restarted_live, "{json}");
    // Gossip reached every node that ran before the round.
    assert_eq!(report.gossip_missed, 0, "{json}");
    assert!(report.gossip_ms.n > 0, "{json}");
}

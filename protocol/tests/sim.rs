//! Many seeded simulator runs: agreement, safety and catch-up under delays, drops,
//! crashes, a healing partition and Byzantine senders.

use hivemind_protocol::sim::{self, SimConfig};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn run_seed(cfg: &SimConfig, seed: u64) -> sim::SimReport {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    sim::run(cfg, move || rng.next_u64())
}

fn check_seeds(cfg: &SimConfig, seeds: std::ops::Range<u64>) {
    let mut failed = Vec::new();
    for seed in seeds {
        let report = run_seed(cfg, seed);
        println!("seed {seed}: {report}");
        if !report.passed() {
            eprintln!(
                "seed {seed} FAILED (replay: cargo run -p hivemind-protocol --example simulate -- --seed {seed} --nodes {}):\n{report}",
                cfg.nodes
            );
            failed.push(seed);
        }
    }
    assert!(failed.is_empty(), "failing seeds: {failed:?}");
}

#[test]
fn hundred_nodes_with_partition_crashes_and_byzantine_senders() {
    check_seeds(&SimConfig::default(), 0..3);
}

//! Keys that cost something (`join --key-work BITS`, issue 13: "influence follows keys that
//! cost something, not claims"), in real nodes: nodes on fresh data dirs make keys with the
//! network's work and run rounds together; a node whose key was made without it refuses to
//! start, with an error that says why and what to do (its peers would refuse, penalise and
//! ban it at its first message). That peers refuse what weak keys sign is the round machine's
//! (`protocol/tests/round.rs`, and `protocol/tests/sim.rs` with Sybils making keys at will).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use hivemind_node::harness::{node_dirs, Cluster, TinyNetwork};
use hivemind_protocol::NodeKey;

const BITS: u32 = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_make_keys_with_the_work_and_a_weak_key_does_not_start() {
    let work = tempfile::tempdir().unwrap();
    let mut net = TinyNetwork::write(work.path()).unwrap();
    net.lora.key_work = BITS;
    let dirs = node_dirs(work.path(), 3);
    // C's key: made before it starts, without the work.
    std::fs::create_dir_all(&dirs[2]).unwrap();
    let weak = (1u8..)
        .map(|i| NodeKey::from_bytes(&[i; 32]))
        .find(|k| k.node_id().key_work() < BITS)
        .unwrap();
    hivemind_store::load_or_create_identity_with(&dirs[2], || weak.clone().into()).unwrap();
    let err = match Cluster::start(1, |_| net.node_config(&dirs[2], 3.0)).await {
        Ok(_) => panic!("a node with a weak key started"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("key-work"), "{err}");
    assert!(err.contains(&format!("asks for {BITS}")), "{err}");
    assert!(err.contains("new data dir"), "{err}");

    let cluster = Cluster::start(2, |i| net.node_config(&dirs[i], 3.0))
        .await
        .unwrap();
    for node in cluster.nodes() {
        assert!(node.data_dir().node_key().unwrap().node_id().key_work() >= BITS);
    }
    cluster
        .wait_connected(1, Duration::from_secs(30))
        .await
        .unwrap();
    let nodes: Vec<_> = cluster.nodes().iter().collect();
    let inputs = net.contribute_each(work.path(), &nodes, 1).await.unwrap();
    let rounds = cluster.wait_committed(1, Duration::from_secs(60)).await;
    cluster.shutdown().await;
    let rounds = rounds.unwrap();
    // Each took the other's adapter: the network counts the ground keys.
    for round in &rounds {
        for input in &inputs {
            assert!(round.contributors.contains(input), "{round:?}");
        }
    }
    assert_eq!(rounds[0].hash, rounds[1].hash);
}

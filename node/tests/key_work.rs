//! Keys that cost something (`join --key-work BITS`, issue 13: "influence follows keys that
//! cost something, not claims"): in a network that asks for key work, what a key without it
//! signs does not count, however many such keys one party makes. Before, a key cost one key
//! generation, and every key weighed as one more contributor (Sybils).
//!
//! A and B start on fresh data dirs, so each makes a key with the network's 10 bits of work.
//! C's data dir holds a key without the work (any key made the usual way, almost surely): it
//! runs and follows the rounds, but A refuses its announcement and penalises it.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use hivemind_node::harness::{node_dirs, wait_round, wait_until, Cluster, TinyNetwork};
use hivemind_protocol::NodeKey;

const BITS: u32 = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_with_key_work_refuses_what_weak_keys_sign() {
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

    let members = Cluster::start(2, |i| net.node_config(&dirs[i], 3.0))
        .await
        .unwrap();
    let c = Cluster::start(1, |_| {
        let mut cfg = net.node_config(&dirs[2], 3.0);
        cfg.bootstrap = members.node(0).listen_addrs().to_vec();
        cfg
    })
    .await
    .unwrap();
    let (na, nb, nc) = (members.node(0), members.node(1), c.node(0));
    for node in [na, nb] {
        assert!(node.data_dir().node_key().unwrap().node_id().key_work() >= BITS);
    }
    assert_eq!(
        nc.peer_id(),
        hivemind_node::DataDir::new(&dirs[2]).peer_id().unwrap()
    );
    c.wait_connected(1, Duration::from_secs(30)).await.unwrap();

    let inputs = net
        .contribute_each(work.path(), &[na, nb, nc], 1)
        .await
        .unwrap();
    let round = wait_round(na, 1, Duration::from_secs(60)).await;
    // A refused C's announcement as the signature of a key without the work, and said so.
    let c_peer = nc.peer_id();
    let client = na.client().clone();
    let penalties = wait_until("A penalises C", Duration::from_secs(30), || {
        let client = client.clone();
        async move {
            let info = client.info().await.ok()?;
            info.penalties.get(&c_peer).copied().filter(|n| *n > 0)
        }
    })
    .await;
    let c_round = wait_round(nc, 1, Duration::from_secs(30)).await;
    members.shutdown().await;
    c.shutdown().await;
    let round = round.unwrap();

    assert!(
        !round.contributors.contains(&inputs[2]),
        "A's round 1 took the adapter of a key without the work: {round:?}"
    );
    assert!(round.contributors.contains(&inputs[0]), "{round:?}");
    penalties.unwrap();
    // C itself runs and follows: its own round took its adapter (a node's own contribution
    // is its own business).
    let c_round = c_round.unwrap();
    assert!(c_round.contributors.contains(&inputs[2]), "{c_round:?}");
}

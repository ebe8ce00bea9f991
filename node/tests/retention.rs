//! A node keeps the inputs of its last `retain_rounds` rounds only: after four rounds with
//! `retain_rounds = 2`, the adapters contributed in rounds 1 and 2 are gone from the store,
//! those of rounds 3 and 4 are there, and every round adapter is kept (export still works).
//! Before, nothing was ever collected (issue 13, point 4).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use hivemind_node::harness::{wait_until, TinyNetwork};
use hivemind_node::node::{round_config, Node};
use hivemind_store::Store;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_of_old_rounds_are_collected_and_round_adapters_kept() {
    let work = tempfile::tempdir().unwrap();
    let net = TinyNetwork::write(work.path()).unwrap();
    let data = work.path().join("node");
    let mut cfg = net.node_config(&data, 1.0);
    cfg.round = round_config(1.0, Some(0.3));
    cfg.retain_rounds = 2;
    let node = Node::start(cfg).await.unwrap();
    let view = node.view();
    let mut inputs = Vec::new();
    let mut rounds = Vec::new();
    for round in 1..=4u64 {
        let dir = work.path().join(format!("adapter-{round}"));
        net.adapter(round).unwrap().write_dir(&dir).unwrap();
        inputs.push(node.contribute(dir, 10).await.unwrap());
        let v = view.clone();
        let hash = wait_until(&format!("round {round}"), Duration::from_secs(60), || {
            let latest = v.borrow().latest.clone();
            async move { latest.filter(|r| r.number == round).map(|r| r.hash) }
        })
        .await
        .unwrap();
        rounds.push(hash);
    }
    node.shutdown().await;

    let store = Store::open(&data).unwrap();
    for (i, hash) in inputs.iter().enumerate() {
        let kept = store.has_blob(hash).unwrap();
        assert_eq!(kept, i >= 2, "round {}'s input kept: {kept}", i + 1);
    }
    for (i, hex) in rounds.iter().enumerate() {
        let hash: hivemind_protocol::Hash = hex.parse().unwrap();
        assert!(
            store.has_blob(&hash).unwrap(),
            "round adapter {} is gone",
            i + 1
        );
    }
    assert!(store.list_announcements(1).unwrap().is_empty());
    assert_eq!(store.list_announcements(4).unwrap().len(), 1);
}

//! A round whose aggregation fails (here: the store cannot write, as on a full disk) is
//! retried until the store works again, and then commits. Before, the failure was only
//! logged: the round machine waited for that job's result for good, and the node never
//! committed the round, not even after space came back (issue 13, point 7).
//!
//! The failure is real, not mocked: the store's blob directory is replaced by a plain file
//! (writes then fail even for root, who ignores permissions) and put back later.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use hivemind_node::harness::{wait_until, TinyNetwork};
use hivemind_node::node::{round_config, Node};
use hivemind_store::BLOBS_DIR;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_aggregation_is_retried_until_the_store_works_again() {
    let work = tempfile::tempdir().unwrap();
    let net = TinyNetwork::write(work.path()).unwrap();
    let data = work.path().join("node");
    let mut cfg = net.node_config(&data, 2.0);
    cfg.round = round_config(2.0, Some(0.5));
    let node = Node::start(cfg).await.unwrap();
    let dir = work.path().join("adapter");
    net.adapter(1).unwrap().write_dir(&dir).unwrap();
    node.contribute(dir, 10).await.unwrap();

    // Break the store's blob directory before the window closes, keep it broken past the
    // aggregation's first attempts, then put it back.
    let blobs = data.join(BLOBS_DIR);
    let aside = data.join("blobs-aside");
    std::fs::rename(&blobs, &aside).unwrap();
    std::fs::write(&blobs, b"not a directory").unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let view = node.view();
    assert!(
        view.borrow().latest.is_none(),
        "committed while the store could not write"
    );
    std::fs::remove_file(&blobs).unwrap();
    std::fs::rename(&aside, &blobs).unwrap();

    let committed = wait_until(
        "round 1 after the store came back",
        Duration::from_secs(60),
        || {
            let latest = view.borrow().latest.clone();
            async move { latest.filter(|r| r.number == 1) }
        },
    )
    .await;
    node.shutdown().await;
    committed.unwrap();
}

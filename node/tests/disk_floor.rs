//! A node keeps a floor of free space on its data dir's disk: while taking in a peer's
//! adapter would go below it, the node does not fetch it (and does not hold the peer to
//! blame), and once it has room again (here: restarted with a floor the disk allows) it
//! catches up. Before, there was no floor: peers' adapters and uploads filled the disk
//! until the node's own writes failed (issue 13: "a disk-space floor").
//!
//! The floor is real (`statvfs` on the temp dir's file system); only its size is chosen to be
//! out of reach (2^60 bytes), since filling a real disk in a test is no option.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use hivemind_node::harness::{node_dirs, wait_until, Cluster, TinyNetwork};
use hivemind_node::node::Node;
use hivemind_store::Store;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_below_its_disk_floor_takes_in_nothing_and_catches_up_later() {
    let work = tempfile::tempdir().unwrap();
    let net = TinyNetwork::write(work.path()).unwrap();
    let dirs = node_dirs(work.path(), 2);
    let cluster = Cluster::start(2, |i| {
        let mut cfg = net.node_config(&dirs[i], 2.0);
        if i == 1 {
            cfg.min_free_bytes = 1 << 60;
        }
        cfg
    })
    .await
    .unwrap();
    cluster
        .wait_connected(1, Duration::from_secs(30))
        .await
        .unwrap();
    let dir = work.path().join("adapter");
    net.adapter(3).unwrap().write_dir(&dir).unwrap();
    let input = cluster.node(0).contribute(dir, 10).await.unwrap();
    let view = cluster.node(0).view();
    let round = wait_until("node 0 commits round 1", Duration::from_secs(60), || {
        let latest = view.borrow().latest.clone();
        async move { latest.filter(|r| r.number == 1) }
    })
    .await
    .unwrap();
    // Time for node 1 to fetch it, were it going to.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let penalties = cluster.node(1).client().info().await.unwrap().penalties;
    let behind = cluster.node(1).view().borrow().latest.clone();
    let addrs = cluster.node(0).listen_addrs().to_vec();
    let [first, second]: [Node; 2] = cluster.into_nodes().try_into().unwrap();
    second.shutdown().await;
    let held = Store::open(&dirs[1]).unwrap().has_blob(&input).unwrap();
    assert!(!held, "the node below its floor fetched the adapter");
    assert!(
        behind.is_none(),
        "it committed {behind:?} without the input"
    );
    assert!(
        penalties.is_empty(),
        "a full disk is nobody's fault: {penalties:?}"
    );

    // With room again, it catches up on the round it missed.
    let mut cfg = net.node_config(&dirs[1], 2.0);
    cfg.bootstrap = addrs;
    let again = Node::start(cfg).await.unwrap();
    let v = again.view();
    let caught = wait_until("node 1 catches up", Duration::from_secs(60), || {
        let latest = v.borrow().latest.clone();
        async move { latest.filter(|r| r.number >= 1) }
    })
    .await;
    again.shutdown().await;
    first.shutdown().await;
    assert_eq!(caught.unwrap().hash, round.hash);
}

//! A closed network (`join --allow-peer`): a member connects with no one outside the list and
//! ignores what outsiders sign, even when another member relays it. Before, there was no
//! allow-list: any key that reached a node could contribute to its rounds (issue 13: "an
//! optional allow-list of peers for closed networks").
//!
//! Node A allows only B. B is open (a member that forgot its list), and the outsider C joins
//! through B. All three contribute: C's announcement reaches A only through B's gossip.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use hivemind_node::harness::{node_dirs, wait_round, Cluster, TinyNetwork};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_network_refuses_outsiders_even_when_a_member_relays_them() {
    let work = tempfile::tempdir().unwrap();
    let net = TinyNetwork::write(work.path()).unwrap();
    let dirs = node_dirs(work.path(), 3);
    // B's key exists before A starts, so A can name it.
    std::fs::create_dir_all(&dirs[1]).unwrap();
    let b_peer = hivemind_node::DataDir::new(&dirs[1]).peer_id().unwrap();
    let a = Cluster::start(1, |_| {
        let mut cfg = net.node_config(&dirs[0], 3.0);
        cfg.allow_peers = Some(BTreeSet::from([b_peer]));
        cfg
    })
    .await
    .unwrap();
    let b = Cluster::start(1, |_| {
        let mut cfg = net.node_config(&dirs[1], 3.0);
        cfg.bootstrap = a.node(0).listen_addrs().to_vec();
        cfg
    })
    .await
    .unwrap();
    let c = Cluster::start(1, |_| {
        let mut cfg = net.node_config(&dirs[2], 3.0);
        cfg.bootstrap = b.node(0).listen_addrs().to_vec();
        cfg
    })
    .await
    .unwrap();
    let (na, nb, nc) = (a.node(0), b.node(0), c.node(0));
    assert_eq!(nb.peer_id(), b_peer);
    b.wait_connected(2, Duration::from_secs(30)).await.unwrap();

    let inputs = net
        .contribute_each(work.path(), &[na, nb, nc], 1)
        .await
        .unwrap();
    let round = wait_round(na, 1, Duration::from_secs(60)).await;
    // Give C time to find A through B (identify, Kademlia) and try to connect.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let a_info = na.client().info().await.unwrap();
    let c_peer = nc.peer_id();
    let b_round = nb.view().borrow().latest.clone();
    a.shutdown().await;
    b.shutdown().await;
    c.shutdown().await;
    let round = round.unwrap();

    assert!(
        !round.contributors.contains(&inputs[2]),
        "A's round 1 took the outsider's adapter: {round:?}"
    );
    assert!(round.contributors.contains(&inputs[0]), "{round:?}");
    assert!(
        !a_info.connected.contains(&c_peer),
        "A is connected to the outsider: {:?}",
        a_info.connected
    );
    // The open member took C's adapter: the check above is not vacuous.
    let b_round = b_round.expect("B committed nothing");
    assert!(
        b_round.contributors.contains(&inputs[2]),
        "the outsider's adapter never reached the open member: {b_round:?}"
    );
}

//! Connection limits of a node's libp2p swarm, between in-process nodes on loopback: a node
//! that accepts 2 incoming connections keeps the first two peers and refuses the third, while
//! its own outgoing dials (to a new peer) still work. Before, a node had no connection
//! limits at all (issue 13).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use hivemind_node::net::with_peer;
use hivemind_store::Store;
use tokio_util::sync::CancellationToken;

mod blob_net;
use blob_net::{connect, node, node_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_incoming_connections_past_its_limit() {
    let cancel = CancellationToken::new();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let server = node_with(1, store.clone(), &cancel, "/ip4/127.0.0.1/tcp/0", |c| {
        c.max_incoming = 2;
    })
    .await;
    let clients = [
        node(2, store.clone(), &cancel).await,
        node(3, store.clone(), &cancel).await,
        node(4, store.clone(), &cancel).await,
    ];
    connect(&clients[0], &server).await;
    connect(&clients[1], &server).await;

    let addr = with_peer(
        &server.client.info().await.unwrap().listen_addrs[0],
        server.client.local_peer_id(),
    );
    let third = clients[2].client.dial(addr).await;
    // The dial may be refused at once or the connection closed right after it is made;
    // either way the third peer never stays connected.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let connected = server.client.info().await.unwrap().connected;
    assert!(
        !connected.contains(&clients[2].client.local_peer_id()),
        "a third incoming connection was kept (dial: {third:?})"
    );
    assert_eq!(connected.len(), 2, "{connected:?}");
    // The limit is on incoming connections: the server still dials out.
    let fresh = node(5, store.clone(), &cancel).await;
    connect(&server, &fresh).await;
    cancel.cancel();
}

/// Keys cost nothing in an open network: a node that penalises thousands of fresh peer ids
/// (each misbehaving once) keeps a bounded record of them. Before, every penalised id stayed
/// in the penalty and ban maps until the process ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn penalties_of_fresh_keys_stay_bounded() {
    let cancel = CancellationToken::new();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let n = node(1, store, &cancel).await;
    let (repeat, once) = (libp2p::PeerId::random(), libp2p::PeerId::random());
    n.client.penalise(repeat, "test".into()).await;
    n.client.penalise(repeat, "test".into()).await;
    n.client.penalise(once, "test".into()).await;
    for _ in 0..4200 {
        n.client
            .penalise(libp2p::PeerId::random(), "test".into())
            .await;
    }
    let penalties = n.client.info().await.unwrap().penalties;
    assert_eq!(penalties.len(), 4096, "penalty records are not bounded");
    // Fresh keys pushed out the oldest peer penalised once (let in again), not the peer
    // penalised twice.
    assert!(!penalties.contains_key(&once));
    assert_eq!(penalties.get(&repeat), Some(&2));
    cancel.cancel();
}

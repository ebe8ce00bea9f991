//! In-process libp2p nodes on loopback for the blob protocol tests (each a `Network` with
//! its own key, listening on 127.0.0.1), and helpers they share.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use hivemind_node::identity::keypair_of;
use hivemind_node::net::blob::SharedSource;
use hivemind_node::net::{with_peer, NetConfig, Network};
use hivemind_protocol::NodeKey;
use hivemind_store::Store;
use tokio_util::sync::CancellationToken;

/// Blob streams the servers of these tests answer at once.
pub(crate) const SERVE_LIMIT: usize = 4;

pub(crate) async fn node(seed: u8, source: SharedSource, cancel: &CancellationToken) -> Network {
    node_on(seed, source, cancel, "/ip4/127.0.0.1/tcp/0").await
}

pub(crate) async fn node_on(
    seed: u8,
    source: SharedSource,
    cancel: &CancellationToken,
    listen: &str,
) -> Network {
    node_with(seed, source, cancel, listen, |_| {}).await
}

/// A node on `listen` whose config `tune` changes first.
pub(crate) async fn node_with(
    seed: u8,
    source: SharedSource,
    cancel: &CancellationToken,
    listen: &str,
    tune: impl FnOnce(&mut NetConfig),
) -> Network {
    let key = NodeKey::from_bytes(&[seed; 32]);
    let mut cfg = NetConfig {
        listen: vec![listen.parse().unwrap()],
        bootstrap: vec![],
        topics: vec!["/hivemind/test/announce/1".into()],
        mdns: false,
        heartbeat: Duration::from_millis(200),
        serve_limit: SERVE_LIMIT,
        max_incoming: hivemind_node::net::DEFAULT_MAX_INCOMING,
        min_serve_rate: hivemind_node::net::blob::DEFAULT_MIN_SERVE_RATE,
        allow: None,
        relay: false,
    };
    tune(&mut cfg);
    Network::spawn(keypair_of(&key).unwrap(), cfg, source, cancel.clone())
        .await
        .unwrap()
}

/// Polls `f` until it holds, for at most 20 s (the harness's wait).
pub(crate) async fn wait_until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let limit = Duration::from_secs(20);
    let r = hivemind_node::harness::wait_until(what, limit, || {
        let fut = f();
        async move { fut.await.then_some(()) }
    })
    .await;
    r.unwrap()
}

/// Dials `to` from `from` (its first listen address) and waits until they are connected.
pub(crate) async fn connect(from: &Network, to: &Network) {
    let info = to.client.info().await.unwrap();
    let to_id = to.client.local_peer_id();
    let from_id = from.client.local_peer_id();
    let addr = with_peer(&info.listen_addrs[0], to_id);
    // Dialled again every 2 s, as a node redials: a dial can be refused while another
    // incoming connection of `to` is pending (its pending limit is a quarter of its
    // incoming limit: 1 in the connection-limit test), and one refused dial is not retried
    // by libp2p. Done when both ends list the connection, so the next dial to `to` does not
    // race this one's last steps there.
    let (c, t) = (from.client.clone(), to.client.clone());
    let last_dial = std::sync::Mutex::new(None::<std::time::Instant>);
    wait_until("a connection", || {
        let (c, t, addr) = (c.clone(), t.clone(), addr.clone());
        let due = {
            let mut last = last_dial.lock().unwrap();
            let due = last.is_none_or(|t| t.elapsed() >= Duration::from_secs(2));
            if due {
                *last = Some(std::time::Instant::now());
            }
            due
        };
        async move {
            if due {
                let _ = c.dial(addr).await;
            }
            c.info().await.unwrap().connected.contains(&to_id)
                && t.info().await.unwrap().connected.contains(&from_id)
        }
    })
    .await;
}

/// Two connected nodes: a server with `source` and a fetcher with its own store.
pub(crate) async fn pair(
    seed: u8,
    source: SharedSource,
    cancel: &CancellationToken,
) -> (Network, Network, Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let fetcher_store = Store::open(dir.path()).unwrap();
    let server = node(seed, source, cancel).await;
    let fetcher = node(seed + 1, Arc::new(fetcher_store.clone()), cancel).await;
    connect(&fetcher, &server).await;
    (server, fetcher, fetcher_store, dir)
}

/// `len` bytes of a pattern that differs with `seed`.
pub(crate) fn pattern(len: usize, seed: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 11) as u8)
        .collect()
}

//! Blob transfer between in-process libp2p nodes on loopback: a multi-chunk blob arrives
//! verified, and a peer serving bytes that do not match the hash is penalised while the
//! fetch falls back to an honest peer.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use hivemind_node::blob_protocol::{
    fetch_blob, BlobRequest, BlobResponse, BlobSource, SharedSource, MAX_CHUNK_BYTES,
};
use hivemind_node::identity::keypair_of;
use hivemind_node::network::{with_peer, NetConfig, Network};
use hivemind_protocol::{Hash, NodeKey};
use hivemind_store::Store;
use tokio_util::sync::CancellationToken;

/// Serves the store's bytes with one bit flipped in every chunk.
struct Corrupt(Store);

impl BlobSource for Corrupt {
    fn serve(&self, req: &BlobRequest) -> BlobResponse {
        match self.0.serve(req) {
            BlobResponse::Chunk {
                total_len,
                mut data,
            } => {
                if let Some(b) = data.first_mut() {
                    *b ^= 1;
                }
                BlobResponse::Chunk { total_len, data }
            }
            r => r,
        }
    }
}

async fn node(seed: u8, source: SharedSource, cancel: &CancellationToken) -> Network {
    node_on(seed, source, cancel, "/ip4/127.0.0.1/tcp/0").await
}

async fn node_on(
    seed: u8,
    source: SharedSource,
    cancel: &CancellationToken,
    listen: &str,
) -> Network {
    let key = NodeKey::from_bytes(&[seed; 32]);
    Network::spawn(
        keypair_of(&key).unwrap(),
        NetConfig {
            listen: vec![listen.parse().unwrap()],
            bootstrap: vec![],
            topics: vec!["/hivemind/test/announce/1".into()],
            mdns: false,
            heartbeat: Duration::from_millis(200),
        },
        source,
        cancel.clone(),
    )
    .await
    .unwrap()
}

async fn wait_until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_transfer_verifies_and_penalises_liars() {
    let cancel = CancellationToken::new();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let honest_store = Store::open(dirs[0].path()).unwrap();
    let liar_store = Store::open(dirs[1].path()).unwrap();
    let fetcher_store = Store::open(dirs[2].path()).unwrap();
    // 2.5 chunks, so the transfer is pipelined over several requests.
    let bytes: Vec<u8> = (0..(MAX_CHUNK_BYTES as usize * 5 / 2))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let hash = honest_store.put_blob(&bytes).unwrap();
    assert_eq!(liar_store.put_blob(&bytes).unwrap(), hash);

    let honest = node(1, Arc::new(honest_store), &cancel).await;
    let liar = node(2, Arc::new(Corrupt(liar_store)), &cancel).await;
    let fetcher = node(3, Arc::new(fetcher_store.clone()), &cancel).await;
    for n in [&honest, &liar] {
        let info = n.client.info().await.unwrap();
        let addr = with_peer(&info.listen_addrs[0], n.client.local_peer_id());
        fetcher.client.dial(addr).await.unwrap();
    }
    let c = fetcher.client.clone();
    wait_until("connections", || {
        let c = c.clone();
        async move { c.info().await.unwrap().connected.len() == 2 }
    })
    .await;

    let liar_id = liar.client.local_peer_id();
    let honest_id = honest.client.local_peer_id();
    // The liar is asked first; its bytes fail verification, then the honest peer delivers.
    let got = fetch_blob(&fetcher.client, &fetcher_store, hash, &[liar_id, honest_id]).await;
    assert_eq!(got, Some(honest_id));
    assert_eq!(fetcher_store.get_blob(&hash).unwrap().unwrap(), bytes);
    let info = fetcher.client.info().await.unwrap();
    assert_eq!(info.penalties.get(&liar_id), Some(&1));
    assert!(!info.penalties.contains_key(&honest_id));

    // An unknown blob: every peer answers not-found, nothing is stored.
    let missing = Hash::of(b"nobody has this");
    assert_eq!(
        fetch_blob(&fetcher.client, &fetcher_store, missing, &[honest_id]).await,
        None
    );
    assert!(!fetcher_store.has_blob(&missing).unwrap());
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_transfer_works_over_quic() {
    let cancel = CancellationToken::new();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let server_store = Store::open(dirs[0].path()).unwrap();
    let fetcher_store = Store::open(dirs[1].path()).unwrap();
    let bytes: Vec<u8> = (0..(MAX_CHUNK_BYTES as usize + 12345))
        .map(|i| (i.wrapping_mul(40503) >> 7) as u8)
        .collect();
    let hash = server_store.put_blob(&bytes).unwrap();
    let quic = "/ip4/127.0.0.1/udp/0/quic-v1";
    let server = node_on(4, Arc::new(server_store), &cancel, quic).await;
    let fetcher = node_on(5, Arc::new(fetcher_store.clone()), &cancel, quic).await;
    let info = server.client.info().await.unwrap();
    let addr = with_peer(&info.listen_addrs[0], server.client.local_peer_id());
    assert!(addr.to_string().contains("/quic-v1/"), "{addr}");
    fetcher.client.dial(addr).await.unwrap();
    let c = fetcher.client.clone();
    wait_until("a QUIC connection", || {
        let c = c.clone();
        async move { c.info().await.unwrap().connected.len() == 1 }
    })
    .await;
    let server_id = server.client.local_peer_id();
    let got = fetch_blob(&fetcher.client, &fetcher_store, hash, &[server_id]).await;
    assert_eq!(got, Some(server_id));
    assert_eq!(fetcher_store.get_blob(&hash).unwrap().unwrap(), bytes);
    cancel.cancel();
}

//! Blob transfer between in-process libp2p nodes on loopback: a multi-frame blob arrives
//! verified, a peer serving bytes that do not match the hash is penalised while the fetch
//! falls back to an honest peer, a peer that stops mid-blob is not, byte ranges are
//! served exactly, a server at its stream limit answers "busy" (and fetches wait rather
//! than fail), and a 300 MiB adapter moves with a few MiB of memory.
#![allow(clippy::unwrap_used)]

use std::io::{self, Read};
use std::sync::Arc;
use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt};
use hivemind_node::blob_protocol::{
    fetch_blob, request_blob, BlobHeader, BlobRequest, BlobSource, OpenBlob, SharedSource,
    FRAME_BYTES,
};
use hivemind_node::identity::keypair_of;
use hivemind_node::network::{with_peer, NetConfig, Network};
use hivemind_protocol::{Hash, NodeKey};
use hivemind_store::Store;
use tokio_util::sync::CancellationToken;

/// Serves the store's bytes with one bit flipped in the last byte.
struct Corrupt(Store);

/// Flips the lowest bit of byte `at` of what `inner` reads.
struct FlipAt<R> {
    inner: R,
    pos: u64,
    at: u64,
}

impl<R: Read> Read for FlipAt<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if (self.pos..self.pos + n as u64).contains(&self.at) {
            buf[(self.at - self.pos) as usize] ^= 1;
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl BlobSource for Corrupt {
    fn open(&self, hash: &Hash, offset: u64) -> io::Result<Option<OpenBlob>> {
        Ok(self.0.open(hash, offset)?.map(|b| OpenBlob {
            total_len: b.total_len,
            reader: Box::new(FlipAt {
                inner: b.reader,
                pos: offset,
                at: b.total_len - 1,
            }),
        }))
    }
}

/// Blob streams the servers of these tests answer at once.
const SERVE_LIMIT: usize = 4;

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
            serve_limit: SERVE_LIMIT,
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
    // 10.5 frames: more than the frames a transfer has in flight, so they are reused.
    let bytes: Vec<u8> = (0..(FRAME_BYTES * 21 / 2))
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
    let bytes: Vec<u8> = (0..(FRAME_BYTES * 5 + 12345))
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

/// Serves the store's bytes but stops after half of them, as a peer that crashes mid-way.
struct Truncated(Store);

impl BlobSource for Truncated {
    fn open(&self, hash: &Hash, offset: u64) -> io::Result<Option<OpenBlob>> {
        Ok(self.0.open(hash, offset)?.map(|b| OpenBlob {
            total_len: b.total_len,
            reader: Box::new(b.reader.take(b.total_len / 2)),
        }))
    }
}

/// Two connected nodes: a server with `source` and a fetcher with its own store.
async fn pair(
    seed: u8,
    source: SharedSource,
    cancel: &CancellationToken,
) -> (Network, Network, Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let fetcher_store = Store::open(dir.path()).unwrap();
    let server = node(seed, source, cancel).await;
    let fetcher = node(seed + 1, Arc::new(fetcher_store.clone()), cancel).await;
    let info = server.client.info().await.unwrap();
    let addr = with_peer(&info.listen_addrs[0], server.client.local_peer_id());
    fetcher.client.dial(addr).await.unwrap();
    let c = fetcher.client.clone();
    wait_until("a connection", || {
        let c = c.clone();
        async move { c.info().await.unwrap().connected.len() == 1 }
    })
    .await;
    (server, fetcher, fetcher_store, dir)
}

fn pattern(len: usize, seed: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 11) as u8)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_mid_blob_is_not_penalised_and_nothing_is_stored() {
    let cancel = CancellationToken::new();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let bytes = pattern(FRAME_BYTES * 6, 1);
    let hash = store.put_blob(&bytes).unwrap();
    let (server, fetcher, fetcher_store, _d) = pair(20, Arc::new(Truncated(store)), &cancel).await;
    let server_id = server.client.local_peer_id();
    let got = fetch_blob(&fetcher.client, &fetcher_store, hash, &[server_id]).await;
    assert_eq!(got, None);
    assert!(!fetcher_store.has_blob(&hash).unwrap());
    let info = fetcher.client.info().await.unwrap();
    assert!(info.penalties.is_empty(), "{:?}", info.penalties);
    assert_eq!(
        info.connected,
        vec![server_id],
        "an unlucky peer stays connected"
    );
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_answers_byte_ranges_and_refuses_streams_beyond_its_limit() {
    let cancel = CancellationToken::new();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let bytes = pattern(FRAME_BYTES * 2 + 777, 2);
    let hash = store.put_blob(&bytes).unwrap();
    let (server, fetcher, fetcher_store, _d) = pair(30, Arc::new(store), &cancel).await;
    let server_id = server.client.local_peer_id();

    // A range that straddles frames, and one that runs past the end (clamped).
    for (offset, len) in [
        (1000u64, FRAME_BYTES as u64 + 5),
        (bytes.len() as u64 - 10, 100),
    ] {
        let req = BlobRequest { hash, offset, len };
        let (mut s, header) = request_blob(&fetcher.client, server_id, req).await.unwrap();
        let total_len = bytes.len() as u64;
        assert_eq!(header, BlobHeader::Found { total_len });
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        let end = (offset + len).min(total_len) as usize;
        assert_eq!(got, bytes[offset as usize..end]);
    }

    // Every serving slot taken by a stream that never finishes its request: the next one
    // is answered "busy" ...
    let mut idle = Vec::new();
    while idle.len() < SERVE_LIMIT {
        let mut s = fetcher.client.open_blob_stream(server_id).await.unwrap();
        s.write_all(&[0u8]).await.unwrap();
        s.flush().await.unwrap();
        // A served stream stays silent; one the server dropped (it arrived while another
        // waited for the accept loop) is reset: open another.
        let mut b = [0u8; 1];
        if tokio::time::timeout(Duration::from_millis(300), s.read(&mut b))
            .await
            .is_err()
        {
            idle.push(s);
        }
    }
    let req = BlobRequest {
        hash,
        offset: 0,
        len: 1,
    };
    let (_s, header) = request_blob(&fetcher.client, server_id, req).await.unwrap();
    assert_eq!(header, BlobHeader::Busy);
    // A fetch meanwhile waits (busy is not a failure, and no penalty) ...
    let (c, st) = (fetcher.client.clone(), fetcher_store.clone());
    let fetch = tokio::spawn(async move { fetch_blob(&c, &st, hash, &[server_id]).await });
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!fetch.is_finished(), "a fetch from a busy server gave up");
    assert!(!fetcher_store.has_blob(&hash).unwrap());
    assert!(fetcher.client.info().await.unwrap().penalties.is_empty());
    // ... and once the idle streams go away, the blob arrives.
    drop(idle);
    let got = tokio::time::timeout(Duration::from_secs(20), fetch)
        .await
        .expect("the fetch ends once a slot is free")
        .unwrap();
    assert_eq!(got, Some(server_id));
    assert!(fetcher.client.info().await.unwrap().penalties.is_empty());
    assert_eq!(fetcher_store.get_blob(&hash).unwrap().unwrap(), bytes);
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_fetches_from_one_server_all_arrive() {
    let cancel = CancellationToken::new();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let bytes = pattern(FRAME_BYTES * 3 + 5, 3);
    let hash = store.put_blob(&bytes).unwrap();
    let server = node(40, Arc::new(store), &cancel).await;
    let server_id = server.client.local_peer_id();
    let info = server.client.info().await.unwrap();
    let addr = with_peer(&info.listen_addrs[0], server_id);
    let mut fetchers = Vec::new();
    for seed in 41..47 {
        let dir = tempfile::tempdir().unwrap();
        let st = Store::open(dir.path()).unwrap();
        let n = node(seed, Arc::new(st.clone()), &cancel).await;
        n.client.dial(addr.clone()).await.unwrap();
        fetchers.push((n, st, dir));
    }
    wait_until("connections", || {
        let c = server.client.clone();
        async move { c.info().await.unwrap().connected.len() == 6 }
    })
    .await;
    // Six requests at once against a server that answers four at a time and lets one
    // stream wait for its accept loop: retries and "busy" answers are absorbed, every
    // fetcher ends with the blob.
    let from = [server_id];
    let results = futures::future::join_all(
        fetchers
            .iter()
            .map(|(n, st, _)| fetch_blob(&n.client, st, hash, &from)),
    )
    .await;
    for ((_, st, _), got) in fetchers.iter().zip(results) {
        assert_eq!(got, Some(server_id));
        assert_eq!(st.get_blob(&hash).unwrap().unwrap(), bytes);
    }
    cancel.cancel();
}

/// Peak resident memory of this process (Linux), in bytes.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adapter_of_hundreds_of_mb_moves_in_bounded_memory() {
    const LEN: usize = (300 << 20) + 12_345;
    let cancel = CancellationToken::new();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    // Written to a file 1 MiB at a time, so this process never holds the blob.
    let src = dir.path().join("big.safetensors");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&src).unwrap());
        let mut block = pattern(1 << 20, 4);
        let mut left = LEN;
        while left > 0 {
            let n = left.min(block.len());
            std::io::Write::write_all(&mut f, &block[..n]).unwrap();
            left -= n;
            block.rotate_left(7);
        }
        std::io::Write::flush(&mut f).unwrap();
    }
    let hash = store.put_blob_file(&src).unwrap();
    std::fs::remove_file(&src).unwrap();
    let (server, fetcher, fetcher_store, _d) = pair(50, Arc::new(store), &cancel).await;
    let server_id = server.client.local_peer_id();

    let before = peak_rss();
    let got = fetch_blob(&fetcher.client, &fetcher_store, hash, &[server_id]).await;
    let after = peak_rss();
    assert_eq!(got, Some(server_id));
    assert_eq!(fetcher_store.blob_len(&hash).unwrap(), Some(LEN as u64));
    assert!(fetcher_store.verify_blob(&hash).unwrap());
    // Both ends of the transfer live in this process; together they hold a few frames.
    if let (Some(before), Some(after)) = (before, after) {
        let grew = after.saturating_sub(before);
        assert!(
            grew < 64 << 20,
            "peak RSS grew by {} MiB while moving {} MiB",
            grew >> 20,
            LEN >> 20
        );
    }
    cancel.cancel();
}

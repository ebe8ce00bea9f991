//! Blob transfer between in-process libp2p nodes on loopback: a multi-frame blob arrives
//! verified, a peer serving bytes that do not match the hash is penalised while the fetch
//! falls back to an honest peer, a peer that stops mid-blob is not, byte ranges are
//! served exactly, a server at its stream limit answers "busy" (and fetches wait rather
//! than fail), and a peer claiming an oversized blob is skipped unread. (The 300 MiB
//! transfer is in `blob_large.rs`, alone in its process so its memory can be measured.)
#![allow(clippy::unwrap_used)]

use std::io::{self, Read};
use std::sync::Arc;
use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt};
use hivemind_node::net::blob::{
    fetch_blob, request_blob, BlobHeader, BlobRequest, BlobSource, OpenBlob, FRAME_BYTES,
    MAX_BLOB_BYTES,
};
use hivemind_protocol::Hash;
use hivemind_store::Store;
use tokio_util::sync::CancellationToken;

mod blob_net;
use blob_net::{connect, node, node_on, pair, pattern, SERVE_LIMIT};

/// Serves a store's blobs through `tamper` (given the opened blob and the requested
/// offset), to play a peer that misbehaves.
struct Tampered<F>(Store, F);

impl<F: Fn(OpenBlob, u64) -> OpenBlob + Send + Sync + 'static> BlobSource for Tampered<F> {
    fn open(&self, hash: &Hash, offset: u64) -> io::Result<Option<OpenBlob>> {
        Ok(self.0.open(hash, offset)?.map(|b| (self.1)(b, offset)))
    }
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_transfer_verifies_and_penalises_liars() {
    let cancel = CancellationToken::new();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let honest_store = Store::open(dirs[0].path()).unwrap();
    let liar_store = Store::open(dirs[1].path()).unwrap();
    let fetcher_store = Store::open(dirs[2].path()).unwrap();
    // 10.5 frames: more than the frames a transfer has in flight, so they are reused.
    let bytes = pattern(FRAME_BYTES * 21 / 2, 0);
    let hash = honest_store.put_blob(&bytes).unwrap();
    assert_eq!(liar_store.put_blob(&bytes).unwrap(), hash);

    let honest = node(1, Arc::new(honest_store), &cancel).await;
    // Its bytes with the last one's lowest bit flipped.
    let flip_last = |b: OpenBlob, offset: u64| OpenBlob {
        total_len: b.total_len,
        reader: Box::new(FlipAt {
            inner: b.reader,
            pos: offset,
            at: b.total_len - 1,
        }),
    };
    let liar = node(2, Arc::new(Tampered(liar_store, flip_last)), &cancel).await;
    let fetcher = node(3, Arc::new(fetcher_store.clone()), &cancel).await;
    connect(&fetcher, &honest).await;
    connect(&fetcher, &liar).await;

    let liar_id = liar.client.local_peer_id();
    let honest_id = honest.client.local_peer_id();
    // The liar is asked first; its bytes fail verification, then the honest peer delivers.
    let got = fetch_blob(
        &fetcher.client,
        &fetcher_store,
        hash,
        &[liar_id, honest_id],
        MAX_BLOB_BYTES,
    )
    .await;
    assert_eq!(got, Some(honest_id));
    assert_eq!(fetcher_store.get_blob(&hash).unwrap().unwrap(), bytes);
    let info = fetcher.client.info().await.unwrap();
    assert_eq!(info.penalties.get(&liar_id), Some(&1));
    assert!(!info.penalties.contains_key(&honest_id));

    // An unknown blob: every peer answers not-found, nothing is stored.
    let missing = Hash::of(b"nobody has this");
    assert_eq!(
        fetch_blob(
            &fetcher.client,
            &fetcher_store,
            missing,
            &[honest_id],
            MAX_BLOB_BYTES
        )
        .await,
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
    let bytes = pattern(FRAME_BYTES * 5 + 12345, 7);
    let hash = server_store.put_blob(&bytes).unwrap();
    let quic = "/ip4/127.0.0.1/udp/0/quic-v1";
    let server = node_on(4, Arc::new(server_store), &cancel, quic).await;
    let fetcher = node_on(5, Arc::new(fetcher_store.clone()), &cancel, quic).await;
    let addr = server.client.info().await.unwrap().listen_addrs[0].clone();
    assert!(addr.to_string().contains("/quic-v1"), "{addr}");
    connect(&fetcher, &server).await;
    let server_id = server.client.local_peer_id();
    let got = fetch_blob(
        &fetcher.client,
        &fetcher_store,
        hash,
        &[server_id],
        MAX_BLOB_BYTES,
    )
    .await;
    assert_eq!(got, Some(server_id));
    assert_eq!(fetcher_store.get_blob(&hash).unwrap().unwrap(), bytes);
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_mid_blob_is_not_penalised_and_nothing_is_stored() {
    let cancel = CancellationToken::new();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let bytes = pattern(FRAME_BYTES * 6, 1);
    let hash = store.put_blob(&bytes).unwrap();
    // It stops after half of the bytes, as a peer that crashes mid-way.
    let half = |b: OpenBlob, _| OpenBlob {
        total_len: b.total_len,
        reader: Box::new(b.reader.take(b.total_len / 2)),
    };
    let (server, fetcher, fetcher_store, _d) =
        pair(20, Arc::new(Tampered(store, half)), &cancel).await;
    let server_id = server.client.local_peer_id();
    let got = fetch_blob(
        &fetcher.client,
        &fetcher_store,
        hash,
        &[server_id],
        MAX_BLOB_BYTES,
    )
    .await;
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
    // Eight frames: far more than a stream's initial yamux window of 256 KiB.
    let bytes = pattern(FRAME_BYTES * 8 + 777, 2);
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

    // Streams that never send their request hold no serving slot: with twice as many open
    // as there are slots, a request is still answered.
    let mut idle = Vec::new();
    for _ in 0..2 * SERVE_LIMIT {
        let mut s = fetcher.client.open_blob_stream(server_id).await.unwrap();
        // (A stream the server dropped in a burst fails here; that is fine.)
        let _ = s.write_all(&[0u8]).await;
        let _ = s.flush().await;
        idle.push(s);
    }
    let total_len = bytes.len() as u64;
    let one_byte = BlobRequest {
        hash,
        offset: 0,
        len: 1,
    };
    let (mut s, header) = request_blob(&fetcher.client, server_id, one_byte)
        .await
        .unwrap();
    assert_eq!(header, BlobHeader::Found { total_len });
    let mut first = Vec::new();
    s.read_to_end(&mut first).await.unwrap();
    assert_eq!(first, bytes[..1]);

    // A reader that stops reading keeps its slot (the server waits for yamux credit).
    // That is this peer's whole share (one slot when the limit is 4), so its next request
    // is answered "busy" ...
    let everything = BlobRequest {
        hash,
        offset: 0,
        len: u64::MAX,
    };
    // (The one-byte answer's slot is freed just after its stream closes: ask until found.)
    let mut tries = 0;
    let slow = loop {
        let (s, header) = request_blob(&fetcher.client, server_id, everything)
            .await
            .unwrap();
        if matches!(header, BlobHeader::Found { total_len: t } if t == total_len) {
            break s;
        }
        tries += 1;
        assert!(tries < 50, "still {header:?} after {tries} tries");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (_s, header) = request_blob(&fetcher.client, server_id, one_byte)
        .await
        .unwrap();
    assert_eq!(header, BlobHeader::Busy);
    // ... while another peer is served at once ...
    let other_dir = tempfile::tempdir().unwrap();
    let other_store = Store::open(other_dir.path()).unwrap();
    let other = node(32, Arc::new(other_store.clone()), &cancel).await;
    connect(&other, &server).await;
    let got = fetch_blob(
        &other.client,
        &other_store,
        hash,
        &[server_id],
        MAX_BLOB_BYTES,
    )
    .await;
    assert_eq!(got, Some(server_id));
    assert_eq!(other_store.get_blob(&hash).unwrap().unwrap(), bytes);
    // ... and a fetch by the slow peer waits (busy is not a failure, and no penalty) ...
    let (c, st) = (fetcher.client.clone(), fetcher_store.clone());
    let fetch =
        tokio::spawn(async move { fetch_blob(&c, &st, hash, &[server_id], MAX_BLOB_BYTES).await });
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!fetch.is_finished(), "a fetch from a busy server gave up");
    assert!(!fetcher_store.has_blob(&hash).unwrap());
    assert!(fetcher.client.info().await.unwrap().penalties.is_empty());
    // ... until the slow stream goes away.
    drop(slow);
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
async fn a_peer_claiming_an_oversized_blob_is_skipped_before_anything_is_written() {
    let cancel = CancellationToken::new();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let bytes = pattern(FRAME_BYTES + 99, 5);
    let hash = store.put_blob(&bytes).unwrap();
    // It announces a total length ten times the real one.
    let inflate = |b: OpenBlob, _| OpenBlob {
        total_len: b.total_len * 10,
        reader: b.reader,
    };
    let (server, fetcher, fetcher_store, fetcher_dir) =
        pair(60, Arc::new(Tampered(store, inflate)), &cancel).await;
    let server_id = server.client.local_peer_id();
    let got = fetch_blob(
        &fetcher.client,
        &fetcher_store,
        hash,
        &[server_id],
        bytes.len() as u64,
    )
    .await;
    assert_eq!(got, None);
    assert!(!fetcher_store.has_blob(&hash).unwrap());
    assert!(fetcher.client.info().await.unwrap().penalties.is_empty());
    // No temp file was left behind either.
    let leftovers: Vec<_> = walk(fetcher_dir.path())
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(".tmp"))
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A peer that cannot be reached at all: the fetch ends (no hang) with nothing.
    let nobody = libp2p::PeerId::random();
    let got = tokio::time::timeout(
        Duration::from_secs(30),
        fetch_blob(
            &fetcher.client,
            &fetcher_store,
            hash,
            &[nobody],
            MAX_BLOB_BYTES,
        ),
    )
    .await
    .expect("a fetch from an unreachable peer ends");
    assert_eq!(got, None);
    cancel.cancel();
}

/// Every file below `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
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
    let mut fetchers = Vec::new();
    for seed in 41..47 {
        let dir = tempfile::tempdir().unwrap();
        let st = Store::open(dir.path()).unwrap();
        let n = node(seed, Arc::new(st.clone()), &cancel).await;
        connect(&n, &server).await;
        fetchers.push((n, st, dir));
    }
    // Six requests at once against a server that answers four at a time and lets one
    // stream wait for its accept loop: retries and "busy" answers are absorbed, every
    // fetcher ends with the blob.
    let from = [server_id];
    let results = futures::future::join_all(
        fetchers
            .iter()
            .map(|(n, st, _)| fetch_blob(&n.client, st, hash, &from, MAX_BLOB_BYTES)),
    )
    .await;
    for ((_, st, _), got) in fetchers.iter().zip(results) {
        assert_eq!(got, Some(server_id));
        assert_eq!(st.get_blob(&hash).unwrap().unwrap(), bytes);
    }
    cancel.cancel();
}

/// A reader far slower than the server's minimum rate (here 1 MiB/s, reading 64 KiB/s)
/// loses its stream once it has taken `REQUEST_TIMEOUT` plus the blob's length at that rate,
/// and the serving slot comes back. Before, each frame only had to be read within 30 s, so a
/// reader at ~9 KB/s held a slot for 40 minutes a blob.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_below_the_minimum_rate_is_cut_off() {
    use blob_net::node_with;
    use hivemind_node::net::blob::REQUEST_TIMEOUT;
    let cancel = CancellationToken::new();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let bytes = pattern(4 << 20, 9);
    let hash = store.put_blob(&bytes).unwrap();
    let server = node_with(40, Arc::new(store), &cancel, "/ip4/127.0.0.1/tcp/0", |c| {
        c.min_serve_rate = 1 << 20;
    })
    .await;
    let dir2 = tempfile::tempdir().unwrap();
    let reader = node(41, Arc::new(Store::open(dir2.path()).unwrap()), &cancel).await;
    connect(&reader, &server).await;
    let req = BlobRequest {
        hash,
        offset: 0,
        len: u64::MAX,
    };
    let (mut s, header) = request_blob(&reader.client, server.client.local_peer_id(), req)
        .await
        .unwrap();
    assert_eq!(
        header,
        BlobHeader::Found {
            total_len: bytes.len() as u64
        }
    );
    // At 64 KiB/s the 4 MiB blob would take 64 s; the server allows 10 s + 4 s.
    let start = std::time::Instant::now();
    let mut got = 0usize;
    let mut buf = vec![0u8; 16 << 10];
    let ended = loop {
        match s.read(&mut buf).await {
            Ok(0) => break "end of stream",
            Ok(n) => got += n,
            Err(_) => break "reset",
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        if start.elapsed() > Duration::from_secs(90) {
            break "still reading";
        }
    };
    eprintln!(
        "slow reader: {got} of {} bytes, {ended} after {:?}",
        bytes.len(),
        start.elapsed()
    );
    assert!(
        got < bytes.len(),
        "the slow reader got the whole blob ({ended})"
    );
    assert!(
        start.elapsed() < REQUEST_TIMEOUT + Duration::from_secs(40),
        "the stream lasted {:?}",
        start.elapsed()
    );
    cancel.cancel();
}

/// Sends what `inner` reads at about 16 KiB a second.
struct Trickle<R>(R);

impl<R: Read> Read for Trickle<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        std::thread::sleep(Duration::from_secs(1));
        let n = buf.len().min(16 << 10);
        self.0.read(&mut buf[..n])
    }
}

/// A peer serving `blobs` at a trickle (and not cutting itself off: its own minimum serving
/// rate is 1 B/s, and it serves up to 8 streams to one peer), an honest peer serving them at full speed, and a fetcher connected to both.
struct SlowAndHonest {
    slow: libp2p::PeerId,
    honest: libp2p::PeerId,
    fetcher: hivemind_node::net::Network,
    fetcher_store: Store,
    _nodes: Vec<hivemind_node::net::Network>,
    _dirs: Vec<tempfile::TempDir>,
}

async fn slow_and_honest(blobs: &[Vec<u8>], cancel: &CancellationToken) -> SlowAndHonest {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let slow_store = Store::open(dirs[0].path()).unwrap();
    let honest_store = Store::open(dirs[1].path()).unwrap();
    for b in blobs {
        slow_store.put_blob(b).unwrap();
        honest_store.put_blob(b).unwrap();
    }
    let trickle = |b: OpenBlob, _| OpenBlob {
        total_len: b.total_len,
        reader: Box::new(Trickle(b.reader)),
    };
    let slow = blob_net::node_with(
        50,
        Arc::new(Tampered(slow_store, trickle)),
        cancel,
        "/ip4/127.0.0.1/tcp/0",
        |c| {
            c.min_serve_rate = 1;
            c.serve_limit = 32;
        },
    )
    .await;
    let honest = node(51, Arc::new(honest_store), cancel).await;
    let fetcher_store = Store::open(dirs[2].path()).unwrap();
    let fetcher = node(52, Arc::new(fetcher_store.clone()), cancel).await;
    connect(&fetcher, &slow).await;
    connect(&fetcher, &honest).await;
    SlowAndHonest {
        slow: slow.client.local_peer_id(),
        honest: honest.client.local_peer_id(),
        fetcher,
        fetcher_store,
        _nodes: vec![slow, honest],
        _dirs: dirs,
    }
}

/// A peer that sends a blob far below the minimum fetch rate (16 KiB/s against 64 KiB/s) loses
/// the transfer once it has taken `REQUEST_TIMEOUT` plus the blob's length at the minimum rate,
/// and the next peer is asked. Before, each 256 KiB frame only had to arrive within 30 s, so
/// such a peer held one of the fetcher's slots for as long as it liked (here 32 s for 512 KiB;
/// 40 minutes for a 20 MB adapter at 9 KB/s), and honest inputs missed the round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_sending_below_the_minimum_rate_is_cut_off_and_the_next_one_asked() {
    use hivemind_node::net::blob::{MIN_FETCH_RATE, REQUEST_TIMEOUT};
    let cancel = CancellationToken::new();
    let bytes = pattern(512 << 10, 4);
    let hash = Hash::of(&bytes);
    let net = slow_and_honest(std::slice::from_ref(&bytes), &cancel).await;
    let start = std::time::Instant::now();
    let got = fetch_blob(
        &net.fetcher.client,
        &net.fetcher_store,
        hash,
        &[net.slow, net.honest],
        MAX_BLOB_BYTES,
    )
    .await;
    let took = start.elapsed();
    let allowed = REQUEST_TIMEOUT + Duration::from_secs(bytes.len() as u64 / MIN_FETCH_RATE);
    eprintln!("fetched from {got:?} after {took:?} (slow peer allowed {allowed:?})");
    assert_eq!(got, Some(net.honest), "the slow peer delivered");
    assert!(took < allowed + Duration::from_secs(8), "took {took:?}");
    assert_eq!(net.fetcher_store.get_blob(&hash).unwrap().unwrap(), bytes);
    let info = net.fetcher.client.info().await.unwrap();
    assert!(
        info.penalties.is_empty(),
        "a slow peer is not a liar: {:?}",
        info.penalties
    );
    cancel.cancel();
}

/// An announcement's named peers are asked side by side (`fetch_blob_side_by_side`): with the
/// slow peer named first, the honest one delivers while the slow transfer is still under way.
/// Asked one after another (before), the honest peer was asked only once the slow one had been
/// cut off, which takes `REQUEST_TIMEOUT` plus the blob's length at the minimum rate; the
/// round machine, which holds each namer to serve within its fetch timeout, could meanwhile
/// take the honest one for silent. (The bound below is that cut-off, not a speed: a fetch that
/// waits for the slow peer cannot meet it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_peers_are_asked_side_by_side() {
    use hivemind_node::net::blob::{fetch_blob_side_by_side, Fetched, Transfers, REQUEST_TIMEOUT};
    let cancel = CancellationToken::new();
    let bytes = pattern(512 << 10, 21);
    let hash = Hash::of(&bytes);
    let net = slow_and_honest(std::slice::from_ref(&bytes), &cancel).await;
    let start = std::time::Instant::now();
    let got = fetch_blob_side_by_side(
        &net.fetcher.client,
        &net.fetcher_store,
        hash,
        (vec![net.slow, net.honest], &[]),
        MAX_BLOB_BYTES,
        &Transfers::default(),
    )
    .await;
    let took = start.elapsed();
    eprintln!("fetched from {got:?} after {took:?}");
    assert_eq!(got, Fetched::From(net.honest));
    assert!(
        took < REQUEST_TIMEOUT,
        "took {took:?}: the honest peer was asked after the slow one"
    );
    assert_eq!(net.fetcher_store.get_blob(&hash).unwrap().unwrap(), bytes);
    cancel.cancel();
}

/// One peer holds at most `MAX_TRANSFERS_PER_PEER` (2) of a node's transfers at once: with two
/// trickling transfers from the slow peer under way, a third blob that both peers hold comes
/// from the honest peer at once instead of waiting out the slow one first, and one only the
/// slow peer holds is deferred at once. Before, every fetch slot could be held by the same
/// slow peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_holds_at_most_its_share_of_the_transfers() {
    use hivemind_node::net::blob::{
        fetch_blob_fair, fetch_blob_tracked, Fetched, Transfers, MAX_TRANSFERS_PER_PEER,
    };
    let cancel = CancellationToken::new();
    let blobs: Vec<Vec<u8>> = (0..3).map(|i| pattern(512 << 10, 10 + i)).collect();
    let net = Arc::new(slow_and_honest(&blobs, &cancel).await);
    let transfers = Transfers::default();
    let mut held = Vec::new();
    for b in &blobs[..MAX_TRANSFERS_PER_PEER] {
        let (net, transfers, hash) = (net.clone(), transfers.clone(), Hash::of(b));
        held.push(tokio::spawn(async move {
            let c = &net.fetcher.client;
            fetch_blob_tracked(
                c,
                &net.fetcher_store,
                hash,
                &[net.slow],
                MAX_BLOB_BYTES,
                &transfers,
            )
            .await
        }));
    }
    blob_net::wait_until("both slow transfers under way", || {
        let n = transfers.snapshot().len();
        async move { n == MAX_TRANSFERS_PER_PEER }
    })
    .await;
    let start = std::time::Instant::now();
    let third = Hash::of(&blobs[2]);
    let got = fetch_blob_tracked(
        &net.fetcher.client,
        &net.fetcher_store,
        third,
        &[net.slow, net.honest],
        MAX_BLOB_BYTES,
        &transfers,
    )
    .await;
    let took = start.elapsed();
    assert_eq!(got, Some(net.honest));
    assert!(
        took < Duration::from_secs(5),
        "the third fetch took {took:?}"
    );
    // A blob only the slow peer is asked for is deferred at once: the fetch waits for
    // nothing while holding a slot, and nobody is blamed.
    let start = std::time::Instant::now();
    let only_slow = fetch_blob_fair(
        &net.fetcher.client,
        &net.fetcher_store,
        Hash::of(b"another blob"),
        &[net.slow],
        MAX_BLOB_BYTES,
        &transfers,
    )
    .await;
    assert_eq!(only_slow, Fetched::Deferred);
    assert!(start.elapsed() < Duration::from_secs(1));
    cancel.cancel();
    for h in held {
        let _ = h.await;
    }
}

/// The record protocol: a node asks a peer for its committed record of a round by round
/// and result (to link another chain's history), and gets the signed digest the peer's
/// store kept with it; a wrong result or an unknown round gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_records_are_served_by_round_and_result() {
    use hivemind_protocol::{
        ModelId, NodeKey, RoundDigest, RoundInput, RoundRecord, RuleId, Signed, SignedDigest,
    };
    let cancel = CancellationToken::new();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let key = NodeKey::from_bytes(&[7; 32]);
    let record = RoundRecord {
        model: ModelId(Hash::of(b"records test")),
        round: 3,
        parent: Some(Hash::of(b"round 2")),
        inputs: vec![RoundInput {
            adapter: Hash::of(b"adapter"),
            announcement: Hash::of(b"announcement"),
        }],
        weight: 3,
        rule: RuleId::FEDAVG,
        result: Hash::of(b"round 3"),
    };
    let digest = Signed::sign(
        RoundDigest {
            record: record.clone(),
            signer: key.node_id(),
            committed: true,
            time_ms: 1,
        },
        &key,
    )
    .unwrap()
    .encode();
    store
        .commit_round(&hivemind_store::RoundRecord {
            number: 3,
            hash: record.result,
            version: "v3".into(),
            parent: record.parent,
            contributors: vec![Hash::of(b"adapter")],
            rule: "fedavg".into(),
            digest: digest.clone(),
            committed_at_ms: 1,
        })
        .unwrap();
    let (server, fetcher, _fetcher_store, _d) = pair(30, Arc::new(store), &cancel).await;
    let server_id = server.client.local_peer_id();
    let got = fetcher
        .client
        .fetch_record(server_id, 3, &record.result)
        .await
        .unwrap()
        .expect("the peer holds round 3");
    assert_eq!(got, digest);
    let decoded = SignedDigest::decode_for(&got, &record.model).unwrap();
    assert_eq!(decoded.payload().record, record);
    for (round, result) in [(3, Hash::of(b"another result")), (4, record.result)] {
        let none = fetcher.client.fetch_record(server_id, round, &result).await;
        assert_eq!(none.unwrap(), None, "round {round}");
    }
    cancel.cancel();
}

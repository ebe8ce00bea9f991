//! 2. Adapter transfer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use futures::{AsyncReadExt as _, AsyncWriteExt as _};
use hivemind_node::net::blob::{
    decode_header, encode_request, fetch_blob, BlobHeader, BlobRequest, BlobSource, OpenBlob,
    FRAME_BYTES,
};
use hivemind_node::net::Client;
use hivemind_protocol::{Hash, NodeKey};
use hivemind_store::Store;
use libp2p::PeerId;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::common::*;
use super::Args;

/// Serves one blob from memory: the wire without the serving side's disk reads.
pub(crate) struct MemSource {
    hash: Hash,
    bytes: Arc<Vec<u8>>,
}

/// Reads an `Arc<Vec<u8>>` from an offset.
pub(crate) struct ArcReader(Arc<Vec<u8>>, usize);

impl std::io::Read for ArcReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let rest = &self.0[self.1.min(self.0.len())..];
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.1 += n;
        Ok(n)
    }
}

impl MemSource {
    /// Serves `bytes`, whose blake3 is `hash`.
    pub(crate) fn new(hash: Hash, bytes: Arc<Vec<u8>>) -> Self {
        MemSource { hash, bytes }
    }

    /// The blob's length and a reader at `offset`, when `hash` names it and `offset` is in it.
    pub(crate) fn open_arc(&self, hash: &Hash, offset: u64) -> Option<(u64, ArcReader)> {
        let total_len = self.bytes.len() as u64;
        if *hash != self.hash || offset > total_len {
            return None;
        }
        Some((total_len, ArcReader(self.bytes.clone(), offset as usize)))
    }
}

impl BlobSource for MemSource {
    fn open(&self, hash: &Hash, offset: u64) -> std::io::Result<Option<OpenBlob>> {
        Ok(self.open_arc(hash, offset).map(|(total_len, r)| OpenBlob {
            total_len,
            reader: Box::new(r),
        }))
    }
}

pub(crate) async fn transfer(args: &Args) -> Result<serde_json::Value> {
    let len = args.blob_mib << 20;
    ensure!(
        len > 0 && args.reps > 0,
        "transfer needs a blob and >= 1 rep"
    );
    let mb = len as f64 / 1e6;
    eprintln!("transfer: {} MiB blob, {} reps", args.blob_mib, args.reps);
    let cancel = CancellationToken::new();
    let dir_a = tempfile::tempdir()?;
    let dir_b = tempfile::tempdir()?;
    let store_a = Store::open(dir_a.path())?;
    let store_b = Store::open(dir_b.path())?;
    let bytes = Arc::new(random_bytes(len, 0x5EED));
    let b2 = bytes.clone();
    let sa = store_a.clone();
    let hash = tokio::task::spawn_blocking(move || sa.put_blob(&b2)).await??;
    let topics = vec!["/hivemind/bench/transfer/1".to_string()];
    // A serves from its store, B fetches, C serves the same blob from memory.
    let a = spawn_net(
        &NodeKey::from_bytes(&[201; 32]),
        vec![],
        topics.clone(),
        Arc::new(store_a.clone()),
        &cancel,
    )
    .await?;
    let b = spawn_net(
        &NodeKey::from_bytes(&[202; 32]),
        vec![],
        topics.clone(),
        Arc::new(store_b.clone()),
        &cancel,
    )
    .await?;
    let c = spawn_net(
        &NodeKey::from_bytes(&[203; 32]),
        vec![],
        topics,
        Arc::new(MemSource {
            hash,
            bytes: bytes.clone(),
        }),
        &cancel,
    )
    .await?;
    b.client.dial(dial_addr(&a.client).await?).await?;
    b.client.dial(dial_addr(&c.client).await?).await?;
    wait_connected(std::slice::from_ref(&b.client), 2, Duration::from_secs(20)).await?;
    let peer_a = a.client.local_peer_id();
    let peer_c = c.client.local_peer_id();

    // Each rep, interleaved so load drifts hit all alike: the baseline (TCP into memory),
    // the blob stream into memory (the transport alone), a TCP copy into the same
    // BlobWriter (the store's work without libp2p), and fetch_blob (stream + store).
    let mut tcp = Series::default();
    let mut stream_mem = Series::default();
    let mut tcp_store = Series::default();
    let mut ours = Series::default();
    for rep in 0..args.reps {
        let (t, _, busy) = timed(tcp_copy(bytes.clone())).await;
        tcp.push(mb / t?.as_secs_f64(), busy);
        let (t, _, busy) = timed(wire_only(&b.client, peer_c, hash, len as u64)).await;
        stream_mem.push(mb / t?.as_secs_f64(), busy);
        let (t, _, busy) = timed(tcp_copy_into_store(bytes.clone(), &store_b, hash)).await;
        tcp_store.push(mb / t?.as_secs_f64(), busy);
        let sb = store_b.clone();
        tokio::task::spawn_blocking(move || sb.remove_blob(&hash)).await??;
        let (got, t, busy) =
            timed(fetch_blob(&b.client, &store_b, hash, &[peer_a], len as u64)).await;
        ensure!(got == Some(peer_a), "fetch_blob failed (rep {rep})");
        ensure!(
            store_b.has_blob(&hash)?,
            "the fetched blob is not in the store"
        );
        ours.push(mb / t.as_secs_f64(), busy);
        eprintln!(
            "transfer rep {rep}: fetch_blob {:.1} MB/s, tcp {:.1}, blob stream into memory {:.1}, tcp into the store {:.1}",
            ours.values[rep], tcp.values[rep], stream_mem.values[rep], tcp_store.values[rep]
        );
    }
    // The fetched bytes are the sent bytes (the writer checked the hash; check once more).
    let sb = store_b.clone();
    let fetched = tokio::task::spawn_blocking(move || sb.get_blob(&hash)).await??;
    ensure!(
        fetched.as_deref() == Some(&bytes[..]),
        "fetched bytes differ from the source"
    );
    drop(fetched);

    // Where the time goes. Each line: MB/s and the cores the process kept busy.
    let mut diag = serde_json::Map::new();
    let mut note = |name: &str, wall: Duration, busy: Option<f64>| {
        diag.insert(
            name.to_string(),
            json!({ "mb_s": r3(mb / wall.as_secs_f64()), "cores_busy": busy }),
        );
    };
    // The blob stream alone (streamed and dropped) from A's store.
    let (r, wall, busy) = timed(wire_only(&b.client, peer_a, hash, len as u64)).await;
    r?;
    note("blob_stream_from_store_into_memory", wall, busy);
    // fetch_blob from the memory source: everything but the serving side's disk reads.
    let sb = store_b.clone();
    tokio::task::spawn_blocking(move || sb.remove_blob(&hash)).await??;
    let (got, wall, busy) =
        timed(fetch_blob(&b.client, &store_b, hash, &[peer_c], len as u64)).await;
    ensure!(
        got == Some(peer_c),
        "fetch_blob from the memory source failed"
    );
    note("fetch_blob_memory_source", wall, busy);
    // The receiving store alone (BlobWriter: write_at per chunk, hash, fsync, rename).
    let sb = store_b.clone();
    let b3 = bytes.clone();
    let (r, _, busy) =
        timed(async { tokio::task::spawn_blocking(move || local_sink(&sb, &b3, hash)).await })
            .await;
    let (writes, finish) = r??;
    note("store_sink_only", writes + finish, busy);
    let sink_split = json!({
        "write_at_and_hash": r3(ms(writes)),
        "finish_fsync_rename": r3(ms(finish)),
    });
    // blake3 alone, one thread.
    let b4 = bytes.clone();
    let (r, wall, busy) =
        timed(async { tokio::task::spawn_blocking(move || Hash::of(&b4)).await }).await;
    ensure!(r? == hash, "blake3 of the source bytes changed");
    note("blake3_only", wall, busy);
    cancel.cancel();
    for n in [a, b, c] {
        for t in n.tasks {
            let _ = t.await;
        }
    }

    Ok(json!({
        "bench": "transfer",
        "blob_bytes": len,
        "reps": args.reps,
        "unit": "MB/s (1e6 bytes per second)",
        "fetch_blob_mb_s": ours.summary(),
        "baseline": {
            "what": "plain tokio TCP copy of the same bytes on loopback into memory",
            "tcp_mb_s": tcp.summary(),
        },
        "ratio_median": r3(ours.median() / tcp.median()),
        "ratio_best": r3(ours.best() / tcp.best()),
        "target_ratio": 0.5,
        "like_for_like": {
            "transport": {
                "what": "the blob stream from memory into memory (noise + yamux, no disk) vs the TCP copy into memory",
                "blob_stream_mb_s": stream_mem.summary(),
                "ratio_median": r3(stream_mem.median() / tcp.median()),
            },
            "into_the_store": {
                "what": "fetch_blob vs a plain TCP copy into the same BlobWriter (blake3 check, fsync, install)",
                "tcp_into_store_mb_s": tcp_store.summary(),
                "ratio_median": r3(ours.median() / tcp_store.median()),
            },
        },
        "cores": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "diagnostics": diag,
        "store_sink_split_ms": sink_split,
    }))
}

/// Repeated throughput measurements and the cores busy during each.
#[derive(Default)]
pub(crate) struct Series {
    values: Vec<f64>,
    busy: Vec<f64>,
}

impl Series {
    fn push(&mut self, value: f64, busy: Option<f64>) {
        self.values.push(value);
        self.busy.extend(busy);
    }

    fn median(&self) -> f64 {
        percentile(&sorted(self.values.clone()), 0.5)
    }

    fn best(&self) -> f64 {
        self.values.iter().copied().fold(f64::NAN, f64::max)
    }

    fn summary(&self) -> serde_json::Value {
        json!({
            "best": r3(self.best()),
            "median": r3(self.median()),
            "all": self.values.iter().map(|x| r3(*x)).collect::<Vec<_>>(),
            "cores_busy": self.busy,
        })
    }
}

/// Time to copy `bytes` over a plain TCP connection on loopback into a buffer allocated
/// and touched beforehand: from the client's one-byte request to its last byte read.
pub(crate) async fn tcp_copy(bytes: Arc<Vec<u8>>) -> Result<Duration> {
    let len = bytes.len();
    let sent = bytes.clone();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        let mut go = [0u8; 1];
        s.read_exact(&mut go).await?;
        s.write_all(&bytes).await?;
        s.shutdown().await
    });
    let mut c = TcpStream::connect(addr).await?;
    // Touched before the clock starts, so the baseline is the copy alone, not page faults.
    let mut buf = vec![0xA5u8; len];
    let t0 = Instant::now();
    c.write_all(&[1]).await?;
    c.read_exact(&mut buf).await?;
    let t = t0.elapsed();
    server.await??;
    ensure!(buf[..] == sent[..], "the TCP copy differs from the source");
    Ok(t)
}

/// Streams all of blob `hash` from `peer` over the blob protocol and drops the bytes: the
/// cost of the wire and of the serving side alone.
pub(crate) async fn wire_only(
    client: &Client,
    peer: PeerId,
    hash: Hash,
    total: u64,
) -> Result<Duration> {
    let t0 = Instant::now();
    let mut stream = client
        .open_blob_stream(peer)
        .await
        .map_err(anyhow::Error::msg)?;
    let req = BlobRequest {
        hash,
        offset: 0,
        len: u64::MAX,
    };
    stream.write_all(&encode_request(&req)).await?;
    let mut head = [0u8; 9];
    stream.read_exact(&mut head).await?;
    ensure!(
        decode_header(&head)? == BlobHeader::Found { total_len: total },
        "unexpected answer"
    );
    let mut frame = vec![0u8; FRAME_BYTES];
    let mut got = 0u64;
    while got < total {
        let n = stream.read(&mut frame).await?;
        ensure!(n > 0, "stream ended after {got} of {total} bytes");
        got += n as u64;
    }
    Ok(t0.elapsed())
}

/// A plain TCP copy of `bytes` written frame by frame into a `BlobWriter` on a blocking
/// thread and finished (hash check, fsync, install): `fetch_blob` without libp2p.
pub(crate) async fn tcp_copy_into_store(
    bytes: Arc<Vec<u8>>,
    store: &Store,
    hash: Hash,
) -> Result<Duration> {
    let sb = store.clone();
    tokio::task::spawn_blocking(move || sb.remove_blob(&hash)).await??;
    let len = bytes.len();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        tokio::io::AsyncWriteExt::write_all(&mut s, &bytes).await?;
        tokio::io::AsyncWriteExt::shutdown(&mut s).await
    });
    let t0 = Instant::now();
    let mut c = TcpStream::connect(addr).await?;
    let mut writer = store.blob_writer(hash, len as u64)?;
    // Four reused frames, as fetch_blob has.
    let (tx, mut rx) = mpsc::channel::<(Vec<u8>, usize)>(4);
    let (back_tx, mut back_rx) = mpsc::channel::<Vec<u8>>(4);
    for _ in 0..4 {
        back_tx.send(vec![0u8; FRAME_BYTES]).await?;
    }
    let sink = tokio::task::spawn_blocking(move || -> Result<Hash> {
        let mut off = 0u64;
        while let Some((frame, n)) = rx.blocking_recv() {
            writer.write_at(off, &frame[..n])?;
            off += n as u64;
            let _ = back_tx.blocking_send(frame);
        }
        Ok(writer.finish()?)
    });
    let mut got = 0;
    while got < len {
        let n = (len - got).min(FRAME_BYTES);
        let mut frame = back_rx.recv().await.context("the writer stopped")?;
        tokio::io::AsyncReadExt::read_exact(&mut c, &mut frame[..n]).await?;
        got += n;
        tx.send((frame, n)).await?;
    }
    drop(tx);
    ensure!(sink.await?? == hash, "stored another hash");
    let t = t0.elapsed();
    server.await??;
    Ok(t)
}

/// Writes `bytes` into a fresh `BlobWriter` in frames of `FRAME_BYTES` and finishes
/// it, as `fetch_blob` does, without the network. Returns the time of the writes (with
/// the in-order hashing) and of `finish` (hash check, fsync, rename, index flush).
pub(crate) fn local_sink(store: &Store, bytes: &[u8], hash: Hash) -> Result<(Duration, Duration)> {
    store.remove_blob(&hash)?;
    let t0 = Instant::now();
    let mut w = store.blob_writer(hash, bytes.len() as u64)?;
    for (i, chunk) in bytes.chunks(FRAME_BYTES).enumerate() {
        w.write_at((i * FRAME_BYTES) as u64, chunk)?;
    }
    let t1 = Instant::now();
    ensure!(w.finish()? == hash, "local sink stored another hash");
    Ok((t1 - t0, t1.elapsed()))
}

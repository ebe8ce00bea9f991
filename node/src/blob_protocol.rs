//! The blob transfer protocol `/hivemind/blob/2.0.0`: one request and its response per
//! libp2p stream. The request names a blob by its blake3 hash and a byte range; the
//! response is a 9-byte header (found with the blob's total length, not found, or busy)
//! followed by the bytes of the range, streamed in frames of [`FRAME_BYTES`] and never
//! held whole in memory: adapters of hundreds of MB move with a few frames of our memory
//! per transfer (plus what yamux buffers within its stream receive window).
//!
//! Wire format (fixed, little-endian, no serde so byte fields are raw bytes):
//!
//! ```text
//! request : hash [32] | offset u64 | len u64        (exactly 48 bytes; len u64::MAX = to the end)
//! response: 0u8 | 0u64                              (not found, or offset past the end)
//!         | 2u8 | 0u64                              (busy: the server is at its upload limit)
//!         | 1u8 | total_len u64 | data [min(len, total_len - offset)]
//! ```
//!
//! Version 1 was a libp2p request-response protocol with one request per 1 MiB chunk.
//! Every chunk paid a new stream, a fresh 1 MiB buffer on both sides (page faults and
//! memsets showed in profiles), and two hops through the event loop; the transfer ran
//! at 0.15x a plain TCP copy. Version 2 keeps the request/response shape but streams the
//! answer, with a fixed pool of reused buffers per transfer and the disk on a blocking
//! thread that overlaps the network on both ends (see ARCHITECTURE.md).
//!
//! [`fetch_blob`] is the receiving side: it fetches a blob from a list of peers, writes it
//! through a [`hivemind_store::BlobWriter`] (which verifies blake3 before the blob enters
//! the store), penalises a peer whose bytes do not hash to the name, and tries the next
//! peer on any failure. [`serve_incoming`] is the serving side, spawned by the network next
//! to its event loop.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use hivemind_protocol::Hash;
use hivemind_store::{BlobWriter, Store};
use libp2p::{PeerId, Stream, StreamProtocol};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::network::Client;

/// The protocol id; the version changes with any wire change.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/hivemind/blob/2.0.0");
/// Largest blob a node fetches, whatever the caller allows.
pub const MAX_BLOB_BYTES: u64 = 4 << 30;
/// Bytes moved between the stream and the disk at a time.
pub const FRAME_BYTES: usize = 256 << 10;
/// Frames per transfer (reused; they bound its memory to about 1 MiB per end).
const FRAMES: usize = 4;
/// Request length on the wire.
pub const REQUEST_BYTES: usize = 32 + 8 + 8;
const HEADER_BYTES: usize = 1 + 8;
/// Every read or write of a transfer (a header, one frame, a close) must complete within
/// this long, or the transfer fails.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Opening a stream (dialling the peer if needed) must succeed within this long.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// A server drops a stream whose 48-byte request has not arrived after this long. Such
/// streams hold no serving slot: slots are taken once the request is in.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Blob streams a node serves at once unless configured otherwise; more are answered
/// "busy". One peer gets at most a quarter of them (at least one).
pub const DEFAULT_SERVE_LIMIT: usize = 32;
/// Tries at opening a stream and reading its answer's header before a peer counts as
/// unavailable. A server keeps one inbound stream waiting for its accept loop and drops
/// (resets) any that arrive meanwhile (libp2p-stream's backpressure), so a burst of
/// requests from several peers can see resets that a retry a few ms later does not.
const REQUEST_TRIES: u32 = 4;

/// "Send me `len` bytes of blob `hash` from `offset`".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobRequest {
    /// blake3 of the blob.
    pub hash: Hash,
    /// First byte wanted.
    pub offset: u64,
    /// Bytes wanted; the server sends `min(len, total_len - offset)` (`u64::MAX`: the rest).
    pub len: u64,
}

/// The header of the answer to a [`BlobRequest`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobHeader {
    /// The server does not hold the blob, or the offset is past its end.
    NotFound,
    /// The server is serving as many streams as it will; try later or elsewhere.
    Busy,
    /// The range follows.
    Found {
        /// Length of the whole blob.
        total_len: u64,
    },
}

impl BlobRequest {
    /// How many bytes a server holding a blob of `total_len` sends for this request.
    pub fn answer_len(&self, total_len: u64) -> u64 {
        self.len.min(total_len.saturating_sub(self.offset))
    }
}

/// The 48 request bytes.
pub fn encode_request(req: &BlobRequest) -> [u8; REQUEST_BYTES] {
    let mut buf = [0u8; REQUEST_BYTES];
    buf[..32].copy_from_slice(req.hash.as_bytes());
    buf[32..40].copy_from_slice(&req.offset.to_le_bytes());
    buf[40..].copy_from_slice(&req.len.to_le_bytes());
    buf
}

/// Parses the 48 request bytes (every bit pattern is a request).
pub fn decode_request(buf: &[u8; REQUEST_BYTES]) -> BlobRequest {
    BlobRequest {
        hash: Hash(fixed(&buf[..32])),
        offset: u64::from_le_bytes(fixed(&buf[32..40])),
        len: u64::from_le_bytes(fixed(&buf[40..])),
    }
}

/// The 9 header bytes.
pub fn encode_header(h: BlobHeader) -> [u8; HEADER_BYTES] {
    let (tag, n) = match h {
        BlobHeader::NotFound => (0u8, 0u64),
        BlobHeader::Found { total_len } => (1, total_len),
        BlobHeader::Busy => (2, 0),
    };
    let mut buf = [0u8; HEADER_BYTES];
    buf[0] = tag;
    buf[1..].copy_from_slice(&n.to_le_bytes());
    buf
}

/// Parses the 9 header bytes.
pub fn decode_header(buf: &[u8; HEADER_BYTES]) -> io::Result<BlobHeader> {
    let n = u64::from_le_bytes(fixed(&buf[1..]));
    match buf[0] {
        0 => Ok(BlobHeader::NotFound),
        1 => Ok(BlobHeader::Found { total_len: n }),
        2 => Ok(BlobHeader::Busy),
        t => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown blob response tag {t}"),
        )),
    }
}

fn fixed<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&b[..N]);
    out
}

/// A blob opened for serving: its total length and a reader at the requested offset.
pub struct OpenBlob {
    /// Length of the whole blob.
    pub total_len: u64,
    /// Reads the blob from the requested offset on.
    pub reader: Box<dyn Read + Send>,
}

/// Where a node's blob server reads blobs from. The store in production; tests wrap it
/// to play a peer that serves wrong bytes.
pub trait BlobSource: Send + Sync + 'static {
    /// Opens blob `hash` at `offset` (blocking: called on a blocking thread). `Ok(None)`
    /// when the blob is not held or `offset` is past its end.
    fn open(&self, hash: &Hash, offset: u64) -> io::Result<Option<OpenBlob>>;
}

impl BlobSource for Store {
    fn open(&self, hash: &Hash, offset: u64) -> io::Result<Option<OpenBlob>> {
        let other = |e: hivemind_store::Error| io::Error::other(e.to_string());
        let Some(total_len) = self.blob_len(hash).map_err(other)? else {
            return Ok(None);
        };
        let Some(path) = self.blob_path(hash).map_err(other)? else {
            return Ok(None);
        };
        if offset > total_len {
            return Ok(None);
        }
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        file.seek(SeekFrom::Start(offset))?;
        Ok(Some(OpenBlob {
            total_len,
            reader: Box::new(file),
        }))
    }
}

/// Shared handle to a [`BlobSource`].
pub type SharedSource = Arc<dyn BlobSource>;

/// `fut`, failing with [`io::ErrorKind::TimedOut`] ("`what` timed out") after `limit`.
pub(crate) async fn within<T>(
    limit: Duration,
    what: &str,
    fut: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("{what} timed out")))?
}

/// One step of a transfer, within [`IO_TIMEOUT`].
async fn timed<T>(
    what: &str,
    fut: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    within(IO_TIMEOUT, what, fut).await
}

fn join_error(e: tokio::task::JoinError) -> io::Error {
    io::Error::other(format!("blocking task failed: {e}"))
}

/// `FRAMES` zeroed frames, the only buffers a transfer uses.
fn frame_pool() -> (mpsc::Sender<Vec<u8>>, mpsc::Receiver<Vec<u8>>) {
    let (tx, rx) = mpsc::channel(FRAMES);
    for _ in 0..FRAMES {
        // Capacity FRAMES never fills, so this cannot fail.
        let _ = tx.try_send(vec![0u8; FRAME_BYTES]);
    }
    (tx, rx)
}

// ---------------------------------------------------------------------------------------
// Serving
// ---------------------------------------------------------------------------------------

/// Accepts inbound blob streams until `cancel` fires and answers each on its own task.
/// At most `limit` requests are served at once, and at most a quarter of them (at least
/// one) for one peer; beyond that the answer is "busy". Streams from peers `refuse` names
/// are dropped unanswered.
pub async fn serve_incoming(
    mut incoming: libp2p_stream::IncomingStreams,
    source: SharedSource,
    limit: usize,
    refuse: impl Fn(&PeerId) -> bool + Send + 'static,
    cancel: CancellationToken,
) {
    let slots = Slots::new(limit);
    loop {
        let (peer, mut stream) = tokio::select! {
            _ = cancel.cancelled() => break,
            next = incoming.next() => match next {
                Some(x) => x,
                None => break,
            },
        };
        if refuse(&peer) {
            continue;
        }
        let (source, slots) = (source.clone(), slots.clone());
        tokio::spawn(async move {
            match serve_stream(&mut stream, peer, source, &slots).await {
                Ok(sent) => tracing::trace!(%peer, sent, "blob stream served"),
                Err(e) => tracing::debug!(%peer, error = %e, "blob stream failed"),
            }
        });
    }
}

/// Serving slots: a global semaphore plus a count per peer.
#[derive(Clone)]
struct Slots {
    global: Arc<Semaphore>,
    per_peer: Arc<Mutex<HashMap<PeerId, usize>>>,
    per_peer_max: usize,
}

/// A taken slot; dropping it frees it.
struct Slot {
    _permit: OwnedSemaphorePermit,
    peer: PeerId,
    per_peer: Arc<Mutex<HashMap<PeerId, usize>>>,
}

impl Slots {
    fn new(limit: usize) -> Slots {
        Slots {
            global: Arc::new(Semaphore::new(limit)),
            per_peer: Arc::default(),
            per_peer_max: limit.div_ceil(4).max(1),
        }
    }

    fn try_take(&self, peer: PeerId) -> Option<Slot> {
        let mut counts = self.per_peer.lock().unwrap_or_else(PoisonError::into_inner);
        let n = counts.entry(peer).or_insert(0);
        if *n >= self.per_peer_max {
            return None;
        }
        let permit = self.global.clone().try_acquire_owned().ok()?;
        *n += 1;
        Some(Slot {
            _permit: permit,
            peer,
            per_peer: self.per_peer.clone(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.per_peer.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = counts.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.peer);
            }
        }
    }
}

/// Answers one inbound stream: reads the request, takes a slot (or answers "busy"), sends
/// the header and the range, closes. Returns the number of blob bytes sent.
async fn serve_stream(
    stream: &mut Stream,
    peer: PeerId,
    source: SharedSource,
    slots: &Slots,
) -> io::Result<u64> {
    let mut buf = [0u8; REQUEST_BYTES];
    within(
        REQUEST_TIMEOUT,
        "waiting for the request",
        stream.read_exact(&mut buf),
    )
    .await?;
    let req = decode_request(&buf);
    let Some(_slot) = slots.try_take(peer) else {
        return answer_only(stream, BlobHeader::Busy).await;
    };
    let opened = tokio::task::spawn_blocking(move || source.open(&req.hash, req.offset))
        .await
        .map_err(join_error)?
        .unwrap_or_else(|e| {
            tracing::warn!(hash = %req.hash.short(), error = %e, "cannot open a blob to serve");
            None
        });
    let Some(blob) = opened else {
        return answer_only(stream, BlobHeader::NotFound).await;
    };
    let total_len = blob.total_len;
    timed(
        "writing",
        stream.write_all(&encode_header(BlobHeader::Found { total_len })),
    )
    .await?;
    let sent = send_range(blob.reader, req.answer_len(total_len), stream).await?;
    timed("closing", stream.close()).await?;
    Ok(sent)
}

/// Answers with a header and no data.
async fn answer_only(stream: &mut Stream, header: BlobHeader) -> io::Result<u64> {
    timed("writing", stream.write_all(&encode_header(header))).await?;
    timed("closing", stream.close()).await?;
    Ok(0)
}

/// Streams `n` bytes of `reader` to `stream`: a blocking thread fills frames from the disk
/// while this task writes the previous ones.
async fn send_range(
    mut reader: Box<dyn Read + Send>,
    n: u64,
    stream: &mut Stream,
) -> io::Result<u64> {
    let (empty_tx, mut empty_rx) = frame_pool();
    let (full_tx, mut full_rx) = mpsc::channel::<io::Result<(Vec<u8>, usize)>>(FRAMES);
    let disk = tokio::task::spawn_blocking(move || {
        let mut left = n;
        while left > 0 {
            let Some(mut frame) = empty_rx.blocking_recv() else {
                return; // the network side stopped
            };
            let len = left.min(FRAME_BYTES as u64) as usize;
            let read = reader.read_exact(&mut frame[..len]).map(|()| (frame, len));
            let failed = read.is_err();
            if full_tx.blocking_send(read).is_err() || failed {
                return;
            }
            left -= len as u64;
        }
    });
    let mut sent = 0u64;
    while sent < n {
        let Some(next) = full_rx.recv().await else {
            break;
        };
        let (frame, len) = next?;
        timed("writing", stream.write_all(&frame[..len])).await?;
        sent += len as u64;
        let _ = empty_tx.send(frame).await;
    }
    drop(full_rx);
    disk.await.map_err(join_error)?;
    if sent != n {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the blob ended after {sent} of {n} bytes"),
        ));
    }
    Ok(sent)
}

// ---------------------------------------------------------------------------------------
// Fetching
// ---------------------------------------------------------------------------------------

/// Why one peer could not deliver a blob.
#[derive(Debug)]
enum PeerFailure {
    /// Not found, unreachable, or the stream broke: try the next peer, no penalty.
    Unavailable(String),
    /// It holds the blob but serves as many streams as it will: try again later.
    Busy,
    /// It served bytes that do not hash to the name.
    Lied(String),
    /// Our own store failed: stop.
    Local(String),
}

/// Fetches blob `hash` from `peers` (in order), verifies it against its hash and stores
/// it. A peer that serves wrong bytes is penalised and the next one is tried; a peer that
/// says the blob is longer than `max_len` (or [`MAX_BLOB_BYTES`]) is skipped before
/// anything is written. When every peer failed and some only because they were busy,
/// those are asked again after a backoff (at most [`BUSY_PASSES`] times). Returns the
/// peer that delivered (this node's own id when the blob was already stored), or `None`
/// when no peer could.
pub async fn fetch_blob(
    client: &Client,
    store: &Store,
    hash: Hash,
    peers: &[PeerId],
    max_len: u64,
) -> Option<PeerId> {
    if matches!(store.has_blob(&hash), Ok(true)) {
        return Some(client.local_peer_id());
    }
    let max_len = max_len.min(MAX_BLOB_BYTES);
    let mut ask = peers.to_vec();
    for pass in 0..BUSY_PASSES {
        if pass > 0 {
            let wait = BUSY_BACKOFF * 2u32.pow(pass - 1);
            tracing::debug!(hash = %hash.short(), busy = ask.len(), ?wait, "every peer busy; waiting");
            tokio::time::sleep(wait).await;
        }
        match fetch_pass(client, store, hash, &ask, max_len).await {
            Pass::Done(peer) => return Some(peer),
            Pass::Failed => return None,
            Pass::Busy(busy) => ask = busy,
        }
    }
    None
}

/// The first wait after a pass in which every peer that holds the blob was busy; doubled
/// after each further such pass.
const BUSY_BACKOFF: Duration = Duration::from_millis(250);
/// Passes over the busy peers before a fetch gives up (about 30 s of waiting in all).
pub const BUSY_PASSES: u32 = 8;

enum Pass {
    Done(PeerId),
    /// No peer delivered and none was busy (or our store failed).
    Failed,
    /// No peer delivered; these were busy.
    Busy(Vec<PeerId>),
}

async fn fetch_pass(
    client: &Client,
    store: &Store,
    hash: Hash,
    peers: &[PeerId],
    max_len: u64,
) -> Pass {
    let mut busy = Vec::new();
    for peer in peers {
        match fetch_from(client, store, hash, *peer, max_len).await {
            Ok(()) => return Pass::Done(*peer),
            Err(PeerFailure::Busy) => busy.push(*peer),
            Err(PeerFailure::Unavailable(why)) => {
                tracing::debug!(%peer, hash = %hash.short(), %why, "blob fetch failed; trying the next peer")
            }
            Err(PeerFailure::Lied(why)) => {
                tracing::warn!(%peer, hash = %hash.short(), %why, "peer served a bad blob; penalising");
                client
                    .penalise(*peer, format!("bad blob {}: {why}", hash.short()))
                    .await;
            }
            Err(PeerFailure::Local(why)) => {
                tracing::error!(hash = %hash.short(), %why, "store failure while fetching");
                return Pass::Failed;
            }
        }
    }
    if busy.is_empty() {
        Pass::Failed
    } else {
        Pass::Busy(busy)
    }
}

async fn fetch_from(
    client: &Client,
    store: &Store,
    hash: Hash,
    peer: PeerId,
    max_len: u64,
) -> Result<(), PeerFailure> {
    let req = BlobRequest {
        hash,
        offset: 0,
        len: u64::MAX,
    };
    let (mut stream, header) = match request_blob(client, peer, req).await {
        Ok(answer) => answer,
        // Reset on every try: most likely a burst at the server; ask again later.
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Err(PeerFailure::Busy),
        Err(e) => return Err(PeerFailure::Unavailable(e.to_string())),
    };
    let total = match header {
        BlobHeader::NotFound => return Err(PeerFailure::Unavailable("not found".into())),
        BlobHeader::Busy => return Err(PeerFailure::Busy),
        BlobHeader::Found { total_len } => total_len,
    };
    if total > max_len {
        // A liar, or a blob this network cannot use: either way nothing is written.
        let _ = timed("closing", stream.close()).await;
        return Err(PeerFailure::Unavailable(format!(
            "it announces {total} bytes; at most {max_len} are expected"
        )));
    }
    let st = store.clone();
    let writer = tokio::task::spawn_blocking(move || st.blob_writer(hash, total))
        .await
        .map_err(|e| PeerFailure::Local(e.to_string()))?
        .map_err(|e| PeerFailure::Local(e.to_string()))?;
    let result = receive_range(&mut stream, writer, total).await;
    let _ = timed("closing", stream.close()).await;
    result
}

/// Sends `req` to `peer` on a new stream and reads the answer's header; the range (if
/// found) follows on the returned stream. A stream that opened but broke off before the
/// header (other than by a timeout or a protocol error) is retried a few times with
/// jittered backoff (see [`REQUEST_TRIES`]); when every try broke off that way the error
/// is [`io::ErrorKind::ConnectionReset`]. Failing to open a stream is not retried.
pub async fn request_blob(
    client: &Client,
    peer: PeerId,
    req: BlobRequest,
) -> io::Result<(Stream, BlobHeader)> {
    let mut tries = 0;
    loop {
        tries += 1;
        let mut stream = client.open_blob_stream(peer).await?;
        let e = match request_on(&mut stream, req).await {
            Ok(header) => return Ok((stream, header)),
            Err(e) => e,
        };
        if matches!(
            e.kind(),
            io::ErrorKind::TimedOut | io::ErrorKind::InvalidData
        ) {
            return Err(e);
        }
        if tries >= REQUEST_TRIES {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                format!("cut off {tries} times, last: {e}"),
            ));
        }
        let base = 20u64 << tries;
        let wait = Duration::from_millis(base + jitter(base));
        tracing::debug!(%peer, error = %e, tries, ?wait, "blob request cut off; retrying");
        tokio::time::sleep(wait).await;
    }
}

async fn request_on(stream: &mut Stream, req: BlobRequest) -> io::Result<BlobHeader> {
    timed(
        "sending the request",
        stream.write_all(&encode_request(&req)),
    )
    .await?;
    let mut head = [0u8; HEADER_BYTES];
    timed("reading the answer", stream.read_exact(&mut head)).await?;
    decode_header(&head)
}

/// A pseudo-random number in `0..below` (so that fetchers cut off together do not retry
/// together); std's per-process random hasher keys are its entropy.
fn jitter(below: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() % below.max(1)
}

/// How the network half of [`receive_range`] ended early.
enum NetStop {
    Stream(String),
    WriterGone,
}

/// Reads `total` bytes from `stream` into `writer` and finishes it (hash check, fsync,
/// install): this task reads frames while a blocking thread writes and hashes the
/// previous ones.
async fn receive_range(
    stream: &mut Stream,
    mut writer: BlobWriter,
    total: u64,
) -> Result<(), PeerFailure> {
    let (empty_tx, mut empty_rx) = frame_pool();
    let (full_tx, mut full_rx) = mpsc::channel::<(Vec<u8>, usize)>(FRAMES);
    let disk = tokio::task::spawn_blocking(move || -> hivemind_store::Result<Hash> {
        let mut offset = 0u64;
        while let Some((frame, len)) = full_rx.blocking_recv() {
            writer.write_at(offset, &frame[..len])?;
            offset += len as u64;
            let _ = empty_tx.blocking_send(frame);
        }
        // Incomplete if the network side stopped early (then its error is reported).
        writer.finish()
    });
    let net = async {
        let mut got = 0u64;
        while got < total {
            let Some(mut frame) = empty_rx.recv().await else {
                return Err(NetStop::WriterGone);
            };
            let len = (total - got).min(FRAME_BYTES as u64) as usize;
            timed("reading", stream.read_exact(&mut frame[..len]))
                .await
                .map_err(|e| NetStop::Stream(format!("after {got} of {total} bytes: {e}")))?;
            got += len as u64;
            full_tx
                .send((frame, len))
                .await
                .map_err(|_| NetStop::WriterGone)?;
        }
        Ok(())
    }
    .await;
    drop(full_tx);
    let stored = disk.await.map_err(|e| PeerFailure::Local(e.to_string()))?;
    match (net, stored) {
        (Err(NetStop::Stream(why)), _) => Err(PeerFailure::Unavailable(why)),
        (_, Ok(_)) => Ok(()),
        (_, Err(e @ hivemind_store::Error::HashMismatch { .. })) => {
            Err(PeerFailure::Lied(e.to_string()))
        }
        (_, Err(e)) => Err(PeerFailure::Local(e.to_string())),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn request_roundtrips() {
        let req = BlobRequest {
            hash: Hash::of(b"x"),
            offset: 7 << 33,
            len: u64::MAX,
        };
        let buf = encode_request(&req);
        assert_eq!(decode_request(&buf), req);
        assert_eq!(&buf[..32], req.hash.as_bytes());
    }

    #[test]
    fn headers_roundtrip_and_unknown_tags_fail() {
        for h in [
            BlobHeader::NotFound,
            BlobHeader::Busy,
            BlobHeader::Found { total_len: 1 << 40 },
        ] {
            assert_eq!(decode_header(&encode_header(h)).unwrap(), h);
        }
        let mut bad = encode_header(BlobHeader::Busy);
        bad[0] = 9;
        assert_eq!(
            decode_header(&bad).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }

    #[test]
    fn answer_len_is_clamped_to_the_blob() {
        let req = |offset, len| BlobRequest {
            hash: Hash::of(b"x"),
            offset,
            len,
        };
        assert_eq!(req(0, u64::MAX).answer_len(100), 100);
        assert_eq!(req(40, 10).answer_len(100), 10);
        assert_eq!(req(95, 10).answer_len(100), 5);
        assert_eq!(req(100, 10).answer_len(100), 0);
        assert_eq!(req(200, 10).answer_len(100), 0);
    }

    #[test]
    fn store_source_opens_at_offsets_and_reports_absence() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let bytes: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let h = store.put_blob(&bytes).unwrap();
        let mut blob = store.open(&h, 1000).unwrap().unwrap();
        assert_eq!(blob.total_len, 3000);
        let mut rest = Vec::new();
        blob.reader.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, bytes[1000..]);
        assert!(store.open(&h, 3001).unwrap().is_none());
        assert!(store.open(&Hash::of(b"absent"), 0).unwrap().is_none());
    }
}

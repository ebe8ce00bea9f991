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
//! tree    : hash [32] | u64::MAX | 0                (offset TREE_OFFSET: the chunk tree)
//! response: 1u8 | total_len u64 | 32-byte chunk value [per 1 MiB chunk; none for one chunk]
//! ```
//!
//! The tree request needs no new version: a server from before it sees an offset past the
//! end and answers "not found", and the fetcher then fetches from one holder as before.
//!
//! Version 1 was a libp2p request-response protocol with one request per 1 MiB chunk.
//! Every chunk paid a new stream, a fresh 1 MiB buffer on both sides (page faults and
//! memsets showed in profiles), and two hops through the event loop; the transfer ran
//! at 0.15x a plain TCP copy. Version 2 keeps the request/response shape but streams the
//! answer, with a fixed pool of reused buffers per transfer and the disk on a blocking
//! thread that overlaps the network on both ends (see ARCHITECTURE.md).
//!
//! [`fetch_blob_multi`] fetches a blob of 2 MiB or more from up to [`MAX_SOURCES`] holders
//! at once, each 1 MiB chunk checked against the blob's chunk tree ([`tree`]) on arrival.
//! [`fetch_blob`] is the receiving side from one holder at a time: it fetches a blob from a list of peers, writes it
//! through a [`hivemind_store::BlobWriter`] (which verifies blake3 before the blob enters
//! the store), penalises a peer whose bytes do not hash to the name, and tries the next
//! peer on any failure. [`serve_incoming`] is the serving side, spawned by the network next
//! to its event loop.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::sync::Arc;
use std::time::Duration;

use hivemind_protocol::Hash;
use hivemind_store::Store;
use libp2p::StreamProtocol;
use tokio::sync::mpsc;

mod fetch;
mod multi;
mod serve;
pub mod tree;

pub use fetch::{
    fetch_blob, fetch_blob_fair, fetch_blob_side_by_side, fetch_blob_tracked, request_blob,
    Fetched, Transfer, Transfers, SIDE_BY_SIDE,
};
pub use multi::{fetch_blob_multi, MAX_SOURCES};

/// Passes over the busy peers before a fetch gives up (about 30 s of waiting in all).
pub const BUSY_PASSES: u32 = 8;
pub use serve::{serve_incoming, ServeLimits, Served};

/// The protocol id; the version changes with any wire change.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/hivemind/blob/2.0.0");
/// Largest blob a node fetches, whatever the caller allows.
pub const MAX_BLOB_BYTES: u64 = 4 << 30;
/// Bytes moved between the stream and the disk at a time.
pub const FRAME_BYTES: usize = 256 << 10;
/// Frames per transfer (reused; they bound its memory to about 1 MiB per end).
const FRAMES: usize = 4;
/// A request at this offset asks for the blob's chunk tree instead of its bytes.
pub const TREE_OFFSET: u64 = u64::MAX;
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
/// The slowest a peer may read a blob a node serves unless configured otherwise: 64 KiB/s
/// (a slow home link). Before, a reader at ~9 KB/s held a serving slot for 40 minutes a blob.
pub const DEFAULT_MIN_SERVE_RATE: u64 = 64 << 10;
/// The slowest a peer may send a blob this node fetches: a transfer must end within
/// [`REQUEST_TIMEOUT`] plus the blob's length at this rate, or the peer counts as unavailable
/// and the next is tried. Before, each 256 KiB frame only had to arrive within 30 s, so a
/// peer sending ~9 KB/s held one of our fetch slots for 40 minutes a blob.
pub const MIN_FETCH_RATE: u64 = DEFAULT_MIN_SERVE_RATE;
/// Transfers this node receives from one peer at once; a fetch that would start one more
/// does not ask that peer now ([`Fetched::Deferred`] when no other peer delivered: the
/// fetch gives its slot back and is tried again later). So one peer, however slow, holds
/// at most this many of the fetch slots.
pub const MAX_TRANSFERS_PER_PEER: usize = 2;
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

/// Where a node's blob and record servers read from. The store in production; tests wrap
/// it to play a peer that serves wrong bytes.
pub trait BlobSource: Send + Sync + 'static {
    /// The signed committed digest (envelope bytes) stored with round `round` if its result
    /// is `result` (blocking), for the record protocol ([`crate::net::records`]). `Ok(None)`
    /// when no such round is held; by default none is.
    fn record(&self, round: u64, result: &Hash) -> io::Result<Option<Vec<u8>>> {
        let _ = (round, result);
        Ok(None)
    }

    /// Opens blob `hash` at `offset` (blocking: called on a blocking thread). `Ok(None)`
    /// when the blob is not held or `offset` is past its end.
    fn open(&self, hash: &Hash, offset: u64) -> io::Result<Option<OpenBlob>>;

    /// The length and chunk values ([`tree`]) of blob `hash` (blocking), `Ok(None)` when
    /// it is not held. Computed from [`BlobSource::open`] unless a source knows better.
    fn tree(&self, hash: &Hash) -> io::Result<Option<(u64, Vec<tree::Value>)>> {
        let Some(blob) = self.open(hash, 0)? else {
            return Ok(None);
        };
        let values = tree::values_of(blob.reader, blob.total_len)?;
        Ok(Some((blob.total_len, values)))
    }
}

impl BlobSource for Store {
    fn record(&self, round: u64, result: &Hash) -> io::Result<Option<Vec<u8>>> {
        let other = |e: hivemind_store::Error| io::Error::other(e.to_string());
        Ok(self
            .get_round(round)
            .map_err(other)?
            .filter(|r| r.hash == *result)
            .map(|r| r.digest))
    }

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

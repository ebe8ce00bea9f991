//! The blob transfer protocol `/hivemind/blob/1.0.0`: a request names a blob by its blake3
//! hash and a byte range, the answer is that chunk (with the blob's total length) or
//! "not found". Adapters of hundreds of MB move as many chunks of at most
//! [`MAX_CHUNK_BYTES`], so no message ever holds a whole adapter.
//!
//! Wire format (fixed, little-endian, no serde so byte fields are raw bytes):
//!
//! ```text
//! request : hash [32] | offset u64 | len u32                         (exactly 44 bytes)
//! response: 0u8                                                       (not found)
//!         | 1u8 | total_len u64 | data_len u32 | data [data_len]      (chunk, data_len <= MAX_CHUNK_BYTES)
//! ```
//!
//! The codec checks every length against its cap before it allocates.
//!
//! [`fetch_blob`] is the receiving side: it pulls a blob chunk by chunk from a list of
//! peers through the network client, writes it into a [`hivemind_store::BlobWriter`]
//! (which verifies blake3 before the blob enters the store), and on a failure or a hash
//! mismatch penalises that peer and retries the next one.

use std::io;
use std::sync::Arc;

use async_trait::async_trait;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use hivemind_protocol::Hash;
use hivemind_store::Store;
use libp2p::{request_response, PeerId, StreamProtocol};

use crate::network::Client;

/// The protocol id; the version changes with any wire change.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/hivemind/blob/1.0.0");
/// Most bytes one chunk carries.
pub const MAX_CHUNK_BYTES: u32 = 1 << 20;
/// Largest blob a node accepts (bigger announcements are never fetched).
pub const MAX_BLOB_BYTES: u64 = 4 << 30;
/// Chunk requests kept in flight per transfer (hides the round trip).
const PIPELINE: usize = 8;
const REQUEST_BYTES: usize = 32 + 8 + 4;

/// "Send me `len` bytes of blob `hash` from `offset`".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobRequest {
    /// blake3 of the blob.
    pub hash: Hash,
    /// First byte wanted.
    pub offset: u64,
    /// Bytes wanted (the server sends at most [`MAX_CHUNK_BYTES`]).
    pub len: u32,
}

/// The answer to a [`BlobRequest`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlobResponse {
    /// The server does not hold the blob (or the range is outside it).
    NotFound,
    /// The bytes from the requested offset (possibly fewer than asked near the end).
    Chunk {
        /// Length of the whole blob.
        total_len: u64,
        /// The bytes.
        data: Vec<u8>,
    },
}

/// Encodes and decodes [`BlobRequest`] / [`BlobResponse`] with size caps.
#[derive(Clone, Copy, Debug, Default)]
pub struct BlobCodec;

#[async_trait]
impl request_response::Codec for BlobCodec {
    type Protocol = StreamProtocol;
    type Request = BlobRequest;
    type Response = BlobResponse;

    async fn read_request<T>(
        &mut self,
        _protocol: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<BlobRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut buf = [0u8; REQUEST_BYTES];
        io.read_exact(&mut buf).await?;
        decode_request(&buf)
    }

    async fn read_response<T>(
        &mut self,
        _protocol: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<BlobResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut tag = [0u8; 1];
        io.read_exact(&mut tag).await?;
        match tag[0] {
            0 => Ok(BlobResponse::NotFound),
            1 => {
                let mut head = [0u8; 12];
                io.read_exact(&mut head).await?;
                let total_len = u64::from_le_bytes(fixed(&head[..8]));
                let len = u32::from_le_bytes(fixed(&head[8..]));
                if len > MAX_CHUNK_BYTES {
                    return Err(invalid(format!(
                        "chunk of {len} bytes exceeds the cap of {MAX_CHUNK_BYTES}"
                    )));
                }
                // Filled by the reader, not zeroed first (a 1 MiB memset per chunk showed in
                // profiles); `take` keeps a lying peer from sending more than announced.
                let mut data = Vec::with_capacity(len as usize);
                io.take(u64::from(len)).read_to_end(&mut data).await?;
                if data.len() != len as usize {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("chunk ended after {} of {len} bytes", data.len()),
                    ));
                }
                Ok(BlobResponse::Chunk { total_len, data })
            }
            t => Err(invalid(format!("unknown response tag {t}"))),
        }
    }

    async fn write_request<T>(
        &mut self,
        _protocol: &StreamProtocol,
        io: &mut T,
        req: BlobRequest,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&encode_request(&req)).await?;
        io.close().await
    }

    async fn write_response<T>(
        &mut self,
        _protocol: &StreamProtocol,
        io: &mut T,
        res: BlobResponse,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        match res {
            BlobResponse::NotFound => io.write_all(&[0]).await?,
            BlobResponse::Chunk { total_len, data } => {
                let len = u32::try_from(data.len())
                    .ok()
                    .filter(|l| *l <= MAX_CHUNK_BYTES)
                    .ok_or_else(|| invalid(format!("chunk of {} bytes too large", data.len())))?;
                let mut head = [0u8; 13];
                head[0] = 1;
                head[1..9].copy_from_slice(&total_len.to_le_bytes());
                head[9..].copy_from_slice(&len.to_le_bytes());
                io.write_all(&head).await?;
                io.write_all(&data).await?;
            }
        }
        io.close().await
    }
}

fn fixed<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&b[..N]);
    out
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// The 44 request bytes.
pub fn encode_request(req: &BlobRequest) -> [u8; REQUEST_BYTES] {
    let mut buf = [0u8; REQUEST_BYTES];
    buf[..32].copy_from_slice(req.hash.as_bytes());
    buf[32..40].copy_from_slice(&req.offset.to_le_bytes());
    buf[40..].copy_from_slice(&req.len.to_le_bytes());
    buf
}

/// Parses the 44 request bytes.
pub fn decode_request(buf: &[u8; REQUEST_BYTES]) -> io::Result<BlobRequest> {
    Ok(BlobRequest {
        hash: Hash(fixed(&buf[..32])),
        offset: u64::from_le_bytes(fixed(&buf[32..40])),
        len: u32::from_le_bytes(fixed(&buf[40..])),
    })
}

/// Where a node's blob server reads chunks from. The store in production; tests wrap it
/// to play a peer that serves wrong bytes.
pub trait BlobSource: Send + Sync + 'static {
    /// Answers one request (blocking: called on a blocking thread).
    fn serve(&self, req: &BlobRequest) -> BlobResponse;
}

impl BlobSource for Store {
    fn serve(&self, req: &BlobRequest) -> BlobResponse {
        let Ok(Some(total_len)) = self.blob_len(&req.hash) else {
            return BlobResponse::NotFound;
        };
        let len = u64::from(req.len.min(MAX_CHUNK_BYTES));
        match self.read_blob_range(&req.hash, req.offset, len) {
            Ok(Some(data)) => BlobResponse::Chunk { total_len, data },
            _ => BlobResponse::NotFound,
        }
    }
}

/// Shared handle to a [`BlobSource`].
pub type SharedSource = Arc<dyn BlobSource>;

/// Why one peer could not deliver a blob.
#[derive(Debug)]
enum PeerFailure {
    /// Not found, unreachable, or a protocol error: try the next peer, no penalty.
    Unavailable(String),
    /// It served bytes that do not hash to the name, or a length that contradicts itself.
    Lied(String),
    /// Our own store failed: stop.
    Local(String),
}

/// Fetches blob `hash` from `peers` (in order), verifies it against its hash and stores
/// it. A peer that serves wrong bytes is penalised and the next one is tried. Returns the
/// peer that delivered, or `None` when no peer could.
pub async fn fetch_blob(
    client: &Client,
    store: &Store,
    hash: Hash,
    peers: &[PeerId],
) -> Option<PeerId> {
    if matches!(store.has_blob(&hash), Ok(true)) {
        return peers.first().copied().or(Some(client.local_peer_id()));
    }
    for peer in peers {
        match fetch_from(client, store, hash, *peer).await {
            Ok(()) => return Some(*peer),
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
                return None;
            }
        }
    }
    None
}

async fn fetch_from(
    client: &Client,
    store: &Store,
    hash: Hash,
    peer: PeerId,
) -> Result<(), PeerFailure> {
    let ask =
        |offset: u64, len: u32| ask_chunk(client.clone(), peer, BlobRequest { hash, offset, len });
    let first = ask(0, MAX_CHUNK_BYTES)
        .await
        .map_err(PeerFailure::Unavailable)?;
    let (total, data) = match first {
        BlobResponse::NotFound => return Err(PeerFailure::Unavailable("not found".into())),
        BlobResponse::Chunk { total_len, data } => (total_len, data),
    };
    if total > MAX_BLOB_BYTES {
        return Err(PeerFailure::Lied(format!(
            "blob of {total} bytes over the cap"
        )));
    }
    let st = store.clone();
    let mut writer = run_blocking(move || st.blob_writer(hash, total)).await?;
    let mut received = data.len() as u64;
    writer = write_chunk(writer, 0, data, total).await?;
    // Pipelined: keep up to PIPELINE chunk requests in flight, write them in order.
    let mut next = received;
    let mut inflight = futures::stream::FuturesOrdered::new();
    use futures::StreamExt;
    loop {
        while inflight.len() < PIPELINE && next < total {
            let len = (total - next).min(u64::from(MAX_CHUNK_BYTES)) as u32;
            let off = next;
            let fut = ask(off, len);
            inflight.push_back(async move { (off, fut.await) });
            next += u64::from(len);
        }
        let Some((off, res)) = inflight.next().await else {
            break;
        };
        match res.map_err(PeerFailure::Unavailable)? {
            BlobResponse::NotFound => {
                return Err(PeerFailure::Unavailable("chunk not found".into()))
            }
            BlobResponse::Chunk { total_len, data } => {
                if total_len != total || data.is_empty() {
                    return Err(PeerFailure::Lied("inconsistent chunk".into()));
                }
                received += data.len() as u64;
                writer = write_chunk(writer, off, data, total).await?;
            }
        }
    }
    if received != total {
        return Err(PeerFailure::Lied(format!(
            "sent {received} of {total} bytes"
        )));
    }
    tokio::task::spawn_blocking(move || writer.finish())
        .await
        .map_err(|e| PeerFailure::Local(e.to_string()))?
        .map_err(|e| PeerFailure::Lied(e.to_string()))?;
    Ok(())
}

async fn ask_chunk(client: Client, peer: PeerId, req: BlobRequest) -> Result<BlobResponse, String> {
    client.request_chunk(peer, req).await
}

async fn write_chunk(
    mut writer: hivemind_store::BlobWriter,
    off: u64,
    data: Vec<u8>,
    total: u64,
) -> Result<hivemind_store::BlobWriter, PeerFailure> {
    if off + data.len() as u64 > total {
        return Err(PeerFailure::Lied("chunk past the end".into()));
    }
    tokio::task::spawn_blocking(move || writer.write_at(off, &data).map(|()| writer))
        .await
        .map_err(|e| PeerFailure::Local(e.to_string()))?
        .map_err(|e| PeerFailure::Local(e.to_string()))
}

async fn run_blocking<T: Send + 'static>(
    f: impl FnOnce() -> hivemind_store::Result<T> + Send + 'static,
) -> Result<T, PeerFailure> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| PeerFailure::Local(e.to_string()))?
        .map_err(|e| PeerFailure::Local(e.to_string()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use libp2p::request_response::Codec;

    #[tokio::test]
    async fn request_roundtrips() {
        let req = BlobRequest {
            hash: Hash::of(b"x"),
            offset: 7 << 33,
            len: 12345,
        };
        let mut buf = Vec::new();
        let mut c = BlobCodec;
        c.write_request(&PROTOCOL, &mut futures::io::Cursor::new(&mut buf), req)
            .await
            .unwrap();
        assert_eq!(buf.len(), REQUEST_BYTES);
        let got = c
            .read_request(&PROTOCOL, &mut futures::io::Cursor::new(&buf))
            .await
            .unwrap();
        assert_eq!(got, req);
    }

    #[tokio::test]
    async fn response_roundtrips_as_raw_bytes() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let res = BlobResponse::Chunk {
            total_len: 99_999,
            data: data.clone(),
        };
        let mut buf = Vec::new();
        let mut c = BlobCodec;
        c.write_response(
            &PROTOCOL,
            &mut futures::io::Cursor::new(&mut buf),
            res.clone(),
        )
        .await
        .unwrap();
        // Raw bytes: 13 header bytes plus the data, not a serde integer array.
        assert_eq!(buf.len(), 13 + data.len());
        assert_eq!(&buf[13..], &data[..]);
        let got = c
            .read_response(&PROTOCOL, &mut futures::io::Cursor::new(&buf))
            .await
            .unwrap();
        assert_eq!(got, res);
    }

    #[tokio::test]
    async fn oversized_chunk_is_refused_before_allocation() {
        // A header claiming 4 GiB of data, followed by nothing.
        let mut buf = vec![1u8];
        buf.extend_from_slice(&10u64.to_le_bytes());
        buf.extend_from_slice(&u32::MAX.to_le_bytes());
        let err = BlobCodec
            .read_response(&PROTOCOL, &mut futures::io::Cursor::new(&buf))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let err = BlobCodec
            .read_response(&PROTOCOL, &mut futures::io::Cursor::new(&[9u8][..]))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn store_source_serves_ranges_and_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let bytes: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let h = store.put_blob(&bytes).unwrap();
        let r = store.serve(&BlobRequest {
            hash: h,
            offset: 1000,
            len: 500,
        });
        assert_eq!(
            r,
            BlobResponse::Chunk {
                total_len: 3000,
                data: bytes[1000..1500].to_vec()
            }
        );
        let r = store.serve(&BlobRequest {
            hash: Hash::of(b"absent"),
            offset: 0,
            len: 10,
        });
        assert_eq!(r, BlobResponse::NotFound);
    }
}

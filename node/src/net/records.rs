//! The record protocol: "send me your committed record of round R whose result is H",
//! answered with the signed committed digest the node stored when it committed that round
//! (or nothing). A node verifying another chain's history asks the signers of that chain's
//! tip for its ancestors, one round at a time (protocol/PROTOCOL.md, "Histories").
//!
//! ```text
//! request   round (u64 LE) | result (32 bytes)
//! answer    length (u32 LE, 0: not held) | that many bytes (a signed digest envelope)
//! ```

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use hivemind_protocol::{Hash, MAX_MESSAGE_BYTES};
use libp2p::{PeerId, Stream, StreamProtocol};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::blob::{within, SharedSource};

/// The protocol id.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/hivemind/record/1.0.0");
/// Time for one whole exchange (open aside): the request, the lookup and the answer.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Record lookups a node runs at once; more wait for a free slot (each is one small
/// lookup), within [`EXCHANGE_TIMEOUT`].
const SERVING: usize = 8;
/// Record requests of one peer answered or waiting at once; more are dropped unanswered, so
/// one peer cannot hold every slot.
const PER_PEER: usize = 2;
const REQUEST_BYTES: usize = 40;

/// The request bytes.
fn encode_request(round: u64, result: &Hash) -> [u8; REQUEST_BYTES] {
    let mut buf = [0u8; REQUEST_BYTES];
    buf[..8].copy_from_slice(&round.to_le_bytes());
    buf[8..].copy_from_slice(result.as_bytes());
    buf
}

/// Answers inbound record streams from `source` until `cancel` fires. Streams from peers
/// `refuse` names are dropped unanswered.
pub async fn serve_incoming(
    mut incoming: libp2p_stream::IncomingStreams,
    source: SharedSource,
    refuse: impl Fn(&PeerId) -> bool + Send + 'static,
    cancel: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(SERVING));
    let per_peer: Arc<Mutex<HashMap<PeerId, usize>>> = Arc::default();
    let mut streams = JoinSet::new();
    loop {
        let (peer, mut stream) = tokio::select! {
            _ = cancel.cancelled() => break,
            Some(_) = streams.join_next(), if !streams.is_empty() => continue,
            next = incoming.next() => match next {
                Some(x) => x,
                None => break,
            },
        };
        if refuse(&peer) {
            continue;
        }
        {
            let mut counts = per_peer.lock().unwrap_or_else(PoisonError::into_inner);
            let n = counts.entry(peer).or_insert(0);
            if *n >= PER_PEER {
                continue;
            }
            *n += 1;
        }
        let (source, slots, per_peer) = (source.clone(), slots.clone(), per_peer.clone());
        streams.spawn(async move {
            let answer = within(EXCHANGE_TIMEOUT, "answering a record request", async {
                // A slot is held for the lookup alone: a peer that opens streams and sends
                // nothing, or reads the answer slowly, holds only its own share.
                let mut req = [0u8; REQUEST_BYTES];
                stream.read_exact(&mut req).await?;
                let mut round = [0u8; 8];
                round.copy_from_slice(&req[..8]);
                let mut result = [0u8; 32];
                result.copy_from_slice(&req[8..]);
                let (round, result) = (u64::from_le_bytes(round), Hash(result));
                let slot = slots.acquire_owned().await.map_err(io::Error::other)?;
                let found = tokio::task::spawn_blocking(move || source.record(round, &result))
                    .await
                    .map_err(io::Error::other)??
                    .filter(|b| b.len() <= MAX_MESSAGE_BYTES)
                    .unwrap_or_default();
                drop(slot);
                let len = u32::try_from(found.len()).map_err(io::Error::other)?;
                stream.write_all(&len.to_le_bytes()).await?;
                stream.write_all(&found).await?;
                stream.close().await
            })
            .await;
            if let Err(e) = answer {
                tracing::debug!(%peer, error = %e, "record request failed");
            }
            let mut counts = per_peer.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(n) = counts.get_mut(&peer) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    counts.remove(&peer);
                }
            }
        });
    }
}

/// Asks for the committed record of round `round` with result `result` on `stream`: the
/// bytes the peer sent (at most [`MAX_MESSAGE_BYTES`]), or `None` when it holds none.
pub async fn request(
    stream: &mut Stream,
    round: u64,
    result: &Hash,
) -> io::Result<Option<Vec<u8>>> {
    within(EXCHANGE_TIMEOUT, "a record request", async {
        stream.write_all(&encode_request(round, result)).await?;
        stream.flush().await?;
        let mut len = [0u8; 4];
        stream.read_exact(&mut len).await?;
        let len = u32::from_le_bytes(len) as usize;
        if len == 0 {
            return Ok(None);
        }
        if len > MAX_MESSAGE_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a record of {len} bytes, more than {MAX_MESSAGE_BYTES}"),
            ));
        }
        let mut bytes = vec![0u8; len];
        stream.read_exact(&mut bytes).await?;
        Ok(Some(bytes))
    })
    .await
}

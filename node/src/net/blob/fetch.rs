//! The fetching side of the blob protocol: ask peers in turn, wait out busy ones, stream
//! the range into a verifying [`BlobWriter`], penalise a peer whose bytes are wrong.

use std::collections::BTreeMap;
use std::io;

use futures::{AsyncReadExt, AsyncWriteExt};
use hivemind_store::{BlobWriter, Store};
use libp2p::{PeerId, Stream};

use super::*;
use crate::net::Client;

/// Why one peer could not deliver a blob.
#[derive(Debug)]
pub(super) enum PeerFailure {
    /// Not found, unreachable, or the stream broke: try the next peer, no penalty.
    Unavailable(String),
    /// It holds the blob but serves as many streams as it will: try again later.
    Busy,
    /// It served bytes that do not hash to the name.
    Lied(String),
    /// Our own store failed: stop.
    Local(String),
}

/// Blob transfers in progress, by blob hash and sending peer, for whoever shows them
/// (`status.json`, the dashboard): how many bytes of how many, since when. A blob fetched
/// from several holders at once has one entry per holder.
#[derive(Clone, Debug, Default)]
pub struct Transfers(std::sync::Arc<std::sync::Mutex<BTreeMap<(Hash, PeerId), Transfer>>>);

/// One transfer in progress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transfer {
    /// The peer sending it.
    pub peer: PeerId,
    /// Bytes received so far.
    pub bytes: u64,
    /// Bytes in all (of the blob).
    pub total: u64,
    /// When the first byte was asked for.
    pub started: std::time::Instant,
}

impl Transfers {
    /// The transfers in progress now.
    pub fn snapshot(&self) -> Vec<(Hash, Transfer)> {
        self.0
            .lock()
            .map(|m| m.iter().map(|((h, _), t)| (*h, t.clone())).collect())
            .unwrap_or_default()
    }

    /// Whether `hash` is coming from `peer` now (in another fetch).
    fn under_way(&self, hash: Hash, peer: PeerId) -> bool {
        self.0.lock().is_ok_and(|m| m.contains_key(&(hash, peer)))
    }

    fn update(&self, f: impl FnOnce(&mut BTreeMap<(Hash, PeerId), Transfer>)) {
        if let Ok(mut m) = self.0.lock() {
            f(&mut m);
        }
    }
}

/// Removes its transfer from [`Transfers`] when the transfer ends, however it ends.
pub(super) struct Tracked<'a> {
    transfers: &'a Transfers,
    key: (Hash, PeerId),
}

impl<'a> Tracked<'a> {
    /// Registers a transfer of `hash` from `peer`, unless [`MAX_TRANSFERS_PER_PEER`] from it
    /// are under way already.
    pub(super) fn start(transfers: &'a Transfers, hash: Hash, peer: PeerId) -> Option<Self> {
        let mut started = false;
        transfers.update(|m| {
            let from_peer = m.keys().filter(|(_, p)| *p == peer).count();
            if from_peer < MAX_TRANSFERS_PER_PEER && !m.contains_key(&(hash, peer)) {
                let t = Transfer {
                    peer,
                    bytes: 0,
                    total: 0,
                    started: std::time::Instant::now(),
                };
                m.insert((hash, peer), t);
                started = true;
            }
        });
        started.then_some(Tracked {
            transfers,
            key: (hash, peer),
        })
    }

    pub(super) fn set_total(&self, total: u64) {
        let key = self.key;
        self.transfers.update(|m| {
            if let Some(t) = m.get_mut(&key) {
                t.total = total;
            }
        });
    }

    /// Adds `bytes` to what arrived.
    pub(super) fn add(&self, bytes: u64) {
        let key = self.key;
        self.transfers.update(|m| {
            if let Some(t) = m.get_mut(&key) {
                t.bytes = t.bytes.saturating_add(bytes);
            }
        });
    }

    fn progress(&self, bytes: u64) {
        let key = self.key;
        self.transfers.update(|m| {
            if let Some(t) = m.get_mut(&key) {
                t.bytes = bytes;
            }
        });
    }
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        let key = self.key;
        self.transfers.update(|m| {
            m.remove(&key);
        });
    }
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
    fetch_blob_tracked(client, store, hash, peers, max_len, &Transfers::default()).await
}

/// [`fetch_blob`], showing the transfer's progress in `transfers` while it runs.
pub async fn fetch_blob_tracked(
    client: &Client,
    store: &Store,
    hash: Hash,
    peers: &[PeerId],
    max_len: u64,
    transfers: &Transfers,
) -> Option<PeerId> {
    match fetch_blob_fair(client, store, hash, peers, max_len, transfers).await {
        Fetched::From(peer) => Some(peer),
        Fetched::Failed | Fetched::Deferred => None,
    }
}

/// How [`fetch_blob_fair`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fetched {
    /// Stored, from this peer (this node's own id when it was stored already).
    From(PeerId),
    /// No peer delivered.
    Failed,
    /// No peer delivered, and some were not asked: this node already receives its share
    /// of transfers from them ([`MAX_TRANSFERS_PER_PEER`]). Not their fault; ask later.
    Deferred,
}

/// [`fetch_blob_tracked`], saying when peers were left unasked for their share of
/// `transfers` being in use (the caller holds no slot while it waits for them).
pub async fn fetch_blob_fair(
    client: &Client,
    store: &Store,
    hash: Hash,
    peers: &[PeerId],
    max_len: u64,
    transfers: &Transfers,
) -> Fetched {
    if matches!(store.has_blob(&hash), Ok(true)) {
        return Fetched::From(client.local_peer_id());
    }
    let max_len = max_len.min(MAX_BLOB_BYTES);
    let mut ask = peers.to_vec();
    for pass in 0..BUSY_PASSES {
        if pass > 0 {
            let wait = BUSY_BACKOFF * 2u32.pow(pass - 1);
            tracing::debug!(hash = %hash.short(), busy = ask.len(), ?wait, "every peer busy; waiting");
            tokio::time::sleep(wait).await;
        }
        match fetch_pass(client, store, hash, &ask, max_len, transfers).await {
            Pass::Done(peer) => return Fetched::From(peer),
            Pass::Failed => return Fetched::Failed,
            Pass::Deferred => return Fetched::Deferred,
            Pass::Busy(busy) => ask = busy,
        }
    }
    Fetched::Failed
}

/// Named peers [`fetch_blob_side_by_side`] asks at once.
pub const SIDE_BY_SIDE: usize = 8;

/// Fetches `hash` from the `named` peers side by side (at most [`SIDE_BY_SIDE`] at a time,
/// each as [`fetch_blob_fair`] with that peer alone), so that slow peers asked first do not
/// hold back the others; then, if none delivered, from `others` one after another. `Deferred`
/// only when a named peer was left unasked for its share of our transfers and nobody
/// delivered: a peer of `others` at its share is no named peer's doing.
pub async fn fetch_blob_side_by_side(
    client: &Client,
    store: &Store,
    hash: Hash,
    (named, others): (Vec<PeerId>, &[PeerId]),
    max_len: u64,
    transfers: &Transfers,
) -> Fetched {
    let mut asking = tokio::task::JoinSet::new();
    let mut named = named.into_iter();
    let mut deferred = false;
    loop {
        while asking.len() < SIDE_BY_SIDE {
            let Some(peer) = named.next() else { break };
            let (c, st, tr) = (client.clone(), store.clone(), transfers.clone());
            asking
                .spawn(async move { fetch_blob_fair(&c, &st, hash, &[peer], max_len, &tr).await });
        }
        // (Returning drops the set, which stops the fetches still running.)
        match asking.join_next().await {
            None => break,
            Some(Ok(Fetched::From(peer))) => return Fetched::From(peer),
            Some(Ok(Fetched::Deferred)) => deferred = true,
            Some(_) => {}
        }
    }
    match fetch_blob_fair(client, store, hash, others, max_len, transfers).await {
        Fetched::From(peer) => Fetched::From(peer),
        _ if deferred => Fetched::Deferred,
        _ => Fetched::Failed,
    }
}

/// The first wait after a pass in which every peer that holds the blob was busy; doubled
/// after each further such pass.
const BUSY_BACKOFF: Duration = Duration::from_millis(250);

enum Pass {
    Done(PeerId),
    /// No peer delivered and none was busy (or our store failed).
    Failed,
    /// No peer delivered; these were busy.
    Busy(Vec<PeerId>),
    /// No peer delivered, none was busy, and some were left unasked for their share.
    Deferred,
}

async fn fetch_pass(
    client: &Client,
    store: &Store,
    hash: Hash,
    peers: &[PeerId],
    max_len: u64,
    transfers: &Transfers,
) -> Pass {
    let mut busy = Vec::new();
    // Peers we already receive our share of transfers from are not asked now.
    let mut capped = false;
    for peer in peers {
        let Some(tracked) = Tracked::start(transfers, hash, *peer) else {
            // At its share, unless it is another fetch of ours that is asking it for this
            // blob now: then it is asked (a `Deferred` would say a source was left unasked).
            capped |= !transfers.under_way(hash, *peer);
            continue;
        };
        let r = fetch_from(client, store, hash, *peer, max_len, tracked).await;
        if let Some(done) = settle(client, hash, *peer, r, &mut busy).await {
            return done;
        }
    }
    match (busy.is_empty(), capped) {
        (false, _) => Pass::Busy(busy),
        (true, true) => Pass::Deferred,
        (true, false) => Pass::Failed,
    }
}

/// What one peer's attempt means for the pass: `Some` ends it (delivered, or our store
/// failed); a busy peer is noted for the next pass; a liar is penalised.
async fn settle(
    client: &Client,
    hash: Hash,
    peer: PeerId,
    result: Result<(), PeerFailure>,
    busy: &mut Vec<PeerId>,
) -> Option<Pass> {
    match result {
        Ok(()) => return Some(Pass::Done(peer)),
        Err(PeerFailure::Busy) => busy.push(peer),
        Err(PeerFailure::Unavailable(why)) => {
            tracing::debug!(%peer, hash = %hash.short(), %why, "blob fetch failed; trying the next peer")
        }
        Err(PeerFailure::Lied(why)) => penalise_liar(client, peer, hash, &why).await,
        Err(PeerFailure::Local(why)) => {
            tracing::error!(hash = %hash.short(), %why, "store failure while fetching");
            return Some(Pass::Failed);
        }
    }
    None
}

/// Penalises `peer` for serving bytes of blob `hash` that failed verification (`why`).
pub(super) async fn penalise_liar(client: &Client, peer: PeerId, hash: Hash, why: &str) {
    tracing::warn!(%peer, hash = %hash.short(), %why, "peer served a bad blob; penalising");
    client
        .penalise(peer, format!("bad blob {}: {why}", hash.short()))
        .await;
}

async fn fetch_from(
    client: &Client,
    store: &Store,
    hash: Hash,
    peer: PeerId,
    max_len: u64,
    tracked: Tracked<'_>,
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
    tracked.set_total(total);
    // The whole range within the request's time plus its length at the minimum rate.
    let limit = REQUEST_TIMEOUT + Duration::from_secs(total / MIN_FETCH_RATE);
    let result = match tokio::time::timeout(
        limit,
        receive_range(&mut stream, writer, total, &tracked),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(PeerFailure::Unavailable(format!(
            "slower than {MIN_FETCH_RATE} B/s: {total} bytes not in within {limit:?}"
        ))),
    };
    drop(tracked);
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
    tracked: &Tracked<'_>,
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
            tracked.progress(got);
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

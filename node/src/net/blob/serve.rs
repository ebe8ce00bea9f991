//! The serving side of the blob protocol: inbound streams, fair slots, ranges read from
//! the store on a blocking thread and sent in reused frames.

use std::collections::HashMap;
use std::io::{self, Read};
use std::sync::{Arc, Mutex, PoisonError};

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::{PeerId, Stream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::*;
/// How much serving one peer may take.
#[derive(Clone, Copy, Debug)]
pub struct ServeLimits {
    /// Requests served at once (a quarter of them, at least one, for one peer); more are
    /// answered "busy".
    pub streams: usize,
    /// The slowest a peer may read, in bytes per second: a stream is dropped once it has
    /// taken [`REQUEST_TIMEOUT`] plus its length at this rate.
    pub min_rate: u64,
}

/// Blob bytes this node has served, by blob, since it started (shown in status.json: how
/// much a relay or bootstrap node uploads for others).
#[derive(Clone, Debug, Default)]
pub struct Served(Arc<Mutex<std::collections::BTreeMap<Hash, u64>>>);

impl Served {
    fn add(&self, hash: Hash, bytes: u64) {
        let mut m = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let n = m.entry(hash).or_insert(0);
        *n = n.saturating_add(bytes);
    }

    /// Bytes served so far, by blob.
    pub fn snapshot(&self) -> std::collections::BTreeMap<Hash, u64> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Accepts inbound blob streams until `cancel` fires and answers each on its own task,
/// within `limits`, counting what it sends in `served`. Streams from peers `refuse` names are
/// dropped unanswered.
pub async fn serve_incoming(
    mut incoming: libp2p_stream::IncomingStreams,
    source: SharedSource,
    limits: ServeLimits,
    refuse: impl Fn(&PeerId) -> bool + Send + 'static,
    served: Served,
    cancel: CancellationToken,
) {
    let slots = Slots::new(limits.streams);
    let trees = Trees::default();
    let min_rate = limits.min_rate.max(1);
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
        let (source, slots, served) = (source.clone(), slots.clone(), served.clone());
        let trees = trees.clone();
        streams.spawn(async move {
            let served = (&served, &trees);
            match serve_stream(&mut stream, peer, source, &slots, served, min_rate).await {
                Ok(sent) => tracing::trace!(%peer, sent, "blob stream served"),
                Err(e) => tracing::debug!(%peer, error = %e, "blob stream failed"),
            }
        });
    }
    // Streams being served stop with the node: they are dropped (reset) and joined.
    streams.abort_all();
    while streams.join_next().await.is_some() {}
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
    (served, trees): (&Served, &Trees),
    min_rate: u64,
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
    if req.offset == TREE_OFFSET {
        return serve_tree(stream, req.hash, source, trees).await;
    }
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
    // The whole answer at the slowest acceptable rate: a slow reader gives its slot back.
    let len = req.answer_len(total_len);
    let limit = REQUEST_TIMEOUT + std::time::Duration::from_secs(len / min_rate);
    within(limit, "sending at the minimum rate", async {
        let sent = send_range(blob.reader, len, stream).await?;
        served.add(req.hash, sent);
        timed("closing", stream.close()).await?;
        Ok(sent)
    })
    .await
}

/// Chunk trees this server computed lately, by blob (a blob's tree never changes), oldest
/// first out; and the right to compute one, which one request holds at a time.
#[derive(Clone, Default)]
struct Trees {
    kept: Arc<Mutex<Kept>>,
    computing: Arc<tokio::sync::Mutex<()>>,
}

/// A blob's length and its chunk values as sent.
type Tree = (u64, Arc<Vec<u8>>);
/// Kept trees, and their hashes oldest first.
type Kept = (HashMap<Hash, Tree>, std::collections::VecDeque<Hash>);

/// Trees kept.
const TREES_KEPT: usize = 64;
/// How long a tree request waits for another one's computation before it is answered busy.
const TREE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl Trees {
    fn get(&self, hash: &Hash) -> Option<Tree> {
        let kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        kept.0.get(hash).cloned()
    }

    fn put(&self, hash: Hash, tree: Tree) {
        let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        let (map, order) = &mut *kept;
        if map.insert(hash, tree).is_none() {
            order.push_back(hash);
        }
        while order.len() > TREES_KEPT {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
    }
}

/// Answers a tree request: the blob's length and its chunk values. Computing one reads and
/// hashes the whole blob, so one request computes at a time (others for the same blob then
/// find it kept) and a request that waits longer than [`TREE_WAIT`] is answered busy: a
/// peer asking for many trees costs this node one blocking thread, not all of them.
async fn serve_tree(
    stream: &mut Stream,
    hash: Hash,
    source: SharedSource,
    trees: &Trees,
) -> io::Result<u64> {
    let tree = match trees.get(&hash) {
        Some(t) => Some(t),
        None => {
            let Ok(_computing) = tokio::time::timeout(TREE_WAIT, trees.computing.lock()).await
            else {
                return answer_only(stream, BlobHeader::Busy).await;
            };
            match trees.get(&hash) {
                Some(t) => Some(t),
                None => {
                    let got = tokio::task::spawn_blocking(move || source.tree(&hash))
                        .await
                        .map_err(join_error)?
                        .unwrap_or_else(|e| {
                            tracing::warn!(hash = %hash.short(), error = %e, "cannot read a blob's tree");
                            None
                        });
                    got.map(|(len, values)| {
                        let t = (len, Arc::new(values.concat()));
                        // A blob of one chunk has no values; nothing was hashed to keep.
                        if !t.1.is_empty() {
                            trees.put(hash, t.clone());
                        }
                        t
                    })
                }
            }
        }
    };
    let Some((total_len, raw)) = tree else {
        return answer_only(stream, BlobHeader::NotFound).await;
    };
    timed(
        "writing",
        stream.write_all(&encode_header(BlobHeader::Found { total_len })),
    )
    .await?;
    timed("writing", stream.write_all(&raw)).await?;
    timed("closing", stream.close()).await?;
    Ok(0)
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

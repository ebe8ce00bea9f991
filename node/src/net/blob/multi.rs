//! Fetching one blob from several peers at once, in verified chunks.
//!
//! ```text
//!   chunk tree ◀── one holder (TREE_OFFSET request) ── merges to the blob's hash? no: penalise
//!   last chunk ◀── the same holder ── hashes to its value? (this fixes the length) no: penalise
//!   workers, one per holder (each taking one of that holder's transfer slots), up to
//!   MAX_SOURCES at once:
//!       take the next run of chunks (1, doubling to 8) ─▶ request its range ─▶ each chunk
//!       hashes to its value? ─▶ write it at its offset (in once written)
//!       a bad chunk: penalise, give the rest back, drop the holder (one chunk per attempt)
//!       gone: give the rest back, the next holder takes the worker's place
//!       busy: ask again later (8 times, ~30 s); only busy holders left: Deferred
//!   endgame: nothing left to hand out ─▶ an idle worker also asks for a chunk one other
//!       worker is still receiving, so a slow holder's last chunks go to fast ones
//!   all chunks in ─▶ BlobWriter::finish checks the whole blake3 again and stores it
//! ```
//!
//! Memory: a 1 MiB buffer per worker, the last chunk and the tree (32 bytes per MiB), about
//! 5 MiB per fetch.
//!
//! A blob of one chunk, a peer list of one, or holders that do not answer tree requests
//! (nodes from before the tree) fall back to [`fetch_blob_fair`]: one holder at a time.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use blake3::hazmat::ChainingValue;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::{AsyncReadExt, AsyncWriteExt};
use hivemind_store::{BlobWriter, Store};
use libp2p::{PeerId, Stream};

use super::fetch::{fetch_blob_fair, penalise_liar, Fetched, PeerFailure, Tracked, Transfers};
use super::tree::{self, CHUNK_BYTES};
use super::*;
use crate::net::Client;

/// Holders a blob is fetched from at once.
pub const MAX_SOURCES: usize = 4;
/// Peers asked for the chunk tree before the fetch falls back to one holder at a time.
const TREE_TRIES: usize = 4;
/// Finding a tree (and its last chunk) may take this long in all, or the fetch falls back.
const TREE_DEADLINE: Duration = Duration::from_secs(30);
/// Most chunks one request asks for. A holder's requests grow from one chunk, doubling
/// after each that arrived whole, so a slow holder holds few chunks at a time and a fast
/// one pays for few streams.
const MAX_RUN: usize = 8;
/// Busy answers a worker waits out (250 ms doubling to 4 s between them, about 30 s in all,
/// as a fetch from one holder does) before its holder counts as busy for this fetch.
const BUSY_TRIES: u32 = 8;

/// Fetches blob `hash` from up to [`MAX_SOURCES`] of `peers` at once in verified chunks
/// (see the module docs), or from one at a time when that is not possible; stores it once
/// its whole blake3 matches. Returns as [`fetch_blob_fair`] does.
pub async fn fetch_blob_multi(
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
    if peers.len() < 2 || max_len < 2 * CHUNK_BYTES {
        return fetch_blob_fair(client, store, hash, peers, max_len, transfers).await;
    }
    let mut liars = Vec::new();
    let found = tokio::time::timeout(
        TREE_DEADLINE,
        find_tree(client, hash, peers, max_len, &mut liars),
    )
    .await
    .ok()
    .flatten();
    let Some(found) = found else {
        let rest: Vec<PeerId> = peers
            .iter()
            .filter(|p| !liars.contains(p))
            .copied()
            .collect();
        return fetch_blob_fair(client, store, hash, &rest, max_len, transfers).await;
    };
    let total = found.total;
    let st = store.clone();
    let writer = match tokio::task::spawn_blocking(move || st.blob_writer(hash, total)).await {
        Ok(Ok(w)) => w,
        Ok(Err(e)) => {
            tracing::error!(hash = %hash.short(), error = %e, "store failure while fetching");
            return Fetched::Failed;
        }
        Err(e) => {
            tracing::error!(hash = %hash.short(), error = %e, "store task failed");
            return Fetched::Failed;
        }
    };
    let fetch = Fetch {
        client,
        hash,
        total,
        values: found.values,
        chunks: Mutex::new(Chunks::new(chunk_count(total))),
        writer: Arc::new(Mutex::new(Some(writer))),
        transfers,
    };
    // The last chunk came with the tree.
    let last = chunk_count(total) - 1;
    let taken = fetch.lock().take(last);
    if let Some(i) = taken {
        let mut chunk = found.last_chunk;
        let len = chunk.len();
        if fetch.store_chunk(i, &mut chunk, len).await.is_err() {
            return Fetched::Failed;
        }
    }
    let mut others: VecDeque<PeerId> = peers.iter().copied().collect();
    others.retain(|p| *p != found.peer && !liars.contains(p));
    others.push_front(found.peer);
    match fetch.run(others).await {
        Outcome::Done => {}
        Outcome::Failed => return Fetched::Failed,
        // Not the holders' fault: they were busy, or we receive our share from them already.
        Outcome::Busy => return Fetched::Deferred,
    }
    let writer = fetch
        .writer
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    let Some(writer) = writer else {
        return Fetched::Failed;
    };
    match tokio::task::spawn_blocking(move || writer.finish()).await {
        Ok(Ok(_)) => Fetched::From(found.peer),
        Ok(Err(e)) => {
            // Every chunk matched a tree that merged to the hash: only our disk can fail here.
            tracing::error!(hash = %hash.short(), error = %e, "cannot store a fetched blob");
            Fetched::Failed
        }
        Err(e) => {
            tracing::error!(hash = %hash.short(), error = %e, "store task failed");
            Fetched::Failed
        }
    }
}

fn chunk_count(total: u64) -> usize {
    usize::try_from(tree::chunk_count(total)).unwrap_or(usize::MAX)
}

/// A chunk tree that merged to the blob's hash, and the last chunk that fixes its length.
struct FoundTree {
    peer: PeerId,
    total: u64,
    values: Vec<ChainingValue>,
    last_chunk: Vec<u8>,
}

/// Asks up to [`TREE_TRIES`] peers for the chunk tree. A tree that does not merge to the
/// hash, or whose last chunk does not match it, costs its peer a penalty and its place in
/// this fetch (`liars`).
async fn find_tree(
    client: &Client,
    hash: Hash,
    peers: &[PeerId],
    max_len: u64,
    liars: &mut Vec<PeerId>,
) -> Option<FoundTree> {
    for peer in peers.iter().take(TREE_TRIES) {
        match request_tree(client, hash, *peer, max_len).await {
            Ok(Tree::Found(found)) => return Some(found),
            // A blob of one chunk: nothing to share out.
            Ok(Tree::Small) => return None,
            // Not held, busy, or a server from before trees.
            Ok(Tree::None) => {}
            Err(PeerFailure::Lied(why)) => {
                penalise_liar(client, *peer, hash, &why).await;
                liars.push(*peer);
            }
            Err(e) => tracing::debug!(%peer, hash = %hash.short(), error = ?e, "no chunk tree"),
        }
    }
    None
}

/// A peer's answer to a tree request.
enum Tree {
    Found(FoundTree),
    /// The blob is one chunk long (or longer than allowed).
    Small,
    None,
}

async fn request_tree(
    client: &Client,
    hash: Hash,
    peer: PeerId,
    max_len: u64,
) -> Result<Tree, PeerFailure> {
    let req = BlobRequest {
        hash,
        offset: TREE_OFFSET,
        len: 0,
    };
    let (mut stream, header) = request_blob(client, peer, req)
        .await
        .map_err(|e| PeerFailure::Unavailable(e.to_string()))?;
    let total = match header {
        BlobHeader::Found { total_len } => total_len,
        BlobHeader::NotFound | BlobHeader::Busy => return Ok(Tree::None),
    };
    let n = tree::chunk_count(total);
    if total > max_len || n < 2 {
        let _ = timed("closing", stream.close()).await;
        return Ok(Tree::Small);
    }
    // n <= MAX_BLOB_BYTES / CHUNK_BYTES (4096): 128 KiB at most.
    let mut raw = vec![0u8; chunk_count(total) * 32];
    timed("reading the chunk tree", stream.read_exact(&mut raw))
        .await
        .map_err(|e| PeerFailure::Unavailable(e.to_string()))?;
    let _ = timed("closing", stream.close()).await;
    let values: Vec<ChainingValue> = raw
        .chunks_exact(32)
        .map(|c| {
            let mut v = [0u8; 32];
            v.copy_from_slice(c);
            v
        })
        .collect();
    if !tree::verify(&hash, total, &values) {
        return Err(PeerFailure::Lied(
            "its chunk tree does not hash to the blob".into(),
        ));
    }
    let last = n - 1;
    let last_chunk = fetch_chunk(client, hash, peer, total, last, &values[values.len() - 1])
        .await
        .map_err(|e| match e {
            // A tree that merges to the hash with a last chunk that does not match: the
            // length it gave was wrong.
            PeerFailure::Lied(why) => PeerFailure::Lied(format!("{why} (its tree's length)")),
            other => other,
        })?;
    Ok(Tree::Found(FoundTree {
        peer,
        total,
        values,
        last_chunk,
    }))
}

/// Asks `peer` for bytes `offset..offset + len` of blob `hash` (`total` bytes) and reads
/// the answer's header; the bytes follow on the returned stream.
async fn open_range(
    client: &Client,
    hash: Hash,
    peer: PeerId,
    total: u64,
    offset: u64,
    len: u64,
) -> Result<Stream, PeerFailure> {
    let req = BlobRequest { hash, offset, len };
    let (mut stream, header) = match request_blob(client, peer, req).await {
        Ok(answer) => answer,
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Err(PeerFailure::Busy),
        Err(e) => return Err(PeerFailure::Unavailable(e.to_string())),
    };
    match header {
        BlobHeader::NotFound => Err(PeerFailure::Unavailable("not found".into())),
        BlobHeader::Busy => Err(PeerFailure::Busy),
        BlobHeader::Found { total_len } if total_len != total => {
            let _ = timed("closing", stream.close()).await;
            Err(PeerFailure::Lied(format!(
                "it says the blob has {total_len} bytes; its checked tree says {total}"
            )))
        }
        BlobHeader::Found { .. } => Ok(stream),
    }
}

/// Fetches chunk `index` of blob `hash` (`total` bytes) from `peer` and checks it against
/// `value`.
async fn fetch_chunk(
    client: &Client,
    hash: Hash,
    peer: PeerId,
    total: u64,
    index: u64,
    value: &ChainingValue,
) -> Result<Vec<u8>, PeerFailure> {
    let len = tree::chunk_len(index, total);
    let mut stream = open_range(client, hash, peer, total, index * CHUNK_BYTES, len).await?;
    let mut buf = vec![0u8; len as usize];
    let limit = REQUEST_TIMEOUT + Duration::from_secs(len / MIN_FETCH_RATE);
    within(limit, "receiving a chunk", stream.read_exact(&mut buf))
        .await
        .map_err(|e| PeerFailure::Unavailable(format!("chunk {index}: {e}")))?;
    let _ = timed("closing", stream.close()).await;
    if tree::chunk_value(index, &buf) != *value {
        return Err(PeerFailure::Lied(format!(
            "chunk {index} does not match the blob's tree"
        )));
    }
    Ok(buf)
}

/// Which chunks are in, which are being written, and how many workers are receiving each.
/// Every chunk a worker is handed ([`Chunks::take`], [`Chunks::next_run`]) comes back once:
/// through [`Chunks::written`], [`Chunks::skip`] or [`Chunks::give_back`].
struct Chunks {
    todo: VecDeque<usize>,
    working: Vec<u8>,
    writing: Vec<bool>,
    done: Vec<bool>,
    left: usize,
}

impl Chunks {
    fn new(n: usize) -> Self {
        Chunks {
            todo: (0..n).collect(),
            working: vec![0; n],
            writing: vec![false; n],
            done: vec![false; n],
            left: n,
        }
    }

    /// Hands out chunk `i` if it is still to do.
    fn take(&mut self, i: usize) -> Option<usize> {
        let pos = self.todo.iter().position(|c| *c == i)?;
        self.todo.remove(pos);
        self.working[i] += 1;
        Some(i)
    }

    /// A chunk only one worker is receiving and nobody has written or is writing: what an
    /// idle worker may also ask for (the endgame).
    fn shareable(&self) -> Option<usize> {
        (0..self.done.len()).find(|&i| !self.done[i] && !self.writing[i] && self.working[i] == 1)
    }

    /// Whether [`Chunks::next_run`] would hand out anything.
    fn has_work(&self) -> bool {
        !self.todo.is_empty() || self.shareable().is_some()
    }

    /// Up to `max` chunks to ask for in one request: consecutive ones nobody has, or else
    /// (the endgame) one [`Chunks::shareable`] chunk. Empty: none.
    fn next_run(&mut self, max: usize) -> Vec<usize> {
        let run = match self.todo.pop_front() {
            Some(first) => {
                let mut run = vec![first];
                while run.len() < max && self.todo.front() == Some(&(first + run.len())) {
                    run.extend(self.todo.pop_front());
                }
                run
            }
            None => self.shareable().into_iter().collect(),
        };
        for i in &run {
            self.working[*i] += 1;
        }
        run
    }

    /// A worker could not deliver chunk `i`, or stopped before it.
    fn give_back(&mut self, i: usize) {
        self.working[i] = self.working[i].saturating_sub(1);
        self.writing[i] = false;
        if !self.done[i] && self.working[i] == 0 {
            self.todo.push_front(i);
        }
    }

    /// A worker received chunk `i` and may write it: false when another copy is in or
    /// being written (then this worker is done with it).
    fn claim(&mut self, i: usize) -> bool {
        if self.done[i] || self.writing[i] {
            self.skip(i);
            return false;
        }
        self.writing[i] = true;
        true
    }

    /// A worker is done with chunk `i` without writing it.
    fn skip(&mut self, i: usize) {
        self.working[i] = self.working[i].saturating_sub(1);
    }

    /// Chunk `i` is written.
    fn written(&mut self, i: usize) {
        self.working[i] = self.working[i].saturating_sub(1);
        self.writing[i] = false;
        if !self.done[i] {
            self.done[i] = true;
            self.left -= 1;
        }
    }
}

/// How a worker's holder ended.
enum Ended {
    /// Nothing left to hand out; it may serve again if chunks come back.
    Idle,
    /// Unavailable or a liar: not asked again in this fetch.
    Dropped,
    /// Busy every time it was asked, or we already receive our share of transfers from it.
    Busy,
    /// Our own store failed: the fetch stops.
    Local,
}

/// How [`Fetch::run`] ended.
enum Outcome {
    /// Every chunk is written.
    Done,
    /// The holders ran out, or our store failed.
    Failed,
    /// The holders ran out, and some only because they were busy or at their share.
    Busy,
}

struct Fetch<'a> {
    client: &'a Client,
    hash: Hash,
    total: u64,
    values: Vec<ChainingValue>,
    chunks: Mutex<Chunks>,
    writer: Arc<Mutex<Option<BlobWriter>>>,
    transfers: &'a Transfers,
}

impl Fetch<'_> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Chunks> {
        self.chunks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs workers on `holders` (in order, up to [`MAX_SOURCES`] at once) until every
    /// chunk is written or the holders run out.
    async fn run(&self, mut holders: VecDeque<PeerId>) -> Outcome {
        let mut idle: Vec<PeerId> = Vec::new();
        let mut busy = false;
        let mut workers = FuturesUnordered::new();
        loop {
            let (left, work) = {
                let c = self.lock();
                (c.left, c.has_work())
            };
            if left == 0 {
                return Outcome::Done;
            }
            // Idle holders come back when there is something to ask for.
            if work {
                holders.extend(idle.drain(..));
            }
            while workers.len() < MAX_SOURCES {
                let Some(peer) = holders.pop_front() else {
                    break;
                };
                workers.push(async move { (peer, self.worker(peer).await) });
            }
            let Some((peer, ended)) = workers.next().await else {
                return if busy { Outcome::Busy } else { Outcome::Failed };
            };
            match ended {
                Ended::Idle => idle.push(peer),
                Ended::Dropped => {}
                Ended::Busy => busy = true,
                Ended::Local => return Outcome::Failed,
            }
        }
    }

    async fn worker(&self, peer: PeerId) -> Ended {
        // At most MAX_TRANSFERS_PER_PEER transfers from one peer, whatever fetch they serve.
        let Some(tracked) = Tracked::start(self.transfers, self.hash, peer) else {
            return Ended::Busy;
        };
        tracked.set_total(self.total);
        let mut busy = 0u32;
        let mut run_len = 1;
        let mut buf = vec![0u8; CHUNK_BYTES as usize];
        loop {
            let run = self.lock().next_run(run_len);
            if run.is_empty() {
                return Ended::Idle;
            }
            let (arrived, result) = self.fetch_run(peer, &run, &mut buf, &tracked).await;
            {
                // In reverse, so the queue's front stays in order for the next run.
                let mut chunks = self.lock();
                for i in run[arrived..].iter().rev() {
                    chunks.give_back(*i);
                }
            }
            match result {
                Ok(()) => {
                    busy = 0;
                    run_len = (run_len * 2).min(MAX_RUN);
                }
                Err(PeerFailure::Busy) => {
                    busy += 1;
                    if busy > BUSY_TRIES {
                        return Ended::Busy;
                    }
                    tokio::time::sleep(Duration::from_millis(250 << (busy - 1).min(4))).await;
                }
                Err(PeerFailure::Lied(why)) => {
                    penalise_liar(self.client, peer, self.hash, &why).await;
                    return Ended::Dropped;
                }
                Err(PeerFailure::Unavailable(why)) => {
                    tracing::debug!(%peer, hash = %self.hash.short(), %why, "holder dropped from this fetch");
                    return Ended::Dropped;
                }
                Err(PeerFailure::Local(_)) => return Ended::Local,
            }
        }
    }

    /// Asks `peer` for the consecutive chunks `run` in one request and stores each as it
    /// arrives and matches its value. Returns how many of them this worker is done with
    /// (the rest go back to the queue), and what stopped it early. It stops early, closing
    /// the stream, once everything left of its run is in from others.
    async fn fetch_run(
        &self,
        peer: PeerId,
        run: &[usize],
        buf: &mut Vec<u8>,
        tracked: &Tracked<'_>,
    ) -> (usize, Result<(), PeerFailure>) {
        let (Some(first), Some(last)) = (run.first(), run.last()) else {
            return (0, Ok(()));
        };
        let offset = *first as u64 * CHUNK_BYTES;
        let end = ((*last as u64 + 1) * CHUNK_BYTES).min(self.total);
        let len = end.saturating_sub(offset);
        let opened = open_range(self.client, self.hash, peer, self.total, offset, len).await;
        let mut stream = match opened {
            Ok(s) => s,
            Err(e) => return (0, Err(e)),
        };
        // The whole run within the request's time plus its length at the minimum rate.
        let limit = REQUEST_TIMEOUT + Duration::from_secs(len / MIN_FETCH_RATE);
        let deadline = tokio::time::Instant::now() + limit;
        let mut handled = run.len();
        for (k, &i) in run.iter().enumerate() {
            let rest_in = {
                let chunks = self.lock();
                run[k..].iter().all(|c| chunks.done[*c])
            };
            if rest_in {
                handled = k;
                break;
            }
            let l = tree::chunk_len(i as u64, self.total) as usize;
            let read = tokio::time::timeout_at(deadline, stream.read_exact(&mut buf[..l])).await;
            match read {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    let why = format!("chunk {i}: {e}");
                    return (k, Err(PeerFailure::Unavailable(why)));
                }
                Err(_) => {
                    let why = format!("chunk {i}: slower than {MIN_FETCH_RATE} B/s");
                    return (k, Err(PeerFailure::Unavailable(why)));
                }
            }
            if tree::chunk_value(i as u64, &buf[..l]) != self.values[i] {
                let why = format!("chunk {i} does not match the blob's tree");
                return (k, Err(PeerFailure::Lied(why)));
            }
            tracked.add(l as u64);
            if self.store_chunk(i, buf, l).await.is_err() {
                return (k, Err(PeerFailure::Local("store failure".into())));
            }
        }
        let _ = timed("closing", stream.close()).await;
        (handled, Ok(()))
    }

    /// Writes the first `len` bytes of `buf` as chunk `i` unless another worker's copy is
    /// in or being written (`buf` goes to a blocking thread and comes back). A chunk counts
    /// as in only once written: [`Fetch::run`] ends when none is left, and the writer is
    /// finished then.
    async fn store_chunk(&self, i: usize, buf: &mut Vec<u8>, len: usize) -> Result<(), ()> {
        if !self.lock().claim(i) {
            return Ok(());
        }
        let writer = self.writer.clone();
        let offset = i as u64 * CHUNK_BYTES;
        let data = std::mem::take(buf);
        let joined = tokio::task::spawn_blocking(move || {
            let wrote = match writer
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_mut()
            {
                Some(w) => w.write_at(offset, &data[..len]).map_err(|e| e.to_string()),
                None => Err("the writer is gone".to_string()),
            };
            (data, wrote)
        })
        .await;
        let wrote = match joined {
            Ok((data, wrote)) => {
                *buf = data;
                wrote
            }
            Err(e) => Err(e.to_string()),
        };
        match wrote {
            Ok(()) => {
                self.lock().written(i);
                Ok(())
            }
            Err(e) => {
                tracing::error!(hash = %self.hash.short(), error = %e, "store failure while fetching");
                Err(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_handed_out_once_in_runs_then_shared_in_the_endgame() {
        let mut c = Chunks::new(6);
        assert_eq!(c.take(5), Some(5));
        assert_eq!(c.take(5), None);
        assert_eq!(c.next_run(1), vec![0]);
        // Runs are consecutive chunks nobody has, at most as long as asked.
        assert_eq!(c.next_run(3), vec![1, 2, 3]);
        assert_eq!(c.next_run(8), vec![4]);
        assert!(c.has_work(), "chunks one worker receives can be shared");
        // Nothing left to hand out: chunk 0 (one worker on it) goes to a second worker, one
        // chunk at a time.
        assert_eq!(c.next_run(8), vec![0]);
        assert!(c.claim(0));
        // While one copy is being written, the other is not written too.
        assert!(!c.claim(0));
        c.written(0);
        assert_eq!(c.working[0], 0);
        // Chunks a worker could not deliver return to the queue once nobody works on them.
        c.give_back(3);
        c.give_back(2);
        assert_eq!(c.todo, VecDeque::from([2, 3]));
        assert_eq!(c.next_run(8), vec![2, 3]);
        for i in 1..=5 {
            assert!(c.claim(i));
            c.written(i);
        }
        assert!(!c.has_work());
        assert_eq!((c.left, c.next_run(8)), (0, vec![]));
        assert!(c.working.iter().all(|w| *w == 0), "{:?}", c.working);
    }
}

//! Fetching one blob from several holders at once (`fetch_blob_multi`) between in-process
//! libp2p nodes on loopback: every chunk is checked against the blob's chunk tree on
//! arrival, so a holder serving garbage is caught and penalised after one chunk and dropped
//! while the others finish; a slow holder loses its chunks to fast ones; a holder whose
//! tree does not hash to the blob is penalised before any chunk is asked of it, and so is
//! one whose tree hashes to the blob but gives a false length (a cut of the real tree);
//! a blob of one chunk comes from one holder; fetches from fast holders always complete.
#![allow(clippy::unwrap_used)]

use std::io::{self, Read};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hivemind_node::net::blob::tree::{self, CHUNK_BYTES};
use hivemind_node::net::blob::{
    fetch_blob_multi, BlobSource, Fetched, OpenBlob, Transfers, MAX_BLOB_BYTES,
};
use hivemind_node::net::Network;
use hivemind_protocol::Hash;
use hivemind_store::Store;
use libp2p::PeerId;
use tokio_util::sync::CancellationToken;

mod blob_net;
use blob_net::{connect, node, pattern};

/// What a misbehaving holder does to the bytes it serves; its tree stays honest unless
/// `bad_tree`.
#[derive(Clone, Copy)]
enum Trick {
    /// Every byte inverted.
    Garbage,
    /// Honest bytes at about 256 KiB/s (above the 64 KiB/s a fetcher tolerates).
    Slow,
    /// Honest bytes, but a chunk value of its tree changed.
    BadTree,
    /// Honest bytes; its tree is the two children of the blob's root, sent as the values of
    /// a blob of two chunks: it merges to the right hash with a false length.
    CutTree,
}

struct Holder(Store, Trick);

struct Tricked(Box<dyn Read + Send>, Trick);

impl Read for Tricked {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf.len().min(64 << 10);
        let n = self.0.read(&mut buf[..want])?;
        match self.1 {
            Trick::Garbage => buf[..n].iter_mut().for_each(|b| *b = !*b),
            Trick::Slow => std::thread::sleep(Duration::from_millis(250)),
            Trick::BadTree | Trick::CutTree => {}
        }
        Ok(n)
    }
}

impl BlobSource for Holder {
    fn open(&self, hash: &Hash, offset: u64) -> io::Result<Option<OpenBlob>> {
        let trick = self.1;
        Ok(self.0.open(hash, offset)?.map(|b| OpenBlob {
            total_len: b.total_len,
            reader: Box::new(Tricked(b.reader, trick)),
        }))
    }

    fn tree(&self, hash: &Hash) -> io::Result<Option<(u64, Vec<tree::Value>)>> {
        if matches!(self.1, Trick::CutTree) {
            return Ok(self.0.get_blob(hash).unwrap().map(|b| cut(&b)));
        }
        let honest = self.0.tree(hash)?;
        Ok(honest.map(|(len, mut values)| {
            if matches!(self.1, Trick::BadTree) {
                values[1][0] ^= 1;
            }
            (len, values)
        }))
    }
}

/// The two children of the root of `blob`'s blake3 tree (computed with blake3's own
/// hazmat API), claimed as the tree of a blob of two chunks.
fn cut(blob: &[u8]) -> (u64, Vec<tree::Value>) {
    use blake3::hazmat::{left_subtree_len, HasherExt};
    let left = left_subtree_len(blob.len() as u64) as usize;
    let cv = |offset: usize, bytes: &[u8]| {
        let mut h = blake3::Hasher::new();
        h.set_input_offset(offset as u64);
        h.update(bytes);
        h.finalize_non_root()
    };
    let values = vec![cv(0, &blob[..left]), cv(left, &blob[left..])];
    (2 * CHUNK_BYTES, values)
}

async fn holder(
    seed: u8,
    bytes: &[u8],
    trick: Option<Trick>,
    cancel: &CancellationToken,
) -> (Network, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.put_blob(bytes).unwrap();
    let net = match trick {
        None => node(seed, Arc::new(store), cancel).await,
        Some(t) => node(seed, Arc::new(Holder(store, t)), cancel).await,
    };
    (net, dir)
}

/// A fetcher with a store of its own, connected to every holder; and the holders' ids.
async fn fetcher_of(
    seed: u8,
    holders: &[(Network, tempfile::TempDir)],
    cancel: &CancellationToken,
) -> (Network, Store, Vec<PeerId>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let fetcher = node(seed, Arc::new(store.clone()), cancel).await;
    for (h, _) in holders {
        connect(&fetcher, h).await;
    }
    let ids = holders
        .iter()
        .map(|(h, _)| h.client.local_peer_id())
        .collect();
    (fetcher, store, ids, dir)
}

fn served(n: &Network, hash: &Hash) -> u64 {
    n.client.served().get(hash).copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_come_from_every_holder_and_garbage_costs_its_sender_one_chunk() {
    let cancel = CancellationToken::new();
    // 12 chunks and a short 13th.
    let bytes = pattern(12 * CHUNK_BYTES as usize + 4321, 3);
    let hash = Hash::of(&bytes);
    let tricks = [None, Some(Trick::Garbage), Some(Trick::Slow), None, None];
    let mut holders = Vec::new();
    for (i, t) in tricks.iter().enumerate() {
        holders.push(holder(10 + i as u8, &bytes, *t, &cancel).await);
    }
    let (fetcher, store, ids, _dir) = fetcher_of(1, &holders, &cancel).await;

    let t0 = Instant::now();
    let got = fetch_blob_multi(
        &fetcher.client,
        &store,
        hash,
        &ids,
        MAX_BLOB_BYTES,
        &Transfers::default(),
    )
    .await;
    let took = t0.elapsed();
    // The first holder sent the tree (and the last chunk, which fixes the length).
    assert_eq!(got, Fetched::From(ids[0]));
    assert_eq!(store.get_blob(&hash).unwrap().unwrap(), bytes);

    let info = fetcher.client.info().await.unwrap();
    let (garbage, slow) = (&holders[1].0, &holders[2].0);
    assert_eq!(
        info.penalties.get(&ids[1]),
        Some(&1),
        "{:?}",
        info.penalties
    );
    assert_eq!(
        info.penalties.len(),
        1,
        "only the garbage holder: {:?}",
        info.penalties
    );
    assert!(
        served(garbage, &hash) <= CHUNK_BYTES,
        "{}",
        served(garbage, &hash)
    );
    // A 1 MiB chunk takes the slow holder 4 s; the fast ones took its share.
    assert!(
        served(slow, &hash) <= CHUNK_BYTES,
        "{}",
        served(slow, &hash)
    );
    assert!(took < Duration::from_secs(4), "{took:?}");
    // The honest holders each sent chunks (the one that came in last joined when the
    // garbage holder was dropped).
    for i in [0, 3, 4] {
        assert!(served(&holders[i].0, &hash) > 0, "holder {i} sent nothing");
    }
    let honest: u64 = [0, 3, 4]
        .iter()
        .map(|i| served(&holders[*i].0, &hash))
        .sum();
    assert!(honest >= bytes.len() as u64, "{honest}");
    cancel.cancel();
}

/// Fetches `bytes` from a holder playing `trick` with its tree, listed first, and an honest
/// one: the blob comes from the honest holder, the other is penalised once and left out of
/// the fetch. Returns the blob bytes the trickster sent.
async fn tree_liar_is_penalised_and_left_out(trick: Trick, bytes: &[u8], seed: u8) -> u64 {
    let cancel = CancellationToken::new();
    let hash = Hash::of(bytes);
    let (liar, _d1) = holder(seed, bytes, Some(trick), &cancel).await;
    let (honest, _d2) = holder(seed + 1, bytes, None, &cancel).await;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let fetcher = node(seed + 2, Arc::new(store.clone()), &cancel).await;
    connect(&fetcher, &liar).await;
    connect(&fetcher, &honest).await;
    let ids = [liar.client.local_peer_id(), honest.client.local_peer_id()];
    let got = fetch_blob_multi(
        &fetcher.client,
        &store,
        hash,
        &ids,
        MAX_BLOB_BYTES,
        &Transfers::default(),
    )
    .await;
    assert_eq!(got, Fetched::From(ids[1]));
    assert_eq!(store.get_blob(&hash).unwrap().unwrap(), bytes);
    let info = fetcher.client.info().await.unwrap();
    assert_eq!(
        info.penalties.get(&ids[0]),
        Some(&1),
        "{:?}",
        info.penalties
    );
    assert!(!info.penalties.contains_key(&ids[1]));
    assert_eq!(served(&honest, &hash), bytes.len() as u64);
    let sent = served(&liar, &hash);
    cancel.cancel();
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_that_does_not_hash_to_the_blob_is_penalised_before_any_chunk() {
    let bytes = pattern(3 * CHUNK_BYTES as usize, 5);
    let sent = tree_liar_is_penalised_and_left_out(Trick::BadTree, &bytes, 20).await;
    assert_eq!(sent, 0, "no chunk was asked of it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_with_a_false_length_is_caught_by_its_last_chunk() {
    // 5 MiB: the root's children are the first 4 MiB and the last 1 MiB.
    let bytes = pattern(5 * CHUNK_BYTES as usize, 9);
    let (len, values) = cut(&bytes);
    // The cut merges to the blob's hash: the tree alone cannot see the lie.
    assert!(tree::verify(&Hash::of(&bytes), len, &values));
    let sent = tree_liar_is_penalised_and_left_out(Trick::CutTree, &bytes, 30).await;
    assert!(sent <= CHUNK_BYTES, "{sent}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_of_one_chunk_comes_from_one_holder_and_fast_fetches_always_complete() {
    let cancel = CancellationToken::new();
    let small = pattern(CHUNK_BYTES as usize - 100, 1);
    let big = pattern(6 * CHUNK_BYTES as usize + 17, 2);
    let mut holders = Vec::new();
    for i in 0..3u8 {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.put_blob(&small).unwrap();
        store.put_blob(&big).unwrap();
        holders.push((node(40 + i, Arc::new(store), &cancel).await, dir));
    }
    let (fetcher, store, ids, _dir) = fetcher_of(4, &holders, &cancel).await;
    let (small_hash, big_hash) = (Hash::of(&small), Hash::of(&big));
    let got = fetch_blob_multi(
        &fetcher.client,
        &store,
        small_hash,
        &ids,
        MAX_BLOB_BYTES,
        &Transfers::default(),
    )
    .await;
    assert_eq!(got, Fetched::From(ids[0]));
    assert_eq!(served(&holders[0].0, &small_hash), small.len() as u64);
    // Chunks written by one worker while others still receive copies: every fetch ends
    // with every chunk in (a chunk counts as in once written, not once received).
    for rep in 0..6 {
        let transfers = Transfers::default();
        let got = fetch_blob_multi(
            &fetcher.client,
            &store,
            big_hash,
            &ids,
            MAX_BLOB_BYTES,
            &transfers,
        )
        .await;
        assert!(matches!(got, Fetched::From(_)), "rep {rep}: {got:?}");
        assert_eq!(
            store.get_blob(&big_hash).unwrap().unwrap(),
            big,
            "rep {rep}"
        );
        assert!(
            transfers.snapshot().is_empty(),
            "rep {rep}: transfers left behind"
        );
        store.remove_blob(&big_hash).unwrap();
    }
    assert!(fetcher.client.info().await.unwrap().penalties.is_empty());
    cancel.cancel();
}

//! Records kept in sled trees: announcements, committed rounds, peers and the
//! gateway's upload registry. Every write is flushed before it returns.
//!
//! Values are postcard behind a one-byte format version, so a later layout can be
//! told apart from this one. Keys are chosen so that sled's byte order is the order
//! callers want: numbers big-endian, hashes raw.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};

use hivemind_protocol::Hash;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::Store;

/// Format version byte that prefixes every postcard value.
const RECORD_FORMAT: u8 = 1;

/// Encodes a record value: format byte, then postcard.
pub(crate) fn encode<T: Serialize>(tree: &'static str, value: &T) -> Result<Vec<u8>> {
    postcard::to_extend(value, vec![RECORD_FORMAT]).map_err(|e| Error::Encode {
        tree,
        detail: e.to_string(),
    })
}

/// Decodes a record value written by [`encode`].
pub(crate) fn decode<T: DeserializeOwned>(
    tree: &'static str,
    key: &[u8],
    bytes: &[u8],
) -> Result<T> {
    let corrupt = |detail: String| Error::CorruptRecord {
        tree,
        key: hex::encode(key),
        detail,
    };
    match bytes.split_first() {
        Some((&RECORD_FORMAT, body)) => {
            postcard::from_bytes(body).map_err(|e| corrupt(format!("undecodable value: {e}")))
        }
        Some((&v, _)) => Err(corrupt(format!("unknown record format {v}"))),
        None => Err(corrupt("empty value".to_string())),
    }
}

/// Reads a 32-byte hash out of a key slice.
pub(crate) fn hash_from_key(tree: &'static str, key: &[u8]) -> Result<Hash> {
    let bytes: [u8; 32] = key.try_into().map_err(|_| Error::CorruptRecord {
        tree,
        key: hex::encode(key),
        detail: format!("expected a 32-byte hash, found {} bytes", key.len()),
    })?;
    Ok(Hash(bytes))
}

fn utf8_key(tree: &'static str, key: &[u8]) -> Result<String> {
    String::from_utf8(key.to_vec()).map_err(|_| Error::CorruptRecord {
        tree,
        key: hex::encode(key),
        detail: "key is not UTF-8".to_string(),
    })
}

fn announcement_key(round: u64, adapter: &Hash) -> [u8; 40] {
    let mut key = [0u8; 40];
    key[..8].copy_from_slice(&round.to_be_bytes());
    key[8..].copy_from_slice(adapter.as_bytes());
    key
}

/// A committed round: the adapter it produced and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundRecord {
    /// Round number.
    pub number: u64,
    /// blake3 of the round adapter (a blob in the store).
    pub hash: Hash,
    /// Human-readable version name (what the gateway serves downloads under).
    pub version: String,
    /// The round adapter this round started from, if any.
    pub parent: Option<Hash>,
    /// Contributor adapter hashes, sorted.
    pub contributors: Vec<Hash>,
    /// Aggregation rule id.
    pub rule: String,
    /// The signed round digest, as sent.
    pub digest: Vec<u8>,
    /// Commit time, milliseconds since the Unix epoch.
    pub committed_at_ms: u64,
}

/// What the node knows about a peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    /// Multiaddrs the peer was seen at.
    pub addrs: Vec<String>,
    /// Last time it was seen, milliseconds since the Unix epoch.
    pub last_seen_ms: u64,
}

/// An adapter uploaded through the legacy REST gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadRecord {
    /// Upload id (`<user>_<YYYYmmdd_HHMMSS>` in the legacy API); unique.
    pub id: String,
    /// Uploading user.
    pub user_id: String,
    /// The uploaded adapter's blob.
    pub blob: Hash,
    /// Base model the user named.
    pub base_model: String,
    /// Version string reported back to the user.
    pub version: String,
    /// Upload time as the gateway formats it.
    pub uploaded_at: String,
    /// Training samples the user reported.
    pub training_samples: u64,
    /// Epochs the user reported.
    pub epochs: u64,
    /// The round this upload was included in, once it was.
    pub round: Option<u64>,
}

/// An upload as stored: with the order it was inserted in, which defines "newest".
#[derive(Serialize, Deserialize)]
struct StoredUpload {
    seq: u64,
    record: UploadRecord,
}

/// The `upload_users` index entry of one user.
#[derive(Serialize, Deserialize, Default)]
struct UserUploads {
    /// Uploads of this user.
    count: u64,
    /// Insertion number and id of the newest one.
    newest_seq: u64,
    newest_id: String,
}

/// Counts over the gateway's upload registry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UploadStats {
    /// Uploads registered.
    pub uploads: u64,
    /// Distinct users who uploaded.
    pub users: u64,
}

impl Store {
    // ---- announcements -------------------------------------------------------

    /// Stores the signed announcement envelope for `adapter` in `round`.
    ///
    /// The first envelope stored for a (round, adapter) pair is kept: returns
    /// `true` if this one was stored, `false` if one was already there.
    pub fn put_announcement(&self, round: u64, adapter: &Hash, envelope: &[u8]) -> Result<bool> {
        let key = announcement_key(round, adapter);
        let inserted = self
            .announcements
            .compare_and_swap(key, None as Option<&[u8]>, Some(envelope))?
            .is_ok();
        if inserted {
            self.flush()?;
        }
        Ok(inserted)
    }

    /// The envelope stored for `adapter` in `round`.
    pub fn get_announcement(&self, round: u64, adapter: &Hash) -> Result<Option<Vec<u8>>> {
        let key = announcement_key(round, adapter);
        Ok(self.announcements.get(key)?.map(|v| v.to_vec()))
    }

    /// All envelopes of `round`, sorted by adapter hash.
    pub fn list_announcements(&self, round: u64) -> Result<Vec<(Hash, Vec<u8>)>> {
        let mut out = Vec::new();
        for item in self.announcements.scan_prefix(round.to_be_bytes()) {
            let (key, value) = item?;
            let hash = hash_from_key("announcements", key.get(8..).unwrap_or_default())?;
            out.push((hash, value.to_vec()));
        }
        Ok(out)
    }

    // ---- rounds --------------------------------------------------------------

    /// Records a committed round, replacing any earlier record with the same number and
    /// keeping every other round. A node committing its new tip uses
    /// [`Store::commit_round`], which also drops the rounds above it.
    pub fn put_round(&self, record: &RoundRecord) -> Result<()> {
        self.rounds
            .insert(record.number.to_be_bytes(), encode("rounds", record)?)?;
        self.flush()
    }

    /// Records `record` as the tip of this node's chain: inserts it (replacing any record
    /// with its number) and removes every round numbered above it, which a fork choice that
    /// rewinds to an earlier round has orphaned, in one atomic batch. Returns the numbers
    /// removed. A restart then resumes from `record`, not from an orphan.
    pub fn commit_round(&self, record: &RoundRecord) -> Result<Vec<u64>> {
        let mut batch = sled::Batch::default();
        batch.insert(&record.number.to_be_bytes(), encode("rounds", record)?);
        let mut removed = Vec::new();
        if let Some(next) = record.number.checked_add(1) {
            for item in self.rounds.range(next.to_be_bytes()..) {
                let (key, _) = item?;
                if let Ok(n) = <[u8; 8]>::try_from(key.as_ref()) {
                    removed.push(u64::from_be_bytes(n));
                }
                batch.remove(key);
            }
        }
        self.rounds.apply_batch(batch)?;
        self.flush()?;
        Ok(removed)
    }

    /// The committed round `number`.
    pub fn get_round(&self, number: u64) -> Result<Option<RoundRecord>> {
        let key = number.to_be_bytes();
        self.rounds
            .get(key)?
            .map(|v| decode("rounds", &key, &v))
            .transpose()
    }

    /// The committed round with the highest number.
    pub fn latest_round(&self) -> Result<Option<RoundRecord>> {
        self.rounds
            .last()?
            .map(|(k, v)| decode("rounds", &k, &v))
            .transpose()
    }

    /// All committed rounds, by number.
    pub fn list_rounds(&self) -> Result<Vec<RoundRecord>> {
        self.rounds
            .iter()
            .map(|item| {
                let (k, v) = item?;
                decode("rounds", &k, &v)
            })
            .collect()
    }

    /// The highest-numbered committed round whose version is `version`.
    /// A linear scan: rounds are few (one per aggregation window).
    pub fn round_by_version(&self, version: &str) -> Result<Option<RoundRecord>> {
        for item in self.rounds.iter().rev() {
            let (k, v) = item?;
            let record: RoundRecord = decode("rounds", &k, &v)?;
            if record.version == version {
                return Ok(Some(record));
            }
        }
        Ok(None)
    }

    // ---- peers ---------------------------------------------------------------

    /// Records (or replaces) what is known about `peer_id`.
    pub fn put_peer(&self, peer_id: &str, record: &PeerRecord) -> Result<()> {
        self.peers
            .insert(peer_id.as_bytes(), encode("peers", record)?)?;
        self.flush()
    }

    /// What is known about `peer_id`.
    pub fn get_peer(&self, peer_id: &str) -> Result<Option<PeerRecord>> {
        self.peers
            .get(peer_id.as_bytes())?
            .map(|v| decode("peers", peer_id.as_bytes(), &v))
            .transpose()
    }

    /// Every known peer, sorted by peer id.
    pub fn list_peers(&self) -> Result<Vec<(String, PeerRecord)>> {
        self.peers
            .iter()
            .map(|item| {
                let (k, v) = item?;
                Ok((utf8_key("peers", &k)?, decode("peers", &k, &v)?))
            })
            .collect()
    }

    /// Forgets `peer_id`; returns whether it was known.
    pub fn remove_peer(&self, peer_id: &str) -> Result<bool> {
        let existed = self.peers.remove(peer_id.as_bytes())?.is_some();
        if existed {
            self.flush()?;
        }
        Ok(existed)
    }

    // ---- gateway uploads -----------------------------------------------------

    /// Registers a new upload. Fails with [`Error::UploadExists`] if its id is taken.
    /// The record and its user's index entry are written in one transaction.
    pub fn insert_upload(&self, record: &UploadRecord) -> Result<()> {
        use sled::transaction::{ConflictableTransactionError as Conflict, TransactionError};
        use sled::Transactional;
        let stored = StoredUpload {
            seq: self.db.generate_id()?,
            record: record.clone(),
        };
        let value = encode("uploads", &stored)?;
        let id = record.id.as_bytes();
        let user = record.user_id.as_bytes();
        let done = (&self.uploads, &self.upload_users).transaction(|(uploads, users)| {
            if uploads.get(id)?.is_some() {
                return Err(Conflict::Abort(Error::UploadExists {
                    id: record.id.clone(),
                }));
            }
            uploads.insert(id, value.as_slice())?;
            let mut entry: UserUploads = match users.get(user)? {
                Some(v) => decode("upload_users", user, &v).map_err(Conflict::Abort)?,
                None => UserUploads::default(),
            };
            note_upload(&mut entry, stored.seq, &record.id);
            users.insert(
                user,
                encode("upload_users", &entry).map_err(Conflict::Abort)?,
            )?;
            Ok(())
        });
        match done {
            Ok(()) => self.flush(),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    /// How many uploads and distinct uploaders there are. Reads one index entry per
    /// user, not every upload.
    pub fn upload_stats(&self) -> Result<UploadStats> {
        let mut stats = UploadStats::default();
        for item in self.upload_users.iter() {
            let (k, v) = item?;
            let entry: UserUploads = decode("upload_users", &k, &v)?;
            stats.users += 1;
            stats.uploads += entry.count;
        }
        Ok(stats)
    }

    /// Rebuilds the per-user upload index when it does not count every upload: a data dir
    /// written before the index existed, or one an older binary added uploads to. Called by
    /// `open`; returns whether it rebuilt.
    pub(crate) fn reindex_uploads_if_stale(&self) -> Result<bool> {
        let indexed = self.upload_stats().map(|s| s.uploads).ok();
        if indexed == Some(self.uploads.len() as u64) {
            return Ok(false);
        }
        let mut users: BTreeMap<String, UserUploads> = BTreeMap::new();
        for stored in self.stored_uploads()? {
            let entry = users.entry(stored.record.user_id.clone()).or_default();
            note_upload(entry, stored.seq, &stored.record.id);
        }
        // One batch: the old entries go and the new ones come atomically.
        let mut batch = sled::Batch::default();
        for item in self.upload_users.iter() {
            let (k, _) = item?;
            batch.remove(k);
        }
        for (user, entry) in &users {
            batch.insert(user.as_bytes(), encode("upload_users", entry)?);
        }
        self.upload_users.apply_batch(batch)?;
        self.flush()?;
        Ok(true)
    }

    /// The upload with this id.
    pub fn get_upload(&self, id: &str) -> Result<Option<UploadRecord>> {
        Ok(self
            .uploads
            .get(id.as_bytes())?
            .map(|v| decode::<StoredUpload>("uploads", id.as_bytes(), &v))
            .transpose()?
            .map(|s| s.record))
    }

    /// Every upload, oldest first (in the order they were inserted).
    pub fn list_uploads(&self) -> Result<Vec<UploadRecord>> {
        Ok(self
            .stored_uploads()?
            .into_iter()
            .map(|s| s.record)
            .collect())
    }

    /// The uploads of `user_id`, oldest first.
    pub fn list_uploads_by_user(&self, user_id: &str) -> Result<Vec<UploadRecord>> {
        Ok(self
            .stored_uploads()?
            .into_iter()
            .map(|s| s.record)
            .filter(|r| r.user_id == user_id)
            .collect())
    }

    /// Records that upload `id` was included in round `round`.
    pub fn mark_upload_included(&self, id: &str, round: u64) -> Result<()> {
        loop {
            let Some(current) = self.uploads.get(id.as_bytes())? else {
                return Err(Error::UnknownUpload { id: id.to_string() });
            };
            let mut stored: StoredUpload = decode("uploads", id.as_bytes(), &current)?;
            stored.record.round = Some(round);
            let swapped = self.uploads.compare_and_swap(
                id.as_bytes(),
                Some(&current),
                Some(encode("uploads", &stored)?),
            )?;
            if swapped.is_ok() {
                return self.flush();
            }
            // Changed under us by another thread: read it again.
        }
    }

    /// Each user's newest upload and how many uploads the user made, sorted by user id.
    /// Reads one index entry and one upload per user.
    pub fn newest_uploads(&self) -> Result<Vec<(UploadRecord, u64)>> {
        let mut out = Vec::new();
        for item in self.upload_users.iter() {
            let (k, v) = item?;
            let entry: UserUploads = decode("upload_users", &k, &v)?;
            let record =
                self.get_upload(&entry.newest_id)?
                    .ok_or_else(|| Error::CorruptRecord {
                        tree: "upload_users",
                        key: hex::encode(&k),
                        detail: format!("names upload {} that does not exist", entry.newest_id),
                    })?;
            out.push((record, entry.count));
        }
        Ok(out)
    }

    /// Uploads waiting for aggregation, sorted by user id: for each user, their
    /// newest upload (latest inserted), unless it is in a committed round.
    ///
    /// An upload counts as in a committed round when its `round` is set and that
    /// round has a [`RoundRecord`]; an upload marked for a round that never
    /// committed is still pending. A user's older uploads are superseded by the
    /// newest one and are never pending.
    pub fn pending_uploads(&self) -> Result<Vec<UploadRecord>> {
        let mut out = Vec::new();
        // Many users' newest uploads share a round: read each round's contributors once.
        let mut rounds: BTreeMap<u64, Option<BTreeSet<Hash>>> = BTreeMap::new();
        // The index is keyed by user id, so this is sorted by user id.
        for item in self.upload_users.iter() {
            let (k, v) = item?;
            let entry: UserUploads = decode("upload_users", &k, &v)?;
            let Some(record) = self.get_upload(&entry.newest_id)? else {
                return Err(Error::CorruptRecord {
                    tree: "upload_users",
                    key: hex::encode(&k),
                    detail: format!("names upload {} that does not exist", entry.newest_id),
                });
            };
            // Aggregated only if its mark names a round whose stored record lists its
            // adapter (after a rewind, the round of that number may be another one).
            let aggregated = match record.round {
                Some(r) => {
                    let contributors = match rounds.entry(r) {
                        Entry::Occupied(e) => e.into_mut(),
                        Entry::Vacant(e) => e.insert(
                            self.get_round(r)?
                                .map(|round| round.contributors.into_iter().collect()),
                        ),
                    };
                    contributors
                        .as_ref()
                        .is_some_and(|c| c.contains(&record.blob))
                }
                None => false,
            };
            if !aggregated {
                out.push(record);
            }
        }
        Ok(out)
    }

    fn stored_uploads(&self) -> Result<Vec<StoredUpload>> {
        let mut all = self
            .uploads
            .iter()
            .map(|item| {
                let (k, v) = item?;
                decode::<StoredUpload>("uploads", &k, &v)
            })
            .collect::<Result<Vec<_>>>()?;
        all.sort_by_key(|s| s.seq);
        Ok(all)
    }
}

/// Counts an upload with insertion number `seq` into a user's index entry.
fn note_upload(entry: &mut UserUploads, seq: u64, id: &str) {
    entry.count += 1;
    if entry.count == 1 || seq >= entry.newest_seq {
        entry.newest_seq = seq;
        entry.newest_id = id.to_string();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(number: u64, version: &str) -> RoundRecord {
        RoundRecord {
            number,
            hash: Hash::of(version.as_bytes()),
            version: version.to_string(),
            parent: (number > 0).then(|| Hash::of(b"parent")),
            contributors: vec![Hash::of(b"x"), Hash::of(b"y")],
            rule: "fedavg".to_string(),
            digest: vec![1, 2, 3, number as u8],
            committed_at_ms: 1_700_000_000_000 + number,
        }
    }

    fn upload(id: &str, user: &str) -> UploadRecord {
        UploadRecord {
            id: id.to_string(),
            user_id: user.to_string(),
            blob: Hash::of(id.as_bytes()),
            base_model: "Qwen/Qwen2-7B".to_string(),
            version: "v1".to_string(),
            uploaded_at: "2025-01-01T00:00:00".to_string(),
            training_samples: 100,
            epochs: 2,
            round: None,
        }
    }

    #[test]
    fn announcements_by_round_sorted_first_wins() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let hashes: Vec<Hash> = (0..5u8).map(|i| Hash::of(&[i])).collect();
        for (i, h) in hashes.iter().enumerate() {
            assert!(store.put_announcement(7, h, &[i as u8; 3])?);
        }
        assert!(store.put_announcement(8, &hashes[0], b"other round")?);
        assert!(store.put_announcement(6, &hashes[1], b"earlier round")?);
        // A second envelope for the same (round, adapter) does not replace the first.
        assert!(!store.put_announcement(7, &hashes[2], b"replacement")?);
        assert_eq!(store.get_announcement(7, &hashes[2])?, Some(vec![2; 3]));
        assert_eq!(store.get_announcement(9, &hashes[2])?, None);

        let listed = store.list_announcements(7)?;
        let mut expected: Vec<(Hash, Vec<u8>)> = hashes
            .iter()
            .enumerate()
            .map(|(i, h)| (*h, vec![i as u8; 3]))
            .collect();
        expected.sort();
        assert_eq!(listed, expected);
        assert_eq!(
            store.list_announcements(8)?,
            vec![(hashes[0], b"other round".to_vec())]
        );
        assert!(store.list_announcements(100)?.is_empty());
        drop(store);
        assert_eq!(Store::open(dir.path())?.list_announcements(7)?, expected);
        Ok(())
    }

    #[test]
    fn rounds_in_order_latest_by_version_and_replace() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        assert_eq!(store.latest_round()?, None);
        // 256 sorts before 3 as a string or little-endian; keys must be big-endian.
        for n in [3, 256, 1, 2] {
            store.put_round(&round(n, &format!("v{n}")))?;
        }
        let numbers: Vec<u64> = store.list_rounds()?.iter().map(|r| r.number).collect();
        assert_eq!(numbers, vec![1, 2, 3, 256]);
        assert_eq!(store.latest_round()?, Some(round(256, "v256")));
        assert_eq!(store.get_round(2)?, Some(round(2, "v2")));
        assert_eq!(store.get_round(4)?, None);
        assert_eq!(store.round_by_version("v3")?, Some(round(3, "v3")));
        assert_eq!(store.round_by_version("nope")?, None);

        store.put_round(&round(2, "v2-fork-winner"))?;
        assert_eq!(store.get_round(2)?, Some(round(2, "v2-fork-winner")));
        assert_eq!(store.list_rounds()?.len(), 4);
        drop(store);
        let store = Store::open(dir.path())?;
        assert_eq!(store.get_round(2)?, Some(round(2, "v2-fork-winner")));
        assert_eq!(store.latest_round()?.map(|r| r.number), Some(256));
        Ok(())
    }

    #[test]
    fn commit_round_drops_the_rounds_a_rewind_orphans() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        for n in 1..=4 {
            assert!(store.commit_round(&round(n, &format!("v{n}")))?.is_empty());
        }
        // A fork choice switches to another round 2: rounds 3 and 4 built on the old one.
        assert_eq!(store.commit_round(&round(2, "v2-other"))?, vec![3, 4]);
        let numbers: Vec<u64> = store.list_rounds()?.iter().map(|r| r.number).collect();
        assert_eq!(numbers, vec![1, 2]);
        assert_eq!(store.latest_round()?, Some(round(2, "v2-other")));
        drop(store);
        let store = Store::open(dir.path())?;
        assert_eq!(store.latest_round()?, Some(round(2, "v2-other")));
        assert_eq!(store.list_rounds()?.len(), 2);
        // The chain goes on from there.
        assert!(store.commit_round(&round(3, "v3-new"))?.is_empty());
        assert_eq!(store.latest_round()?, Some(round(3, "v3-new")));
        Ok(())
    }

    #[test]
    fn upload_index_counts_and_finds_the_newest_per_user() -> anyhow::Result<()> {
        let ids = |v: Vec<UploadRecord>| v.into_iter().map(|u| u.id).collect::<Vec<_>>();
        let dir = tempfile::tempdir()?;
        let mut store = Store::open(dir.path())?;
        assert_eq!(store.upload_stats()?, UploadStats::default());
        let uploads = [
            ("u1", "bob"),
            ("u2", "amy"),
            ("u3", "bob"),
            ("u4", "cat"),
            ("u5", "bob"),
        ];
        for (id, user) in uploads {
            store.insert_upload(&upload(id, user))?;
        }
        // A refused duplicate id changes nothing.
        assert!(matches!(
            store.insert_upload(&upload("u2", "dan")),
            Err(Error::UploadExists { id }) if id == "u2"
        ));
        let expected = UploadStats {
            uploads: 5,
            users: 3,
        };
        assert_eq!(store.upload_stats()?, expected);
        // Against a naive computation over every record.
        let all = store.list_uploads()?;
        let users: std::collections::BTreeSet<&str> =
            all.iter().map(|u| u.user_id.as_str()).collect();
        assert_eq!((all.len() as u64, users.len() as u64), (5, 3));
        assert_eq!(ids(store.pending_uploads()?), ["u2", "u5", "u4"]);

        // A data dir from before the index (none at all), and one where an older binary
        // added uploads without indexing them (bob's entry gone): rebuilt on open.
        for stale in [None, Some("bob")] {
            match stale {
                None => store.upload_users.clear()?,
                Some(user) => drop(store.upload_users.remove(user.as_bytes())?),
            }
            store.flush()?;
            assert_ne!(store.upload_stats()?, expected);
            drop(store);
            store = Store::open(dir.path())?;
            assert!(store.recovery().uploads_reindexed);
            assert_eq!(store.upload_stats()?, expected);
            assert_eq!(ids(store.pending_uploads()?), ["u2", "u5", "u4"]);
        }
        store.insert_upload(&upload("u6", "amy"))?;
        assert_eq!(ids(store.pending_uploads()?), ["u6", "u5", "u4"]);
        assert_eq!(store.upload_stats()?.uploads, 6);
        Ok(())
    }

    #[test]
    fn peers_put_list_remove() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let rec = |t: u64| PeerRecord {
            addrs: vec![format!("/ip4/127.0.0.1/tcp/{t}")],
            last_seen_ms: t,
        };
        store.put_peer("12D3KooWB", &rec(1))?;
        store.put_peer("12D3KooWA", &rec(2))?;
        store.put_peer("12D3KooWB", &rec(3))?;
        assert_eq!(store.get_peer("12D3KooWB")?, Some(rec(3)));
        assert_eq!(
            store.list_peers()?,
            vec![
                ("12D3KooWA".to_string(), rec(2)),
                ("12D3KooWB".to_string(), rec(3))
            ]
        );
        assert!(store.remove_peer("12D3KooWA")?);
        assert!(!store.remove_peer("12D3KooWA")?);
        assert_eq!(store.get_peer("12D3KooWA")?, None);
        drop(store);
        assert_eq!(Store::open(dir.path())?.list_peers()?.len(), 1);
        Ok(())
    }

    #[test]
    fn uploads_registry_and_pending() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        // Ids are inserted out of alphabetical order: listing follows insertion.
        for (id, user) in [
            ("zed_1", "zed"),
            ("amy_1", "amy"),
            ("bob_1", "bob"),
            ("amy_2", "amy"),
            ("cat_1", "cat"),
            ("dan_1", "dan"),
            ("dan_2", "dan"),
        ] {
            store.insert_upload(&upload(id, user))?;
        }
        assert!(matches!(
            store.insert_upload(&upload("amy_1", "amy")),
            Err(Error::UploadExists { id }) if id == "amy_1"
        ));
        let ids = |v: Vec<UploadRecord>| v.into_iter().map(|u| u.id).collect::<Vec<_>>();
        assert_eq!(
            ids(store.list_uploads()?),
            ["zed_1", "amy_1", "bob_1", "amy_2", "cat_1", "dan_1", "dan_2"]
        );
        assert_eq!(ids(store.list_uploads_by_user("amy")?), ["amy_1", "amy_2"]);
        assert!(store.list_uploads_by_user("nobody")?.is_empty());
        assert_eq!(store.get_upload("bob_1")?, Some(upload("bob_1", "bob")));
        assert!(matches!(
            store.mark_upload_included("ghost", 1),
            Err(Error::UnknownUpload { id }) if id == "ghost"
        ));

        // Round 1 is committed with bob_1, amy_1 and dan_2; round 5 is not (yet).
        let with = |mut r: RoundRecord, ids: &[&str]| {
            r.contributors = ids.iter().map(|id| upload(id, "").blob).collect();
            r
        };
        store.put_round(&with(round(1, "v1"), &["bob_1", "amy_1", "dan_2"]))?;
        store.mark_upload_included("bob_1", 1)?; // aggregated: not pending
        store.mark_upload_included("cat_1", 5)?; // round 5 not committed: pending
        store.mark_upload_included("amy_1", 1)?; // old one aggregated, newest still pending
        store.mark_upload_included("dan_2", 1)?; // newest aggregated: dan_1 is superseded
        assert_eq!(store.get_upload("cat_1")?.and_then(|u| u.round), Some(5));
        assert_eq!(ids(store.pending_uploads()?), ["amy_2", "cat_1", "zed_1"]);

        // A round 5 that does not hold cat_1 (another history's round 5, after a rewind)
        // leaves it pending; the round 5 that holds it does not.
        store.put_round(&with(round(5, "v5-other"), &["zed_1"]))?;
        assert_eq!(ids(store.pending_uploads()?), ["amy_2", "cat_1", "zed_1"]);
        store.put_round(&with(round(5, "v5"), &["cat_1"]))?;
        assert_eq!(ids(store.pending_uploads()?), ["amy_2", "zed_1"]);
        drop(store);
        let store = Store::open(dir.path())?;
        assert_eq!(ids(store.pending_uploads()?), ["amy_2", "zed_1"]);
        // Insertion order survives a reopen.
        assert_eq!(ids(store.list_uploads()?)[..2], ["zed_1", "amy_1"]);
        Ok(())
    }

    #[test]
    fn undecodable_records_are_errors_naming_the_tree() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        store
            .rounds
            .insert(9u64.to_be_bytes(), vec![RECORD_FORMAT, 0xff])?;
        store.rounds.insert(10u64.to_be_bytes(), vec![77, 0])?;
        store.rounds.insert(11u64.to_be_bytes(), Vec::<u8>::new())?;
        for n in [9, 10, 11] {
            match store.get_round(n) {
                Err(Error::CorruptRecord { tree, key, .. }) => {
                    assert_eq!(tree, "rounds");
                    assert_eq!(key, hex::encode(n.to_be_bytes()));
                }
                other => panic!("expected CorruptRecord, got {other:?}"),
            }
        }
        assert!(store.list_rounds().is_err());
        // An announcement key of the right prefix but the wrong length.
        let mut bad_key = 42u64.to_be_bytes().to_vec();
        bad_key.extend_from_slice(&[1, 2, 3]);
        store.announcements.insert(bad_key, b"x".as_slice())?;
        assert!(matches!(
            store.list_announcements(42),
            Err(Error::CorruptRecord {
                tree: "announcements",
                ..
            })
        ));
        Ok(())
    }

    #[test]
    fn encoding_round_trips() -> anyhow::Result<()> {
        let r = round(42, "v42");
        let bytes = encode("rounds", &r)?;
        assert_eq!(bytes[0], RECORD_FORMAT);
        assert_eq!(decode::<RoundRecord>("rounds", b"k", &bytes)?, r);
        Ok(())
    }
}

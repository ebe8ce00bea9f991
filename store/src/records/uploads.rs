//! The gateway's upload registry, with a per-user index of the newest upload.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};

use hivemind_protocol::Hash;
use serde::{Deserialize, Serialize};

use super::{decode, encode};
use crate::error::{Error, Result};
use crate::Store;

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
    /// Uploads of the user who uploaded most.
    pub most_by_one_user: u64,
}

impl Store {
    /// Registers a new upload. Fails with [`Error::UploadExists`] if its id is taken.
    /// The record and its user's index entry are written in one transaction.
    pub fn insert_upload(&self, record: &UploadRecord) -> Result<()> {
        self.insert_upload_with(record, false)
    }

    /// Registers a new upload unless its user's newest upload is still waiting for a round
    /// (not marked included in one): then fails with [`Error::UploadWaiting`]. The check and
    /// the insert are one transaction, so of two uploads of one user racing, one fails.
    pub fn insert_sole_waiting_upload(&self, record: &UploadRecord) -> Result<()> {
        self.insert_upload_with(record, true)
    }

    /// The id of `user_id`'s upload waiting for a round, if any: the newest upload, unless it
    /// is marked included in a round (what [`Store::insert_sole_waiting_upload`] checks).
    /// Reads one index entry and one upload.
    pub fn waiting_upload(&self, user_id: &str) -> Result<Option<String>> {
        let key = user_id.as_bytes();
        let Some(v) = self.upload_users.get(key)? else {
            return Ok(None);
        };
        let entry: UserUploads = decode("upload_users", key, &v)?;
        Ok(self
            .get_upload(&entry.newest_id)?
            .filter(|u| u.round.is_none())
            .map(|u| u.id))
    }

    fn insert_upload_with(&self, record: &UploadRecord, sole_waiting: bool) -> Result<()> {
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
            let (mut entry, known): (UserUploads, bool) = match users.get(user)? {
                Some(v) => (
                    decode("upload_users", user, &v).map_err(Conflict::Abort)?,
                    true,
                ),
                None => (UserUploads::default(), false),
            };
            if sole_waiting && known {
                let newest = entry.newest_id.as_bytes();
                let waiting = match uploads.get(newest)? {
                    Some(v) => {
                        decode::<StoredUpload>("uploads", newest, &v)
                            .map_err(Conflict::Abort)?
                            .record
                            .round
                    }
                    .is_none(),
                    None => false,
                };
                if waiting {
                    return Err(Conflict::Abort(Error::UploadWaiting {
                        user: record.user_id.clone(),
                        id: entry.newest_id.clone(),
                    }));
                }
            }
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
            stats.most_by_one_user = stats.most_by_one_user.max(entry.count);
        }
        Ok(stats)
    }

    /// How many uploads `user_id` made (0 for a user who made none). Reads one index entry.
    pub fn user_upload_count(&self, user_id: &str) -> Result<u64> {
        let key = user_id.as_bytes();
        match self.upload_users.get(key)? {
            Some(v) => Ok(decode::<UserUploads>("upload_users", key, &v)?.count),
            None => Ok(0),
        }
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

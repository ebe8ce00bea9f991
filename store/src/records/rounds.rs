//! Committed rounds, by number.

use hivemind_protocol::Hash;
use serde::{Deserialize, Serialize};

use super::{decode, encode};
use crate::error::Result;
use crate::Store;

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

impl Store {
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
}

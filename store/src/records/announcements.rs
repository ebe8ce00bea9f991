//! Announcement envelopes, by round and adapter.

use hivemind_protocol::Hash;

use super::hash_from_key;
use crate::error::Result;
use crate::Store;

fn announcement_key(round: u64, adapter: &Hash) -> [u8; 40] {
    let mut key = [0u8; 40];
    key[..8].copy_from_slice(&round.to_be_bytes());
    key[8..].copy_from_slice(adapter.as_bytes());
    key
}

impl Store {
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
}

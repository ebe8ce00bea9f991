//! Retention: what a node may forget. The inputs of old rounds (adapter blobs and the
//! announcement envelopes that named them) are collected once their round is more than a few
//! rounds behind; round adapters, pending gateway uploads and anything a later round still
//! names are kept. Before, nothing was ever collected: one client grew a node's disk from
//! 94 MB to 3.8 GB in 35 s (issue 13).

use std::collections::BTreeSet;

use hivemind_protocol::Hash;

use crate::records::hash_from_key;
use crate::{Result, Store};

/// What [`Store::collect_rounds_before`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Collected {
    /// Announcement records removed.
    pub announcements: u64,
    /// Blob files removed.
    pub blobs: u64,
    /// Their bytes.
    pub bytes: u64,
}

impl Store {
    /// Forgets the inputs of every round before `round`: their announcement records, the
    /// envelope blobs and the adapter blobs, except blobs that are a committed round's
    /// adapter, a pending gateway upload, or named by an announcement of `round` or later.
    /// Gateway uploads that are neither pending nor named by such an announcement (one a
    /// user's newer upload superseded before it was announced, or one of an old round) lose
    /// their blob too; their records stay, for the listing.
    pub fn collect_rounds_before(&self, round: u64) -> Result<Collected> {
        // The uploads that may lose their blob are read before what is pending: an upload
        // stored meanwhile is then pending (kept) or not among them (untouched).
        let uploads = self.list_uploads()?;
        let mut keep: BTreeSet<Hash> = self.list_rounds()?.iter().map(|r| r.hash).collect();
        keep.extend(self.pending_uploads()?.iter().map(|u| u.blob));
        let mut old = Vec::new();
        for item in self.announcements.iter() {
            let (key, envelope) = item?;
            let key_round = key
                .get(..8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map_or(u64::MAX, u64::from_be_bytes);
            let adapter = hash_from_key("announcements", key.get(8..).unwrap_or_default())?;
            if key_round < round {
                old.push((key, adapter, Hash::of(&envelope)));
            } else {
                keep.insert(adapter);
                keep.insert(Hash::of(&envelope));
            }
        }
        let mut done = Collected::default();
        let mut gone = BTreeSet::new();
        let superseded: Vec<Hash> = uploads
            .into_iter()
            .map(|u| u.blob)
            .filter(|b| !keep.contains(b))
            .collect();
        for blob in superseded {
            if !gone.insert(blob) {
                continue;
            }
            let len = self.blob_len(&blob)?.unwrap_or(0);
            if self.remove_blob(&blob)? {
                done.blobs += 1;
                done.bytes += len;
            }
        }
        for (key, adapter, envelope) in old {
            self.announcements.remove(key)?;
            done.announcements += 1;
            for blob in [adapter, envelope] {
                if keep.contains(&blob) || !gone.insert(blob) {
                    continue;
                }
                let len = self.blob_len(&blob)?.unwrap_or(0);
                if self.remove_blob(&blob)? {
                    done.blobs += 1;
                    done.bytes += len;
                }
            }
        }
        self.flush()?;
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{RoundRecord, UploadRecord};

    #[test]
    fn old_inputs_go_and_round_adapters_pending_uploads_and_later_inputs_stay() -> anyhow::Result<()>
    {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let blob = |s: &str| store.put_blob(s.as_bytes());
        // Round 1: inputs a and shared; round 2: b and shared (named again); round 3: c.
        let (a, b, c, shared) = (blob("a")?, blob("b")?, blob("c")?, blob("shared")?);
        let pending = blob("pending upload")?;
        let round_adapter = blob("round 1 adapter")?;
        let mut envelopes = Vec::new();
        for (round, adapter) in [
            (1, a),
            (1, shared),
            (1, pending),
            (2, b),
            (2, shared),
            (3, c),
        ] {
            let env = format!("envelope {round} {adapter}").into_bytes();
            envelopes.push((round, store.put_blob(&env)?));
            store.put_announcement(round, &adapter, &env)?;
        }
        store.put_round(&RoundRecord {
            number: 1,
            hash: round_adapter,
            version: "round-1".into(),
            parent: None,
            contributors: vec![a, shared],
            rule: "iso-v2".into(),
            digest: vec![],
            committed_at_ms: 1,
        })?;
        // Amy's first upload, superseded by her second before it was announced.
        let superseded = blob("superseded upload")?;
        store.insert_upload(&UploadRecord {
            id: "u0".into(),
            user_id: "amy".into(),
            blob: superseded,
            base_model: "m".into(),
            version: "v".into(),
            uploaded_at: "s".into(),
            training_samples: 1,
            epochs: 1,
            round: None,
        })?;
        store.insert_upload(&UploadRecord {
            id: "u1".into(),
            user_id: "amy".into(),
            blob: pending,
            base_model: "m".into(),
            version: "v".into(),
            uploaded_at: "t".into(),
            training_samples: 1,
            epochs: 1,
            round: None,
        })?;

        let done = store.collect_rounds_before(3)?;
        assert_eq!(done.announcements, 5);
        // a, b and the envelopes of rounds 1 and 2 (5 of them); shared was named in round 2
        // but that round is collected too, so it goes; the pending upload stays.
        assert!(!store.has_blob(&a)? && !store.has_blob(&b)? && !store.has_blob(&shared)?);
        assert!(store.has_blob(&c)?, "round 3's input");
        assert!(store.has_blob(&round_adapter)?, "a round adapter");
        assert!(store.has_blob(&pending)?, "a pending upload");
        for (round, env) in &envelopes {
            assert_eq!(
                store.has_blob(env)?,
                *round >= 3,
                "envelope of round {round}"
            );
        }
        assert!(!store.has_blob(&superseded)?, "a superseded upload");
        assert_eq!(store.list_uploads()?.len(), 2, "upload records stay");
        assert_eq!(done.blobs, 3 + 5 + 1);
        assert!(store.list_announcements(1)?.is_empty() && store.list_announcements(2)?.is_empty());
        assert_eq!(store.list_announcements(3)?.len(), 1);
        // Collecting again finds nothing; what is left survives a reopen.
        assert_eq!(store.collect_rounds_before(3)?, Collected::default());
        drop(store);
        let store = Store::open(dir.path())?;
        assert!(store.has_blob(&c)? && store.has_blob(&round_adapter)?);
        assert!(!store.has_blob(&a)?);
        Ok(())
    }
}

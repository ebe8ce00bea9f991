//! Crash-safe storage of a HiveMind node: content-addressed blobs, records, identity.
//!
//! A data directory looks like this:
//!
//! ```text
//! <data dir>/
//!   identity.key     ed25519 key pair, 64 bytes, mode 0600   (identity.rs)
//!   db/              sled database: the blob index and all records
//!   blobs/<hex>      one file per blob, named by the blake3 hash of its bytes (blobs/)
//!   blobs/.tmp-*     in-flight writes; removed when the store is opened
//! ```
//!
//! Who talks to whom:
//!
//! ```text
//!   node (round driver, blob protocol, gateway)
//!     |  put_blob / BlobWriter / get_blob / read_blob_range     records: rounds, announcements,
//!     v                                                          peers, uploads (records/)
//!   Store ---- blobs/ (files, written temp -> fsync -> rename -> fsync dir)
//!     \------- db/    (sled trees, flushed before every write returns)
//! ```
//!
//! Every write method returns only after its data is durable, so an `Ok` survives
//! `kill -9`. [`Store::open`] repairs what an interrupted write can leave behind
//! (see [`Recovery`]); no manual repair is ever needed. Blob bytes are verified
//! against their hash whenever they are read whole ([`Store::get_blob`],
//! [`Store::verify_blob`]) or received ([`BlobWriter::finish`]).
//!
//! All methods block on disk I/O; async callers run them on blocking threads.
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod blobs;
mod error;
mod fsutil;
mod identity;
mod records;
mod retention;

use std::fmt;
use std::path::{Path, PathBuf};

pub use blobs::BlobWriter;
pub use error::{Error, Result};
pub use identity::{load_or_create_identity, load_or_create_identity_with, IDENTITY_FILE};
pub use records::{PeerRecord, RoundRecord, UploadRecord, UploadStats};
pub use retention::Collected;

/// Directory, under the data dir, that holds the blob files.
pub const BLOBS_DIR: &str = "blobs";
/// Directory, under the data dir, that holds the sled database.
pub const DB_DIR: &str = "db";

/// What [`Store::open`] repaired. All zeros after a clean shutdown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Recovery {
    /// Leftover temp files of interrupted writes, deleted.
    pub temp_files_removed: usize,
    /// Index entries whose blob file was missing or had the wrong length, dropped.
    pub entries_dropped: usize,
    /// Complete blob files that were not indexed yet (a crash between the rename and
    /// the index write), verified against their name and indexed.
    pub files_adopted: usize,
    /// Unindexed files named like a blob whose bytes did not match the name, deleted.
    pub files_removed: usize,
    /// The per-user upload index did not count every upload (a data dir from before it,
    /// or written by an older binary) and was rebuilt. Never set by a crash: the index is
    /// written in the same transaction as the uploads.
    pub uploads_reindexed: bool,
}

/// A node's store: blobs on disk, indexed in sled, and records in sled trees.
///
/// Cheap to clone; clones share the same database. Only one process may hold a
/// data directory open at a time (sled locks it).
#[derive(Clone)]
pub struct Store {
    root: PathBuf,
    blobs_dir: PathBuf,
    db: sled::Db,
    /// hash (32 bytes) -> [`blobs::BlobMeta`].
    blob_index: sled::Tree,
    /// round (8 bytes BE) ++ adapter hash (32 bytes) -> signed envelope bytes.
    announcements: sled::Tree,
    /// round number (8 bytes BE) -> [`RoundRecord`].
    rounds: sled::Tree,
    /// peer id (UTF-8) -> [`PeerRecord`].
    peers: sled::Tree,
    /// upload id (UTF-8) -> upload record with its insertion sequence number.
    uploads: sled::Tree,
    /// user id (UTF-8) -> the user's upload count and newest upload (kept in the same
    /// transaction as `uploads`).
    upload_users: sled::Tree,
    recovery: Recovery,
    /// Bytes to keep free on the data directory's disk ([`Store::ensure_room`]).
    min_free: u64,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating if needed) the store in data directory `dir`, then repairs
    /// whatever an interrupted write left behind (see [`Recovery`]).
    ///
    /// Fails with [`Error::Locked`] if another process holds the directory open.
    pub fn open(dir: impl AsRef<Path>) -> Result<Store> {
        let root = dir.as_ref().to_path_buf();
        fsutil::create_dir_private(&root)?;
        // Take sled's lock first: after this no other process writes here, so any
        // temp file found below is a leftover and safe to delete.
        let db = open_db(&root.join(DB_DIR))?;
        let blobs_dir = root.join(BLOBS_DIR);
        fsutil::create_dir_private(&blobs_dir)?;
        fsutil::sync_dir(&root)?;
        let mut store = Store {
            blob_index: db.open_tree("blobs")?,
            announcements: db.open_tree("announcements")?,
            rounds: db.open_tree("rounds")?,
            peers: db.open_tree("peers")?,
            uploads: db.open_tree("uploads")?,
            upload_users: db.open_tree("upload_users")?,
            db,
            root,
            blobs_dir,
            recovery: Recovery::default(),
            min_free: 0,
        };
        store.recovery = store.recover()?;
        store.recovery.uploads_reindexed = store.reindex_uploads_if_stale()?;
        Ok(store)
    }

    /// This store (and its clones made from now on) keeps `bytes` free on the data
    /// directory's disk: [`Store::ensure_room`] refuses what would go below it. Writes
    /// themselves do not check it, so what the node must write (its round adapters, its
    /// records) still goes through; callers check before taking in what others send.
    pub fn with_min_free(mut self, bytes: u64) -> Store {
        self.min_free = bytes;
        self
    }

    /// Bytes this process may still write on the data directory's file system.
    pub fn available_bytes(&self) -> Result<u64> {
        fsutil::available_bytes(&self.root)
    }

    /// Fails with [`Error::LowDisk`] when keeping `needed` more bytes would leave less than
    /// the floor ([`Store::with_min_free`]) free. When the free space cannot be read, it
    /// allows (a node that could not tell would otherwise take in nothing at all).
    pub fn ensure_room(&self, needed: u64) -> Result<()> {
        if self.min_free == 0 {
            return Ok(());
        }
        let Ok(available) = self.available_bytes() else {
            return Ok(());
        };
        if available < needed.saturating_add(self.min_free) {
            return Err(Error::LowDisk {
                available,
                needed,
                floor: self.min_free,
            });
        }
        Ok(())
    }

    /// The data directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// What opening this store repaired.
    pub fn recovery(&self) -> Recovery {
        self.recovery
    }

    /// Makes every write so far durable.
    fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }
}

/// How long [`Store::open`] waits for the database lock before it says the directory
/// is in use. sled releases its file lock only when the last of its background I/O
/// threads lets go of the file, a moment after the `Db` is dropped; a store closed and
/// reopened at once (a restart, a test) must not see that moment as another process.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Opens sled at `path`, waiting up to [`LOCK_WAIT`] for its lock.
fn open_db(path: &Path) -> Result<sled::Db> {
    let config = sled::Config::new()
        .path(path)
        .cache_capacity(64 * 1024 * 1024);
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match config.open() {
            Ok(db) => return Ok(db),
            Err(e) if is_lock_error(&e) => {
                if std::time::Instant::now() >= deadline {
                    return Err(Error::Locked {
                        path: path.to_path_buf(),
                    });
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// sled 0.34 reports a held lock only as an I/O error with this message.
fn is_lock_error(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The floor against `df`'s own figure, an independent reading of the same file system.
    #[test]
    fn the_disk_floor_is_measured_and_enforced() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let free = store.available_bytes()?;
        let out = std::process::Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(dir.path())
            .output()?;
        let text = String::from_utf8(out.stdout)?;
        let df: u64 = text.lines().nth(1).unwrap_or_default().trim().parse()?;
        // Other processes write meanwhile: allow 1% of drift.
        assert!(
            free.abs_diff(df) <= df / 100 + (1 << 20),
            "statvfs {free}, df {df}"
        );
        store.ensure_room(1 << 20)?;
        let strict = store.clone().with_min_free(free.saturating_add(1 << 30));
        match strict.ensure_room(1) {
            Err(Error::LowDisk { needed: 1, .. }) => {}
            other => panic!("below the floor: {other:?}"),
        }
        // The floor does not stop the store's own writes.
        strict.put_blob(b"still written")?;
        Ok(())
    }

    #[test]
    fn a_closed_store_reopens_at_once_and_an_open_one_is_refused_by_name() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        // Close and reopen right away, with writes (sled's I/O threads busy) in between:
        // each reopen must succeed, and see every write before it.
        let mut written = Vec::new();
        for i in 0u32..40 {
            let store = Store::open(dir.path())?;
            for hash in &written {
                assert!(
                    store.has_blob(hash)?,
                    "blob written before reopen {i} is gone"
                );
            }
            written.push(store.put_blob(&i.to_le_bytes().repeat(1000))?);
        }
        let store = Store::open(dir.path())?;
        match Store::open(dir.path()) {
            Err(Error::Locked { path }) => {
                assert_eq!(path, dir.path().join(DB_DIR));
                let message = Error::Locked { path }.to_string();
                assert!(message.contains("in use by another process"), "{message}");
            }
            other => panic!("a second open of a held store: {other:?}"),
        }
        drop(store);
        Store::open(dir.path())?;
        Ok(())
    }
}

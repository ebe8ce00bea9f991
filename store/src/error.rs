//! The one error type of the store crate.

use std::io;
use std::path::PathBuf;

use hivemind_protocol::Hash;

/// Everything that can go wrong in the store.
///
/// Variants carry the hash, path or record that failed, so a log line alone says
/// what to look at. Secret material (the identity key) never appears in an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file system operation failed.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// The file or directory being worked on.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// Keeping `needed` more bytes would leave less free space on the data directory's
    /// disk than the floor the node keeps ([`crate::Store::with_min_free`]).
    #[error(
        "the disk is nearly full: {available} bytes free, {needed} more would go below the \
         {floor} bytes this node keeps free"
    )]
    LowDisk {
        /// Bytes free for this process on the data directory's file system.
        available: u64,
        /// Bytes asked for.
        needed: u64,
        /// The floor.
        floor: u64,
    },

    /// Another process (or another `Store` in this one) holds the data directory open.
    #[error(
        "the data directory's database {} is in use by another process (is a node running on it?)",
        path.display()
    )]
    Locked {
        /// The database directory.
        path: PathBuf,
    },

    /// The sled database failed.
    #[error("database error: {source}")]
    Db {
        /// The underlying error.
        #[from]
        source: sled::Error,
    },

    /// A stored blob no longer matches its name: its bytes are damaged.
    /// The bytes are not returned. Remove it with `Store::remove_blob` and fetch it again.
    #[error(
        "blob {hash} is corrupt: its bytes hash to {actual} ({len} bytes, {expected_len} expected)"
    )]
    Corrupt {
        /// The name (expected hash) of the blob.
        hash: Hash,
        /// The hash of the bytes actually on disk.
        actual: Hash,
        /// How many bytes were on disk.
        len: u64,
        /// How many bytes the index records.
        expected_len: u64,
    },

    /// Bytes received for a blob do not hash to the name they were sent under.
    #[error("hash mismatch: expected {expected}, received bytes hash to {actual}")]
    HashMismatch {
        /// The hash the bytes were announced under.
        expected: Hash,
        /// The hash of the bytes received.
        actual: Hash,
    },

    /// A chunk was written past the announced length of a blob transfer.
    #[error(
        "blob {hash}: chunk of {len} bytes at offset {offset} exceeds the blob length {blob_len}"
    )]
    ChunkOutOfBounds {
        /// The blob being received.
        hash: Hash,
        /// The chunk's offset.
        offset: u64,
        /// The chunk's length.
        len: u64,
        /// The announced blob length.
        blob_len: u64,
    },

    /// A blob transfer was finished before every byte had arrived.
    #[error("blob {hash}: incomplete, {received} of {blob_len} bytes received")]
    Incomplete {
        /// The blob being received.
        hash: Hash,
        /// Bytes received so far (overlaps counted once).
        received: u64,
        /// The announced blob length.
        blob_len: u64,
    },

    /// A range read started past the end of a blob.
    #[error("blob {hash}: offset {offset} is past its end ({blob_len} bytes)")]
    RangeOutOfBounds {
        /// The blob being read.
        hash: Hash,
        /// The requested offset.
        offset: u64,
        /// The blob's length.
        blob_len: u64,
    },

    /// A record in the database could not be decoded.
    #[error("corrupt record in tree {tree:?} (key {key}): {detail}")]
    CorruptRecord {
        /// The sled tree holding the record.
        tree: &'static str,
        /// The record's key, hex-encoded.
        key: String,
        /// What was wrong with it.
        detail: String,
    },

    /// A record could not be encoded (a bug, not a disk problem).
    #[error("cannot encode a record for tree {tree:?}: {detail}")]
    Encode {
        /// The sled tree the record was meant for.
        tree: &'static str,
        /// The encoder's message.
        detail: String,
    },

    /// An upload with this id is already registered.
    #[error("upload {id:?} already exists")]
    UploadExists {
        /// The upload id.
        id: String,
    },

    /// The user already has an upload waiting for a round (and the caller allows one).
    #[error("{user:?} already has an upload waiting for a round ({id:?})")]
    UploadWaiting {
        /// The user id.
        user: String,
        /// The waiting upload's id.
        id: String,
    },

    /// No upload with this id is registered.
    #[error("no upload with id {id:?}")]
    UnknownUpload {
        /// The upload id.
        id: String,
    },

    /// The node identity key file exists but cannot be used. It is never replaced
    /// automatically: that would silently change the node's identity.
    #[error("identity key file {} is corrupt: {detail}; move it away to create a new identity", path.display())]
    CorruptIdentity {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it (never the key bytes).
        detail: String,
    },
}

/// The store's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches a path to an I/O error.
pub(crate) trait IoContext<T> {
    /// Wraps the error as [`Error::Io`] naming `path`.
    fn at(self, path: &std::path::Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: &std::path::Path) -> Result<T> {
        self.map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

//! Content-addressed blobs: files under `blobs/` named by the blake3 hex of their
//! bytes, indexed in the sled tree `blobs` (hash -> length).
//!
//! Write path (every writer, including [`BlobWriter`]):
//!
//! ```text
//!   blobs/.tmp-<random>  --write--> fsync --rename--> blobs/<hex>  --> fsync blobs/
//!                                                                  --> index insert --> sled flush --> Ok
//! ```
//!
//! So an index entry always names a complete, durable file, and a file under its
//! final name is always complete. [`Store::open`] deletes temp files, drops index
//! entries whose file is gone or has the wrong length, and indexes final-named
//! files that are missing from the index after checking their hash.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use hivemind_protocol::Hash;
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::fsutil::{create_temp, remove_prefixed, sync_dir, Writeback};
use crate::records::{decode, encode, hash_from_key};
use crate::{Recovery, Store};

mod writer;

pub use writer::BlobWriter;

/// Prefix of in-flight blob files; never a valid hex hash, so never mistaken for a blob.
const TEMP_PREFIX: &str = ".tmp-";
/// Permission bits of blob files (Unix).
const BLOB_MODE: u32 = 0o600;
/// Buffer size for streaming copies and hashing.
const CHUNK: usize = 256 * 1024;

/// Index value of a blob.
#[derive(Serialize, Deserialize)]
pub(crate) struct BlobMeta {
    pub(crate) len: u64,
}

/// A temp file that is deleted when dropped, unless it was renamed into place.
struct TempFile {
    path: PathBuf,
    armed: bool,
}

impl TempFile {
    fn new(path: PathBuf) -> Self {
        TempFile { path, armed: true }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.armed {
            // Best effort: a leftover is removed by the next `Store::open` anyway.
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Hashes the next `len` bytes of `reader`; returns the hash and how many bytes there were.
fn hash_reader(reader: impl Read, len: u64) -> io::Result<(Hash, u64)> {
    let mut hasher = blake3::Hasher::new();
    let mut counter = CountingReader {
        inner: reader.take(len),
        count: 0,
    };
    hasher.update_reader(&mut counter)?;
    Ok((Hash::from(hasher.finalize()), counter.count))
}

struct CountingReader<R> {
    inner: R,
    count: u64,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

impl Store {
    fn final_path(&self, hash: &Hash) -> PathBuf {
        self.blobs_dir.join(hash.to_hex())
    }

    fn indexed_len(&self, hash: &Hash) -> Result<Option<u64>> {
        self.blob_index
            .get(hash.as_bytes())?
            .map(|v| decode::<BlobMeta>("blobs", hash.as_bytes(), &v).map(|m| m.len))
            .transpose()
    }

    /// Whether `hash` is indexed and its file has length `len` (so a write can be skipped).
    fn already_stored(&self, hash: &Hash, len: u64) -> Result<bool> {
        if self.indexed_len(hash)? != Some(len) {
            return Ok(false);
        }
        let path = self.final_path(hash);
        match fs::metadata(&path) {
            Ok(m) => Ok(m.is_file() && m.len() == len),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e).at(&path),
        }
    }

    fn new_temp(&self) -> Result<(File, TempFile)> {
        let (file, path) = create_temp(&self.blobs_dir, TEMP_PREFIX, BLOB_MODE)?;
        Ok((file, TempFile::new(path)))
    }

    /// Makes a fully written, verified temp file the blob `hash`, durably.
    fn install(&self, file: File, mut temp: TempFile, hash: &Hash, len: u64) -> Result<()> {
        file.sync_all().at(&temp.path)?;
        drop(file);
        let dest = self.final_path(hash);
        fs::rename(&temp.path, &dest).at(&dest)?;
        temp.armed = false;
        sync_dir(&self.blobs_dir)?;
        self.blob_index
            .insert(hash.as_bytes(), encode("blobs", &BlobMeta { len })?)?;
        self.flush()
    }

    /// Stores `bytes` and returns their hash. Once this returns `Ok` the blob
    /// survives a crash. Storing bytes that are already present writes nothing.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<Hash> {
        let hash = Hash::of(bytes);
        let len = bytes.len() as u64;
        if self.already_stored(&hash, len)? {
            return Ok(hash);
        }
        let (mut file, temp) = self.new_temp()?;
        file.write_all(bytes).at(&temp.path)?;
        self.install(file, temp, &hash, len)?;
        Ok(hash)
    }

    /// Stores the contents of the file at `path` and returns their hash, streaming:
    /// the file is hashed while it is copied, never held in memory whole.
    pub fn put_blob_file(&self, path: impl AsRef<Path>) -> Result<Hash> {
        let src_path = path.as_ref();
        let mut src = File::open(src_path).at(src_path)?;
        let (mut file, temp) = self.new_temp()?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; CHUNK];
        let mut len = 0u64;
        let mut writeback = Writeback::default();
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).at(src_path),
            };
            let chunk = buf.get(..n).unwrap_or_default();
            hasher.update(chunk);
            file.write_all(chunk).at(&temp.path)?;
            len += n as u64;
            writeback.wrote(&file, len);
        }
        let hash = Hash::from(hasher.finalize());
        if self.already_stored(&hash, len)? {
            return Ok(hash); // `temp` is deleted on drop
        }
        self.install(file, temp, &hash, len)?;
        Ok(hash)
    }

    /// The bytes of blob `hash`, verified: `Ok(None)` if it is not stored,
    /// [`Error::Corrupt`] (and no bytes) if the file no longer hashes to `hash`.
    pub fn get_blob(&self, hash: &Hash) -> Result<Option<Vec<u8>>> {
        let Some(expected_len) = self.indexed_len(hash)? else {
            return Ok(None);
        };
        let Some((bytes, actual)) = read_hashed(&self.final_path(hash))? else {
            return Ok(None);
        };
        if actual != *hash {
            return Err(Error::Corrupt {
                hash: *hash,
                actual,
                len: bytes.len() as u64,
                expected_len,
            });
        }
        Ok(Some(bytes))
    }

    /// Reads blob `hash` of the store in data dir `dir` without opening its database,
    /// which a running node holds locked (`hive-node export` and `chat` read committed
    /// round adapters this way while the node runs). The bytes are verified against
    /// `hash`; `Ok(None)` when the blob's file is absent.
    pub fn read_blob_unlocked(dir: &Path, hash: &Hash) -> Result<Option<Vec<u8>>> {
        let path = dir.join(crate::BLOBS_DIR).join(hash.to_hex());
        let Some((bytes, actual)) = read_hashed(&path)? else {
            return Ok(None);
        };
        if actual != *hash {
            return Err(Error::HashMismatch {
                expected: *hash,
                actual,
            });
        }
        Ok(Some(bytes))
    }

    /// Re-hashes blob `hash` from disk, streaming. `Ok(true)` if it is stored and
    /// intact, `Ok(false)` if it is not stored, [`Error::Corrupt`] if it is damaged.
    pub fn verify_blob(&self, hash: &Hash) -> Result<bool> {
        let Some(expected_len) = self.indexed_len(hash)? else {
            return Ok(false);
        };
        let path = self.final_path(hash);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e).at(&path),
        };
        let (actual, len) = hash_reader(file, u64::MAX).at(&path)?;
        if actual != *hash {
            return Err(Error::Corrupt {
                hash: *hash,
                actual,
                len,
                expected_len,
            });
        }
        Ok(true)
    }

    /// Whether blob `hash` is stored (per the index; bytes are not re-checked).
    pub fn has_blob(&self, hash: &Hash) -> Result<bool> {
        Ok(self.blob_index.contains_key(hash.as_bytes())?)
    }

    /// The length of blob `hash`, if it is stored.
    pub fn blob_len(&self, hash: &Hash) -> Result<Option<u64>> {
        self.indexed_len(hash)
    }

    /// Up to `len` bytes of blob `hash` starting at `offset`, for serving chunks;
    /// shorter at the end of the blob. `Ok(None)` if the blob is not stored,
    /// [`Error::RangeOutOfBounds`] if `offset` is past its end.
    ///
    /// Chunks are not verified here (a chunk has no hash of its own); the receiver
    /// verifies the whole blob. Callers cap `len` (at most the blob length is allocated).
    pub fn read_blob_range(&self, hash: &Hash, offset: u64, len: u64) -> Result<Option<Vec<u8>>> {
        let Some(blob_len) = self.indexed_len(hash)? else {
            return Ok(None);
        };
        if offset > blob_len {
            return Err(Error::RangeOutOfBounds {
                hash: *hash,
                offset,
                blob_len,
            });
        }
        let n = len.min(blob_len - offset);
        let path = self.final_path(hash);
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).at(&path),
        };
        file.seek(SeekFrom::Start(offset)).at(&path)?;
        let mut out = Vec::new();
        // `n <= blob_len`, which the index recorded when the blob was written.
        out.try_reserve_exact(usize::try_from(n).unwrap_or(usize::MAX))
            .map_err(|e| io::Error::new(io::ErrorKind::OutOfMemory, e))
            .at(&path)?;
        file.take(n).read_to_end(&mut out).at(&path)?;
        if out.len() as u64 != n {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("blob {hash} is shorter than its recorded length {blob_len}"),
            ))
            .at(&path);
        }
        Ok(Some(out))
    }

    /// The file holding blob `hash`, for memory-mapping or loading, if it is stored.
    /// The bytes are not re-checked here; see [`Store::verify_blob`].
    pub fn blob_path(&self, hash: &Hash) -> Result<Option<PathBuf>> {
        Ok(self.has_blob(hash)?.then(|| self.final_path(hash)))
    }

    /// Every stored blob and its length, sorted by hash.
    pub fn list_blobs(&self) -> Result<Vec<(Hash, u64)>> {
        self.blob_index
            .iter()
            .map(|item| {
                let (k, v) = item?;
                let hash = hash_from_key("blobs", &k)?;
                let meta: BlobMeta = decode("blobs", &k, &v)?;
                Ok((hash, meta.len))
            })
            .collect()
    }

    /// Deletes blob `hash`; returns whether it was stored. The file goes first, so
    /// a crash in between leaves an index entry that the next open drops.
    pub fn remove_blob(&self, hash: &Hash) -> Result<bool> {
        let path = self.final_path(hash);
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.blobs_dir)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).at(&path),
        }
        let existed = self.blob_index.remove(hash.as_bytes())?.is_some();
        self.flush()?;
        Ok(existed)
    }

    /// Repairs what interrupted writes left in `blobs/` and the index. Called by `open`.
    pub(crate) fn recover(&self) -> Result<Recovery> {
        let mut report = Recovery {
            temp_files_removed: remove_prefixed(&self.blobs_dir, TEMP_PREFIX)?,
            ..Recovery::default()
        };

        // Index entries must name a complete file.
        for item in self.blob_index.iter() {
            let (key, value) = item?;
            let intact = match (
                hash_from_key("blobs", &key),
                decode::<BlobMeta>("blobs", &key, &value),
            ) {
                (Ok(hash), Ok(meta)) => {
                    let path = self.final_path(&hash);
                    match fs::metadata(&path) {
                        Ok(m) => m.is_file() && m.len() == meta.len,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
                        Err(e) => return Err(e).at(&path),
                    }
                }
                // An undecodable entry can only be dropped; the file, if any, is
                // re-adopted below after checking its hash.
                _ => false,
            };
            if !intact {
                self.blob_index.remove(&key)?;
                report.entries_dropped += 1;
            }
        }

        // Final-named files missing from the index: a crash after the rename and
        // before the index flush. Keep them if their bytes match their name.
        for entry in fs::read_dir(&self.blobs_dir).at(&self.blobs_dir)? {
            let entry = entry.at(&self.blobs_dir)?;
            let name = entry.file_name();
            let Some(hash) = name
                .to_str()
                .and_then(|n| n.parse::<Hash>().ok().filter(|h| h.to_hex() == n))
            else {
                continue; // not ours
            };
            if self.blob_index.contains_key(hash.as_bytes())? {
                continue;
            }
            let path = entry.path();
            if !entry.file_type().at(&path)?.is_file() {
                continue;
            }
            let file = File::open(&path).at(&path)?;
            let (actual, len) = hash_reader(file, u64::MAX).at(&path)?;
            if actual == hash {
                self.blob_index
                    .insert(hash.as_bytes(), encode("blobs", &BlobMeta { len })?)?;
                report.files_adopted += 1;
            } else {
                fs::remove_file(&path).at(&path)?;
                report.files_removed += 1;
            }
        }

        if report != Recovery::default() {
            sync_dir(&self.blobs_dir)?;
            self.flush()?;
        }
        Ok(report)
    }
}

/// The bytes of the file at `path` and their blake3; `None` when there is no file.
fn read_hashed(path: &Path) -> Result<Option<(Vec<u8>, Hash)>> {
    match fs::read(path) {
        Ok(bytes) => {
            let hash = Hash::of(&bytes);
            Ok(Some((bytes, hash)))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).at(path),
    }
}

#[cfg(test)]
mod tests;

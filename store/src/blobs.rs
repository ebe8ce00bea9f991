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

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use hivemind_protocol::Hash;
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::fsutil::{create_temp, remove_prefixed, sync_dir, Writeback};
use crate::records::{decode, encode, hash_from_key};
use crate::{Recovery, Store};

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

    /// Starts receiving blob `expected` of `len` bytes in chunks (see [`BlobWriter`]).
    pub fn blob_writer(&self, expected: Hash, len: u64) -> Result<BlobWriter> {
        let (file, temp) = self.new_temp()?;
        Ok(BlobWriter {
            store: self.clone(),
            expected,
            len,
            file,
            temp,
            received: RangeSet::default(),
            hasher: blake3::Hasher::new(),
            hashed_upto: 0,
            writeback: Writeback::default(),
        })
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

/// Receives one blob of known hash and length in chunks, at any offsets, in any
/// order, possibly overlapping.
///
/// Chunks go to a temp file; nothing is visible in the store until [`finish`]
/// has checked the blake3 hash of the whole. Dropping the writer (or a failed
/// `finish`) deletes the temp file.
///
/// [`finish`]: BlobWriter::finish
pub struct BlobWriter {
    store: Store,
    expected: Hash,
    len: u64,
    file: File,
    temp: TempFile,
    received: RangeSet,
    /// Hash of bytes `[0, hashed_upto)` as written; chunks arriving in order are
    /// hashed on the fly so `finish` reads back only what came out of order.
    hasher: blake3::Hasher,
    hashed_upto: u64,
    writeback: Writeback,
}

impl fmt::Debug for BlobWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobWriter")
            .field("expected", &self.expected)
            .field("len", &self.len)
            .field("received", &self.received.covered())
            .finish_non_exhaustive()
    }
}

impl BlobWriter {
    /// The hash the blob must have.
    pub fn expected_hash(&self) -> Hash {
        self.expected
    }

    /// The announced length of the blob.
    pub fn blob_len(&self) -> u64 {
        self.len
    }

    /// Writes `data` at `offset`. [`Error::ChunkOutOfBounds`] if it would extend
    /// past the announced length.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let n = data.len() as u64;
        let end = offset.checked_add(n).filter(|&end| end <= self.len).ok_or(
            Error::ChunkOutOfBounds {
                hash: self.expected,
                offset,
                len: n,
                blob_len: self.len,
            },
        )?;
        if n == 0 {
            return Ok(());
        }
        if offset < self.hashed_upto {
            // Rewriting bytes already hashed: start over, `finish` re-reads them.
            self.hasher.reset();
            self.hashed_upto = 0;
        }
        self.file
            .seek(SeekFrom::Start(offset))
            .and_then(|_| self.file.write_all(data))
            .at(&self.temp.path)?;
        if offset == self.hashed_upto {
            self.hasher.update(data);
            self.hashed_upto = end;
            self.writeback.wrote(&self.file, end);
        }
        self.received.insert(offset, end);
        Ok(())
    }

    /// Bytes received so far, overlaps counted once.
    pub fn received(&self) -> u64 {
        self.received.covered()
    }

    /// Whether every byte has been received.
    pub fn is_complete(&self) -> bool {
        self.received() == self.len
    }

    /// The byte ranges not received yet, in order.
    pub fn missing(&self) -> Vec<Range<u64>> {
        self.received.gaps(self.len)
    }

    /// Checks the received bytes against the expected hash and, only if they
    /// match, stores the blob durably and returns its hash. On
    /// [`Error::Incomplete`] or [`Error::HashMismatch`] nothing becomes visible.
    pub fn finish(mut self) -> Result<Hash> {
        let received = self.received();
        if received != self.len {
            return Err(Error::Incomplete {
                hash: self.expected,
                received,
                blob_len: self.len,
            });
        }
        let start = self.hashed_upto;
        self.file
            .seek(SeekFrom::Start(start))
            .and_then(|_| {
                let mut rest = (&mut self.file).take(self.len - start);
                self.hasher.update_reader(&mut rest).map(|_| ())
            })
            .at(&self.temp.path)?;
        let actual = Hash::from(self.hasher.finalize());
        if actual != self.expected {
            return Err(Error::HashMismatch {
                expected: self.expected,
                actual,
            });
        }
        let BlobWriter {
            store,
            file,
            temp,
            expected,
            len,
            ..
        } = self;
        store.install(file, temp, &expected, len)?;
        Ok(expected)
    }
}

/// A set of disjoint, non-adjacent half-open ranges of `u64`.
#[derive(Debug, Default, Clone)]
struct RangeSet {
    /// start -> end.
    ranges: BTreeMap<u64, u64>,
}

impl RangeSet {
    /// Adds `[start, end)`, merging with what it overlaps or touches.
    fn insert(&mut self, mut start: u64, mut end: u64) {
        if start >= end {
            return;
        }
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
            }
        }
        let absorbed: Vec<u64> = self.ranges.range(start..=end).map(|(&s, _)| s).collect();
        for s in absorbed {
            if let Some(e) = self.ranges.remove(&s) {
                end = end.max(e);
            }
        }
        self.ranges.insert(start, end);
    }

    /// Total length covered.
    fn covered(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
    }

    /// The parts of `[0, len)` not covered.
    fn gaps(&self, len: u64) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        let mut pos = 0;
        for (&s, &e) in &self.ranges {
            if s > pos {
                out.push(pos..s.min(len));
            }
            pos = pos.max(e);
        }
        if pos < len {
            out.push(pos..len);
        }
        out
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
mod tests {
    use super::*;
    use crate::fsutil::WRITEBACK_BYTES;
    use rand::{Rng, SeedableRng};

    fn random_bytes(rng: &mut impl Rng, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        rng.fill(&mut v[..]);
        v
    }

    #[test]
    fn read_blob_unlocked_reads_while_the_store_is_open_and_checks_the_hash() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let bytes = b"a round adapter".to_vec();
        let hash = store.put_blob(&bytes).unwrap();
        // The database is locked by `store`; the blob is still readable.
        assert_eq!(
            Store::read_blob_unlocked(dir.path(), &hash).unwrap(),
            Some(bytes)
        );
        let absent = Hash::of(b"never stored");
        assert_eq!(
            Store::read_blob_unlocked(dir.path(), &absent).unwrap(),
            None
        );
        // A damaged file is refused, naming both hashes.
        fs::write(store.final_path(&hash), b"tampered").unwrap();
        match Store::read_blob_unlocked(dir.path(), &hash) {
            Err(Error::HashMismatch { expected, actual }) => {
                assert_eq!(expected, hash);
                assert_eq!(actual, Hash::of(b"tampered"));
            }
            other => panic!("expected a hash mismatch, got {other:?}"),
        }
    }

    /// Names of all entries in the blobs directory, sorted.
    fn blob_dir_names(store: &Store) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(&store.blobs_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn put_get_round_trip_dedup_and_metadata() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let bytes = b"hello hivemind".to_vec();
        let hash = store.put_blob(&bytes)?;
        assert_eq!(hash, Hash::of(&bytes));
        assert_eq!(store.get_blob(&hash)?, Some(bytes.clone()));
        assert!(store.has_blob(&hash)?);
        assert_eq!(store.blob_len(&hash)?, Some(bytes.len() as u64));
        let path = store.blob_path(&hash)?.expect("stored blob has a path");
        assert_eq!(fs::read(&path)?, bytes);
        assert_eq!(
            path.file_name().unwrap().to_str(),
            Some(hash.to_hex().as_str())
        );
        assert!(store.verify_blob(&hash)?);

        // Storing again is a no-op; the empty blob is a blob like any other.
        assert_eq!(store.put_blob(&bytes)?, hash);
        let empty = store.put_blob(b"")?;
        assert_eq!(store.get_blob(&empty)?, Some(Vec::new()));
        let mut expected = vec![(hash, bytes.len() as u64), (empty, 0)];
        expected.sort();
        assert_eq!(store.list_blobs()?, expected);
        assert_eq!(blob_dir_names(&store).len(), 2, "no temp files left behind");

        let absent = Hash::of(b"absent");
        assert_eq!(store.get_blob(&absent)?, None);
        assert!(!store.has_blob(&absent)?);
        assert_eq!(store.blob_len(&absent)?, None);
        assert_eq!(store.blob_path(&absent)?, None);
        assert!(!store.verify_blob(&absent)?);
        assert_eq!(store.read_blob_range(&absent, 0, 10)?, None);

        // Survives reopening.
        drop(store);
        let store = Store::open(dir.path())?;
        assert_eq!(store.recovery(), Recovery::default());
        assert_eq!(store.get_blob(&hash)?, Some(bytes));
        Ok(())
    }

    #[test]
    fn put_blob_file_streams_to_the_same_hash() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path().join("data"))?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        // Several buffers long, not a multiple of the buffer size.
        let bytes = random_bytes(&mut rng, 3 * CHUNK + 12_345);
        let src = dir.path().join("adapter.safetensors");
        fs::write(&src, &bytes)?;
        let hash = store.put_blob_file(&src)?;
        // Reference: blake3 of the whole buffer in one call.
        assert_eq!(hash, Hash::of(&bytes));
        assert_eq!(store.get_blob(&hash)?, Some(bytes.clone()));
        assert_eq!(store.put_blob_file(&src)?, hash, "second store is a no-op");
        assert_eq!(blob_dir_names(&store), vec![hash.to_hex()]);

        let missing = dir.path().join("nope");
        match store.put_blob_file(&missing) {
            Err(Error::Io { path, .. }) => assert_eq!(path, missing),
            other => panic!("expected an I/O error naming the path, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn corrupted_blob_file_is_detected_and_not_returned() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let bytes: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let hash = store.put_blob(&bytes)?;
        let path = store.blob_path(&hash)?.unwrap();
        let mut damaged = bytes.clone();
        damaged[5_000] ^= 0x01; // one flipped bit, same length
        fs::write(&path, &damaged)?;

        let err = store.get_blob(&hash).unwrap_err();
        match &err {
            Error::Corrupt {
                hash: h,
                actual,
                len,
                expected_len,
            } => {
                assert_eq!(*h, hash);
                assert_eq!(*actual, Hash::of(&damaged));
                assert_eq!((*len, *expected_len), (10_000, 10_000));
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        assert!(
            err.to_string().contains(&hash.to_hex()),
            "error names the hash: {err}"
        );
        assert!(matches!(
            store.verify_blob(&hash),
            Err(Error::Corrupt { .. })
        ));

        // Same length, so opening does not notice; reading always does. The fix
        // is to remove and fetch again.
        assert!(store.remove_blob(&hash)?);
        assert!(!path.exists());
        assert!(!store.has_blob(&hash)?);
        assert!(!store.remove_blob(&hash)?);
        assert_eq!(store.put_blob(&bytes)?, hash);
        assert_eq!(store.get_blob(&hash)?, Some(bytes));
        Ok(())
    }

    #[test]
    fn read_blob_range_matches_slices() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let bytes = random_bytes(&mut rng, 100_003);
        let hash = store.put_blob(&bytes)?;
        let n = bytes.len() as u64;
        for (offset, len) in [
            (0, 10),
            (0, n),
            (17, 65_536),
            (n - 5, 100),
            (n, 10),
            (3, 0),
            (0, u64::MAX),
        ] {
            let got = store.read_blob_range(&hash, offset, len)?.unwrap();
            let end = offset.saturating_add(len).min(n);
            assert_eq!(
                got,
                bytes[offset as usize..end as usize],
                "offset {offset} len {len}"
            );
        }
        match store.read_blob_range(&hash, n + 1, 1) {
            Err(Error::RangeOutOfBounds {
                offset, blob_len, ..
            }) => assert_eq!((offset, blob_len), (n + 1, n)),
            other => panic!("expected RangeOutOfBounds, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn blobs_larger_than_the_writeback_step_arrive_whole() -> anyhow::Result<()> {
        // Several writeback kicks (every WRITEBACK_BYTES) and a tail that is not a multiple
        // of the chunk size, through both streaming writers.
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        let bytes = random_bytes(&mut rng, 2 * WRITEBACK_BYTES as usize + 300_001);
        let hash = Hash::of(&bytes);
        let mut w = store.blob_writer(hash, bytes.len() as u64)?;
        for (i, chunk) in bytes.chunks(1 << 20).enumerate() {
            w.write_at((i << 20) as u64, chunk)?;
        }
        assert_eq!(w.finish()?, hash);
        assert_eq!(store.get_blob(&hash)?.as_deref(), Some(&bytes[..]));
        assert!(store.remove_blob(&hash)?);
        let src = dir.path().join("source.bin");
        fs::write(&src, &bytes)?;
        assert_eq!(store.put_blob_file(&src)?, hash);
        assert!(store.verify_blob(&hash)?);
        Ok(())
    }

    #[test]
    fn blob_writer_accepts_chunks_in_any_order() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let bytes = random_bytes(&mut rng, 70_000);
        let hash = Hash::of(&bytes);

        // In order, then shuffled with overlapping duplicates.
        for shuffle in [false, true] {
            let mut chunks: Vec<(usize, usize)> = (0..bytes.len())
                .step_by(4096)
                .map(|s| (s, (s + 4096).min(bytes.len())))
                .collect();
            if shuffle {
                chunks.push((1000, 9000));
                chunks.push((65_000, 70_000));
                for i in (1..chunks.len()).rev() {
                    chunks.swap(i, rng.gen_range(0..=i));
                }
            }
            let mut w = store.blob_writer(hash, bytes.len() as u64)?;
            assert_eq!(w.missing(), vec![0..70_000]);
            for &(s, e) in &chunks {
                assert!(!w.is_complete());
                w.write_at(s as u64, &bytes[s..e])?;
            }
            assert!(w.is_complete());
            assert_eq!(w.received(), 70_000);
            assert!(w.missing().is_empty());
            assert!(
                !store.has_blob(&hash)? || shuffle,
                "invisible before finish"
            );
            assert_eq!(w.finish()?, hash);
            assert_eq!(store.get_blob(&hash)?, Some(bytes.clone()));
            assert_eq!(blob_dir_names(&store), vec![hash.to_hex()]);
        }
        Ok(())
    }

    #[test]
    fn blob_writer_with_a_wrong_byte_leaves_nothing_visible() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let bytes: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 256) as u8).collect();
        let hash = Hash::of(&bytes);
        let mut bad = bytes.clone();
        bad[12_345] = bad[12_345].wrapping_add(1);

        let mut w = store.blob_writer(hash, bytes.len() as u64)?;
        for s in (0..bad.len()).step_by(1000) {
            w.write_at(s as u64, &bad[s..s + 1000])?;
        }
        match w.finish() {
            Err(Error::HashMismatch { expected, actual }) => {
                assert_eq!(expected, hash);
                assert_eq!(actual, Hash::of(&bad));
            }
            other => panic!("expected HashMismatch, got {other:?}"),
        }
        assert!(!store.has_blob(&hash)?);
        assert_eq!(store.get_blob(&hash)?, None);
        assert!(blob_dir_names(&store).is_empty(), "no file, temp or final");

        // Re-sending the bad chunk correctly repairs a transfer in progress (the
        // on-the-fly hash must restart when hashed bytes are overwritten).
        let mut w = store.blob_writer(hash, bytes.len() as u64)?;
        for s in (0..bad.len()).step_by(1000) {
            w.write_at(s as u64, &bad[s..s + 1000])?;
        }
        w.write_at(12_000, &bytes[12_000..13_000])?;
        assert_eq!(w.finish()?, hash);
        assert_eq!(store.get_blob(&hash)?, Some(bytes));
        Ok(())
    }

    #[test]
    fn blob_writer_rejects_out_of_bounds_and_incomplete() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let bytes = vec![42u8; 1000];
        let hash = Hash::of(&bytes);
        let mut w = store.blob_writer(hash, 1000)?;
        assert!(matches!(
            w.write_at(990, &[0; 11]),
            Err(Error::ChunkOutOfBounds {
                offset: 990,
                len: 11,
                blob_len: 1000,
                ..
            })
        ));
        assert!(matches!(
            w.write_at(u64::MAX, &[0; 2]),
            Err(Error::ChunkOutOfBounds { .. })
        ));
        w.write_at(0, &bytes[..400])?;
        w.write_at(600, &bytes[600..])?;
        assert_eq!(w.missing(), vec![400..600]);
        match w.finish() {
            Err(Error::Incomplete {
                received, blob_len, ..
            }) => assert_eq!((received, blob_len), (800, 1000)),
            other => panic!("expected Incomplete, got {other:?}"),
        }
        // A dropped writer leaves nothing either.
        let mut w = store.blob_writer(hash, 1000)?;
        w.write_at(0, &bytes)?;
        drop(w);
        assert!(blob_dir_names(&store).is_empty());
        assert!(!store.has_blob(&hash)?);
        Ok(())
    }

    #[test]
    fn open_repairs_interrupted_writes() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let [a, b, c] =
            [b"blob a".as_slice(), b"blob b", b"blob c"].map(|x| store.put_blob(x).unwrap());
        let blobs = store.blobs_dir.clone();
        drop(store);

        fs::write(blobs.join(".tmp-0123456789abcdef"), b"half a bl")?; // interrupted write
        fs::remove_file(blobs.join(a.to_hex()))?; // file lost
        fs::write(blobs.join(b.to_hex()), b"blob")?; // truncated
        let d = Hash::of(b"blob d"); // renamed, index entry not yet written
        fs::write(blobs.join(d.to_hex()), b"blob d")?;
        let e = Hash::of(b"blob e"); // a file under a name its bytes do not match
        fs::write(blobs.join(e.to_hex()), b"something else")?;
        fs::write(blobs.join("README"), b"not ours")?;

        let store = Store::open(dir.path())?;
        assert_eq!(
            store.recovery(),
            Recovery {
                temp_files_removed: 1,
                entries_dropped: 2,
                files_adopted: 1,
                files_removed: 2, // e, and b once its entry was dropped
                uploads_reindexed: false,
            }
        );
        assert!(!store.has_blob(&a)?);
        assert!(!store.has_blob(&b)?);
        assert_eq!(store.get_blob(&c)?.as_deref(), Some(b"blob c".as_slice()));
        assert_eq!(store.get_blob(&d)?.as_deref(), Some(b"blob d".as_slice()));
        assert!(!store.has_blob(&e)?);
        let mut expected = vec![c.to_hex(), d.to_hex(), "README".to_string()];
        expected.sort();
        assert_eq!(blob_dir_names(&store), expected);
        assert_eq!(store.put_blob(b"blob b")?, b);
        assert_eq!(store.get_blob(&b)?.as_deref(), Some(b"blob b".as_slice()));
        drop(store);

        let store = Store::open(dir.path())?;
        assert_eq!(store.recovery(), Recovery::default(), "repair is done once");
        Ok(())
    }

    #[test]
    fn range_set_matches_a_bitmap() {
        // Reference: a plain bitmap of covered positions.
        let mut rng = rand::rngs::StdRng::seed_from_u64(99);
        for _ in 0..200 {
            let len = rng.gen_range(1..200u64);
            let mut set = RangeSet::default();
            let mut bits = vec![false; len as usize];
            for _ in 0..rng.gen_range(0..12) {
                let s = rng.gen_range(0..len);
                let e = rng.gen_range(s..=len);
                set.insert(s, e);
                bits[s as usize..e as usize]
                    .iter_mut()
                    .for_each(|b| *b = true);
            }
            assert_eq!(set.covered(), bits.iter().filter(|&&b| b).count() as u64);
            let mut gaps = Vec::new();
            let mut i = 0;
            while i < bits.len() {
                if bits[i] {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < bits.len() && !bits[i] {
                    i += 1;
                }
                gaps.push(start as u64..i as u64);
            }
            assert_eq!(set.gaps(len), gaps);
            // Stored ranges are disjoint and never touch.
            let ranges: Vec<_> = set.ranges.iter().collect();
            assert!(ranges.windows(2).all(|w| w[0].1 < w[1].0));
        }
    }
}

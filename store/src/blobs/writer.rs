//! [`BlobWriter`]: one blob received in chunks, at any offsets and in any order.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::Range;

use hivemind_protocol::Hash;

use super::TempFile;
use crate::error::{Error, IoContext, Result};
use crate::fsutil::Writeback;
use crate::Store;

impl Store {
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
        } else {
            // Out of order (a fetch from several holders): hand this range to writeback
            // now, so the closing fsync does not find it all still dirty.
            self.writeback.wrote_range(&self.file, offset, n);
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

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

//! Chunk trees: a blob's blake3 tree cut into [`CHUNK_BYTES`] subtrees (an outboard of
//! 32 bytes per MiB), so a chunk fetched from any peer is checked on arrival against the
//! blob's name, not only once the whole blob is in.
//!
//! blake3 hashes a blob as a binary tree of 1 KiB chunks whose left subtrees are powers of
//! two; a 1 MiB-aligned run of 1024 chunks is a whole subtree, and its chaining value is
//! what `blake3::hazmat` computes for those bytes at that offset. The fetcher receives the
//! chaining values of every chunk from one peer, merges them up to the root (pairwise,
//! level by level: an odd one out moves up unchanged, which is how blake3 shapes a tree of
//! equal power-of-two subtrees) and compares the root with the blob's hash; then each chunk,
//! from whichever peer, must hash to its value.

use std::io::{self, Read};

use blake3::hazmat::{
    merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};
use hivemind_protocol::Hash;

/// A chunk's blake3 chaining value.
pub type Value = ChainingValue;

/// Bytes per verified chunk (the last one may be shorter).
pub const CHUNK_BYTES: u64 = 1 << 20;

/// Chunks of a blob of `len` bytes.
pub fn chunk_count(len: u64) -> u64 {
    len.div_ceil(CHUNK_BYTES)
}

/// Byte length of chunk `index` of a blob of `len` bytes.
pub fn chunk_len(index: u64, len: u64) -> u64 {
    len.saturating_sub(index.saturating_mul(CHUNK_BYTES))
        .min(CHUNK_BYTES)
}

/// Chaining value of chunk `index` whose bytes are `data`, in a blob of two chunks or more.
pub fn chunk_value(index: u64, data: &[u8]) -> ChainingValue {
    if data.is_empty() || data.len() as u64 > CHUNK_BYTES {
        // No chunk is empty or longer (blake3 refuses such a subtree here); this value
        // matches no real one.
        return [0; 32];
    }
    let mut h = blake3::Hasher::new();
    h.set_input_offset(index * CHUNK_BYTES);
    h.update(data);
    h.finalize_non_root()
}

/// Whether `values` are the chunk values of a blob of `len` bytes whose blake3 is `root`.
/// Only blobs of two chunks or more have a tree. The values fix every chunk's bytes but
/// not `len` within the last chunk: the last chunk's own check does (its value covers its
/// length), so a fetcher checks that chunk before it trusts `len`.
pub fn verify(root: &Hash, len: u64, values: &[ChainingValue]) -> bool {
    if chunk_count(len) < 2 || values.len() as u64 != chunk_count(len) {
        return false;
    }
    let mut level = values.to_vec();
    while level.len() > 2 {
        let next: Vec<ChainingValue> = level
            .chunks(2)
            .map(|p| match p {
                [l, r] => merge_subtrees_non_root(l, r, Mode::Hash),
                [odd] => *odd,
                _ => unreachable!("chunks(2) yields one or two"),
            })
            .collect();
        level = next;
    }
    merge_subtrees_root(&level[0], &level[1], Mode::Hash).as_bytes() == root.as_bytes()
}

/// The chunk values of the `len` bytes `reader` yields (empty for a blob of one chunk).
pub fn values_of(mut reader: impl Read, len: u64) -> io::Result<Vec<ChainingValue>> {
    let n = chunk_count(len);
    if n < 2 {
        return Ok(Vec::new());
    }
    let mut buf = vec![0u8; CHUNK_BYTES as usize];
    let mut out = Vec::with_capacity(n as usize);
    for i in 0..n {
        let l = chunk_len(i, len) as usize;
        reader.read_exact(&mut buf[..l])?;
        out.push(chunk_value(i, &buf[..l]));
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn blob(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 1000) as u8).collect()
    }

    /// The tree's root is blake3 of the whole blob (computed by blake3 itself) for lengths
    /// around every shape: two chunks, odd counts, a short last chunk, powers of two.
    #[test]
    fn values_merge_to_the_blobs_blake3() {
        let mib = CHUNK_BYTES as usize;
        for len in [
            mib + 1,
            2 * mib,
            2 * mib + 1,
            3 * mib,
            3 * mib - 1,
            4 * mib,
            5 * mib + 123,
            7 * mib,
            8 * mib + 1,
        ] {
            let b = blob(len);
            let values = values_of(&b[..], len as u64).unwrap();
            assert_eq!(values.len(), len.div_ceil(mib));
            let root = Hash(*blake3::hash(&b).as_bytes());
            assert!(verify(&root, len as u64, &values), "len {len}");
            // Any changed value, a missing one, or another length fails.
            let mut bad = values.clone();
            bad[len.div_ceil(mib) / 2][0] ^= 1;
            assert!(!verify(&root, len as u64, &bad), "len {len}");
            assert!(!verify(&root, len as u64, &values[1..]), "len {len}");
            // The tree does not bind the length within the last chunk; the last chunk's
            // value does: one byte more or less there hashes to another value.
            let last = values.len() - 1;
            let tail = &b[last * mib..];
            if tail.len() > 1 {
                assert_ne!(
                    chunk_value(last as u64, &tail[..tail.len() - 1]),
                    values[last]
                );
            }
            if tail.len() < mib {
                let longer: Vec<u8> = tail.iter().copied().chain([0]).collect();
                assert_ne!(chunk_value(last as u64, &longer), values[last]);
            }
        }
    }

    #[test]
    fn one_changed_byte_fails_only_its_chunk() {
        let len = 3 * CHUNK_BYTES as usize + 10;
        let mut b = blob(len);
        let values = values_of(&b[..], len as u64).unwrap();
        b[CHUNK_BYTES as usize + 5] ^= 0xff;
        let mut off = 0usize;
        for i in 0..chunk_count(len as u64) {
            let l = chunk_len(i, len as u64) as usize;
            let ok = chunk_value(i, &b[off..off + l]) == values[i as usize];
            assert_eq!(ok, i != 1, "chunk {i}");
            off += l;
        }
    }

    #[test]
    fn small_blobs_have_no_tree() {
        assert!(values_of(&[1u8; 10][..], 10).unwrap().is_empty());
        assert!(!verify(&Hash::of(&[1u8; 10]), 10, &[]));
        assert_eq!(chunk_len(2, 2 * CHUNK_BYTES + 5), 5);
        assert_eq!(chunk_len(3, 2 * CHUNK_BYTES + 5), 0);
    }
}

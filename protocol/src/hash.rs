//! Content hashes: every blob, adapter and round is named by the blake3 hash of its bytes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A blake3 hash of some bytes, the name of a blob everywhere in HiveMind.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    /// The first 8 bytes as a big-endian word.
    #[inline]
    fn head(&self) -> u64 {
        let [a, b, c, d, e, f, g, h, ..] = self.0;
        u64::from_be_bytes([a, b, c, d, e, f, g, h])
    }
}

impl Ord for Hash {
    /// Bytewise lexicographic, like the array's own order, but deciding on the first
    /// word when it differs (nearly always for distinct hashes): hashes key every hot
    /// map in the round machine.
    #[inline]
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.head()
            .cmp(&other.head())
            .then_with(|| self.0.cmp(&other.0))
    }
}

impl PartialOrd for Hash {
    #[inline]
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Hash {
    /// The hash of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Hash(*blake3::hash(bytes).as_bytes())
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 8 hex characters, for logs.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl From<blake3::Hash> for Hash {
    fn from(h: blake3::Hash) -> Self {
        Hash(*h.as_bytes())
    }
}

/// A string that is not 64 hex characters.
#[derive(Debug, Clone, thiserror::Error)]
#[error("not a blake3 hash (64 hex characters): {0:?}")]
pub struct ParseHashError(pub String);

impl FromStr for Hash {
    type Err = ParseHashError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| ParseHashError(s.to_string()))?;
        Ok(Hash(out))
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", self.short())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_known_value() {
        // blake3("") from the blake3 reference test vectors.
        let h = Hash::of(b"");
        assert_eq!(
            h.to_hex(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
        assert_eq!(h.to_hex().parse::<Hash>().ok(), Some(h));
        assert!("zz".parse::<Hash>().is_err());
    }

    #[test]
    fn order_is_bytewise_lexicographic() {
        // Reference: the byte arrays' own (lexicographic) order.
        let mut hs: Vec<Hash> = (0u8..=255)
            .map(|i| {
                let mut b = *Hash::of(&[i]).as_bytes();
                b[i as usize % 32] = i; // vary positions so ties reach later words
                b[..(i as usize % 9)].fill(0);
                Hash(b)
            })
            .collect();
        let mut by_bytes = hs.clone();
        by_bytes.sort_by_key(|h| h.0);
        hs.sort();
        assert_eq!(hs, by_bytes);
    }
}

//! Records kept in sled trees: announcements, committed rounds, peers and the
//! gateway's upload registry. Every write is flushed before it returns.
//!
//! Values are postcard behind a one-byte format version, so a later layout can be
//! told apart from this one. Keys are chosen so that sled's byte order is the order
//! callers want: numbers big-endian, hashes raw.

use hivemind_protocol::Hash;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};

mod announcements;
mod peers;
mod rounds;
mod uploads;

pub use peers::PeerRecord;
pub use rounds::RoundRecord;
pub use uploads::{UploadRecord, UploadStats};

/// Format version byte that prefixes every postcard value.
const RECORD_FORMAT: u8 = 1;

/// Encodes a record value: format byte, then postcard.
pub(crate) fn encode<T: Serialize>(tree: &'static str, value: &T) -> Result<Vec<u8>> {
    postcard::to_extend(value, vec![RECORD_FORMAT]).map_err(|e| Error::Encode {
        tree,
        detail: e.to_string(),
    })
}

/// Decodes a record value written by [`encode`].
pub(crate) fn decode<T: DeserializeOwned>(
    tree: &'static str,
    key: &[u8],
    bytes: &[u8],
) -> Result<T> {
    let corrupt = |detail: String| Error::CorruptRecord {
        tree,
        key: hex::encode(key),
        detail,
    };
    match bytes.split_first() {
        Some((&RECORD_FORMAT, body)) => {
            postcard::from_bytes(body).map_err(|e| corrupt(format!("undecodable value: {e}")))
        }
        Some((&v, _)) => Err(corrupt(format!("unknown record format {v}"))),
        None => Err(corrupt("empty value".to_string())),
    }
}

/// Reads a 32-byte hash out of a key slice.
pub(crate) fn hash_from_key(tree: &'static str, key: &[u8]) -> Result<Hash> {
    let bytes: [u8; 32] = key.try_into().map_err(|_| Error::CorruptRecord {
        tree,
        key: hex::encode(key),
        detail: format!("expected a 32-byte hash, found {} bytes", key.len()),
    })?;
    Ok(Hash(bytes))
}

fn utf8_key(tree: &'static str, key: &[u8]) -> Result<String> {
    String::from_utf8(key.to_vec()).map_err(|_| Error::CorruptRecord {
        tree,
        key: hex::encode(key),
        detail: "key is not UTF-8".to_string(),
    })
}

#[cfg(test)]
mod tests;

//! Node identity: the ed25519 key a node signs with ([`NodeKey`]) and its public half,
//! the node id every message names ([`NodeId`]).
//!
//! The same key backs the libp2p `PeerId` in the `node` crate. This crate never generates
//! keys itself (no RNG inside): callers pass the 32 secret bytes or an
//! [`ed25519_dalek::SigningKey`] they generated.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::Error;

/// A node's secret signing key. Its `Debug` output shows the node id only: secret bytes
/// never print.
#[derive(Clone)]
pub struct NodeKey(SigningKey);

impl NodeKey {
    /// The key whose secret (seed) bytes are `secret`.
    pub fn from_bytes(secret: &[u8; 32]) -> Self {
        NodeKey(SigningKey::from_bytes(secret))
    }

    /// The 32 secret bytes, for saving the key in the node's data dir. Handle with care.
    pub fn to_secret_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The public node id of this key.
    pub fn node_id(&self) -> NodeId {
        NodeId(self.0.verifying_key().to_bytes())
    }

    /// Signs raw bytes. Crate-internal: outside callers sign typed messages through
    /// [`crate::Signed::sign`], which adds the domain prefix.
    pub(crate) fn sign_raw(&self, message: &[u8]) -> Signature {
        self.0.sign(message)
    }
}

impl NodeKey {
    /// The first key whose node id carries `bits` of work ([`NodeId::key_work`]), trying the
    /// secrets `next_secret` gives in turn: about 2^`bits` tries (this crate has no RNG; the
    /// node passes the OS's). `on_try` sees the count every 65,536 tries. Callers cap `bits`
    /// ([`MAX_KEY_WORK`]): the expected time doubles with each bit.
    pub fn grind(
        bits: u32,
        mut next_secret: impl FnMut() -> [u8; 32],
        mut on_try: impl FnMut(u64),
    ) -> NodeKey {
        let mut tries = 0u64;
        loop {
            let key = NodeKey::from_bytes(&next_secret());
            tries += 1;
            if key.node_id().key_work() >= bits {
                return key;
            }
            if tries.is_multiple_of(65_536) {
                on_try(tries);
            }
        }
    }
}

/// The most key work a network may ask for ([`crate::RoundConfig::min_key_work`]): 32 bits is
/// about 4 billion key generations, a day of one core with [`NodeKey::grind`].
pub const MAX_KEY_WORK: u32 = 32;

/// blake3 key-derivation context of [`NodeId::key_work`].
const KEY_WORK_CONTEXT: &str = "hivemind 2026 node key work v1";

impl From<SigningKey> for NodeKey {
    fn from(key: SigningKey) -> Self {
        NodeKey(key)
    }
}

impl From<NodeKey> for SigningKey {
    fn from(key: NodeKey) -> Self {
        key.0
    }
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeKey")
            .field("node_id", &self.node_id())
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// A node's public identity: its ed25519 public key bytes. `Display` is 64 lower-case hex
/// characters; `Debug` shows the first 8.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub [u8; 32]);

impl NodeId {
    /// The raw 32 public-key bytes.
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

    /// The proof of work this key carries: the leading zero bits of its blake3 hash (keyed
    /// for this purpose). A network that asks for `n` bits ([`crate::RoundConfig::min_key_work`])
    /// refuses what weaker keys sign, so each key it weighs took about 2^n tries to make
    /// ([`NodeKey::grind`]): many keys (Sybils) cost many times that. Independent of the
    /// network, so one key serves every network that asks for as much or less.
    pub fn key_work(&self) -> u32 {
        let h = blake3::Hasher::new_derive_key(KEY_WORK_CONTEXT)
            .update(&self.0)
            .finalize();
        let mut bits = 0;
        for byte in h.as_bytes() {
            bits += byte.leading_zeros();
            if *byte != 0 {
                break;
            }
        }
        bits
    }

    /// The ed25519 verifying key, or [`Error::BadKey`] when the bytes are not a valid
    /// curve point.
    pub fn verifying_key(&self) -> Result<VerifyingKey, Error> {
        VerifyingKey::from_bytes(&self.0).map_err(|_| Error::BadKey { signer: *self })
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

impl FromStr for NodeId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| Error::ParseId {
            what: "node id",
            input: s.chars().take(80).collect(),
        })?;
        Ok(NodeId(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_secret_and_display_is_hex() {
        let secret = [7u8; 32];
        let key = NodeKey::from_bytes(&secret);
        let dbg = format!("{key:?}");
        assert!(dbg.contains("<redacted>"), "{dbg}");
        assert!(!dbg.contains(&hex::encode(secret)), "{dbg}");
        assert!(!dbg.contains("[7, 7"), "{dbg}");
        let id = key.node_id();
        assert_eq!(id.to_string().len(), 64);
        assert_eq!(id.to_string().parse::<NodeId>().ok(), Some(id));
        assert!(id.verifying_key().is_ok());
        assert_eq!(NodeKey::from_bytes(&key.to_secret_bytes()).node_id(), id);
    }

    /// Key work against a plain count of the leading zero bits of the hash, and grinding.
    #[test]
    fn key_work_counts_leading_zero_bits_and_grinding_reaches_it() {
        let naive = |id: &NodeId| -> u32 {
            let h = blake3::Hasher::new_derive_key(KEY_WORK_CONTEXT)
                .update(&id.0)
                .finalize();
            let bits: String = h.as_bytes().iter().map(|b| format!("{b:08b}")).collect();
            bits.chars().take_while(|c| *c == '0').count() as u32
        };
        let mut n = 0u64;
        let mut next = || {
            n += 1;
            let mut s = [0u8; 32];
            s[..8].copy_from_slice(&n.to_le_bytes());
            s
        };
        let mut seen_nonzero = false;
        for _ in 0..2000 {
            let id = NodeKey::from_bytes(&next()).node_id();
            assert_eq!(id.key_work(), naive(&id), "{id:?}");
            seen_nonzero |= id.key_work() > 0;
        }
        assert!(seen_nonzero);
        for bits in [0, 4, 10] {
            let key = NodeKey::grind(bits, &mut next, |_| {});
            assert!(key.node_id().key_work() >= bits);
        }
        // 10 bits is rare among plain keys: about one in 1024.
        let strong = (0..2000)
            .filter(|_| NodeKey::from_bytes(&next()).node_id().key_work() >= 10)
            .count();
        assert!(strong < 20, "{strong} of 2000 keys carry 10 bits");
    }

    #[test]
    fn rfc8032_test_vector_1_public_key() {
        // RFC 8032, section 7.1, TEST 1: secret key and its public key.
        let secret: [u8; 32] =
            hex::decode("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
                .expect("hex")
                .try_into()
                .expect("32 bytes");
        let id = NodeKey::from_bytes(&secret).node_id();
        assert_eq!(
            id.to_hex(),
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
        );
    }
}

//! Peers this node has seen.

use serde::{Deserialize, Serialize};

use super::{decode, encode, utf8_key};
use crate::error::Result;
use crate::Store;

/// What the node knows about a peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    /// Multiaddrs the peer was seen at.
    pub addrs: Vec<String>,
    /// Last time it was seen, milliseconds since the Unix epoch.
    pub last_seen_ms: u64,
}

impl Store {
    /// Records (or replaces) what is known about `peer_id`.
    pub fn put_peer(&self, peer_id: &str, record: &PeerRecord) -> Result<()> {
        self.peers
            .insert(peer_id.as_bytes(), encode("peers", record)?)?;
        self.flush()
    }

    /// What is known about `peer_id`.
    pub fn get_peer(&self, peer_id: &str) -> Result<Option<PeerRecord>> {
        self.peers
            .get(peer_id.as_bytes())?
            .map(|v| decode("peers", peer_id.as_bytes(), &v))
            .transpose()
    }

    /// Every known peer, sorted by peer id.
    pub fn list_peers(&self) -> Result<Vec<(String, PeerRecord)>> {
        self.peers
            .iter()
            .map(|item| {
                let (k, v) = item?;
                Ok((utf8_key("peers", &k)?, decode("peers", &k, &v)?))
            })
            .collect()
    }

    /// Forgets `peer_id`; returns whether it was known.
    pub fn remove_peer(&self, peer_id: &str) -> Result<bool> {
        let existed = self.peers.remove(peer_id.as_bytes())?.is_some();
        if existed {
            self.flush()?;
        }
        Ok(existed)
    }
}

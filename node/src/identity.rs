//! The node's identity: one ed25519 key in the data dir (created on first start, owner-only, never
//! printed; see `hivemind_store::load_or_create_identity`). The same key signs protocol messages
//! (as a [`NodeKey`]) and is the libp2p key, so the libp2p `PeerId` derives from it.

use hivemind_protocol::{NodeId, NodeKey};
use libp2p_identity::{Keypair, PeerId};

use crate::error::{Error, Result};

/// The libp2p key pair of a node key: the same ed25519 secret.
pub fn keypair_of(key: &NodeKey) -> Result<Keypair> {
    let mut secret = key.to_secret_bytes();
    Keypair::ed25519_from_bytes(&mut secret).map_err(|e| Error::Identity {
        detail: format!("the node key is not a valid ed25519 secret: {e}"),
    })
}

/// The PeerId of a node id (an ed25519 public key), `None` for bytes that are not one.
pub fn peer_id_of(node: &NodeId) -> Option<PeerId> {
    let pk = libp2p_identity::ed25519::PublicKey::try_from_bytes(node.as_bytes()).ok()?;
    Some(libp2p_identity::PublicKey::from(pk).to_peer_id())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use anyhow::Context;

    use super::*;
    use crate::data_dir::DataDir;

    #[test]
    fn peer_id_derives_from_the_stored_key() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let dd = DataDir::new(dir.path());
        let key = dd.node_key()?;
        let from_keypair = keypair_of(&key)?.public().to_peer_id();
        let from_node_id = peer_id_of(&key.node_id()).context("node id is a public key")?;
        assert_eq!(from_keypair, from_node_id);
        // Reloading gives the same identity.
        let again = dd.node_key()?;
        assert_eq!(keypair_of(&again)?.public().to_peer_id(), from_keypair);
        // The PeerId embeds exactly the node's ed25519 public key.
        let pk = libp2p_identity::PublicKey::try_decode_protobuf(&from_keypair.to_bytes()[2..])
            .ok()
            .and_then(|p| p.try_into_ed25519().ok())
            .context("identity multihash holds an ed25519 key")?;
        assert_eq!(&pk.to_bytes(), key.node_id().as_bytes());
        Ok(())
    }
}

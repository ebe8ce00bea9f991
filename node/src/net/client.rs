//! [`Client`]: the cloneable handle everyone but the event loop holds. Each call sends a
//! [`Command`] over a bounded channel with a oneshot for the reply.

use super::*;

#[derive(Debug)]
pub(super) enum Command {
    Publish {
        topic: String,
        data: Vec<u8>,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    Validate {
        id: MessageId,
        source: PeerId,
        acceptance: MessageAcceptance,
    },
    Penalise {
        peer: PeerId,
        reason: String,
    },
    Info {
        reply: oneshot::Sender<NetInfo>,
    },
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
}

/// Peers banned for misbehaviour: shared by the event loop (which bans), the blob server
/// (which refuses their streams) and clients (which do not open streams to them).
#[derive(Clone, Debug, Default)]
pub(super) struct Banned(Arc<Mutex<BTreeSet<PeerId>>>);

impl Banned {
    /// The set (a panic elsewhere while it was held cannot leave it half-changed).
    pub(super) fn set(&self) -> std::sync::MutexGuard<'_, BTreeSet<PeerId>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn contains(&self, peer: &PeerId) -> bool {
        self.set().contains(peer)
    }

    pub(super) fn insert(&self, peer: PeerId) {
        self.set().insert(peer);
    }

    pub(super) fn remove(&self, peer: &PeerId) {
        self.set().remove(peer);
    }
}

/// The handle everyone but the event loop uses. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    pub(super) tx: mpsc::Sender<Command>,
    pub(super) local: PeerId,
    pub(super) streams: libp2p_stream::Control,
    pub(super) banned: Banned,
    pub(super) served: super::blob::Served,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("local", &self.local)
            .finish()
    }
}

impl Client {
    /// This node's peer id.
    pub fn local_peer_id(&self) -> PeerId {
        self.local
    }

    /// Blob bytes this node has served to peers, by blob.
    pub fn served(&self) -> std::collections::BTreeMap<hivemind_protocol::Hash, u64> {
        self.served.snapshot()
    }

    async fn send(&self, cmd: Command) -> Result<(), NetError> {
        self.tx.send(cmd).await.map_err(|_| NetError::Stopped)
    }

    /// Publishes `data` on gossip topic `topic`.
    pub async fn publish(&self, topic: String, data: Vec<u8>) -> Result<(), NetError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Publish { topic, data, reply }).await?;
        rx.await.map_err(|_| NetError::Stopped)?
    }

    /// Reports the verdict on a gossip message received as [`NetEvent::Gossip`].
    pub async fn validate(&self, id: MessageId, source: PeerId, acceptance: MessageAcceptance) {
        let _ = self
            .send(Command::Validate {
                id,
                source,
                acceptance,
            })
            .await;
    }

    /// Opens a blob protocol stream to `peer` (dialling it if needed). The stream does
    /// not pass through the event loop: its bytes never wait behind gossip.
    pub async fn open_blob_stream(&self, peer: PeerId) -> std::io::Result<Stream> {
        self.open_stream(peer, super::blob::PROTOCOL, "opening a blob stream")
            .await
    }

    /// Asks `peer` for its committed record of round `round` with result `result` (the
    /// record protocol): the signed digest bytes it sent, or `None` when it holds none.
    pub async fn fetch_record(
        &self,
        peer: PeerId,
        round: u64,
        result: &hivemind_protocol::Hash,
    ) -> std::io::Result<Option<Vec<u8>>> {
        let mut stream = self
            .open_stream(peer, super::records::PROTOCOL, "opening a record stream")
            .await?;
        super::records::request(&mut stream, round, result).await
    }

    async fn open_stream(
        &self,
        peer: PeerId,
        protocol: libp2p::StreamProtocol,
        what: &str,
    ) -> std::io::Result<Stream> {
        use std::io::{Error, ErrorKind};
        if self.banned.contains(&peer) {
            return Err(Error::new(ErrorKind::PermissionDenied, "peer is banned"));
        }
        let mut streams = self.streams.clone();
        let open = async {
            streams
                .open_stream(peer, protocol)
                .await
                .map_err(|e| match e {
                    libp2p_stream::OpenStreamError::Io(e) => e,
                    e @ libp2p_stream::OpenStreamError::UnsupportedProtocol(_) => {
                        Error::new(ErrorKind::Unsupported, e.to_string())
                    }
                    e => Error::other(e.to_string()),
                })
        };
        super::blob::within(super::blob::OPEN_TIMEOUT, what, open).await
    }

    /// Lowers `peer`'s score and bans it: it provably misbehaved.
    pub async fn penalise(&self, peer: PeerId, reason: String) {
        let _ = self.send(Command::Penalise { peer, reason }).await;
    }

    /// A snapshot of the network's state.
    pub async fn info(&self) -> Result<NetInfo, NetError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Info { reply }).await?;
        rx.await.map_err(|_| NetError::Stopped)
    }

    /// Dials an address.
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), NetError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Dial { addr, reply }).await?;
        rx.await.map_err(|_| NetError::Stopped)?
    }
}

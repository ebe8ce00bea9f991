//! The libp2p event loop. Only [`EventLoop`] touches the [`Swarm`]; everyone else holds a
//! cloneable [`Client`] that sends [`Command`]s over a bounded channel, each with a oneshot
//! for the reply, and reads [`NetEvent`]s from the event receiver.
//!
//! ```text
//!   driver / fetchers ──Client (mpsc Command + oneshot)──▶ EventLoop ──▶ Swarm
//!          ▲                                                  │          gossipsub, kad,
//!          └──────────────── NetEvent (mpsc) ─────────────────┘          identify, ping,
//!                                                                        blob streams, mdns
//!   blob streams: Client::open_blob_stream ──libp2p-stream Control──▶ a stream per transfer
//!                 serve_incoming task ◀── inbound blob streams (answered off the event loop)
//! ```
//!
//! Gossipsub runs with strict signing, a content-hash message id (blake3 of the data, which
//! is exactly the protocol's message id), a max transmit size fitted to the protocol's
//! messages, and manual validation: every message waits for the driver's verdict
//! ([`Client::validate`]); rejected messages lower the sender's score (P4), and
//! [`Client::penalise`] lowers it further through the application-specific score and bans
//! the peer.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance, MessageAuthenticity, MessageId};
use libp2p::identity::Keypair;
use libp2p::kad::{self, store::MemoryStore};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{behaviour::toggle::Toggle, NetworkBehaviour, SwarmEvent};
use libp2p::{
    autonat, dcutr, identify, mdns, noise, ping, relay, tcp, yamux, Multiaddr, PeerId, Stream,
    StreamProtocol, Swarm,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

pub mod blob;
mod client;
mod event_loop;
mod penalties;
pub mod records;
mod swarm;

pub use client::Client;
use client::{Banned, Command};
use event_loop::EventLoop;
use swarm::{build_swarm, Behaviour, BehaviourEvent};

use blob::SharedSource;

/// Kademlia protocol id of HiveMind networks.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/hivemind/kad/1.0.0");
/// Identify protocol version string.
pub const IDENTIFY_PROTOCOL: &str = "/hivemind/id/1.0.0";
/// Largest gossip message: a protocol message plus gossipsub's envelope (signature, key,
/// topic, sequence number).
pub const MAX_TRANSMIT_BYTES: usize = hivemind_protocol::MAX_MESSAGE_BYTES + 4096;
/// Relays a node behind a NAT listens through at once.
const MAX_RELAYS: usize = 2;

/// Inbound connections through relays a node keeps at once (a share of
/// [`DEFAULT_MAX_INCOMING`]).
const MAX_RELAYED_INBOUND: usize = 64;

/// Most peers dialled from discovery at once.
const MAX_DISCOVERED_DIALS: usize = 50;
/// Application-specific score step per penalty.
const PENALTY_SCORE: f64 = -10.0;

/// Errors of the network task.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// The swarm could not be built.
    #[error("building the libp2p swarm: {detail}")]
    Build {
        /// What failed.
        detail: String,
    },
    /// A listen address was refused.
    #[error("cannot listen on {addr}: {detail}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        detail: String,
    },
    /// The event loop has stopped.
    #[error("the network task has stopped")]
    Stopped,
    /// Gossipsub refused to publish (no peers on the topic, duplicate, too large...).
    #[error("publishing on {topic}: {source}")]
    Publish {
        /// The topic.
        topic: String,
        /// Why.
        #[source]
        source: gossipsub::PublishError,
    },
    /// The swarm refused to dial an address.
    #[error("dialling {addr}: {source}")]
    Dial {
        /// The address.
        addr: Multiaddr,
        /// Why.
        #[source]
        source: libp2p::swarm::DialError,
    },
}

/// How to start the network.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// Addresses to listen on (`/ip4/127.0.0.1/tcp/0`, `/ip4/0.0.0.0/udp/0/quic-v1`, ...).
    pub listen: Vec<Multiaddr>,
    /// Bootstrap peers (multiaddrs ending in `/p2p/<peer id>`). Empty: this node is a
    /// bootstrap node (Kademlia server mode).
    pub bootstrap: Vec<Multiaddr>,
    /// Gossip topics to subscribe to (and to score).
    pub topics: Vec<String>,
    /// LAN discovery by mDNS.
    pub mdns: bool,
    /// Gossipsub heartbeat (mesh maintenance and gossip emission).
    pub heartbeat: Duration,
    /// Blob streams served at once; more are answered "busy"
    /// ([`blob::DEFAULT_SERVE_LIMIT`] for nodes).
    pub serve_limit: usize,
    /// The slowest a peer may read a blob we serve, in bytes per second
    /// ([`blob::DEFAULT_MIN_SERVE_RATE`] for nodes): a stream is dropped once it has taken
    /// [`blob::REQUEST_TIMEOUT`] plus its length at this rate.
    pub min_serve_rate: u64,
    /// Most incoming connections established at once ([`DEFAULT_MAX_INCOMING`] for nodes);
    /// a quarter of it may be pending (in the handshake) at once.
    pub max_incoming: u32,
    /// A closed network's members: connections with any other peer are refused (dialled or
    /// incoming). `None`: an open network.
    pub allow: Option<BTreeSet<PeerId>>,
    /// Serve as a circuit relay (v2) for nodes behind NATs, within [`RELAY_LIMITS`]. Every node
    /// uses relays that peers offer when AutoNAT finds it unreachable, and tries to upgrade
    /// relayed connections to direct ones (DCUtR hole punching).
    pub relay: bool,
}

/// What a relaying node grants (`--relay`): reservations (nodes listening through it),
/// circuits (relayed connections) and what one circuit may carry. A circuit that reaches its
/// byte or time limit is closed; the peers open a new one when they need it.
#[derive(Clone, Copy, Debug)]
pub struct RelayLimits {
    /// Reservations held at once, and by one peer.
    pub reservations: usize,
    /// Reservations one peer may hold.
    pub reservations_per_peer: usize,
    /// Circuits open at once.
    pub circuits: usize,
    /// Circuits one peer may have open.
    pub circuits_per_peer: usize,
    /// Bytes one circuit carries (both ways) before it is closed: a few round adapters.
    pub circuit_bytes: u64,
    /// How long one circuit lasts.
    pub circuit_duration: Duration,
}

/// The relay limits of a `--relay` node.
/// Beyond these, libp2p's default rate limits hold (reservations and circuits per peer and per
/// IP address and minute). Nodes that hole-punch close their relayed connection at once, so a
/// relay carries long transfers only between nodes behind symmetric NATs.
pub const RELAY_LIMITS: RelayLimits = RelayLimits {
    reservations: 128,
    reservations_per_peer: 4,
    circuits: 32,
    circuits_per_peer: 4,
    circuit_bytes: 64 << 20,
    circuit_duration: Duration::from_secs(10 * 60),
};

/// Default of [`NetConfig::max_incoming`].
pub const DEFAULT_MAX_INCOMING: u32 = 256;

/// Something the network saw, for the driver.
#[derive(Debug)]
pub enum NetEvent {
    /// A gossip message waiting for validation ([`Client::validate`]).
    Gossip {
        /// Topic name.
        topic: String,
        /// Message id (blake3 of `data`).
        id: MessageId,
        /// The peer that forwarded it to us.
        source: PeerId,
        /// Message bytes.
        data: Vec<u8>,
    },
    /// A connection to a new peer.
    PeerConnected(PeerId),
}

/// A snapshot of the network's state.
#[derive(Clone, Debug, Default)]
pub struct NetInfo {
    /// This node's peer id.
    pub peer_id: Option<PeerId>,
    /// Where it listens.
    pub listen_addrs: Vec<Multiaddr>,
    /// Connected peers, sorted.
    pub connected: Vec<PeerId>,
    /// Gossipsub scores of connected peers.
    pub scores: BTreeMap<PeerId, f64>,
    /// Penalties given per peer (bad blobs, protocol misbehaviour), for the peers still
    /// remembered (see `penalties.rs`: bans end, and at most 4096 peers are remembered).
    pub penalties: BTreeMap<PeerId, u32>,
    /// How each connected peer is connected: one entry per open connection.
    pub links: BTreeMap<PeerId, Vec<Link>>,
    /// What AutoNAT concluded about this node: `public`, `private` (behind a NAT or firewall:
    /// it listens through relays) or `unknown`.
    pub reachability: String,
    /// Relays this node listens through (has a reservation with).
    pub relays: Vec<PeerId>,
}

/// One open connection to a peer.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Link {
    /// The peer's address on this connection.
    pub addr: String,
    /// Whether this node dialled (else the peer did).
    pub outbound: bool,
    /// Whether the connection runs through a relay (`/p2p-circuit`).
    pub relayed: bool,
    /// A direct connection that replaced a relayed one by hole punching (DCUtR).
    #[serde(default)]
    pub upgraded: bool,
}

/// The running network: its client, its events and its task.
pub struct Network {
    /// Handle for commands.
    pub client: Client,
    /// Events for the driver.
    pub events: mpsc::Receiver<NetEvent>,
    /// The event loop's task and the blob server's (both end when the cancellation token
    /// fires).
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Network {
    /// Builds the swarm, starts listening and dialling, and spawns the event loop.
    /// Returns once the first listen address is known.
    pub async fn spawn(
        key: Keypair,
        cfg: NetConfig,
        source: SharedSource,
        cancel: CancellationToken,
    ) -> Result<Network, NetError> {
        let local = key.public().to_peer_id();
        let mut swarm = build_swarm(key, &cfg)?;
        for t in &cfg.topics {
            swarm
                .behaviour_mut()
                .gossipsub
                .subscribe(&IdentTopic::new(t.clone()))
                .map_err(|e| NetError::Build {
                    detail: format!("subscribe {t}: {e}"),
                })?;
        }
        if cfg.bootstrap.is_empty() {
            swarm.behaviour_mut().kad.set_mode(Some(kad::Mode::Server));
        }
        for addr in &cfg.listen {
            swarm
                .listen_on(addr.clone())
                .map_err(|e| NetError::Listen {
                    addr: addr.clone(),
                    detail: e.to_string(),
                })?;
        }
        for addr in &cfg.bootstrap {
            if let Some(Protocol::P2p(peer)) = addr.iter().last() {
                swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
            }
            if let Err(e) = swarm.dial(addr.clone()) {
                tracing::warn!(%addr, error = %e, "cannot dial bootstrap peer");
            }
        }
        let streams = swarm.behaviour().blob.new_control();
        let incoming = streams
            .clone()
            .accept(blob::PROTOCOL)
            .map_err(|e| NetError::Build {
                detail: format!("blob protocol: {e}"),
            })?;
        let record_requests =
            streams
                .clone()
                .accept(records::PROTOCOL)
                .map_err(|e| NetError::Build {
                    detail: format!("record protocol: {e}"),
                })?;
        let banned = Banned::default();
        let refused = banned.clone();
        let refused_records = banned.clone();
        let serving_records = tokio::spawn(records::serve_incoming(
            record_requests,
            source.clone(),
            move |peer| refused_records.contains(peer),
            cancel.clone(),
        ));
        let served = blob::Served::default();
        let serving = tokio::spawn(blob::serve_incoming(
            incoming,
            source,
            blob::ServeLimits {
                streams: cfg.serve_limit,
                min_rate: cfg.min_serve_rate,
            },
            move |peer| refused.contains(peer),
            served.clone(),
            cancel.clone(),
        ));
        let (tx, rx) = mpsc::channel(256);
        let (ev_tx, ev_rx) = mpsc::channel(1024);
        let mut lp = EventLoop {
            swarm,
            commands: rx,
            events: ev_tx,
            listen_addrs: BTreeSet::new(),
            penalties: penalties::Penalties::default(),
            banned: banned.clone(),
            dialled: BTreeMap::new(),
            bootstrapped: false,
            links: BTreeMap::new(),
            relays: BTreeMap::new(),
            relay_listens: std::collections::HashMap::new(),
            reserved: BTreeSet::new(),
            relay_backoff: BTreeMap::new(),
            upgrades: BTreeSet::new(),
        };
        // Wait for the listeners to report their addresses (so callers can print them).
        let want = cfg.listen.len();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while lp.listen_addrs.len() < want {
            tokio::select! {
                ev = lp.swarm.select_next_some() => lp.on_swarm_event(ev).await,
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        if cfg.relay {
            // A relay's operator says others can reach it: its listen addresses are its
            // external ones, so the reservations it grants name them from the start (instead of
            // after its own AutoNAT probes, until which a reservation carries no address).
            let public: Vec<Multiaddr> = lp
                .listen_addrs
                .iter()
                .filter(|a| event_loop::is_dialable(a) && !event_loop::is_loopback(a))
                .cloned()
                .collect();
            for a in public {
                lp.swarm.add_external_address(a);
            }
        }
        let task = tokio::spawn(lp.run(cancel));
        Ok(Network {
            client: Client {
                tx,
                local,
                streams,
                banned,
                served,
            },
            events: ev_rx,
            tasks: vec![task, serving, serving_records],
        })
    }
}

/// `addr` with `/p2p/<peer>` appended (unless it already ends in one).
pub fn with_peer(addr: &Multiaddr, peer: PeerId) -> Multiaddr {
    match addr.iter().last() {
        Some(Protocol::P2p(_)) => addr.clone(),
        _ => addr.clone().with(Protocol::P2p(peer)),
    }
}

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
    identify, mdns, noise, ping, tcp, yamux, Multiaddr, PeerId, Stream, StreamProtocol, Swarm,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::blob_protocol::{self, SharedSource};

/// Kademlia protocol id of HiveMind networks.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/hivemind/kad/1.0.0");
/// Identify protocol version string.
pub const IDENTIFY_PROTOCOL: &str = "/hivemind/id/1.0.0";
/// Largest gossip message: a protocol message plus gossipsub's envelope (signature, key,
/// topic, sequence number).
pub const MAX_TRANSMIT_BYTES: usize = hivemind_protocol::MAX_MESSAGE_BYTES + 4096;
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
    /// A command failed.
    #[error("{op}: {detail}")]
    Command {
        /// Which command.
        op: &'static str,
        /// Why.
        detail: String,
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
    /// ([`blob_protocol::DEFAULT_SERVE_LIMIT`] for nodes).
    pub serve_limit: usize,
}

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
    /// Penalties given per peer (bad blobs, protocol misbehaviour).
    pub penalties: BTreeMap<PeerId, u32>,
}

#[derive(Debug)]
enum Command {
    Publish {
        topic: String,
        data: Vec<u8>,
        reply: oneshot::Sender<Result<(), String>>,
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
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// Peers banned for misbehaviour: shared by the event loop (which bans), the blob server
/// (which refuses their streams) and clients (which do not open streams to them).
#[derive(Clone, Debug, Default)]
struct Banned(Arc<Mutex<BTreeSet<PeerId>>>);

impl Banned {
    /// The set (a panic elsewhere while it was held cannot leave it half-changed).
    fn set(&self) -> std::sync::MutexGuard<'_, BTreeSet<PeerId>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn contains(&self, peer: &PeerId) -> bool {
        self.set().contains(peer)
    }

    fn insert(&self, peer: PeerId) {
        self.set().insert(peer);
    }
}

/// The handle everyone but the event loop uses. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    tx: mpsc::Sender<Command>,
    local: PeerId,
    streams: libp2p_stream::Control,
    banned: Banned,
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

    async fn send(&self, cmd: Command) -> Result<(), NetError> {
        self.tx.send(cmd).await.map_err(|_| NetError::Stopped)
    }

    /// Publishes `data` on gossip topic `topic`.
    pub async fn publish(&self, topic: String, data: Vec<u8>) -> Result<(), NetError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Publish { topic, data, reply }).await?;
        rx.await
            .map_err(|_| NetError::Stopped)?
            .map_err(|detail| NetError::Command {
                op: "publish",
                detail,
            })
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
        use std::io::{Error, ErrorKind};
        if self.banned.contains(&peer) {
            return Err(Error::new(ErrorKind::PermissionDenied, "peer is banned"));
        }
        let mut streams = self.streams.clone();
        let open = async {
            streams
                .open_stream(peer, blob_protocol::PROTOCOL)
                .await
                .map_err(|e| match e {
                    libp2p_stream::OpenStreamError::Io(e) => e,
                    e @ libp2p_stream::OpenStreamError::UnsupportedProtocol(_) => {
                        Error::new(ErrorKind::Unsupported, e.to_string())
                    }
                    e => Error::other(e.to_string()),
                })
        };
        blob_protocol::within(blob_protocol::OPEN_TIMEOUT, "opening a blob stream", open).await
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
        rx.await
            .map_err(|_| NetError::Stopped)?
            .map_err(|detail| NetError::Command { op: "dial", detail })
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    gossipsub: gossipsub::Behaviour,
    kad: kad::Behaviour<MemoryStore>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    blob: libp2p_stream::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
}

fn score_params(topics: &[String]) -> gossipsub::PeerScoreParams {
    let mut p = gossipsub::PeerScoreParams {
        // Tests and local demos put every node on 127.0.0.1.
        ip_colocation_factor_weight: 0.0,
        ..Default::default()
    };
    for t in topics {
        let tp = gossipsub::TopicScoreParams {
            topic_weight: 1.0,
            // Rounds are sparse: neither mesh time nor delivery rates say much about a peer.
            time_in_mesh_weight: 0.0,
            first_message_deliveries_weight: 0.1,
            mesh_message_deliveries_weight: 0.0,
            mesh_failure_penalty_weight: 0.0,
            invalid_message_deliveries_weight: -10.0,
            invalid_message_deliveries_decay: 0.9,
            ..Default::default()
        };
        p.topics.insert(IdentTopic::new(t.clone()).hash(), tp);
    }
    p
}

fn build_swarm(key: Keypair, cfg: &NetConfig) -> Result<Swarm<Behaviour>, NetError> {
    let err = |e: &dyn std::fmt::Display| NetError::Build {
        detail: e.to_string(),
    };
    let gcfg = gossipsub::ConfigBuilder::default()
        .validation_mode(gossipsub::ValidationMode::Strict)
        .message_id_fn(|m: &gossipsub::Message| {
            MessageId::from(blake3::hash(&m.data).as_bytes().to_vec())
        })
        .max_transmit_size(MAX_TRANSMIT_BYTES)
        .validate_messages()
        .heartbeat_interval(cfg.heartbeat)
        .build()
        .map_err(|e| err(&e))?;
    let mdns_on = cfg.mdns;
    let topics = cfg.topics.clone();
    let swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| err(&e))?
        .with_quic()
        .with_dns()
        .map_err(|e| err(&e))?
        .with_behaviour(|key| {
            let peer = key.public().to_peer_id();
            let mut gossipsub =
                gossipsub::Behaviour::new(MessageAuthenticity::Signed(key.clone()), gcfg)?;
            gossipsub.with_peer_score(
                score_params(&topics),
                gossipsub::PeerScoreThresholds::default(),
            )?;
            let mut kcfg = kad::Config::new(KAD_PROTOCOL);
            kcfg.set_query_timeout(Duration::from_secs(30));
            let kad = kad::Behaviour::with_config(peer, MemoryStore::new(peer), kcfg);
            let identify = identify::Behaviour::new(identify::Config::new(
                IDENTIFY_PROTOCOL.to_string(),
                key.public(),
            ));
            let ping = ping::Behaviour::new(ping::Config::new());
            let blob = libp2p_stream::Behaviour::new();
            let mdns = if mdns_on {
                Some(mdns::tokio::Behaviour::new(mdns::Config::default(), peer)?)
            } else {
                None
            };
            Ok(Behaviour {
                gossipsub,
                kad,
                identify,
                ping,
                blob,
                mdns: Toggle::from(mdns),
            })
        })
        .map_err(|e| err(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build();
    Ok(swarm)
}

/// The running network: its client, its events and its task.
pub struct Network {
    /// Handle for commands.
    pub client: Client,
    /// Events for the driver.
    pub events: mpsc::Receiver<NetEvent>,
    /// The event loop's task (ends when the cancellation token fires).
    pub task: tokio::task::JoinHandle<()>,
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
            .accept(blob_protocol::PROTOCOL)
            .map_err(|e| NetError::Build {
                detail: format!("blob protocol: {e}"),
            })?;
        let banned = Banned::default();
        let refused = banned.clone();
        tokio::spawn(blob_protocol::serve_incoming(
            incoming,
            source,
            cfg.serve_limit,
            move |peer| refused.contains(peer),
            cancel.clone(),
        ));
        let (tx, rx) = mpsc::channel(256);
        let (ev_tx, ev_rx) = mpsc::channel(1024);
        let mut lp = EventLoop {
            swarm,
            commands: rx,
            events: ev_tx,
            listen_addrs: BTreeSet::new(),
            penalties: BTreeMap::new(),
            banned: banned.clone(),
            dialled: BTreeSet::new(),
            bootstrapped: false,
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
        let task = tokio::spawn(lp.run(cancel));
        Ok(Network {
            client: Client {
                tx,
                local,
                streams,
                banned,
            },
            events: ev_rx,
            task,
        })
    }
}

struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<NetEvent>,
    listen_addrs: BTreeSet<Multiaddr>,
    penalties: BTreeMap<PeerId, u32>,
    banned: Banned,
    dialled: BTreeSet<PeerId>,
    bootstrapped: bool,
}

impl EventLoop {
    async fn run(mut self, cancel: CancellationToken) {
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => break,
                },
                ev = self.swarm.select_next_some() => self.on_swarm_event(ev).await,
            }
        }
        tracing::debug!("network event loop stopped");
    }

    fn on_command(&mut self, cmd: Command) {
        let b = self.swarm.behaviour_mut();
        match cmd {
            Command::Publish { topic, data, reply } => {
                let r = b
                    .gossipsub
                    .publish(IdentTopic::new(topic), data)
                    .map(|_| ())
                    .map_err(|e| e.to_string());
                let _ = reply.send(r);
            }
            Command::Validate {
                id,
                source,
                acceptance,
            } => {
                b.gossipsub
                    .report_message_validation_result(&id, &source, acceptance);
            }
            Command::Penalise { peer, reason } => {
                let n = self.penalties.entry(peer).or_insert(0);
                *n += 1;
                tracing::warn!(%peer, %reason, penalties = *n, "penalising peer");
                b.gossipsub
                    .set_application_score(&peer, PENALTY_SCORE * f64::from(*n));
                b.gossipsub.blacklist_peer(&peer);
                self.banned.insert(peer);
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            Command::Info { reply } => {
                let connected: Vec<PeerId> = {
                    let mut v: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
                    v.sort();
                    v
                };
                let g = &self.swarm.behaviour().gossipsub;
                let scores = connected
                    .iter()
                    .filter_map(|p| g.peer_score(p).map(|s| (*p, s)))
                    .collect();
                let _ = reply.send(NetInfo {
                    peer_id: Some(*self.swarm.local_peer_id()),
                    listen_addrs: self.listen_addrs.iter().cloned().collect(),
                    connected,
                    scores,
                    penalties: self.penalties.clone(),
                });
            }
            Command::Dial { addr, reply } => {
                let _ = reply.send(self.swarm.dial(addr).map_err(|e| e.to_string()));
            }
        }
    }

    async fn on_swarm_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                self.listen_addrs.insert(address);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.remove(&address);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                if self.banned.contains(&peer_id) {
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return;
                }
                if endpoint.is_dialer() {
                    let addr = endpoint.get_remote_address().clone();
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                }
                if !self.bootstrapped {
                    self.bootstrapped = self.swarm.behaviour_mut().kad.bootstrap().is_ok();
                }
                let _ = self.events.try_send(NetEvent::PeerConnected(peer_id));
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            })) => {
                let ev = NetEvent::Gossip {
                    topic: message.topic.into_string(),
                    id: message_id.clone(),
                    source: propagation_source,
                    data: message.data,
                };
                if self.events.try_send(ev).is_err() {
                    // The driver is overwhelmed: drop without propagating, no penalty.
                    self.swarm
                        .behaviour_mut()
                        .gossipsub
                        .report_message_validation_result(
                            &message_id,
                            &propagation_source,
                            MessageAcceptance::Ignore,
                        );
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                for addr in info.listen_addrs {
                    if is_dialable(&addr) {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::RoutingUpdated {
                peer, ..
            })) if !self.swarm.is_connected(&peer)
                && !self.banned.contains(&peer)
                && self.dialled.len() < MAX_DISCOVERED_DIALS
                && self.dialled.insert(peer) =>
            {
                let _ = self.swarm.dial(peer);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(list))) => {
                for (peer, addr) in list {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, addr.clone());
                    if !self.swarm.is_connected(&peer) {
                        let _ = self.swarm.dial(addr);
                    }
                }
            }
            _ => {}
        }
    }
}

fn is_dialable(addr: &Multiaddr) -> bool {
    !addr.iter().any(|p| {
        matches!(p, Protocol::Ip4(ip) if ip.is_unspecified())
            || matches!(p, Protocol::Ip6(ip) if ip.is_unspecified())
    })
}

/// `addr` with `/p2p/<peer>` appended (unless it already ends in one).
pub fn with_peer(addr: &Multiaddr, peer: PeerId) -> Multiaddr {
    match addr.iter().last() {
        Some(Protocol::P2p(_)) => addr.clone(),
        _ => addr.clone().with(Protocol::P2p(peer)),
    }
}

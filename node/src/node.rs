//! [`Node`]: the one way a node starts and stops. `join`, `serve`, `demo`, the tests, the
//! examples and the benchmarks all build a [`NodeConfig`] and call [`Node::start`].
//!
//! ```text
//!   Node::start ─▶ DataDir (key, store, network.json)
//!               ├▶ Network::spawn ─▶ event loop task (owns the Swarm) + blob server task
//!               ├▶ Driver::run task (owns the RoundMachine; status.json, inbox/)
//!               └▶ HTTP server tasks, when configured: the gateway's port (legacy REST
//!                  routes + chat API) and `http` (chat API alone)
//!   Node::contribute / gateway ──Local (mpsc)──▶ Driver
//!   Node::shutdown ─▶ CancellationToken ─▶ every task ends and is joined; status.json goes
//! ```

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hivemind_model::Module;
use hivemind_protocol::{
    announce_topic, digest_topic, BaseModel, Hash, LoraShape, ModelId, RoundConfig,
};
use hivemind_store::Store;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::data_dir::{DataDir, NetworkFile};
use crate::driver::{Driver, DriverConfig, DriverView, Local, NetRule, NetSpec};
use crate::error::{Error, Result};
use crate::gateway::{Gateway, GatewayConfig};
use crate::identity::keypair_of;
use crate::net::blob::DEFAULT_SERVE_LIMIT;
use crate::net::{with_peer, Client, NetConfig, Network};
use crate::web::{Dashboard, Engine};

/// The LoRA shape of a network's adapters.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSettings {
    /// Rank.
    pub rank: usize,
    /// Alpha.
    pub alpha: f64,
    /// Adapted modules (PEFT names).
    pub target_modules: Vec<String>,
    /// How rounds merge the adapters.
    pub rule: NetRule,
    /// Differential privacy of what contributors announce (opt-in; part of the network's
    /// identity).
    pub dp: Option<hivemind_model::dp::DpSettings>,
    /// Bits of proof of work a key must carry for what it signs to count (opt-in Sybil cost;
    /// part of the network's identity): see [`hivemind_protocol::RoundConfig::min_key_work`].
    pub key_work: u32,
}

impl Default for LoraSettings {
    /// r16, alpha 32, all seven linear modules (the legacy training defaults).
    fn default() -> Self {
        LoraSettings {
            rank: 16,
            alpha: 32.0,
            target_modules: Module::ALL.iter().map(|m| m.to_string()).collect(),
            rule: NetRule::default(),
            dp: None,
            key_work: 0,
        }
    }
}

/// Where the gateway listens, and its limits.
#[derive(Clone, Debug)]
pub struct GatewaySettings {
    /// Address to bind (port 0 picks a free one).
    pub bind: String,
    /// Limits and timing.
    pub config: GatewayConfig,
}

/// The chat API (OpenAI-compatible) a node serves on its gateway's port and on
/// [`NodeConfig::http`].
#[derive(Clone, Debug, Default)]
pub struct ChatSettings {
    /// The personal adapter dir offered as model `personal` (when it was trained on this
    /// network's base model).
    pub personal: Option<PathBuf>,
    /// Whether the dashboard and the chat API on the gateway's port answer every client
    /// (else only clients on loopback; the `http` server answers whoever reaches its address).
    pub gateway_public: bool,
    /// The key the chat API and the dashboard's data then need (see `web::ApiKey`).
    pub api_key: Option<Arc<crate::web::ApiKey>>,
}

/// Everything a node needs to start.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Its data dir (key, store, status file, inbox).
    pub data_dir: DataDir,
    /// The base model file or dir (already resolved; see `hivemind_model::pull`).
    pub model: PathBuf,
    /// The network's LoRA shape.
    pub lora: LoraSettings,
    /// Listen addresses.
    pub listen: Vec<Multiaddr>,
    /// Bootstrap peers; none makes this a bootstrap node.
    pub bootstrap: Vec<Multiaddr>,
    /// Round timing.
    pub round: RoundConfig,
    /// LAN discovery by mDNS.
    pub mdns: bool,
    /// Blob streams served at once.
    pub serve_limit: usize,
    /// Rounds whose inputs the store keeps ([`crate::driver::RETAIN_ROUNDS`] for nodes).
    pub retain_rounds: u64,
    /// The legacy REST gateway, when this node serves one.
    pub gateway: Option<GatewaySettings>,
    /// The chat API, when this node serves one (on the gateway's port, and on `http`).
    pub chat: Option<ChatSettings>,
    /// An address for an HTTP server of the chat API alone (port 0 picks a free one).
    pub http: Option<String>,
    /// A closed network's other members: this node connects with no one else and ignores
    /// messages signed by anyone else, relayed or fetched. `None`: an open network.
    pub allow_peers: Option<BTreeSet<PeerId>>,
    /// Serve as a circuit relay for nodes behind NATs (`--relay`; see [`crate::net::RELAY_LIMITS`]).
    pub relay: bool,
    /// Bytes to keep free on the data dir's disk ([`DEFAULT_MIN_FREE_BYTES`] for nodes): a
    /// peer's adapter or a gateway upload that would go below it is not taken in.
    pub min_free_bytes: u64,
}

/// Default of [`NodeConfig::min_free_bytes`]: 512 MiB.
pub const DEFAULT_MIN_FREE_BYTES: u64 = 512 << 20;

impl NodeConfig {
    /// A node on loopback (one free TCP port) with the default LoRA shape and rounds of
    /// `round_secs`; change fields for anything else.
    pub fn new(data_dir: impl Into<PathBuf>, model: impl Into<PathBuf>, round_secs: f64) -> Self {
        NodeConfig {
            data_dir: DataDir::new(data_dir),
            model: model.into(),
            lora: LoraSettings::default(),
            listen: vec![loopback_tcp()],
            bootstrap: Vec::new(),
            round: round_config(round_secs, None),
            mdns: false,
            serve_limit: DEFAULT_SERVE_LIMIT,
            retain_rounds: crate::driver::RETAIN_ROUNDS,
            gateway: None,
            chat: None,
            http: None,
            allow_peers: None,
            relay: false,
            min_free_bytes: DEFAULT_MIN_FREE_BYTES,
        }
    }
}

fn loopback_tcp() -> Multiaddr {
    Multiaddr::from(std::net::Ipv4Addr::LOCALHOST).with(libp2p::multiaddr::Protocol::Tcp(0))
}

/// The round timing of a window of `round_secs` and a grace of `grace_secs`: production
/// defaults, with the grace, fetch and heartbeat timers scaled down for short rounds
/// (tests, demos).
pub fn round_config(round_secs: f64, grace_secs: Option<f64>) -> RoundConfig {
    let window_ms = (round_secs * 1000.0).max(100.0) as u64;
    let mut round = RoundConfig::default();
    round.window_ms = window_ms;
    round.grace_ms = match grace_secs {
        Some(g) => (g * 1000.0).max(100.0) as u64,
        None => round.grace_ms.min((window_ms / 3).max(300)),
    };
    round.fetch_timeout_ms = round.fetch_timeout_ms.min((window_ms / 2).max(1000));
    round.heartbeat_ms = round.heartbeat_ms.min((window_ms / 3).max(500));
    round.max_clock_skew_ms = round.max_clock_skew_ms.max(5000);
    round
}

/// The network's model id: the base model's content hash ([`hivemind_model::model_hash`],
/// the same hash `BaseModel::load` computes) plus the LoRA shape. Reads the whole model:
/// call it on a blocking thread.
pub fn model_id(model: &Path, lora: &LoraSettings) -> Result<(ModelId, Hash)> {
    let hash = hivemind_model::model_hash(model)?;
    let rank = u32::try_from(lora.rank).map_err(|_| Error::Config {
        option: "rank",
        detail: format!("{} is too large", lora.rank),
    })?;
    let shape = LoraShape {
        rank,
        alpha: lora.alpha as f32,
        target_modules: lora.target_modules.clone(),
    };
    let mut id = ModelId::derive(&BaseModel::File(hash), &shape).with_rule(lora.rule.id());
    if let Some(dp) = &lora.dp {
        dp.validate().map_err(|e| Error::Config {
            option: "dp",
            detail: e.to_string(),
        })?;
        id = id.with_dp(dp.clip, dp.noise_multiplier);
    }
    crate::data_dir::check_key_work(lora.key_work)?;
    Ok((id.with_key_work(lora.key_work), hash))
}

/// Gateway uploads waiting for a round were checked for the network the data dir last
/// joined and, in a private network, noised for it: announced in another network, they
/// would be invalid there, or un-noised releases in a private one. A start that joins
/// another network while any wait is refused, and nothing stored changes.
fn refuse_uploads_of_another_network(
    data_dir: &DataDir,
    store: &Store,
    model: &ModelId,
) -> Result<()> {
    let Ok(last) = data_dir.network() else {
        return Ok(());
    };
    if last.model_id == model.to_hex() {
        return Ok(());
    }
    let waiting = store.pending_uploads()?.len();
    if waiting == 0 {
        return Ok(());
    }
    let short = |hex: &str| hex.chars().take(16).collect::<String>();
    Err(Error::Config {
        option: "network",
        detail: format!(
            "{} holds {waiting} gateway upload(s) waiting for a round of network {} (rule {}), \
             and these options join network {}: the uploads were checked (and, in a network \
             with differential privacy, noised) for that network and cannot be announced in \
             another. Start with that network's options until they are in a round, or use a \
             new data dir",
            data_dir.path().display(),
            short(&last.model_id),
            last.rule,
            short(&model.to_hex()),
        ),
    })
}

/// A TCP listener on `addr` and the address it got.
async fn bind(addr: &str) -> Result<(tokio::net::TcpListener, SocketAddr)> {
    let err = |source| Error::Bind {
        addr: addr.to_string(),
        source,
    };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(err)?;
    let local = listener.local_addr().map_err(err)?;
    Ok((listener, local))
}

/// A running node. Drop without [`Node::shutdown`] only when the process ends anyway.
pub struct Node {
    peer_id: PeerId,
    model_id: ModelId,
    listen_addrs: Vec<Multiaddr>,
    gateway_addr: Option<SocketAddr>,
    http_addr: Option<SocketAddr>,
    data_dir: DataDir,
    client: Client,
    local: mpsc::Sender<Local>,
    view: watch::Receiver<DriverView>,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("peer_id", &self.peer_id)
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Opens the data dir, starts the network, the round driver and (if configured) the
    /// gateway. Returns once the node listens.
    pub async fn start(cfg: NodeConfig) -> Result<Node> {
        let data_dir = cfg.data_dir.clone();
        let (model_path, lora) = (cfg.model.clone(), cfg.lora.clone());
        let min_free = cfg.min_free_bytes;
        let dd = data_dir.clone();
        let (model, base_hash, store, key, spec) = tokio::task::spawn_blocking(move || {
            let (model, base_hash) = model_id(&model_path, &lora)?;
            dd.create()?;
            let store = dd.open_store()?.with_min_free(min_free);
            let key = dd.node_key_with_work(lora.key_work)?;
            let work = key.node_id().key_work();
            if work < lora.key_work {
                // Its peers would refuse and ban it at its first message.
                return Err(Error::Config {
                    option: "key-work",
                    detail: format!(
                        "this node's key ({}) carries {work} bits of work and the network asks \
                         for {}: its peers would refuse everything it signs. The key was made \
                         before; start with a new data dir (its key is made with the work), or \
                         make one with `hive-node identity --key-work {} --data-dir NEW`",
                        key.node_id().short(),
                        lora.key_work,
                        lora.key_work
                    ),
                });
            }
            let mut spec = NetSpec::for_model(
                &model_path,
                lora.rank,
                lora.alpha,
                &lora.target_modules,
                lora.rule,
            )?;
            spec.dp = lora.dp;
            refuse_uploads_of_another_network(&dd, &store, &model)?;
            Ok::<_, Error>((model, base_hash, store, key, spec))
        })
        .await??;
        data_dir.write_network(&NetworkFile {
            model_id: model.to_hex(),
            base_model_hash: base_hash.to_hex(),
            adapter_config: serde_json::to_value(&spec.config).map_err(|source| Error::Json {
                what: "adapter config",
                path: data_dir.path().to_path_buf(),
                source,
            })?,
            rule: spec.rule.to_string(),
        })?;
        let cancel = CancellationToken::new();
        let net = Network::spawn(
            keypair_of(&key)?,
            NetConfig {
                listen: cfg.listen.clone(),
                bootstrap: cfg.bootstrap.clone(),
                topics: vec![announce_topic(&model), digest_topic(&model)],
                mdns: cfg.mdns,
                heartbeat: Duration::from_millis(if cfg.round.window_ms < 60_000 {
                    200
                } else {
                    1000
                }),
                serve_limit: cfg.serve_limit,
                max_incoming: crate::net::DEFAULT_MAX_INCOMING,
                min_serve_rate: crate::net::blob::DEFAULT_MIN_SERVE_RATE,
                allow: cfg.allow_peers.clone(),
                relay: cfg.relay,
            },
            Arc::new(store.clone()),
            cancel.clone(),
        )
        .await?;
        let Network {
            client,
            events,
            tasks: mut all,
        } = net;
        let peer_id = client.local_peer_id();
        let listen_addrs = client
            .info()
            .await?
            .listen_addrs
            .iter()
            .map(|a| with_peer(a, peer_id))
            .collect();
        let (local, local_rx) = mpsc::channel(16);
        let driver = Driver::new(
            DriverConfig {
                model,
                round: RoundConfig {
                    rule: spec.rule.id(),
                    min_key_work: cfg.lora.key_work,
                    ..cfg.round.clone()
                },
                spec: spec.clone(),
                data_dir: data_dir.clone(),
                retain_rounds: cfg.retain_rounds,
                allow: cfg.allow_peers.clone().map(|mut members| {
                    members.insert(peer_id);
                    Arc::new(members)
                }),
            },
            key,
            store.clone(),
            client.clone(),
            events,
            local_rx,
        )?;
        let view = driver.view();
        all.push(tokio::spawn(driver.run(cancel.clone())));
        let chat = cfg.chat.as_ref().map(|c| {
            Arc::new(Engine::new(
                cfg.model.clone(),
                data_dir.clone(),
                c.personal.clone(),
            ))
        });
        if cfg.http.is_some() && chat.is_none() {
            return Err(Error::Config {
                option: "http",
                detail: "an HTTP server needs the chat API (NodeConfig::chat)".into(),
            });
        }
        let api_key = cfg.chat.as_ref().and_then(|c| c.api_key.clone());
        let mut gateway_addr = None;
        let has_gateway = cfg.gateway.is_some();
        if let Some(g) = cfg.gateway {
            let (max_connections, header_timeout) =
                (g.config.max_connections, g.config.header_timeout);
            let gw = Gateway::new(store.clone(), spec, local.clone(), view.clone(), g.config);
            let mut router = crate::gateway::router(gw);
            if let Some(engine) = &chat {
                let board = Arc::new(Dashboard::new(data_dir.clone(), Some(store.clone())));
                let local_only = !cfg.chat.as_ref().is_some_and(|c| c.gateway_public);
                router = router.merge(crate::web::router(
                    engine.clone(),
                    board,
                    false,
                    local_only,
                    api_key.clone(),
                ));
            }
            let (listener, addr) = bind(&g.bind).await?;
            gateway_addr = Some(addr);
            all.push(tokio::spawn(crate::web::serve(
                listener,
                router,
                max_connections,
                header_timeout,
                cancel.clone(),
            )));
        }
        let mut http_addr = None;
        if let (Some(bind_to), Some(engine)) = (&cfg.http, &chat) {
            let (listener, addr) = bind(bind_to).await?;
            http_addr = Some(addr);
            let store = has_gateway.then(|| store.clone());
            let board = Arc::new(Dashboard::new(data_dir.clone(), store));
            all.push(tokio::spawn(crate::web::serve(
                listener,
                crate::web::router(engine.clone(), board, true, false, api_key.clone()),
                GatewayConfig::MAX_CONNECTIONS,
                GatewayConfig::HEADER_TIMEOUT,
                cancel.clone(),
            )));
        }
        Ok(Node {
            peer_id,
            model_id: model,
            listen_addrs,
            gateway_addr,
            http_addr,
            data_dir,
            client,
            local,
            view,
            cancel,
            tasks: all,
        })
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The network's model id.
    pub fn model_id(&self) -> ModelId {
        self.model_id
    }

    /// Where the node listens, each address ending in `/p2p/<peer id>` (dialable as a
    /// bootstrap address).
    pub fn listen_addrs(&self) -> &[Multiaddr] {
        &self.listen_addrs
    }

    /// Where the gateway listens, when there is one.
    pub fn gateway_addr(&self) -> Option<SocketAddr> {
        self.gateway_addr
    }

    /// Where the chat API's own HTTP server listens ([`NodeConfig::http`]), when there is one.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// The node's data dir.
    pub fn data_dir(&self) -> &DataDir {
        &self.data_dir
    }

    /// The network client (peers, dials, penalties).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// A live view of the rounds (current round, its contributors, the latest commit).
    pub fn view(&self) -> watch::Receiver<DriverView> {
        self.view.clone()
    }

    /// Reads, checks and announces a PEFT adapter dir in the current round; `samples` is
    /// its FedAvg weight. Refused when this round already has this node's adapter.
    pub async fn contribute(&self, dir: PathBuf, samples: u64) -> Result<Hash> {
        let (reply, rx) = oneshot::channel();
        self.local
            .send(Local::Contribute {
                dir,
                samples,
                reply,
            })
            .await
            .map_err(|_| Error::DriverStopped)?;
        rx.await.map_err(|_| Error::DriverStopped)?
    }

    /// Stops every task of the node and waits for each to end; removes the status file.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        for t in self.tasks {
            if let Err(e) = t.await {
                tracing::error!(error = %e, "a node task failed");
            }
        }
        self.data_dir.remove_status();
    }
}

//! `hive-node join`: run a node of one model's network until Ctrl-C.
//!
//! ```text
//!   join::run ──▶ Store::open, identity ──▶ Network::spawn (event loop task)
//!                                      └──▶ Driver::run (round task) ◀── --contribute, inbox/
//!   Ctrl-C / SIGTERM ──▶ CancellationToken ──▶ both tasks stop, joined
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use hivemind_protocol::{announce_topic, digest_topic, BaseModel, LoraShape, ModelId, RoundConfig};
use libp2p::Multiaddr;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::driver::{Driver, DriverConfig, Local, NetSpec};
use crate::identity::keypair_of;
use crate::network::{with_peer, NetConfig, Network};

/// Arguments of `hive-node join`.
#[derive(Debug, Clone, Args)]
pub struct JoinArgs {
    /// Bootstrap peers (multiaddrs ending in /p2p/PEERID). None: this node is a bootstrap node.
    #[arg(long, env = "HIVE_BOOTSTRAP", value_delimiter = ',')]
    pub bootstrap: Vec<Multiaddr>,
    /// Listen addresses (port 0 picks a free port).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "/ip4/0.0.0.0/tcp/0,/ip4/0.0.0.0/udp/0/quic-v1"
    )]
    pub listen: Vec<Multiaddr>,
    /// Data directory (identity, store, status file).
    #[arg(long, env = "HIVE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Collection window of a round, in seconds.
    #[arg(long, env = "HIVE_ROUND_SECS", default_value_t = 3600.0)]
    pub round_secs: f64,
    /// Quiet period after a round closes before it commits, in seconds (default: a third
    /// of the window, at most 300).
    #[arg(long, env = "HIVE_GRACE_SECS")]
    pub grace_secs: Option<f64>,
    /// Base model whose network to join: `default`, or a local GGUF file / HF model dir.
    #[arg(long, env = "HIVE_MODEL", default_value = "default")]
    pub model: String,
    /// A PEFT adapter dir to announce in the current round.
    #[arg(long)]
    pub contribute: Option<PathBuf>,
    /// Training samples behind the contributed adapter (its FedAvg weight).
    #[arg(long, default_value_t = 1)]
    pub samples: u64,
    /// LoRA rank of this network's adapters.
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// LoRA alpha of this network's adapters.
    #[arg(long, default_value_t = 32.0)]
    pub alpha: f64,
    /// Adapted modules, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )]
    pub target_modules: Vec<String>,
    /// Discover peers on the LAN with mDNS.
    #[arg(long)]
    pub mdns: bool,
}

/// The network's model id: the base model's identity ([`hivemind_model::model_hash`], the
/// same hash `BaseModel::load` computes) plus the LoRA shape.
pub fn model_id(model_path: &Path, args: &JoinArgs) -> Result<(ModelId, hivemind_protocol::Hash)> {
    let hash = hivemind_model::model_hash(model_path)
        .with_context(|| format!("hashing base model {}", model_path.display()))?;
    let shape = LoraShape {
        rank: args.rank as u32,
        alpha: args.alpha as f32,
        target_modules: args.target_modules.clone(),
    };
    Ok((ModelId::derive(&BaseModel::File(hash), &shape), hash))
}

/// File in the data dir naming the network the node last joined (for `chat` and `export`).
pub const NETWORK_FILE: &str = "network.json";

/// What `network.json` holds.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NetworkFile {
    /// The network's model id, hex.
    pub model_id: String,
    /// blake3 identity of the base model ([`hivemind_model::model_hash`]), hex.
    pub base_model_hash: String,
    /// The LoRA config every adapter of the network has.
    pub adapter_config: serde_json::Value,
}

/// Arguments of `hive-node serve`: a node with the legacy REST gateway.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Node options (as for `join`; without --bootstrap this is a bootstrap node).
    #[command(flatten)]
    pub join: JoinArgs,
    /// Address the HTTP gateway binds.
    #[arg(long, default_value = "0.0.0.0")]
    pub host: String,
    /// Port of the HTTP gateway (0 picks a free one).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Largest upload in MiB (request body, and the inflated content of a zip).
    #[arg(long, default_value_t = 512)]
    pub max_upload_mb: u64,
    /// Longest a request may take, upload included, in seconds.
    #[arg(long, default_value_t = 300)]
    pub request_timeout_secs: u64,
    /// How long POST /api/v1/aggregate waits for the round to commit, in seconds.
    #[arg(long, default_value_t = 240)]
    pub aggregate_wait_secs: u64,
    /// Accepted for compatibility with the legacy server's CLI and ignored: there is no
    /// code to reload.
    #[arg(long)]
    pub reload: bool,
}

/// The round timing of `--round-secs` and `--grace-secs`: production defaults, with the
/// grace, fetch and heartbeat timers scaled down for short rounds (tests, demos).
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

impl NetworkFile {
    /// Reads `network.json` from a node's data dir.
    pub fn read(data_dir: &Path) -> Result<NetworkFile> {
        let p = data_dir.join(NETWORK_FILE);
        let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("reading {}", p.display()))
    }
}

/// Runs `hive-node join`.
pub fn run(args: JoinArgs) -> Result<()> {
    runtime()?.block_on(run_async(args, None))
}

/// Runs `hive-node serve`.
pub fn serve(args: ServeArgs) -> Result<()> {
    let join = args.join.clone();
    runtime()?.block_on(run_async(join, Some(args)))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

async fn run_async(args: JoinArgs, gateway: Option<ServeArgs>) -> Result<()> {
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(crate::identity::default_data_dir);
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let spec = args.model.clone();
    let a2 = args.clone();
    let (model, base_hash, model_path) = tokio::task::spawn_blocking(move || -> Result<_> {
        let path = hivemind_model::pull::resolve_model(Some(&spec), &mut crate::cli::progress)?;
        let (id, hash) = model_id(&path, &a2)?;
        Ok((id, hash, path))
    })
    .await??;
    let dd = data_dir.clone();
    let (store, key) = tokio::task::spawn_blocking(move || -> Result<_> {
        let store = hivemind_store::Store::open(&dd)
            .with_context(|| format!("opening the store in {}", dd.display()))?;
        Ok((store, crate::identity::load_node_key(&dd)?))
    })
    .await??;
    let spec = NetSpec::for_model(&model_path, args.rank, args.alpha, &args.target_modules)
        .context("the network's LoRA shape (--rank, --alpha, --target-modules)")?;
    let config = spec.config.clone();
    let network = NetworkFile {
        model_id: model.to_hex(),
        base_model_hash: base_hash.to_hex(),
        adapter_config: serde_json::to_value(&config)?,
    };
    crate::driver::write_json_atomic(&data_dir.join(NETWORK_FILE), &network)?;
    let cancel = CancellationToken::new();
    let round = round_config(args.round_secs, args.grace_secs);
    let window_ms = round.window_ms;
    let net_cfg = NetConfig {
        listen: args.listen.clone(),
        bootstrap: args.bootstrap.clone(),
        topics: vec![announce_topic(&model), digest_topic(&model)],
        mdns: args.mdns,
        heartbeat: Duration::from_millis(if window_ms < 60_000 { 200 } else { 1000 }),
        serve_limit: crate::blob_protocol::DEFAULT_SERVE_LIMIT,
    };
    let net = Network::spawn(
        keypair_of(&key)?,
        net_cfg,
        Arc::new(store.clone()),
        cancel.clone(),
    )
    .await?;
    let me = net.client.local_peer_id();
    if let Ok(info) = net.client.info().await {
        for a in &info.listen_addrs {
            println!("listening on {}", with_peer(a, me));
        }
    }
    println!("model id {}", model.to_hex());
    let (local_tx, local_rx) = mpsc::channel(16);
    let driver = Driver::new(
        DriverConfig {
            model,
            round,
            spec: spec.clone(),
            data_dir: data_dir.clone(),
        },
        key,
        store.clone(),
        net.client.clone(),
        net.events,
        local_rx,
    )?;
    let view = driver.view();
    let driver_task = tokio::spawn(driver.run(cancel.clone()));
    let mut http_task = None;
    if let Some(g) = gateway {
        let gw = crate::gateway::Gateway::new(
            store,
            spec,
            local_tx.clone(),
            view,
            crate::gateway::GatewayConfig {
                max_upload_bytes: g.max_upload_mb.saturating_mul(1 << 20),
                request_timeout: Duration::from_secs(g.request_timeout_secs),
                aggregate_wait: Duration::from_secs(g.aggregate_wait_secs),
            },
        );
        let listener = tokio::net::TcpListener::bind((g.host.as_str(), g.port))
            .await
            .with_context(|| format!("binding the gateway to {}:{}", g.host, g.port))?;
        println!("gateway on http://{}", listener.local_addr()?);
        let c = cancel.clone();
        http_task = Some(tokio::spawn(async move {
            let r = axum::serve(listener, crate::gateway::router(gw))
                .with_graceful_shutdown(c.cancelled_owned())
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "gateway stopped");
            }
        }));
    }
    if let Some(dir) = args.contribute.clone() {
        let (reply, rx) = tokio::sync::oneshot::channel();
        local_tx
            .send(Local::Contribute {
                dir,
                samples: args.samples,
                reply,
            })
            .await
            .map_err(|_| anyhow::anyhow!("driver stopped"))?;
        match rx.await? {
            Ok(h) => println!("contributed {}", h.to_hex()),
            Err(e) => anyhow::bail!("contribution refused: {e}"),
        }
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    cancel.cancel();
    let _ = driver_task.await;
    if let Some(t) = http_task {
        let _ = t.await;
    }
    let _ = net.task.await;
    let _ = std::fs::remove_file(data_dir.join(crate::driver::STATUS_FILE));
    Ok(())
}

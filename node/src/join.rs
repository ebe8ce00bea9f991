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
use hivemind_model::adapter::{AdapterConfig, TargetModules};
use hivemind_protocol::{
    announce_topic, digest_topic, BaseModel, LoraShape, ModelId, NodeKey, RoundConfig,
};
use libp2p::Multiaddr;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::driver::{Driver, DriverConfig, Local};
use crate::network::{keypair_of, with_peer, NetConfig, Network};

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

/// The default data dir.
pub fn default_data_dir() -> PathBuf {
    dirs::data_dir()
        .unwrap_or_else(|| PathBuf::from("."))
        .join("hivemind")
        .join("node")
}

/// The network's adapter config from the arguments.
pub fn adapter_config(args: &JoinArgs) -> AdapterConfig {
    AdapterConfig::new(
        args.rank,
        args.alpha,
        TargetModules::from_names(args.target_modules.iter().cloned()),
    )
}

/// The model id: blake3 of the base model file (or of a model dir's files, in name order)
/// plus the LoRA shape.
pub fn model_id(model_path: &Path, args: &JoinArgs) -> Result<ModelId> {
    let mut h = blake3::Hasher::new();
    if model_path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(model_path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        for f in files {
            h.update_mmap(&f)
                .with_context(|| format!("hashing {}", f.display()))?;
        }
    } else {
        h.update_mmap(model_path)
            .with_context(|| format!("hashing {}", model_path.display()))?;
    }
    let base = BaseModel::File(hivemind_protocol::Hash::from(h.finalize()));
    let shape = LoraShape {
        rank: args.rank as u32,
        alpha: args.alpha as f32,
        target_modules: args.target_modules.clone(),
    };
    Ok(ModelId::derive(&base, &shape))
}

/// Runs `hive-node join`.
pub fn run(args: JoinArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_async(args))
}

async fn run_async(args: JoinArgs) -> Result<()> {
    let data_dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let spec = args.model.clone();
    let a2 = args.clone();
    let model = tokio::task::spawn_blocking(move || -> Result<ModelId> {
        let path = hivemind_model::pull::resolve_model(Some(&spec), &mut crate::cli::progress)?;
        model_id(&path, &a2)
    })
    .await??;
    let dd = data_dir.clone();
    let (store, secret) = tokio::task::spawn_blocking(move || -> Result<_> {
        let store = hivemind_store::Store::open(&dd)?;
        let secret = hivemind_store::load_or_create_identity(&dd)?;
        Ok((store, secret))
    })
    .await??;
    let cfg_json = adapter_config(&args).to_json()?;
    std::fs::write(data_dir.join("adapter_config.json"), cfg_json)?;
    let key = NodeKey::from_bytes(&secret.to_bytes());
    let cancel = CancellationToken::new();
    let window_ms = (args.round_secs * 1000.0).max(100.0) as u64;
    let mut round = RoundConfig::default();
    round.window_ms = window_ms;
    // Short rounds (tests, demos) get proportionally short grace and fetch timers.
    round.grace_ms = round.grace_ms.min((window_ms / 3).max(300));
    round.fetch_timeout_ms = round.fetch_timeout_ms.min((window_ms / 2).max(1000));
    round.heartbeat_ms = round.heartbeat_ms.min((window_ms / 3).max(500));
    round.max_clock_skew_ms = round.max_clock_skew_ms.max(5000);
    let net_cfg = NetConfig {
        listen: args.listen.clone(),
        bootstrap: args.bootstrap.clone(),
        topics: vec![announce_topic(&model), digest_topic(&model)],
        mdns: args.mdns,
        heartbeat: Duration::from_millis(if window_ms < 60_000 { 200 } else { 1000 }),
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
            adapter_config: adapter_config(&args),
            data_dir: data_dir.clone(),
        },
        key,
        store,
        net.client.clone(),
        net.events,
        local_rx,
    )?;
    let driver_task = tokio::spawn(driver.run(cancel.clone()));
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
    let _ = net.task.await;
    let _ = std::fs::remove_file(data_dir.join(crate::driver::STATUS_FILE));
    Ok(())
}

//! `hive-node status`, `rounds`, `export` and `contribute`: commands that talk to a node
//! through its data dir.
//!
//! ```text
//!   running node ──writes every 300 ms──▶ <data dir>/status.json ◀── status / rounds / export
//!   contribute ──copies adapter──▶ <data dir>/inbox/<name>/ (+ READY) ──polled by──▶ driver
//!   export ──reads──▶ <data dir>/blobs/<hash hex> (verified against the hash)
//! ```
//!
//! A running node holds the sled database locked, so these commands read the status file
//! it keeps; with no node running, `rounds` and `export` open the store directly.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use hivemind_model::adapter::{AdapterConfig, Limits, LoraAdapter};
use hivemind_protocol::Hash;

use crate::driver::{RoundView, StatusFile, INBOX_DIR, STATUS_FILE};

/// Arguments of `hive-node status`.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// Data directory of the node.
    #[arg(long, env = "HIVE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `hive-node rounds`.
#[derive(Debug, Clone, Args)]
pub struct RoundsArgs {
    /// Data directory of the node.
    #[arg(long, env = "HIVE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `hive-node export`.
#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// Data directory of the node.
    #[arg(long, env = "HIVE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Round number (default: the latest).
    #[arg(long)]
    pub round: Option<u64>,
    /// Output PEFT adapter dir.
    #[arg(long)]
    pub output: PathBuf,
}

/// Arguments of `hive-node contribute`.
#[derive(Debug, Clone, Args)]
pub struct ContributeArgs {
    /// Data directory of the running node.
    #[arg(long, env = "HIVE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Training samples behind the adapter.
    #[arg(long, default_value_t = 1)]
    pub samples: u64,
    /// The PEFT adapter dir.
    pub adapter: PathBuf,
}

fn dir_of(d: &Option<PathBuf>) -> PathBuf {
    d.clone().unwrap_or_else(crate::identity::default_data_dir)
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The status file of a running node in `data_dir`.
pub fn read_status(data_dir: &Path) -> Result<StatusFile> {
    let path = data_dir.join(STATUS_FILE);
    let bytes = std::fs::read(&path).with_context(|| {
        format!(
            "no running node found in {} (no {STATUS_FILE})",
            data_dir.display()
        )
    })?;
    let s: StatusFile =
        serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display()))?;
    if !pid_alive(s.pid) {
        bail!(
            "the node that wrote {} (pid {}) is not running",
            path.display(),
            s.pid
        );
    }
    Ok(s)
}

/// `hive-node status`.
pub fn status(args: StatusArgs) -> Result<()> {
    let s = read_status(&dir_of(&args.data_dir))?;
    if args.json {
        let v = serde_json::json!({
            "peer_id": s.peer_id,
            "listen_addrs": s.listen_addrs,
            "connected_peers": s.connected_peers,
            "current_round": s.current_round,
            "current_contributors": s.current_contributors,
            "latest_round": s.latest_round,
            "model_id": s.model_id,
            "penalties": s.penalties,
            "inbox_waiting": s.inbox_waiting,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("peer id:         {}", s.peer_id);
        for a in &s.listen_addrs {
            println!("listening on:    {a}");
        }
        println!("connected peers: {}", s.connected_peers);
        println!(
            "current round:   {} ({} contributors so far)",
            s.current_round,
            s.current_contributors.len()
        );
        if !s.inbox_waiting.is_empty() {
            println!(
                "waiting:         {} handed-over adapters wait for the next round",
                s.inbox_waiting.len()
            );
        }
        match &s.latest_round {
            Some(r) => println!(
                "latest round:    {} {} {} ({} contributors)",
                r.number,
                r.version,
                r.hash,
                r.contributors.len()
            ),
            None => println!("latest round:    none yet"),
        }
    }
    Ok(())
}

/// Committed rounds and the network's adapter config, from the running node or the store.
fn history(data_dir: &Path) -> Result<(Vec<RoundView>, Option<AdapterConfig>)> {
    if let Ok(s) = read_status(data_dir) {
        let cfg = serde_json::from_value(s.adapter_config).ok();
        return Ok((s.rounds, cfg));
    }
    let store = hivemind_store::Store::open(data_dir)?;
    let rounds = store.list_rounds()?.iter().map(RoundView::of).collect();
    Ok((rounds, None))
}

/// `hive-node rounds`.
pub fn rounds(args: RoundsArgs) -> Result<()> {
    let (rounds, _) = history(&dir_of(&args.data_dir))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rounds)?);
    } else if rounds.is_empty() {
        println!("no committed rounds yet");
    } else {
        for r in rounds {
            println!(
                "{:>6}  {:<12} {}  {} contributors",
                r.number,
                r.version,
                r.hash,
                r.contributors.len()
            );
        }
    }
    Ok(())
}

/// `hive-node export`.
pub fn export(args: ExportArgs) -> Result<()> {
    let data_dir = dir_of(&args.data_dir);
    let round = export_round(&data_dir, args.round, &args.output)?;
    println!(
        "{}: round {} ({}, {})",
        args.output.display(),
        round.number,
        round.version,
        round.hash
    );
    Ok(())
}

/// The committed round `number` (default: the latest) of the node in `data_dir`, if any.
pub fn find_round(data_dir: &Path, number: Option<u64>) -> Result<Option<RoundView>> {
    let (rounds, _) = history(data_dir)?;
    Ok(match number {
        Some(n) => rounds.into_iter().find(|r| r.number == n),
        None => rounds.into_iter().last(),
    })
}

/// The latest round adapter of `data_dir` as a PEFT dir (written once under
/// `<data dir>/round-adapters/<version>-<hash prefix>`), or `None` before the first round.
pub fn latest_round_adapter(data_dir: &Path) -> Result<Option<(RoundView, PathBuf)>> {
    if !data_dir.join(hivemind_store::BLOBS_DIR).exists() {
        return Ok(None);
    }
    let Some(round) = find_round(data_dir, None)? else {
        return Ok(None);
    };
    let dir =
        data_dir
            .join("round-adapters")
            .join(format!("{}-{}", round.version, &round.hash[..16]));
    if !dir.join(hivemind_model::adapter::WEIGHTS_FILE).exists() {
        export_round(data_dir, Some(round.number), &dir)?;
    }
    Ok(Some((round, dir)))
}

/// Writes committed round `number` (default: the latest) as a PEFT dir at `output`, after
/// checking its bytes against the committed hash.
pub fn export_round(data_dir: &Path, number: Option<u64>, output: &Path) -> Result<RoundView> {
    let (rounds, cfg) = history(data_dir)?;
    let round = match number {
        Some(n) => rounds.iter().find(|r| r.number == n).with_context(|| {
            format!(
                "round {n} is not among the committed rounds of {}",
                data_dir.display()
            )
        })?,
        None => rounds
            .last()
            .with_context(|| format!("no committed round in {} yet", data_dir.display()))?,
    };
    let hash: Hash = round.hash.parse().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let path = data_dir.join(hivemind_store::BLOBS_DIR).join(hash.to_hex());
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    if Hash::of(&bytes) != hash {
        bail!("{} does not match its hash", path.display());
    }
    let cfg = match cfg {
        Some(c) => c,
        None => network_config(data_dir)?,
    };
    let adapter = LoraAdapter::from_safetensors_bytes(cfg, &bytes, &Limits::DEFAULT)?;
    adapter.write_dir(output)?;
    Ok(round.clone())
}

/// The LoRA config of the network the node in `data_dir` joined (from `network.json`).
pub fn network_config(data_dir: &Path) -> Result<AdapterConfig> {
    let net = crate::join::NetworkFile::read(data_dir)?;
    serde_json::from_value(net.adapter_config).with_context(|| {
        format!(
            "adapter config in {}",
            data_dir.join(crate::join::NETWORK_FILE).display()
        )
    })
}

/// `hive-node contribute`: hands an adapter dir to the running node.
pub fn contribute(args: ContributeArgs) -> Result<()> {
    hand_over(&dir_of(&args.data_dir), &args.adapter, args.samples)?;
    println!("handed to the running node");
    Ok(())
}

/// Copies an adapter dir into the inbox of the node running in `data_dir`, which announces it
/// in its current round (`samples` is its FedAvg weight).
pub fn hand_over(data_dir: &Path, adapter_dir: &Path, samples: u64) -> Result<()> {
    let data_dir = data_dir.to_path_buf();
    read_status(&data_dir)?;
    let adapter = LoraAdapter::read_dir(adapter_dir)
        .with_context(|| format!("reading adapter {}", adapter_dir.display()))?;
    let name = format!(
        "{}-{}",
        crate::driver::now_ms(),
        adapter.canonical_hash()?.short()
    );
    let tmp = data_dir.join(INBOX_DIR).join(format!(".{name}"));
    adapter.write_dir(&tmp)?;
    std::fs::write(tmp.join("READY"), samples.to_string())?;
    std::fs::rename(&tmp, data_dir.join(INBOX_DIR).join(name))?;
    Ok(())
}

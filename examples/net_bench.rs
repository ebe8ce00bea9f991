//! Network benchmarks of issue 5, each with its baseline measured in the same run.
//!
//! ```text
//! cargo run -p hivemind-node --example net_bench -- [gossip|transfer|commit|all]
//! ```
//!
//! Every benchmark prints one JSON object on stdout (progress goes to stderr) holding the
//! measured value, its baseline and their ratio. All nodes live in this process as tasks on
//! one multi-thread tokio runtime and talk real libp2p (TCP, noise, yamux) on 127.0.0.1.
//!
//! * `gossip`: 20 nodes, one topic; node 0 publishes 40 announcement-sized messages.
//!   Measured: per message, the time until all other nodes had it (p50/p99/max).
//!   Baseline: one hop of the same bytes over a plain tokio TCP connection (p50).
//! * `transfer`: a 64 MiB blob fetched with `fetch_blob` (verified and stored by the
//!   `BlobWriter`). Baseline: a plain tokio TCP copy of the same bytes into memory. Two
//!   like-for-like pairs are measured in the same reps: the blob stream into memory (the
//!   transport alone) vs that TCP copy, and `fetch_blob` vs a plain TCP copy into the same
//!   `BlobWriter` (hash check, fsync, install). Diagnostics split the cost, each with the
//!   cores the process kept busy: the blob stream from the store, `fetch_blob` from a
//!   memory source, the store sink alone (writes vs fsync), blake3.
//! * `commit`: 5 full nodes (network + round driver), one tiny adapter each. Measured: the
//!   time from the earliest window end to the last commit. Baseline: the configured grace
//!   period, the protocol's designed quiet time before a commit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::{Parser, ValueEnum};
use futures::{AsyncReadExt as _, AsyncWriteExt as _};
use hivemind_model::adapter::{AdapterConfig, LoraAdapter, TargetModules};
use hivemind_model::aggregate::{AggregationRule, FedAvg, WeightedAdapter};
use hivemind_model::config::Arch;
use hivemind_model::testing::TinyModel;
use hivemind_node::driver::{round_metadata, NetSpec};
use hivemind_node::harness::{node_dirs, wait_until, Cluster};
use hivemind_node::identity::keypair_of;
use hivemind_node::net::blob::{
    decode_header, encode_request, fetch_blob, BlobHeader, BlobRequest, BlobSource, OpenBlob,
    SharedSource, FRAME_BYTES,
};
use hivemind_node::net::{with_peer, Client, NetConfig, NetEvent, Network};
use hivemind_node::node::{LoraSettings, NodeConfig};
use hivemind_protocol::{AggregateInput, AggregationJob, Hash, NodeKey, RuleId};
use hivemind_store::Store;
use libp2p::gossipsub::MessageAcceptance;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Which benchmark to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Which {
    Gossip,
    Transfer,
    Commit,
    All,
}

/// Network benchmarks (issue 5). JSON on stdout, progress on stderr.
#[derive(Debug, Parser)]
struct Args {
    /// Benchmark to run.
    #[arg(value_enum, default_value = "all")]
    which: Which,
    /// Nodes of the gossip benchmark.
    #[arg(long, env = "BENCH_GOSSIP_NODES", default_value_t = 20)]
    gossip_nodes: usize,
    /// Messages node 0 publishes.
    #[arg(long, env = "BENCH_GOSSIP_MSGS", default_value_t = 40)]
    gossip_msgs: usize,
    /// Bytes per gossip message (an announcement is about 600).
    #[arg(long, env = "BENCH_GOSSIP_BYTES", default_value_t = 600)]
    gossip_bytes: usize,
    /// Milliseconds between two published messages.
    #[arg(long, env = "BENCH_GOSSIP_GAP_MS", default_value_t = 100)]
    gossip_gap_ms: u64,
    /// Size of the transferred blob in MiB.
    #[arg(long, env = "BENCH_BLOB_MIB", default_value_t = 64)]
    blob_mib: usize,
    /// Repetitions of the transfer (and of its TCP baseline).
    #[arg(long, env = "BENCH_REPS", default_value_t = 5)]
    reps: usize,
    /// Full nodes of the commit benchmark.
    #[arg(long, env = "BENCH_COMMIT_NODES", default_value_t = 5)]
    commit_nodes: usize,
    /// Collection window of the commit benchmark's round, in seconds.
    #[arg(long, env = "BENCH_ROUND_SECS", default_value_t = 3.0)]
    round_secs: f64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let all = args.which == Which::All;
        if all || args.which == Which::Gossip {
            print(gossip(&args).await?);
        }
        if all || args.which == Which::Transfer {
            print(transfer(&args).await?);
        }
        if all || args.which == Which::Commit {
            print(commit(&args).await?);
        }
        Ok(())
    })
}

fn print(v: serde_json::Value) {
    println!("{v}");
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Nearest-rank percentile of sorted values (`p` in 0..=1).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Rounds to 3 decimals for readable JSON.
fn r3(x: f64) -> f64 {
    (x * 1e3).round() / 1e3
}

/// Deterministic pseudo-random bytes (xorshift64*): incompressible, fast to make.
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        out.extend_from_slice(&s.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// CPU time (user + system) this process has used so far, in seconds, from
/// `/proc/self/stat` (Linux; `None` elsewhere). Resolution: one clock tick (10 ms).
fn cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses: state is field 3, utime 14,
    // stime 15 (1-based), so indices 11 and 12 here.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Runs `f`, returning its output, its wall time and the cores it kept busy on average
/// (process CPU time / wall time; `None` where unknown).
async fn timed<T, Fut>(f: Fut) -> (T, Duration, Option<f64>)
where
    Fut: std::future::Future<Output = T>,
{
    let c0 = cpu_secs();
    let t0 = Instant::now();
    let out = f.await;
    let wall = t0.elapsed();
    let busy = match (c0, cpu_secs()) {
        (Some(a), Some(b)) => Some(r3((b - a) / wall.as_secs_f64())),
        _ => None,
    };
    (out, wall, busy)
}

/// Where benchmark nodes listen: TCP on loopback, or QUIC with BENCH_QUIC=1 (every
/// benchmark then runs over QUIC instead of TCP+noise+yamux).
fn listen_addr() -> Multiaddr {
    let ip = Multiaddr::from(std::net::Ipv4Addr::LOCALHOST);
    if std::env::var("BENCH_QUIC").is_ok_and(|v| v == "1") {
        ip.with(Protocol::Udp(0)).with(Protocol::QuicV1)
    } else {
        ip.with(Protocol::Tcp(0))
    }
}

fn net_config(bootstrap: Vec<Multiaddr>, topics: Vec<String>) -> Result<NetConfig> {
    Ok(NetConfig {
        listen: vec![listen_addr()],
        bootstrap,
        topics,
        mdns: false,
        // What `join` uses for short rounds.
        heartbeat: Duration::from_millis(200),
        serve_limit: hivemind_node::net::blob::DEFAULT_SERVE_LIMIT,
        max_incoming: hivemind_node::net::DEFAULT_MAX_INCOMING,
        min_serve_rate: hivemind_node::net::blob::DEFAULT_MIN_SERVE_RATE,
        allow: None,
    })
}

/// Starts a network for node key `key`.
async fn spawn_net(
    key: &NodeKey,
    bootstrap: Vec<Multiaddr>,
    topics: Vec<String>,
    source: SharedSource,
    cancel: &CancellationToken,
) -> Result<Network> {
    Ok(Network::spawn(
        keypair_of(key)?,
        net_config(bootstrap, topics)?,
        source,
        cancel.clone(),
    )
    .await?)
}

/// The first listen address of `client`'s node, with `/p2p/<peer id>`.
async fn dial_addr(client: &Client) -> Result<Multiaddr> {
    let info = client.info().await?;
    let addr = info
        .listen_addrs
        .first()
        .context("the node listens nowhere")?;
    Ok(with_peer(addr, client.local_peer_id()))
}

/// Waits until every client has at least `min` connected peers; returns how long it took.
async fn wait_connected(clients: &[Client], min: usize, limit: Duration) -> Result<Duration> {
    let start = Instant::now();
    wait_until(
        &format!("every node to have >= {min} peers"),
        limit,
        || async {
            for c in clients {
                if c.info().await.ok()?.connected.len() < min {
                    return None;
                }
            }
            Some(())
        },
    )
    .await?;
    Ok(start.elapsed())
}

async fn peer_counts(clients: &[Client]) -> Result<Vec<usize>> {
    let mut v = Vec::with_capacity(clients.len());
    for c in clients {
        v.push(c.info().await?.connected.len());
    }
    Ok(v)
}

// ---------------------------------------------------------------------------------------
// 1. Gossip propagation
// ---------------------------------------------------------------------------------------

/// One gossip message arriving at one node.
struct Arrival {
    node: usize,
    msg: usize,
    at: Instant,
    /// Forwarded by the publisher itself (one hop).
    direct: bool,
}

async fn gossip(args: &Args) -> Result<serde_json::Value> {
    let n = args.gossip_nodes;
    let m = args.gossip_msgs;
    ensure!(n >= 2 && m >= 1, "gossip needs >= 2 nodes and >= 1 message");
    ensure!(args.gossip_bytes >= 8, "gossip messages need >= 8 bytes");
    eprintln!("gossip: starting {n} nodes");
    let cancel = CancellationToken::new();
    let topic = "/hivemind/bench/gossip/1".to_string();
    let store_dir = tempfile::tempdir()?;
    let source: SharedSource = Arc::new(Store::open(store_dir.path())?);
    let (arr_tx, mut arr_rx) = mpsc::unbounded_channel::<Arrival>();
    let mut nets = Vec::with_capacity(n);
    let mut boot = Vec::new();
    let mut publisher: Option<PeerId> = None;
    for i in 0..n {
        let key = NodeKey::from_bytes(&[i as u8 + 1; 32]);
        let net = spawn_net(
            &key,
            boot.clone(),
            vec![topic.clone()],
            source.clone(),
            &cancel,
        )
        .await?;
        if i == 0 {
            boot = vec![dial_addr(&net.client).await?];
            publisher = Some(net.client.local_peer_id());
        }
        nets.push(net);
    }
    let publisher = publisher.context("no publisher")?;
    let clients: Vec<Client> = nets.iter().map(|n| n.client.clone()).collect();
    let mut tasks = Vec::new();
    let mut readers = Vec::new();
    // Every node accepts every message (validation is manual: an unvalidated message is
    // never forwarded) and records when it arrived.
    for (node, net) in nets.into_iter().enumerate() {
        let Network {
            client,
            mut events,
            tasks: net_tasks,
        } = net;
        tasks.extend(net_tasks);
        let tx = arr_tx.clone();
        // Ends when the network task stops and drops its event sender.
        readers.push(tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                let NetEvent::Gossip {
                    id, source, data, ..
                } = ev
                else {
                    continue;
                };
                let at = Instant::now();
                if let Some(idx) = data.get(..4) {
                    let msg = u32::from_le_bytes([idx[0], idx[1], idx[2], idx[3]]) as usize;
                    let _ = tx.send(Arrival {
                        node,
                        msg,
                        at,
                        direct: source == publisher,
                    });
                }
                client.validate(id, source, MessageAcceptance::Accept).await;
            }
        }));
    }
    drop(arr_tx);
    let mesh_wait = wait_connected(&clients, 3.min(n - 1), Duration::from_secs(60)).await?;
    eprintln!(
        "gossip: every node has >= 3 peers after {:.1} s; 3 s of heartbeats",
        mesh_wait.as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let peers = peer_counts(&clients).await?;

    let messages: Vec<Vec<u8>> = (0..m)
        .map(|i| {
            let mut b = random_bytes(args.gossip_bytes, 0x9E37_79B9 + i as u64);
            b[..4].copy_from_slice(&(i as u32).to_le_bytes());
            b
        })
        .collect();
    let mut sent_at = Vec::with_capacity(m);
    let mut publish_retries = 0u32;
    eprintln!(
        "gossip: publishing {m} messages, {} ms apart",
        args.gossip_gap_ms
    );
    for msg in &messages {
        let mut tries = 0;
        let t0 = loop {
            let t0 = Instant::now();
            match clients[0].publish(topic.clone(), msg.clone()).await {
                Ok(()) => break t0,
                Err(e) if tries < 20 => {
                    tries += 1;
                    publish_retries += 1;
                    eprintln!("publish failed ({e}); retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        sent_at.push(t0);
        tokio::time::sleep(Duration::from_millis(args.gossip_gap_ms)).await;
    }
    // arrivals[msg][node]
    let mut arrivals: Vec<Vec<Option<Instant>>> = vec![vec![None; n]; m];
    let mut direct = 0usize;
    let want = m * (n - 1);
    let mut got = 0usize;
    let drain_until = tokio::time::Instant::now() + Duration::from_secs(5);
    while got < want {
        let a = tokio::select! {
            a = arr_rx.recv() => a,
            _ = tokio::time::sleep_until(drain_until) => None,
        };
        let Some(a) = a else { break };
        if a.msg < m && a.node != 0 && arrivals[a.msg][a.node].is_none() {
            arrivals[a.msg][a.node] = Some(a.at);
            got += 1;
            direct += usize::from(a.direct);
        }
    }
    cancel.cancel();
    for t in tasks.into_iter().chain(readers) {
        let _ = t.await;
    }

    let mut all_nodes = Vec::new();
    let mut per_delivery = Vec::new();
    for (i, row) in arrivals.iter().enumerate() {
        let lat: Vec<f64> = row[1..]
            .iter()
            .flatten()
            .map(|t| ms(t.saturating_duration_since(sent_at[i])))
            .collect();
        per_delivery.extend_from_slice(&lat);
        if lat.len() == n - 1 {
            all_nodes.push(lat.iter().copied().fold(0.0, f64::max));
        }
    }
    let all_nodes = sorted(all_nodes);
    let per_delivery = sorted(per_delivery);

    let tcp = sorted(tcp_one_hop(&messages).await?);
    let tcp_p50 = percentile(&tcp, 0.5);
    let p50 = percentile(&all_nodes, 0.5);
    Ok(json!({
        "bench": "gossip",
        "nodes": n,
        "messages": m,
        "message_bytes": args.gossip_bytes,
        "connected_peers": {
            "min": peers.iter().min(),
            "max": peers.iter().max(),
            "mean": r3(peers.iter().sum::<usize>() as f64 / n as f64),
        },
        "mesh_wait_s": r3(mesh_wait.as_secs_f64()),
        "all_nodes_ms": {
            "p50": r3(p50),
            "p99": r3(percentile(&all_nodes, 0.99)),
            "max": r3(all_nodes.last().copied().unwrap_or(f64::NAN)),
            "messages_reaching_all": all_nodes.len(),
        },
        "per_delivery_ms": {
            "p50": r3(percentile(&per_delivery, 0.5)),
            "p99": r3(percentile(&per_delivery, 0.99)),
        },
        "delivered_fraction": r3(got as f64 / want as f64),
        "direct_from_publisher_fraction": r3(direct as f64 / got.max(1) as f64),
        "publish_retries": publish_retries,
        "baseline": {
            "what": "plain tokio TCP on loopback, one hop of the same bytes (nodelay)",
            "one_hop_ms_p50": r3(tcp_p50),
            "one_hop_ms_p99": r3(percentile(&tcp, 0.99)),
        },
        "ratio": r3(p50 / tcp_p50),
        "ratio_is": "gossip all-nodes p50 / TCP one-hop p50",
    }))
}

/// One-hop latencies (ms) of `messages` over a plain TCP connection on loopback.
async fn tcp_one_hop(messages: &[Vec<u8>]) -> Result<Vec<f64>> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let lens: Vec<usize> = messages.iter().map(Vec::len).collect();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        s.set_nodelay(true)?;
        for len in lens {
            let mut buf = vec![0u8; len];
            s.read_exact(&mut buf).await?;
            let _ = tx.send(Instant::now());
        }
        Ok::<_, std::io::Error>(())
    });
    let mut c = TcpStream::connect(addr).await?;
    c.set_nodelay(true)?;
    let mut lat = Vec::with_capacity(messages.len());
    for msg in messages {
        let t0 = Instant::now();
        c.write_all(msg).await?;
        let t1 = rx.recv().await.context("TCP reader stopped")?;
        lat.push(ms(t1.saturating_duration_since(t0)));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.await??;
    Ok(lat)
}

// ---------------------------------------------------------------------------------------
// 2. Adapter transfer
// ---------------------------------------------------------------------------------------

/// Serves one blob from memory: the wire without the serving side's disk reads.
struct MemSource {
    hash: Hash,
    bytes: Arc<Vec<u8>>,
}

/// Reads an `Arc<Vec<u8>>` from an offset.
struct ArcReader(Arc<Vec<u8>>, usize);

impl std::io::Read for ArcReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let rest = &self.0[self.1.min(self.0.len())..];
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.1 += n;
        Ok(n)
    }
}

impl BlobSource for MemSource {
    fn open(&self, hash: &Hash, offset: u64) -> std::io::Result<Option<OpenBlob>> {
        let total_len = self.bytes.len() as u64;
        if *hash != self.hash || offset > total_len {
            return Ok(None);
        }
        Ok(Some(OpenBlob {
            total_len,
            reader: Box::new(ArcReader(self.bytes.clone(), offset as usize)),
        }))
    }
}

async fn transfer(args: &Args) -> Result<serde_json::Value> {
    let len = args.blob_mib << 20;
    ensure!(
        len > 0 && args.reps > 0,
        "transfer needs a blob and >= 1 rep"
    );
    let mb = len as f64 / 1e6;
    eprintln!("transfer: {} MiB blob, {} reps", args.blob_mib, args.reps);
    let cancel = CancellationToken::new();
    let dir_a = tempfile::tempdir()?;
    let dir_b = tempfile::tempdir()?;
    let store_a = Store::open(dir_a.path())?;
    let store_b = Store::open(dir_b.path())?;
    let bytes = Arc::new(random_bytes(len, 0x5EED));
    let b2 = bytes.clone();
    let sa = store_a.clone();
    let hash = tokio::task::spawn_blocking(move || sa.put_blob(&b2)).await??;
    let topics = vec!["/hivemind/bench/transfer/1".to_string()];
    // A serves from its store, B fetches, C serves the same blob from memory.
    let a = spawn_net(
        &NodeKey::from_bytes(&[201; 32]),
        vec![],
        topics.clone(),
        Arc::new(store_a.clone()),
        &cancel,
    )
    .await?;
    let b = spawn_net(
        &NodeKey::from_bytes(&[202; 32]),
        vec![],
        topics.clone(),
        Arc::new(store_b.clone()),
        &cancel,
    )
    .await?;
    let c = spawn_net(
        &NodeKey::from_bytes(&[203; 32]),
        vec![],
        topics,
        Arc::new(MemSource {
            hash,
            bytes: bytes.clone(),
        }),
        &cancel,
    )
    .await?;
    b.client.dial(dial_addr(&a.client).await?).await?;
    b.client.dial(dial_addr(&c.client).await?).await?;
    wait_connected(std::slice::from_ref(&b.client), 2, Duration::from_secs(20)).await?;
    let peer_a = a.client.local_peer_id();
    let peer_c = c.client.local_peer_id();

    // Each rep, interleaved so load drifts hit all alike: the baseline (TCP into memory),
    // the blob stream into memory (the transport alone), a TCP copy into the same
    // BlobWriter (the store's work without libp2p), and fetch_blob (stream + store).
    let mut tcp = Series::default();
    let mut stream_mem = Series::default();
    let mut tcp_store = Series::default();
    let mut ours = Series::default();
    for rep in 0..args.reps {
        let (t, _, busy) = timed(tcp_copy(bytes.clone())).await;
        tcp.push(mb / t?.as_secs_f64(), busy);
        let (t, _, busy) = timed(wire_only(&b.client, peer_c, hash, len as u64)).await;
        stream_mem.push(mb / t?.as_secs_f64(), busy);
        let (t, _, busy) = timed(tcp_copy_into_store(bytes.clone(), &store_b, hash)).await;
        tcp_store.push(mb / t?.as_secs_f64(), busy);
        let sb = store_b.clone();
        tokio::task::spawn_blocking(move || sb.remove_blob(&hash)).await??;
        let (got, t, busy) =
            timed(fetch_blob(&b.client, &store_b, hash, &[peer_a], len as u64)).await;
        ensure!(got == Some(peer_a), "fetch_blob failed (rep {rep})");
        ensure!(
            store_b.has_blob(&hash)?,
            "the fetched blob is not in the store"
        );
        ours.push(mb / t.as_secs_f64(), busy);
        eprintln!(
            "transfer rep {rep}: fetch_blob {:.1} MB/s, tcp {:.1}, blob stream into memory {:.1}, tcp into the store {:.1}",
            ours.values[rep], tcp.values[rep], stream_mem.values[rep], tcp_store.values[rep]
        );
    }
    // The fetched bytes are the sent bytes (the writer checked the hash; check once more).
    let sb = store_b.clone();
    let fetched = tokio::task::spawn_blocking(move || sb.get_blob(&hash)).await??;
    ensure!(
        fetched.as_deref() == Some(&bytes[..]),
        "fetched bytes differ from the source"
    );
    drop(fetched);

    // Where the time goes. Each line: MB/s and the cores the process kept busy.
    let mut diag = serde_json::Map::new();
    let mut note = |name: &str, wall: Duration, busy: Option<f64>| {
        diag.insert(
            name.to_string(),
            json!({ "mb_s": r3(mb / wall.as_secs_f64()), "cores_busy": busy }),
        );
    };
    // The blob stream alone (streamed and dropped) from A's store.
    let (r, wall, busy) = timed(wire_only(&b.client, peer_a, hash, len as u64)).await;
    r?;
    note("blob_stream_from_store_into_memory", wall, busy);
    // fetch_blob from the memory source: everything but the serving side's disk reads.
    let sb = store_b.clone();
    tokio::task::spawn_blocking(move || sb.remove_blob(&hash)).await??;
    let (got, wall, busy) =
        timed(fetch_blob(&b.client, &store_b, hash, &[peer_c], len as u64)).await;
    ensure!(
        got == Some(peer_c),
        "fetch_blob from the memory source failed"
    );
    note("fetch_blob_memory_source", wall, busy);
    // The receiving store alone (BlobWriter: write_at per chunk, hash, fsync, rename).
    let sb = store_b.clone();
    let b3 = bytes.clone();
    let (r, _, busy) =
        timed(async { tokio::task::spawn_blocking(move || local_sink(&sb, &b3, hash)).await })
            .await;
    let (writes, finish) = r??;
    note("store_sink_only", writes + finish, busy);
    let sink_split = json!({
        "write_at_and_hash": r3(ms(writes)),
        "finish_fsync_rename": r3(ms(finish)),
    });
    // blake3 alone, one thread.
    let b4 = bytes.clone();
    let (r, wall, busy) =
        timed(async { tokio::task::spawn_blocking(move || Hash::of(&b4)).await }).await;
    ensure!(r? == hash, "blake3 of the source bytes changed");
    note("blake3_only", wall, busy);
    cancel.cancel();
    for n in [a, b, c] {
        for t in n.tasks {
            let _ = t.await;
        }
    }

    Ok(json!({
        "bench": "transfer",
        "blob_bytes": len,
        "reps": args.reps,
        "unit": "MB/s (1e6 bytes per second)",
        "fetch_blob_mb_s": ours.summary(),
        "baseline": {
            "what": "plain tokio TCP copy of the same bytes on loopback into memory",
            "tcp_mb_s": tcp.summary(),
        },
        "ratio_median": r3(ours.median() / tcp.median()),
        "ratio_best": r3(ours.best() / tcp.best()),
        "target_ratio": 0.5,
        "like_for_like": {
            "transport": {
                "what": "the blob stream from memory into memory (noise + yamux, no disk) vs the TCP copy into memory",
                "blob_stream_mb_s": stream_mem.summary(),
                "ratio_median": r3(stream_mem.median() / tcp.median()),
            },
            "into_the_store": {
                "what": "fetch_blob vs a plain TCP copy into the same BlobWriter (blake3 check, fsync, install)",
                "tcp_into_store_mb_s": tcp_store.summary(),
                "ratio_median": r3(ours.median() / tcp_store.median()),
            },
        },
        "cores": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "diagnostics": diag,
        "store_sink_split_ms": sink_split,
    }))
}

/// Repeated throughput measurements and the cores busy during each.
#[derive(Default)]
struct Series {
    values: Vec<f64>,
    busy: Vec<f64>,
}

impl Series {
    fn push(&mut self, value: f64, busy: Option<f64>) {
        self.values.push(value);
        self.busy.extend(busy);
    }

    fn median(&self) -> f64 {
        percentile(&sorted(self.values.clone()), 0.5)
    }

    fn best(&self) -> f64 {
        self.values.iter().copied().fold(f64::NAN, f64::max)
    }

    fn summary(&self) -> serde_json::Value {
        json!({
            "best": r3(self.best()),
            "median": r3(self.median()),
            "all": self.values.iter().map(|x| r3(*x)).collect::<Vec<_>>(),
            "cores_busy": self.busy,
        })
    }
}

/// Time to copy `bytes` over a plain TCP connection on loopback into a buffer allocated
/// and touched beforehand: from the client's one-byte request to its last byte read.
async fn tcp_copy(bytes: Arc<Vec<u8>>) -> Result<Duration> {
    let len = bytes.len();
    let sent = bytes.clone();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        let mut go = [0u8; 1];
        s.read_exact(&mut go).await?;
        s.write_all(&bytes).await?;
        s.shutdown().await
    });
    let mut c = TcpStream::connect(addr).await?;
    // Touched before the clock starts, so the baseline is the copy alone, not page faults.
    let mut buf = vec![0xA5u8; len];
    let t0 = Instant::now();
    c.write_all(&[1]).await?;
    c.read_exact(&mut buf).await?;
    let t = t0.elapsed();
    server.await??;
    ensure!(buf[..] == sent[..], "the TCP copy differs from the source");
    Ok(t)
}

/// Streams all of blob `hash` from `peer` over the blob protocol and drops the bytes: the
/// cost of the wire and of the serving side alone.
async fn wire_only(client: &Client, peer: PeerId, hash: Hash, total: u64) -> Result<Duration> {
    let t0 = Instant::now();
    let mut stream = client
        .open_blob_stream(peer)
        .await
        .map_err(anyhow::Error::msg)?;
    let req = BlobRequest {
        hash,
        offset: 0,
        len: u64::MAX,
    };
    stream.write_all(&encode_request(&req)).await?;
    let mut head = [0u8; 9];
    stream.read_exact(&mut head).await?;
    ensure!(
        decode_header(&head)? == BlobHeader::Found { total_len: total },
        "unexpected answer"
    );
    let mut frame = vec![0u8; FRAME_BYTES];
    let mut got = 0u64;
    while got < total {
        let n = stream.read(&mut frame).await?;
        ensure!(n > 0, "stream ended after {got} of {total} bytes");
        got += n as u64;
    }
    Ok(t0.elapsed())
}

/// A plain TCP copy of `bytes` written frame by frame into a `BlobWriter` on a blocking
/// thread and finished (hash check, fsync, install): `fetch_blob` without libp2p.
async fn tcp_copy_into_store(bytes: Arc<Vec<u8>>, store: &Store, hash: Hash) -> Result<Duration> {
    let sb = store.clone();
    tokio::task::spawn_blocking(move || sb.remove_blob(&hash)).await??;
    let len = bytes.len();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        tokio::io::AsyncWriteExt::write_all(&mut s, &bytes).await?;
        tokio::io::AsyncWriteExt::shutdown(&mut s).await
    });
    let t0 = Instant::now();
    let mut c = TcpStream::connect(addr).await?;
    let mut writer = store.blob_writer(hash, len as u64)?;
    // Four reused frames, as fetch_blob has.
    let (tx, mut rx) = mpsc::channel::<(Vec<u8>, usize)>(4);
    let (back_tx, mut back_rx) = mpsc::channel::<Vec<u8>>(4);
    for _ in 0..4 {
        back_tx.send(vec![0u8; FRAME_BYTES]).await?;
    }
    let sink = tokio::task::spawn_blocking(move || -> Result<Hash> {
        let mut off = 0u64;
        while let Some((frame, n)) = rx.blocking_recv() {
            writer.write_at(off, &frame[..n])?;
            off += n as u64;
            let _ = back_tx.blocking_send(frame);
        }
        Ok(writer.finish()?)
    });
    let mut got = 0;
    while got < len {
        let n = (len - got).min(FRAME_BYTES);
        let mut frame = back_rx.recv().await.context("the writer stopped")?;
        tokio::io::AsyncReadExt::read_exact(&mut c, &mut frame[..n]).await?;
        got += n;
        tx.send((frame, n)).await?;
    }
    drop(tx);
    ensure!(sink.await?? == hash, "stored another hash");
    let t = t0.elapsed();
    server.await??;
    Ok(t)
}

/// Writes `bytes` into a fresh `BlobWriter` in frames of `FRAME_BYTES` and finishes
/// it, as `fetch_blob` does, without the network. Returns the time of the writes (with
/// the in-order hashing) and of `finish` (hash check, fsync, rename, index flush).
fn local_sink(store: &Store, bytes: &[u8], hash: Hash) -> Result<(Duration, Duration)> {
    store.remove_blob(&hash)?;
    let t0 = Instant::now();
    let mut w = store.blob_writer(hash, bytes.len() as u64)?;
    for (i, chunk) in bytes.chunks(FRAME_BYTES).enumerate() {
        w.write_at((i * FRAME_BYTES) as u64, chunk)?;
    }
    let t1 = Instant::now();
    ensure!(w.finish()? == hash, "local sink stored another hash");
    Ok((t1 - t0, t1.elapsed()))
}

// ---------------------------------------------------------------------------------------
// 3. Window close to commit
// ---------------------------------------------------------------------------------------

const RANK: usize = 4;
const ALPHA: f64 = 8.0;
const MODULES: [&str; 2] = ["q_proj", "v_proj"];
const SAMPLES: u64 = 10;

/// The network's adapter spec: r=4 on q_proj (64x64) and v_proj (32x64) of the 2-layer
/// tiny model.
fn net_spec() -> Result<NetSpec> {
    let config = AdapterConfig::new(RANK, ALPHA, TargetModules::from_names(MODULES));
    let names: Vec<String> = MODULES.iter().map(|m| m.to_string()).collect();
    let shape = TinyModel::new(Arch::Llama, 1)?
        .cfg
        .adapter_shape(RANK, &names)?;
    Ok(NetSpec {
        config,
        shape,
        rule: Default::default(),
        dp: None,
    })
}

/// A random LoRA adapter of the network's shape.
fn random_adapter(seed: u32) -> Result<LoraAdapter> {
    Ok(hivemind_model::testing::random_adapter(
        &net_spec()?.shape,
        ALPHA,
        u64::from(seed),
    )?)
}

/// The round-1 adapter hash every node must commit: FedAvg of `adapters` computed here,
/// with the round metadata the driver binds in.
fn expected_round1(adapters: &[LoraAdapter]) -> Result<Hash> {
    let mut inputs = Vec::new();
    for a in adapters {
        inputs.push(WeightedAdapter {
            hash: a.canonical_hash()?,
            samples: SAMPLES,
            adapter: a.clone(),
        });
    }
    let mut job_inputs: Vec<AggregateInput> = inputs
        .iter()
        .map(|w| AggregateInput {
            adapter: w.hash,
            samples: SAMPLES,
        })
        .collect();
    job_inputs.sort();
    let job = AggregationJob {
        round: 1,
        parent: None,
        rule: RuleId::FEDAVG,
        inputs: job_inputs,
    };
    let out = FedAvg::default().aggregate(&inputs)?;
    Ok(Hash::of(&out.to_safetensors_bytes_with_metadata(
        &round_metadata(&job),
    )?))
}

async fn commit(args: &Args) -> Result<serde_json::Value> {
    let n = args.commit_nodes;
    ensure!(n >= 2, "commit needs >= 2 nodes");
    let round = hivemind_node::node::round_config(args.round_secs, None);
    eprintln!(
        "commit: {n} full nodes, window {} ms, grace {} ms",
        round.window_ms, round.grace_ms
    );
    let root = tempfile::tempdir()?;
    let model = root.path().join("tiny.gguf");
    TinyModel::new(Arch::Llama, 1)?.write_gguf(&model)?;
    let adapters: Vec<LoraAdapter> = (0..n as u32).map(random_adapter).collect::<Result<_>>()?;
    let want = expected_round1(&adapters)?;
    let dirs = node_dirs(root.path(), n);

    // The nodes first, so that the measured time is the protocol's, not the mesh's.
    let cluster = Cluster::start(n, |i| {
        let mut cfg = NodeConfig::new(&dirs[i], &model, args.round_secs);
        cfg.lora = LoraSettings {
            rank: RANK,
            alpha: ALPHA,
            target_modules: MODULES.iter().map(|m| m.to_string()).collect(),
            ..LoraSettings::default()
        };
        cfg.listen = vec![listen_addr()];
        cfg
    })
    .await?;
    let clients: Vec<Client> = cluster.nodes().iter().map(|n| n.client().clone()).collect();
    let mesh_wait = wait_connected(&clients, n - 1, Duration::from_secs(60)).await?;
    // A few gossipsub heartbeats for subscriptions and meshes.
    tokio::time::sleep(Duration::from_secs(1)).await;
    eprintln!(
        "commit: fully connected after {:.1} s; contributing",
        mesh_wait.as_secs_f64()
    );

    let mut contributors = Vec::new();
    let mut window_ends = Vec::with_capacity(n);
    for (i, node) in cluster.nodes().iter().enumerate() {
        let adapter_dir = root.path().join(format!("adapter{i}"));
        adapters[i].write_dir(&adapter_dir)?;
        // The window opens with the first announcement a node sees.
        window_ends.push(unix_ms() + round.window_ms);
        contributors.push(node.contribute(adapter_dir, SAMPLES).await?);
    }
    let limit = Duration::from_millis(round.window_ms * 3 + 30_000);
    cluster.wait_committed(1, limit).await?;
    cluster.shutdown().await;
    let mut records = Vec::with_capacity(n);
    for dir in &dirs {
        let store = Store::open(dir)?;
        records.push(store.get_round(1)?.context("round 1 is not stored")?);
    }

    let first_hash = records[0].hash;
    for (i, r) in records.iter().enumerate() {
        ensure!(
            r.hash == first_hash,
            "node {i} committed {} but node 0 committed {}",
            r.hash.to_hex(),
            first_hash.to_hex()
        );
    }
    let mut expected_contributors = contributors.clone();
    expected_contributors.sort();
    ensure!(
        records[0].contributors == expected_contributors,
        "round 1 has {} of {n} contributors",
        records[0].contributors.len()
    );
    ensure!(
        first_hash == want,
        "round 1 is {} but FedAvg of the {n} adapters is {}",
        first_hash.to_hex(),
        want.to_hex()
    );

    let per_node: Vec<i64> = records
        .iter()
        .zip(&window_ends)
        .map(|(r, end)| r.committed_at_ms as i64 - *end as i64)
        .collect();
    let earliest_end = window_ends.iter().copied().min().unwrap_or(0);
    let last_end = window_ends.iter().copied().max().unwrap_or(0);
    let first_commit = records.iter().map(|r| r.committed_at_ms).min().unwrap_or(0);
    let last_commit = records.iter().map(|r| r.committed_at_ms).max().unwrap_or(0);
    let close_to_all = last_commit as i64 - earliest_end as i64;
    Ok(json!({
        "bench": "commit",
        "nodes": n,
        "window_ms": round.window_ms,
        "grace_ms": round.grace_ms,
        "mesh_wait_s": r3(mesh_wait.as_secs_f64()),
        "window_end_spread_ms": last_end - earliest_end,
        "commit_minus_own_window_end_ms": per_node,
        "earliest_window_end_to_first_commit_ms": first_commit as i64 - earliest_end as i64,
        "earliest_window_end_to_last_commit_ms": close_to_all,
        "same_hash_on_all_nodes": true,
        "round1_hash": first_hash.to_hex(),
        "contributors": records[0].contributors.len(),
        "baseline": {
            "what": "configured grace_ms: the designed quiet period before commit",
            "grace_ms": round.grace_ms,
        },
        "ratio": r3(close_to_all as f64 / round.grace_ms as f64),
        "ratio_is": "(last commit - earliest window end) / grace_ms",
    }))
}

/// Unix time in milliseconds.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

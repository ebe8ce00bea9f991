//! Helpers every benchmark uses: percentiles, timers, bare networks.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hivemind_node::harness::wait_until;
use hivemind_node::identity::keypair_of;
use hivemind_node::net::blob::SharedSource;
use hivemind_node::net::{with_peer, Client, NetConfig, Network};
use hivemind_protocol::NodeKey;
use libp2p::multiaddr::Protocol;
use libp2p::Multiaddr;
use tokio_util::sync::CancellationToken;

/// Nearest-rank percentile of sorted values (`p` in 0..=1).
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

pub(crate) fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Rounds to 3 decimals for readable JSON.
pub(crate) fn r3(x: f64) -> f64 {
    (x * 1e3).round() / 1e3
}

/// Deterministic pseudo-random bytes (xorshift64*): incompressible, fast to make.
pub(crate) fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
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
pub(crate) fn cpu_secs() -> Option<f64> {
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
pub(crate) async fn timed<T, Fut>(f: Fut) -> (T, Duration, Option<f64>)
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
pub(crate) fn listen_addr() -> Multiaddr {
    let ip = Multiaddr::from(std::net::Ipv4Addr::LOCALHOST);
    if std::env::var("BENCH_QUIC").is_ok_and(|v| v == "1") {
        ip.with(Protocol::Udp(0)).with(Protocol::QuicV1)
    } else {
        ip.with(Protocol::Tcp(0))
    }
}

pub(crate) fn net_config(bootstrap: Vec<Multiaddr>, topics: Vec<String>) -> Result<NetConfig> {
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
        relay: false,
    })
}

/// Starts a network for node key `key`.
pub(crate) async fn spawn_net(
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
pub(crate) async fn dial_addr(client: &Client) -> Result<Multiaddr> {
    let info = client.info().await?;
    let addr = info
        .listen_addrs
        .first()
        .context("the node listens nowhere")?;
    Ok(with_peer(addr, client.local_peer_id()))
}

/// Waits until every client has at least `min` connected peers; returns how long it took.
pub(crate) async fn wait_connected(
    clients: &[Client],
    min: usize,
    limit: Duration,
) -> Result<Duration> {
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

pub(crate) async fn peer_counts(clients: &[Client]) -> Result<Vec<usize>> {
    let mut v = Vec::with_capacity(clients.len());
    for c in clients {
        v.push(c.info().await?.connected.len());
    }
    Ok(v)
}

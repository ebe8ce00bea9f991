//! 4. Fetching one blob from several holders on rate-limited uplinks (issue 16).
//!
//! Needs root and iproute2's `ip` and `tc`: the benchmark makes a network namespace of its
//! own, shapes that namespace's loopback with tc (an HTB class per holder port, so each
//! holder's uplink, its sending side, runs at `--uplink-mbs` MB/s; other traffic is not
//! shaped), runs itself inside it, and deletes the namespace. Nothing outside it changes.
//!
//! Measured: a `--blob-mib` blob that `--holders` peers hold, fetched with
//! `fetch_blob_multi` from all of them. Baseline, same run and links: the same blob
//! fetched from one of them with `fetch_blob`. Then once more with a holder that serves
//! garbage (with an honest chunk tree) added first among the chunk senders: its penalty,
//! the garbage bytes it got to send (at most a chunk an attempt) and the time.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use hivemind_node::identity::keypair_of;
use hivemind_node::net::blob::tree::{self, CHUNK_BYTES};
use hivemind_node::net::blob::{
    fetch_blob, fetch_blob_multi, BlobSource, Fetched, OpenBlob, SharedSource, Transfers,
    MAX_BLOB_BYTES,
};
use hivemind_node::net::{NetConfig, Network};
use hivemind_protocol::{Hash, NodeKey};
use hivemind_store::Store;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::common::*;
use super::transfer::{ArcReader, MemSource};
use super::Args;

/// Set in the environment of the run inside the namespace.
pub(crate) const INSIDE: &str = "HIVE_BENCH_MULTI_INSIDE";
/// Holder `i` listens on this port plus `i` (fixed, so tc can tell the holders apart).
const FIRST_PORT: u16 = 41001;

/// Makes the namespace, shapes it, runs this benchmark inside, removes the namespace.
pub(crate) fn multi_outside(args: &Args) -> Result<serde_json::Value> {
    ensure!(args.holders >= 2, "--holders must be at least 2");
    let ns = format!("hm-multi-{}", std::process::id());
    sh("ip", &["netns", "add", &ns]).context(
        "cannot make a network namespace: this benchmark needs root and iproute2 (ip, tc)",
    )?;
    struct Gone(String);
    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = sh("ip", &["netns", "del", &self.0]);
        }
    }
    let _gone = Gone(ns.clone());
    // A home uplink: 1500-byte packets, and each holder's sending side at the given rate.
    sh("ip", &["-n", &ns, "link", "set", "lo", "up", "mtu", "1500"])?;
    sh(
        "tc",
        &[
            "-n", &ns, "qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb",
        ],
    )?;
    let mbit = format!("{}mbit", (args.uplink_mbs * 8.0).round());
    // The holders and the one serving garbage.
    for i in 0..=args.holders {
        let class = format!("1:{}", 10 + i);
        let port = (FIRST_PORT + i as u16).to_string();
        sh(
            "tc",
            &[
                "-n", &ns, "class", "add", "dev", "lo", "parent", "1:", "classid", &class, "htb",
                "rate", &mbit, "ceil", &mbit, "quantum", "1514",
            ],
        )?;
        sh(
            "tc",
            &[
                "-n", &ns, "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio",
                "1", "u32", "match", "ip", "sport", &port, "0xffff", "flowid", &class,
            ],
        )?;
    }
    let exe = std::env::current_exe()?;
    let out = Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(exe)
        .args(std::env::args().skip(1))
        .env(INSIDE, "1")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()?;
    ensure!(out.status.success(), "the run inside {ns} failed");
    let text = String::from_utf8(out.stdout)?;
    let line = text
        .lines()
        .last()
        .context("the run inside printed nothing")?;
    let mut v: serde_json::Value = serde_json::from_str(line)?;
    v["links"] = json!(format!(
        "loopback of network namespace {ns}, MTU 1500, each holder's sending side shaped by \
         tc htb to {mbit} (by its TCP source port); the fetcher's side is not shaped"
    ));
    Ok(v)
}

fn sh(cmd: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(cmd).args(args).output()?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Serves every byte of a blob inverted, with the blob's honest chunk tree.
struct Garbage {
    honest: MemSource,
    values: Vec<tree::Value>,
}

struct Inverted(ArcReader);

impl std::io::Read for Inverted {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.0.read(buf)?;
        buf[..n].iter_mut().for_each(|b| *b = !*b);
        Ok(n)
    }
}

impl BlobSource for Garbage {
    fn open(&self, hash: &Hash, offset: u64) -> std::io::Result<Option<OpenBlob>> {
        Ok(self
            .honest
            .open_arc(hash, offset)
            .map(|(total_len, r)| OpenBlob {
                total_len,
                reader: Box::new(Inverted(r)),
            }))
    }

    fn tree(&self, hash: &Hash) -> std::io::Result<Option<(u64, Vec<tree::Value>)>> {
        Ok(self
            .honest
            .open_arc(hash, 0)
            .map(|(len, _)| (len, self.values.clone())))
    }
}

async fn holder(i: usize, source: SharedSource, cancel: &CancellationToken) -> Result<Network> {
    let mut cfg: NetConfig = net_config(vec![], vec!["/hivemind/bench/multi/1".into()])?;
    let port = FIRST_PORT + i as u16;
    cfg.listen = vec![Multiaddr::from(std::net::Ipv4Addr::LOCALHOST).with(Protocol::Tcp(port))];
    let key = NodeKey::from_bytes(&[150 + i as u8; 32]);
    Ok(Network::spawn(keypair_of(&key)?, cfg, source, cancel.clone()).await?)
}

pub(crate) async fn multi_inside(args: &Args) -> Result<serde_json::Value> {
    let len = args.blob_mib << 20;
    ensure!(
        len as u64 >= 2 * CHUNK_BYTES,
        "--blob-mib must be at least 2"
    );
    let reps = args.reps.clamp(1, 3);
    let bytes = Arc::new(random_bytes(len, 0x3117));
    let hash = Hash::of(&bytes);
    let values = tree::values_of(&bytes[..], len as u64)?;
    let cancel = CancellationToken::new();
    let mut holders = Vec::new();
    for i in 0..args.holders {
        let source = Arc::new(MemSource::new(hash, bytes.clone()));
        holders.push(holder(i, source, &cancel).await?);
    }
    let garbage = Arc::new(Garbage {
        honest: MemSource::new(hash, bytes.clone()),
        values,
    });
    let liar = holder(args.holders, garbage, &cancel).await?;
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let fetcher = spawn_net(
        &NodeKey::from_bytes(&[149; 32]),
        vec![],
        vec!["/hivemind/bench/multi/1".into()],
        Arc::new(store.clone()),
        &cancel,
    )
    .await?;
    for h in holders.iter().chain([&liar]) {
        fetcher.client.dial(dial_addr(&h.client).await?).await?;
    }
    let n = holders.len() + 1;
    wait_connected(
        std::slice::from_ref(&fetcher.client),
        n,
        Duration::from_secs(20),
    )
    .await?;
    let ids: Vec<PeerId> = holders.iter().map(|h| h.client.local_peer_id()).collect();
    let liar_id = liar.client.local_peer_id();
    let remove = |store: &Store| -> Result<()> {
        store.remove_blob(&hash)?;
        Ok(())
    };

    let mut one = Vec::new();
    let mut many = Vec::new();
    for rep in 0..reps {
        let (got, t, _) = timed(fetch_blob(
            &fetcher.client,
            &store,
            hash,
            &ids[..1],
            MAX_BLOB_BYTES,
        ))
        .await;
        ensure!(
            got == Some(ids[0]),
            "the fetch from one holder failed (rep {rep})"
        );
        remove(&store)?;
        one.push(t.as_secs_f64());
        let (got, t, _) = timed(fetch_blob_multi(
            &fetcher.client,
            &store,
            hash,
            &ids,
            MAX_BLOB_BYTES,
            &Transfers::default(),
        ))
        .await;
        ensure!(
            matches!(got, Fetched::From(_)),
            "the fetch from {} holders failed (rep {rep})",
            ids.len()
        );
        ensure!(
            store.get_blob(&hash)?.as_deref() == Some(&bytes[..]),
            "wrong bytes stored"
        );
        remove(&store)?;
        many.push(t.as_secs_f64());
        eprintln!(
            "multi rep {rep}: one holder {:.2} s, {} holders {:.2} s",
            one[rep],
            ids.len(),
            many[rep]
        );
    }

    // The garbage holder second: the first holder sends the tree, the garbage one is among
    // the first chunk senders.
    let mut with_liar = ids.clone();
    with_liar.insert(1, liar_id);
    let (got, t_liar, _) = timed(fetch_blob_multi(
        &fetcher.client,
        &store,
        hash,
        &with_liar,
        MAX_BLOB_BYTES,
        &Transfers::default(),
    ))
    .await;
    ensure!(
        matches!(got, Fetched::From(_)),
        "the fetch with a garbage holder failed"
    );
    ensure!(
        store.get_blob(&hash)?.as_deref() == Some(&bytes[..]),
        "wrong bytes stored"
    );
    let penalties = fetcher.client.info().await?.penalties;
    let garbage_sent = liar.client.served().get(&hash).copied().unwrap_or(0);
    cancel.cancel();

    let one_s = median(&one);
    let many_s = median(&many);
    Ok(json!({
        "bench": "multi_source_fetch",
        "blob_mib": args.blob_mib,
        "holders": ids.len(),
        "uplink_MB_s": args.uplink_mbs,
        "reps": reps,
        "one_holder_s": one.iter().map(|x| r3(*x)).collect::<Vec<_>>(),
        "all_holders_s": many.iter().map(|x| r3(*x)).collect::<Vec<_>>(),
        "speedup_median": r3(one_s / many_s),
        "target_speedup": 3.0,
        "one_holder_MB_s": r3(len as f64 / 1e6 / one_s),
        "all_holders_MB_s": r3(len as f64 / 1e6 / many_s),
        "with_garbage_holder": {
            "s": r3(t_liar.as_secs_f64()),
            "garbage_bytes_sent": garbage_sent,
            "chunk_bytes": CHUNK_BYTES,
            "penalties_of_the_garbage_holder": penalties.get(&liar_id).copied().unwrap_or(0),
            "penalties_of_honest_holders": ids.iter().filter_map(|p| penalties.get(p)).sum::<u32>(),
        },
    }))
}

fn median(v: &[f64]) -> f64 {
    let s = sorted(v.to_vec());
    percentile(&s, 0.5)
}

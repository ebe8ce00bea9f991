//! 1. Gossip propagation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use hivemind_node::net::blob::SharedSource;
use hivemind_node::net::{Client, NetEvent, Network};
use hivemind_protocol::NodeKey;
use hivemind_store::Store;
use libp2p::gossipsub::MessageAcceptance;
use libp2p::PeerId;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::common::*;
use super::Args;

/// One gossip message arriving at one node.
pub(crate) struct Arrival {
    node: usize,
    msg: usize,
    at: Instant,
    /// Forwarded by the publisher itself (one hop).
    direct: bool,
}

pub(crate) async fn gossip(args: &Args) -> Result<serde_json::Value> {
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
pub(crate) async fn tcp_one_hop(messages: &[Vec<u8>]) -> Result<Vec<f64>> {
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

//! 3. Window close to commit.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use hivemind_model::adapter::{AdapterConfig, LoraAdapter, TargetModules};
use hivemind_model::aggregate::{AggregationRule, FedAvg, WeightedAdapter};
use hivemind_model::config::Arch;
use hivemind_model::testing::TinyModel;
use hivemind_node::driver::{round_metadata, NetSpec};
use hivemind_node::harness::{node_dirs, Cluster};
use hivemind_node::net::Client;
use hivemind_node::node::{LoraSettings, NodeConfig};
use hivemind_protocol::{AggregateInput, AggregationJob, Hash, RuleId};
use hivemind_store::Store;
use serde_json::json;

use super::common::*;
use super::Args;

pub(crate) const RANK: usize = 4;
pub(crate) const ALPHA: f64 = 8.0;
pub(crate) const MODULES: [&str; 2] = ["q_proj", "v_proj"];
pub(crate) const SAMPLES: u64 = 10;

/// The network's adapter spec: r=4 on q_proj (64x64) and v_proj (32x64) of the 2-layer
/// tiny model.
pub(crate) fn net_spec() -> Result<NetSpec> {
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
pub(crate) fn random_adapter(seed: u32) -> Result<LoraAdapter> {
    Ok(hivemind_model::testing::random_adapter(
        &net_spec()?.shape,
        ALPHA,
        u64::from(seed),
    )?)
}

/// The round-1 adapter hash every node must commit: FedAvg of `adapters` computed here,
/// with the round metadata the driver binds in.
pub(crate) fn expected_round1(adapters: &[LoraAdapter]) -> Result<Hash> {
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

pub(crate) async fn commit(args: &Args) -> Result<serde_json::Value> {
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
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

//! Federated rounds between real `hive-node join` processes on loopback (TCP, noise, yamux,
//! gossipsub, Kademlia, the blob protocol), on tiny generated GGUF models.
//!
//! One test walks the whole life of a small network, because every step builds on the one
//! before and each process start costs time on a 2-core CI machine:
//! 1. a bootstrap node and 4 joiners each contribute an adapter; all 5 commit round 1 with
//!    the same hash, equal to FedAvg of the 5 adapters computed here;
//! 2. a node on another base model joins the same bootstrap node: it never receives those
//!    adapters, and nobody mixes its adapter into theirs;
//! 3. round 2: every node gets a new adapter through `hive-node contribute`, then one node is
//!    killed (SIGKILL) in the middle of the round; the 4 others still commit round 2;
//! 4. the killed node restarts on its data dir and all five end on one round 2 (the survivors' or,
//!    when they committed it without the killed node's adapter, the heavier one with it);
//! 5. `status --json`, `rounds --json` and `export` report what the nodes committed.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{tiny_model, wait_for, Proc, BIN, RANK};
use hivemind_model::adapter::LoraAdapter;
use hivemind_model::aggregate::{AggregationRule, FedAvg, WeightedAdapter};
use hivemind_protocol::{AggregateInput, AggregationJob, Hash, RuleId};
use serde_json::Value;

/// Collection window of a round. Long enough for 6 processes to start on a loaded
/// 2-core machine before the first window closes.
const ROUND_SECS: &str = "6";

/// A `hive-node join` on the tiny FedAvg network; `contribute` is announced with 10 samples.
fn start_node(
    data: &Path,
    model: &Path,
    bootstrap: Option<&str>,
    contribute: Option<&Path>,
) -> Proc {
    // A FedAvg network (the default is iso; tests/rounds_merge.rs covers the rules that
    // build on the parent): the round adapter is checked against FedAvg computed here.
    let mut extra: Vec<String> = vec![
        "--round-secs".into(),
        ROUND_SECS.into(),
        "--rule".into(),
        "fedavg".into(),
    ];
    if let Some(b) = bootstrap {
        extra.extend(["--bootstrap".to_string(), b.to_string()]);
    }
    if let Some(dir) = contribute {
        extra.extend([
            "--contribute".to_string(),
            dir.display().to_string(),
            "--samples".to_string(),
            "10".to_string(),
        ]);
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    Proc::tiny(&["join"], model, data, &extra)
}

fn cli(args: &[&str], data: &Path) -> String {
    let out = Command::new(BIN)
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "hive-node {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A random adapter of the tiny models' shape (2 layers; q_proj 64x64, v_proj 32x64).
fn random_adapter(seed: u32) -> LoraAdapter {
    common::tiny_adapter(u64::from(seed), RANK, 32)
}

/// The round adapter every node must compute: FedAvg of `adapters` (10 samples each)
/// with the round and parent bound into its metadata.
fn expected_round(round: u64, parent: Option<Hash>, adapters: &[&LoraAdapter]) -> Hash {
    let inputs: Vec<WeightedAdapter> = adapters
        .iter()
        .map(|a| WeightedAdapter {
            hash: a.canonical_hash().unwrap(),
            samples: 10,
            adapter: (*a).clone(),
        })
        .collect();
    let mut job_inputs: Vec<AggregateInput> = inputs
        .iter()
        .map(|w| AggregateInput {
            adapter: w.hash,
            samples: 10,
        })
        .collect();
    job_inputs.sort();
    let job = AggregationJob {
        round,
        parent,
        rule: RuleId::FEDAVG,
        inputs: job_inputs,
    };
    let out = FedAvg::default().aggregate(&inputs).unwrap();
    let bytes = out
        .to_safetensors_bytes_with_metadata(&hivemind_node::driver::round_metadata(&job))
        .unwrap();
    Hash::of(&bytes)
}

fn hexes(adapters: &[&LoraAdapter]) -> Vec<String> {
    let mut v: Vec<String> = adapters
        .iter()
        .map(|a| a.canonical_hash().unwrap().to_hex())
        .collect();
    v.sort();
    v
}

#[test]
fn five_processes_agree_survive_a_crash_and_stay_apart_from_another_model() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let model = tiny_model(root, 1);
    let other_model = tiny_model(root, 2);
    let write = |name: &str, a: &LoraAdapter| {
        let dir = root.join(name);
        a.write_dir(&dir).unwrap();
        dir
    };
    let round1: Vec<LoraAdapter> = (0..5).map(random_adapter).collect();
    let round2: Vec<LoraAdapter> = (10..15).map(random_adapter).collect();
    let stranger = random_adapter(99);

    // 1. Bootstrap node and 4 joiners, each contributing one adapter.
    let data: Vec<PathBuf> = (0..5).map(|i| root.join(format!("node{i}"))).collect();
    let boot = start_node(&data[0], &model, None, Some(&write("a0", &round1[0])));
    let addr = boot.line("listening on ");
    assert!(addr.contains("/p2p/12D3KooW"), "{addr}");
    let mut nodes: Vec<Proc> = vec![boot];
    for i in 1..5 {
        let dir = write(&format!("a{i}"), &round1[i]);
        nodes.push(start_node(&data[i], &model, Some(&addr), Some(&dir)));
    }
    let r1: Vec<&LoraAdapter> = round1.iter().collect();
    let want1 = expected_round(1, None, &r1);
    for n in &nodes {
        let (num, hash) = wait_for("round 1 on every node", || n.committed(1));
        assert_eq!((num, hash.as_str()), (1, want1.to_hex().as_str()));
    }

    // 2. A node on another base model, bootstrapping from the same node.
    let other_data = root.join("other");
    let other = start_node(
        &other_data,
        &other_model,
        Some(&addr),
        Some(&write("stranger", &stranger)),
    );
    let (num, _) = wait_for("the other model's round 1", || other.committed(1));
    assert_eq!(num, 1);
    let s = other.status().unwrap();
    assert_eq!(
        s["latest_round"]["contributors"],
        serde_json::json!(hexes(&[&stranger]))
    );
    let blobs = |d: &Path, a: &LoraAdapter| {
        d.join(hivemind_store::BLOBS_DIR)
            .join(a.canonical_hash().unwrap().to_hex())
            .exists()
    };
    for a in &round1 {
        assert!(!blobs(&other_data, a), "the other network got an adapter");
    }
    for d in &data {
        assert!(!blobs(d, &stranger), "{} got the stranger", d.display());
    }

    // 3. Round 2: new adapters handed to the running nodes; node 4 dies mid-round.
    for (i, n) in nodes.iter().enumerate() {
        let dir = write(&format!("b{i}"), &round2[i]);
        cli(
            &["contribute", "--samples", "10", dir.to_str().unwrap()],
            &n.data,
        );
    }
    let victim = nodes.pop().unwrap();
    // Wait until the victim has announced its adapter (it is in its current round).
    let mine = round2[4].canonical_hash().unwrap().to_hex();
    victim.wait_contributor(&mine);
    drop(victim); // SIGKILL
    let mut round2_hash = None;
    for n in &nodes {
        let (num, hash) = wait_for("round 2 on the survivors", || n.committed(2));
        assert_eq!(num, 2);
        match &round2_hash {
            None => round2_hash = Some(hash),
            Some(h) => assert_eq!(h, &hash, "survivors disagree on round 2"),
        }
    }
    let round2_hash = round2_hash.unwrap();
    // The victim's adapter is in the round only if someone fetched it before the kill.
    let contributors = nodes[0].status().unwrap()["latest_round"]["contributors"].clone();
    let with_victim: Vec<&LoraAdapter> = round2.iter().collect();
    let without: Vec<&LoraAdapter> = round2[..4].iter().collect();
    let want_with = expected_round(2, Some(want1), &with_victim).to_hex();
    let (want2, set) = if contributors == serde_json::json!(hexes(&with_victim)) {
        (expected_round(2, Some(want1), &with_victim), with_victim)
    } else {
        (expected_round(2, Some(want1), &without), without)
    };
    assert_eq!(contributors, serde_json::json!(hexes(&set)));
    assert_eq!(round2_hash, want2.to_hex());

    // 4. The victim restarts on its data dir and catches up. When the survivors committed
    // round 2 without its adapter, the victim (holding all five inputs) may commit the heavier
    // version with it first; fork choice then moves the survivors to that one. Either way all
    // five end on one round 2: the survivors' version or the heavier one.
    let back = start_node(&data[4], &model, Some(&addr), None);
    let everyone: Vec<&Proc> = nodes.iter().chain([&back]).collect();
    let round2_hash = wait_for("all five nodes on one round 2", || {
        let hashes: Vec<String> = everyone
            .iter()
            .map(|n| n.committed(2).map(|(_, h)| h))
            .collect::<Option<_>>()?;
        hashes
            .iter()
            .all(|h| *h == hashes[0])
            .then(|| hashes[0].clone())
    });
    assert!(
        round2_hash == want2.to_hex() || round2_hash == want_with,
        "round 2 ended as {round2_hash}: neither the survivors' version nor the one with every input"
    );

    // 5. What scripts read.
    let s: Value = serde_json::from_str(&cli(&["status", "--json"], &back.data)).unwrap();
    for key in [
        "peer_id",
        "listen_addrs",
        "connected_peers",
        "current_round",
        "latest_round",
    ] {
        assert!(s.get(key).is_some(), "status --json lacks {key}: {s}");
    }
    assert!(s["connected_peers"].as_u64().unwrap() >= 1, "{s}");
    assert_eq!(s["current_round"], 3);
    assert_eq!(s["latest_round"]["number"], 2);
    assert_eq!(s["latest_round"]["version"], "round-2");
    assert_eq!(s["latest_round"]["hash"], round2_hash.as_str());
    let rounds: Value = serde_json::from_str(&cli(&["rounds", "--json"], &nodes[1].data)).unwrap();
    let numbers: Vec<u64> = rounds
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["number"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, vec![1, 2]);
    assert_eq!(rounds[0]["hash"], want1.to_hex().as_str());
    let out = root.join("export1");
    cli(
        &["export", "--round", "1", "--output", out.to_str().unwrap()],
        &nodes[2].data,
    );
    let exported = LoraAdapter::read_dir(&out).unwrap();
    let avg = FedAvg::default()
        .aggregate(
            &round1
                .iter()
                .map(|a| WeightedAdapter {
                    hash: a.canonical_hash().unwrap(),
                    samples: 10,
                    adapter: a.clone(),
                })
                .collect::<Vec<_>>(),
        )
        .unwrap();
    assert_eq!(exported.tensors, avg.tensors);
    assert_eq!(exported.config.r, RANK);

    // 6. Chat picks the round adapter of the data dir's network, and only for its model.
    let chat = |extra: &[&str]| {
        Command::new(BIN)
            .arg("chat")
            .arg("--model")
            .arg(&model)
            .args([
                "--prompt",
                "hello",
                "--temperature",
                "0",
                "--max-new-tokens",
                "6",
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    let latest = root.join("export-latest");
    cli(
        &["export", "--output", latest.to_str().unwrap()],
        &nodes[0].data,
    );
    let by_flag = chat(&["--adapter", latest.to_str().unwrap()]);
    let by_round = chat(&[
        "--use",
        "round",
        "--data-dir",
        nodes[0].data.to_str().unwrap(),
    ]);
    assert!(
        by_round.status.success(),
        "{}",
        String::from_utf8_lossy(&by_round.stderr)
    );
    assert_eq!(by_round.stdout, by_flag.stdout);
    assert!(String::from_utf8_lossy(&by_round.stderr).contains("round-2"));
    let wrong = chat(&["--use", "round", "--data-dir", other_data.to_str().unwrap()]);
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("not on a network of this base model"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );

    // 7. `train --from-round --announce` continues the round adapter and hands the result to
    // the running node, which announces it in round 3.
    let trained = root.join("trained");
    let out = Command::new(BIN)
        .current_dir(root)
        .args(["train", "--create-sample"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = Command::new(BIN)
        .current_dir(root)
        .arg("train")
        .arg("--model")
        .arg(&model)
        .args(["--data", "data/sample_dataset.json", "--max-steps", "2"])
        .args(["--from-round", "--announce", "--data-dir"])
        .arg(&nodes[1].data)
        .arg("--output")
        .arg(&trained)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let adapter = LoraAdapter::read_dir(&trained).unwrap();
    assert_eq!(
        adapter.config.r, RANK,
        "--from-round takes the network's LoRA shape"
    );
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(trained.join("training_info.json")).unwrap())
            .unwrap();
    assert!(
        info.get("on_top_of").is_none(),
        "on FedAvg --from-round continues the round adapter; nothing was frozen under it"
    );
    let hash = adapter.canonical_hash().unwrap().to_hex();
    wait_for("the trained adapter to be announced in round 3", || {
        let s = nodes[1].status()?;
        (s["current_round"] == 3
            && s["current_contributors"]
                .as_array()?
                .iter()
                .any(|h| h.as_str() == Some(hash.as_str())))
        .then_some(())
    });
}

#[test]
fn a_second_hand_over_in_one_round_waits_for_the_next_round() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let model = tiny_model(root, 1);
    // A round that does not close during the test.
    let node = Proc::tiny(
        &["join"],
        &model,
        &root.join("node"),
        &["--round-secs", "3600"],
    );
    node.line("listening on ");
    let first = random_adapter(21);
    let second = random_adapter(22);
    for (name, a) in [("first", &first), ("second", &second)] {
        let dir = root.join(name);
        a.write_dir(&dir).unwrap();
        cli(&["contribute", dir.to_str().unwrap()], &node.data);
        if name == "first" {
            node.wait_contributor(&a.canonical_hash().unwrap().to_hex());
        }
    }
    let (s, waiting) = wait_for("the second hand-over to wait", || {
        let s = node.status()?;
        let w = s["inbox_waiting"].as_array()?.clone();
        (!w.is_empty()).then_some((s, w))
    });
    assert_eq!(waiting.len(), 1, "{s}");
    assert_eq!(s["current_round"], 1);
    assert_eq!(
        s["current_contributors"],
        serde_json::json!([first.canonical_hash().unwrap().to_hex()])
    );
    let kept = node.data.join("inbox").join(waiting[0].as_str().unwrap());
    assert!(
        kept.join("adapter_model.safetensors").exists(),
        "the adapter was dropped"
    );
}

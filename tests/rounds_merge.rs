//! A network whose rule builds on the parent (`exact-mean`), with in-process nodes on a tiny
//! generated model: round 1's adapter is the exact mean of the users' updates (each bounded to
//! the median norm, as networks bound their inputs); round 2's is
//! round 1's plus the mean of round 2's updates (users train on top of the round adapter);
//! every node commits the same bytes; a node that joins after round 2 verifies it by fetching
//! its parent round adapter from the others and commits the same round.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use hivemind_model::adapter::{LoraAdapter, LoraSide};
use hivemind_node::driver::NetRule;
use hivemind_node::harness::{node_dirs, wait_until, Cluster, TinyNetwork};
use hivemind_node::node::{Node, NodeConfig};
use hivemind_node::web::Engine;
use hivemind_node::DataDir;

const ROUND_SECS: f64 = 2.0;
const WAIT: Duration = Duration::from_secs(120);

/// `scaling · B · A` of every module, dense, in f64, by module path.
fn deltas(a: &LoraAdapter) -> Vec<(String, Vec<f64>)> {
    let s = a.config.scaling();
    a.tensors
        .iter()
        .filter_map(|(name, ta)| {
            let path = name.strip_suffix(".lora_A.weight")?;
            let p = path.strip_prefix("base_model.model.")?.to_string();
            let tb = &a.tensors[&LoraAdapter::tensor_name(&p, LoraSide::B)];
            let (r, inp, out) = (ta.shape[0], ta.shape[1], tb.shape[0]);
            let mut m = vec![0.0; out * inp];
            for i in 0..out {
                for j in 0..inp {
                    let acc: f64 = (0..r)
                        .map(|k| f64::from(tb.data[i * r + k]) * f64::from(ta.data[k * inp + j]))
                        .sum();
                    m[i * inp + j] = s * acc;
                }
            }
            Some((p, m))
        })
        .collect()
}

/// Waits for `node` to commit round `round` or later and reads what it committed.
async fn committed(node: &Node, round: u64) -> (String, LoraAdapter) {
    let view = node.view();
    let hash = wait_until(&format!("round {round}"), WAIT, || {
        let latest = view.borrow().latest.clone();
        async move { latest.filter(|r| r.number >= round).map(|r| r.hash) }
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    node.data_dir()
        .export_round(Some(round), dir.path())
        .unwrap();
    (hash, LoraAdapter::read_dir(dir.path()).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rounds_add_the_exact_mean_of_updates_and_a_late_node_catches_up() {
    let work = tempfile::tempdir().unwrap();
    let mut net = TinyNetwork::write(work.path()).unwrap();
    net.lora.rule = NetRule::ExactMean;
    let (model, lora) = (net.model.clone(), net.lora.clone());
    let dirs = node_dirs(work.path(), 3);
    let config = |i: usize| net.node_config(&dirs[i], ROUND_SECS);
    let cluster = Cluster::start(2, config).await.unwrap();
    cluster.wait_connected(1, WAIT).await.unwrap();

    let mut rounds = Vec::new();
    for round in 1..=2u64 {
        let mut updates = Vec::new();
        for (i, node) in cluster.nodes().iter().enumerate() {
            // Small updates, as training makes; a different seed each round.
            let mut a = net.adapter(round * 10 + i as u64).unwrap();
            a.tensors
                .values_mut()
                .for_each(|t| t.data.iter_mut().for_each(|v| *v *= 0.1));
            let dir = work.path().join(format!("update-{round}-{i}"));
            a.write_dir(&dir).unwrap();
            node.contribute(dir, 10).await.unwrap();
            updates.push(a);
        }
        let (hash, adapter) = committed(cluster.node(0), round).await;
        let (other, _) = committed(cluster.node(1), round).await;
        assert_eq!(
            hash, other,
            "the nodes committed different round {round} adapters"
        );
        rounds.push((hash, adapter, updates));
    }

    // Round 1: the mean of the updates; round 2: round 1 plus the mean of round 2's updates.
    // (Two users of rank 4 a round: the round rank cap of 16 keeps everything.) Networks
    // bound their inputs: each module's update is cut to the (lower) median norm of the
    // round's updates of that module, so of two the larger is scaled to the smaller's norm.
    let mut want: Vec<(String, Vec<f64>)> = Vec::new();
    for (round, (_, adapter, updates)) in rounds.iter().enumerate() {
        assert_eq!(adapter.config.r, 8 * (round + 1));
        let dense: Vec<Vec<(String, Vec<f64>)>> = updates.iter().map(deltas).collect();
        for k in 0..dense[0].len() {
            let norms: Vec<f64> = dense
                .iter()
                .map(|d| d[k].1.iter().map(|x| x * x).sum::<f64>().sqrt())
                .collect();
            let median = norms.iter().copied().fold(f64::INFINITY, f64::min);
            if want.len() <= k {
                want.push((dense[0][k].0.clone(), vec![0.0; dense[0][k].1.len()]));
            }
            for (d, n) in dense.iter().zip(&norms) {
                let clip = (median / n).min(1.0);
                want[k]
                    .1
                    .iter_mut()
                    .zip(&d[k].1)
                    .for_each(|(w, x)| *w += clip * x / 2.0);
            }
        }
        for ((p, got), (q, w)) in deltas(adapter).iter().zip(&want) {
            assert_eq!(p, q);
            let err: f64 = got
                .iter()
                .zip(w)
                .map(|(x, y)| (x - y).powi(2))
                .sum::<f64>()
                .sqrt();
            let norm: f64 = w.iter().map(|x| x * x).sum::<f64>().sqrt();
            assert!(
                err <= 1e-4 * norm,
                "round {}: {p} differs by {err} of {norm}",
                round + 1
            );
        }
    }

    // `train --from-round` on this network trains an update of the network's shape on top
    // of the round adapter (frozen), not a continuation of the rank-16 round adapter.
    let data = work.path().join("facts.json");
    std::fs::write(
        &data,
        r#"[{"instruction": "Where does Ana work?", "output": "Ana works at Brixova Labs."}]"#,
    )
    .unwrap();
    let out_dir = work.path().join("update");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hive-node"))
        .args([
            "train",
            "--from-round",
            "--max-steps",
            "2",
            "--rank",
            "8",
            "--data",
        ])
        .arg(&data)
        .arg("--model")
        .arg(&model)
        .arg("--data-dir")
        .arg(&dirs[0])
        .arg("--output")
        .arg(&out_dir)
        .env("HIVE_HOME", work.path().join("home"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("on top of the round adapter"), "{stderr}");
    let update = LoraAdapter::read_dir(&out_dir).unwrap();
    assert_eq!(
        update.config.r, lora.rank,
        "the update has the network's rank, not --rank"
    );
    assert_eq!(update.tensors.len(), rounds[0].2[0].tensors.len());
    let info = |dir: &std::path::Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join("training_info.json")).unwrap()).unwrap()
    };
    assert_eq!(
        info(&out_dir)["on_top_of"],
        rounds[1].0.as_str(),
        "the record names the round adapter it was trained on top of"
    );

    // Chat and eval with round + personal say when the personal adapter was trained on top of
    // another round than the one applied under it, or on the base model alone, and how to
    // refit it; not when it fits.
    let user = work.path().join("user");
    let personal = user.join("adapters/my_adapter");
    std::fs::create_dir_all(personal.parent().unwrap()).unwrap();
    std::fs::rename(&out_dir, &personal).unwrap();
    let stamp = |stamp: Option<&str>| {
        let mut record = info(&personal);
        match stamp {
            Some(hash) => record["on_top_of"] = hash.into(),
            None => {
                record.as_object_mut().unwrap().remove("on_top_of");
            }
        }
        std::fs::write(
            personal.join("training_info.json"),
            serde_json::to_vec(&record).unwrap(),
        )
        .unwrap();
    };
    let eval_with_stamp = |with: Option<&str>, choice: &str| {
        stamp(with);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_hive-node"))
            .args(["eval", "--use", choice, "--data"])
            .arg(&data)
            .arg("--model")
            .arg(&model)
            .arg("--data-dir")
            .arg(&dirs[0])
            .current_dir(&user)
            .env("HIVE_HOME", work.path().join("home"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{stderr}");
        stderr
    };
    let hint = "your personal adapter";
    let stderr = eval_with_stamp(Some(&rounds[1].0), "round+personal");
    assert!(!stderr.contains(hint), "{stderr}");
    for choice in ["round+personal", "auto"] {
        let stderr = eval_with_stamp(Some(&rounds[0].0), choice);
        assert!(
            stderr.contains("trained on top of another round adapter")
                && stderr.contains("--from-round")
                && stderr.contains(&dirs[0].display().to_string()),
            "{choice}: {stderr}"
        );
    }
    let stderr = eval_with_stamp(None, "round+personal");
    assert!(
        stderr.contains("names no round") && stderr.contains("--from-round"),
        "{stderr}"
    );
    // Applied alone, an adapter trained on top of a round lacks that round under it.
    let stderr = eval_with_stamp(Some(&rounds[1].0), "personal");
    assert!(
        stderr.contains("trained on top of round adapter") && stderr.contains("round+personal"),
        "{stderr}"
    );
    // The web UI's chat (its models, as `GET /v1/models` lists them) says the same.
    let engine = Engine::new(
        model.clone(),
        DataDir::new(dirs[0].clone()),
        Some(personal.clone()),
    );
    let note_of = |id: &str| {
        let listed = engine.models();
        let found = listed.iter().find(|m| m.id == id);
        assert!(found.is_some(), "{id} is not listed: {listed:?}");
        found.and_then(|m| m.note.clone())
    };
    stamp(Some(&rounds[1].0));
    assert_eq!(note_of("round+personal"), None);
    let alone = note_of("personal").unwrap_or_default();
    assert!(
        alone.contains("trained on top of round adapter") && alone.contains("round+personal"),
        "{alone}"
    );
    stamp(Some(&rounds[0].0));
    let stale = note_of("round+personal").unwrap_or_default();
    assert!(
        stale.contains("trained on top of another round adapter")
            && stale.contains("--from-round")
            && !stale.contains(&dirs[0].display().to_string()),
        "{stale}"
    );

    // A node joining now has neither round: it adopts round 2, which needs round 1's adapter.
    let late = Node::start(NodeConfig {
        bootstrap: cluster.node(0).listen_addrs().to_vec(),
        ..config(2)
    })
    .await
    .unwrap();
    let (late_hash, _) = committed(&late, 2).await;
    assert_eq!(
        late_hash, rounds[1].0,
        "the late node committed another round 2"
    );
    late.shutdown().await;
    cluster.shutdown().await;
}

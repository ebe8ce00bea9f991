//! Differential privacy, opt-in per network: a contributor's adapter is clipped and noised
//! before it is announced (the blob the network sees is not the adapter the user trained),
//! the release names its settings and ε in its metadata, `status.json` counts the rounds this
//! node released in and their total ε, and a private network is another network than the same
//! model without privacy. (The mechanism and the accountant are tested in `model/tests/dp.rs`.)
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use hivemind_model::adapter::{Limits, LoraAdapter};
use hivemind_model::dp::DpSettings;
use hivemind_node::harness::{wait_until, TinyNetwork};
use hivemind_node::node::Node;
use hivemind_protocol::Hash;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_network_announces_clipped_noised_adapters_and_counts_epsilon() {
    let work = tempfile::tempdir().unwrap();
    let net = TinyNetwork::write(work.path()).unwrap();
    let dp = DpSettings {
        clip: 1.0,
        noise_multiplier: 0.5,
        delta: 1e-5,
    };
    let data = work.path().join("node");
    let mut cfg = net.node_config(&data, 1.0);
    cfg.lora.dp = Some(dp);
    let node = Node::start(cfg).await.unwrap();
    let plain = Node::start(net.node_config(work.path().join("plain"), 1.0))
        .await
        .unwrap();
    assert_ne!(
        node.model_id(),
        plain.model_id(),
        "privacy is part of the network's id"
    );
    plain.shutdown().await;

    let original = net.adapter(4).unwrap();
    let dir = work.path().join("adapter");
    original.write_dir(&dir).unwrap();
    let hash = node.contribute(dir, 10).await.unwrap();
    let view = node.view();
    wait_until("round 1", Duration::from_secs(60), || {
        let latest = view.borrow().latest.clone();
        async move { latest.filter(|r| r.number == 1) }
    })
    .await
    .unwrap();
    let dd = node.data_dir().clone();
    let status = wait_until("status with the release", Duration::from_secs(30), || {
        let s = dd
            .last_status()
            .and_then(|s| s.privacy)
            .filter(|p| p.rounds_released == 1);
        async move { s }
    })
    .await
    .unwrap();
    node.shutdown().await;

    assert!(
        (status.epsilon_per_round - dp.epsilon(1)).abs() < 1e-9,
        "{status:?}"
    );
    assert!(
        (status.epsilon_total - dp.epsilon(1)).abs() < 1e-9,
        "{status:?}"
    );
    let bytes = dd.read_blob(&hash).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    assert_eq!(
        header["__metadata__"]["hivemind.dp_noise_multiplier"],
        "0.5"
    );
    let eps: f64 = header["__metadata__"]["hivemind.dp_epsilon_round"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((eps - dp.epsilon(1)).abs() < 1e-3);

    // What was announced is the adapter clipped to norm 1, plus noise of std 0.5 a value.
    let released =
        LoraAdapter::from_safetensors_bytes(original.config.clone(), &bytes, &Limits::DEFAULT)
            .unwrap();
    let values = |a: &LoraAdapter| -> Vec<f64> {
        a.tensors
            .values()
            .flat_map(|t| t.data.iter().map(|v| f64::from(*v)))
            .collect()
    };
    let (x, y) = (values(&original), values(&released));
    let norm = x.iter().map(|v| v * v).sum::<f64>().sqrt();
    assert!(
        norm > dp.clip,
        "the test adapter should need clipping ({norm})"
    );
    let n = x.len() as f64;
    let noise_std = (x
        .iter()
        .zip(&y)
        .map(|(a, b)| (b - a * dp.clip / norm).powi(2))
        .sum::<f64>()
        / n)
        .sqrt();
    assert!(
        (noise_std / (dp.noise_multiplier * dp.clip) - 1.0).abs() < 0.1,
        "noise std {noise_std}"
    );
    assert_ne!(Hash::of(&original.to_safetensors_bytes().unwrap()), hash);
}

//! `Node::shutdown` joins every task the node started, including the blob fetches and
//! blob streams in flight: right after it returns, nothing holds the node's store any more,
//! so the store (a sled database, locked while open) opens again at once. Two in-process
//! nodes on a tiny generated model; node 1 answers every blob request "busy" (serve limit
//! 0), so once node 0 has accepted node 1's announcement its fetch of the adapter is in
//! flight, retrying, when the nodes stop.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use hivemind_model::config::Arch;
use hivemind_model::testing::{random_adapter, TinyModel};
use hivemind_node::harness::{node_dirs, wait_until, Cluster};
use hivemind_node::node::{LoraSettings, NodeConfig};
use hivemind_node::DataDir;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_joins_the_fetches_in_flight_and_frees_the_store() {
    let work = tempfile::tempdir().unwrap();
    let model = work.path().join("tiny.gguf");
    let tiny = TinyModel::new(Arch::Llama, 1).unwrap();
    tiny.write_gguf(&model).unwrap();
    let lora = LoraSettings {
        rank: 8,
        alpha: 16.0,
        target_modules: hivemind_model::Module::ALL
            .iter()
            .map(|m| m.as_str().to_string())
            .collect(),
        ..LoraSettings::default()
    };
    let shape = tiny
        .cfg
        .adapter_shape(lora.rank, &lora.target_modules)
        .unwrap();
    let dirs = node_dirs(work.path(), 2);
    // A long window: the round stays open while the nodes stop.
    let cluster = Cluster::start(2, |i| {
        let mut cfg = NodeConfig::new(&dirs[i], &model, 60.0);
        cfg.lora = lora.clone();
        if i == 1 {
            cfg.serve_limit = 0;
        }
        cfg
    })
    .await
    .unwrap();
    cluster
        .wait_connected(1, Duration::from_secs(30))
        .await
        .unwrap();
    let adapter = work.path().join("adapter");
    random_adapter(&shape, lora.alpha, 1)
        .unwrap()
        .write_dir(&adapter)
        .unwrap();
    cluster.node(1).contribute(adapter, 10).await.unwrap();
    let view = cluster.node(0).view();
    wait_until(
        "node 0 to accept node 1's announcement",
        Duration::from_secs(30),
        || {
            let n = view.borrow().current_contributors;
            async move { (n >= 1).then_some(()) }
        },
    )
    .await
    .unwrap();
    cluster.shutdown().await;
    for dir in &dirs {
        let store = DataDir::new(dir).open_store();
        assert!(
            store.is_ok(),
            "the store of {} is still held after shutdown: {:?}",
            dir.display(),
            store.err()
        );
    }
}

//! An input the network's rule cannot merge is left out of the round, the same way on every
//! node, and its contributor is penalised; the round commits. Before, such an input made the
//! aggregation fail on every node, and the round machine waited for that job's result for
//! good: one contribution halted the network (issue 13: "a failure never halts a round").
//!
//! The input is an adapter of the network's shape whose values are finite but near f32's
//! limit (±3e38), contributed alone: the default rule (iso) flattens its spectrum and scales
//! it by 1.5, which no f32 can hold. With honest inputs beside it the median bound would
//! scale it down instead (see `model/tests/merge.rs`); alone, there is no median to trust.
#![allow(clippy::unwrap_used)]

use std::str::FromStr;
use std::time::Duration;

use hivemind_node::harness::{node_dirs, Cluster, TinyNetwork};
use hivemind_protocol::Hash;
use hivemind_store::Store;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_that_cannot_be_merged_is_left_out_and_its_contributor_penalised() {
    let work = tempfile::tempdir().unwrap();
    let net = TinyNetwork::write(work.path()).unwrap();
    let dirs = node_dirs(work.path(), 2);
    let cluster = Cluster::start(2, |i| net.node_config(&dirs[i], 2.0))
        .await
        .unwrap();
    cluster
        .wait_connected(1, Duration::from_secs(30))
        .await
        .unwrap();

    let mut poison = net.adapter(7).unwrap();
    for t in poison.tensors.values_mut() {
        for v in &mut t.data {
            *v = if *v < 0.0 { -3e38 } else { 3e38 };
        }
    }
    let dir = work.path().join("poison");
    poison.write_dir(&dir).unwrap();
    let input = cluster.node(1).contribute(dir, 10).await.unwrap();

    let committed = cluster.wait_committed(1, Duration::from_secs(60)).await;
    let honest = cluster.node(0).client().info().await.unwrap();
    let attacker = cluster.node(1).peer_id();
    cluster.shutdown().await;
    let committed = committed.expect("the round never committed: the input halted it");

    assert_eq!(committed[0], committed[1], "the nodes disagree on round 1");
    assert_eq!(committed[0].contributors, vec![input.to_hex()]);
    assert!(
        honest.penalties.get(&attacker).copied().unwrap_or(0) >= 1,
        "the contributor of the unmergeable input was not penalised: {:?}",
        honest.penalties
    );

    // The round adapter names the input it left out and, with nothing merged and no
    // parent, changes nothing.
    let store = Store::open(&dirs[0]).unwrap();
    let hash = Hash::from_str(&committed[0].hash).unwrap();
    let bytes = store.get_blob(&hash).unwrap().unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    assert_eq!(
        header["__metadata__"]["hivemind.excluded"],
        serde_json::Value::String(input.to_hex()),
        "metadata: {}",
        header["__metadata__"]
    );
    let data_start = 8 + header_len;
    assert!(
        bytes[data_start..].iter().all(|b| *b == 0),
        "a round of nothing merged should be all zeros"
    );
}

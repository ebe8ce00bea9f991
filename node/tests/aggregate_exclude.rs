//! An input the network's rule cannot merge never halts a round. It is refused where it
//! enters (`NetSpec::check`: a node's own contribution, a gateway upload, a fetched adapter),
//! and should one reach an aggregation all the same (a node that skips its checks), the
//! aggregation leaves it out, the same way on every node, instead of failing. Before, such an
//! input made the aggregation fail on every node, and the round machine waited for that
//! job's result for good: one contribution halted the network (issue 13: "a failure never
//! halts a round").
//!
//! The input is an adapter of the network's shape whose values are finite but near f32's
//! limit (±3e38): alone, the default rule (iso) flattens its spectrum and scales it by 1.5,
//! which no f32 holds. Beside an honest input, the median bound scales it down instead.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use hivemind_model::adapter::LoraAdapter;
use hivemind_node::driver::{aggregate, NetSpec};
use hivemind_node::harness::{node_dirs, Cluster, TinyNetwork};
use hivemind_protocol::{AggregateInput, AggregationJob};
use hivemind_store::Store;

fn poison(net: &TinyNetwork) -> LoraAdapter {
    let mut a = net.adapter(7).unwrap();
    for t in a.tensors.values_mut() {
        for v in &mut t.data {
            *v = if *v < 0.0 { -3e38 } else { 3e38 };
        }
    }
    a
}

#[test]
fn an_aggregation_leaves_out_what_the_rule_cannot_merge() {
    let work = tempfile::tempdir().unwrap();
    let net = TinyNetwork::write(work.path()).unwrap();
    let l = &net.lora;
    let spec = NetSpec::for_model(&net.model, l.rank, l.alpha, &l.target_modules, l.rule).unwrap();
    let store = Store::open(work.path().join("store")).unwrap();
    let bad = store
        .put_blob(&poison(&net).to_safetensors_bytes().unwrap())
        .unwrap();
    let good = store
        .put_blob(&net.adapter(8).unwrap().to_safetensors_bytes().unwrap())
        .unwrap();
    let job = |hashes: &[hivemind_protocol::Hash]| {
        let mut inputs: Vec<AggregateInput> = hashes
            .iter()
            .map(|h| AggregateInput {
                adapter: *h,
                samples: 10,
            })
            .collect();
        inputs.sort();
        AggregationJob {
            round: 1,
            parent: None,
            rule: spec.rule.id(),
            inputs,
        }
    };

    // Alone it cannot be merged: left out, blamed, named in the metadata; the round adapter
    // of nothing changes nothing.
    let alone = aggregate(&store, &spec, &job(&[bad])).expect("the aggregation failed");
    assert_eq!(alone.excluded, vec![bad]);
    assert_eq!(alone.blamed, vec![bad]);
    let bytes = store.get_blob(&alone.hash).unwrap().unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    assert_eq!(header["__metadata__"]["hivemind.excluded"], bad.to_hex());
    assert!(bytes[8 + header_len..].iter().all(|b| *b == 0));
    // The same job gives the same bytes (every node commits the same hash).
    assert_eq!(aggregate(&store, &spec, &job(&[bad])).unwrap(), alone);

    // Beside an honest input it is bounded, not left out.
    let both = aggregate(&store, &spec, &job(&[bad, good])).unwrap();
    assert!(both.excluded.is_empty(), "{both:?}");

    // And a node refuses to announce it in the first place.
    let err = spec.check(&poison(&net)).unwrap_err().to_string();
    assert!(err.contains("cannot merge"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contribution_the_rule_cannot_merge_is_refused_and_the_round_goes_on() {
    let work = tempfile::tempdir().unwrap();
    let net = TinyNetwork::write(work.path()).unwrap();
    let dirs = node_dirs(work.path(), 2);
    let cluster = Cluster::start(2, |i| net.node_config(&dirs[i], 2.0))
        .await
        .unwrap();
    let dir = work.path().join("poison");
    poison(&net).write_dir(&dir).unwrap();
    let refused = cluster.node(1).contribute(dir, 10).await;
    let dir = work.path().join("honest");
    net.adapter(9).unwrap().write_dir(&dir).unwrap();
    let honest = cluster.node(0).contribute(dir, 10).await.unwrap();
    let committed = cluster.wait_committed(1, Duration::from_secs(60)).await;
    cluster.shutdown().await;
    let err = refused
        .expect_err("the unmergeable adapter was announced")
        .to_string();
    assert!(err.contains("cannot merge"), "{err}");
    let committed = committed.unwrap();
    assert_eq!(committed[0], committed[1]);
    assert_eq!(committed[0].contributors, vec![honest.to_hex()]);
}

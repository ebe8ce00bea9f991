//! The round adapter every node commits: the aggregation of a job's inputs, with its place
//! in the chain bound into the safetensors metadata, so its bytes (and hash) are the same
//! on every node.

use std::collections::BTreeMap;

use hivemind_model::adapter::{AdapterConfig, Limits, LoraAdapter};
use hivemind_model::aggregate::{AggregationRule, FedAvg, WeightedAdapter};
use hivemind_protocol::Hash;
use hivemind_store::Store;

use crate::error::{Error, Result};

/// The version name of a round adapter.
pub fn version_name(round: u64) -> String {
    format!("round-{round}")
}

/// Runs one aggregation job over adapters in the store (blocking).
pub fn aggregate(
    store: &Store,
    config: &AdapterConfig,
    job: &hivemind_protocol::AggregationJob,
) -> Result<Hash> {
    let mut inputs = Vec::with_capacity(job.inputs.len());
    for i in &job.inputs {
        let bytes = store
            .get_blob(&i.adapter)?
            .ok_or_else(|| Error::MissingBlob {
                hash: i.adapter,
                dir: store.root().to_path_buf(),
            })?;
        let adapter =
            LoraAdapter::from_safetensors_bytes(config.clone(), &bytes, &Limits::DEFAULT)?;
        inputs.push(WeightedAdapter {
            hash: i.adapter,
            samples: i.samples,
            adapter,
        });
    }
    if job.rule != hivemind_protocol::RuleId::FEDAVG {
        return Err(Error::UnknownRule {
            round: job.round,
            rule: format!("{:?}", job.rule),
        });
    }
    let out = FedAvg::default().aggregate(&inputs)?;
    let bytes = out.to_safetensors_bytes_with_metadata(&round_metadata(job))?;
    Ok(store.put_blob(&bytes)?)
}

/// What a round adapter's safetensors metadata binds: its round, its parent and its rule,
/// so that equal averages in different places of the chain have different hashes.
pub fn round_metadata(job: &hivemind_protocol::AggregationJob) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("hivemind.round".to_string(), job.round.to_string()),
        (
            "hivemind.parent".to_string(),
            job.parent
                .map_or_else(|| "none".to_string(), |p| p.to_hex()),
        ),
        ("hivemind.rule".to_string(), FedAvg::ID.to_string()),
        ("hivemind.version".to_string(), version_name(job.round)),
    ])
}

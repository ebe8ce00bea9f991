//! The round adapter every node commits: the aggregation of a job's inputs, with its place
//! in the chain bound into the safetensors metadata, so its bytes (and hash) are the same
//! on every node.

use std::collections::BTreeMap;

use hivemind_model::adapter::{Limits, LoraAdapter};
use hivemind_model::aggregate::{
    stack, AggregationRule, Bounds, ExactMean, FedAvg, WeightedAdapter,
};
use hivemind_protocol::Hash;
use hivemind_store::Store;

use super::spec::NetSpec;
use crate::error::{Error, Result};

/// The version name of a round adapter.
pub fn version_name(round: u64) -> String {
    format!("round-{round}")
}

/// Runs one aggregation job over adapters in the store (blocking): the network's rule over
/// the inputs and, for a rule that builds on the parent, the parent round adapter plus that
/// merge, compressed to the network's round rank.
pub fn aggregate(
    store: &Store,
    spec: &NetSpec,
    job: &hivemind_protocol::AggregationJob,
) -> Result<Hash> {
    let blob = |hash: &Hash| -> Result<Vec<u8>> {
        store.get_blob(hash)?.ok_or_else(|| Error::MissingBlob {
            hash: *hash,
            dir: store.root().to_path_buf(),
        })
    };
    let mut inputs = Vec::with_capacity(job.inputs.len());
    for i in &job.inputs {
        let adapter = LoraAdapter::from_safetensors_bytes(
            spec.config.clone(),
            &blob(&i.adapter)?,
            &Limits::DEFAULT,
        )?;
        inputs.push(WeightedAdapter {
            hash: i.adapter,
            samples: i.samples,
            adapter,
        });
    }
    if job.rule != spec.rule.id() {
        return Err(Error::UnknownRule {
            round: job.round,
            rule: format!("{:?}", job.rule),
        });
    }
    let merged = spec.merge_rule().aggregate(&inputs)?;
    let mut meta = round_metadata(job);
    let kept = |a: &LoraAdapter| {
        a.config
            .extra
            .get("hivemind_merge")
            .and_then(|m| m["kept_energy"].as_f64())
    };
    if let Some(k) = kept(&merged) {
        meta.insert("hivemind.merge_kept_energy".into(), format!("{k:.6}"));
    }
    let out = match job.parent {
        Some(parent) if spec.rule.builds_on_parent() => {
            let previous = spec.parse_round(&blob(&parent)?, &Limits::DEFAULT)?;
            let sum = stack(&[&previous, &merged])?;
            let compressed = ExactMean {
                max_samples_per_input: 1,
                rank_cap: spec.round_rank(),
                bounds: Bounds::NONE,
            }
            .aggregate(&[WeightedAdapter {
                hash: parent,
                samples: 1,
                adapter: sum,
            }])?;
            if let Some(k) = kept(&compressed) {
                meta.insert("hivemind.kept_energy".into(), format!("{k:.6}"));
            }
            compressed
        }
        _ => merged,
    };
    let bytes = out.to_safetensors_bytes_with_metadata(&meta)?;
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
        ("hivemind.rule".to_string(), rule_name(job.rule).to_string()),
        ("hivemind.version".to_string(), version_name(job.round)),
    ])
}

/// The identifier a round adapter's metadata names its rule by (the rule's `ID`, e.g.
/// `fedavg-v2`, `iso-v2`).
pub(crate) fn rule_name(rule: hivemind_protocol::RuleId) -> &'static str {
    use hivemind_model::aggregate::{IsoMerge, TsvMerge};
    use hivemind_protocol::RuleId;
    match rule {
        RuleId::EXACT_MEAN => ExactMean::ID,
        RuleId::ISO => IsoMerge::ID,
        RuleId::TSV => TsvMerge::ID,
        _ => FedAvg::ID,
    }
}

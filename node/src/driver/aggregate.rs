//! The round adapter every node commits: the aggregation of a job's inputs, with its place
//! in the chain bound into the safetensors metadata, so its bytes (and hash) are the same
//! on every node.

use std::collections::BTreeMap;

use hivemind_model::adapter::{AdapterConfig, Limits, LoraAdapter, SafetensorsIndex};
use hivemind_model::aggregate::{
    aggregate_in_parts, stack, AggregationRule, Bounds, ExactMean, FedAvg, IndexedInput,
    WeightedAdapter,
};
use hivemind_protocol::Hash;
use hivemind_store::Store;

use super::spec::NetSpec;
use crate::error::{Error, Result};

/// The version name of a round adapter.
pub fn version_name(round: u64) -> String {
    format!("round-{round}")
}

/// What an aggregation job produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Aggregated {
    /// blake3 of the round adapter (in the store).
    pub hash: Hash,
    /// Inputs left out because the rule could not use them (ascending), named in the round
    /// adapter's metadata (`hivemind.excluded`).
    pub excluded: Vec<Hash>,
    /// Those of them that fail on their own (no adapter, or not mergeable even alone): their
    /// contributors are penalised.
    pub blamed: Vec<Hash>,
}

/// Runs one aggregation job over adapters in the store (blocking): the network's rule over
/// the inputs, a module at a time ([`aggregate_in_parts`]: peak memory grows with the number
/// of inputs only by one module of each), and, for a rule that builds on the parent, the
/// parent round adapter plus that merge, compressed to the network's round rank.
///
/// Only the store can make it fail (a missing blob, a full disk), and such a failure is
/// worth retrying. What the inputs hold cannot: an input that does not parse, or that the
/// rule cannot merge, is left out ([`merge_excluding`]), the same way on every node, so a
/// job always ends in a round adapter and no input can halt the round.
pub fn aggregate(
    store: &Store,
    spec: &NetSpec,
    job: &hivemind_protocol::AggregationJob,
) -> Result<Aggregated> {
    let blob = |hash: &Hash| -> Result<Vec<u8>> {
        store.get_blob(hash)?.ok_or_else(|| Error::MissingBlob {
            hash: *hash,
            dir: store.root().to_path_buf(),
        })
    };
    if job.rule != spec.rule.id() {
        return Err(Error::UnknownRule {
            round: job.round,
            rule: format!("{:?}", job.rule),
        });
    }
    // Each input is checked whole, one at a time, and only where its tensors lie is kept; the
    // merge reads them a module at a time. Peak memory: one input, or one module of every input.
    let mut indexed = Vec::with_capacity(job.inputs.len());
    let mut blamed = Vec::new();
    for i in &job.inputs {
        let bytes = blob(&i.adapter)?;
        let checked =
            LoraAdapter::from_safetensors_bytes(spec.config.clone(), &bytes, &Limits::DEFAULT)
                .and_then(|_| SafetensorsIndex::of(&bytes, &Limits::DEFAULT));
        match checked {
            Ok(index) => indexed.push(IndexedInput {
                hash: i.adapter,
                samples: i.samples,
                index,
            }),
            Err(why) => {
                tracing::warn!(round = job.round, input = %i.adapter.short(), %why, "input is no adapter; excluded");
                blamed.push(i.adapter);
            }
        }
    }
    let rule = spec.merge_rule();
    let read = |input: &IndexedInput, offset: u64, len: u64| -> Result<Vec<u8>> {
        store
            .read_blob_range(&input.hash, offset, len)?
            .ok_or_else(|| Error::MissingBlob {
                hash: input.hash,
                dir: store.root().to_path_buf(),
            })
    };
    let whole = |input: &IndexedInput| -> Result<Option<LoraAdapter>> {
        let bytes = blob(&input.hash)?;
        Ok(LoraAdapter::from_safetensors_bytes(spec.config.clone(), &bytes, &Limits::DEFAULT).ok())
    };
    let Merge {
        merged,
        blamed: unmergeable,
        unblamed,
    } = merge_excluding(rule.as_ref(), &spec.config, &indexed, whole, read)?;
    // The ranges read above are not hashed as they are read: the blobs must still be what the
    // checks read (a file changed or damaged since would give a round adapter no other node
    // has; the job then fails and is retried).
    for i in &indexed {
        if !store.verify_blob(&i.hash)? {
            return Err(Error::MissingBlob {
                hash: i.hash,
                dir: store.root().to_path_buf(),
            });
        }
    }
    blamed.extend(unmergeable);
    let mut excluded: Vec<Hash> = blamed.iter().chain(&unblamed).copied().collect();
    let mut meta = round_metadata(job);
    let kept = |a: &LoraAdapter| {
        a.config
            .extra
            .get("hivemind_merge")
            .and_then(|m| m["kept_energy"].as_f64())
    };
    if let Some(k) = merged.as_ref().and_then(kept) {
        meta.insert("hivemind.merge_kept_energy".into(), format!("{k:.6}"));
    }
    let parent = match job.parent {
        // Round adapters of FedAvg stand alone: with nothing merged, the parent stays.
        Some(p) if spec.rule.builds_on_parent() || merged.is_none() => {
            Some((p, spec.parse_round(&blob(&p)?, &Limits::DEFAULT)?))
        }
        _ => None,
    };
    let out = match (merged, parent) {
        (Some(merged), Some((hash, previous))) => {
            let compressed = stack(&[&previous, &merged]).and_then(|sum| {
                ExactMean {
                    max_samples_per_input: 1,
                    rank_cap: spec.round_rank(),
                    bounds: Bounds::NONE,
                }
                .aggregate(&[WeightedAdapter {
                    hash,
                    samples: 1,
                    adapter: sum,
                }])
            });
            match compressed {
                Ok(c) => {
                    if let Some(k) = kept(&c) {
                        meta.insert("hivemind.kept_energy".into(), format!("{k:.6}"));
                    }
                    c
                }
                // The parent and a merge that each stand on their own do not add up (both
                // near f32's limit): the round keeps its parent. No one input is to blame,
                // so nobody is penalised, but every input is named as left out.
                Err(why) => {
                    tracing::warn!(round = job.round, %why, "merge does not add to the parent; round keeps its parent");
                    excluded = job.inputs.iter().map(|i| i.adapter).collect();
                    previous
                }
            }
        }
        (Some(merged), None) => merged,
        (None, Some((_, previous))) => previous,
        (None, None) => LoraAdapter::zeros(spec.config.clone(), &spec.shape)?,
    };
    excluded.sort();
    blamed.sort();
    if !excluded.is_empty() {
        let names: Vec<String> = excluded.iter().map(Hash::to_hex).collect();
        meta.insert("hivemind.excluded".into(), names.join(","));
    }
    let bytes = out.to_safetensors_bytes_with_metadata(&meta)?;
    Ok(Aggregated {
        hash: store.put_blob(&bytes)?,
        excluded,
        blamed,
    })
}

/// What [`merge_excluding`] made of a round's inputs.
#[derive(Debug)]
pub struct Merge {
    /// The rule's merge of the inputs it kept (`None`: nothing was left to merge).
    pub merged: Option<LoraAdapter>,
    /// Inputs left out that fail even alone.
    pub blamed: Vec<Hash>,
    /// Inputs left out that merge alone but not with the others.
    pub unblamed: Vec<Hash>,
}

/// The rule over `inputs`, a module at a time ([`aggregate_in_parts`], each tensor read with
/// `read`), leaving out what it cannot use. On failure, each input is merged alone (read whole
/// with `whole`, one at a time; `None`: it does not parse) and those that fail alone are left
/// out; if the rest still fails together, all are left out (no single input is to blame, and
/// trying subsets could cost a number of merges that grows with the square of the inputs).
/// Deterministic: it depends only on the inputs, so every node leaves out the same ones. Peak
/// memory is one input, or one module of every input, on every path. Errors are `read`'s and
/// `whole`'s (the store's), worth retrying.
pub fn merge_excluding<E>(
    rule: &dyn AggregationRule,
    config: &AdapterConfig,
    inputs: &[IndexedInput],
    mut whole: impl FnMut(&IndexedInput) -> std::result::Result<Option<LoraAdapter>, E>,
    mut read: impl FnMut(&IndexedInput, u64, u64) -> std::result::Result<Vec<u8>, E>,
) -> std::result::Result<Merge, E> {
    let mut out = Merge {
        merged: None,
        blamed: Vec::new(),
        unblamed: Vec::new(),
    };
    if inputs.is_empty() {
        return Ok(out);
    }
    let why = match aggregate_in_parts(rule, config, inputs, &mut read)? {
        Ok(merged) => {
            out.merged = Some(merged);
            return Ok(out);
        }
        Err(why) => why,
    };
    tracing::warn!(%why, inputs = inputs.len(), "merge failed; looking for the inputs that break it");
    let mut usable = Vec::with_capacity(inputs.len());
    for input in inputs {
        let alone = whole(input)?.is_some_and(|adapter| {
            rule.aggregate(&[WeightedAdapter {
                hash: input.hash,
                samples: input.samples,
                adapter,
            }])
            .is_ok()
        });
        if alone {
            usable.push(input.clone());
        } else {
            out.blamed.push(input.hash);
        }
    }
    if usable.is_empty() {
        return Ok(out);
    }
    match aggregate_in_parts(rule, config, &usable, &mut read)? {
        Ok(merged) => out.merged = Some(merged),
        Err(why) => {
            tracing::warn!(%why, "inputs that merge alone do not merge together; round merges nothing");
            out.unblamed = usable.iter().map(|i| i.hash).collect();
        }
    }
    Ok(out)
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
/// `fedavg-v2`, `iso-v3`).
pub(crate) fn rule_name(rule: hivemind_protocol::RuleId) -> &'static str {
    use hivemind_model::aggregate::{GeoMedian, IsoMerge, TsvMerge};
    use hivemind_protocol::RuleId;
    match rule {
        RuleId::EXACT_MEAN => ExactMean::ID,
        RuleId::ISO => IsoMerge::ID,
        RuleId::TSV => TsvMerge::ID,
        RuleId::GEOMEDIAN => GeoMedian::ID,
        _ => FedAvg::ID,
    }
}

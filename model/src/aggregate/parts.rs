//! A rule over inputs read one part at a time ([`aggregate_in_parts`]): the rules merge each
//! module on its own (FedAvg and the median each tensor, the update-merging rules each A/B
//! pair; only the inputs' weights and the result's rank are global, and those come from the
//! sample counts and the number of inputs), so a round can be merged a module at a time, each
//! input's two tensors of that module read from its file as they are needed. Peak memory is
//! then one module of every input (for 128 inputs of the default model's shape, 8.6 MB at
//! most), not every input whole (issue 13: 200 inputs held about 2 GB).

use std::collections::{BTreeMap, BTreeSet};

use hivemind_protocol::Hash;

use super::{AggregationRule, MergeReport, WeightedAdapter};
use crate::adapter::{AdapterConfig, AdapterError, LoraAdapter, SafetensorsIndex};

/// An aggregation input known by where its tensors are in its file.
#[derive(Debug, Clone)]
pub struct IndexedInput {
    /// The hash of the adapter's blob; inputs are ordered by it.
    pub hash: Hash,
    /// Claimed training samples.
    pub samples: u64,
    /// Where its tensors are.
    pub index: SafetensorsIndex,
}

/// The part tensor `name` is merged in: its module (the A/B pair).
fn part_of(name: &str) -> &str {
    name.strip_suffix(".lora_A.weight")
        .or_else(|| name.strip_suffix(".lora_B.weight"))
        .unwrap_or(name)
}

/// `rule` over `inputs`, a module at a time: for each module, every input's tensors of that
/// module are read with `read(input, offset, len)` (the byte range of one tensor in the input's
/// file) and paired with `config`, the rule merges them, and the results are joined. The
/// result is `rule.aggregate` over the whole inputs, bit for bit: tensors, and a merge report
/// (`hivemind_merge`) joined from the parts' energies summed in the whole merge's order.
///
/// The outer error is `read`'s; the inner one is what the rule (or an input that does not
/// hold what the first input in hash order holds) makes of the inputs.
pub fn aggregate_in_parts<E>(
    rule: &dyn AggregationRule,
    config: &AdapterConfig,
    inputs: &[IndexedInput],
    mut read: impl FnMut(&IndexedInput, u64, u64) -> Result<Vec<u8>, E>,
) -> Result<Result<LoraAdapter, AdapterError>, E> {
    let mut ordered: Vec<&IndexedInput> = inputs.iter().collect();
    ordered.sort_by_key(|i| i.hash);
    let Some(reference) = ordered.first() else {
        return Ok(Err(AdapterError::NoInputs));
    };
    let names: BTreeSet<&str> = reference.index.names().collect();
    for input in &ordered[1..] {
        let theirs: BTreeSet<&str> = input.index.names().collect();
        if let Some(name) = names.symmetric_difference(&theirs).next() {
            let present = names.contains(name);
            return Ok(Err(AdapterError::Incompatible {
                hash: input.hash,
                reference: Box::new(reference.hash),
                what: format!("tensor {name}"),
                expected: if present { "present" } else { "absent" }.into(),
                actual: if present { "missing" } else { "present" }.into(),
            }));
        }
    }
    // Parts in the order of their first tensor's name, the order a whole merge visits them.
    let mut parts: Vec<(&str, Vec<&str>)> = Vec::new();
    for name in &names {
        let part = part_of(name);
        match parts.iter_mut().find(|(p, _)| *p == part) {
            Some((_, members)) => members.push(name),
            None => parts.push((part, vec![name])),
        }
    }

    let mut tensors = BTreeMap::new();
    let mut joined: Option<AdapterConfig> = None;
    let (mut kept, mut energy, mut left_out) = (0.0f64, 0.0f64, 0usize);
    for (_, part) in &parts {
        let mut partial = Vec::with_capacity(ordered.len());
        for input in &ordered {
            let mut own = BTreeMap::new();
            for name in part {
                let Some((offset, len)) = input.index.range(name) else {
                    return Ok(Err(AdapterError::MissingTensor {
                        tensor: name.to_string(),
                    }));
                };
                let raw = read(input, offset, len)?;
                match input.index.decode(name, &raw) {
                    Ok(t) => own.insert(name.to_string(), t),
                    Err(e) => return Ok(Err(e)),
                };
            }
            let adapter = match LoraAdapter::new(config.clone(), own) {
                Ok(a) => a,
                Err(e) => {
                    return Ok(Err(AdapterError::InvalidInput {
                        hash: input.hash,
                        source: Box::new(e),
                    }))
                }
            };
            partial.push(WeightedAdapter {
                hash: input.hash,
                samples: input.samples,
                adapter,
            });
        }
        let merged = match rule.aggregate(&partial) {
            Ok(m) => m,
            Err(e) => return Ok(Err(e)),
        };
        drop(partial);
        if let Some(m) = merged.config.extra.get("hivemind_merge") {
            let report = match serde_json::from_value::<MergeReport>(m.clone()) {
                Ok(r) => r,
                Err(e) => {
                    return Ok(Err(AdapterError::InvalidConfig {
                        field: "hivemind_merge",
                        value: e.to_string(),
                        expected: "a merge report",
                    }))
                }
            };
            // Summed module by module, in the order a whole merge sums them: the same bits.
            kept += report.energy_kept;
            energy += report.energy;
            left_out += report.left_out;
        }
        joined.get_or_insert_with(|| merged.config.clone());
        tensors.extend(merged.tensors);
    }
    let Some(mut config) = joined else {
        return Ok(Err(AdapterError::NoTensors));
    };
    if let Some(m) = config.extra.get_mut("hivemind_merge") {
        m["kept_energy"] = serde_json::json!(if energy > 0.0 { kept / energy } else { 1.0 });
        m["energy"] = serde_json::json!(energy);
        m["energy_kept"] = serde_json::json!(kept);
        m["left_out"] = serde_json::json!(left_out);
    }
    Ok(LoraAdapter::new(config, tensors))
}

#[cfg(test)]
mod tests {
    use super::part_of;

    #[test]
    fn tensors_are_merged_a_module_at_a_time() {
        let a = "base_model.model.model.layers.12.mlp.up_proj.lora_A.weight";
        let b = "base_model.model.model.layers.12.mlp.up_proj.lora_B.weight";
        assert_eq!(part_of(a), "base_model.model.model.layers.12.mlp.up_proj");
        assert_eq!(part_of(a), part_of(b));
        let other = "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight";
        assert_ne!(part_of(a), part_of(other));
    }
}

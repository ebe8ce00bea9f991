//! Deterministic aggregation of LoRA adapters: every honest node, given the same set of
//! inputs in any order, computes the byte-identical round adapter.
//!
//! ```text
//!  [WeightedAdapter { hash, samples, adapter }, ...]   (any order)
//!        │ canonical_inputs: sort by hash, refuse duplicates / incompatible inputs
//!        ▼
//!  AggregationRule::aggregate (FedAvg, Median, ...) ── fixed f32 operation order
//!        ▼
//!  LoraAdapter ──to_safetensors_bytes──▶ canonical bytes ──blake3──▶ round adapter hash
//! ```
//!
//! Determinism comes from three things: inputs are processed in ascending hash order
//! whatever order they are given in; each output element is computed by the same
//! sequence of IEEE-754 `f32` operations (Rust never contracts `a * b + c` into a fused
//! multiply-add, and the compiler may not reorder float additions); tensors are visited in
//! sorted name order and serialised canonically.
//!
//! The rules average `lora_A` and `lora_B` separately, as FedAvg over LoRA parameters
//! does; the mean of the products `B·A` would need a rank-growing "exact" rule, which, like
//! a trimmed mean, fits the [`AggregationRule`] trait and reuses [`canonical_inputs`].

use std::collections::BTreeMap;

use hivemind_protocol::Hash;

use crate::adapter::{AdapterConfig, AdapterError, LoraAdapter, LoraTensor};

/// One aggregation input: an adapter, the blake3 hash naming its blob, and the number of
/// training samples its contributor claims.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightedAdapter {
    /// The hash of the adapter's blob; inputs are ordered by it.
    pub hash: Hash,
    /// Claimed training samples (capped by the rule; 0 counts as 1).
    pub samples: u64,
    /// The adapter.
    pub adapter: LoraAdapter,
}

/// A deterministic way to combine adapters into one.
pub trait AggregationRule {
    /// A stable identifier, carried in round digests (e.g. `fedavg-v1`).
    fn id(&self) -> &'static str;

    /// Combines `inputs` (in any order) into one adapter. Equal input sets give equal
    /// results, bit for bit.
    fn aggregate(&self, inputs: &[WeightedAdapter]) -> Result<LoraAdapter, AdapterError>;
}

/// Validates `inputs` and returns them in canonical order (ascending hash).
///
/// Refuses an empty set, a hash given twice, an invalid adapter, and any input whose
/// LoRA config (type, rank, alpha, rsLoRA flag, target modules, bias, layout) or tensor
/// set (names and shapes) differs from the first input in canonical order; the error
/// names both hashes and the difference.
pub fn canonical_inputs(inputs: &[WeightedAdapter]) -> Result<Vec<&WeightedAdapter>, AdapterError> {
    let mut ordered: Vec<&WeightedAdapter> = inputs.iter().collect();
    ordered.sort_by_key(|a| a.hash);
    let Some(first) = ordered.first() else {
        return Err(AdapterError::NoInputs);
    };
    for pair in ordered.windows(2) {
        if pair[0].hash == pair[1].hash {
            return Err(AdapterError::DuplicateInput { hash: pair[1].hash });
        }
    }
    for input in &ordered {
        input
            .adapter
            .validate()
            .map_err(|e| AdapterError::InvalidInput {
                hash: input.hash,
                source: Box::new(e),
            })?;
    }
    for input in &ordered[1..] {
        check_compatible(first, input)?;
    }
    Ok(ordered)
}

fn check_compatible(
    reference: &WeightedAdapter,
    input: &WeightedAdapter,
) -> Result<(), AdapterError> {
    let differ = |what: String, expected: String, actual: String| AdapterError::Incompatible {
        hash: input.hash,
        reference: Box::new(reference.hash),
        what,
        expected,
        actual,
    };
    let (a, b): (&AdapterConfig, &AdapterConfig) =
        (&reference.adapter.config, &input.adapter.config);
    let fields: [(&str, String, String); 7] = [
        ("peft_type", a.peft_type.clone(), b.peft_type.clone()),
        ("r", a.r.to_string(), b.r.to_string()),
        // `{:?}` prints the shortest text that round-trips: any difference is seen.
        (
            "lora_alpha",
            format!("{:?}", a.lora_alpha),
            format!("{:?}", b.lora_alpha),
        ),
        (
            "use_rslora",
            a.use_rslora.to_string(),
            b.use_rslora.to_string(),
        ),
        (
            "target_modules",
            a.target_modules.to_string(),
            b.target_modules.to_string(),
        ),
        ("bias", a.bias.clone(), b.bias.clone()),
        (
            "fan_in_fan_out",
            a.fan_in_fan_out.to_string(),
            b.fan_in_fan_out.to_string(),
        ),
    ];
    for (field, x, y) in fields {
        if x != y {
            return Err(differ(format!("config `{field}`"), x, y));
        }
    }
    let (ta, tb) = (&reference.adapter.tensors, &input.adapter.tensors);
    if let Some(name) = ta.keys().find(|n| !tb.contains_key(*n)) {
        return Err(differ(
            format!("tensor {name}"),
            "present".into(),
            "missing".into(),
        ));
    }
    if let Some(name) = tb.keys().find(|n| !ta.contains_key(*n)) {
        return Err(differ(
            format!("tensor {name}"),
            "absent".into(),
            "present".into(),
        ));
    }
    for (name, t) in ta {
        if let Some(u) = tb.get(name) {
            if t.shape != u.shape {
                return Err(differ(
                    format!("shape of tensor {name}"),
                    format!("{:?}", t.shape),
                    format!("{:?}", u.shape),
                ));
            }
        }
    }
    Ok(())
}

/// The tensor `name` of `input`; present after [`canonical_inputs`] succeeded.
fn tensor<'a>(
    reference: &WeightedAdapter,
    input: &'a WeightedAdapter,
    name: &str,
) -> Result<&'a LoraTensor, AdapterError> {
    input
        .adapter
        .tensors
        .get(name)
        .ok_or_else(|| AdapterError::Incompatible {
            hash: input.hash,
            reference: Box::new(reference.hash),
            what: format!("tensor {name}"),
            expected: "present".into(),
            actual: "missing".into(),
        })
}

fn finite(name: &str, data: &[f32]) -> Result<(), AdapterError> {
    match data.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(AdapterError::NonFiniteResult {
            tensor: name.to_string(),
            index,
        }),
        None => Ok(()),
    }
}

/// Sample-weighted federated averaging.
///
/// Weight of an input: `w = max(1, min(samples, max_samples_per_input))` (so a claimed
/// count of 0 counts as 1, and nobody outweighs the cap). For every element, in `f32`:
///
/// ```text
/// acc = 0
/// for each input i in ascending hash order: acc += (w_i as f32) * x_i
/// result = acc / (Σ w_i as f32)
/// ```
///
/// The division is one correctly rounded operation per element (chosen over multiplying
/// by a rounded reciprocal, which adds a second rounding). The result's config is the
/// first input's (canonical order); all inputs agree on every field that affects the
/// math.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FedAvg {
    /// Most samples one input is credited with.
    pub max_samples_per_input: u64,
}

impl FedAvg {
    /// The rule's identifier.
    pub const ID: &'static str = "fedavg-v1";
    /// Default cap on the samples credited to one input.
    pub const DEFAULT_MAX_SAMPLES_PER_INPUT: u64 = 100_000;

    /// FedAvg with the given cap.
    pub fn new(max_samples_per_input: u64) -> Self {
        FedAvg {
            max_samples_per_input,
        }
    }

    /// The weight an input claiming `samples` gets.
    pub fn weight(&self, samples: u64) -> u64 {
        samples.min(self.max_samples_per_input).max(1)
    }
}

impl Default for FedAvg {
    fn default() -> Self {
        FedAvg::new(Self::DEFAULT_MAX_SAMPLES_PER_INPUT)
    }
}

impl AggregationRule for FedAvg {
    fn id(&self) -> &'static str {
        Self::ID
    }

    fn aggregate(&self, inputs: &[WeightedAdapter]) -> Result<LoraAdapter, AdapterError> {
        let ordered = canonical_inputs(inputs)?;
        let reference = ordered[0];
        let weights: Vec<f32> = ordered
            .iter()
            .map(|i| self.weight(i.samples) as f32)
            .collect();
        let total = ordered
            .iter()
            .map(|i| u128::from(self.weight(i.samples)))
            .sum::<u128>() as f32;
        let mut tensors = BTreeMap::new();
        for (name, t) in &reference.adapter.tensors {
            let mut acc = vec![0f32; t.data.len()];
            for (input, &w) in ordered.iter().zip(&weights) {
                let x = &tensor(reference, input, name)?.data;
                for (a, &v) in acc.iter_mut().zip(x) {
                    *a += w * v;
                }
            }
            for a in &mut acc {
                *a /= total;
            }
            finite(name, &acc)?;
            tensors.insert(
                name.clone(),
                LoraTensor {
                    shape: t.shape.clone(),
                    data: acc,
                },
            );
        }
        LoraAdapter::new(reference.adapter.config.clone(), tensors)
    }
}

/// Coordinate-wise median, unweighted (sample counts are ignored), robust to a minority
/// of outlying inputs.
///
/// Each element is the middle value of the inputs' values (sorted with
/// [`f32::total_cmp`]); for an even count, `lo / 2 + hi / 2` of the two middle values (no
/// overflow). The result's config is the first input's (canonical order).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Median;

impl Median {
    /// The rule's identifier.
    pub const ID: &'static str = "median-v1";
}

impl AggregationRule for Median {
    fn id(&self) -> &'static str {
        Self::ID
    }

    fn aggregate(&self, inputs: &[WeightedAdapter]) -> Result<LoraAdapter, AdapterError> {
        let ordered = canonical_inputs(inputs)?;
        let reference = ordered[0];
        let n = ordered.len();
        let mut column = Vec::with_capacity(n);
        let mut tensors = BTreeMap::new();
        for (name, t) in &reference.adapter.tensors {
            let sources = ordered
                .iter()
                .map(|i| tensor(reference, i, name).map(|t| &t.data))
                .collect::<Result<Vec<_>, _>>()?;
            let mut out = Vec::with_capacity(t.data.len());
            for j in 0..t.data.len() {
                column.clear();
                column.extend(sources.iter().map(|s| s[j]));
                column.sort_by(f32::total_cmp);
                let m = if n % 2 == 1 {
                    column[n / 2]
                } else {
                    column[n / 2 - 1] / 2.0 + column[n / 2] / 2.0
                };
                out.push(m);
            }
            finite(name, &out)?;
            tensors.insert(
                name.clone(),
                LoraTensor {
                    shape: t.shape.clone(),
                    data: out,
                },
            );
        }
        LoraAdapter::new(reference.adapter.config.clone(), tensors)
    }
}

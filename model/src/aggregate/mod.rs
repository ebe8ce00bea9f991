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
//! sequence of IEEE-754 operations (Rust never contracts `a * b + c` into a fused
//! multiply-add, and the compiler may not reorder float additions); tensors are visited in
//! sorted name order and serialised canonically.
//!
//! The rules average `lora_A` and `lora_B` separately, as FedAvg over LoRA parameters
//! does; the mean of the products `B·A` would need a rank-growing "exact" rule, which, like
//! a trimmed mean, fits the [`AggregationRule`] trait and reuses [`canonical_inputs`].

use hivemind_protocol::Hash;

use crate::adapter::{AdapterConfig, AdapterError, LoraAdapter, LoraTensor};

mod exact;
mod fedavg;
pub(crate) mod linalg;
mod median;
mod parts;
mod regmean;

pub use exact::{stack, ExactMean, GeoMedian, IsoMerge, MergeReport, TsvMerge};
pub use fedavg::FedAvg;
pub use median::Median;
pub use parts::{aggregate_in_parts, IndexedInput};
pub use regmean::regmean;

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

/// How far one input can move a merge, relative to the other inputs of the same round: the
/// robust part of the rules that merge updates ([`ExactMean`], [`IsoMerge`], [`TsvMerge`],
/// [`GeoMedian`]).
///
/// Every bound is a multiple of a median over the round's inputs (the lower median, so the
/// same element on every node), so they need no constant tuned to a model or a dataset, and
/// while most inputs are honest the median is an honest input's: an update scaled x1e6, or a
/// claim of 10^12 samples, counts as at most the bound times an honest one, and an update far
/// from all the others is left out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    /// Each input's update of a module (`‖s·B·A‖_F`, from the factors) is scaled down to at most
    /// this multiple of the median input's norm for that module.
    pub norm_over_median: f64,
    /// Each input's weight (its claimed samples, capped by the rule) is cut to at most this
    /// multiple of the median weight.
    pub weight_over_median: f64,
    /// An input whose (bounded) update of a module has a median distance to the other inputs'
    /// more than this multiple of the median input's is left out of that module's merge (with
    /// [`Bounds::MIN_TO_COMPARE`] inputs or more). Norm and weight bounds limit how far an
    /// input moves a round; this keeps a minority that points elsewhere (a sign flip, a
    /// target of its own, colluders sending one update) from choosing where.
    pub distance_over_median: f64,
}

impl Bounds {
    /// The fewest inputs the distance bound compares: of three, the two that happen to be
    /// alike (two users with similar data) would make the third, honest or not, look far from
    /// the others; from four on, an input's (lower) median distance is small only with about
    /// half of the others near it.
    pub const MIN_TO_COMPARE: usize = 4;
    /// No bound: every input as it comes.
    pub const NONE: Bounds = Bounds {
        norm_over_median: f64::INFINITY,
        weight_over_median: f64::INFINITY,
        distance_over_median: f64::INFINITY,
    };
    /// What networks use: no input counts for more than the median input, in norm or in
    /// weight, and inputs 1.5 times as far from the others as the median input are left out.
    /// An attacker then moves a round about as far as one more honest user would, or,
    /// pointing away from the others, not at all (`model/tests/merge.rs`,
    /// `examples/poison_bench.rs`). The price: users with more data than the median user
    /// weigh as much as the median user; updates larger than the median are shrunk to it;
    /// and the distance bound cannot tell an attacker from an honest minority whose data
    /// differ from the majority's alike (a few users writing in another language, say): such
    /// a group, under half the inputs and farther from the rest than 1.5 times the majority's
    /// own spread, is left out of the modules where it is, every round, and counted in the
    /// round adapter's `hivemind_merge.left_out`.
    pub const ROBUST: Bounds = Bounds {
        norm_over_median: 1.0,
        weight_over_median: 1.0,
        distance_over_median: 1.5,
    };

    /// `values` each cut to `multiple` times their lower median.
    pub(crate) fn cut(values: &[f64], multiple: f64) -> Vec<f64> {
        let limit = lower_median(values) * multiple;
        values.iter().map(|&v| v.min(limit)).collect()
    }
}

/// The lower median of `values` (0 for none): the element at `(n - 1) / 2` in sorted order.
pub(crate) fn lower_median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted
        .get(sorted.len().saturating_sub(1) / 2)
        .copied()
        .unwrap_or(0.0)
}

/// A deterministic way to combine adapters into one.
pub trait AggregationRule {
    /// A stable identifier, carried in round digests (e.g. `fedavg-v2`).
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
pub(crate) fn tensor<'a>(
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

pub(crate) fn finite(name: &str, data: &[f32]) -> Result<(), AdapterError> {
    match data.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(AdapterError::NonFiniteResult {
            tensor: name.to_string(),
            index,
        }),
        None => Ok(()),
    }
}

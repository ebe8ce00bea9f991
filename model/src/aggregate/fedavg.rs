//! [`FedAvg`]: the sample-weighted mean of `lora_A` and of `lora_B`, each on its own.

use std::collections::BTreeMap;

use super::{canonical_inputs, finite, tensor, AggregationRule, WeightedAdapter};
use crate::adapter::{AdapterError, LoraAdapter, LoraTensor};

/// Sample-weighted federated averaging.
///
/// Weight of an input: `w = max(1, min(samples, max_samples_per_input))` (so a claimed
/// count of 0 counts as 1, and nobody outweighs the cap). For every element, in `f64`:
///
/// ```text
/// acc = 0
/// for each input i in ascending hash order: acc += (w_i as f64) * (x_i as f64)
/// result = (acc / (Σ w_i as f64)) as f32
/// ```
///
/// The division is one correctly rounded operation per element (chosen over multiplying
/// by a rounded reciprocal, which adds a second rounding). A weighted mean lies between the
/// inputs, so finite inputs always give a finite result: no input can make it fail. The result's config is the
/// first input's (canonical order); all inputs agree on every field that affects the
/// math.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FedAvg {
    /// Most samples one input is credited with.
    pub max_samples_per_input: u64,
}

impl FedAvg {
    /// The rule's identifier.
    pub const ID: &'static str = "fedavg-v2";
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
        // f64 throughout: a weighted mean of finite f32 values lies between them, so it is
        // finite again in f32; summed in f32, values near f32::MAX overflowed and the
        // aggregation failed on every node (a halted round).
        let weights: Vec<f64> = ordered
            .iter()
            .map(|i| self.weight(i.samples) as f64)
            .collect();
        let total = ordered
            .iter()
            .map(|i| u128::from(self.weight(i.samples)))
            .sum::<u128>() as f64;
        let mut tensors = BTreeMap::new();
        for (name, t) in &reference.adapter.tensors {
            let mut acc = vec![0f64; t.data.len()];
            for (input, &w) in ordered.iter().zip(&weights) {
                let x = &tensor(reference, input, name)?.data;
                for (a, &v) in acc.iter_mut().zip(x) {
                    *a += w * f64::from(v);
                }
            }
            let acc: Vec<f32> = acc.iter().map(|a| (a / total) as f32).collect();
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

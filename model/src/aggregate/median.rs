//! [`Median`]: the coordinate-wise median of the inputs' factors.

use std::collections::BTreeMap;

use super::{canonical_inputs, finite, tensor, AggregationRule, WeightedAdapter};
use crate::adapter::{AdapterError, LoraAdapter, LoraTensor};

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

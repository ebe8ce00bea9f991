//! The shape of the network's model that every adapter must fit.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::names::LoraSide;

/// Dimensions of one adapted linear layer in the Hugging Face layout (weight `[out, in]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ModuleDims {
    /// Output features (rows of the base weight).
    pub out_features: usize,
    /// Input features (columns of the base weight).
    pub in_features: usize,
}

/// What the network's model expects of every adapter: the LoRA rank, the adapted module
/// kinds with their dimensions, and the number of decoder layers (every layer adapted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdapterShape {
    /// LoRA rank.
    pub rank: usize,
    /// Number of decoder layers; adapters must cover layers `0..num_layers`.
    pub num_layers: usize,
    /// Module kind (last component of the module path, e.g. `q_proj`) to its dimensions;
    /// the keys, in order, are the sorted target modules.
    pub modules: BTreeMap<String, ModuleDims>,
}

impl AdapterShape {
    /// The sorted target module names.
    pub fn target_modules(&self) -> Vec<&str> {
        self.modules.keys().map(String::as_str).collect()
    }

    /// The expected tensor shape: `[rank, in]` for A, `[out, rank]` for B.
    pub fn expected_shape(&self, dims: ModuleDims, side: LoraSide) -> Vec<usize> {
        match side {
            LoraSide::A => vec![self.rank, dims.in_features],
            LoraSide::B => vec![dims.out_features, self.rank],
        }
    }
}

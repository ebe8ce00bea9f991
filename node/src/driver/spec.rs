//! [`NetSpec`]: what every adapter of a network must be, and the check a fetched adapter
//! passes before it may be aggregated.

use std::path::Path;

use hivemind_model::adapter::{AdapterConfig, AdapterShape, Limits, LoraAdapter, TargetModules};
use hivemind_protocol::Hash;
use hivemind_store::Store;

use crate::error::{Error, Result};

/// is not (so that it is neither served nor aggregated).
pub fn check_adapter_blob(store: &Store, spec: &NetSpec, hash: &Hash) -> Result<()> {
    let bytes = store.get_blob(hash)?.ok_or_else(|| Error::NotOfNetwork {
        detail: format!("adapter {hash} is not in the store"),
    })?;
    let parsed = spec.parse(&bytes, &Limits::DEFAULT).map(|_| ());
    if parsed.is_err() {
        let _ = store.remove_blob(hash);
    }
    parsed
}

/// What every adapter of a network must be: its LoRA config (rank, alpha, target modules)
/// and, from the base model's shape, the tensor shapes of every layer.
#[derive(Clone, Debug)]
pub struct NetSpec {
    /// The LoRA config adapters are read with and exported with.
    pub config: AdapterConfig,
    /// Expected tensors.
    pub shape: AdapterShape,
}

impl NetSpec {
    /// The spec of `rank`/`alpha`/`target_modules` adapters on the model at `model_path`
    /// (reads only the GGUF header or config.json).
    pub fn for_model(
        model_path: &Path,
        rank: usize,
        alpha: f64,
        target_modules: &[String],
    ) -> Result<NetSpec> {
        let config = AdapterConfig::new(
            rank,
            alpha,
            TargetModules::from_names(target_modules.iter().cloned()),
        );
        config.validate()?;
        let names = config.target_modules.names().unwrap_or_default().to_vec();
        let shape = hivemind_model::read_config(model_path)?.adapter_shape(rank, &names)?;
        Ok(NetSpec { config, shape })
    }

    /// Whether `adapter` (e.g. read from a PEFT dir) fits: same alpha, and rank, modules and
    /// every tensor shape as the network expects.
    pub fn check(&self, adapter: &LoraAdapter) -> Result<()> {
        if adapter.config.lora_alpha != self.config.lora_alpha {
            return Err(Error::NotOfNetwork {
                detail: format!(
                    "lora_alpha is {}, this network uses {}",
                    adapter.config.lora_alpha, self.config.lora_alpha
                ),
            });
        }
        adapter
            .check_shape(&self.shape)
            .map_err(|e| Error::NotOfNetwork {
                detail: e.to_string(),
            })
    }

    /// The most bytes an adapter of this network can take as safetensors: every tensor in
    /// F32 (the widest dtype adapters may use) plus the largest header
    /// [`Limits::DEFAULT`] accepts and its 8-byte length prefix.
    pub fn max_adapter_bytes(&self) -> u64 {
        let per_layer: u64 = self
            .shape
            .modules
            .values()
            .map(|d| (self.shape.rank * (d.in_features + d.out_features)) as u64)
            .sum();
        per_layer * self.shape.num_layers as u64 * 4 + Limits::DEFAULT.max_header_bytes + 8
    }

    /// Parses untrusted safetensors bytes as an adapter of this network.
    pub fn parse(&self, bytes: &[u8], limits: &Limits) -> Result<LoraAdapter> {
        let adapter = LoraAdapter::from_safetensors_bytes(self.config.clone(), bytes, limits)
            .map_err(|e| Error::NotOfNetwork {
                detail: e.to_string(),
            })?;
        self.check(&adapter)?;
        Ok(adapter)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use hivemind_model::config::Arch;
    use hivemind_model::testing::{random_adapter, TinyModel};

    #[test]
    fn max_adapter_bytes_bounds_real_adapters_tightly() {
        let names = ["q_proj".to_string(), "down_proj".to_string()];
        let shape = TinyModel::new(Arch::Llama, 1)
            .unwrap()
            .cfg
            .adapter_shape(8, &names)
            .unwrap();
        let config = AdapterConfig::new(8, 16.0, TargetModules::from_names(names.clone()));
        let spec = NetSpec {
            config,
            shape: shape.clone(),
        };
        let adapter = random_adapter(&shape, 16.0, 3).unwrap();
        let meta = BTreeMap::from([
            ("hivemind.round".to_string(), "7".to_string()),
            (
                "hivemind.parent".to_string(),
                Hash::of(b"parent").to_string(),
            ),
        ]);
        let bytes = adapter.to_safetensors_bytes_with_metadata(&meta).unwrap();
        let bound = spec.max_adapter_bytes();
        assert!(bytes.len() as u64 <= bound, "{} > {bound}", bytes.len());
        // The bound is the F32 payload plus the header allowance, nothing more.
        let payload: usize = adapter.tensors.values().map(|t| t.data.len() * 4).sum();
        assert_eq!(bound, payload as u64 + Limits::DEFAULT.max_header_bytes + 8);
    }
}

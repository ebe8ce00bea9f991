//! Applying a PEFT LoRA adapter to a loaded decoder, and merging it into dense weights.
//!
//! Adapter tensors are named as PEFT writes them for a causal LM:
//! `base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight`, with A `[r, in]`
//! and B `[out, r]` in the Hugging Face layout, which is the layout the decoder keeps.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};

use crate::adapter::LoraAdapter;
use crate::decoder::{Decoder, LoraPair, Weight};
use crate::error::{ModelError, Result};
use crate::module::Module;

/// The PEFT name of a LoRA tensor: `which` is `"A"` or `"B"`.
pub fn peft_name(layer: usize, module: Module, which: &str) -> String {
    let block = module.block();
    format!("base_model.model.model.layers.{layer}.{block}.{module}.lora_{which}.weight")
}

/// Splits a PEFT name into `(layer, module, "A" | "B")`; `None` unless the module sits in its
/// own block (`self_attn.q_proj`, `mlp.up_proj`).
pub fn parse_peft_name(name: &str) -> Option<(usize, Module, &str)> {
    let rest = name.strip_prefix("base_model.model.model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (block, rest) = rest.split_once('.')?;
    let (module, rest) = rest.split_once('.')?;
    let module: Module = module.parse().ok()?;
    let which = rest.strip_prefix("lora_")?.strip_suffix(".weight")?;
    if block != module.block() || !(which == "A" || which == "B") {
        return None;
    }
    Some((layer, module, which))
}

/// The adapter's `(lora_A, lora_B)` pairs as tensors, by layer and module; fails on a tensor
/// that names no decoder layer's module or a pair with a side missing (shapes are the caller's
/// to check).
pub(crate) fn lora_pairs(
    adapter: &LoraAdapter,
) -> Result<BTreeMap<(usize, Module), (Tensor, Tensor)>> {
    let mut halves: BTreeMap<(usize, Module), (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    for (name, t) in &adapter.tensors {
        let (layer, module, which) =
            parse_peft_name(name).ok_or_else(|| ModelError::AdapterMismatch {
                reason: format!("tensor {name} is not a LoRA weight of a decoder layer"),
            })?;
        let tensor = Tensor::from_slice(&t.data, t.shape.as_slice(), &Device::Cpu)?;
        let e = halves.entry((layer, module)).or_default();
        if which == "A" {
            e.0 = Some(tensor);
        } else {
            e.1 = Some(tensor);
        }
    }
    halves
        .into_iter()
        .map(|((layer, module), (a, b))| match (a, b) {
            (Some(a), Some(b)) => Ok(((layer, module), (a, b))),
            _ => Err(ModelError::AdapterMismatch {
                reason: format!("layer {layer} {module} lacks its lora_A or lora_B"),
            }),
        })
        .collect()
}

impl Decoder {
    /// Puts `adapter`'s LoRA pairs on the matching layers (replacing any present). Every tensor must
    /// name a layer and module of this model with matching shapes.
    pub fn apply_adapter(&mut self, adapter: &LoraAdapter) -> Result<()> {
        let scale = adapter.config.scaling();
        let mut staged = Vec::new();
        for ((layer, module), (a, b)) in lora_pairs(adapter)? {
            let lin = self
                .layers
                .get(layer)
                .map(|l| l.module(module))
                .ok_or_else(|| ModelError::AdapterMismatch {
                    reason: format!(
                        "layer {layer} {module} does not exist (model has {} layers)",
                        self.cfg.num_layers
                    ),
                })?;
            let (out, inp) = lin.weight.dims()?;
            let (ra, ia) = a.dims2()?;
            let (ob, rb) = b.dims2()?;
            if ia != inp || ob != out || ra != rb {
                return Err(ModelError::AdapterMismatch {
                    reason: format!(
                        "layer {layer} {module}: A is [{ra}, {ia}] and B is [{ob}, {rb}], the weight is [{out}, {inp}]"
                    ),
                });
            }
            staged.push((layer, module, LoraPair { a, b, scale }));
        }
        self.remove_adapter();
        for (layer, module, pair) in staged {
            self.layers[layer].module_mut(module).lora = Some(pair);
        }
        Ok(())
    }

    /// Removes every LoRA pair.
    pub fn remove_adapter(&mut self) {
        for layer in &mut self.layers {
            for m in Module::ALL {
                layer.module_mut(m).lora = None;
            }
        }
    }

    /// A copy with every LoRA pair merged into dense f32 base weights: `W + scale * B A`.
    pub fn merged_dense(&self) -> Result<Decoder> {
        let mut out = self.clone();
        for layer in &mut out.layers {
            for m in Module::ALL {
                let lin = layer.module_mut(m);
                let mut w = lin.weight.dequantize()?;
                if let Some(l) = lin.lora.take() {
                    w = (w + (l.b.matmul(&l.a)? * l.scale)?)?;
                }
                lin.weight = Weight::Dense(w);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_names_round_trip() {
        for m in Module::ALL {
            for w in ["A", "B"] {
                let n = peft_name(3, m, w);
                assert_eq!(parse_peft_name(&n), Some((3, m, w)));
            }
        }
        assert_eq!(
            parse_peft_name("base_model.model.lm_head.lora_A.weight"),
            None
        );
        assert_eq!(
            parse_peft_name("base_model.model.model.layers.0.self_attn.x_proj.lora_A.weight"),
            None
        );
        assert_eq!(
            parse_peft_name("base_model.model.model.layers.0.mlp.q_proj.lora_A.weight"),
            None
        );
    }
}

//! PEFT LoRA adapters: the interop format of HiveMind, read from untrusted bytes and
//! written canonically.
//!
//! This module owns the two files of a PEFT adapter directory and the checks on them:
//!
//! ```text
//!  adapter dir ──read_dir──▶ AdapterConfig (adapter_config.json)
//!                            + parse_safetensors (adapter_model.safetensors, capped by Limits)
//!                            ──▶ LoraAdapter ──check_shape(AdapterShape)──▶ fits the network's model
//!  LoraAdapter ──to_safetensors_bytes──▶ canonical bytes (hashed, announced, aggregated)
//! ```
//!
//! Tensor names follow PEFT and the Hugging Face layout of the base model:
//! `base_model.model.<module path>.lora_A.weight` with shape `[r, in]` and
//! `base_model.model.<module path>.lora_B.weight` with shape `[out, r]`. Names PEFT writes
//! with the adapter name (`...lora_A.default.weight`) are normalised on read.
//!
//! Files: `config` (adapter_config.json), `names` (tensor names and pairing), `parse`
//! (untrusted safetensors bytes), `shape` (what the network's model expects), `error`; the
//! adapter itself and its canonical bytes live here.
//!
//! # Canonical safetensors layout
//!
//! [`LoraAdapter::to_safetensors_bytes`] writes bytes that depend only on the tensors'
//! names, shapes and values:
//!
//! 1. 8 bytes: `N`, the header length, as a little-endian `u64`; `N` is a multiple of 8.
//! 2. `N` bytes: the header, compact JSON (no whitespace) with every object's keys in
//!    byte-sorted order, followed by ASCII spaces up to `N` (the safetensors spec allows
//!    trailing spaces so that the data starts 8-byte aligned):
//!    `{"__metadata__":{"format":"pt"},"<name>":{"data_offsets":[b,e],"dtype":"F32","shape":[d0,d1]},...}`
//!    with tensors in byte-sorted name order (`__metadata__` sorts first because every
//!    tensor name starts with `base_model`), integers in plain decimal.
//! 3. The data: each tensor's values as little-endian `f32`, row-major, in the same
//!    sorted name order, packed without gaps; offsets are relative to the data start.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::path::Path;

use hivemind_protocol::Hash;

/// File name of the PEFT adapter configuration inside an adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// File name of the PEFT adapter weights inside an adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Prefix PEFT puts before the base model's module path.
const NAME_PREFIX: &str = "base_model.model.";
/// Longest tensor name accepted.
const MAX_NAME_LEN: usize = 1024;
/// Largest `adapter_config.json` read from disk.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

mod config;
mod error;
mod names;
mod parse;
mod shape;

pub use config::{AdapterConfig, TargetModules};
pub use error::AdapterError;
pub use names::{LoraSide, LoraTensor};
pub use parse::{parse_safetensors, Limits, SafetensorsIndex};
pub use shape::{AdapterShape, ModuleDims};

use error::Result;
use names::{check_tensors, locate_module, split_name};

/// A PEFT LoRA adapter in memory: its config and its A/B matrices by canonical name.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraAdapter {
    /// `adapter_config.json`.
    pub config: AdapterConfig,
    /// Canonical tensor names (`base_model.model.<module>.lora_{A,B}.weight`) to values.
    pub tensors: BTreeMap<String, LoraTensor>,
}

impl LoraAdapter {
    /// Builds and validates an adapter (see [`LoraAdapter::validate`]).
    pub fn new(config: AdapterConfig, tensors: BTreeMap<String, LoraTensor>) -> Result<Self> {
        let adapter = LoraAdapter { config, tensors };
        adapter.validate()?;
        Ok(adapter)
    }

    /// The canonical name of a LoRA weight: `base_model.model.<module_path>.lora_A.weight`
    /// (or `lora_B`), `module_path` in the Hugging Face layout, e.g.
    /// `model.layers.0.self_attn.q_proj`.
    pub fn tensor_name(module_path: &str, side: LoraSide) -> String {
        format!("{NAME_PREFIX}{module_path}{}", side.suffix())
    }

    /// Checks the config and the tensors: canonical LoRA names, 2-D shapes matching the
    /// data, finite values, complete A/B pairs, every rank equal to `config.r`.
    pub fn validate(&self) -> Result<()> {
        self.config.validate()?;
        for (path, rank) in check_tensors(&self.tensors)? {
            if rank != self.config.r {
                return Err(AdapterError::RankMismatch {
                    tensor: Self::tensor_name(path, LoraSide::A),
                    expected: self.config.r,
                    actual: rank,
                });
            }
        }
        Ok(())
    }

    /// Parses untrusted safetensors bytes (see [`parse_safetensors`]) and pairs them with
    /// `config`, checking that the ranks match it.
    pub fn from_safetensors_bytes(
        config: AdapterConfig,
        bytes: &[u8],
        limits: &Limits,
    ) -> Result<Self> {
        let tensors = parse_safetensors(bytes, limits)?;
        LoraAdapter::new(config, tensors)
    }

    /// Parses untrusted safetensors bytes of a merged adapter ([`AdapterConfig::unit_scaled`]):
    /// its rank is read from its tensors, the rest of its config is `base`'s.
    pub fn from_merged_bytes(base: &AdapterConfig, bytes: &[u8], limits: &Limits) -> Result<Self> {
        let tensors = parse_safetensors(bytes, limits)?;
        let rank = tensors
            .iter()
            .find(|(n, _)| n.ends_with(LoraSide::A.suffix()))
            .map_or(base.r, |(_, t)| t.shape[0]);
        LoraAdapter::new(base.unit_scaled(rank), tensors)
    }

    /// The canonical safetensors bytes (layout in the module docs). Equal adapters give
    /// equal bytes on every machine.
    pub fn to_safetensors_bytes(&self) -> Result<Vec<u8>> {
        self.to_safetensors_bytes_with_metadata(&BTreeMap::new())
    }

    /// Canonical bytes whose `__metadata__` also holds `extra` (besides `"format":"pt"`),
    /// keys in byte order. A round adapter binds its round and parent this way, so its
    /// hash names its place in the chain. Keys and values must be 1 to 256 characters of
    /// ASCII letters, digits, `.`, `_`, `-` or `:` (nothing to escape); `format` is
    /// reserved.
    pub fn to_safetensors_bytes_with_metadata(
        &self,
        extra: &BTreeMap<String, String>,
    ) -> Result<Vec<u8>> {
        self.validate()?;
        let plain = |s: &str| {
            (1..=256).contains(&s.len())
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b))
        };
        let mut meta: BTreeMap<&str, &str> = BTreeMap::new();
        meta.insert("format", "pt");
        for (k, v) in extra {
            if !plain(k) || !plain(v) || k == "format" {
                return Err(AdapterError::InvalidHeader {
                    reason: format!(
                        "metadata entry {k:?}: {v:?} is not plain ASCII or is reserved"
                    ),
                });
            }
            meta.insert(k, v);
        }
        let mut header = String::with_capacity(64 + 128 * self.tensors.len());
        header.push_str("{\"__metadata__\":{");
        for (i, (k, v)) in meta.iter().enumerate() {
            if i > 0 {
                header.push(',');
            }
            header.push_str(&format!("\"{k}\":\"{v}\""));
        }
        header.push('}');
        let mut offset = 0usize;
        for (name, t) in &self.tensors {
            let end = offset + 4 * t.data.len();
            // Names are validated: ASCII letters, digits, '_', '-', '.', nothing to escape.
            header.push_str(&format!(
                r#","{name}":{{"data_offsets":[{offset},{end}],"dtype":"F32","shape":[{},{}]}}"#,
                t.shape[0], t.shape[1]
            ));
            offset = end;
        }
        header.push('}');
        while !header.len().is_multiple_of(8) {
            header.push(' ');
        }
        let mut out = Vec::with_capacity(8 + header.len() + offset);
        out.extend_from_slice(&(header.len() as u64).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        for t in self.tensors.values() {
            for v in &t.data {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        Ok(out)
    }

    /// The blake3 hash of [`LoraAdapter::to_safetensors_bytes`].
    pub fn canonical_hash(&self) -> Result<Hash> {
        Ok(Hash::of(&self.to_safetensors_bytes()?))
    }

    /// Reads a PEFT adapter directory with [`Limits::DEFAULT`].
    pub fn read_dir(dir: impl AsRef<Path>) -> Result<Self> {
        Self::read_dir_with_limits(dir, &Limits::DEFAULT)
    }

    /// Reads a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`),
    /// refusing files over `limits` before reading them.
    pub fn read_dir_with_limits(dir: impl AsRef<Path>, limits: &Limits) -> Result<Self> {
        let dir = dir.as_ref();
        let config = read_capped(&dir.join(CONFIG_FILE), MAX_CONFIG_BYTES)?;
        let config = AdapterConfig::from_json(&config)?;
        let weights = read_capped(&dir.join(WEIGHTS_FILE), limits.max_bytes)?;
        LoraAdapter::from_safetensors_bytes(config, &weights, limits)
    }

    /// Writes a PEFT adapter directory (created if missing): each file goes to a temporary
    /// name, is synced, then renamed over the final name, weights first, then config.
    pub fn write_dir(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| AdapterError::Io { path, source }
        };
        let weights = self.to_safetensors_bytes()?;
        let config = self.config.to_json()?;
        fs::create_dir_all(dir).map_err(io(dir))?;
        for (name, bytes) in [(WEIGHTS_FILE, &weights), (CONFIG_FILE, &config)] {
            let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
            let dest = dir.join(name);
            let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(bytes).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
            drop(f);
            fs::rename(&tmp, &dest).map_err(io(&dest))?;
        }
        // Make the renames durable; directories cannot be opened for syncing everywhere.
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// An adapter of `shape` whose factors are all zero: it changes nothing (a round whose
    /// every input was excluded and that has no parent to keep).
    pub fn zeros(config: AdapterConfig, shape: &AdapterShape) -> Result<Self> {
        let tensors = tensor_layout(shape)?
            .into_iter()
            .map(|(name, shape)| {
                let data = vec![0.0; shape.iter().product()];
                (name, LoraTensor { shape, data })
            })
            .collect();
        LoraAdapter::new(config, tensors)
    }

    /// Checks that the adapter fits the network's model: rank and target modules of the
    /// config, and for every layer and target module an A/B pair of the expected shapes.
    /// The first difference is reported, naming the tensor and both shapes.
    pub fn check_shape(&self, expected: &AdapterShape) -> Result<()> {
        if self.config.r != expected.rank {
            return Err(AdapterError::ConfigMismatch {
                field: "r",
                expected: expected.rank.to_string(),
                actual: self.config.r.to_string(),
            });
        }
        if let TargetModules::Names(names) = &self.config.target_modules {
            if !names.iter().eq(expected.modules.keys()) {
                return Err(AdapterError::ConfigMismatch {
                    field: "target_modules",
                    expected: format!("{:?}", expected.target_modules()),
                    actual: format!("{names:?}"),
                });
            }
        }
        let mut seen = BTreeSet::new();
        for (name, t) in &self.tensors {
            let (path, side) = split_name(name).ok_or_else(|| AdapterError::NotLora {
                tensor: name.clone(),
            })?;
            let (layer, kind) =
                locate_module(path).ok_or_else(|| AdapterError::UnexpectedModule {
                    tensor: name.clone(),
                    module: path.to_string(),
                })?;
            let dims =
                expected
                    .modules
                    .get(kind)
                    .ok_or_else(|| AdapterError::UnexpectedModule {
                        tensor: name.clone(),
                        module: kind.to_string(),
                    })?;
            if layer >= expected.num_layers {
                return Err(AdapterError::LayerOutOfRange {
                    tensor: name.clone(),
                    layer,
                    num_layers: expected.num_layers,
                });
            }
            let want = expected.expected_shape(*dims, side);
            if t.shape != want {
                return Err(AdapterError::ShapeMismatch {
                    tensor: name.clone(),
                    expected: want,
                    actual: t.shape.clone(),
                });
            }
            if !seen.insert((layer, kind, side)) {
                return Err(AdapterError::DuplicateModule {
                    tensor: name.clone(),
                });
            }
        }
        for layer in 0..expected.num_layers {
            for module in expected.modules.keys() {
                if !seen.contains(&(layer, module.as_str(), LoraSide::A)) {
                    return Err(AdapterError::MissingModule {
                        layer,
                        module: module.clone(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// Reads a whole file, refusing it if it is longer than `max` bytes.
fn read_capped(path: &Path, max: u64) -> Result<Vec<u8>> {
    let io = |source| AdapterError::Io {
        path: path.to_path_buf(),
        source,
    };
    let f = fs::File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    if len > max {
        return Err(AdapterError::TooLarge { len, max });
    }
    let mut out = Vec::with_capacity(len as usize);
    // `take` guards against a file that grows after the metadata call.
    f.take(max.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(io)?;
    if out.len() as u64 > max {
        return Err(AdapterError::TooLarge {
            len: out.len() as u64,
            max,
        });
    }
    Ok(out)
}

/// Every tensor an adapter of `shape` holds, by canonical name, with its dimensions: `A`
/// and `B` of each adapted module of each layer.
pub fn tensor_layout(shape: &AdapterShape) -> Result<Vec<(String, Vec<usize>)>> {
    let mut out = Vec::new();
    for layer in 0..shape.num_layers {
        for (kind, dims) in &shape.modules {
            let module: crate::Module =
                kind.parse()
                    .map_err(|_: crate::UnknownModule| AdapterError::UnexpectedModule {
                        tensor: format!("layer {layer}"),
                        module: kind.clone(),
                    })?;
            for (side, which) in [(LoraSide::A, "A"), (LoraSide::B, "B")] {
                out.push((
                    crate::lora::peft_name(layer, module, which),
                    shape.expected_shape(*dims, side),
                ));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn metadata_is_bound_into_the_bytes_and_parses_back() {
        let cfg = AdapterConfig::new(1, 2.0, TargetModules::from_names(["q_proj"]));
        let mut tensors = BTreeMap::new();
        for (side, shape) in [(LoraSide::A, [1, 2]), (LoraSide::B, [2, 1])] {
            tensors.insert(
                LoraAdapter::tensor_name("model.layers.0.self_attn.q_proj", side),
                LoraTensor {
                    shape: shape.to_vec(),
                    data: vec![0.5, -1.0],
                },
            );
        }
        let a = LoraAdapter::new(cfg.clone(), tensors).unwrap();
        let plain = a.to_safetensors_bytes().unwrap();
        let meta = |round: &str| {
            BTreeMap::from([
                ("hivemind.round".to_string(), round.to_string()),
                ("hivemind.parent".to_string(), "none".to_string()),
            ])
        };
        let r1 = a.to_safetensors_bytes_with_metadata(&meta("1")).unwrap();
        let r2 = a.to_safetensors_bytes_with_metadata(&meta("2")).unwrap();
        assert_ne!(plain, r1);
        assert_ne!(r1, r2);
        let header_len = u64::from_le_bytes(r1[..8].try_into().unwrap()) as usize;
        assert_eq!(header_len % 8, 0);
        let header = std::str::from_utf8(&r1[8..8 + header_len])
            .unwrap()
            .trim_end();
        assert!(header.starts_with(
            r#"{"__metadata__":{"format":"pt","hivemind.parent":"none","hivemind.round":"1"},"#
        ));
        let back = LoraAdapter::from_safetensors_bytes(cfg, &r1, &Limits::DEFAULT).unwrap();
        assert_eq!(back, a);
        for bad in [("format", "x"), ("k", "a\"b"), ("", "v")] {
            let m = BTreeMap::from([(bad.0.to_string(), bad.1.to_string())]);
            assert!(a.to_safetensors_bytes_with_metadata(&m).is_err(), "{bad:?}");
        }
    }
}

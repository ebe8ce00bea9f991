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
use std::fmt;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

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
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Everything that can go wrong reading, writing, checking or aggregating adapters.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdapterError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `adapter_config.json` is not valid JSON for an [`AdapterConfig`].
    #[error("invalid adapter config JSON: {source}")]
    ConfigJson {
        /// The parse error.
        source: serde_json::Error,
    },
    /// A config field holds a value HiveMind does not support.
    #[error("adapter config field `{field}` is {value}, expected {expected}")]
    InvalidConfig {
        /// The field name.
        field: &'static str,
        /// The value found.
        value: String,
        /// What is accepted.
        expected: &'static str,
    },
    /// The input is larger than the limit.
    #[error("input of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Length of the input.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The file ends before its header does.
    #[error("truncated safetensors file: {len} bytes, at least {needed} needed")]
    Truncated {
        /// Length of the input.
        len: u64,
        /// Length the header requires.
        needed: u64,
    },
    /// The header length exceeds the limit.
    #[error("safetensors header of {len} bytes exceeds the limit of {max} bytes")]
    HeaderTooLarge {
        /// Declared header length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The header is not a valid safetensors JSON header.
    #[error("invalid safetensors header: {reason}")]
    InvalidHeader {
        /// What is wrong.
        reason: String,
    },
    /// The header lists more tensors than the limit.
    #[error("{count} tensors exceed the limit of {max}")]
    TooManyTensors {
        /// Number of tensors in the header (at least this many).
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The file holds no tensors.
    #[error("the adapter holds no tensors")]
    NoTensors,
    /// A tensor's dtype is not F32, F16 or BF16.
    #[error("tensor {tensor}: unsupported dtype {dtype} (expected F32, F16 or BF16)")]
    UnsupportedDtype {
        /// The tensor name as found.
        tensor: String,
        /// The dtype as found.
        dtype: String,
    },
    /// A tensor is not a 2-D matrix with non-zero dimensions.
    #[error("tensor {tensor}: shape {shape:?} is not a non-empty 2-D matrix")]
    BadShape {
        /// The tensor name.
        tensor: String,
        /// The shape found.
        shape: Vec<u64>,
    },
    /// A tensor's byte range does not match its dtype and shape.
    #[error("tensor {tensor}: {actual} data bytes, but dtype and shape need {expected}")]
    SizeMismatch {
        /// The tensor name.
        tensor: String,
        /// Bytes the dtype and shape need.
        expected: u64,
        /// Bytes the offsets give.
        actual: u64,
    },
    /// A tensor's byte range is reversed, overlaps another or leaves a gap.
    #[error("tensor {tensor}: data offsets [{begin}, {end}] {reason}")]
    BadOffsets {
        /// The tensor name.
        tensor: String,
        /// Declared start.
        begin: u64,
        /// Declared end.
        end: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// A tensor's data runs past the end of the file.
    #[error("tensor {tensor}: data ends at {end}, past the {data_len} data bytes in the file")]
    DataOutOfRange {
        /// The tensor name.
        tensor: String,
        /// Declared end (relative to the data start).
        end: u64,
        /// Bytes of data in the file.
        data_len: u64,
    },
    /// Bytes after the last tensor's data.
    #[error("{extra} bytes after the last tensor's data")]
    TrailingBytes {
        /// How many.
        extra: u64,
    },
    /// A tensor name is not a PEFT LoRA A/B weight name.
    #[error(
        "tensor {tensor}: not a LoRA weight (expected base_model.model.<module>.lora_A.weight or .lora_B.weight)"
    )]
    NotLora {
        /// The tensor name as found.
        tensor: String,
    },
    /// Two tensors with the same (normalised) name.
    #[error("tensor {tensor} appears more than once")]
    DuplicateTensor {
        /// The normalised name.
        tensor: String,
    },
    /// A LoRA A without its B, or a B without its A.
    #[error("tensor {tensor} has no partner {missing}")]
    MissingPair {
        /// The tensor present.
        tensor: String,
        /// The partner that is missing.
        missing: String,
    },
    /// A tensor's LoRA rank differs from its partner's or from the config's `r`.
    #[error("tensor {tensor}: LoRA rank {actual}, expected {expected}")]
    RankMismatch {
        /// The tensor name.
        tensor: String,
        /// Rank expected.
        expected: usize,
        /// Rank found.
        actual: usize,
    },
    /// A NaN or infinite value.
    #[error("tensor {tensor}: non-finite value at index {index}")]
    NonFinite {
        /// The tensor name.
        tensor: String,
        /// Flat index of the first such value.
        index: usize,
    },
    /// A tensor's data length does not match its shape (in-memory adapters only).
    #[error("tensor {tensor}: {actual} values for shape {shape:?} ({expected} expected)")]
    DataLength {
        /// The tensor name.
        tensor: String,
        /// The shape.
        shape: Vec<usize>,
        /// Values the shape needs.
        expected: usize,
        /// Values present.
        actual: usize,
    },
    /// The adapter's config disagrees with the network's model.
    #[error("adapter config `{field}` is {actual}, the network's model expects {expected}")]
    ConfigMismatch {
        /// The config field.
        field: &'static str,
        /// Expected value.
        expected: String,
        /// Value found.
        actual: String,
    },
    /// A tensor's shape disagrees with the network's model.
    #[error("tensor {tensor}: shape {actual:?}, the network's model expects {expected:?}")]
    ShapeMismatch {
        /// The tensor name.
        tensor: String,
        /// Expected shape.
        expected: Vec<usize>,
        /// Shape found.
        actual: Vec<usize>,
    },
    /// A tensor targets a module the network's model does not adapt.
    #[error("tensor {tensor}: module `{module}` is not adapted by the network's model")]
    UnexpectedModule {
        /// The tensor name.
        tensor: String,
        /// The module (kind or path) found.
        module: String,
    },
    /// A tensor targets a layer past the model's last.
    #[error("tensor {tensor}: layer {layer}, but the network's model has {num_layers} layers")]
    LayerOutOfRange {
        /// The tensor name.
        tensor: String,
        /// Layer index found.
        layer: usize,
        /// Layers in the model.
        num_layers: usize,
    },
    /// Two tensors adapt the same (layer, module kind).
    #[error("tensor {tensor} adapts a (layer, module) already adapted by another tensor")]
    DuplicateModule {
        /// The tensor name.
        tensor: String,
    },
    /// A (layer, module kind) the network's model adapts has no LoRA pair.
    #[error("no LoRA weights for module `{module}` of layer {layer}")]
    MissingModule {
        /// Layer index.
        layer: usize,
        /// Module kind.
        module: String,
    },
    /// Aggregation over zero inputs.
    #[error("aggregation needs at least one input adapter")]
    NoInputs,
    /// The same adapter hash given twice to an aggregation.
    #[error("adapter {hash} is given more than once")]
    DuplicateInput {
        /// The repeated hash.
        hash: Hash,
    },
    /// An aggregation input is not a valid adapter.
    #[error("adapter {hash} is invalid: {source}")]
    InvalidInput {
        /// The input's hash.
        hash: Hash,
        /// Why it is invalid.
        source: Box<AdapterError>,
    },
    /// An aggregation input differs from the first input (in canonical order).
    #[error("adapter {hash} is incompatible with adapter {reference}: {what} is {actual}, expected {expected}")]
    Incompatible {
        /// The differing input.
        hash: Hash,
        /// The first input in canonical (hash) order (boxed to keep the error small).
        reference: Box<Hash>,
        /// What differs (a config field or a tensor).
        what: String,
        /// The reference's value.
        expected: String,
        /// The differing input's value.
        actual: String,
    },
    /// An aggregation produced a NaN or infinite value (overflow).
    #[error("aggregation produced a non-finite value in tensor {tensor} at index {index}")]
    NonFiniteResult {
        /// The tensor name.
        tensor: String,
        /// Flat index.
        index: usize,
    },
}

type Result<T, E = AdapterError> = std::result::Result<T, E>;

// ---------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------

/// The modules a LoRA adapter targets, as PEFT writes them in `adapter_config.json`.
///
/// PEFT writes a list (or a Python set, serialised as a list in any order) of module
/// names, or a single string which PEFT treats as a regular expression over full module
/// paths. Names are kept sorted and deduplicated so that equal sets compare equal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "RawTargetModules", into = "RawTargetModules")]
pub enum TargetModules {
    /// Module names (suffixes of module paths, e.g. `q_proj`), sorted, deduplicated.
    Names(Vec<String>),
    /// A regular expression over full module paths (PEFT's string form); kept verbatim.
    Pattern(String),
}

impl TargetModules {
    /// The sorted module names, or `None` for a pattern.
    pub fn names(&self) -> Option<&[String]> {
        match self {
            TargetModules::Names(n) => Some(n),
            TargetModules::Pattern(_) => None,
        }
    }

    /// Sorted, deduplicated names.
    pub fn from_names<I, S>(names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let set: BTreeSet<String> = names.into_iter().map(Into::into).collect();
        TargetModules::Names(set.into_iter().collect())
    }
}

impl fmt::Display for TargetModules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetModules::Names(n) => write!(f, "{n:?}"),
            TargetModules::Pattern(p) => write!(f, "pattern {p:?}"),
        }
    }
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum RawTargetModules {
    List(Vec<String>),
    One(String),
}

impl From<RawTargetModules> for TargetModules {
    fn from(raw: RawTargetModules) -> Self {
        match raw {
            RawTargetModules::List(l) => TargetModules::from_names(l),
            RawTargetModules::One(s) => TargetModules::Pattern(s),
        }
    }
}

impl From<TargetModules> for RawTargetModules {
    fn from(t: TargetModules) -> Self {
        match t {
            TargetModules::Names(l) => RawTargetModules::List(l),
            TargetModules::Pattern(s) => RawTargetModules::One(s),
        }
    }
}

/// PEFT's `adapter_config.json` for a LoRA adapter.
///
/// Fields HiveMind does not interpret are kept in [`AdapterConfig::extra`] so that a
/// config made by PEFT survives a read/write round trip. [`AdapterConfig::validate`]
/// refuses what HiveMind cannot apply faithfully (DoRA, per-module rank or alpha
/// patterns, trained biases, transposed `fan_in_fan_out` weights).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// Always `"LORA"`.
    pub peft_type: String,
    /// PEFT's task type, `"CAUSAL_LM"` for HiveMind adapters.
    #[serde(default)]
    pub task_type: Option<String>,
    /// The LoRA rank.
    pub r: usize,
    /// The LoRA alpha; written as an integer when it is one, as PEFT does.
    #[serde(serialize_with = "serialize_number")]
    pub lora_alpha: f64,
    /// Dropout used in training (no effect at inference).
    #[serde(default)]
    pub lora_dropout: f64,
    /// The adapted modules.
    pub target_modules: TargetModules,
    /// Which biases are trained; HiveMind supports only `"none"`.
    #[serde(default = "default_bias")]
    pub bias: String,
    /// The base model's id or path.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Whether weights are stored transposed (GPT-2 style); must be `false`.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// PEFT's inference-mode flag.
    #[serde(default = "default_true")]
    pub inference_mode: bool,
    /// Rank-stabilised LoRA: scaling is `alpha / sqrt(r)` instead of `alpha / r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// Every other field, preserved verbatim (sorted by key when written).
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

fn default_bias() -> String {
    "none".to_string()
}

fn default_true() -> bool {
    true
}

fn serialize_number<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    // Integral values below 2^53 are written as integers (PEFT writes `"lora_alpha": 16`).
    if v.fract() == 0.0 && v.abs() < 9_007_199_254_740_992.0 {
        s.serialize_i64(*v as i64)
    } else {
        s.serialize_f64(*v)
    }
}

impl AdapterConfig {
    /// A config for a causal-LM LoRA adapter with PEFT's defaults for everything else.
    pub fn new(r: usize, lora_alpha: f64, target_modules: TargetModules) -> Self {
        AdapterConfig {
            peft_type: "LORA".to_string(),
            task_type: Some("CAUSAL_LM".to_string()),
            r,
            lora_alpha,
            lora_dropout: 0.0,
            target_modules,
            bias: default_bias(),
            base_model_name_or_path: None,
            fan_in_fan_out: false,
            inference_mode: true,
            use_rslora: false,
            extra: BTreeMap::new(),
        }
    }

    /// The factor applied to `B·A`: `lora_alpha / r`, or `lora_alpha / sqrt(r)` with
    /// `use_rslora`.
    pub fn scaling(&self) -> f64 {
        let r = self.r as f64;
        if self.use_rslora {
            self.lora_alpha / r.sqrt()
        } else {
            self.lora_alpha / r
        }
    }

    /// Parses and validates `adapter_config.json` bytes.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let config: AdapterConfig =
            serde_json::from_slice(bytes).map_err(|source| AdapterError::ConfigJson { source })?;
        config.validate()?;
        Ok(config)
    }

    /// The config as pretty JSON (2-space indent, trailing newline), as PEFT writes it.
    pub fn to_json(&self) -> Result<Vec<u8>> {
        let mut out = serde_json::to_vec_pretty(self)
            .map_err(|source| AdapterError::ConfigJson { source })?;
        out.push(b'\n');
        Ok(out)
    }

    /// Refuses configs HiveMind cannot apply faithfully.
    pub fn validate(&self) -> Result<()> {
        let invalid = |field, value: String, expected| {
            Err(AdapterError::InvalidConfig {
                field,
                value,
                expected,
            })
        };
        if self.peft_type != "LORA" {
            return invalid("peft_type", format!("{:?}", self.peft_type), "\"LORA\"");
        }
        if self.r == 0 {
            return invalid("r", "0".into(), "a rank of at least 1");
        }
        if !self.lora_alpha.is_finite() {
            return invalid("lora_alpha", self.lora_alpha.to_string(), "a finite number");
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return invalid(
                "lora_dropout",
                self.lora_dropout.to_string(),
                "a value in [0, 1)",
            );
        }
        match &self.target_modules {
            TargetModules::Names(n) if n.is_empty() || n.iter().any(String::is_empty) => {
                return invalid(
                    "target_modules",
                    format!("{n:?}"),
                    "a non-empty list of module names",
                );
            }
            TargetModules::Pattern(p) if p.is_empty() => {
                return invalid("target_modules", "\"\"".into(), "a non-empty pattern");
            }
            _ => {}
        }
        if self.bias != "none" {
            return invalid("bias", format!("{:?}", self.bias), "\"none\"");
        }
        if self.fan_in_fan_out {
            return invalid(
                "fan_in_fan_out",
                "true".into(),
                "false (Hugging Face layout)",
            );
        }
        if self
            .extra
            .get("use_dora")
            .is_some_and(|v| v == &serde_json::Value::Bool(true))
        {
            return invalid("use_dora", "true".into(), "false (DoRA is not supported)");
        }
        for field in ["rank_pattern", "alpha_pattern"] {
            match self.extra.get(field) {
                None | Some(serde_json::Value::Null) => {}
                Some(serde_json::Value::Object(m)) if m.is_empty() => {}
                Some(v) => {
                    return invalid(
                        field,
                        v.to_string(),
                        "empty (per-module patterns are not supported)",
                    );
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Tensors and names
// ---------------------------------------------------------------------------------------

/// One LoRA weight matrix as plain row-major `f32` values.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraTensor {
    /// `[r, in]` for `lora_A`, `[out, r]` for `lora_B`.
    pub shape: Vec<usize>,
    /// Row-major values; `data.len()` is the product of `shape`.
    pub data: Vec<f32>,
}

impl LoraTensor {
    /// Number of values the shape holds (saturating on overflow).
    pub fn numel(&self) -> usize {
        self.shape.iter().fold(1usize, |a, &d| a.saturating_mul(d))
    }
}

/// Which half of a LoRA pair a tensor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LoraSide {
    /// `lora_A`, shape `[r, in]`.
    A,
    /// `lora_B`, shape `[out, r]`.
    B,
}

impl LoraSide {
    fn suffix(self) -> &'static str {
        match self {
            LoraSide::A => ".lora_A.weight",
            LoraSide::B => ".lora_B.weight",
        }
    }

    fn other(self) -> LoraSide {
        match self {
            LoraSide::A => LoraSide::B,
            LoraSide::B => LoraSide::A,
        }
    }
}

fn valid_component(c: &str) -> bool {
    !c.is_empty()
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Splits a canonical name into (module path, side), checking every character.
fn split_name(name: &str) -> Option<(&str, LoraSide)> {
    if name.len() > MAX_NAME_LEN {
        return None;
    }
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let (path, side) = if let Some(p) = rest.strip_suffix(LoraSide::A.suffix()) {
        (p, LoraSide::A)
    } else {
        (rest.strip_suffix(LoraSide::B.suffix())?, LoraSide::B)
    };
    path.split('.').all(valid_component).then_some((path, side))
}

/// Maps a name as found in a file to its canonical form: `.lora_A.<adapter>.weight`
/// (PEFT with the adapter name, e.g. `default`) becomes `.lora_A.weight`.
fn normalise_name(name: &str) -> Option<String> {
    if name.len() > MAX_NAME_LEN {
        return None;
    }
    if split_name(name).is_some() {
        return Some(name.to_string());
    }
    let stem = name.strip_suffix(".weight")?;
    let (head, adapter) = stem.rsplit_once('.')?;
    if !valid_component(adapter) || !(head.ends_with(".lora_A") || head.ends_with(".lora_B")) {
        return None;
    }
    let canonical = format!("{head}.weight");
    split_name(&canonical).is_some().then_some(canonical)
}

/// (layer index, module kind) of a module path like `model.layers.3.self_attn.q_proj`.
fn locate_module(path: &str) -> Option<(usize, &str)> {
    let parts: Vec<&str> = path.split('.').collect();
    let kind = *parts.last()?;
    let layer = parts.windows(2).find_map(|w| {
        let canonical_number = w[1] == "0" || !w[1].starts_with('0');
        (w[0] == "layers" && canonical_number && w[1].bytes().all(|b| b.is_ascii_digit()))
            .then(|| w[1].parse::<usize>().ok())
            .flatten()
    })?;
    Some((layer, kind))
}

/// Checks a set of canonical tensors: names, 2-D shapes, data lengths, finite values,
/// complete A/B pairs of equal rank. Returns the rank of each pair by module path.
fn check_tensors(tensors: &BTreeMap<String, LoraTensor>) -> Result<BTreeMap<&str, usize>> {
    if tensors.is_empty() {
        return Err(AdapterError::NoTensors);
    }
    let mut ranks = BTreeMap::new();
    for (name, t) in tensors {
        let (path, side) = split_name(name).ok_or_else(|| AdapterError::NotLora {
            tensor: name.clone(),
        })?;
        if t.shape.len() != 2 || t.shape.contains(&0) {
            return Err(AdapterError::BadShape {
                tensor: name.clone(),
                shape: t.shape.iter().map(|&d| d as u64).collect(),
            });
        }
        let expected = t.numel();
        if t.data.len() != expected {
            return Err(AdapterError::DataLength {
                tensor: name.clone(),
                shape: t.shape.clone(),
                expected,
                actual: t.data.len(),
            });
        }
        if let Some(index) = t.data.iter().position(|v| !v.is_finite()) {
            return Err(AdapterError::NonFinite {
                tensor: name.clone(),
                index,
            });
        }
        let partner = format!("{NAME_PREFIX}{path}{}", side.other().suffix());
        let Some(p) = tensors.get(&partner) else {
            return Err(AdapterError::MissingPair {
                tensor: name.clone(),
                missing: partner,
            });
        };
        if side == LoraSide::B {
            let rank_a = t_rank(p, LoraSide::A);
            let rank_b = t_rank(t, LoraSide::B);
            if rank_a != rank_b {
                return Err(AdapterError::RankMismatch {
                    tensor: name.clone(),
                    expected: rank_a,
                    actual: rank_b,
                });
            }
            ranks.insert(path, rank_b);
        }
    }
    Ok(ranks)
}

/// The rank dimension of a tensor (shape checked elsewhere; 0 when malformed).
fn t_rank(t: &LoraTensor, side: LoraSide) -> usize {
    let i = match side {
        LoraSide::A => 0,
        LoraSide::B => 1,
    };
    t.shape.get(i).copied().unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// Parsing untrusted safetensors bytes
// ---------------------------------------------------------------------------------------

/// Caps applied before parsing untrusted safetensors bytes allocates anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest whole file accepted.
    pub max_bytes: u64,
    /// Most tensors accepted.
    pub max_tensors: usize,
    /// Largest JSON header accepted.
    pub max_header_bytes: u64,
}

impl Limits {
    /// 1 GiB files, 4096 tensors, 4 MiB headers: room for rank-64 adapters on every
    /// linear layer of a 7B model (about 650 MB in f32, under 400 tensors).
    pub const DEFAULT: Limits = Limits {
        max_bytes: 1 << 30,
        max_tensors: 4096,
        max_header_bytes: 4 << 20,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTensorInfo {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

struct RawHeader {
    /// Tensor entries in file order, duplicates included.
    tensors: Vec<(String, RawTensorInfo)>,
    /// Total tensor entries seen (may exceed `tensors.len()` when over the limit).
    count: usize,
}

/// Reads the header map, keeping at most `max_tensors` entries (the rest are skipped
/// without allocating) and refusing a repeated `__metadata__`.
struct HeaderSeed {
    max_tensors: usize,
}

impl<'de> DeserializeSeed<'de> for HeaderSeed {
    type Value = RawHeader;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<RawHeader, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for HeaderSeed {
    type Value = RawHeader;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a safetensors header object")
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<RawHeader, M::Error> {
        let mut header = RawHeader {
            tensors: Vec::new(),
            count: 0,
        };
        let mut seen_metadata = false;
        while let Some(key) = map.next_key::<String>()? {
            if key == "__metadata__" {
                if seen_metadata {
                    return Err(serde::de::Error::custom("__metadata__ appears twice"));
                }
                seen_metadata = true;
                // The spec allows only a string-to-string map; its content is not kept.
                map.next_value::<BTreeMap<String, String>>()?;
                continue;
            }
            header.count += 1;
            if header.count > self.max_tensors {
                map.next_value::<IgnoredAny>()?;
            } else {
                let info = map.next_value::<RawTensorInfo>()?;
                header.tensors.push((key, info));
            }
        }
        Ok(header)
    }
}

struct Entry {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    begin: u64,
    end: u64,
}

#[derive(Clone, Copy)]
enum Dtype {
    F32,
    F16,
    Bf16,
}

impl Dtype {
    fn size(self) -> u64 {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }
}

/// Parses untrusted safetensors bytes into canonical LoRA tensors (f32, names normalised).
///
/// Refuses inputs over `limits`, truncated files, headers whose offsets, sizes or dtypes
/// do not match the data (overlaps, gaps, ranges past the end, trailing bytes), tensors
/// that are not PEFT LoRA A/B weights, incomplete A/B pairs or pairs of different rank,
/// and non-finite values. Never panics; allocates at most the header plus about twice
/// the input size.
pub fn parse_safetensors(bytes: &[u8], limits: &Limits) -> Result<BTreeMap<String, LoraTensor>> {
    let len = bytes.len() as u64;
    if len > limits.max_bytes {
        return Err(AdapterError::TooLarge {
            len,
            max: limits.max_bytes,
        });
    }
    let (prefix, rest) = bytes
        .split_first_chunk::<8>()
        .ok_or(AdapterError::Truncated { len, needed: 8 })?;
    let header_len = u64::from_le_bytes(*prefix);
    if header_len > limits.max_header_bytes {
        return Err(AdapterError::HeaderTooLarge {
            len: header_len,
            max: limits.max_header_bytes,
        });
    }
    if header_len > rest.len() as u64 {
        return Err(AdapterError::Truncated {
            len,
            needed: header_len.saturating_add(8),
        });
    }
    let (header_bytes, data) = rest.split_at(header_len as usize);
    if header_bytes.first() != Some(&b'{') {
        return Err(AdapterError::InvalidHeader {
            reason: "the header does not start with '{'".into(),
        });
    }
    let mut de = serde_json::Deserializer::from_slice(header_bytes);
    let header = HeaderSeed {
        max_tensors: limits.max_tensors,
    }
    .deserialize(&mut de)
    .and_then(|h| de.end().map(|()| h))
    .map_err(|e| AdapterError::InvalidHeader {
        reason: e.to_string(),
    })?;
    if header.count > limits.max_tensors {
        return Err(AdapterError::TooManyTensors {
            count: header.count,
            max: limits.max_tensors,
        });
    }
    if header.tensors.is_empty() {
        return Err(AdapterError::NoTensors);
    }

    // Per-entry checks: name, dtype, shape, size of the byte range.
    let mut entries = Vec::with_capacity(header.tensors.len());
    for (raw_name, info) in header.tensors {
        let name = normalise_name(&raw_name).ok_or_else(|| AdapterError::NotLora {
            tensor: raw_name.clone(),
        })?;
        let dtype = match info.dtype.as_str() {
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::Bf16,
            _ => {
                return Err(AdapterError::UnsupportedDtype {
                    tensor: raw_name,
                    dtype: info.dtype,
                })
            }
        };
        let bad_shape = || AdapterError::BadShape {
            tensor: raw_name.clone(),
            shape: info.shape.clone(),
        };
        if info.shape.len() != 2 || info.shape.contains(&0) {
            return Err(bad_shape());
        }
        let shape: Vec<usize> = info
            .shape
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<Result<_, _>>()
            .map_err(|_| bad_shape())?;
        let expected = info
            .shape
            .iter()
            .try_fold(dtype.size(), |a, &d| a.checked_mul(d))
            .ok_or_else(bad_shape)?;
        let [begin, end] = info.data_offsets;
        if end < begin {
            return Err(AdapterError::BadOffsets {
                tensor: raw_name,
                begin,
                end,
                reason: "end before start",
            });
        }
        if end - begin != expected {
            return Err(AdapterError::SizeMismatch {
                tensor: raw_name,
                expected,
                actual: end - begin,
            });
        }
        entries.push(Entry {
            name,
            dtype,
            shape,
            begin,
            end,
        });
    }

    // The byte ranges must tile the data section exactly: no overlap, gap or excess.
    let data_len = data.len() as u64;
    entries.sort_by_key(|e| (e.begin, e.end));
    let mut cursor = 0u64;
    for e in &entries {
        if e.end > data_len {
            return Err(AdapterError::DataOutOfRange {
                tensor: e.name.clone(),
                end: e.end,
                data_len,
            });
        }
        if e.begin != cursor {
            return Err(AdapterError::BadOffsets {
                tensor: e.name.clone(),
                begin: e.begin,
                end: e.end,
                reason: if e.begin < cursor {
                    "overlap the previous tensor"
                } else {
                    "leave a gap after the previous tensor"
                },
            });
        }
        cursor = e.end;
    }
    if cursor != data_len {
        return Err(AdapterError::TrailingBytes {
            extra: data_len - cursor,
        });
    }

    let mut tensors = BTreeMap::new();
    for e in entries {
        // In range: checked above, and every end fits in `data.len()`.
        let raw = &data[e.begin as usize..e.end as usize];
        let data: Vec<f32> = match e.dtype {
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::Bf16 => raw
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        };
        let tensor = LoraTensor {
            shape: e.shape,
            data,
        };
        if tensors.insert(e.name.clone(), tensor).is_some() {
            return Err(AdapterError::DuplicateTensor { tensor: e.name });
        }
    }
    check_tensors(&tensors)?;
    Ok(tensors)
}

// ---------------------------------------------------------------------------------------
// The adapter
// ---------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------
// Shape of the network's model
// ---------------------------------------------------------------------------------------

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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_normalise_and_reject() {
        let a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
        assert_eq!(normalise_name(a).as_deref(), Some(a));
        assert_eq!(
            normalise_name(
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
            )
            .as_deref(),
            Some(a)
        );
        for bad in [
            "lm_head.weight",
            "base_model.model.lm_head.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight",
            "base_model.model..lora_A.weight",
            "base_model.model.model.embed_tokens.lora_embedding_A",
            "base_model.model.model.layers.0.q_proj.lora_A.de\"fault.weight",
            "base_model.model.model.layers.0.q_proj.lora_A.x.y.weight",
            "base_model.model.model.layers.0.q_proj.lora_magnitude_vector.weight",
        ] {
            assert_eq!(normalise_name(bad), None, "{bad}");
        }
        assert_eq!(
            locate_module("model.layers.12.mlp.up_proj"),
            Some((12, "up_proj"))
        );
        assert_eq!(locate_module("model.layers.012.mlp.up_proj"), None);
        assert_eq!(locate_module("model.norm"), None);
    }

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

    #[test]
    fn scaling_plain_and_rslora() {
        let mut c = AdapterConfig::new(16, 32.0, TargetModules::from_names(["q_proj"]));
        assert_eq!(c.scaling(), 2.0);
        c.use_rslora = true;
        assert_eq!(c.scaling(), 8.0);
    }
}

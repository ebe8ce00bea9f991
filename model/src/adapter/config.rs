//! `adapter_config.json`: the target modules and the LoRA hyper-parameters PEFT writes.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize, Serializer};

use super::error::{AdapterError, Result};

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

    /// This config for an adapter of rank `rank` whose B factors already carry every scale:
    /// `r = lora_alpha = rank` without rsLoRA, so its scaling is 1. Merged adapters (the
    /// exact and spectral rules, `stack`) are written this way.
    pub fn unit_scaled(&self, rank: usize) -> AdapterConfig {
        AdapterConfig {
            r: rank,
            lora_alpha: rank as f64,
            use_rslora: false,
            ..self.clone()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaling_plain_and_rslora() {
        let mut c = AdapterConfig::new(16, 32.0, TargetModules::from_names(["q_proj"]));
        assert_eq!(c.scaling(), 2.0);
        c.use_rslora = true;
        assert_eq!(c.scaling(), 8.0);
    }
}

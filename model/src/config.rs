//! Model hyper-parameters, read from GGUF metadata or a Hugging Face `config.json`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// The decoder families HiveMind runs with one implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// SmolLM2, TinyLlama, Llama: no attention biases.
    Llama,
    /// Qwen2, Qwen2.5: q/k/v biases.
    Qwen2,
}

impl Arch {
    /// Parses an architecture name as GGUF or `config.json` spell it.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "llama" | "LlamaForCausalLM" => Ok(Arch::Llama),
            "qwen2" | "Qwen2ForCausalLM" => Ok(Arch::Qwen2),
            other => Err(ModelError::UnsupportedArch {
                arch: other.to_string(),
            }),
        }
    }

    /// The name GGUF uses.
    pub fn as_str(&self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }
}

/// The shape of a decoder-only transformer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Family.
    pub arch: Arch,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// Context length the model was trained for.
    pub max_seq_len: usize,
    /// Whether the output head reuses the token embedding.
    pub tie_word_embeddings: bool,
}

impl ModelConfig {
    /// What a LoRA adapter of `rank` on `target_modules` (module kinds such as `q_proj`) must
    /// look like on this model, for [`crate::adapter::LoraAdapter::check_shape`].
    pub fn adapter_shape(
        &self,
        rank: usize,
        target_modules: &[String],
    ) -> Result<crate::adapter::AdapterShape> {
        let mut modules = std::collections::BTreeMap::new();
        for m in target_modules {
            let module: crate::module::Module =
                m.parse().map_err(|e: crate::module::UnknownModule| {
                    ModelError::AdapterMismatch {
                        reason: format!("LoRA target: {e}"),
                    }
                })?;
            let (out_features, in_features) = module.dims(self);
            modules.insert(
                m.clone(),
                crate::adapter::ModuleDims {
                    out_features,
                    in_features,
                },
            );
        }
        Ok(crate::adapter::AdapterShape {
            rank,
            num_layers: self.num_layers,
            modules,
        })
    }

    /// Reads the hyper-parameters from GGUF metadata.
    pub fn from_gguf(path: &Path, md: &HashMap<String, Value>) -> Result<Self> {
        let get = |k: &str| {
            md.get(k)
                .ok_or_else(|| ModelError::bad(path, format!("missing {k}")))
        };
        let arch_name = get("general.architecture")?
            .to_string()
            .map_err(|e| ModelError::bad(path, e.to_string()))?
            .clone();
        let arch = Arch::parse(&arch_name)?;
        let p = arch.as_str();
        let num = |k: &str| -> Result<usize> {
            let v = get(&format!("{p}.{k}"))?;
            as_u64(v)
                .map(|x| x as usize)
                .ok_or_else(|| ModelError::bad(path, format!("{p}.{k} is not an integer")))
        };
        let float = |k: &str, default: f64| -> Result<f64> {
            match md.get(&format!("{p}.{k}")) {
                None => Ok(default),
                Some(v) => as_f64(v)
                    .ok_or_else(|| ModelError::bad(path, format!("{p}.{k} is not a number"))),
            }
        };
        let hidden_size = num("embedding_length")?;
        let num_heads = num("attention.head_count")?;
        let num_kv_heads = num("attention.head_count_kv").unwrap_or(num_heads);
        let head_dim = num("attention.key_length").unwrap_or(hidden_size / num_heads.max(1));
        let vocab_size = match num("vocab_size") {
            Ok(v) => v,
            Err(_) => md
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.to_vec().ok())
                .map(|v| v.len())
                .ok_or_else(|| ModelError::bad(path, "cannot tell the vocabulary size"))?,
        };
        let cfg = ModelConfig {
            arch,
            hidden_size,
            intermediate_size: num("feed_forward_length")?,
            num_layers: num("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: float("attention.layer_norm_rms_epsilon", 1e-6)?,
            rope_theta: float("rope.freq_base", 10_000.0)?,
            max_seq_len: num("context_length").unwrap_or(2048),
            // Decided by the loader from the presence of `output.weight`.
            tie_word_embeddings: true,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Reads the hyper-parameters from a Hugging Face `config.json`.
    pub fn from_hf_json(path: &Path, text: &str) -> Result<Self> {
        #[derive(Deserialize)]
        struct Hf {
            model_type: Option<String>,
            #[serde(default)]
            architectures: Vec<String>,
            hidden_size: usize,
            intermediate_size: usize,
            num_hidden_layers: usize,
            num_attention_heads: usize,
            num_key_value_heads: Option<usize>,
            head_dim: Option<usize>,
            vocab_size: usize,
            rms_norm_eps: Option<f64>,
            rope_theta: Option<f64>,
            max_position_embeddings: Option<usize>,
            tie_word_embeddings: Option<bool>,
        }
        let hf: Hf =
            serde_json::from_str(text).map_err(|e| ModelError::bad(path, e.to_string()))?;
        let arch_name = hf
            .model_type
            .clone()
            .or_else(|| hf.architectures.first().cloned())
            .ok_or_else(|| ModelError::bad(path, "no model_type"))?;
        let cfg = ModelConfig {
            arch: Arch::parse(&arch_name)?,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            head_dim: hf
                .head_dim
                .unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1)),
            vocab_size: hf.vocab_size,
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: hf.rope_theta.unwrap_or(10_000.0),
            max_seq_len: hf.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        if self.num_heads == 0
            || self.num_kv_heads == 0
            || !self.num_heads.is_multiple_of(self.num_kv_heads)
            || !self.head_dim.is_multiple_of(2)
            || self.head_dim == 0
        {
            return Err(ModelError::bad(
                path,
                format!(
                    "inconsistent attention shape: {} heads, {} kv heads, head dim {}",
                    self.num_heads, self.num_kv_heads, self.head_dim
                ),
            ));
        }
        Ok(())
    }
}

pub(crate) fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::U8(x) => Some(*x as u64),
        Value::U16(x) => Some(*x as u64),
        Value::U32(x) => Some(*x as u64),
        Value::U64(x) => Some(*x),
        Value::I8(x) => u64::try_from(*x).ok(),
        Value::I16(x) => u64::try_from(*x).ok(),
        Value::I32(x) => u64::try_from(*x).ok(),
        Value::I64(x) => u64::try_from(*x).ok(),
        _ => None,
    }
}

pub(crate) fn as_f64(v: &Value) -> Option<f64> {
    match v {
        Value::F32(x) => Some(*x as f64),
        Value::F64(x) => Some(*x),
        other => as_u64(other).map(|x| x as f64),
    }
}

//! Tiny generated models for tests: random weights, the tiny tokenizer, written as real GGUF files and
//! real Hugging Face safetensors directories, so tests go through the real loaders.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::config::{Arch, ModelConfig};
use crate::error::{ModelError, Result};
use crate::loader::permute_rows_for_gguf;
use crate::tokenizer::{tiny_gguf_tokenizer_metadata, tiny_tokenizer_json};

/// A tiny model's configuration and f32 weights under their Hugging Face names.
#[derive(Debug, Clone)]
pub struct TinyModel {
    /// Shape.
    pub cfg: ModelConfig,
    /// Weights, HF names, HF layout.
    pub tensors: BTreeMap<String, Tensor>,
}

fn tokenizer_vocab_size() -> usize {
    tiny_gguf_tokenizer_metadata()
        .iter()
        .find(|(k, _)| k == "tokenizer.ggml.tokens")
        .and_then(|(_, v)| v.to_vec().ok().map(|v| v.len()))
        .unwrap_or(0)
}

/// The template tiny models carry (ChatML).
pub const TINY_TEMPLATE: &str = crate::chat::CHATML;

impl TinyModel {
    /// Random weights for a 2-layer model of family `arch` (GQA: 4 heads, 2 kv heads).
    pub fn new(arch: Arch, seed: u64) -> Result<Self> {
        let cfg = ModelConfig {
            arch,
            hidden_size: 64,
            intermediate_size: 128,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            vocab_size: tokenizer_vocab_size(),
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_seq_len: 256,
            tie_word_embeddings: arch == Arch::Llama,
        };
        let mut rng = StdRng::seed_from_u64(seed);
        let mut t = BTreeMap::new();
        let mut rand = |rows: usize, cols: usize, scale: f32| -> Result<Tensor> {
            let v: Vec<f32> = (0..rows * cols)
                .map(|_| rng.gen_range(-1.0f32..1.0) * scale)
                .collect();
            Ok(Tensor::from_vec(v, (rows, cols), &Device::Cpu)?)
        };
        let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (qd, kvd) = (
            cfg.num_heads * cfg.head_dim,
            cfg.num_kv_heads * cfg.head_dim,
        );
        let s = |n: usize| (3.0 / n as f32).sqrt();
        t.insert("model.embed_tokens.weight".into(), rand(v, h, 1.0)?);
        t.insert(
            "model.norm.weight".into(),
            (rand(1, h, 0.1)? + 1.0)?.flatten_all()?,
        );
        if !cfg.tie_word_embeddings {
            t.insert("lm_head.weight".into(), rand(v, h, s(h))?);
        }
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            for (name, rows, cols) in [
                ("self_attn.q_proj", qd, h),
                ("self_attn.k_proj", kvd, h),
                ("self_attn.v_proj", kvd, h),
                ("self_attn.o_proj", h, qd),
                ("mlp.gate_proj", i, h),
                ("mlp.up_proj", i, h),
                ("mlp.down_proj", h, i),
            ] {
                t.insert(format!("{p}.{name}.weight"), rand(rows, cols, s(cols))?);
            }
            if arch == Arch::Qwen2 {
                for (name, rows) in [("q_proj", qd), ("k_proj", kvd), ("v_proj", kvd)] {
                    t.insert(
                        format!("{p}.self_attn.{name}.bias"),
                        rand(1, rows, 0.5)?.flatten_all()?,
                    );
                }
            }
            for name in ["input_layernorm", "post_attention_layernorm"] {
                t.insert(
                    format!("{p}.{name}.weight"),
                    (rand(1, h, 0.1)? + 1.0)?.flatten_all()?,
                );
            }
        }
        Ok(TinyModel { cfg, tensors: t })
    }

    fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| ModelError::bad(name, "tiny model lacks this tensor"))
    }

    /// Writes a GGUF file the way llama.cpp's converter does: llama q/k rows permuted, linear
    /// weights in Q4_1, the embedding in Q8_0, norms and biases in F32.
    pub fn write_gguf(&self, path: &Path) -> Result<()> {
        let cfg = &self.cfg;
        let a = cfg.arch.as_str();
        let mut md: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String(a.into())),
            ("general.name".into(), Value::String("tiny".into())),
            (
                format!("{a}.context_length"),
                Value::U32(cfg.max_seq_len as u32),
            ),
            (
                format!("{a}.embedding_length"),
                Value::U32(cfg.hidden_size as u32),
            ),
            (
                format!("{a}.feed_forward_length"),
                Value::U32(cfg.intermediate_size as u32),
            ),
            (
                format!("{a}.block_count"),
                Value::U32(cfg.num_layers as u32),
            ),
            (
                format!("{a}.attention.head_count"),
                Value::U32(cfg.num_heads as u32),
            ),
            (
                format!("{a}.attention.head_count_kv"),
                Value::U32(cfg.num_kv_heads as u32),
            ),
            (
                format!("{a}.attention.layer_norm_rms_epsilon"),
                Value::F32(cfg.rms_norm_eps as f32),
            ),
            (
                format!("{a}.rope.freq_base"),
                Value::F32(cfg.rope_theta as f32),
            ),
        ];
        // The tiny tokenizer's metadata carries its ChatML template (`TINY_TEMPLATE`).
        md.extend(tiny_gguf_tokenizer_metadata());
        let q =
            |t: &Tensor, dtype: GgmlDType| -> Result<QTensor> { Ok(QTensor::quantize(t, dtype)?) };
        let mut tensors: Vec<(String, QTensor)> = vec![
            (
                "token_embd.weight".into(),
                q(self.get("model.embed_tokens.weight")?, GgmlDType::Q8_0)?,
            ),
            (
                "output_norm.weight".into(),
                q(self.get("model.norm.weight")?, GgmlDType::F32)?,
            ),
        ];
        if let Some(head) = self.tensors.get("lm_head.weight") {
            tensors.push(("output.weight".into(), q(head, GgmlDType::Q8_0)?));
        }
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            for (hf, gg) in [
                ("self_attn.q_proj", "attn_q"),
                ("self_attn.k_proj", "attn_k"),
                ("self_attn.v_proj", "attn_v"),
                ("self_attn.o_proj", "attn_output"),
                ("mlp.gate_proj", "ffn_gate"),
                ("mlp.up_proj", "ffn_up"),
                ("mlp.down_proj", "ffn_down"),
            ] {
                let mut w = self.get(&format!("{p}.{hf}.weight"))?.clone();
                if cfg.arch == Arch::Llama && gg == "attn_q" {
                    w = permute_rows_for_gguf(&w, cfg.num_heads)?;
                }
                if cfg.arch == Arch::Llama && gg == "attn_k" {
                    w = permute_rows_for_gguf(&w, cfg.num_kv_heads)?;
                }
                tensors.push((format!("blk.{l}.{gg}.weight"), q(&w, GgmlDType::Q4_1)?));
                if let Some(b) = self.tensors.get(&format!("{p}.{hf}.bias")) {
                    tensors.push((format!("blk.{l}.{gg}.bias"), q(b, GgmlDType::F32)?));
                }
            }
            tensors.push((
                format!("blk.{l}.attn_norm.weight"),
                q(
                    self.get(&format!("{p}.input_layernorm.weight"))?,
                    GgmlDType::F32,
                )?,
            ));
            tensors.push((
                format!("blk.{l}.ffn_norm.weight"),
                q(
                    self.get(&format!("{p}.post_attention_layernorm.weight"))?,
                    GgmlDType::F32,
                )?,
            ));
        }
        let mut f = std::fs::File::create(path).map_err(|e| ModelError::io(path, e))?;
        let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut f, &md_refs, &t_refs)?;
        Ok(())
    }

    /// Writes a Hugging Face model directory: config.json, model.safetensors (f32), tokenizer.json and
    /// tokenizer_config.json (with the chat template).
    pub fn write_hf_dir(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let cfg = &self.cfg;
        let config = serde_json::json!({
            "architectures": [match cfg.arch { Arch::Llama => "LlamaForCausalLM", Arch::Qwen2 => "Qwen2ForCausalLM" }],
            "model_type": cfg.arch.as_str(),
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads,
            "vocab_size": cfg.vocab_size,
            "rms_norm_eps": cfg.rms_norm_eps,
            "rope_theta": cfg.rope_theta,
            "max_position_embeddings": cfg.max_seq_len,
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "torch_dtype": "float32",
        });
        let write = |name: &str, bytes: &[u8]| -> Result<()> {
            let p = dir.join(name);
            std::fs::write(&p, bytes).map_err(|e| ModelError::io(p, e))
        };
        write("config.json", config.to_string().as_bytes())?;
        write("tokenizer.json", tiny_tokenizer_json().as_bytes())?;
        let tc = serde_json::json!({
            "chat_template": TINY_TEMPLATE,
            "eos_token": "<|im_end|>",
            "bos_token": null,
        });
        write("tokenizer_config.json", tc.to_string().as_bytes())?;
        let p = dir.join("model.safetensors");
        candle_core::safetensors::save(
            &self
                .tensors
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            &p,
        )?;
        Ok(())
    }
}

/// A LoRA adapter of `shape` with uniform random values in [-0.5, 0.5) (deterministic in
/// `seed`), for tests and benchmarks that move adapters around without training them.
pub fn random_adapter(
    shape: &crate::adapter::AdapterShape,
    alpha: f64,
    seed: u64,
) -> Result<crate::adapter::LoraAdapter> {
    use crate::adapter::{tensor_layout, AdapterConfig, LoraAdapter, LoraTensor, TargetModules};
    let mut rng = StdRng::seed_from_u64(seed);
    let tensors = tensor_layout(shape)?
        .into_iter()
        .map(|(name, shape)| {
            let data = (0..shape.iter().product::<usize>())
                .map(|_| rng.gen_range(-0.5f32..0.5))
                .collect();
            (name, LoraTensor { shape, data })
        })
        .collect();
    let config = AdapterConfig::new(
        shape.rank,
        alpha,
        TargetModules::from_names(shape.modules.keys().cloned()),
    );
    Ok(LoraAdapter::new(config, tensors)?)
}

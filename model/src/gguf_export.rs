//! Adapters for llama.cpp: a LoRA adapter as a llama.cpp LoRA GGUF (`llama-cli --lora FILE`),
//! and a GGUF base model with an adapter merged into its weights, as one GGUF llama.cpp runs
//! alone.
//!
//! llama.cpp's LoRA GGUF (what its `convert_lora_to_gguf.py` writes): metadata
//! `general.architecture` (the base model's), `general.type = "adapter"`, `adapter.type =
//! "lora"`, `adapter.lora.alpha`; for each adapted weight `blk.N.attn_q.weight` two tensors
//! `blk.N.attn_q.weight.lora_a` (ggml `ne = [in, r]`: PEFT's A `[r, in]` as it is) and
//! `.lora_b` (`ne = [r, out]`: PEFT's B `[out, r]`). llama.cpp scales each pair by
//! `alpha / r` with `r` read from the pair's own B, so the alpha written is `scaling · r` and a
//! pair of another rank has its B rescaled. For the llama family, llama.cpp's GGUF files hold
//! q/k rows permuted (see `loader`), so B's rows of q_proj/k_proj are permuted the same way
//! (A acts on the input and is not).
//!
//! The merged model keeps every tensor and metadata entry of the base file and replaces each
//! adapted weight by `dequantize(W) + scaling · B · A`, in F32 by default: the sum `hive-node
//! chat` computes, so the two decode alike (F16 and Q8_0 make smaller files that round it).

use std::collections::BTreeMap;
use std::io::BufWriter;
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::adapter::LoraAdapter;
use crate::config::{Arch, ModelConfig};
use crate::error::{ModelError, Result};
use crate::loader::permute_rows_for_gguf;
use crate::lora::lora_pairs;
use crate::Module;

/// One module's pair, as GGUF wants it: A `[r, in]`, B `[out, r]` with B in GGUF row order and
/// carrying any scale correction.
struct Pair {
    a: Tensor,
    b: Tensor,
}

/// The adapter's pairs by GGUF weight name (`blk.N.attn_q.weight`), B's rows in GGUF order,
/// each B multiplied by `scaling · r_pair / alpha` so that llama.cpp's `alpha / r_pair` gives
/// the adapter's scaling. Returns the pairs and `alpha`.
fn gguf_pairs(adapter: &LoraAdapter, cfg: &ModelConfig) -> Result<(BTreeMap<String, Pair>, f64)> {
    let scaling = adapter.config.scaling();
    let alpha = scaling * adapter.config.r as f64;
    let mut pairs = BTreeMap::new();
    for ((layer, module), (a, mut b)) in lora_pairs(adapter)? {
        if layer >= cfg.num_layers {
            return Err(ModelError::AdapterMismatch {
                reason: format!(
                    "layer {layer} does not exist (the model has {})",
                    cfg.num_layers
                ),
            });
        }
        let (out, inp) = module.dims(cfg);
        let (ra, ia) = a.dims2()?;
        let (ob, rb) = b.dims2()?;
        if ia != inp || ob != out || ra != rb || ra == 0 {
            return Err(ModelError::AdapterMismatch {
                reason: format!(
                    "layer {layer} {module}: A is [{ra}, {ia}] and B is [{ob}, {rb}], the weight is [{out}, {inp}]"
                ),
            });
        }
        if ra != adapter.config.r {
            b = (b * (scaling * ra as f64 / alpha))?;
        }
        if cfg.arch == Arch::Llama && module == Module::QProj {
            b = permute_rows_for_gguf(&b, cfg.num_heads)?;
        }
        if cfg.arch == Arch::Llama && module == Module::KProj {
            b = permute_rows_for_gguf(&b, cfg.num_kv_heads)?;
        }
        pairs.insert(
            format!("blk.{layer}.{}.weight", module.gguf_name()),
            Pair { a, b },
        );
    }
    Ok((pairs, alpha))
}

/// Writes a GGUF file through a temp file and a rename: a failed export leaves no half file,
/// and an existing file stays as it was.
fn write_gguf(
    path: &Path,
    metadata: &[(String, gguf_file::Value)],
    tensors: &[(String, QTensor)],
) -> Result<()> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp_name);
    let written = (|| -> Result<()> {
        // A new file: never through a link someone left at the temp name.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| ModelError::io(&tmp, e))?;
        let mut w = BufWriter::new(file);
        let md: Vec<(&str, &gguf_file::Value)> =
            metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut w, &md, &ts)?;
        let file = w
            .into_inner()
            .map_err(|e| ModelError::io(&tmp, e.into_error()))?;
        file.sync_all().map_err(|e| ModelError::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Writes `adapter` as a llama.cpp LoRA GGUF for a base model of config `cfg` (see the module
/// docs). `name` goes into `general.name`.
pub fn write_lora_gguf(
    adapter: &LoraAdapter,
    cfg: &ModelConfig,
    name: &str,
    path: &Path,
) -> Result<()> {
    let (pairs, alpha) = gguf_pairs(adapter, cfg)?;
    if pairs.is_empty() {
        return Err(ModelError::AdapterMismatch {
            reason: "the adapter has no LoRA pairs".into(),
        });
    }
    let metadata = vec![
        (
            "general.architecture".to_string(),
            gguf_file::Value::String(cfg.arch.as_str().into()),
        ),
        (
            "general.type".to_string(),
            gguf_file::Value::String("adapter".into()),
        ),
        (
            "general.name".to_string(),
            gguf_file::Value::String(name.into()),
        ),
        (
            "adapter.type".to_string(),
            gguf_file::Value::String("lora".into()),
        ),
        (
            "adapter.lora.alpha".to_string(),
            gguf_file::Value::F32(alpha as f32),
        ),
    ];
    let mut tensors = Vec::with_capacity(2 * pairs.len());
    for (weight, p) in pairs {
        tensors.push((
            format!("{weight}.lora_a"),
            QTensor::quantize(&p.a, GgmlDType::F32)?,
        ));
        tensors.push((
            format!("{weight}.lora_b"),
            QTensor::quantize(&p.b, GgmlDType::F32)?,
        ));
    }
    write_gguf(path, &metadata, &tensors)
}

/// How the merged weights are stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MergedType {
    /// F32: exactly the sum `hive-node chat` computes (4 bytes a weight).
    #[default]
    F32,
    /// F16 (2 bytes a weight).
    F16,
    /// Q8_0 (8.5 bits a weight; the weight's columns must be a multiple of 32).
    Q8_0,
}

impl MergedType {
    fn dtype(self) -> GgmlDType {
        match self {
            MergedType::F32 => GgmlDType::F32,
            MergedType::F16 => GgmlDType::F16,
            MergedType::Q8_0 => GgmlDType::Q8_0,
        }
    }
}

/// Writes the GGUF model `base` with `adapter` merged into its weights to `path`, the adapted
/// weights stored as `dtype` (see the module docs). `name` goes into `general.name`.
pub fn write_merged_gguf(
    base: &Path,
    adapter: &LoraAdapter,
    name: &str,
    dtype: MergedType,
    path: &Path,
) -> Result<()> {
    if base.is_dir() {
        return Err(ModelError::bad(
            base,
            "merging needs a GGUF base model (this is a Hugging Face dir; convert it with llama.cpp first)",
        ));
    }
    let (mut file, content) = crate::loader::read_gguf_header(base)?;
    let cfg = ModelConfig::from_gguf(base, &content.metadata)?;
    let (mut pairs, alpha) = gguf_pairs(adapter, &cfg)?;
    // The file's own tensor order.
    let mut names: Vec<(&String, u64)> = content
        .tensor_infos
        .iter()
        .map(|(n, info)| (n, info.offset))
        .collect();
    names.sort_by_key(|(_, offset)| *offset);
    let mut tensors = Vec::with_capacity(names.len());
    for (tname, _) in names {
        let q = content
            .tensor(&mut file, tname, &Device::Cpu)
            .map_err(|e| ModelError::bad(base, format!("tensor {tname}: {e}")))?;
        let q = match pairs.remove(tname.as_str()) {
            Some(p) => {
                let w = q.dequantize(&Device::Cpu)?;
                // llama.cpp's scale of the pair: alpha / r of its own B.
                let r = p.b.dims2()?.1;
                let delta = (p.b.matmul(&p.a)? * (alpha / r as f64))?;
                QTensor::quantize(&(w + delta)?, dtype.dtype())?
            }
            None => q,
        };
        tensors.push((tname.clone(), q));
    }
    if let Some(missing) = pairs.keys().next() {
        return Err(ModelError::AdapterMismatch {
            reason: format!("the base model has no tensor {missing}"),
        });
    }
    let mut metadata: Vec<(String, gguf_file::Value)> = content
        .metadata
        .iter()
        // The writer sets its own alignment.
        .filter(|(k, _)| !matches!(k.as_str(), "general.name" | "general.alignment"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    metadata.sort_by(|a, b| a.0.cmp(&b.0));
    metadata.push(("general.name".into(), gguf_file::Value::String(name.into())));
    write_gguf(path, &metadata, &tensors)
}

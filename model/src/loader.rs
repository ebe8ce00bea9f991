//! Loading base models: GGUF files (weights kept in their block formats) and Hugging Face model
//! directories (safetensors, quantized at load to Q4_1 unless `no_4bit`).
//!
//! Everything is converted to the Hugging Face layout. llama.cpp's converter permutes the rows of
//! llama-family q/k weights (to pair rotary dimensions 2i, 2i+1 instead of i, i+d/2); we undo that
//! permutation row by row on the quantized bytes, so one RoPE form and one adapter layout serve all
//! sources.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::{gguf_file, GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::config::{Arch, ModelConfig};
use crate::decoder::{Decoder, Layer, Linear, Weight};
use crate::error::{ModelError, Result};
use crate::kernels::Format;
use crate::module::Module;
use crate::qweight::{BlockWeight, Data};
use crate::tokenizer::Tokenizer;
use crate::Hash;

/// How to load a model.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Keep safetensors weights dense f32 instead of quantizing them to 4 bits.
    pub no_4bit: bool,
}

/// A base model ready to run: weights, tokenizer and chat template.
#[derive(Debug, Clone)]
pub struct BaseModel {
    /// The network.
    pub decoder: Decoder,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Its Jinja chat template, if it has one.
    pub chat_template: Option<String>,
    /// Token ids that end an assistant turn.
    pub eos_ids: Vec<u32>,
    /// Where it came from.
    pub path: PathBuf,
    /// A human-readable id (file stem or directory name).
    pub name: String,
    /// blake3 over the model's files: the base-model identity used in network model ids.
    pub hash: Hash,
}

impl BaseModel {
    /// Loads a GGUF file or a Hugging Face model directory.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Self> {
        if path.is_dir() {
            load_hf_dir(path, opts)
        } else {
            load_gguf(path)
        }
    }
}

/// The base-model identity of a GGUF file or a Hugging Face model dir without loading it:
/// what [`BaseModel::load`] puts in [`BaseModel::hash`]. For a file, blake3 of its bytes; for
/// a dir, blake3 over the hashes of its `*.safetensors` files (in name order) and then of
/// `config.json`.
pub fn model_hash(path: &Path) -> Result<Hash> {
    if !path.is_dir() {
        return file_hash(path);
    }
    let mut hasher = blake3::Hasher::new();
    for f in safetensors_files(path)? {
        hasher.update(file_hash(&f)?.as_bytes());
    }
    hasher.update(file_hash(&path.join("config.json"))?.as_bytes());
    Ok(hasher.finalize().into())
}

/// The shape of a GGUF file or a Hugging Face model dir, read from the GGUF header or
/// `config.json` only (no weights). Enough to check adapters against the model.
pub fn read_config(path: &Path) -> Result<ModelConfig> {
    if path.is_dir() {
        let config_path = path.join("config.json");
        let text =
            std::fs::read_to_string(&config_path).map_err(|e| ModelError::io(&config_path, e))?;
        return ModelConfig::from_hf_json(&config_path, &text);
    }
    let (_, content) = read_gguf_header(path)?;
    let mut cfg = ModelConfig::from_gguf(path, &content.metadata)?;
    cfg.tie_word_embeddings = !content.tensor_infos.contains_key("output.weight");
    Ok(cfg)
}

fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| ModelError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    Ok(files)
}

/// Files at least this large have their hash remembered (see [`file_hash_cached`]); smaller ones
/// are hashed on every load (a few milliseconds). The default model (98 MB) is remembered: its
/// hash took 35-50 ms of a 0.14-0.18 s load.
pub const HASH_CACHE_MIN_BYTES: u64 = 16 << 20;

fn file_hash(path: &Path) -> Result<Hash> {
    file_hash_cached(path, &hash_cache_dir(), HASH_CACHE_MIN_BYTES)
}

fn hash_cache_dir() -> PathBuf {
    crate::pull::hive_home().join("model-hashes")
}

/// blake3 of the file at `path`. For a file of at least `min_len` bytes the hash is remembered in
/// `cache_dir`, under the blake3 of the file's canonical path, with the file's length,
/// modification time and inode: a 7B model (4-5 GB) is read through once, not on every load.
/// Any change to those three hashes the file again. The cache is best effort: when it cannot be
/// read or written, the file is hashed.
pub fn file_hash_cached(path: &Path, cache_dir: &Path, min_len: u64) -> Result<Hash> {
    let meta = std::fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
    hash_remembered(path, &meta, cache_dir, min_len, || {
        let mut hasher = blake3::Hasher::new();
        hasher
            .update_mmap(path)
            .map_err(|e| ModelError::io(path, e))?;
        Ok(hasher.finalize().into())
    })
}

/// [`file_hash_cached`] with the hash, when it is not remembered, computed by `compute` from
/// the file whose metadata is `meta` (taken from the very file `compute` reads, so that a file
/// renamed over `path` meanwhile is not remembered under the other's hash).
fn hash_remembered(
    path: &Path,
    meta: &std::fs::Metadata,
    cache_dir: &Path,
    min_len: u64,
    compute: impl FnOnce() -> Result<Hash>,
) -> Result<Hash> {
    let entry = (meta.len() >= min_len)
        .then(|| std::fs::canonicalize(path).ok())
        .flatten()
        .map(|p| {
            let name = blake3::hash(p.as_os_str().as_encoded_bytes()).to_hex();
            cache_dir.join(name.as_str())
        });
    let stamp = file_stamp(meta);
    if let Some(entry) = &entry {
        let cached = std::fs::read_to_string(entry).ok().and_then(|text| {
            let (hash, rest) = text.trim().split_once(' ')?;
            (rest == stamp).then(|| hash.parse::<Hash>().ok()).flatten()
        });
        if let Some(hash) = cached {
            return Ok(hash);
        }
    }
    let hash = compute()?;
    if let Some(entry) = entry {
        // Written to a temp name and renamed, so a reader never sees half an entry.
        let tmp = entry.with_extension("tmp");
        let written = std::fs::create_dir_all(cache_dir)
            .and_then(|()| std::fs::write(&tmp, format!("{} {stamp}\n", hash.to_hex())))
            .and_then(|()| std::fs::rename(&tmp, &entry));
        if let Err(e) = written {
            tracing::debug!(entry = %entry.display(), error = %e, "cannot remember the model hash");
        }
    }
    Ok(hash)
}

/// Length, modification time (ns) and inode of a file, as one string.
fn file_stamp(meta: &std::fs::Metadata) -> String {
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    #[cfg(unix)]
    let ino = std::os::unix::fs::MetadataExt::ino(meta);
    #[cfg(not(unix))]
    let ino = 0u64;
    format!("{} {mtime} {ino}", meta.len())
}

/// Opens the GGUF file at `path` and reads its header (metadata and tensor directory). The
/// header is read through a buffer: candle's reader asks for each of the vocabulary's tens of
/// thousands of strings field by field, which straight from the file (a few system calls per
/// string) took 0.22-0.27 s of the default model's 0.31-0.40 s load, against 0.35 s for
/// llama.cpp to load the whole model.
pub(crate) fn read_gguf_header(path: &Path) -> Result<(File, gguf_file::Content)> {
    let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let content = gguf_file::Content::read(&mut reader)
        .map_err(|e| ModelError::bad(path, format!("not a readable GGUF file: {e}")))?;
    Ok((reader.into_inner(), content))
}

fn metadata_string(md: &HashMap<String, gguf_file::Value>, key: &str) -> Option<String> {
    md.get(key).and_then(|v| v.to_string().ok()).cloned()
}

/// Loads a GGUF model file.
pub fn load_gguf(path: &Path) -> Result<BaseModel> {
    let (file, content) = read_gguf_header(path)?;
    let mut cfg = ModelConfig::from_gguf(path, &content.metadata)?;
    let tokenizer = Tokenizer::from_gguf(&content)?;
    let chat_template = metadata_string(&content.metadata, "tokenizer.chat_template");

    // The file is memory-mapped and the weights in formats with a HiveMind kernel (all of the
    // default model's and of Q4_K_M files) are multiplied in place from the map: nothing is
    // copied, so loading costs the page cache's reads and the process holds the file once (its
    // pages count towards RSS as they are touched). `populate` reads it all at load rather than
    // in the first token's page faults. Only tensors in other formats, and llama-family q/k rows
    // (un-permuted below), are copied.
    // SAFETY: the file is opened read-only and only read through the map. Another process
    // truncating or rewriting it while the model is loaded would be undefined behaviour, as with
    // every memory-mapped model loader (llama.cpp's, candle's safetensors); a model file is not
    // written while nodes use it.
    let map = unsafe { memmap2::MmapOptions::new().populate().map(&file) }
        .map_err(|e| ModelError::io(path, e))?;
    let map = std::sync::Arc::new(map);
    let info = |name: &str| -> Result<&gguf_file::TensorInfo> {
        content
            .tensor_infos
            .get(name)
            .ok_or_else(|| ModelError::bad(path, format!("missing tensor {name}")))
    };
    let range = |name: &str| -> Result<std::ops::Range<usize>> {
        tensor_range(&content, info(name)?, map.len())
            .map_err(|reason| ModelError::bad(path, format!("tensor {name}: {reason}")))
    };
    let tensor = |name: &str| -> Result<QTensor> {
        let info = info(name)?;
        qtensor_from_ggml(
            info.ggml_dtype,
            &map[range(name)?],
            info.shape.dims().to_vec(),
            &Device::Cpu,
        )
        .map_err(|e| ModelError::bad(path, format!("tensor {name}: {e}")))
    };
    let dense = |q: QTensor| -> Result<Tensor> { Ok(q.dequantize(&Device::Cpu)?) };
    // A matrix, in place where its format has a kernel; q/k rows of llama-family files
    // un-permuted (`heads`).
    let weight = |name: &str, heads: Option<usize>| -> Result<Weight> {
        let i = info(name)?;
        let dims = i.shape.dims();
        if let (Some(fmt), [rows, cols]) = (Format::of(i.ggml_dtype), dims) {
            let r = range(name)?;
            let data = match heads {
                Some(h) => Data::Owned(unpermute_bytes(path, &map[r], *rows, h)?),
                None => Data::Mapped {
                    map: map.clone(),
                    range: r,
                },
            };
            if let Some(b) = BlockWeight::new(fmt, *rows, *cols, data) {
                return Ok(Weight::Blocks(std::sync::Arc::new(b)));
            }
        }
        let mut q = tensor(name)?;
        if let Some(h) = heads {
            q = unpermute_rows(path, q, h)?;
        }
        Weight::from_qtensor(q)
    };

    let embed = weight("token_embd.weight", None)?;
    let norm = dense(tensor("output_norm.weight")?)?;
    let lm_head = if content.tensor_infos.contains_key("output.weight") {
        cfg.tie_word_embeddings = false;
        Some(weight("output.weight", None)?)
    } else {
        None
    };
    // llama.cpp permutes q/k rows only for the llama family; qwen2 keeps the HF order.
    let (qh, kh) = match cfg.arch {
        Arch::Llama => (Some(cfg.num_heads), Some(cfg.num_kv_heads)),
        Arch::Qwen2 => (None, None),
    };
    let layer = |i: usize| -> Result<Layer> {
        let lin = |short: &str, heads_for_unpermute: Option<usize>| -> Result<Linear> {
            let w = weight(&format!("blk.{i}.{short}.weight"), heads_for_unpermute)?;
            let bias_name = format!("blk.{i}.{short}.bias");
            let bias = if content.tensor_infos.contains_key(&bias_name) {
                Some(dense(tensor(&bias_name)?)?)
            } else {
                None
            };
            Ok(Linear {
                weight: w,
                bias,
                lora: None,
            })
        };
        Ok(Layer {
            attn_norm: dense(tensor(&format!("blk.{i}.attn_norm.weight"))?)?,
            mlp_norm: dense(tensor(&format!("blk.{i}.ffn_norm.weight"))?)?,
            q_proj: lin("attn_q", qh)?,
            k_proj: lin("attn_k", kh)?,
            v_proj: lin("attn_v", None)?,
            o_proj: lin("attn_output", None)?,
            gate_proj: lin("ffn_gate", None)?,
            up_proj: lin("ffn_up", None)?,
            down_proj: lin("ffn_down", None)?,
        })
    };
    let layers: Vec<Layer> = {
        use rayon::prelude::*;
        (0..cfg.num_layers)
            .into_par_iter()
            .map(layer)
            .collect::<Result<_>>()?
    };
    check_shapes(path, &cfg, &embed, &layers)?;
    if let Some(head) = &lm_head {
        let dims = head.dims()?;
        if dims != (cfg.vocab_size, cfg.hidden_size) {
            return Err(ModelError::bad(
                path,
                format!(
                    "output.weight is {dims:?}, config says [{}, {}]",
                    cfg.vocab_size, cfg.hidden_size
                ),
            ));
        }
    }
    prepack(&layers, lm_head.as_ref())?;
    let eos_ids = eos_ids(
        &tokenizer,
        metadata_u32(&content.metadata, "tokenizer.ggml.eos_token_id"),
    );
    let decoder = Decoder::new(cfg, embed, layers, norm, lm_head)?;
    Ok(BaseModel {
        decoder,
        tokenizer,
        chat_template,
        eos_ids,
        name: path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        // From the map the weights are used in: a second map of the file, read through, would
        // count its pages towards this process's memory a second time (a 7B model's first load
        // peaked at 9 GB for a 4.4 GB file).
        hash: hash_remembered(
            path,
            &file.metadata().map_err(|e| ModelError::io(path, e))?,
            &hash_cache_dir(),
            HASH_CACHE_MIN_BYTES,
            || Ok(blake3::hash(&map).into()),
        )?,
        path: path.to_path_buf(),
    })
}

fn metadata_u32(md: &HashMap<String, gguf_file::Value>, key: &str) -> Option<u32> {
    md.get(key)
        .and_then(crate::config::as_u64)
        .and_then(|x| u32::try_from(x).ok())
}

/// End-of-turn ids: the model's eos plus the ChatML / common end markers it has.
fn eos_ids(tok: &Tokenizer, eos: Option<u32>) -> Vec<u32> {
    let mut ids: Vec<u32> = eos.into_iter().collect();
    for name in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>"] {
        if let Some(id) = tok.token_id(name) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Has candle repack, now, the weights it multiplies with its own kernels (formats without a
/// HiveMind kernel, such as Q2_K and Q3_K). candle tiles such a weight for its many-row kernels the
/// first time it multiplies several rows, and keeps that copy; done in the first prompt, that
/// made a 7B Q4_K_M prompt 7x slower than the same prompt afterwards. Done here, in parallel
/// across weights, it costs load time instead, as llama.cpp's own repacking at load does. Weights
/// with a HiveMind kernel (the default model's) have nothing to pack.
fn prepack(layers: &[Layer], lm_head: Option<&Weight>) -> Result<()> {
    use rayon::prelude::*;
    let weights: Vec<&Weight> = layers
        .iter()
        .flat_map(|l| {
            [
                &l.q_proj,
                &l.k_proj,
                &l.v_proj,
                &l.o_proj,
                &l.gate_proj,
                &l.up_proj,
                &l.down_proj,
            ]
            .map(|lin| &lin.weight)
        })
        .chain(lm_head)
        .filter(|w| matches!(w, Weight::Quant(_)))
        .collect();
    weights.par_iter().try_for_each(|w| -> Result<()> {
        let (_, k) = w.dims()?;
        // Several rows, as a prompt has: the path that packs.
        w.matmul_t(&Tensor::zeros((4, k), DType::F32, &Device::Cpu)?)?;
        Ok(())
    })
}

/// Where one tensor's bytes lie in a file of `file_len` bytes, checked against its length.
fn tensor_range(
    content: &gguf_file::Content,
    info: &gguf_file::TensorInfo,
    file_len: usize,
) -> std::result::Result<std::ops::Range<usize>, String> {
    let elems = info.shape.elem_count();
    let block = info.ggml_dtype.block_size();
    if block == 0 || !elems.is_multiple_of(block) {
        return Err(format!(
            "{elems} elements do not fill whole blocks of {block}"
        ));
    }
    let len = (elems / block)
        .checked_mul(info.ggml_dtype.type_size())
        .ok_or("its size overflows")?;
    let start = content
        .tensor_data_offset
        .checked_add(info.offset)
        .and_then(|s| usize::try_from(s).ok())
        .ok_or("its offset overflows")?;
    match start.checked_add(len) {
        Some(end) if end <= file_len => Ok(start..end),
        _ => Err(format!(
            "{len} bytes at offset {start} run past the end of the file ({file_len} bytes): truncated?"
        )),
    }
}

/// Undoes llama.cpp's q/k row permutation on the bytes of a `rows`-row weight (whole rows of
/// blocks): GGUF row `h*d + 2i + j` holds HF row `h*d + j*d/2 + i`.
fn unpermute_bytes(path: &Path, data: &[u8], rows: usize, heads: usize) -> Result<Vec<u8>> {
    if heads == 0 || rows == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return Err(ModelError::bad(
            path,
            format!("cannot un-permute a {rows}-row q/k weight over {heads} heads"),
        ));
    }
    let row_bytes = data.len() / rows;
    let d = rows / heads;
    let half = d / 2;
    let mut out = vec![0u8; data.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let src = h * d + 2 * i + j;
                let dst = h * d + j * half + i;
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    Ok(out)
}

fn unpermute_rows(path: &Path, q: QTensor, heads: usize) -> Result<QTensor> {
    let (rows, _) = q.shape().dims2()?;
    let dtype = q.dtype();
    let out = unpermute_bytes(path, &q.data()?, rows, heads)?;
    let storage = QStorage::from_data(std::borrow::Cow::Owned(out), &Device::Cpu, dtype)?;
    Ok(QTensor::new(storage, q.shape().clone())?)
}

/// The inverse of `unpermute_rows` on a dense `[rows, cols]` tensor: HF layout to GGUF layout.
/// Used by tests that write GGUF files from HF-layout weights.
pub fn permute_rows_for_gguf(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let d = rows / heads;
    Ok(w.reshape((heads, 2, d / 2, cols))?
        .transpose(1, 2)?
        .reshape((rows, cols))?)
}

fn check_shapes(path: &Path, cfg: &ModelConfig, embed: &Weight, layers: &[Layer]) -> Result<()> {
    let h = cfg.hidden_size;
    let (ev, eh) = embed.dims()?;
    if eh != h || ev != cfg.vocab_size {
        return Err(ModelError::bad(
            path,
            format!(
                "embedding is [{ev}, {eh}], config says [{}, {h}]",
                cfg.vocab_size
            ),
        ));
    }
    for (i, layer) in layers.iter().enumerate() {
        for m in Module::ALL {
            let got = layer.module(m).weight.dims()?;
            let dims = m.dims(cfg);
            if got != dims {
                return Err(ModelError::bad(
                    path,
                    format!("layer {i} {m} is {got:?}, expected {dims:?}"),
                ));
            }
        }
    }
    Ok(())
}

/// Loads a Hugging Face model directory (config.json, *.safetensors, tokenizer.json).
pub fn load_hf_dir(dir: &Path, opts: &LoadOptions) -> Result<BaseModel> {
    let read = |name: &str| -> Result<String> {
        let p = dir.join(name);
        std::fs::read_to_string(&p).map_err(|e| ModelError::io(p, e))
    };
    let config_path = dir.join("config.json");
    let cfg = ModelConfig::from_hf_json(&config_path, &read("config.json")?)?;
    let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
    let (chat_template, eos_token) = match read("tokenizer_config.json") {
        Ok(text) => parse_tokenizer_config(&dir.join("tokenizer_config.json"), &text)?,
        Err(_) => (None, None),
    };

    let files = safetensors_files(dir)?;
    if files.is_empty() {
        return Err(ModelError::bad(dir, "no *.safetensors files"));
    }
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for f in &files {
        let loaded = candle_core::safetensors::load(f, &Device::Cpu)
            .map_err(|e| ModelError::bad(f, format!("not a readable safetensors file: {e}")))?;
        tensors.extend(loaded);
    }
    let hash = model_hash(dir)?;
    let take = |tensors: &mut HashMap<String, Tensor>, name: &str| -> Result<Tensor> {
        let t = tensors
            .remove(name)
            .ok_or_else(|| ModelError::bad(dir, format!("missing tensor {name}")))?;
        Ok(t.to_dtype(DType::F32)?)
    };
    let quantize = |t: Tensor, dtype: GgmlDType| -> Result<Weight> {
        let (_, cols) = t.dims2()?;
        if opts.no_4bit || cols % dtype.block_size() != 0 {
            Ok(Weight::Dense(t))
        } else {
            Weight::from_qtensor(QTensor::quantize(&t, dtype)?)
        }
    };
    let embed_t = take(&mut tensors, "model.embed_tokens.weight")?;
    let lm_head = if cfg.tie_word_embeddings {
        tensors.remove("lm_head.weight");
        None
    } else {
        match tensors.contains_key("lm_head.weight") {
            true => Some(quantize(
                take(&mut tensors, "lm_head.weight")?,
                GgmlDType::Q8_0,
            )?),
            false => None,
        }
    };
    let embed = quantize(embed_t, GgmlDType::Q8_0)?;
    let norm = take(&mut tensors, "model.norm.weight")?;
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let p = format!("model.layers.{i}");
        let mut lin = |module: &str| -> Result<Linear> {
            let w = take(&mut tensors, &format!("{p}.{module}.weight"))?;
            let bias_name = format!("{p}.{module}.bias");
            let bias = match tensors.contains_key(&bias_name) {
                true => Some(take(&mut tensors, &bias_name)?),
                false => None,
            };
            Ok(Linear {
                weight: quantize(w, GgmlDType::Q4_1)?,
                bias,
                lora: None,
            })
        };
        let q_proj = lin("self_attn.q_proj")?;
        let k_proj = lin("self_attn.k_proj")?;
        let v_proj = lin("self_attn.v_proj")?;
        let o_proj = lin("self_attn.o_proj")?;
        let gate_proj = lin("mlp.gate_proj")?;
        let up_proj = lin("mlp.up_proj")?;
        let down_proj = lin("mlp.down_proj")?;
        layers.push(Layer {
            attn_norm: take(&mut tensors, &format!("{p}.input_layernorm.weight"))?,
            mlp_norm: take(
                &mut tensors,
                &format!("{p}.post_attention_layernorm.weight"),
            )?,
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            gate_proj,
            up_proj,
            down_proj,
        });
    }
    check_shapes(dir, &cfg, &embed, &layers)?;
    let eos = eos_token.and_then(|t| tokenizer.token_id(&t));
    let eos_ids = eos_ids(&tokenizer, eos);
    let decoder = Decoder::new(cfg, embed, layers, norm, lm_head)?;
    Ok(BaseModel {
        decoder,
        tokenizer,
        chat_template,
        eos_ids,
        name: dir
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        hash,
        path: dir.to_path_buf(),
    })
}

fn parse_tokenizer_config(path: &Path, text: &str) -> Result<(Option<String>, Option<String>)> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| ModelError::bad(path, e.to_string()))?;
    let template = match v.get("chat_template") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        // A list of named templates: take "default".
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_string),
        _ => None,
    };
    let eos = match v.get("eos_token") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(obj) => obj
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        None => None,
    };
    Ok((template, eos))
}

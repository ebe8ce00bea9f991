//! One decoder for the llama and qwen2 families, on candle.
//!
//! Weights are kept in the Hugging Face layout everywhere (GGUF q/k rows are un-permuted at load, see
//! `loader`), so RoPE is always the "rotate half" (neox) form and a PEFT adapter applies as written.
//! Linear layers hold their base weight either in a GGUF block format ([`Weight::Quant`]) or dense
//! ([`Weight::Dense`]), plus an optional LoRA pair.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module as _, Tensor};
use candle_nn::kv_cache::KvCache;

use crate::config::ModelConfig;
use crate::error::Result;
use crate::module::Module;
use crate::qweight::BlockWeight;

/// A frozen base weight `[out, in]`.
#[derive(Debug, Clone)]
pub enum Weight {
    /// A block format with a HiveMind SIMD kernel (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K).
    Blocks(Arc<BlockWeight>),
    /// Another GGUF block format, multiplied by candle's kernels.
    Quant(Arc<QTensor>),
    /// Dense f32.
    Dense(Tensor),
}

impl Weight {
    /// Wraps a quantized tensor: float formats become dense, block formats stay quantized.
    pub fn from_qtensor(q: QTensor) -> Result<Self> {
        Ok(match q.dtype() {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                Weight::Dense(q.dequantize(&Device::Cpu)?)
            }
            _ => match BlockWeight::from_qtensor(&q)? {
                Some(b) => Weight::Blocks(Arc::new(b)),
                None => Weight::Quant(Arc::new(q)),
            },
        })
    }

    /// `(out, in)`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        Ok(match self {
            Weight::Blocks(b) => b.dims(),
            Weight::Quant(q) => q.shape().dims2()?,
            Weight::Dense(t) => t.dims2()?,
        })
    }

    /// The weight as dense f32 (for tests and merging).
    pub fn dequantize(&self) -> Result<Tensor> {
        Ok(match self {
            Weight::Blocks(b) => b.dequantize()?,
            Weight::Quant(q) => q.dequantize(&Device::Cpu)?,
            Weight::Dense(t) => t.clone(),
        })
    }

    /// `x @ W^T` for `x` of shape `[.., in]`.
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Weight::Blocks(b) => crate::qweight::matmul_t(b, x)?,
            Weight::Quant(q) => QMatMul::QTensor(q.clone()).forward(x)?,
            Weight::Dense(w) => x.broadcast_matmul(&w.t()?)?,
        })
    }

    /// Rows `ids` of the weight, as dense f32 `[n, in]` (token embedding lookup).
    pub fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        Ok(match self {
            Weight::Blocks(b) => b.rows(ids)?,
            Weight::Quant(q) => q.embedding(&Tensor::new(ids, &Device::Cpu)?)?,
            Weight::Dense(w) => w.index_select(&Tensor::new(ids, &Device::Cpu)?, 0)?,
        })
    }

    /// Bytes this weight occupies in memory.
    pub fn size_in_bytes(&self) -> usize {
        match self {
            Weight::Blocks(b) => b.size_in_bytes(),
            Weight::Quant(q) => q.storage_size_in_bytes(),
            Weight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
        }
    }
}

/// A LoRA pair on one linear layer: `y += scale * (x A^T) B^T`.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// `[r, in]`.
    pub a: Tensor,
    /// `[out, r]`.
    pub b: Tensor,
    /// `alpha / r` (or `alpha / sqrt(r)` with rsLoRA).
    pub scale: f64,
}

/// A linear layer: frozen base weight, optional bias, optional LoRA.
#[derive(Debug, Clone)]
pub struct Linear {
    /// Base weight `[out, in]`.
    pub weight: Weight,
    /// Bias `[out]` (qwen2 q/k/v).
    pub bias: Option<Tensor>,
    /// Adapter, if any.
    pub lora: Option<LoraPair>,
}

impl Linear {
    /// Applies the layer to `x` of shape `[.., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = self.weight.matmul_t(x)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some(l) = &self.lora {
            let down = x.broadcast_matmul(&l.a.t()?)?;
            let up = down.broadcast_matmul(&l.b.t()?)?;
            y = (y + (up * l.scale)?)?;
        }
        Ok(y)
    }
}

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct Layer {
    /// RMSNorm before attention.
    pub attn_norm: Tensor,
    /// Query projection.
    pub q_proj: Linear,
    /// Key projection.
    pub k_proj: Linear,
    /// Value projection.
    pub v_proj: Linear,
    /// Attention output projection.
    pub o_proj: Linear,
    /// RMSNorm before the MLP.
    pub mlp_norm: Tensor,
    /// MLP gate.
    pub gate_proj: Linear,
    /// MLP up.
    pub up_proj: Linear,
    /// MLP down.
    pub down_proj: Linear,
}

impl Layer {
    /// The linear layer of module `m`.
    pub fn module(&self, m: Module) -> &Linear {
        match m {
            Module::QProj => &self.q_proj,
            Module::KProj => &self.k_proj,
            Module::VProj => &self.v_proj,
            Module::OProj => &self.o_proj,
            Module::GateProj => &self.gate_proj,
            Module::UpProj => &self.up_proj,
            Module::DownProj => &self.down_proj,
        }
    }

    /// Mutable access to the linear layer of module `m`.
    pub fn module_mut(&mut self, m: Module) -> &mut Linear {
        match m {
            Module::QProj => &mut self.q_proj,
            Module::KProj => &mut self.k_proj,
            Module::VProj => &mut self.v_proj,
            Module::OProj => &mut self.o_proj,
            Module::GateProj => &mut self.gate_proj,
            Module::UpProj => &mut self.up_proj,
            Module::DownProj => &mut self.down_proj,
        }
    }
}

/// The weights of a decoder-only transformer.
#[derive(Debug, Clone)]
pub struct Decoder {
    /// Hyper-parameters.
    pub cfg: ModelConfig,
    /// Token embedding `[vocab, hidden]`.
    pub embed: Weight,
    /// Decoder layers.
    pub layers: Vec<Layer>,
    /// Final RMSNorm.
    pub norm: Tensor,
    /// Output head `[vocab, hidden]`; `None` when tied to the embedding.
    pub lm_head: Option<Weight>,
    cos: Tensor,
    sin: Tensor,
}

/// Per-sequence attention state.
#[derive(Debug, Clone)]
pub struct Cache {
    layers: Vec<KvCache>,
    len: usize,
}

impl Cache {
    /// Number of positions already processed.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets everything.
    pub fn reset(&mut self) {
        for l in &mut self.layers {
            l.reset();
        }
        self.len = 0;
    }
}

/// Upper bound of the precomputed RoPE table, whatever the model claims.
const MAX_ROPE_POSITIONS: usize = 8192;

impl Decoder {
    /// Assembles a decoder and precomputes its RoPE table.
    pub fn new(
        cfg: ModelConfig,
        embed: Weight,
        layers: Vec<Layer>,
        norm: Tensor,
        lm_head: Option<Weight>,
    ) -> Result<Self> {
        let positions = cfg.max_seq_len.clamp(1, MAX_ROPE_POSITIONS);
        let half = cfg.head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| (1.0 / cfg.rope_theta.powf(2.0 * i as f64 / cfg.head_dim as f64)) as f32)
            .collect();
        let inv = Tensor::from_vec(inv, (1, half), &Device::Cpu)?;
        let t = Tensor::arange(0u32, positions as u32, &Device::Cpu)?
            .to_dtype(DType::F32)?
            .reshape((positions, 1))?;
        let freqs = t.broadcast_mul(&inv)?;
        Ok(Decoder {
            cos: freqs.cos()?,
            sin: freqs.sin()?,
            cfg,
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    /// A fresh attention cache.
    pub fn new_cache(&self) -> Cache {
        Cache {
            layers: (0..self.cfg.num_layers)
                .map(|_| KvCache::new(2, 256))
                .collect(),
            len: 0,
        }
    }

    /// Longest sequence this decoder can process.
    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }

    /// Runs `ids` (continuing the sequence in `cache`) and returns the logits of the last position,
    /// shape `[vocab]`.
    pub fn forward_last(&self, ids: &[u32], cache: &mut Cache) -> Result<Tensor> {
        let hidden = self.forward_hidden(ids, cache)?;
        let seq = hidden.dim(1)?;
        let last = hidden.narrow(1, seq - 1, 1)?;
        let logits = self.head(&last)?;
        Ok(logits.flatten_all()?)
    }

    /// Output head: `[.., hidden] -> [.., vocab]`.
    pub fn head(&self, x: &Tensor) -> Result<Tensor> {
        let x = candle_nn::ops::rms_norm(x, &self.norm, self.cfg.rms_norm_eps as f32)?;
        match &self.lm_head {
            Some(w) => w.matmul_t(&x),
            None => self.embed.matmul_t(&x),
        }
    }

    /// Runs `ids` and returns the hidden states before the final norm, `[1, seq, hidden]`.
    pub fn forward_hidden(&self, ids: &[u32], cache: &mut Cache) -> Result<Tensor> {
        let seq = ids.len();
        let pos = cache.len;
        if pos + seq > self.max_positions() {
            return Err(crate::ModelError::ContextFull {
                tokens: pos + seq,
                max: self.max_positions(),
            });
        }
        let mut x = self.embed.rows(ids)?.unsqueeze(0)?;
        let cos = self.cos.narrow(0, pos, seq)?;
        let sin = self.sin.narrow(0, pos, seq)?;
        let mask = causal_mask(seq, pos)?;
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = self.layer_forward(layer, &x, &cos, &sin, mask.as_ref(), kv)?;
        }
        cache.len += seq;
        Ok(x)
    }

    fn layer_forward(
        &self,
        layer: &Layer,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        kv: &mut KvCache,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, seq, _) = x.dims3()?;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let eps = cfg.rms_norm_eps as f32;

        let h = candle_nn::ops::rms_norm(x, &layer.attn_norm, eps)?;
        let q = layer.q_proj.forward(&h)?;
        let k = layer.k_proj.forward(&h)?;
        let v = layer.v_proj.forward(&h)?;
        let q = q.reshape((b, seq, nh, hd))?.transpose(1, 2)?.contiguous()?;
        let k = k
            .reshape((b, seq, nkv, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let v = v
            .reshape((b, seq, nkv, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        let (k, v) = kv.append(&k, &v)?;
        let total = k.dim(2)?;

        // Grouped-query attention without copying K/V: the `rep` query heads that share a kv head
        // are stacked as extra rows of one matmul.
        let rep = nh / nkv;
        let q = q.reshape((b, nkv, rep * seq, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let att = (q.matmul(&k.t()?)? * scale)?;
        let att = match mask {
            Some(m) => att
                .reshape((b, nkv, rep, seq, total))?
                .broadcast_add(m)?
                .reshape((b, nkv, rep * seq, total))?,
            None => att,
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.matmul(&v)?; // [b, nkv, rep*seq, hd]
        let y = y
            .reshape((b, nh, seq, hd))?
            .transpose(1, 2)?
            .reshape((b, seq, nh * hd))?;
        let x = (x + layer.o_proj.forward(&y)?)?;

        let h = candle_nn::ops::rms_norm(&x, &layer.mlp_norm, eps)?;
        let gate = candle_nn::ops::silu(&layer.gate_proj.forward(&h)?)?;
        let up = layer.up_proj.forward(&h)?;
        let down = layer.down_proj.forward(&(gate * up)?)?;
        Ok((x + down)?)
    }
}

/// `[seq, pos + seq]` additive mask: 0 where query `i` may see key `j`, -inf after it.
fn causal_mask(seq: usize, pos: usize) -> Result<Option<Tensor>> {
    if seq == 1 {
        return Ok(None);
    }
    let total = pos + seq;
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| (0..total).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Some(Tensor::from_vec(mask, (seq, total), &Device::Cpu)?))
}

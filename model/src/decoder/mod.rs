//! One decoder for the llama and qwen2 families, on candle.
//!
//! Weights are kept in the Hugging Face layout everywhere (GGUF q/k rows are un-permuted at load, see
//! `loader`), so RoPE is always the "rotate half" (neox) form and a PEFT adapter applies as written.
//! Linear layers hold their base weight either in a GGUF block format ([`Weight::Quant`]) or dense
//! ([`Weight::Dense`]), plus an optional LoRA pair.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module as _, Tensor};

use crate::config::ModelConfig;
use crate::error::Result;
use crate::module::Module;
use crate::qweight::BlockWeight;
use crate::train::ops::RopeTable;

mod forward;

pub(crate) use forward::dot;
pub use forward::Cache;

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

    /// `x W^T` on plain rows: `x` holds `m` rows of `in` values, the result `m` rows of `out`.
    /// Block formats run HiveMind's kernels (one row is split over [`crate::kernels::Pool`]);
    /// other formats go through candle.
    pub fn matmul_t_rows(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let (n, k) = self.dims()?;
        if x.len() != m * k {
            return Err(candle_core::Error::Msg(format!(
                "matmul: {} values are not {m} rows of {k}",
                x.len()
            ))
            .into());
        }
        match self {
            Weight::Blocks(b) => Ok(b.matmul_t_slice(x, m)),
            Weight::Dense(w) => with_f32(w, |w| {
                let mut y = vec![0f32; m * n];
                crate::train::ops::matmul(
                    &mut y,
                    n,
                    crate::train::ops::View::new(x, m, k),
                    crate::train::ops::View::new(w, n, k).t(),
                    1.0,
                    false,
                    m * n * k >= 1 << 20,
                );
                Ok(y)
            }),
            Weight::Quant(_) => {
                let xt = Tensor::from_slice(x, (m, k), &Device::Cpu)?;
                Ok(self.matmul_t(&xt)?.flatten_all()?.to_vec1::<f32>()?)
            }
        }
    }

    /// [`Weight::matmul_t_rows`] of several weights on the same rows `x`: block weights go
    /// together through [`crate::qweight::matmul_t_many`] (one pool job for one row).
    pub fn matmul_t_rows_many(ws: &[&Weight], x: &[f32], m: usize) -> Result<Vec<Vec<f32>>> {
        let blocks: Option<Vec<&BlockWeight>> = ws
            .iter()
            .map(|w| match w {
                Weight::Blocks(b) if b.dims().1 * m == x.len() => Some(&**b),
                _ => None,
            })
            .collect();
        match blocks {
            Some(bs) => Ok(crate::qweight::matmul_t_many(&bs, x, m)),
            None => ws.iter().map(|w| w.matmul_t_rows(x, m)).collect(),
        }
    }

    /// Rows `ids` of the weight as plain f32 rows (token embedding lookup).
    pub fn rows_vec(&self, ids: &[u32]) -> Result<Vec<f32>> {
        Ok(self.rows(ids)?.flatten_all()?.to_vec1::<f32>()?)
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
    /// Applies the layer to `m` plain rows `x` of `in` values; returns `m` rows of `out`.
    pub fn forward_rows(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let y = self.weight.matmul_t_rows(x, m)?;
        self.finish(x, m, y)
    }

    /// [`Linear::forward_rows`] of several layers on the same rows (see
    /// [`Weight::matmul_t_rows_many`]).
    pub fn forward_rows_many(ls: &[&Linear], x: &[f32], m: usize) -> Result<Vec<Vec<f32>>> {
        let ws: Vec<&Weight> = ls.iter().map(|l| &l.weight).collect();
        let ys = Weight::matmul_t_rows_many(&ws, x, m)?;
        ls.iter().zip(ys).map(|(l, y)| l.finish(x, m, y)).collect()
    }

    /// Adds the bias and the LoRA term to the base product `y` of the rows `x`.
    fn finish(&self, x: &[f32], m: usize, mut y: Vec<f32>) -> Result<Vec<f32>> {
        let out = y.len() / m.max(1);
        if let Some(b) = &self.bias {
            with_f32(b, |b| {
                for row in y.chunks_exact_mut(out) {
                    row.iter_mut().zip(b).for_each(|(y, b)| *y += b);
                }
                Ok(())
            })?;
        }
        if let Some(l) = &self.lora {
            use crate::train::ops::{matmul, View};
            let (r, inp) = l.a.dims2()?;
            // One token's products are far too small to share out.
            let parallel = m * r * (inp + out) >= 1 << 20;
            with_f32(&l.a, |a| {
                with_f32(&l.b, |b| {
                    let mut u = vec![0f32; m * r];
                    let a = View::new(a, r, inp).t();
                    matmul(&mut u, r, View::new(x, m, inp), a, 1.0, false, parallel);
                    let b = View::new(b, out, r).t();
                    let scale = l.scale as f32;
                    matmul(&mut y, out, View::new(&u, m, r), b, scale, true, parallel);
                    Ok(())
                })
            })?;
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
    rope: RopeTable,
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
        Ok(Decoder {
            rope: RopeTable::new(cfg.head_dim, cfg.rope_theta, positions),
            cfg,
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    /// Longest sequence this decoder can process.
    pub fn max_positions(&self) -> usize {
        self.rope.positions()
    }

    /// Output head: `[.., hidden] -> [.., vocab]`.
    pub fn head(&self, x: &Tensor) -> Result<Tensor> {
        let x = candle_nn::ops::rms_norm(x, &self.norm, self.cfg.rms_norm_eps as f32)?;
        self.head_weight().matmul_t(&x)
    }

    /// The output head's weight (the embedding when they are tied).
    pub fn head_weight(&self) -> &Weight {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}

/// Runs `f` on the values of an f32 tensor on the CPU, without copying them when it is
/// contiguous.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Err(candle_core::Error::Msg("HiveMind runs models on the CPU only".into()).into());
    };
    let all = cpu.as_slice::<f32>()?;
    let (a, b) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("tensor is not contiguous".into()))?;
    f(&all[a..b])
}

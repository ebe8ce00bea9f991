//! LoRA training on CPU (QLoRA when the base is quantized): the trainer, AdamW, the learning-rate
//! schedule and the training loop that turns examples into a PEFT adapter.
//!
//! ```text
//!  Example batches ──Trainer::accumulate──▶ forward: embed → layers → final norm → fused CE
//!                                           (saves per layer: x, q, k, v, attn out, x_mid, gate, up)
//!                                           backward: CE → layers in reverse → LoRA grads
//!  grads ──Trainer::optimizer_step(lr)──▶ clip, AdamW on the LoRA A/B only
//!  train(): epochs of length-grouped batches, gradient accumulation, warmup + linear decay,
//!           progress callback, stop flag ──▶ TrainOutcome { adapter (PEFT), info }
//! ```
//!
//! Only LoRA A (`[r, in]`) and B (`[out, r]`) in f32 are parameters. Base weights stay in their
//! GGUF blocks; each frozen matmul dequantizes one weight at a time into a scratch panel (see
//! [`crate::train_ops`]) and never computes the weight's gradient, while the input gradient flows
//! through every frozen layer to the LoRA weights of earlier layers.
//!
//! Sequences of a batch are packed back to back with no padding: every token-wise op runs on all
//! tokens at once and attention stays within each sequence. The loss is the mean cross-entropy over
//! the target (assistant) tokens of an accumulation window, like Hugging Face's Trainer.
//!
//! Same examples, config, seed and thread count give the same adapter bytes: shuffles and LoRA
//! init come from seeded generators, dropout masks from counters, and every reduction has a fixed
//! order.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::adapter::{AdapterConfig, LoraAdapter, LoraTensor, TargetModules};
use crate::dataset::{length_grouped_batches, Example};
use crate::decoder::Decoder;
use crate::error::{ModelError, Result};
use crate::loader::BaseModel;
use crate::lora::peft_name;
use crate::module::Module;
use crate::train_ops::{self as ops, AttnShape, DropoutMask, LoraDims, RopeTable};

/// AdamW's `(beta1, beta2)` (PyTorch's and Hugging Face's defaults).
pub const ADAM_BETAS: (f32, f32) = (0.9, 0.999);
/// AdamW's epsilon.
pub const ADAM_EPS: f32 = 1e-8;

/// The LoRA adapter to train.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    /// Rank `r`.
    pub rank: usize,
    /// `lora_alpha`; the update is scaled by `alpha / r`.
    pub alpha: f64,
    /// Dropout on the LoRA input during training.
    pub dropout: f64,
    /// Adapted modules.
    pub target_modules: Vec<Module>,
}

impl Default for LoraSpec {
    fn default() -> Self {
        LoraSpec {
            rank: 16,
            alpha: 32.0,
            dropout: 0.05,
            target_modules: Module::ALL.to_vec(),
        }
    }
}

impl LoraSpec {
    /// The spec of an existing adapter (to continue training it).
    pub fn from_adapter(a: &LoraAdapter) -> Result<Self> {
        let names = a
            .config
            .target_modules
            .names()
            .ok_or_else(|| ModelError::Training {
                reason: "an adapter whose target_modules is a pattern cannot be continued".into(),
            })?;
        let target_modules = names
            .iter()
            .map(|n| n.parse::<Module>())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| ModelError::Training {
                reason: format!("the adapter cannot be continued: {e}"),
            })?;
        Ok(LoraSpec {
            rank: a.config.r,
            alpha: a.config.scaling() * a.config.r as f64,
            dropout: a.config.lora_dropout,
            target_modules,
        })
    }

    fn module_mask(&self) -> Result<[bool; Module::COUNT]> {
        let mut mask = [false; Module::COUNT];
        for m in &self.target_modules {
            mask[m.index()] = true;
        }
        if !mask.iter().any(|&m| m) {
            return Err(ModelError::Training {
                reason: "no target modules".into(),
            });
        }
        if self.rank == 0 {
            return Err(ModelError::Training {
                reason: "LoRA rank must be at least 1".into(),
            });
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(ModelError::Training {
                reason: format!("dropout {} is not in [0, 1)", self.dropout),
            });
        }
        Ok(mask)
    }
}

/// Everything a training run needs besides the model and the data.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// The adapter.
    pub lora: LoraSpec,
    /// Peak learning rate.
    pub lr: f64,
    /// Passes over the data (unless `max_steps` says otherwise).
    pub epochs: usize,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Fraction of the steps spent warming the learning rate up from 0.
    pub warmup_ratio: f64,
    /// Longer examples are cut to this many tokens.
    pub max_seq_len: usize,
    /// Stop after this many optimizer steps (running more epochs if needed).
    pub max_steps: Option<usize>,
    /// Seed of the LoRA init, the shuffles and dropout.
    pub seed: u64,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (Hugging Face's default is 1.0).
    pub max_grad_norm: Option<f64>,
}

impl Default for TrainConfig {
    /// The legacy tool's defaults.
    fn default() -> Self {
        TrainConfig {
            lora: LoraSpec::default(),
            lr: 2e-4,
            epochs: 3,
            batch_size: 4,
            grad_accum: 4,
            warmup_ratio: 0.03,
            max_seq_len: 512,
            max_steps: None,
            seed: 42,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
        }
    }
}

/// Learning rate of optimizer step `step` (0-based) of `total`: linear warmup over `warmup` steps
/// from 0, then linear decay to 0 (Hugging Face's `get_linear_schedule_with_warmup`).
pub fn lr_at(lr: f64, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        lr * step as f64 / warmup.max(1) as f64
    } else {
        lr * ((total.saturating_sub(step)) as f64 / total.saturating_sub(warmup).max(1) as f64)
            .max(0.0)
    }
}

/// One LoRA pair and its optimizer state.
#[derive(Debug, Clone)]
struct Slot {
    layer: usize,
    module: Module,
    dims: LoraDims,
    a: Vec<f32>,
    b: Vec<f32>,
    ga: Vec<f32>,
    gb: Vec<f32>,
    ma: Vec<f32>,
    va: Vec<f32>,
    mb: Vec<f32>,
    vb: Vec<f32>,
}

/// The small dense parameters of a layer, as plain vectors.
#[derive(Debug, Clone)]
struct LayerParams {
    attn_norm: Vec<f32>,
    mlp_norm: Vec<f32>,
    bias: [Option<Vec<f32>>; Module::COUNT],
}

/// What the backward of one layer needs from its forward.
#[derive(Debug, Default)]
struct Saved {
    x_in: Vec<f32>,
    inv1: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    o: Vec<f32>,
    lse: Vec<f32>,
    x_mid: Vec<f32>,
    inv2: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    u: [Vec<f32>; Module::COUNT],
    masks: [Option<DropoutMask>; Module::COUNT],
}

/// Scratch buffers, reused from step to step.
#[derive(Debug, Default)]
struct Work {
    h: Vec<f32>,
    inv: Vec<f32>,
    tmp: Vec<f32>,
    act: Vec<f32>,
    xd: Vec<f32>,
    panel: Vec<f32>,
    gx: Vec<f32>,
    gh: Vec<f32>,
    go: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    g_act: Vec<f32>,
    gg: Vec<f32>,
    gup: Vec<f32>,
    glx: Vec<f32>,
    gu: Vec<f32>,
    x_final: Vec<f32>,
    inv_final: Vec<f32>,
    ce: ops::CeScratch,
}

/// A batch packed into one token stream.
#[derive(Debug)]
struct Packed {
    ids: Vec<u32>,
    segs: Vec<Range<usize>>,
    pos: Vec<usize>,
    /// Positions whose next token is a target, and those targets.
    rows: Vec<usize>,
    targets: Vec<u32>,
}

/// Loss of a batch.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BatchLoss {
    /// Sum of the cross-entropy over target tokens.
    pub loss_sum: f64,
    /// Number of target tokens.
    pub targets: usize,
    /// Number of tokens processed.
    pub tokens: usize,
}

impl BatchLoss {
    /// Mean loss per target token.
    pub fn mean(&self) -> f64 {
        self.loss_sum / self.targets.max(1) as f64
    }
}

fn tensor_vec(t: &candle_core::Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

fn add_into(dst: &mut [f32], src: &[f32]) {
    dst.par_chunks_mut(8192)
        .zip(src.par_chunks(8192))
        .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, s)| *d += s));
}

/// `v[..n]`, growing `v` if needed: a buffer shared by several sizes is zeroed only when it grows.
fn grow(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

fn resize(v: &mut Vec<f32>, n: usize) {
    if v.len() != n {
        v.resize(n, 0.0);
    }
}

/// Shared, read-only context of one forward/backward pass.
struct Pass<'a> {
    dec: &'a Decoder,
    layers: &'a [LayerParams],
    t: usize,
}

impl Pass<'_> {
    /// `y = x W^T + bias + LoRA` for module `m` of layer `l`; saves the LoRA projection in `u`
    /// and the dropout mask (drawn from `drop`) in `mask`.
    #[allow(clippy::too_many_arguments)]
    fn linear_forward(
        &self,
        l: usize,
        m: Module,
        slot: Option<&Slot>,
        drop: Option<(f32, u64)>,
        x: &[f32],
        y: &mut Vec<f32>,
        u: &mut Vec<f32>,
        mask: &mut Option<DropoutMask>,
        work_xd: &mut Vec<f32>,
        panel: &mut Vec<f32>,
    ) -> Result<()> {
        let lin = self.dec.layers[l].module(m);
        let (out, _) = lin.weight.dims()?;
        resize(y, self.t * out);
        ops::frozen_forward(&lin.weight, x, self.t, y, panel)?;
        if let Some(b) = &self.layers[l].bias[m.index()] {
            y.par_chunks_mut(out)
                .for_each(|row| row.iter_mut().zip(b).for_each(|(y, b)| *y += b));
        }
        *mask = None;
        if let Some(s) = slot {
            resize(u, self.t * s.dims.r);
            let xin: &[f32] = match drop {
                Some((p, seed)) if p > 0.0 => {
                    let mk = DropoutMask::new(seed, x.len(), p);
                    let xd = grow(work_xd, x.len());
                    mk.apply(x, xd);
                    *mask = Some(mk);
                    xd
                }
                _ => x,
            };
            ops::lora_forward(s.dims, xin, self.t, &s.a, &s.b, u, y);
        }
        Ok(())
    }

    /// The backward of [`Pass::linear_forward`] for output gradient `gy`: accumulates the LoRA
    /// gradients and, with `need_gx`, writes (or adds, with `accumulate`) the input gradient.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        l: usize,
        m: Module,
        slot: Option<&mut Slot>,
        x: &[f32],
        u: &[f32],
        mask: Option<&DropoutMask>,
        gy: &[f32],
        gx: &mut Vec<f32>,
        accumulate: bool,
        need_gx: bool,
        w: &mut Work,
    ) -> Result<()> {
        let lin = self.dec.layers[l].module(m);
        let (_, inp) = lin.weight.dims()?;
        if need_gx {
            resize(gx, self.t * inp);
            ops::frozen_backward(&lin.weight, gy, self.t, gx, accumulate, &mut w.panel)?;
        }
        if let Some(s) = slot {
            let xin: &[f32] = match mask {
                Some(mk) => {
                    let xd = grow(&mut w.xd, x.len());
                    mk.apply(x, xd);
                    xd
                }
                None => x,
            };
            let gu = grow(&mut w.gu, self.t * s.dims.r);
            let glx = grow(&mut w.glx, self.t * inp);
            let Slot { a, b, ga, gb, .. } = s;
            ops::lora_backward(s.dims, xin, u, gy, self.t, a, b, ga, gb, gu, glx);
            if need_gx {
                match mask {
                    Some(mk) => mk.apply_add(glx, gx),
                    None => add_into(gx, glx),
                }
            }
        }
        Ok(())
    }
}

/// Trains LoRA pairs on a frozen decoder: forward, backward and AdamW on the LoRA weights.
#[derive(Debug)]
pub struct Trainer<'m> {
    dec: &'m Decoder,
    spec: LoraSpec,
    slots: Vec<Slot>,
    index: Vec<[Option<usize>; Module::COUNT]>,
    layers: Vec<LayerParams>,
    final_norm: Vec<f32>,
    rope: RopeTable,
    seed: u64,
    micro: u64,
    adam_t: i32,
    weight_decay: f32,
    max_grad_norm: Option<f64>,
    saved: Vec<Saved>,
    work: Work,
}

impl<'m> Trainer<'m> {
    /// LoRA pairs for `spec` on `dec`, initialised like PEFT (A Kaiming-uniform with
    /// `a = sqrt(5)`, i.e. uniform in `±1/sqrt(in)`, B zero) from `seed`, or taken from `init` (which
    /// must have the same rank and target modules).
    pub fn new(
        dec: &'m Decoder,
        spec: &LoraSpec,
        init: Option<&LoraAdapter>,
        seed: u64,
    ) -> Result<Self> {
        let mask = spec.module_mask()?;
        if dec.layers.iter().any(|l| l.q_proj.lora.is_some()) {
            return Err(ModelError::Training {
                reason: "the base model already has an adapter applied; train on a clean model (use an initial adapter to continue one)".into(),
            });
        }
        let scale = (spec.alpha / spec.rank as f64) as f32;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut slots = Vec::new();
        let mut index = vec![[None; Module::COUNT]; dec.layers.len()];
        let mut init_used = 0usize;
        for (l, layer) in dec.layers.iter().enumerate() {
            for m in Module::ALL {
                if !mask[m.index()] {
                    continue;
                }
                let (out, inp) = layer.module(m).weight.dims()?;
                let r = spec.rank;
                let (a, b) = match init {
                    Some(ad) => {
                        let get = |which: &str, shape: [usize; 2]| -> Result<Vec<f32>> {
                            let name = peft_name(l, m, which);
                            let t = ad.tensors.get(&name).ok_or_else(|| {
                                ModelError::AdapterMismatch {
                                    reason: format!("initial adapter lacks {name}"),
                                }
                            })?;
                            if t.shape != shape {
                                return Err(ModelError::AdapterMismatch {
                                    reason: format!(
                                        "{name} is {:?}, training needs {shape:?}",
                                        t.shape
                                    ),
                                });
                            }
                            Ok(t.data.clone())
                        };
                        init_used += 2;
                        (get("A", [r, inp])?, get("B", [out, r])?)
                    }
                    None => {
                        let bound = 1.0 / (inp as f32).sqrt();
                        let a: Vec<f32> =
                            (0..r * inp).map(|_| rng.gen_range(-bound..bound)).collect();
                        (a, vec![0f32; out * r])
                    }
                };
                index[l][m.index()] = Some(slots.len());
                slots.push(Slot {
                    layer: l,
                    module: m,
                    dims: LoraDims { r, inp, out, scale },
                    ga: vec![0.0; a.len()],
                    gb: vec![0.0; b.len()],
                    ma: vec![0.0; a.len()],
                    va: vec![0.0; a.len()],
                    mb: vec![0.0; b.len()],
                    vb: vec![0.0; b.len()],
                    a,
                    b,
                });
            }
        }
        if let Some(ad) = init {
            if ad.tensors.len() != init_used {
                return Err(ModelError::AdapterMismatch {
                    reason: format!(
                        "initial adapter has {} tensors, the training spec uses {init_used}",
                        ad.tensors.len()
                    ),
                });
            }
        }
        let layers = dec
            .layers
            .iter()
            .map(|layer| {
                let mut bias: [Option<Vec<f32>>; 7] = Default::default();
                for m in Module::ALL {
                    if let Some(t) = &layer.module(m).bias {
                        bias[m.index()] = Some(tensor_vec(t)?);
                    }
                }
                Ok(LayerParams {
                    attn_norm: tensor_vec(&layer.attn_norm)?,
                    mlp_norm: tensor_vec(&layer.mlp_norm)?,
                    bias,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let cfg = &dec.cfg;
        Ok(Trainer {
            dec,
            spec: spec.clone(),
            slots,
            index,
            layers,
            final_norm: tensor_vec(&dec.norm)?,
            rope: RopeTable::new(cfg.head_dim, cfg.rope_theta, dec.max_positions()),
            seed,
            micro: 0,
            adam_t: 0,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
            saved: (0..dec.layers.len()).map(|_| Saved::default()).collect(),
            work: Work::default(),
        })
    }

    /// Sets AdamW's weight decay and the gradient clipping norm (defaults: 0 and 1.0).
    pub fn set_optimizer(&mut self, weight_decay: f64, max_grad_norm: Option<f64>) {
        self.weight_decay = weight_decay as f32;
        self.max_grad_norm = max_grad_norm;
    }

    /// The LoRA spec being trained.
    pub fn spec(&self) -> &LoraSpec {
        &self.spec
    }

    /// Number of trainable values (all A and B).
    pub fn num_parameters(&self) -> usize {
        self.slots.iter().map(|s| s.a.len() + s.b.len()).sum()
    }

    fn pack(&self, batch: &[&Example]) -> Result<Packed> {
        let vocab = self.dec.cfg.vocab_size;
        let mut p = Packed {
            ids: Vec::new(),
            segs: Vec::new(),
            pos: Vec::new(),
            rows: Vec::new(),
            targets: Vec::new(),
        };
        for ex in batch {
            if ex.ids.len() != ex.targets.len() {
                return Err(ModelError::Training {
                    reason: "an example's ids and targets differ in length".into(),
                });
            }
            if ex.ids.len() > self.rope.positions() {
                return Err(ModelError::Training {
                    reason: format!(
                        "an example of {} tokens exceeds the model's {} positions",
                        ex.ids.len(),
                        self.rope.positions()
                    ),
                });
            }
            if let Some(&bad) = ex.ids.iter().find(|&&i| i as usize >= vocab) {
                return Err(ModelError::Training {
                    reason: format!("token id {bad} is outside the vocabulary of {vocab}"),
                });
            }
            let start = p.ids.len();
            for i in 0..ex.ids.len() {
                if i + 1 < ex.ids.len() && ex.targets[i + 1] {
                    p.rows.push(start + i);
                    p.targets.push(ex.ids[i + 1]);
                }
                p.pos.push(i);
            }
            p.ids.extend_from_slice(&ex.ids);
            if !ex.ids.is_empty() {
                p.segs.push(start..p.ids.len());
            }
        }
        if p.ids.is_empty() {
            return Err(ModelError::Training {
                reason: "empty batch".into(),
            });
        }
        Ok(p)
    }

    /// Forward through all layers, saving what the backward needs; leaves the last hidden state
    /// in `work.x_final`.
    fn forward(&mut self, p: &Packed, train: bool) -> Result<()> {
        let cfg = &self.dec.cfg;
        let t = p.ids.len();
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let shape = AttnShape {
            heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
            head_dim: hd,
        };
        let eps = cfg.rms_norm_eps as f32;
        let dropout = self.spec.dropout as f32;
        let micro = self.micro;
        let seed = self.seed;
        let Trainer {
            dec,
            slots,
            index,
            layers,
            rope,
            saved,
            work,
            ..
        } = self;
        let (dec, layers): (&Decoder, &[LayerParams]) = (*dec, layers);
        let pass = Pass { dec, layers, t };
        let mut x = tensor_vec(&dec.embed.rows(&p.ids)?)?;
        for (l, s) in saved.iter_mut().enumerate() {
            let lp = &layers[l];
            let slot = |m: Module| index[l][m.index()].map(|i| &slots[i]);
            let drop = |m: Module| {
                (train && dropout > 0.0).then(|| {
                    let words = [seed, micro, l as u64, m.index() as u64];
                    (dropout, ops::mix_seed(&words))
                })
            };
            s.x_in.clear();
            s.x_in.extend_from_slice(&x);
            resize(&mut work.h, t * h);
            resize(&mut s.inv1, t);
            ops::rms_norm_forward(&x, &lp.attn_norm, eps, &mut work.h, &mut s.inv1);
            let [uq, uk, uv, uo, ug, uu, ud] = &mut s.u;
            let [mq, mk, mv, mo, mg, mu, md] = &mut s.masks;
            pass.linear_forward(
                l,
                Module::QProj,
                slot(Module::QProj),
                drop(Module::QProj),
                &work.h,
                &mut s.q,
                uq,
                mq,
                &mut work.xd,
                &mut work.panel,
            )?;
            pass.linear_forward(
                l,
                Module::KProj,
                slot(Module::KProj),
                drop(Module::KProj),
                &work.h,
                &mut s.k,
                uk,
                mk,
                &mut work.xd,
                &mut work.panel,
            )?;
            pass.linear_forward(
                l,
                Module::VProj,
                slot(Module::VProj),
                drop(Module::VProj),
                &work.h,
                &mut s.v,
                uv,
                mv,
                &mut work.xd,
                &mut work.panel,
            )?;
            ops::rope_forward(&mut s.q, &p.pos, hd, rope);
            ops::rope_forward(&mut s.k, &p.pos, hd, rope);
            resize(&mut s.o, t * shape.heads * hd);
            resize(&mut s.lse, t * shape.heads);
            ops::attention_forward(&s.q, &s.k, &s.v, &p.segs, shape, &mut s.o, &mut s.lse)?;
            pass.linear_forward(
                l,
                Module::OProj,
                slot(Module::OProj),
                drop(Module::OProj),
                &s.o,
                &mut work.tmp,
                uo,
                mo,
                &mut work.xd,
                &mut work.panel,
            )?;
            add_into(&mut x, &work.tmp);
            s.x_mid.clear();
            s.x_mid.extend_from_slice(&x);
            resize(&mut s.inv2, t);
            ops::rms_norm_forward(&x, &lp.mlp_norm, eps, &mut work.h, &mut s.inv2);
            pass.linear_forward(
                l,
                Module::GateProj,
                slot(Module::GateProj),
                drop(Module::GateProj),
                &work.h,
                &mut s.gate,
                ug,
                mg,
                &mut work.xd,
                &mut work.panel,
            )?;
            pass.linear_forward(
                l,
                Module::UpProj,
                slot(Module::UpProj),
                drop(Module::UpProj),
                &work.h,
                &mut s.up,
                uu,
                mu,
                &mut work.xd,
                &mut work.panel,
            )?;
            resize(&mut work.act, s.gate.len());
            ops::silu_mul_forward(&s.gate, &s.up, &mut work.act);
            pass.linear_forward(
                l,
                Module::DownProj,
                slot(Module::DownProj),
                drop(Module::DownProj),
                &work.act,
                &mut work.tmp,
                ud,
                md,
                &mut work.xd,
                &mut work.panel,
            )?;
            add_into(&mut x, &work.tmp);
        }
        work.x_final = x;
        Ok(())
    }

    /// Final norm and fused cross-entropy on the target rows. Returns the loss and leaves the
    /// gradient of `loss_weight * sum(loss)` with respect to the last hidden state in `work.gx`.
    fn head(&mut self, p: &Packed, loss_weight: f32) -> Result<BatchLoss> {
        let cfg = &self.dec.cfg;
        let (t, h) = (p.ids.len(), cfg.hidden_size);
        let eps = cfg.rms_norm_eps as f32;
        let w = &mut self.work;
        resize(&mut w.h, t * h);
        resize(&mut w.inv_final, t);
        ops::rms_norm_forward(
            &w.x_final,
            &self.final_norm,
            eps,
            &mut w.h,
            &mut w.inv_final,
        );
        let n = p.rows.len();
        resize(&mut w.tmp, n * h);
        for (j, &r) in p.rows.iter().enumerate() {
            w.tmp[j * h..(j + 1) * h].copy_from_slice(&w.h[r * h..(r + 1) * h]);
        }
        resize(&mut w.gh, n * h);
        let head = self.dec.lm_head.as_ref().unwrap_or(&self.dec.embed);
        let losses =
            ops::cross_entropy_fused(&w.tmp, head, &p.targets, loss_weight, &mut w.gh, &mut w.ce)?;
        // Scatter the row gradients and back through the final norm.
        resize(&mut w.tmp, t * h);
        w.tmp.fill(0.0);
        for (j, &r) in p.rows.iter().enumerate() {
            w.tmp[r * h..(r + 1) * h].copy_from_slice(&w.gh[j * h..(j + 1) * h]);
        }
        resize(&mut w.gx, t * h);
        ops::rms_norm_backward(
            &w.x_final,
            &self.final_norm,
            &w.inv_final,
            &w.tmp,
            &mut w.gx,
            false,
        );
        Ok(BatchLoss {
            loss_sum: losses.iter().map(|&l| l as f64).sum(),
            targets: n,
            tokens: t,
        })
    }

    /// Backward through all layers from the gradient in `work.gx`, accumulating LoRA gradients.
    fn backward(&mut self, p: &Packed) -> Result<()> {
        let cfg = &self.dec.cfg;
        let t = p.ids.len();
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let shape = AttnShape {
            heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
            head_dim: hd,
        };
        let eps = cfg.rms_norm_eps as f32;
        let Trainer {
            dec,
            slots,
            index,
            layers,
            rope,
            saved,
            work: w,
            ..
        } = self;
        let (dec, layers): (&Decoder, &[LayerParams]) = (*dec, layers);
        let pass = Pass { dec, layers, t };
        let mut gx = std::mem::take(&mut w.gx);
        for l in (0..dec.layers.len()).rev() {
            let s = &saved[l];
            let lp = &layers[l];
            let idx = index[l];
            // The backward of module `m` of this layer: input `x`, output gradient `gy`, input
            // gradient into `gx` (added to it when `acc`, skipped unless `need`). Each LoRA
            // slot is borrowed mutably by one module at a time.
            macro_rules! back {
                ($m:expr, $x:expr, $gy:expr, $gx:expr, $acc:expr, $need:expr) => {
                    pass.linear_backward(
                        l,
                        $m,
                        match idx[$m.index()] {
                            Some(i) => Some(&mut slots[i]),
                            None => None,
                        },
                        $x,
                        &s.u[$m.index()],
                        s.masks[$m.index()].as_ref(),
                        $gy,
                        $gx,
                        $acc,
                        $need,
                        w,
                    )?
                };
            }
            // MLP: recompute its input and activation.
            resize(&mut w.h, t * h);
            resize(&mut w.inv, t);
            ops::rms_norm_forward(&s.x_mid, &lp.mlp_norm, eps, &mut w.h, &mut w.inv);
            resize(&mut w.act, s.gate.len());
            ops::silu_mul_forward(&s.gate, &s.up, &mut w.act);
            let act = std::mem::take(&mut w.act);
            let mut g_act = std::mem::take(&mut w.g_act);
            back!(Module::DownProj, &act, &gx, &mut g_act, false, true);
            w.act = act;
            resize(&mut w.gg, g_act.len());
            resize(&mut w.gup, g_act.len());
            ops::silu_mul_backward(&s.gate, &s.up, &g_act, &mut w.gg, &mut w.gup);
            w.g_act = g_act;
            let hbuf = std::mem::take(&mut w.h);
            let (gg, gup) = (std::mem::take(&mut w.gg), std::mem::take(&mut w.gup));
            let mut gh = std::mem::take(&mut w.gh);
            back!(Module::GateProj, &hbuf, &gg, &mut gh, false, true);
            back!(Module::UpProj, &hbuf, &gup, &mut gh, true, true);
            (w.gg, w.gup) = (gg, gup);
            ops::rms_norm_backward(&s.x_mid, &lp.mlp_norm, &s.inv2, &gh, &mut gx, true);
            // Attention.
            let mut go = std::mem::take(&mut w.go);
            back!(Module::OProj, &s.o, &gx, &mut go, false, true);
            resize(&mut w.dq, s.q.len());
            resize(&mut w.dk, s.k.len());
            resize(&mut w.dv, s.v.len());
            ops::attention_backward(
                &s.q, &s.k, &s.v, &s.o, &s.lse, &go, &p.segs, shape, &mut w.dq, &mut w.dk,
                &mut w.dv,
            )?;
            w.go = go;
            ops::rope_backward(&mut w.dq, &p.pos, hd, rope);
            ops::rope_backward(&mut w.dk, &p.pos, hd, rope);
            let mut hbuf = hbuf;
            let mut inv = std::mem::take(&mut w.inv);
            ops::rms_norm_forward(&s.x_in, &lp.attn_norm, eps, &mut hbuf, &mut inv);
            w.inv = inv;
            // The embedding is frozen: the first layer needs no input gradient.
            let need = l > 0;
            let (dq, dk, dv) = (
                std::mem::take(&mut w.dq),
                std::mem::take(&mut w.dk),
                std::mem::take(&mut w.dv),
            );
            back!(Module::QProj, &hbuf, &dq, &mut gh, false, need);
            back!(Module::KProj, &hbuf, &dk, &mut gh, true, need);
            back!(Module::VProj, &hbuf, &dv, &mut gh, true, need);
            (w.dq, w.dk, w.dv) = (dq, dk, dv);
            if need {
                ops::rms_norm_backward(&s.x_in, &lp.attn_norm, &s.inv1, &gh, &mut gx, true);
            }
            w.h = hbuf;
            w.gh = gh;
        }
        w.gx = gx;
        Ok(())
    }

    /// Forward and backward of one micro-batch: adds the gradient of
    /// `loss_weight * (sum of target-token losses)` to the LoRA gradients. With `loss_weight =
    /// 1 / (targets in the accumulation window)` the accumulated gradient is that of the mean.
    pub fn accumulate(&mut self, batch: &[&Example], loss_weight: f32) -> Result<BatchLoss> {
        let p = self.pack(batch)?;
        self.forward(&p, true)?;
        let loss = self.head(&p, loss_weight)?;
        self.backward(&p)?;
        self.micro += 1;
        Ok(loss)
    }

    /// The loss of a batch without dropout or gradients.
    pub fn evaluate(&mut self, batch: &[&Example]) -> Result<BatchLoss> {
        let p = self.pack(batch)?;
        self.forward(&p, false)?;
        self.head(&p, 0.0)
    }

    /// The accumulated gradients by PEFT tensor name.
    pub fn gradients(&self) -> BTreeMap<String, Vec<f32>> {
        let mut out = BTreeMap::new();
        for s in &self.slots {
            let m = s.module;
            out.insert(peft_name(s.layer, m, "A"), s.ga.clone());
            out.insert(peft_name(s.layer, m, "B"), s.gb.clone());
        }
        out
    }

    /// Clears the accumulated gradients.
    pub fn zero_grad(&mut self) {
        for s in &mut self.slots {
            s.ga.fill(0.0);
            s.gb.fill(0.0);
        }
    }

    /// One AdamW step (PyTorch semantics, decoupled weight decay) at learning rate `lr` on the
    /// accumulated gradients, after clipping their global norm; then clears them. Returns the
    /// gradient norm before clipping.
    pub fn optimizer_step(&mut self, lr: f64) -> f64 {
        let norm = self
            .slots
            .iter()
            .flat_map(|s| s.ga.iter().chain(&s.gb))
            .map(|&g| (g as f64) * (g as f64))
            .sum::<f64>()
            .sqrt();
        let clip = match self.max_grad_norm {
            Some(max) if norm > max => (max / (norm + 1e-6)) as f32,
            _ => 1.0,
        };
        self.adam_t += 1;
        let (b1, b2) = ADAM_BETAS;
        let bc1 = 1.0 - b1.powi(self.adam_t);
        let bc2_sqrt = (1.0 - b2.powi(self.adam_t)).sqrt();
        let lr = lr as f32;
        let decay = 1.0 - lr * self.weight_decay;
        let step_size = lr / bc1;
        let update = |p: &mut [f32], g: &mut [f32], m: &mut [f32], v: &mut [f32]| {
            for i in 0..p.len() {
                let gi = g[i] * clip;
                p[i] *= decay;
                m[i] = b1 * m[i] + (1.0 - b1) * gi;
                v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                let denom = v[i].sqrt() / bc2_sqrt + ADAM_EPS;
                p[i] -= step_size * m[i] / denom;
                g[i] = 0.0;
            }
        };
        self.slots.par_iter_mut().for_each(|s| {
            update(&mut s.a, &mut s.ga, &mut s.ma, &mut s.va);
            update(&mut s.b, &mut s.gb, &mut s.mb, &mut s.vb);
        });
        norm
    }

    /// The current LoRA weights as a PEFT adapter (HF names and layout, `lora_alpha`, `r`).
    pub fn adapter(&self, base_model: Option<&str>) -> Result<LoraAdapter> {
        let mut config = AdapterConfig::new(
            self.spec.rank,
            self.spec.alpha,
            TargetModules::from_names(self.spec.target_modules.iter().map(|m| m.as_str())),
        );
        config.lora_dropout = self.spec.dropout;
        config.base_model_name_or_path = base_model.map(str::to_string);
        let mut tensors = BTreeMap::new();
        for s in &self.slots {
            let m = s.module;
            tensors.insert(
                peft_name(s.layer, m, "A"),
                LoraTensor {
                    shape: vec![s.dims.r, s.dims.inp],
                    data: s.a.clone(),
                },
            );
            tensors.insert(
                peft_name(s.layer, m, "B"),
                LoraTensor {
                    shape: vec![s.dims.out, s.dims.r],
                    data: s.b.clone(),
                },
            );
        }
        Ok(LoraAdapter::new(config, tensors)?)
    }
}

/// Where a training run stands, for progress display.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// Optimizer steps done.
    pub step: usize,
    /// Optimizer steps planned.
    pub total_steps: usize,
    /// Current epoch, from 1.
    pub epoch: usize,
    /// Epochs planned.
    pub epochs: usize,
    /// Mean loss of the last step.
    pub loss: f64,
    /// Learning rate of the last step.
    pub lr: f64,
    /// Tokens processed per second so far.
    pub tokens_per_s: f64,
    /// Seconds since training started.
    pub elapsed_s: f64,
}

/// `training_info.json`: what was trained, on what, how long, how well.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingInfo {
    /// Examples trained on.
    pub samples: usize,
    /// Epochs planned.
    pub epochs: usize,
    /// Epochs started (the last may be partial).
    pub epochs_run: usize,
    /// Optimizer steps done.
    pub steps: usize,
    /// Optimizer steps planned.
    pub total_steps: usize,
    /// Mean loss of the first step.
    pub first_loss: Option<f64>,
    /// Mean loss of the last step.
    pub final_loss: Option<f64>,
    /// Base model id (file stem or directory name).
    pub base_model: String,
    /// blake3 of the base model's files.
    pub base_model_hash: String,
    /// Training wall time (model loading excluded).
    pub seconds: f64,
    /// Tokens processed.
    pub tokens: u64,
    /// Tokens processed per second.
    pub tokens_per_second: f64,
    /// Peak resident memory of the process, MiB (Linux).
    pub peak_memory_mib: Option<f64>,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per step.
    pub grad_accum: usize,
    /// Examples were cut to this many tokens.
    pub max_seq_len: usize,
    /// Seed.
    pub seed: u64,
    /// Whether training was stopped early (Ctrl-C): the adapter is the one after `steps` steps.
    pub interrupted: bool,
}

/// A finished (or stopped) run.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// The trained adapter.
    pub adapter: LoraAdapter,
    /// Its training record.
    pub info: TrainingInfo,
}

impl TrainOutcome {
    /// Writes the PEFT adapter dir (`adapter_config.json`, `adapter_model.safetensors`) and
    /// `training_info.json` into `dir`.
    pub fn write_dir(&self, dir: &Path) -> Result<()> {
        self.adapter.write_dir(dir)?;
        let p = dir.join("training_info.json");
        let mut json = serde_json::to_vec_pretty(&self.info).map_err(|e| ModelError::Training {
            reason: format!("cannot serialise training info: {e}"),
        })?;
        json.push(b'\n');
        std::fs::write(&p, json).map_err(|e| ModelError::Io {
            path: p.clone(),
            source: e,
        })
    }
}

/// Peak resident set size of this process in bytes (`VmHWM` of `/proc/self/status`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Optimizer steps of a run: `ceil(batches / grad_accum)` per epoch times epochs, or `max_steps`.
pub fn planned_steps(num_examples: usize, cfg: &TrainConfig) -> usize {
    let batches = num_examples.div_ceil(cfg.batch_size.max(1));
    let per_epoch = batches.div_ceil(cfg.grad_accum.max(1));
    cfg.max_steps.unwrap_or(per_epoch * cfg.epochs)
}

/// Trains a LoRA adapter for `model` on `examples`. Each epoch visits the examples in
/// [`length_grouped_batches`]; `grad_accum` micro-batches make one optimizer step (the last of an
/// epoch may have fewer); the learning rate follows [`lr_at`]. `on_progress` runs after each
/// step. When `stop` becomes true, the run ends before the next micro-batch and returns the
/// adapter as of the last completed step.
pub fn train(
    model: &BaseModel,
    examples: &[Example],
    cfg: &TrainConfig,
    init: Option<&LoraAdapter>,
    stop: &AtomicBool,
    on_progress: &mut dyn FnMut(&Progress),
) -> Result<TrainOutcome> {
    if examples.is_empty() {
        return Err(ModelError::Training {
            reason: "no examples to train on".into(),
        });
    }
    if cfg.batch_size == 0 || cfg.grad_accum == 0 || (cfg.epochs == 0 && cfg.max_steps.is_none()) {
        return Err(ModelError::Training {
            reason: "batch size, gradient accumulation and epochs must be at least 1".into(),
        });
    }
    if !(cfg.lr.is_finite() && cfg.lr > 0.0) {
        return Err(ModelError::Training {
            reason: format!("learning rate {} must be positive", cfg.lr),
        });
    }
    let mut trainer = Trainer::new(&model.decoder, &cfg.lora, init, cfg.seed)?;
    trainer.set_optimizer(cfg.weight_decay, cfg.max_grad_norm);
    let total = planned_steps(examples.len(), cfg);
    let warmup = (cfg.warmup_ratio * total as f64).ceil() as usize;
    let lens: Vec<usize> = examples.iter().map(Example::len).collect();
    let t0 = Instant::now();
    let mut tokens = 0u64;
    let (mut step, mut epoch) = (0usize, 0usize);
    let (mut first_loss, mut final_loss) = (None, None);
    let mut interrupted = false;
    'outer: while step < total {
        epoch += 1;
        let batches = length_grouped_batches(&lens, cfg.batch_size, cfg.seed, epoch as u64 - 1);
        for window in batches.chunks(cfg.grad_accum) {
            if step >= total {
                break 'outer;
            }
            let targets: usize = window
                .iter()
                .flatten()
                .map(|&i| examples[i].num_targets())
                .sum();
            let weight = 1.0 / targets.max(1) as f32;
            let mut loss = BatchLoss::default();
            for b in window {
                if stop.load(Ordering::Relaxed) {
                    interrupted = true;
                    break 'outer;
                }
                let batch: Vec<&Example> = b.iter().map(|&i| &examples[i]).collect();
                let l = trainer.accumulate(&batch, weight)?;
                loss.loss_sum += l.loss_sum;
                loss.targets += l.targets;
                tokens += l.tokens as u64;
            }
            let lr = lr_at(cfg.lr, step, warmup, total);
            trainer.optimizer_step(lr);
            step += 1;
            let mean = loss.mean();
            first_loss.get_or_insert(mean);
            final_loss = Some(mean);
            let elapsed = t0.elapsed().as_secs_f64();
            on_progress(&Progress {
                step,
                total_steps: total,
                epoch,
                epochs: cfg.epochs.max(epoch),
                loss: mean,
                lr,
                tokens_per_s: tokens as f64 / elapsed.max(1e-9),
                elapsed_s: elapsed,
            });
        }
        if cfg.max_steps.is_none() && epoch >= cfg.epochs {
            break;
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    let adapter = trainer.adapter(Some(&model.name))?;
    Ok(TrainOutcome {
        adapter,
        info: TrainingInfo {
            samples: examples.len(),
            epochs: cfg.epochs,
            epochs_run: epoch,
            steps: step,
            total_steps: total,
            first_loss,
            final_loss,
            base_model: model.name.clone(),
            base_model_hash: model.hash.to_hex(),
            seconds,
            tokens,
            tokens_per_second: tokens as f64 / seconds.max(1e-9),
            peak_memory_mib: peak_rss_bytes().map(|b| b as f64 / (1024.0 * 1024.0)),
            learning_rate: cfg.lr,
            batch_size: cfg.batch_size,
            grad_accum: cfg.grad_accum,
            max_seq_len: cfg.max_seq_len,
            seed: cfg.seed,
            interrupted,
        },
    })
}

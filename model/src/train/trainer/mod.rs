//! The trainer: LoRA pairs with their AdamW state on a frozen decoder, packing batches into one
//! token stream, and the optimizer step. The forward pass (with the loss head) and the backward
//! pass live in `forward.rs` and `backward.rs`; `pass.rs` holds the linear layer both share.

use std::collections::BTreeMap;
use std::ops::Range;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::adapter::{AdapterConfig, LoraAdapter, LoraTensor, TargetModules};
use crate::dataset::Example;
use crate::decoder::Decoder;
use crate::error::{ModelError, Result};
use crate::lora::peft_name;
use crate::module::Module;
use crate::train::ops::{self, DropoutMask, LoraDims, RopeTable};

mod backward;
mod forward;
mod grams;
mod pass;

pub use grams::{input_grams, Gram, InputGrams, ModuleInput};

use pass::tensor_vec;

use super::{LoraSpec, ADAM_BETAS, ADAM_EPS};

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
    /// The LoRA pairs applied to the decoder when training started: part of the frozen model.
    frozen: [Option<FrozenLora>; Module::COUNT],
}

/// A LoRA pair that is part of the frozen model (no gradients, no dropout).
#[derive(Debug, Clone)]
struct FrozenLora {
    dims: LoraDims,
    a: Vec<f32>,
    b: Vec<f32>,
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
    /// Input directions the trained `A`s are kept orthogonal to.
    protect: Option<std::sync::Arc<crate::train::ProtectedInputs>>,
    /// Whether the pairs were taken from an initial adapter.
    continued: bool,
}

impl<'m> Trainer<'m> {
    /// LoRA pairs for `spec` on `dec`, initialised like PEFT (A Kaiming-uniform with
    /// `a = sqrt(5)`, i.e. uniform in `±1/sqrt(in)`, B zero) from `seed`, or taken from `init` (which
    /// must have the same rank and target modules).
    ///
    /// An adapter already applied to `dec` (e.g. the round adapter, with any rank) is part of the
    /// frozen model: the trained pairs learn an update on top of it, as chat with both applied
    /// ([`crate::aggregate::stack`]) will see them.
    pub fn new(
        dec: &'m Decoder,
        spec: &LoraSpec,
        init: Option<&LoraAdapter>,
        seed: u64,
    ) -> Result<Self> {
        let mask = spec.module_mask()?;
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
                let mut bias: [Option<Vec<f32>>; Module::COUNT] = Default::default();
                let mut frozen: [Option<FrozenLora>; Module::COUNT] = Default::default();
                for m in Module::ALL {
                    let lin = layer.module(m);
                    if let Some(t) = &lin.bias {
                        bias[m.index()] = Some(tensor_vec(t)?);
                    }
                    if let Some(pair) = &lin.lora {
                        let (r, inp) = pair.a.dims2()?;
                        let (out, _) = pair.b.dims2()?;
                        frozen[m.index()] = Some(FrozenLora {
                            dims: LoraDims {
                                r,
                                inp,
                                out,
                                scale: pair.scale as f32,
                            },
                            a: tensor_vec(&pair.a)?,
                            b: tensor_vec(&pair.b)?,
                        });
                    }
                }
                Ok(LayerParams {
                    attn_norm: tensor_vec(&layer.attn_norm)?,
                    mlp_norm: tensor_vec(&layer.mlp_norm)?,
                    bias,
                    frozen,
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
            protect: None,
            continued: init.is_some(),
        })
    }

    /// Sets AdamW's weight decay and the gradient clipping norm (defaults: 0 and 1.0).
    pub fn set_optimizer(&mut self, weight_decay: f64, max_grad_norm: Option<f64>) {
        self.weight_decay = weight_decay as f32;
        self.max_grad_norm = max_grad_norm;
    }

    /// Keeps every trained `A` orthogonal to `protect`'s directions of its module's input from
    /// now on (and projects them out of the current `A`s), so the update does not change the
    /// module's output on inputs in those directions. Only for fresh pairs: the `A` of a
    /// continued adapter would lose what it holds in those directions, so a trainer started from
    /// an initial adapter refuses. Every basis must match its module's input width, and
    /// `protect` must cover every layer.
    pub fn protect_inputs(
        &mut self,
        protect: std::sync::Arc<crate::train::ProtectedInputs>,
    ) -> Result<()> {
        if protect.layers.len() != self.dec.layers.len() {
            return Err(ModelError::Training {
                reason: format!(
                    "protected directions for {} layers, the model has {}",
                    protect.layers.len(),
                    self.dec.layers.len()
                ),
            });
        }
        if self.continued {
            return Err(ModelError::Training {
                reason: "protected inputs need a fresh adapter: continuing one would erase what \
                         its lora_A holds in the protected directions"
                    .into(),
            });
        }
        for s in &self.slots {
            if let Some(b) = protect.of(s.layer, s.module) {
                if b.dim != s.dims.inp {
                    return Err(ModelError::Training {
                        reason: format!(
                            "protected directions of layer {} {} are {} wide, its input {}",
                            s.layer,
                            s.module.as_str(),
                            b.dim,
                            s.dims.inp
                        ),
                    });
                }
            }
        }
        for s in &mut self.slots {
            if let Some(b) = protect.of(s.layer, s.module) {
                b.project_out(&mut s.a);
            }
        }
        self.protect = Some(protect);
        Ok(())
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
        if let Some(p) = &self.protect {
            let p = p.clone();
            self.slots.par_iter_mut().for_each(|s| {
                if let Some(b) = p.of(s.layer, s.module) {
                    b.project_out(&mut s.ga);
                }
            });
        }
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
        if let Some(p) = &self.protect {
            let p = p.clone();
            self.slots.par_iter_mut().for_each(|s| {
                if let Some(b) = p.of(s.layer, s.module) {
                    b.project_out(&mut s.a);
                }
            });
        }
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

//! The Gram matrices `XᵀX` of every LoRA module's inputs over a dataset: the statistics a
//! data-aware merge (RegMean) weighs each user's update with.

use crate::adapter::LoraAdapter;
use crate::config::ModelConfig;
use crate::dataset::Example;
use crate::decoder::Decoder;
use crate::error::Result;
use crate::module::Module;
use crate::train::ops;

use super::pass::resize;
use super::Trainer;
use crate::train::LoraSpec;

/// Which input a module reads: the seven projections of a layer read four distinct inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleInput {
    /// The normed residual before attention (`q_proj`, `k_proj`, `v_proj`).
    Attention,
    /// The attention output (`o_proj`).
    AttentionOut,
    /// The normed residual before the MLP (`gate_proj`, `up_proj`).
    Mlp,
    /// The gated activation (`down_proj`).
    Down,
}

impl ModuleInput {
    /// Every input, in [`InputGrams`]' order.
    pub const ALL: [ModuleInput; 4] = [
        ModuleInput::Attention,
        ModuleInput::AttentionOut,
        ModuleInput::Mlp,
        ModuleInput::Down,
    ];

    /// The input `m` reads.
    pub fn of(m: Module) -> ModuleInput {
        match m {
            Module::QProj | Module::KProj | Module::VProj => ModuleInput::Attention,
            Module::OProj => ModuleInput::AttentionOut,
            Module::GateProj | Module::UpProj => ModuleInput::Mlp,
            Module::DownProj => ModuleInput::Down,
        }
    }

    /// Position in [`InputGrams::layers`]' arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// How wide this input is on a model of `cfg`.
    pub fn width(self, cfg: &ModelConfig) -> usize {
        match self {
            ModuleInput::Attention | ModuleInput::Mlp => cfg.hidden_size,
            ModuleInput::AttentionOut => cfg.num_heads * cfg.head_dim,
            ModuleInput::Down => cfg.intermediate_size,
        }
    }
}

/// A symmetric `dim × dim` matrix, row-major (`f32`: for the default model's 30 layers the four
/// inputs' matrices take 400 MiB).
#[derive(Debug, Clone, PartialEq)]
pub struct Gram {
    /// Rows (and columns).
    pub dim: usize,
    /// `dim * dim` values.
    pub data: Vec<f32>,
}

impl Gram {
    fn zeros(dim: usize) -> Gram {
        Gram {
            dim,
            data: vec![0.0; dim * dim],
        }
    }

    /// Adds `XᵀX` for the `t` rows of `x` (each `dim` long), by candle's matmul in `f32`
    /// (these statistics are the user's own: nothing needs their exact bits).
    fn add_rows(&mut self, x: &[f32], t: usize) -> Result<()> {
        let dim = self.dim;
        let x =
            candle_core::Tensor::from_slice(&x[..t * dim], (t, dim), &candle_core::Device::Cpu)?;
        let g = x.t()?.matmul(&x)?.flatten_all()?.to_vec1::<f32>()?;
        self.data.iter_mut().zip(g).for_each(|(d, v)| *d += v);
        Ok(())
    }
}

/// Per layer, the Gram matrix of each [`ModuleInput`] over every token seen, and the token count.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InputGrams {
    /// `layers[l][ModuleInput::index()]`.
    pub layers: Vec<[Gram; 4]>,
    /// Tokens added.
    pub tokens: usize,
}

impl InputGrams {
    /// Bytes the matrices take on a model of `cfg`.
    pub fn bytes_for(cfg: &ModelConfig) -> u64 {
        let per_layer: u64 = ModuleInput::ALL
            .iter()
            .map(|i| (i.width(cfg) as u64).saturating_mul(i.width(cfg) as u64))
            .fold(0, u64::saturating_add);
        per_layer
            .saturating_mul(cfg.num_layers as u64)
            .saturating_mul(std::mem::size_of::<f32>() as u64)
    }

    /// The Gram matrix of what `m` of layer `l` reads.
    pub fn of(&self, l: usize, m: Module) -> Option<&Gram> {
        self.layers.get(l).map(|g| &g[ModuleInput::of(m).index()])
    }
}

impl Trainer<'_> {
    /// Adds the Gram matrices of every module's inputs over `batch` (forward only, the trained
    /// pairs and any frozen adapter applied, no dropout) to `grams`.
    pub fn accumulate_input_grams(
        &mut self,
        batch: &[&Example],
        grams: &mut InputGrams,
    ) -> Result<()> {
        let p = self.pack(batch)?;
        self.forward(&p, false)?;
        let cfg = &self.dec.cfg;
        let (t, h) = (p.ids.len(), cfg.hidden_size);
        let eps = cfg.rms_norm_eps as f32;
        if grams.layers.is_empty() {
            grams.layers = (0..self.saved.len())
                .map(|_| ModuleInput::ALL.map(|i| Gram::zeros(i.width(cfg))))
                .collect();
        }
        let mut normed = vec![0f32; t * h];
        let mut inv = vec![0f32; t];
        let mut act = Vec::new();
        for (l, s) in self.saved.iter().enumerate() {
            let lp = &self.layers[l];
            let g = &mut grams.layers[l];
            ops::rms_norm_forward(&s.x_in, &lp.attn_norm, eps, &mut normed, &mut inv);
            g[ModuleInput::Attention.index()].add_rows(&normed, t)?;
            g[ModuleInput::AttentionOut.index()].add_rows(&s.o, t)?;
            ops::rms_norm_forward(&s.x_mid, &lp.mlp_norm, eps, &mut normed, &mut inv);
            g[ModuleInput::Mlp.index()].add_rows(&normed, t)?;
            resize(&mut act, s.gate.len());
            ops::silu_mul_forward(&s.gate, &s.up, &mut act);
            g[ModuleInput::Down.index()].add_rows(&act, t)?;
        }
        grams.tokens += t;
        Ok(())
    }
}

/// The Gram matrices of every module's inputs over `examples` (one at a time) on `dec`, with
/// `adapter`'s pairs applied on top of whatever `dec` has applied, or the model alone.
pub fn input_grams(
    dec: &Decoder,
    adapter: Option<&LoraAdapter>,
    examples: &[Example],
) -> Result<InputGrams> {
    let spec = match adapter {
        Some(a) => LoraSpec::from_adapter(a)?,
        // A fresh pair's B is zero: the forward is the model's own.
        None => LoraSpec {
            rank: 1,
            alpha: 1.0,
            dropout: 0.0,
            target_modules: Module::ALL.to_vec(),
        },
    };
    let mut trainer = Trainer::new(dec, &spec, adapter, 0)?;
    let mut grams = InputGrams::default();
    for ex in examples {
        trainer.accumulate_input_grams(&[ex], &mut grams)?;
    }
    Ok(grams)
}

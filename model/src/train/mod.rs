//! LoRA training on CPU (QLoRA when the base is quantized): the trainer, AdamW, the learning-rate
//! schedule and the training loop that turns examples into a PEFT adapter.
//!
//! ```text
//!  Example batches ──Trainer::accumulate──▶ forward: embed → layers → final norm → fused CE
//!                                           (saves per layer: x, q, k, v, attn out, x_mid, gate, up)
//!                                           backward: CE → layers in reverse → LoRA grads
//!  grads ──Trainer::optimizer_step(lr)──▶ clip, AdamW on the LoRA A/B only
//!  train(): epochs of length-grouped batches, gradient accumulation, warmup + schedule,
//!           replayed base-model answers (Replay), progress callback, stop flag
//!           ──▶ TrainOutcome { adapter (PEFT), info }
//! ```
//!
//! Only LoRA A (`[r, in]`) and B (`[out, r]`) in f32 are parameters. Base weights stay in their
//! GGUF blocks; each frozen matmul dequantizes one weight at a time into a scratch panel (see
//! [`crate::train::ops`]) and never computes the weight's gradient, while the input gradient flows
//! through every frozen layer to the LoRA weights of earlier layers.
//!
//! Sequences of a batch are packed back to back with no padding: every token-wise op runs on all
//! tokens at once and attention stays within each sequence. The loss is the mean cross-entropy over
//! the target (assistant) tokens of an accumulation window, like Hugging Face's Trainer.
//!
//! Files: this module holds the run (spec, config, schedule, the loop); `trainer/` the
//! [`Trainer`] (`forward.rs`, `backward.rs`, and `pass.rs` for the linear layer both use);
//! `ops/` one file per differentiable op.
//!
//! Same examples, config, seed and thread count give the same adapter bytes: shuffles and LoRA
//! init come from seeded generators, dropout masks from counters, and every reduction has a fixed
//! order.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::adapter::LoraAdapter;
use crate::dataset::{length_grouped_batches, Example};
use crate::error::{ModelError, Result};
use crate::loader::BaseModel;
use crate::module::Module;

pub mod ops;
mod protect;
mod trainer;

pub use protect::{Basis, ProtectedInputs};
pub use trainer::{input_grams, BatchLoss, Gram, InputGrams, ModuleInput, Trainer};

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
    /// Fraction of the steps spent warming the learning rate up.
    pub warmup_ratio: f64,
    /// How the learning rate moves after the warmup.
    pub schedule: LrSchedule,
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
    /// Input directions the trained `A`s are kept orthogonal to (see [`ProtectedInputs`]); only
    /// for a fresh adapter (training refuses it with an initial one).
    pub protect: Option<std::sync::Arc<ProtectedInputs>>,
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
            schedule: LrSchedule::Constant,
            max_seq_len: 512,
            max_steps: None,
            seed: 42,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
            protect: None,
        }
    }
}

/// How the learning rate moves after the warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// The peak rate until the end. Short runs on a few personal examples learn far more with
    /// it than with a decay (a decay halves the mean rate; see `examples/learning_bench.rs`).
    #[default]
    Constant,
    /// Linear decay towards 0 (Hugging Face's `get_linear_schedule_with_warmup`).
    Linear,
    /// Half a cosine towards 0 (`get_cosine_schedule_with_warmup`).
    Cosine,
}

impl std::str::FromStr for LrSchedule {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "constant" => Ok(LrSchedule::Constant),
            "linear" => Ok(LrSchedule::Linear),
            "cosine" => Ok(LrSchedule::Cosine),
            _ => Err(ModelError::Training {
                reason: format!("unknown learning rate schedule {s:?} (constant, linear, cosine)"),
            }),
        }
    }
}

/// Learning rate of optimizer step `step` (0-based) of `total`: a linear warmup over `warmup`
/// steps that starts at `lr / warmup` (not at 0: a step at rate 0 is a step lost), then
/// `schedule` from `lr` at step `warmup` towards 0 after the last step.
pub fn lr_at(lr: f64, step: usize, warmup: usize, total: usize, schedule: LrSchedule) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let done = (step - warmup) as f64 / span;
    let left = (1.0 - done).clamp(0.0, 1.0);
    match schedule {
        LrSchedule::Constant => lr,
        LrSchedule::Linear => lr * left,
        LrSchedule::Cosine => lr * 0.5 * (1.0 + (std::f64::consts::PI * done.min(1.0)).cos()),
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
    /// The schedule after the warmup.
    #[serde(default)]
    pub lr_schedule: LrSchedule,
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
    /// Replayed examples of the base model's own answers (0: no replay).
    #[serde(default)]
    pub replay_examples: usize,
    /// Mean loss of the last step's replayed examples.
    #[serde(default)]
    pub final_replay_loss: Option<f64>,
    /// blake3 (hex) of the round adapter this adapter was trained on top of (frozen under
    /// training, `train --from-round` on a network whose rounds build on their parent); `None`
    /// for an adapter trained on the base model alone. Chat applies the two together, and an
    /// adapter trained on top of an older round than the one it is applied with may lose some
    /// of what it learned ([`TrainingInfo::fits_round`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_top_of: Option<String>,
    /// With protected inputs ([`TrainConfig::protect`]): the mean fraction of each module
    /// input's energy on general text the protected directions hold, and their mean number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protected: Option<(f64, f64)>,
}

impl TrainingInfo {
    /// Its file name in an adapter dir.
    pub const FILE: &'static str = "training_info.json";

    /// The record in adapter dir `dir`, if it has a readable one.
    pub fn read(dir: &Path) -> Option<TrainingInfo> {
        let bytes = std::fs::read(dir.join(Self::FILE)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Whether this adapter was trained on top of the round adapter whose hash (hex) is
    /// `round_hash`.
    pub fn fits_round(&self, round_hash: &str) -> bool {
        self.on_top_of.as_deref() == Some(round_hash)
    }

    /// Whether the adapter in `dir` was trained on the base model whose hash is `base_hash`.
    pub fn trained_on(dir: &Path, base_hash: &hivemind_protocol::Hash) -> bool {
        Self::read(dir).is_some_and(|info| info.base_model_hash == base_hash.to_hex())
    }
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
        let p = dir.join(TrainingInfo::FILE);
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

/// Examples of what the model should keep doing (the base model's own answers to general
/// prompts, [`crate::general::replay_answers`]), replayed alongside the data so training on
/// a few personal facts does not drift the model's general behaviour.
///
/// Each optimizer step adds `per_step` of them (in turn, round robin) as one more micro-batch,
/// and the step's loss becomes `mean(data loss) + weight * mean(replay loss)`: the data's
/// gradient is what it is without replay, and the replay term pulls back only where the
/// adapter moves the model away from its own answers (at the start it is near its minimum).
#[derive(Debug, Clone, Copy)]
pub struct Replay<'a> {
    /// The replayed examples.
    pub examples: &'a [Example],
    /// How many join each optimizer step.
    pub per_step: usize,
    /// The weight of their mean loss beside the data's.
    pub weight: f64,
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
    train_with_replay(model, examples, None, cfg, init, stop, on_progress)
}

/// [`train`], with `replay` examples joining every optimizer step (see [`Replay`]).
pub fn train_with_replay(
    model: &BaseModel,
    examples: &[Example],
    replay: Option<Replay<'_>>,
    cfg: &TrainConfig,
    init: Option<&LoraAdapter>,
    stop: &AtomicBool,
    on_progress: &mut dyn FnMut(&Progress),
) -> Result<TrainOutcome> {
    let replay = replay.filter(|r| r.per_step > 0 && !r.examples.is_empty() && r.weight > 0.0);
    if let Some(r) = &replay {
        if !r.weight.is_finite() {
            return Err(ModelError::Training {
                reason: format!("replay weight {} is not finite", r.weight),
            });
        }
    }
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
    if let Some(p) = &cfg.protect {
        trainer.protect_inputs(p.clone())?;
    }
    let total = planned_steps(examples.len(), cfg);
    let warmup = (cfg.warmup_ratio * total as f64).ceil() as usize;
    let lens: Vec<usize> = examples.iter().map(Example::len).collect();
    let t0 = Instant::now();
    let mut tokens = 0u64;
    let (mut step, mut epoch) = (0usize, 0usize);
    let (mut first_loss, mut final_loss) = (None, None);
    let mut interrupted = false;
    let mut replay_loss = None;
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
            if let Some(r) = &replay {
                let k = r.per_step.min(r.examples.len());
                let batch: Vec<&Example> = (0..k)
                    .map(|j| &r.examples[(step * k + j) % r.examples.len()])
                    .collect();
                let targets: usize = batch.iter().map(|e| e.num_targets()).sum();
                let weight = (r.weight / targets.max(1) as f64) as f32;
                let l = trainer.accumulate(&batch, weight)?;
                replay_loss = Some(l.mean());
                tokens += l.tokens as u64;
            }
            let lr = lr_at(cfg.lr, step, warmup, total, cfg.schedule);
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
            lr_schedule: cfg.schedule,
            batch_size: cfg.batch_size,
            grad_accum: cfg.grad_accum,
            max_seq_len: cfg.max_seq_len,
            seed: cfg.seed,
            interrupted,
            replay_examples: replay.map_or(0, |r| r.examples.len()),
            final_replay_loss: replay_loss,
            on_top_of: None,
            protected: cfg.protect.as_ref().map(|p| p.summary()),
        },
    })
}

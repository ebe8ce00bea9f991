//! Poisoning: honest and malicious contributors through the real aggregation rules, FedAvg
//! beside the network's default (iso), the exact mean and the geometric median, with the
//! inputs bounded as networks bound them (`Bounds::ROBUST`: norm, weight, distance from the
//! others), and iso with the norm and weight bounds alone (before the distance bound). Prints
//! one JSON object.
//!
//! ```sh
//! cargo run --example poison_bench        # seconds
//! ```
//!
//! Honest updates correlate as trained ones do (a direction every user shares, plus their
//! own). Attacks: `scale1e3` / `scale1e6` (an honest-looking update times 1e3 / 1e6, also
//! claiming 10^12 samples), `sign_flip` (an honest-looking update negated), `random` (random
//! factors ten times an honest update's size), `sample_liar` (an honest-looking update of its
//! own direction claiming 10^12 samples), `target` (sees the honest inputs and solves for
//! the FedAvg round to be an adapter of its choosing). For each rule the report gives how far
//! (relative Frobenius distance of the merged update `ΔW` over every module) the round moves
//! from the honest-only round of the same rule, and, as the baseline, how far the same number
//! of extra honest contributors move it; `ratio` is the first over the second. Issue 13's
//! target: ratio <= 1 for the default rule with 30% malicious inputs, in every attack. (No
//! held-out loss here, and no attacker that stays within the honest inputs' spread.)
//! The `privacy` section reports what differential privacy (`--dp-noise`) costs the same rules
//! at ε 1, 4 and 8.

use anyhow::Result;
use hivemind_model::adapter::{AdapterShape, LoraAdapter, LoraSide};
use hivemind_model::aggregate::{
    AggregationRule, Bounds, ExactMean, FedAvg, GeoMedian, IsoMerge, WeightedAdapter,
};
use hivemind_model::config::Arch;
use hivemind_model::testing::{random_adapter, TinyModel};
use serde_json::{json, Value};

const RANK: usize = 4;
const ALPHA: f64 = 8.0;
/// What honest users claim.
const SAMPLES: u64 = 12;
const LIAR_SAMPLES: u64 = 1_000_000_000_000;

fn shape() -> Result<AdapterShape> {
    let names = ["q_proj".to_string(), "v_proj".to_string()];
    Ok(TinyModel::new(Arch::Llama, 1)?
        .cfg
        .adapter_shape(RANK, &names)?)
}

/// `a` with every value `f(shared, own)` of two random adapters of the same shape.
fn combine(shared: &LoraAdapter, own: &LoraAdapter, f: impl Fn(f32, f32) -> f32) -> LoraAdapter {
    let mut out = shared.clone();
    for (name, t) in &mut out.tensors {
        let o = &own.tensors[name];
        for (x, y) in t.data.iter_mut().zip(&o.data) {
            *x = f(*x, *y);
        }
    }
    out
}

/// An honest update: the shared direction plus half of its own.
fn honest(shape: &AdapterShape, seed: u64) -> Result<LoraAdapter> {
    let shared = random_adapter(shape, ALPHA, 1)?;
    let own = random_adapter(shape, ALPHA, 1000 + seed)?;
    Ok(combine(&shared, &own, |s, o| s + 0.5 * o))
}

fn scaled(a: &LoraAdapter, by: f32) -> LoraAdapter {
    let mut out = a.clone();
    out.tensors
        .values_mut()
        .for_each(|t| t.data.iter_mut().for_each(|v| *v *= by));
    out
}

fn input(adapter: LoraAdapter, samples: u64) -> Result<WeightedAdapter> {
    Ok(WeightedAdapter {
        hash: adapter.canonical_hash()?,
        samples,
        adapter,
    })
}

/// `s·B·A` of every module, dense, in f64, in name order.
fn dense(a: &LoraAdapter) -> Vec<f64> {
    let s = a.config.scaling();
    let mut out = Vec::new();
    for (name, ta) in &a.tensors {
        let Some(path) = name.strip_suffix(".lora_A.weight") else {
            continue;
        };
        let path = path.strip_prefix("base_model.model.").unwrap_or(path);
        let tb = &a.tensors[&LoraAdapter::tensor_name(path, LoraSide::B)];
        let (r, inp, outf) = (ta.shape[0], ta.shape[1], tb.shape[0]);
        for i in 0..outf {
            for j in 0..inp {
                let acc: f64 = (0..r)
                    .map(|k| f64::from(tb.data[i * r + k]) * f64::from(ta.data[k * inp + j]))
                    .sum();
                out.push(s * acc);
            }
        }
    }
    out
}

fn distance(a: &LoraAdapter, reference: &LoraAdapter) -> f64 {
    let (x, y) = (dense(a), dense(reference));
    let diff: f64 = x.iter().zip(&y).map(|(u, v)| (u - v).powi(2)).sum();
    let norm: f64 = y.iter().map(|v| v * v).sum();
    (diff / norm).sqrt()
}

/// The malicious inputs of `attack`, `count` of them, against `honest`.
fn attackers(
    attack: &str,
    count: usize,
    honest_inputs: &[LoraAdapter],
    shape: &AdapterShape,
) -> Result<Vec<WeightedAdapter>> {
    let mut out = Vec::new();
    for i in 0..count as u64 {
        let like = honest(shape, 500 + i)?;
        let (adapter, samples) = match attack {
            "scale1e3" => (scaled(&like, 1e3), LIAR_SAMPLES),
            "scale1e6" => (scaled(&like, 1e6), LIAR_SAMPLES),
            "sign_flip" => {
                // Negating B flips ΔW = s·B·A.
                let mut a = like.clone();
                for (name, t) in &mut a.tensors {
                    if name.ends_with("lora_B.weight") {
                        t.data.iter_mut().for_each(|v| *v = -*v);
                    }
                }
                (a, SAMPLES)
            }
            "random" => (
                scaled(&random_adapter(shape, ALPHA, 900 + i)?, 10.0),
                SAMPLES,
            ),
            "sample_liar" => (random_adapter(shape, ALPHA, 700 + i)?, LIAR_SAMPLES),
            "target" => {
                // FedAvg averages A and B by weight: with every input at SAMPLES, the
                // attackers' share makes the mean exactly the target's factors.
                let target = scaled(&random_adapter(shape, ALPHA, 42)?, 3.0);
                let k = (honest_inputs.len() + count) as f32;
                let mut a = target.clone();
                for (name, t) in &mut a.tensors {
                    for (j, v) in t.data.iter_mut().enumerate() {
                        let honest_sum: f32 =
                            honest_inputs.iter().map(|h| h.tensors[name].data[j]).sum();
                        *v = (k * target.tensors[name].data[j] - honest_sum) / count as f32;
                    }
                    // Distinct inputs (equal ones would be one input), summing to the same.
                    if let Some(v) = t.data.first_mut() {
                        *v += 1e-3 * (i as f32 - (count as f32 - 1.0) / 2.0);
                    }
                }
                (a, SAMPLES)
            }
            other => anyhow::bail!("unknown attack {other}"),
        };
        out.push(input(adapter, samples)?);
    }
    Ok(out)
}

/// What differential privacy costs (`--dp-noise`): 10 honest users release their updates
/// clipped to the median update's norm and noised for ε 1, 4 and 8 (one round, δ 1e-5); for
/// each rule, the relative distance of the round from the round of the unnoised updates, with
/// clipping alone (no noise) as the baseline. A distance near or above 1 means the round is
/// mostly noise: local DP on a whole adapter is costly unless many users contribute.
fn privacy_cost(shape: &AdapterShape, rules: &[(&str, Box<dyn AggregationRule>)]) -> Result<Value> {
    use hivemind_model::dp::{privatize, DpSettings};
    use rand::SeedableRng;
    let users: Vec<LoraAdapter> = (0..10)
        .map(|i| honest(shape, 200 + i))
        .collect::<Result<_>>()?;
    let norm = |a: &LoraAdapter| -> f64 {
        a.tensors
            .values()
            .flat_map(|t| &t.data)
            .map(|v| f64::from(*v).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    let mut norms: Vec<f64> = users.iter().map(norm).collect();
    norms.sort_by(f64::total_cmp);
    let clip = norms[norms.len() / 2];
    let delta = 1e-5;
    let release = |z: f64, seed: u64| -> Result<Vec<WeightedAdapter>> {
        let s = DpSettings {
            clip,
            noise_multiplier: z,
            delta,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        users
            .iter()
            .map(|u| input(privatize(u, &s, &mut rng)?, SAMPLES))
            .collect()
    };
    let plain: Vec<WeightedAdapter> = users
        .iter()
        .map(|u| input(u.clone(), SAMPLES))
        .collect::<Result<_>>()?;
    let clipped_only = release(1e-12, 1)?;
    let mut out = Vec::new();
    for epsilon in [1.0, 4.0, 8.0] {
        let z = DpSettings::noise_for_epsilon(epsilon, 1, delta);
        let noised = release(z, 7)?;
        let mut per_rule = serde_json::Map::new();
        for (name, rule) in rules {
            let reference = rule.aggregate(&plain)?;
            let d_clip = distance(&rule.aggregate(&clipped_only)?, &reference);
            let d = distance(&rule.aggregate(&noised)?, &reference);
            per_rule.insert(
                name.to_string(),
                json!({ "distance": d, "clipping_only_distance": d_clip, "ratio": d / d_clip.max(1e-12) }),
            );
        }
        out.push(json!({
            "epsilon": epsilon,
            "delta": delta,
            "noise_multiplier": z,
            "clip": clip,
            "users": users.len(),
            "rules": per_rule,
        }));
    }
    Ok(Value::Array(out))
}

fn main() -> Result<()> {
    let shape = shape()?;
    let rules: Vec<(&str, Box<dyn AggregationRule>)> = vec![
        ("fedavg", Box::new(FedAvg::default())),
        (
            "iso (default, bounded)",
            Box::new(IsoMerge {
                max_samples_per_input: FedAvg::DEFAULT_MAX_SAMPLES_PER_INPUT,
                rank_cap: 64,
                bounds: Bounds::ROBUST,
                scale: 1.5,
            }),
        ),
        (
            "exact-mean (bounded)",
            Box::new(ExactMean {
                max_samples_per_input: FedAvg::DEFAULT_MAX_SAMPLES_PER_INPUT,
                rank_cap: 64,
                bounds: Bounds::ROBUST,
            }),
        ),
        (
            "geomedian (bounded)",
            Box::new(GeoMedian {
                max_samples_per_input: FedAvg::DEFAULT_MAX_SAMPLES_PER_INPUT,
                rank_cap: 64,
                bounds: Bounds::ROBUST,
            }),
        ),
        (
            "iso, norm and weight bounds only",
            Box::new(IsoMerge {
                max_samples_per_input: FedAvg::DEFAULT_MAX_SAMPLES_PER_INPUT,
                rank_cap: 64,
                bounds: Bounds {
                    distance_over_median: f64::INFINITY,
                    ..Bounds::ROBUST
                },
                scale: 1.5,
            }),
        ),
    ];
    let attacks = [
        "scale1e3",
        "scale1e6",
        "sign_flip",
        "random",
        "sample_liar",
        "target",
    ];
    let mut scenarios = Vec::new();
    for (honest_n, bad_n) in [(4usize, 1usize), (7, 3)] {
        let honest_adapters: Vec<LoraAdapter> = (0..honest_n as u64)
            .map(|i| honest(&shape, i))
            .collect::<Result<_>>()?;
        let honest_inputs: Vec<WeightedAdapter> = honest_adapters
            .iter()
            .map(|a| input(a.clone(), SAMPLES))
            .collect::<Result<_>>()?;
        let extra: Vec<WeightedAdapter> = (0..bad_n as u64)
            .map(|i| input(honest(&shape, 100 + i)?, SAMPLES))
            .collect::<Result<_>>()?;
        let mut by_rule = Vec::new();
        for (name, rule) in &rules {
            let reference = rule.aggregate(&honest_inputs)?;
            let more = [honest_inputs.clone(), extra.clone()].concat();
            let baseline = distance(&rule.aggregate(&more)?, &reference);
            let mut per_attack = serde_json::Map::new();
            for attack in attacks {
                let bad = attackers(attack, bad_n, &honest_adapters, &shape)?;
                let all = [honest_inputs.clone(), bad].concat();
                let v: Value = match rule.aggregate(&all) {
                    Ok(round) => {
                        let d = distance(&round, &reference);
                        json!({ "distance": d, "ratio": d / baseline })
                    }
                    Err(e) => json!({ "failed": e.to_string() }),
                };
                per_attack.insert(attack.to_string(), v);
            }
            by_rule.push(json!({
                "rule": name,
                "extra_honest_distance": baseline,
                "attacks": per_attack,
            }));
        }
        scenarios.push(json!({
            "honest": honest_n,
            "malicious": bad_n,
            "rules": by_rule,
        }));
    }
    let privacy = privacy_cost(&shape, &rules)?;
    let out = json!({
        "bench": "poisoning",
        "rank": RANK,
        "scenarios": scenarios,
        "privacy": privacy,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

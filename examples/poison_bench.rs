//! Poisoning: honest and malicious contributors through the real aggregation rules, FedAvg
//! beside the network's default (iso), the exact mean and the geometric median, with the
//! inputs bounded as networks bound them (`Bounds::ROBUST`: norm, weight, distance from the
//! others), and iso with the norm and weight bounds alone (before the distance bound). Prints
//! one JSON object.
//!
//! ```sh
//! cargo run --example poison_bench                     # synthetic updates, seconds
//! cargo run --example poison_bench -- --model default  # trained users, about an hour
//! cargo run --example poison_bench -- --model tiny     # trained on a tiny model (smoke)
//! ```
//!
//! Honest updates correlate as trained ones do: synthetic ones share a direction and add their
//! own; with `--model`, 13 users each train on 4 invented facts of their own (issue 12's LoRA
//! setup), 10 of them honest contributors and 3 the attackers' own updates. Attacks:
//! `scale1e3` / `scale1e6` (the attacker's honest-looking update times 1e3 / 1e6, also claiming
//! 10^12 samples), `sign_flip` (that update negated), `random` (random factors ten times an
//! honest update's size), `sample_liar` (a random update of honest size claiming 10^12
//! samples), `target` (sees the honest inputs and solves for the FedAvg round to be an adapter
//! of its choosing), `within_spread` (adaptive: knows the honest inputs and the rule, and flips
//! its own updates as far towards their negation as the rule still keeps them, see
//! [`within_spread`]). For each rule the report gives how far (relative Frobenius distance of
//! the merged update `ΔW` over every module, computed from the factors) the round moves from
//! the honest-only round of the same rule, and, as the baseline, how far the same number of
//! extra honest contributors move it; `ratio` is the first over the second. Issue 13's target:
//! ratio <= 1 for the default rule with 30% malicious inputs, in every attack.
//!
//! With `--model`, FedAvg's and the default rule's rounds are also scored by reply-token loss
//! (`hive-node eval`'s, no generation) on three sets: `facts`, the honest contributors' facts
//! as they were trained (what the round should teach; no one user saw them all); `paraphrased`,
//! the same facts asked another way (held out); `general`, the base model's own answers to the
//! shipped general prompts (held out; what the round makes the model forget). Under attack each
//! loss comes with its ratio to the round with extra honest users instead;
//! `default_over_fedavg_without_attack` is issue 13's "the default rule costs at most 5% in
//! held-out loss against FedAvg". The `privacy` section (synthetic mode) reports what differential privacy
//! (`--dp-noise`) costs the same rules at ε 1, 4 and 8.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use hivemind_model::adapter::{AdapterShape, LoraAdapter, LoraSide};
use hivemind_model::aggregate::{
    AggregationRule, Bounds, ExactMean, FedAvg, GeoMedian, IsoMerge, WeightedAdapter,
};
use hivemind_model::config::Arch;
use hivemind_model::dataset::{self, AlpacaItem, Conversation};
use hivemind_model::eval::{evaluate, EvalOptions};
use hivemind_model::facts::facts;
use hivemind_model::testing::{random_adapter, TinyModel};
use hivemind_model::train::{self, LoraSpec, LrSchedule, TrainConfig};
use hivemind_model::{BaseModel, LoadOptions, Module};
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

/// `⟨ΔW_a, ΔW_b⟩` over every module, from the factors: `⟨s·B·A, t·D·C⟩ = s·t·Σ (BᵀD)∘(ACᵀ)`
/// (no dense matrix: an update of the default model has about 100M values), in f64. A module
/// only one side has contributes nothing.
fn inner(a: &LoraAdapter, b: &LoraAdapter) -> f64 {
    let scale = a.config.scaling() * b.config.scaling();
    let mut total = 0.0;
    for (name, a_a) in &a.tensors {
        let Some(path) = name.strip_suffix(".lora_A.weight") else {
            continue;
        };
        let path = path.strip_prefix("base_model.model.").unwrap_or(path);
        let b_name = LoraAdapter::tensor_name(path, LoraSide::B);
        let (Some(a_b), Some(b_a), Some(b_b)) = (
            a.tensors.get(&b_name),
            b.tensors.get(name),
            b.tensors.get(&b_name),
        ) else {
            continue;
        };
        let (r, s) = (a_a.shape[0], b_a.shape[0]);
        let (inp, outf) = (a_a.shape[1], a_b.shape[0]);
        // BᵀD, a row of B and D at a time (rows are contiguous), then ⟨BᵀD, ACᵀ⟩.
        let mut gram_b = vec![0.0f64; r * s];
        for i in 0..outf {
            let (row_a, row_b) = (&a_b.data[i * r..(i + 1) * r], &b_b.data[i * s..(i + 1) * s]);
            for (k, x) in row_a.iter().enumerate() {
                for (l, y) in row_b.iter().enumerate() {
                    gram_b[k * s + l] += f64::from(*x) * f64::from(*y);
                }
            }
        }
        let mut sum = 0.0;
        for k in 0..r {
            let row_a = &a_a.data[k * inp..(k + 1) * inp];
            for l in 0..s {
                let row_c = &b_a.data[l * inp..(l + 1) * inp];
                let a_kl: f64 = row_a
                    .iter()
                    .zip(row_c)
                    .map(|(x, y)| f64::from(*x) * f64::from(*y))
                    .sum();
                sum += gram_b[k * s + l] * a_kl;
            }
        }
        total += sum;
    }
    scale * total
}

/// `‖ΔW_a − ΔW_ref‖ / ‖ΔW_ref‖` over every module.
fn distance(a: &LoraAdapter, reference: &LoraAdapter) -> f64 {
    let (aa, rr, ar) = (
        inner(a, a),
        inner(reference, reference),
        inner(a, reference),
    );
    ((aa + rr - 2.0 * ar).max(0.0) / rr).sqrt()
}

/// Random adapters for the attacks: `random(seed, times)` is one `times` as large as an honest
/// update (synthetic mode: the random factors times `times`; trained mode: `B` scaled so that
/// `‖ΔW‖` is `times` the honest users' mean).
type RandomAdapter<'a> = dyn Fn(u64, f32) -> Result<LoraAdapter> + 'a;

const ATTACKS: [&str; 6] = [
    "scale1e3",
    "scale1e6",
    "sign_flip",
    "random",
    "sample_liar",
    "target",
];

/// The malicious inputs of `attack`, one per adapter of `likes` (honest-looking updates of the
/// attackers' own), against `honest_inputs`.
fn attackers(
    attack: &str,
    likes: &[LoraAdapter],
    honest_inputs: &[LoraAdapter],
    random: &RandomAdapter<'_>,
) -> Result<Vec<WeightedAdapter>> {
    let count = likes.len();
    let mut out = Vec::new();
    for (i, like) in likes.iter().enumerate() {
        let i = i as u64;
        let (adapter, samples) = match attack {
            "scale1e3" => (scaled(like, 1e3), LIAR_SAMPLES),
            "scale1e6" => (scaled(like, 1e6), LIAR_SAMPLES),
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
            "random" => (random(900 + i, 10.0)?, SAMPLES),
            "sample_liar" => (random(700 + i, 1.0)?, LIAR_SAMPLES),
            "target" => {
                // FedAvg averages A and B by weight: with every input at SAMPLES, the
                // attackers' share makes the mean exactly the target's factors.
                let target = random(42, 3.0)?;
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
fn privacy_cost(
    shape: &AdapterShape,
    rules: &[(&str, bool, Box<dyn AggregationRule>)],
) -> Result<Value> {
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
        for (name, _, rule) in rules {
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

#[derive(Parser)]
struct Args {
    /// Train the honest users (and the attackers' own updates) on this base model, `default`, a
    /// GGUF file, a Hugging Face dir or `tiny` (a generated model: a smoke run, the numbers mean
    /// nothing), and report held-out losses. Without it, synthetic updates (seconds).
    #[arg(long)]
    model: Option<String>,
    /// Facts per trained user (13 users: 10 honest, 3 attackers').
    #[arg(long, default_value_t = 4)]
    facts_per_user: usize,
    /// Full-batch optimizer steps per trained user.
    #[arg(long, default_value_t = 30)]
    steps: usize,
    /// Seed of the facts and of the LoRA init (the same for every user).
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

/// The rules compared, each with whether the trained mode scores its rounds' losses.
fn rules(rank_cap: usize) -> Vec<(&'static str, bool, Box<dyn AggregationRule>)> {
    let cap_samples = FedAvg::DEFAULT_MAX_SAMPLES_PER_INPUT;
    vec![
        ("fedavg", true, Box::new(FedAvg::default())),
        (
            "iso (default, bounded)",
            true,
            Box::new(IsoMerge {
                max_samples_per_input: cap_samples,
                rank_cap,
                bounds: Bounds::ROBUST,
                scale: 1.5,
            }),
        ),
        (
            "exact-mean (bounded)",
            false,
            Box::new(ExactMean {
                max_samples_per_input: cap_samples,
                rank_cap,
                bounds: Bounds::ROBUST,
            }),
        ),
        (
            "geomedian (bounded)",
            false,
            Box::new(GeoMedian {
                max_samples_per_input: cap_samples,
                rank_cap,
                bounds: Bounds::ROBUST,
            }),
        ),
        (
            "iso, norm and weight bounds only",
            false,
            Box::new(IsoMerge {
                max_samples_per_input: cap_samples,
                rank_cap,
                bounds: Bounds {
                    distance_over_median: f64::INFINITY,
                    ..Bounds::ROBUST
                },
                scale: 1.5,
            }),
        ),
    ]
}

/// Contributors per scenario: (honest, malicious), 1 of 5 and 3 of 10.
const SCENARIOS: [(usize, usize); 2] = [(4, 1), (7, 3)];

/// What a scenario needs: the honest users' updates, as many extra honest users as there are
/// attackers (the baseline), the attackers' own honest-looking updates, and random adapters.
struct Pool<'a> {
    honest: Vec<LoraAdapter>,
    extra: Vec<LoraAdapter>,
    likes: Vec<LoraAdapter>,
    random: &'a RandomAdapter<'a>,
}

/// Every rule's rounds in one scenario: honest only, with the extra honest users, and under
/// each attack; `score` gives a round's losses (trained mode) for the rules that are scored.
fn scenario(
    pool: &Pool<'_>,
    rules: &[(&str, bool, Box<dyn AggregationRule>)],
    score: &mut dyn FnMut(Option<&LoraAdapter>) -> Result<Option<Value>>,
) -> Result<Value> {
    let weighted = |adapters: &[LoraAdapter]| -> Result<Vec<WeightedAdapter>> {
        adapters.iter().map(|a| input(a.clone(), SAMPLES)).collect()
    };
    let honest_inputs = weighted(&pool.honest)?;
    let more = [honest_inputs.clone(), weighted(&pool.extra)?].concat();
    let mut by_rule = Vec::new();
    for (name, scored, rule) in rules {
        let mut losses = |round: &LoraAdapter| -> Result<Option<Value>> {
            if *scored {
                score(Some(round))
            } else {
                Ok(None)
            }
        };
        let reference = rule.aggregate(&honest_inputs)?;
        let honest_losses = losses(&reference)?;
        let with_extra = rule.aggregate(&more)?;
        let baseline = distance(&with_extra, &reference);
        let extra_losses = losses(&with_extra)?;
        let mut per_attack = serde_json::Map::new();
        for attack in ATTACKS {
            let bad = attackers(attack, &pool.likes, &pool.honest, pool.random)?;
            let all = [honest_inputs.clone(), bad].concat();
            let v: Value = match rule.aggregate(&all) {
                Ok(round) => {
                    let d = distance(&round, &reference);
                    let mut v = json!({ "distance": d, "ratio": d / baseline });
                    if let Some(l) = losses(&round)? {
                        v["loss"] = loss_ratios(&l, extra_losses.as_ref());
                    }
                    v
                }
                Err(e) => json!({ "failed": e.to_string() }),
            };
            eprintln!("{name}, {attack}: {v}");
            per_attack.insert(attack.to_string(), v);
        }
        let (t, round) = within_spread(rule.as_ref(), &honest_inputs, &pool.likes)?;
        let d = distance(&round, &reference);
        let mut v = json!({ "flip": t, "distance": d, "ratio": d / baseline });
        if let Some(l) = losses(&round)? {
            v["loss"] = loss_ratios(&l, extra_losses.as_ref());
        }
        eprintln!("{name}, within_spread: {v}");
        per_attack.insert("within_spread".to_string(), v);
        let mut v = json!({
            "rule": name,
            "extra_honest_distance": baseline,
            "attacks": per_attack,
        });
        if let (Some(h), Some(e)) = (honest_losses, extra_losses) {
            v["honest_only_loss"] = h;
            v["extra_honest_loss"] = e;
        }
        by_rule.push(v);
    }
    Ok(Value::Array(by_rule))
}

/// The adaptive attack, `within_spread`: attackers who know the honest inputs and the rule send
/// their own honest-looking updates with `B` times `1 − t` (`t` = 2 is a sign flip), with the
/// largest `t` in [0, 2] the rule still keeps whole (its round adapter's
/// `hivemind_merge.left_out` is 0), found by bisection. Returns `t` and that round.
fn within_spread(
    rule: &dyn AggregationRule,
    honest_inputs: &[WeightedAdapter],
    likes: &[LoraAdapter],
) -> Result<(f64, LoraAdapter)> {
    let round = |t: f64| -> Result<(bool, LoraAdapter)> {
        let mut all = honest_inputs.to_vec();
        for like in likes {
            let mut a = like.clone();
            for (name, x) in &mut a.tensors {
                if name.ends_with("lora_B.weight") {
                    x.data.iter_mut().for_each(|v| *v *= (1.0 - t) as f32);
                }
            }
            all.push(input(a, SAMPLES)?);
        }
        let merged = rule.aggregate(&all)?;
        let left_out = merged
            .config
            .extra
            .get("hivemind_merge")
            .and_then(|m| m["left_out"].as_u64())
            .unwrap_or(0);
        Ok((left_out == 0, merged))
    };
    let (kept, merged) = round(2.0)?;
    if kept {
        return Ok((2.0, merged));
    }
    let (mut lo, mut hi) = (0.0, 2.0);
    let mut best = round(0.0)?.1;
    for _ in 0..8 {
        let mid = (lo + hi) / 2.0;
        let (kept, merged) = round(mid)?;
        if kept {
            (lo, best) = (mid, merged);
        } else {
            hi = mid;
        }
    }
    Ok((lo, best))
}

/// `losses` with each value's ratio to the same loss in `baseline`.
fn loss_ratios(losses: &Value, baseline: Option<&Value>) -> Value {
    let mut out = serde_json::Map::new();
    if let Some(m) = losses.as_object() {
        for (k, v) in m {
            let ratio = match (v.as_f64(), baseline.and_then(|b| b[k].as_f64())) {
                (Some(x), Some(b)) => json!(x / b),
                _ => Value::Null,
            };
            out.insert(k.clone(), json!({ "loss": v, "ratio": ratio }));
        }
    }
    Value::Object(out)
}

/// Synthetic honest updates with a shared direction (seconds).
fn synthetic() -> Result<Value> {
    let shape = shape()?;
    let rules = rules(64);
    let random = |seed: u64, times: f32| -> Result<LoraAdapter> {
        Ok(scaled(&random_adapter(&shape, ALPHA, seed)?, times))
    };
    let mut scenarios = Vec::new();
    for (honest_n, bad_n) in SCENARIOS {
        let make = |seeds: std::ops::Range<u64>| -> Result<Vec<LoraAdapter>> {
            seeds.map(|i| honest(&shape, i)).collect()
        };
        let pool = Pool {
            honest: make(0..honest_n as u64)?,
            extra: make(100..100 + bad_n as u64)?,
            likes: make(500..500 + bad_n as u64)?,
            random: &random,
        };
        let by_rule = scenario(&pool, &rules, &mut |_| Ok(None))?;
        scenarios.push(json!({
            "honest": honest_n,
            "malicious": bad_n,
            "rules": by_rule,
        }));
    }
    let privacy = privacy_cost(&shape, &rules)?;
    Ok(json!({
        "bench": "poisoning",
        "rank": RANK,
        "scenarios": scenarios,
        "privacy": privacy,
    }))
}

/// LoRA of the trained mode (issue 12's setup).
const TRAINED_RANK: usize = 8;
const TRAINED_ALPHA: f64 = 16.0;

/// Trained honest users on a real model, with the rounds' held-out losses.
fn trained(args: &Args, spec: &str) -> Result<Value> {
    let work = tempfile::tempdir()?;
    let path = if spec == "tiny" {
        let p = work.path().join("tiny.gguf");
        TinyModel::new(Arch::Llama, 1)?.write_gguf(&p)?;
        p
    } else {
        hivemind_model::pull::resolve_model(Some(spec), &mut |m| eprintln!("{m}"))?
    };
    let model = BaseModel::load(&path, &LoadOptions::default())?;
    let (honest_max, bad_max) = (10, 3);
    let users = honest_max + bad_max;
    let n = users * args.facts_per_user;
    let all = facts(n, args.seed);
    anyhow::ensure!(
        all.len() == n,
        "{users} users x {} facts is more than the {} facts there are",
        args.facts_per_user,
        hivemind_model::facts::MAX_FACTS
    );
    let convs: Vec<Conversation> = all.iter().map(|f| f.item().to_conversation()).collect();
    // The same facts asked another way: never trained on.
    let paraphrased: Vec<Conversation> = all
        .iter()
        .map(|f| {
            let name = f.answer.split(" works at").next().unwrap_or_default();
            AlpacaItem {
                instruction: format!("Which company does {name} work for?"),
                input: String::new(),
                output: f.answer.clone(),
            }
            .to_conversation()
        })
        .collect();
    let (examples, _) = dataset::encode_conversations(&model, Path::new("facts"), &convs, 512)?;
    anyhow::ensure!(examples.len() == n, "a fact does not fit the model");
    let general = hivemind_model::general::base_answers(&model, 32)?;

    let cfg = TrainConfig {
        lora: LoraSpec {
            rank: TRAINED_RANK,
            alpha: TRAINED_ALPHA,
            dropout: 0.0,
            target_modules: Module::ALL.to_vec(),
        },
        lr: 1e-3,
        epochs: args.steps,
        batch_size: args.facts_per_user,
        grad_accum: 1,
        warmup_ratio: 0.0,
        schedule: LrSchedule::Constant,
        max_seq_len: 512,
        max_steps: Some(args.steps),
        seed: args.seed,
        max_grad_norm: Some(1.0),
        ..TrainConfig::default()
    };
    let mut adapters = Vec::new();
    let mut final_losses = Vec::new();
    for u in 0..users {
        let t0 = Instant::now();
        let shard = &examples[u * args.facts_per_user..(u + 1) * args.facts_per_user];
        let out = train::train(
            &model,
            shard,
            &cfg,
            None,
            &AtomicBool::new(false),
            &mut |_| {},
        )?;
        eprintln!(
            "user {u} trained: loss {:?} -> {:?} ({:.0} s)",
            out.info.first_loss,
            out.info.final_loss,
            t0.elapsed().as_secs_f64()
        );
        final_losses.push(out.info.final_loss);
        adapters.push(out.adapter);
    }

    let names: Vec<String> = Module::ALL.iter().map(|m| m.to_string()).collect();
    let shape = model.decoder.cfg.adapter_shape(TRAINED_RANK, &names)?;
    let honest_size = adapters[..honest_max]
        .iter()
        .map(|a| inner(a, a).sqrt())
        .sum::<f64>()
        / honest_max as f64;
    let random = |seed: u64, times: f32| -> Result<LoraAdapter> {
        let mut a = random_adapter(&shape, TRAINED_ALPHA, seed)?;
        let k = (f64::from(times) * honest_size / inner(&a, &a).sqrt()) as f32;
        for (name, t) in &mut a.tensors {
            if name.ends_with("lora_B.weight") {
                t.data.iter_mut().for_each(|v| *v *= k);
            }
        }
        Ok(a)
    };

    let mut model = model;
    let opts = EvalOptions {
        max_len: 512,
        max_new_tokens: 0,
    };
    let rules = rules(honest_max * TRAINED_RANK);
    let mut scenarios = Vec::new();
    for (honest_n, bad_n) in SCENARIOS {
        let facts_n = honest_n * args.facts_per_user;
        let (own, other) = (&convs[..facts_n], &paraphrased[..facts_n]);
        let mut score = |adapter: Option<&LoraAdapter>| -> Result<Option<Value>> {
            let t0 = Instant::now();
            if let Some(a) = adapter {
                model.decoder.apply_adapter(a)?;
            }
            let mut out = serde_json::Map::new();
            for (what, set) in [
                ("facts", own),
                ("paraphrased", other),
                ("general", &general[..]),
            ] {
                match evaluate(&model, Path::new(what), set, &opts, |_, _| {}) {
                    Ok(r) => out.insert(what.to_string(), json!(r.mean_loss)),
                    Err(e) => out.insert(what.to_string(), json!(e.to_string())),
                };
            }
            model.decoder.remove_adapter();
            eprintln!("scored in {:.0} s", t0.elapsed().as_secs_f64());
            Ok(Some(Value::Object(out)))
        };
        let base = score(None)?;
        let pool = Pool {
            honest: adapters[..honest_n].to_vec(),
            extra: adapters[honest_n..honest_n + bad_n].to_vec(),
            likes: adapters[honest_max..honest_max + bad_n].to_vec(),
            random: &random,
        };
        let by_rule = scenario(&pool, &rules, &mut score)?;
        // With no attacker, what the robust default costs against FedAvg.
        let cost = match (by_rule.get(0), by_rule.get(1)) {
            (Some(f), Some(d)) => loss_ratios(&d["honest_only_loss"], Some(&f["honest_only_loss"])),
            _ => Value::Null,
        };
        scenarios.push(json!({
            "honest": honest_n,
            "malicious": bad_n,
            "base_model_loss": base,
            "default_over_fedavg_without_attack": cost,
            "rules": by_rule,
        }));
    }
    Ok(json!({
        "bench": "poisoning-trained",
        "model": model.name,
        "rank": TRAINED_RANK,
        "alpha": TRAINED_ALPHA,
        "facts_per_user": args.facts_per_user,
        "steps": args.steps,
        "users_final_train_loss": final_losses,
        "scenarios": scenarios,
    }))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let out = match &args.model {
        Some(spec) => trained(&args, spec)?,
        None => synthetic()?,
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

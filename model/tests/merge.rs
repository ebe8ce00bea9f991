//! The update-merging rules (exact mean, Iso, TSV, geometric median) against dense `f64`
//! references built from the users' `ΔW_k = s·B_k·A_k`: the exact mean is the mean, a rank cap
//! keeps the best low-rank part and says how much, Iso flattens the spectrum of the sum, TSV of
//! updates that are already orthogonal is their scaled sum, the geometric median is the one a
//! plain Weiszfeld iteration finds on the dense updates; every rule gives the same bytes for
//! the same inputs in any order and merged a module at a time; bounds keep one input from owning
//! a merge, and the distance bound keeps a minority far from the others out of it.

use std::collections::BTreeMap;

use hivemind_model::adapter::{
    AdapterConfig, Limits, LoraAdapter, LoraSide, LoraTensor, SafetensorsIndex, TargetModules,
};
use hivemind_model::aggregate::regmean;
use hivemind_model::aggregate::{
    aggregate_in_parts, AggregationRule, Bounds, ExactMean, FedAvg, GeoMedian, IndexedInput,
    IsoMerge, Median, MergeReport, TsvMerge, WeightedAdapter,
};
use hivemind_model::train::{Gram, InputGrams};
use hivemind_model::Module;
use rand::{Rng, SeedableRng};

/// (module kind, group, out, in): v_proj's 4 outputs are fewer than the inputs' summed rank.
const MODULES: [(&str, &str, usize, usize); 3] = [
    ("q_proj", "self_attn", 16, 12),
    ("v_proj", "self_attn", 4, 12),
    ("up_proj", "mlp", 20, 12),
];
const LAYERS: usize = 2;
const RANK: usize = 3;
const ALPHA: f64 = 6.0;

fn paths() -> Vec<(String, usize, usize)> {
    (0..LAYERS)
        .flat_map(|l| MODULES.map(|(m, g, o, i)| (format!("model.layers.{l}.{g}.{m}"), o, i)))
        .collect()
}

fn adapter_from(mut fill: impl FnMut(&str, usize, usize) -> Vec<f32>) -> LoraAdapter {
    let mut tensors = BTreeMap::new();
    for (p, out, inp) in paths() {
        let a = fill(&format!("{p}.A"), RANK, inp);
        let b = fill(&format!("{p}.B"), out, RANK);
        tensors.insert(
            LoraAdapter::tensor_name(&p, LoraSide::A),
            LoraTensor {
                shape: vec![RANK, inp],
                data: a,
            },
        );
        tensors.insert(
            LoraAdapter::tensor_name(&p, LoraSide::B),
            LoraTensor {
                shape: vec![out, RANK],
                data: b,
            },
        );
    }
    let config = AdapterConfig::new(RANK, ALPHA, TargetModules::from_names(MODULES.map(|m| m.0)));
    LoraAdapter::new(config, tensors).expect("valid adapter")
}

fn random(seed: u64) -> LoraAdapter {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    adapter_from(|_, r, c| (0..r * c).map(|_| rng.gen_range(-1.0f32..1.0)).collect())
}

fn weighted(adapter: LoraAdapter, samples: u64) -> WeightedAdapter {
    WeightedAdapter {
        hash: adapter.canonical_hash().expect("valid"),
        samples,
        adapter,
    }
}

/// `scaling · B · A` of module `p`, dense, in f64.
fn delta(a: &LoraAdapter, p: &str, out: usize, inp: usize) -> Vec<f64> {
    let ta = &a.tensors[&LoraAdapter::tensor_name(p, LoraSide::A)];
    let tb = &a.tensors[&LoraAdapter::tensor_name(p, LoraSide::B)];
    let r = ta.shape[0];
    let s = a.config.scaling();
    let mut m = vec![0.0; out * inp];
    for i in 0..out {
        for j in 0..inp {
            let mut acc = 0.0;
            for k in 0..r {
                acc += f64::from(tb.data[i * r + k]) * f64::from(ta.data[k * inp + j]);
            }
            m[i * inp + j] = s * acc;
        }
    }
    m
}

/// `got` equals `want` up to a relative Frobenius error of 1e-5.
fn assert_close(got: &[f64], want: &[f64], what: &str) {
    let err: f64 = got.iter().zip(want).map(|(x, y)| (x - y).powi(2)).sum();
    assert!(
        err.sqrt() <= 1e-5 * frob2(want).sqrt(),
        "{what}: error {err}"
    );
}

fn frob2(m: &[f64]) -> f64 {
    m.iter().map(|x| x * x).sum()
}

fn report(a: &LoraAdapter) -> MergeReport {
    serde_json::from_value(a.config.extra["hivemind_merge"].clone()).expect("merge report")
}

#[test]
fn exact_mean_is_the_weighted_mean_of_the_updates() {
    let inputs = vec![
        weighted(random(1), 10),
        weighted(random(2), 30),
        weighted(random(3), 20),
    ];
    let rule = ExactMean {
        max_samples_per_input: 1000,
        rank_cap: 64,
        bounds: Bounds::NONE,
    };
    let merged = rule.aggregate(&inputs).expect("merge");
    assert_eq!(merged.config.r, 3 * RANK);
    assert!((report(&merged).kept_energy - 1.0).abs() < 1e-12);
    for (p, out, inp) in paths() {
        let mut want = vec![0.0; out * inp];
        for w in &inputs {
            let d = delta(&w.adapter, &p, out, inp);
            for (x, y) in want.iter_mut().zip(d) {
                *x += w.samples as f64 / 60.0 * y;
            }
        }
        assert_close(&delta(&merged, &p, out, inp), &want, &p);
    }
}

#[test]
fn a_rank_cap_keeps_the_best_low_rank_part_and_says_how_much() {
    let inputs: Vec<_> = (1..=4).map(|s| weighted(random(s), 1)).collect();
    let full = ExactMean {
        max_samples_per_input: 1000,
        rank_cap: 64,
        bounds: Bounds::NONE,
    }
    .aggregate(&inputs)
    .expect("merge");
    let capped = ExactMean {
        max_samples_per_input: 1000,
        rank_cap: 5,
        bounds: Bounds::NONE,
    }
    .aggregate(&inputs)
    .expect("merge");
    assert_eq!(capped.config.r, 5);
    let (mut total, mut lost) = (0.0, 0.0);
    for (p, out, inp) in paths() {
        let f = delta(&full, &p, out, inp);
        let c = delta(&capped, &p, out, inp);
        total += frob2(&f);
        lost += f.iter().zip(&c).map(|(x, y)| (x - y).powi(2)).sum::<f64>();
    }
    let kept = report(&capped).kept_energy;
    assert!(kept < 0.999 && kept > 0.3, "kept {kept}");
    // Eckart–Young: what the truncation loses is exactly the energy it did not keep.
    assert!(
        ((1.0 - lost / total) - kept).abs() < 1e-5,
        "kept {kept}, measured {}",
        1.0 - lost / total
    );
}

#[test]
fn iso_flattens_the_spectrum_of_the_sum() {
    let inputs: Vec<_> = (1..=3).map(|s| weighted(random(s + 10), 1)).collect();
    let iso = IsoMerge {
        max_samples_per_input: 1000,
        rank_cap: 64,
        bounds: Bounds::NONE,
        scale: 1.0,
    }
    .aggregate(&inputs)
    .expect("merge");
    for (p, out, inp) in paths() {
        let m = delta(&iso, &p, out, inp);
        let mut sum = vec![0.0; out * inp];
        for w in &inputs {
            for (x, y) in sum.iter_mut().zip(delta(&w.adapter, &p, out, inp)) {
                *x += y;
            }
        }
        // G = M·Mᵀ of an isotropic M is σ̄²·(a projection): G·G = σ̄²·G, σ̄² = tr(G) / rank.
        let g = gram(&m, out, inp);
        let rank = (3 * RANK).min(out).min(inp) as f64;
        let s2 = g.iter().step_by(out + 1).sum::<f64>() / rank;
        let gg = square(&g, out);
        let err: f64 = gg.iter().zip(&g).map(|(x, y)| (x - s2 * y).powi(2)).sum();
        assert!(
            err.sqrt() < 1e-6 * s2 * frob2(&g).sqrt(),
            "{p}: not isotropic"
        );
        // σ̄ is the mean singular value of the sum: the trace norm over the rank.
        let nuclear = nuclear_norm(&sum, out, inp);
        assert!(
            (s2.sqrt() - nuclear / rank).abs() < 1e-4 * s2.sqrt(),
            "{p}: σ̄ {} vs {}",
            s2.sqrt(),
            nuclear / rank
        );
    }
}

#[test]
fn tsv_of_orthogonal_updates_is_their_scaled_sum() {
    // Input k only uses rows 4k..4k+3 of B and columns 4k..4k+3 of A: their singular vectors
    // are already orthogonal across inputs, so decorrelating changes nothing.
    let make = |k: usize, seed: u64| {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        adapter_from(|name, r, c| {
            let mut v = vec![0f32; r * c];
            for i in 0..r {
                for j in 0..c {
                    let live = if name.ends_with(".A") {
                        j / 4 == k
                    } else {
                        i / 4 == k
                    };
                    if live {
                        v[i * c + j] = rng.gen_range(-1.0f32..1.0);
                    }
                }
            }
            v
        })
    };
    // v_proj has 4 outputs: one input only fits there, so use 1 input per disjoint block
    // where modules are wide enough and check the wide modules.
    let inputs = vec![
        weighted(make(0, 1), 1),
        weighted(make(1, 2), 1),
        weighted(make(2, 3), 1),
    ];
    let tsv = TsvMerge {
        max_samples_per_input: 1000,
        rank_cap: 64,
        bounds: Bounds::NONE,
        scale: 0.5,
    }
    .aggregate(&inputs)
    .expect("merge");
    for (p, out, inp) in paths().into_iter().filter(|(_, o, _)| *o >= 12) {
        let mut want = vec![0.0; out * inp];
        for w in &inputs {
            for (x, y) in want.iter_mut().zip(delta(&w.adapter, &p, out, inp)) {
                *x += 0.5 * y;
            }
        }
        assert_close(&delta(&tsv, &p, out, inp), &want, &p);
    }
}

#[test]
fn every_rule_gives_the_same_bytes_in_any_order() {
    let inputs: Vec<_> = (1..=4).map(|s| weighted(random(s + 20), s * 7)).collect();
    let mut reversed = inputs.clone();
    reversed.reverse();
    let rules = rules(7, Bounds::NONE);
    for rule in rules {
        let a = rule
            .aggregate(&inputs)
            .expect("merge")
            .to_safetensors_bytes()
            .expect("bytes");
        let b = rule
            .aggregate(&reversed)
            .expect("merge")
            .to_safetensors_bytes()
            .expect("bytes");
        assert_eq!(a, b, "{}", rule.id());
    }
}

fn gram(m: &[f64], out: usize, inp: usize) -> Vec<f64> {
    let mut g = vec![0.0; out * out];
    for i in 0..out {
        for j in 0..out {
            g[i * out + j] = (0..inp).map(|k| m[i * inp + k] * m[j * inp + k]).sum();
        }
    }
    g
}

fn square(g: &[f64], n: usize) -> Vec<f64> {
    let mut out = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            out[i * n + j] = (0..n).map(|k| g[i * n + k] * g[k * n + j]).sum();
        }
    }
    out
}

/// Σ σ_i of `m`, from the eigenvalues of `m·mᵀ` by cyclic Jacobi rotations on the symmetric
/// matrix (a different algorithm from the rules' one-sided SVD).
fn nuclear_norm(m: &[f64], out: usize, inp: usize) -> f64 {
    let mut g = gram(m, out, inp);
    let n = out;
    for _ in 0..100 {
        let mut off = 0.0;
        for p in 0..n {
            for q in p + 1..n {
                off += g[p * n + q].powi(2);
                if g[p * n + q].abs() < 1e-300 {
                    continue;
                }
                let theta = (g[q * n + q] - g[p * n + p]) / (2.0 * g[p * n + q]);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (gkp, gkq) = (g[k * n + p], g[k * n + q]);
                    g[k * n + p] = c * gkp - s * gkq;
                    g[k * n + q] = s * gkp + c * gkq;
                }
                for k in 0..n {
                    let (gpk, gqk) = (g[p * n + k], g[q * n + k]);
                    g[p * n + k] = c * gpk - s * gqk;
                    g[q * n + k] = s * gpk + c * gqk;
                }
            }
        }
        if off < 1e-28 {
            break;
        }
    }
    (0..n).map(|i| g[i * n + i].max(0.0).sqrt()).sum()
}

#[test]
fn stack_applies_the_sum_of_adapters_of_different_ranks() {
    let round = ExactMean {
        max_samples_per_input: 1000,
        rank_cap: 64,
        bounds: Bounds::NONE,
    }
    .aggregate(&[weighted(random(31), 1), weighted(random(32), 1)])
    .expect("merge");
    let personal = random(33);
    let both = hivemind_model::aggregate::stack(&[&round, &personal]).expect("stack");
    assert_eq!(both.config.r, round.config.r + RANK);
    for (p, out, inp) in paths() {
        let want: Vec<f64> = delta(&round, &p, out, inp)
            .iter()
            .zip(delta(&personal, &p, out, inp))
            .map(|(x, y)| x + y)
            .collect();
        assert_close(&delta(&both, &p, out, inp), &want, &p);
    }
    // An adapter of fewer modules adds nothing where it has none.
    let mut fewer = random(34);
    fewer.tensors.retain(|n, _| !n.contains("up_proj"));
    let mixed = hivemind_model::aggregate::stack(&[&fewer, &personal]).expect("stack");
    for (p, out, inp) in paths() {
        let mut want = delta(&personal, &p, out, inp);
        if !p.contains("up_proj") {
            for (x, y) in want.iter_mut().zip(delta(&fewer, &p, out, inp)) {
                *x += y;
            }
        }
        assert_close(&delta(&mixed, &p, out, inp), &want, &p);
    }
    // Shapes that disagree are refused.
    let mut other = random(35);
    for t in other.tensors.values_mut().filter(|t| t.shape[0] == RANK) {
        t.shape[1] += 1;
        t.data.extend(std::iter::repeat_n(0.0, RANK));
    }
    assert!(hivemind_model::aggregate::stack(&[&personal, &other]).is_err());
}

/// Each update-merging rule; the exact mean truncated to `exact_cap`.
fn rules(exact_cap: usize, bounds: Bounds) -> Vec<Box<dyn AggregationRule>> {
    vec![
        Box::new(ExactMean {
            max_samples_per_input: 1000,
            rank_cap: exact_cap,
            bounds,
        }),
        Box::new(IsoMerge {
            max_samples_per_input: 1000,
            rank_cap: 64,
            bounds,
            scale: 1.0,
        }),
        Box::new(TsvMerge {
            max_samples_per_input: 1000,
            rank_cap: 64,
            bounds,
            scale: 0.5,
        }),
        Box::new(GeoMedian {
            max_samples_per_input: 1000,
            rank_cap: 64,
            bounds,
        }),
    ]
}

const CHILD_ENV: &str = "HIVEMIND_MERGE_TEST_CHILD";

fn hashes(inputs: &[WeightedAdapter]) -> Vec<String> {
    rules(5, Bounds::NONE)
        .into_iter()
        .chain(rules(5, Bounds::ROBUST))
        .map(|r| {
            r.aggregate(inputs)
                .expect("merge")
                .canonical_hash()
                .expect("hash")
                .to_hex()
        })
        .collect()
}

#[test]
fn every_rule_gives_the_same_hash_in_separate_processes() {
    let mut inputs: Vec<_> = (1..=4).map(|s| weighted(random(s + 40), s)).collect();
    if let Ok(rotate) = std::env::var(CHILD_ENV) {
        inputs.rotate_left(rotate.parse().expect("rotation"));
        println!("MERGE_HASHES={}", hashes(&inputs).join(","));
        return;
    }
    let here = hashes(&inputs).join(",");
    let exe = std::env::current_exe().expect("test binary");
    for rotate in [1, 3] {
        let out = std::process::Command::new(&exe)
            .args([
                "every_rule_gives_the_same_hash_in_separate_processes",
                "--exact",
                "--nocapture",
            ])
            .args(["--test-threads", "1"])
            .env(CHILD_ENV, rotate.to_string())
            .output()
            .expect("child runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "child failed: {stdout}");
        let printed = stdout
            .split("MERGE_HASHES=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("child printed no hashes: {stdout}"));
        assert_eq!(printed, here, "process with rotation {rotate}");
    }
}

/// An honest update as training makes them: a direction every user shares plus their own.
fn honest(seed: u64) -> LoraAdapter {
    let mut shared = rand::rngs::StdRng::seed_from_u64(1000);
    let mut own = rand::rngs::StdRng::seed_from_u64(seed);
    adapter_from(|_, r, c| {
        (0..r * c)
            .map(|_| shared.gen_range(-1.0f32..1.0) + 0.5 * own.gen_range(-1.0f32..1.0))
            .collect()
    })
}

/// Relative Frobenius distance (over every module) between two adapters' updates.
fn distance(a: &LoraAdapter, b: &LoraAdapter) -> f64 {
    let (mut diff, mut norm) = (0.0, 0.0);
    for (p, out, inp) in paths() {
        let (x, y) = (delta(a, &p, out, inp), delta(b, &p, out, inp));
        diff += x.iter().zip(&y).map(|(u, v)| (u - v).powi(2)).sum::<f64>();
        norm += frob2(&y);
    }
    (diff / norm).sqrt()
}

/// One of five inputs scaled x1e6 and claiming 10^12 samples: bounded, each rule's round stays
/// about as far from the honest-only round as one more honest input would move it; unbounded,
/// the attacker owns the round. Values of 3e38 (finite, so a valid adapter) cannot make a
/// bounded merge fail.
#[test]
fn bounds_keep_one_scaled_input_from_owning_the_merge() {
    let honest_inputs: Vec<_> = (1..=4).map(|s| weighted(honest(s), 12)).collect();
    let mut attacker = honest(9);
    attacker
        .tensors
        .values_mut()
        .for_each(|t| t.data.iter_mut().for_each(|v| *v *= 1e6));
    let mut with_attacker = honest_inputs.clone();
    with_attacker.push(weighted(attacker, 1_000_000_000_000));
    let mut with_honest = honest_inputs.clone();
    with_honest.push(weighted(honest(9), 12));
    for (bounded, unbounded) in rules(64, Bounds::ROBUST)
        .iter()
        .zip(rules(64, Bounds::NONE))
    {
        let reference = bounded.aggregate(&honest_inputs).expect("honest merge");
        let attacked = distance(
            &bounded.aggregate(&with_attacker).expect("merge"),
            &reference,
        );
        let one_more = distance(&bounded.aggregate(&with_honest).expect("merge"), &reference);
        let owned = distance(
            &unbounded.aggregate(&with_attacker).expect("merge"),
            &reference,
        );
        eprintln!(
            "{}: attacked {attacked:.3}, one more honest {one_more:.3}, unbounded {owned:.3e}",
            bounded.id()
        );
        assert!(
            attacked <= 1.5 * one_more,
            "{}: the attacker moved the round {attacked} (one more honest input: {one_more})",
            bounded.id()
        );
        // (Unbounded, the attacker's claimed samples are most of the weight: even the
        // geometric median is its.)
        assert!(
            owned > 100.0,
            "{}: unbounded, the attack moved it only {owned}",
            bounded.id()
        );
    }

    let huge = adapter_from(|_, r, c| vec![3e38; r * c]);
    let mut inputs = honest_inputs.clone();
    inputs.push(weighted(huge, 12));
    for (bounded, unbounded) in rules(64, Bounds::ROBUST)
        .iter()
        .zip(rules(64, Bounds::NONE))
    {
        let out = bounded.aggregate(&inputs);
        assert!(out.is_ok(), "{}: {:?}", bounded.id(), out.err());
        // What halted every round before inputs were bounded: the merge overflows f32; the
        // geometric median, even unbounded, gives the outlier too little weight for that.
        let unbounded_out = unbounded.aggregate(&inputs);
        if unbounded.id() == GeoMedian::ID {
            let reference = bounded.aggregate(&honest_inputs).expect("honest merge");
            let moved = distance(&unbounded_out.expect("geometric median"), &reference);
            assert!(moved < 1.0, "the 3e38 input moved the median {moved}");
        } else {
            assert!(unbounded_out.is_err(), "{}", unbounded.id());
        }
    }
}

/// The weighted geometric median of dense points by Weiszfeld's plain iteration (an
/// independent computation: dense vectors, no Gram matrix, no smoothing unless a point is hit).
fn dense_geometric_median(points: &[Vec<f64>], weights: &[f64]) -> Vec<f64> {
    let total: f64 = weights.iter().sum();
    let mut z = vec![0.0; points[0].len()];
    for (p, w) in points.iter().zip(weights) {
        for (x, y) in z.iter_mut().zip(p) {
            *x += w / total * y;
        }
    }
    for _ in 0..5000 {
        let mut num = vec![0.0; z.len()];
        let mut den = 0.0;
        for (p, w) in points.iter().zip(weights) {
            let d = p
                .iter()
                .zip(&z)
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f64>()
                .sqrt();
            let c = w / d.max(1e-300);
            den += c;
            for (x, y) in num.iter_mut().zip(p) {
                *x += c * y;
            }
        }
        z = num.into_iter().map(|x| x / den).collect();
    }
    z
}

#[test]
fn geomedian_is_the_geometric_median_of_the_updates() {
    let inputs = vec![
        weighted(random(61), 10),
        weighted(random(62), 30),
        weighted(random(63), 20),
        weighted(honest(64), 20),
        weighted(honest(65), 20),
    ];
    let rule = GeoMedian {
        max_samples_per_input: 1000,
        rank_cap: 64,
        bounds: Bounds::NONE,
    };
    let merged = rule.aggregate(&inputs).expect("merge");
    assert_eq!(merged.config.r, 5 * RANK);
    let weights: Vec<f64> = inputs.iter().map(|w| w.samples as f64).collect();
    for (p, out, inp) in paths() {
        let points: Vec<Vec<f64>> = inputs
            .iter()
            .map(|w| delta(&w.adapter, &p, out, inp))
            .collect();
        let want = dense_geometric_median(&points, &weights);
        assert_close(&delta(&merged, &p, out, inp), &want, &p);
        // Not the mean: the test would pass for a rule that averaged.
        let mut mean = vec![0.0; out * inp];
        for (pt, w) in points.iter().zip(&weights) {
            for (x, y) in mean.iter_mut().zip(pt) {
                *x += w / 100.0 * y;
            }
        }
        let off: f64 = mean.iter().zip(&want).map(|(x, y)| (x - y).powi(2)).sum();
        assert!(
            off.sqrt() > 1e-3 * frob2(&want).sqrt(),
            "{p}: median = mean"
        );
    }
}

/// Three of ten inputs from colluders who send one update (three names) against the direction
/// the honest inputs share (an honest-looking update with `B` negated, so of an honest norm):
/// with the norm and weight bounds alone, the mean moves towards them by their whole share,
/// far more than three more honest inputs would move it; with the distance bound too, they are left
/// out and no rule moves further than three more honest inputs would. (Colluders who stay
/// within the honest inputs' spread are kept, and then move a round as far as as many typical
/// inputs pointing one way; `examples/poison_bench.rs` measures both.)
#[test]
fn a_colluding_minority_cannot_choose_the_direction() {
    let honest_inputs: Vec<_> = (1..=7).map(|s| weighted(honest(s), 12)).collect();
    let mut target = honest(99);
    for (name, t) in &mut target.tensors {
        if name.ends_with("lora_B.weight") {
            t.data.iter_mut().for_each(|v| *v = -*v);
        }
    }
    let mut with_attackers = honest_inputs.clone();
    let mut with_honest = honest_inputs.clone();
    for s in 0..3u64 {
        // Equal updates under three names: one value nudged, so that each has its own hash
        // (a merge refuses a hash given twice).
        let mut a = target.clone();
        if let Some(t) = a.tensors.values_mut().next() {
            t.data[0] += s as f32 * 1e-6;
        }
        with_attackers.push(weighted(a, 12));
        with_honest.push(weighted(honest(20 + s), 12));
    }
    let size_only = Bounds {
        distance_over_median: f64::INFINITY,
        ..Bounds::ROBUST
    };
    let moved = |rule: &dyn AggregationRule| {
        let reference = rule.aggregate(&honest_inputs).expect("honest merge");
        let attacked = rule.aggregate(&with_attackers).expect("merge");
        (
            distance(&attacked, &reference),
            distance(&rule.aggregate(&with_honest).expect("merge"), &reference),
            report(&attacked).left_out,
        )
    };
    for (open, bounded) in rules(64, size_only).iter().zip(rules(64, Bounds::ROBUST)) {
        let (open_attacked, open_honest, _) = moved(open.as_ref());
        let (attacked, honest, left_out) = moved(bounded.as_ref());
        eprintln!(
            "{}: size bounds only: attacked {open_attacked:.3}, 3 more honest {open_honest:.3}; \
             all bounds: attacked {attacked:.3}, 3 more honest {honest:.3}, left out {left_out}",
            bounded.id()
        );
        if bounded.id() == ExactMean::ID {
            // (Iso's flattened spectrum moves a lot with any input: its baseline is large.)
            assert!(
                open_attacked > 2.0 * open_honest,
                "the attack should move the mean without the distance bound: {open_attacked} \
                 vs {open_honest}"
            );
        }
        assert!(
            attacked <= honest,
            "{}: the colluders moved the round {attacked} (3 more honest: {honest})",
            bounded.id()
        );
        // Three inputs in each of the 6 modules.
        assert_eq!(left_out, 3 * paths().len(), "{}", bounded.id());
    }
}

/// Honest inputs with nothing in common (independent random updates, all about as far from
/// each other) are all kept: the distance bound changes no byte of any rule's round.
#[test]
fn the_distance_bound_leaves_diverse_inputs_alone() {
    let inputs: Vec<_> = (1..=6).map(|s| weighted(random(s + 70), 12)).collect();
    let size_only = Bounds {
        distance_over_median: f64::INFINITY,
        ..Bounds::ROBUST
    };
    for (open, bounded) in rules(64, size_only).iter().zip(rules(64, Bounds::ROBUST)) {
        let a = bounded.aggregate(&inputs).expect("merge");
        let b = open.aggregate(&inputs).expect("merge");
        assert_eq!(report(&a).left_out, 0, "{}", bounded.id());
        assert_eq!(a.tensors, b.tensors, "{}", bounded.id());
    }
}

/// `a` with `B` negated: the update `−ΔW`.
fn flipped(mut a: LoraAdapter) -> LoraAdapter {
    for (name, t) in &mut a.tensors {
        if name.ends_with("lora_B.weight") {
            t.data.iter_mut().for_each(|v| *v = -*v);
        }
    }
    a
}

/// Five honest inputs of different weights and one sign-flipped: the flipped one is left out
/// of every module, and the exact mean is the weighted mean of the other five's updates, each
/// cut to the median norm of all six (as the norm bound cuts them before anything is left out).
#[test]
fn leaving_an_input_out_gives_the_mean_of_the_rest() {
    let mut inputs: Vec<_> = (1..=5u64)
        .map(|s| weighted(honest(s + 80), 8 + 2 * s))
        .collect();
    inputs.push(weighted(flipped(honest(89)), 14));
    let rule = ExactMean {
        max_samples_per_input: 1000,
        rank_cap: 64,
        bounds: Bounds {
            weight_over_median: f64::INFINITY,
            ..Bounds::ROBUST
        },
    };
    let merged = rule.aggregate(&inputs).expect("merge");
    assert_eq!(report(&merged).left_out, paths().len());
    let total: f64 = inputs[..5].iter().map(|w| w.samples as f64).sum();
    for (p, out, inp) in paths() {
        let dense: Vec<Vec<f64>> = inputs
            .iter()
            .map(|w| delta(&w.adapter, &p, out, inp))
            .collect();
        let mut norms: Vec<f64> = dense.iter().map(|d| frob2(d).sqrt()).collect();
        let unsorted = norms.clone();
        norms.sort_by(f64::total_cmp);
        let median = norms[(norms.len() - 1) / 2];
        let mut want = vec![0.0; out * inp];
        for ((d, w), n) in dense.iter().zip(&inputs).zip(&unsorted).take(5) {
            let clip = (median / n).min(1.0);
            for (x, y) in want.iter_mut().zip(d) {
                *x += w.samples as f64 / total * clip * y;
            }
        }
        assert_close(&delta(&merged, &p, out, inp), &want, &p);
    }
}

/// Where the honest inputs nearly coincide (no spread to measure by), an update against them
/// is still left out; and three inputs are never compared (of three, the two alike would make
/// the third look far, honest or not).
#[test]
fn the_distance_bound_holds_when_the_others_agree_and_waits_for_four_inputs() {
    let same = |nudge: u64| {
        let mut a = honest(3);
        if let Some(t) = a.tensors.values_mut().next() {
            t.data[0] += nudge as f32 * 1e-7;
        }
        weighted(a, 12)
    };
    let mut inputs: Vec<_> = (0..4).map(same).collect();
    inputs.push(weighted(flipped(honest(3)), 12));
    let three = vec![same(0), same(1), weighted(flipped(honest(3)), 12)];
    for rule in rules(64, Bounds::ROBUST) {
        let merged = rule.aggregate(&inputs).expect("merge");
        assert_eq!(report(&merged).left_out, paths().len(), "{}", rule.id());
        let merged = rule.aggregate(&three).expect("merge");
        assert_eq!(report(&merged).left_out, 0, "{}", rule.id());
    }
}

/// Merged a module at a time, each input's tensors read from its safetensors bytes as the module
/// needs them (as nodes merge rounds), every rule gives the same tensors as over the whole
/// inputs, and the same merge report (an input left out included).
#[test]
fn every_rule_merges_alike_a_module_at_a_time() {
    let mut adapters: Vec<_> = (1..=5u64)
        .map(|s| weighted(honest(s + 90), 10 + s))
        .collect();
    adapters.push(weighted(flipped(honest(99)), 12));
    let files: Vec<Vec<u8>> = adapters
        .iter()
        .map(|w| w.adapter.to_safetensors_bytes().expect("bytes"))
        .collect();
    let indexed: Vec<IndexedInput> = adapters
        .iter()
        .zip(&files)
        .map(|(w, bytes)| IndexedInput {
            hash: w.hash,
            samples: w.samples,
            index: SafetensorsIndex::of(bytes, &Limits::DEFAULT).expect("index"),
        })
        .collect();
    // Capped at rank 5, so that the kept energy is below 1 and its sums are compared too.
    let mut all: Vec<Box<dyn AggregationRule>> = vec![
        Box::new(ExactMean {
            max_samples_per_input: 1000,
            rank_cap: 5,
            bounds: Bounds::ROBUST,
        }),
        Box::new(IsoMerge {
            max_samples_per_input: 1000,
            rank_cap: 5,
            bounds: Bounds::ROBUST,
            scale: 1.0,
        }),
        Box::new(TsvMerge {
            max_samples_per_input: 1000,
            rank_cap: 5,
            bounds: Bounds::ROBUST,
            scale: 0.5,
        }),
        Box::new(GeoMedian {
            max_samples_per_input: 1000,
            rank_cap: 5,
            bounds: Bounds::ROBUST,
        }),
    ];
    all.push(Box::new(FedAvg::default()));
    all.push(Box::new(Median));
    let config = adapters[0].adapter.config.clone();
    for rule in all {
        let mut reads = 0;
        let parts = aggregate_in_parts(rule.as_ref(), &config, &indexed, |input, offset, len| {
            reads += 1;
            let k = indexed
                .iter()
                .position(|i| i.hash == input.hash)
                .expect("input");
            let (at, n) = (offset as usize, len as usize);
            Ok::<_, std::convert::Infallible>(files[k][at..at + n].to_vec())
        })
        .expect("reads")
        .expect("merge");
        let whole = rule.aggregate(&adapters).expect("merge");
        // Bit for bit (bytes, not f32 equality, which takes -0.0 for 0.0), config included.
        assert_eq!(
            parts.to_safetensors_bytes().expect("bytes"),
            whole.to_safetensors_bytes().expect("bytes"),
            "{}",
            rule.id()
        );
        assert_eq!(parts.config, whole.config, "{}", rule.id());
        assert_eq!(reads, 6 * 2 * paths().len(), "one read per tensor");
        if whole.config.extra.contains_key("hivemind_merge") {
            let r = report(&parts);
            assert_eq!(
                r.left_out,
                paths().len(),
                "{}: the flipped input",
                rule.id()
            );
            assert!(r.kept_energy < 1.0, "{}: the cap cut nothing", rule.id());
        }
    }
}

/// Gram matrices `XᵀX` of `rows` random inputs for every module input of every layer (each
/// input `12` wide, as every module of [`MODULES`] reads), scaled by `scale`.
fn random_grams(seed: u64, rows: usize, scale: f64) -> InputGrams {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = 12;
    let mut one = || {
        let x: Vec<f64> = (0..rows * n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let mut data = vec![0.0; n * n];
        for r in 0..rows {
            for i in 0..n {
                for j in 0..n {
                    data[i * n + j] += scale * x[r * n + i] * x[r * n + j];
                }
            }
        }
        Gram {
            dim: n,
            data: data.into_iter().map(|x| x as f32).collect(),
        }
    };
    InputGrams {
        layers: (0..LAYERS).map(|_| [one(), one(), one(), one()]).collect(),
        tokens: rows,
    }
}

/// `m⁻¹` of a dense `n × n` matrix by Gauss-Jordan elimination with partial pivoting (a
/// different method from the rule's Cholesky solve).
fn inverse(m: &[f64], n: usize) -> Vec<f64> {
    let mut a = m.to_vec();
    let mut inv = vec![0.0; n * n];
    for i in 0..n {
        inv[i * n + i] = 1.0;
    }
    for c in 0..n {
        let p = (c..n)
            .max_by(|&x, &y| a[x * n + c].abs().total_cmp(&a[y * n + c].abs()))
            .expect("a row");
        for j in 0..n {
            a.swap(c * n + j, p * n + j);
            inv.swap(c * n + j, p * n + j);
        }
        let d = a[c * n + c];
        for j in 0..n {
            a[c * n + j] /= d;
            inv[c * n + j] /= d;
        }
        for r in 0..n {
            if r != c {
                let f = a[r * n + c];
                for j in 0..n {
                    a[r * n + j] -= f * a[c * n + j];
                    inv[r * n + j] -= f * inv[c * n + j];
                }
            }
        }
    }
    inv
}

fn dense_mul(x: &[f64], y: &[f64], rows: usize, inner: usize, cols: usize) -> Vec<f64> {
    let mut out = vec![0.0; rows * cols];
    for i in 0..rows {
        for k in 0..inner {
            for j in 0..cols {
                out[i * cols + j] += x[i * inner + k] * y[k * cols + j];
            }
        }
    }
    out
}

/// Which [`Module`] a test path names (its last part).
fn module_of(p: &str) -> Module {
    p.rsplit('.')
        .next()
        .expect("a name")
        .parse()
        .expect("a module")
}

#[test]
fn regmean_is_the_least_squares_merge_of_the_updates() {
    let users = [random(1), random(2), random(3)];
    let grams = [
        random_grams(11, 20, 1.0),
        random_grams(12, 30, 2.0),
        random_grams(13, 25, 0.5),
    ];
    let alpha = 0.9;
    let inputs: Vec<(&LoraAdapter, &InputGrams)> = users.iter().zip(&grams).collect();
    let merged = regmean(&inputs, alpha, 1.0).expect("merge");
    assert_eq!(merged.config.r, 3 * RANK);
    for (l, (p, out, inp)) in paths()
        .into_iter()
        .enumerate()
        .map(|(i, x)| (i / MODULES.len(), x))
    {
        let m = module_of(&p);
        // ΔW* = (Σ ΔW_k·G̃_k)·(Σ G̃_k)⁻¹ with G̃ = α·G + (1−α)·diag G, dense.
        let mut lhs = vec![0.0; out * inp];
        let mut sum = vec![0.0; inp * inp];
        for (u, g) in users.iter().zip(&grams) {
            let g = g.of(l, m).expect("layer");
            let mut shrunk: Vec<f64> = g.data.iter().map(|&x| f64::from(x)).collect();
            for i in 0..inp {
                for j in 0..inp {
                    if i != j {
                        shrunk[i * inp + j] *= alpha;
                    }
                }
            }
            let d = dense_mul(&delta(u, &p, out, inp), &shrunk, out, inp, inp);
            lhs.iter_mut().zip(d).for_each(|(x, y)| *x += y);
            sum.iter_mut().zip(&shrunk).for_each(|(x, y)| *x += y);
        }
        let want = dense_mul(&lhs, &inverse(&sum, inp), out, inp, inp);
        assert_close(&delta(&merged, &p, out, inp), &want, &p);
    }
    // Equal statistics make it the plain mean of the updates.
    let same = [grams[0].clone(), grams[0].clone(), grams[0].clone()];
    let inputs: Vec<(&LoraAdapter, &InputGrams)> = users.iter().zip(&same).collect();
    let merged = regmean(&inputs, alpha, 1.0).expect("merge");
    for (p, out, inp) in paths() {
        let mut want = vec![0.0; out * inp];
        for u in &users {
            let d = delta(u, &p, out, inp);
            want.iter_mut().zip(d).for_each(|(x, y)| *x += y / 3.0);
        }
        assert_close(&delta(&merged, &p, out, inp), &want, &p);
    }
}

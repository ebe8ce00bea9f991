//! Deterministic aggregation: FedAvg and Median against naive f64 references, order
//! independence down to the bytes, equal hashes across processes, refusal of
//! incompatible inputs.

use std::collections::BTreeMap;
use std::process::Command;

use anyhow::Result;
use hivemind_model::adapter::{
    parse_safetensors, AdapterConfig, AdapterError, Limits, LoraAdapter, LoraSide, LoraTensor,
    TargetModules,
};
use hivemind_model::aggregate::{
    canonical_inputs, AggregationRule, FedAvg, Median, WeightedAdapter,
};
use hivemind_protocol::Hash;
use rand::{Rng, SeedableRng};

/// (module kind, group, out, in).
const MODULES: [(&str, &str, usize, usize); 3] = [
    ("q_proj", "self_attn", 8, 8),
    ("v_proj", "self_attn", 4, 8),
    ("up_proj", "mlp", 12, 8),
];
const LAYERS: usize = 2;
const RANK: usize = 4;

fn config() -> AdapterConfig {
    AdapterConfig::new(RANK, 8.0, TargetModules::from_names(MODULES.map(|m| m.0)))
}

/// A random adapter; values spread over several orders of magnitude so rounding matters.
fn random_adapter(seed: u64) -> LoraAdapter {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut tensors = BTreeMap::new();
    for layer in 0..LAYERS {
        for (module, group, out, inp) in MODULES {
            let p = format!("model.layers.{layer}.{group}.{module}");
            let mut t = |rows: usize, cols: usize| LoraTensor {
                shape: vec![rows, cols],
                data: (0..rows * cols)
                    .map(|_| rng.gen_range(-1.0f32..1.0) * 10f32.powi(rng.gen_range(-3..3)))
                    .collect(),
            };
            tensors.insert(LoraAdapter::tensor_name(&p, LoraSide::A), t(RANK, inp));
            tensors.insert(LoraAdapter::tensor_name(&p, LoraSide::B), t(out, RANK));
        }
    }
    LoraAdapter::new(config(), tensors).expect("valid adapter")
}

fn weighted(adapter: LoraAdapter, samples: u64) -> WeightedAdapter {
    let hash = adapter.canonical_hash().expect("valid adapter");
    WeightedAdapter {
        hash,
        samples,
        adapter,
    }
}

/// Five inputs; sample counts include 0 (counts as 1) and one above the cap of 1000.
fn fixture() -> Vec<WeightedAdapter> {
    [(1, 10), (2, 0), (3, 250), (4, 5000), (5, 1)]
        .into_iter()
        .map(|(seed, samples)| weighted(random_adapter(seed), samples))
        .collect()
}

const CAP: u64 = 1000;

fn hash_of(inputs: &[WeightedAdapter]) -> Result<Hash> {
    Ok(FedAvg::new(CAP).aggregate(inputs)?.canonical_hash()?)
}

#[test]
fn fedavg_matches_an_f64_reference() -> Result<()> {
    let inputs = fixture();
    let out = FedAvg::new(CAP).aggregate(&inputs)?;
    // Reference: computed here independently in f64 from the definition, with the weights
    // written out by hand (min(samples, 1000), 0 -> 1): sum(w_i * x_i) / sum(w_i).
    let weights = [10.0f64, 1.0, 250.0, 1000.0, 1.0];
    let total: f64 = weights.iter().sum();
    let mut worst = 0f64;
    for (name, t) in &out.tensors {
        assert_eq!(t.shape, inputs[0].adapter.tensors[name].shape);
        for (j, &got) in t.data.iter().enumerate() {
            let mut num = 0f64;
            let mut mag = 0f64;
            for (input, w) in inputs.iter().zip(weights) {
                let x = f64::from(input.adapter.tensors[name].data[j]);
                num += w * x;
                mag += w * x.abs();
            }
            let want = num / total;
            // f32 error of n products, n sums and one division, relative to sum(w|x|)/W.
            let bound = 8.0 * f64::from(f32::EPSILON) * (mag / total) + 1e-30;
            let err = (f64::from(got) - want).abs();
            assert!(
                err <= bound,
                "{name}[{j}]: got {got}, want {want}, err {err} > {bound}"
            );
            worst = worst.max(err / bound);
        }
    }
    assert!(worst > 0.0, "the comparison saw rounding at all");
    assert_eq!(out.config, inputs[0].adapter.config);
    Ok(())
}

#[test]
fn fedavg_small_example_is_exact() -> Result<()> {
    // One element per tensor: weights 1 and 3, values 1 and 5 -> (1*1 + 3*5) / 4 = 4.
    let one = |v: f32| {
        let mut t = BTreeMap::new();
        let p = "model.layers.0.self_attn.q_proj";
        t.insert(
            LoraAdapter::tensor_name(p, LoraSide::A),
            LoraTensor {
                shape: vec![1, 1],
                data: vec![v],
            },
        );
        t.insert(
            LoraAdapter::tensor_name(p, LoraSide::B),
            LoraTensor {
                shape: vec![1, 1],
                data: vec![-v],
            },
        );
        let c = AdapterConfig::new(1, 1.0, TargetModules::from_names(["q_proj"]));
        LoraAdapter::new(c, t).expect("valid")
    };
    let inputs = [weighted(one(1.0), 1), weighted(one(5.0), 3)];
    let out = FedAvg::new(CAP).aggregate(&inputs)?;
    let values: Vec<f32> = out.tensors.values().map(|t| t.data[0]).collect();
    assert_eq!(values, [4.0, -4.0]);
    // With a cap of 1 both weigh 1: (1 + 5) / 2 = 3.
    let out = FedAvg::new(1).aggregate(&inputs)?;
    let values: Vec<f32> = out.tensors.values().map(|t| t.data[0]).collect();
    assert_eq!(values, [3.0, -3.0]);
    assert_eq!(
        [0, 1, 7, 1000, 5000].map(|s| FedAvg::new(CAP).weight(s)),
        [1, 1, 7, 1000, 1000]
    );
    assert_eq!(FedAvg::new(0).weight(9), 1, "a cap of 0 still weighs 1");
    Ok(())
}

#[test]
fn input_order_does_not_change_a_byte() -> Result<()> {
    let inputs: Vec<_> = fixture().into_iter().take(4).collect();
    let rules: [&dyn AggregationRule; 2] = [&FedAvg::new(CAP), &Median];
    for rule in rules {
        let want = rule.aggregate(&inputs)?.to_safetensors_bytes()?;
        // All 24 orders of four inputs.
        let mut order = [0usize, 1, 2, 3];
        for _ in 0..24 {
            let shuffled: Vec<_> = order.iter().map(|&i| inputs[i].clone()).collect();
            let got = rule.aggregate(&shuffled)?.to_safetensors_bytes()?;
            assert!(
                got == want,
                "{}: order {order:?} changed the bytes",
                rule.id()
            );
            next_permutation(&mut order);
        }
    }
    Ok(())
}

fn next_permutation(p: &mut [usize]) {
    let Some(i) = (1..p.len()).rev().find(|&i| p[i - 1] < p[i]) else {
        p.reverse();
        return;
    };
    let j = (i..p.len())
        .rev()
        .find(|&j| p[j] > p[i - 1])
        .expect("exists");
    p.swap(i - 1, j);
    p[i..].reverse();
}

const CHILD_ENV: &str = "HIVEMIND_AGGREGATE_TEST_CHILD";

#[test]
fn same_inputs_give_the_same_hash_in_separate_processes() -> Result<()> {
    let mut inputs = fixture();
    if let Ok(rotate) = std::env::var(CHILD_ENV) {
        // Child: the same inputs, given in another order, then print the hash.
        inputs.rotate_left(rotate.parse()?);
        println!("AGGREGATE_HASH={}", hash_of(&inputs)?);
        return Ok(());
    }
    let here = hash_of(&inputs)?;
    let exe = std::env::current_exe()?;
    for rotate in [1, 3] {
        let out = Command::new(&exe)
            .args([
                "same_inputs_give_the_same_hash_in_separate_processes",
                "--exact",
                "--nocapture",
            ])
            .args(["--test-threads", "1"])
            .env(CHILD_ENV, rotate.to_string())
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "child failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let printed = stdout
            .split("AGGREGATE_HASH=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("child printed no hash: {stdout}"));
        assert_eq!(
            printed.parse::<Hash>()?,
            here,
            "process with rotation {rotate}"
        );
    }
    Ok(())
}

#[test]
fn result_round_trips_through_canonical_bytes() -> Result<()> {
    let out = FedAvg::new(CAP).aggregate(&fixture())?;
    let bytes = out.to_safetensors_bytes()?;
    let again = LoraAdapter::new(
        out.config.clone(),
        parse_safetensors(&bytes, &Limits::DEFAULT)?,
    )?;
    assert_eq!(again, out);
    assert_eq!(again.canonical_hash()?, Hash::of(&bytes));
    Ok(())
}

#[test]
fn median_matches_a_naive_reference() -> Result<()> {
    for n in [3usize, 4] {
        let inputs: Vec<_> = fixture().into_iter().take(n).collect();
        let out = Median.aggregate(&inputs)?;
        assert_eq!(Median.id(), "median-v1");
        for (name, t) in &out.tensors {
            for (j, &got) in t.data.iter().enumerate() {
                // Reference: sort the column in f64; odd n takes the middle value, even n
                // the f64 mean of the two middle values (exact here, then rounded once).
                let mut col: Vec<f64> = inputs
                    .iter()
                    .map(|i| f64::from(i.adapter.tensors[name].data[j]))
                    .collect();
                col.sort_by(f64::total_cmp);
                let want = if n % 2 == 1 {
                    col[n / 2]
                } else {
                    (col[n / 2 - 1] + col[n / 2]) / 2.0
                };
                let tol = if n % 2 == 1 {
                    0.0
                } else {
                    f64::from(f32::EPSILON) * want.abs()
                };
                assert!(
                    (f64::from(got) - want).abs() <= tol,
                    "n={n} {name}[{j}]: {got} vs {want}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn incompatible_inputs_are_refused_naming_the_difference() -> Result<()> {
    let base = || weighted(random_adapter(1), 10);
    let other = || random_adapter(2);
    let rule = FedAvg::new(CAP);
    let check = |b: LoraAdapter, what: &str| {
        let inputs = [base(), weighted(b, 10)];
        let err = rule.aggregate(&inputs).expect_err(what);
        let msg = err.to_string();
        assert!(
            matches!(err, AdapterError::Incompatible { .. }),
            "{what}: {err:?}"
        );
        assert!(msg.contains(what), "{what}: {msg}");
    };

    let mut b = other();
    b.config.lora_alpha = 16.0;
    check(b, "config `lora_alpha`");
    let mut b = other();
    b.config.use_rslora = true;
    check(b, "config `use_rslora`");
    let mut b = other();
    b.config.target_modules = TargetModules::from_names(["q_proj", "v_proj", "up_proj", "o_proj"]);
    check(b, "config `target_modules`");

    // Rank 2 instead of 4: the config and every tensor differ; the config is named first.
    let mut b = other();
    b.config.r = 2;
    for (name, t) in b.tensors.iter_mut() {
        let (rows, cols) = if name.contains("lora_A") {
            (2, t.shape[1])
        } else {
            (t.shape[0], 2)
        };
        *t = LoraTensor {
            shape: vec![rows, cols],
            data: vec![0.5; rows * cols],
        };
    }
    check(b, "config `r`");

    // A missing pair.
    let mut b = other();
    b.tensors.retain(|n, _| !n.contains("layers.1.mlp.up_proj"));
    check(
        b,
        "tensor base_model.model.model.layers.1.mlp.up_proj.lora_A.weight",
    );

    // Same names, another module size.
    let mut b = other();
    let name = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight";
    b.tensors.insert(
        name.into(),
        LoraTensor {
            shape: vec![6, RANK],
            data: vec![0.0; 6 * RANK],
        },
    );
    check(b, &format!("shape of tensor {name}"));

    assert!(matches!(rule.aggregate(&[]), Err(AdapterError::NoInputs)));
    assert!(matches!(Median.aggregate(&[]), Err(AdapterError::NoInputs)));
    let dup = [base(), base()];
    assert!(
        matches!(rule.aggregate(&dup), Err(AdapterError::DuplicateInput { hash }) if hash == dup[0].hash)
    );

    // An input that is not a valid adapter is named by its hash.
    let mut bad = weighted(other(), 1);
    let first = bad.adapter.tensors.keys().next().expect("a tensor").clone();
    bad.adapter.tensors.get_mut(&first).expect("present").data[0] = f32::INFINITY;
    let bad_hash = bad.hash;
    assert!(matches!(
        canonical_inputs(&[base(), bad]),
        Err(AdapterError::InvalidInput { hash, .. }) if hash == bad_hash
    ));
    Ok(())
}

/// Values at f32::MAX (finite, so a valid adapter) made the f32 sum overflow: the
/// aggregation failed on every node and the round never committed. The mean is now taken in
/// f64 and is finite: half of f32::MAX plus half of the other input.
#[test]
fn fedavg_of_huge_values_is_their_finite_mean() -> Result<()> {
    let mut a = random_adapter(1);
    for t in a.tensors.values_mut() {
        t.data.iter_mut().for_each(|v| *v = f32::MAX);
    }
    let other = random_adapter(2);
    let inputs = [weighted(a.clone(), 10), weighted(other.clone(), 10)];
    let out = FedAvg::new(CAP).aggregate(&inputs)?;
    for (name, t) in &out.tensors {
        for (got, x) in t.data.iter().zip(&other.tensors[name].data) {
            let want = (f64::from(f32::MAX) + f64::from(*x)) / 2.0;
            assert!(got.is_finite());
            assert_eq!(*got, want as f32, "{name}");
        }
    }
    // A single input with a power-of-two weight is its own average, bit for bit.
    let single = FedAvg::new(CAP).aggregate(&[weighted(random_adapter(3), 64)])?;
    assert_eq!(single, random_adapter(3));
    assert_eq!(FedAvg::default().id(), "fedavg-v2");
    Ok(())
}

//! RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models",
//! ICLR 2023) over LoRA updates: the merged update of a module is the one whose outputs on every
//! user's own inputs are closest, in least squares, to that user's update's outputs,
//!
//! ```text
//! ΔW* = argmin Σ_k ‖ΔW·X_kᵀ − ΔW_k·X_kᵀ‖²  =  (Σ_k ΔW_k·G_k)·(Σ_k G_k)⁻¹,   G_k = X_kᵀ·X_k
//! ```
//!
//! with each `G_k` shrunk toward its diagonal (`α·G + (1−α)·diag G`, RegMean's `α`). For LoRA
//! updates `ΔW_k = s·B_k·A_k` the result is again low-rank: `B = [B_1 | … | B_K]`,
//! `A = [A'_1; …; A'_K]` with `A'_k = s·A_k·G_k·(Σ G)⁻¹`, rank `K·r`.

use std::collections::BTreeMap;

use super::linalg::{cholesky, cholesky_solve};
use crate::adapter::{AdapterError, LoraAdapter, LoraTensor};
use crate::lora::peft_name;
use crate::module::Module;
use crate::train::{Gram, InputGrams};

/// `α·G + (1−α)·diag G`.
fn shrunk(g: &Gram, alpha: f64) -> Vec<f64> {
    let n = g.dim;
    let mut out: Vec<f64> = g.data.iter().map(|&x| f64::from(x) * alpha).collect();
    for i in 0..n {
        out[i * n + i] = f64::from(g.data[i * n + i]);
    }
    out
}

fn bad(what: String) -> AdapterError {
    AdapterError::InvalidConfig {
        field: "regmean",
        value: what,
        expected: "input Gram matrices of the adapters' modules",
    }
}

/// RegMean of `inputs` (each user's adapter and the Gram matrices of its modules' inputs over
/// its own data), with RegMean's `alpha`, times `scale`. Every input must have the same
/// modules and rank; the result has scaling 1 and rank `K·r`.
pub fn regmean(
    inputs: &[(&LoraAdapter, &InputGrams)],
    alpha: f64,
    scale: f64,
) -> Result<LoraAdapter, AdapterError> {
    let Some((reference, _)) = inputs.first() else {
        return Err(AdapterError::NoTensors);
    };
    let r = reference.config.r;
    let rank = r * inputs.len();
    let layers = inputs
        .iter()
        .map(|(_, g)| g.layers.len())
        .min()
        .unwrap_or(0);
    let mut tensors = BTreeMap::new();
    for l in 0..layers {
        // One factorisation per distinct input of the layer.
        let mut factors: BTreeMap<usize, (Vec<f64>, Vec<Vec<f64>>)> = BTreeMap::new();
        for m in Module::ALL {
            let a_name = peft_name(l, m, "A");
            let b_name = peft_name(l, m, "B");
            let (Some(ref_a), Some(ref_b)) = (
                reference.tensors.get(&a_name),
                reference.tensors.get(&b_name),
            ) else {
                continue;
            };
            let (n, out) = (ref_a.shape[1], ref_b.shape[0]);
            let key = crate::train::ModuleInput::of(m).index();
            if let std::collections::btree_map::Entry::Vacant(e) = factors.entry(key) {
                let mut sum: Option<Vec<f64>> = None;
                let mut each = Vec::new();
                for (_, g) in inputs {
                    let g = g.of(l, m).ok_or_else(|| bad(format!("no layer {l}")))?;
                    if g.dim != n || g.data.len() != n * n {
                        return Err(bad(format!("{a_name}: Gram matrices not {n} wide")));
                    }
                    let s = shrunk(g, alpha);
                    match &mut sum {
                        Some(t) => t.iter_mut().zip(&s).for_each(|(t, x)| *t += x),
                        None => sum = Some(s.clone()),
                    }
                    each.push(s);
                }
                let mut ridged = sum.ok_or(AdapterError::NoTensors)?;
                // A ridge of 1e-9 of the mean diagonal keeps unused directions solvable.
                let mean_diag = (0..n).map(|i| ridged[i * n + i]).sum::<f64>() / n.max(1) as f64;
                for i in 0..n {
                    ridged[i * n + i] += 1e-9 * mean_diag.max(f64::MIN_POSITIVE);
                }
                let chol = cholesky(&ridged, n, 0.0)
                    .ok_or_else(|| bad(format!("layer {l}: Gram sum not positive definite")))?;
                e.insert((chol, each));
            }
            let (chol, each) = &factors[&key];
            let mut a_out = Vec::with_capacity(rank);
            let mut b_cols: Vec<&LoraTensor> = Vec::new();
            for ((adapter, _), g) in inputs.iter().zip(each) {
                let get = |name: &String| {
                    adapter
                        .tensors
                        .get(name)
                        .ok_or_else(|| AdapterError::MissingTensor {
                            tensor: name.clone(),
                        })
                };
                let (a, b) = (get(&a_name)?, get(&b_name)?);
                if a.shape != ref_a.shape || b.shape != ref_b.shape || a.shape[0] != r {
                    return Err(bad(format!("{a_name}: shapes differ")));
                }
                let s = adapter.config.scaling() * scale;
                for row in a.data.chunks_exact(n) {
                    // y = (Σ G)⁻¹ · G_k · aᵀ (G_k symmetric), times s.
                    let mut y: Vec<f64> = g
                        .chunks_exact(n)
                        .map(|gr| {
                            gr.iter()
                                .zip(row)
                                .map(|(x, &a)| x * f64::from(a))
                                .sum::<f64>()
                        })
                        .collect();
                    cholesky_solve(chol, n, &mut y);
                    a_out.push(y.into_iter().map(|v| (v * s) as f32).collect::<Vec<f32>>());
                }
                b_cols.push(b);
            }
            let mut b = vec![0f32; out * rank];
            for (k, bk) in b_cols.iter().enumerate() {
                for row in 0..out {
                    for c in 0..r {
                        b[row * rank + k * r + c] = bk.data[row * r + c];
                    }
                }
            }
            tensors.insert(
                a_name,
                LoraTensor {
                    shape: vec![rank, n],
                    data: a_out.concat(),
                },
            );
            tensors.insert(
                b_name,
                LoraTensor {
                    shape: vec![out, rank],
                    data: b,
                },
            );
        }
    }
    if tensors.len() != reference.tensors.len() {
        return Err(bad(format!(
            "statistics for {layers} layers do not cover every module of the adapters"
        )));
    }
    let mut config = reference.config.unit_scaled(rank);
    config.extra.insert(
        "hivemind_merge".into(),
        serde_json::json!({ "rule": "regmean", "alpha": alpha, "scale": scale, "rank": rank }),
    );
    LoraAdapter::new(config, tensors)
}

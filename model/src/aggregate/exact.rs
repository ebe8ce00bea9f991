//! Rules that merge the users' updates `ΔW_k = s·B_k·A_k` themselves, not their factors: the
//! exact weighted mean ([`ExactMean`]), its robust counterpart the geometric median
//! ([`GeoMedian`]), and two spectrum-aware merges from the model-merging literature
//! ([`IsoMerge`], Iso-C style; [`TsvMerge`], TSV-Merge style).
//!
//! None forms a dense `out × in` matrix. A sum of low-rank updates is `B·A` with the factors
//! stacked (`B = [c_1·B_1 | … | c_K·B_K]`, `A = [A_1; …; A_K]`, rank at most `K·r`); its SVD
//! comes from the factors: `B = Q_b·R_b`, `Aᵀ = Q_a·R_a`, SVD of the small core
//! `R_b·R_aᵀ = U·Σ·Vᵀ`, so `B·A = (Q_b·U)·Σ·(Q_a·V)ᵀ`. The result is stored as a LoRA adapter
//! with `B' = Q_b·U·√Σ`, `A' = √Σ·(Q_a·V)ᵀ` and scaling 1 (`lora_alpha = r`), its rank the
//! rule's rank (capped), the same for every module (zero-padded where a module has fewer
//! directions). The config's `extra.hivemind_merge` records the rule, the rank and the
//! fraction of the update's energy (squared singular values) the cap kept.
//!
//! Every step runs in `f64` in a fixed order ([`super::linalg`]), inputs in ascending hash
//! order, so the bytes are the same on every machine.

use std::collections::BTreeMap;

use super::linalg::{qr, svd, Mat};
use super::{
    canonical_inputs, finite, lower_median, tensor, AggregationRule, Bounds, FedAvg,
    WeightedAdapter,
};
use crate::adapter::{AdapterError, LoraAdapter, LoraTensor};

const A_SUFFIX: &str = ".lora_A.weight";
const B_SUFFIX: &str = ".lora_B.weight";

/// The exact sample-weighted mean of the users' updates, `Σ p_k·s·B_k·A_k` with
/// `p_k = w_k / Σ w` (weights as [`FedAvg`] caps them), truncated to `rank_cap`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExactMean {
    /// Most samples one input is credited with.
    pub max_samples_per_input: u64,
    /// Rank of the result (the mean's rank is at most the inputs' summed rank).
    pub rank_cap: usize,
    /// How far one input can move the result.
    pub bounds: Bounds,
}

impl ExactMean {
    /// The rule's identifier.
    pub const ID: &'static str = "exact-mean-v3";
}

/// Iso-C style: the sample-weighted sum of the updates (scaled so equal weights give the plain
/// sum), its singular values all replaced by their mean times `scale`: every direction any user
/// moved the model in keeps the same strength, so a few large updates do not drown the others.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IsoMerge {
    /// Most samples one input is credited with.
    pub max_samples_per_input: u64,
    /// Rank of the result.
    pub rank_cap: usize,
    /// How far one input can move the result.
    pub bounds: Bounds,
    /// Multiplies the flattened spectrum.
    pub scale: f64,
}

impl IsoMerge {
    /// The rule's identifier.
    pub const ID: &'static str = "iso-v3";
}

/// TSV-Merge style: each user's update by its own SVD, its singular directions decorrelated
/// across users (the stacked left and right singular vectors replaced by the nearest
/// orthonormal ones, `P·Qᵀ` of their SVD), then summed with the users' singular values times
/// `scale`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TsvMerge {
    /// Most samples one input is credited with.
    pub max_samples_per_input: u64,
    /// Rank of the result.
    pub rank_cap: usize,
    /// How far one input can move the result.
    pub bounds: Bounds,
    /// Multiplies the merged update.
    pub scale: f64,
}

impl TsvMerge {
    /// The rule's identifier.
    pub const ID: &'static str = "tsv-v3";
}

/// The geometric median of the users' updates, module by module: the `ΔW` that minimises
/// `Σ p_k·‖ΔW − ΔW_k‖_F` (RFA: Pillutla, Kakade and Harchaoui, "Robust Aggregation for
/// Federated Learning", 2022), by Weiszfeld's iteration on the inputs' Gram matrix (inner
/// products from the factors, never a dense matrix), so the result is a weighted mean
/// `Σ β_k·ΔW_k` of the inputs with weights that fall with an input's distance from the rest.
///
/// Where [`Bounds`] limit how far one input can move a round, this also limits where: while
/// the inputs of less than half the weight are malicious, the median stays within a bounded
/// distance of the honest inputs' whatever the others send, and inputs that agree outweigh
/// one that points elsewhere. With no attacker it is close to the mean (equal to it for two
/// inputs of equal weight, or inputs symmetric about it), so it learns like [`ExactMean`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GeoMedian {
    /// Most samples one input is credited with.
    pub max_samples_per_input: u64,
    /// Rank of the result.
    pub rank_cap: usize,
    /// How far one input can move the result (applied before the median).
    pub bounds: Bounds,
}

impl GeoMedian {
    /// The rule's identifier.
    pub const ID: &'static str = "geomedian-v1";
    /// Weiszfeld steps at most (it stops earlier once the median moves less than the smoothing
    /// scale).
    const MAX_STEPS: usize = 200;
    /// Distances below this fraction of the median input's norm count as that much (RFA's
    /// smoothing: the iteration never divides by zero when the median reaches an input).
    const SMOOTHING: f64 = 1e-6;
}

/// What a merge kept, as recorded in the result's config (`extra.hivemind_merge`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MergeReport {
    /// Rank of the result.
    pub rank: usize,
    /// Squared singular values kept over all of them, summed over every module (1 when the
    /// cap cut nothing).
    pub kept_energy: f64,
    /// (module, input) pairs left out for lying too far from the other inputs
    /// ([`Bounds::distance_over_median`]).
    #[serde(default)]
    pub left_out: usize,
    /// The merged update's squared singular values before the cap, summed over every module
    /// (what `kept_energy` is a fraction of).
    #[serde(default)]
    pub energy: f64,
    /// The part of `energy` the cap kept.
    #[serde(default)]
    pub energy_kept: f64,
}

/// One module of one input: `B` (`out × r`, already times the input's coefficient) and `A`
/// (`r × in`).
struct Factors {
    b: Mat,
    a: Mat,
}

impl Factors {
    /// The Frobenius inner product `⟨B·A, B'·A'⟩ = Σ_ij (BᵀB')_ij·(A·A'ᵀ)_ij` from the
    /// factors, never forming `B·A`.
    fn inner(&self, other: &Factors) -> f64 {
        let gb = self.b.transpose().matmul(&other.b);
        let ga = self.a.matmul(&other.a.transpose());
        gb.data.iter().zip(&ga.data).map(|(x, y)| x * y).sum()
    }
}

/// The Gram matrix `⟨ΔW_i, ΔW_j⟩` of the updates in `factors` (only its diagonal, the squared
/// norms, unless `full`).
fn gram(factors: &[Factors], full: bool) -> Mat {
    let k = factors.len();
    let mut g = Mat::zeros(k, k);
    for i in 0..k {
        for j in i..k {
            if i == j || full {
                let v = factors[i].inner(&factors[j]);
                g.set(i, j, v);
                g.set(j, i, v);
            }
        }
    }
    g
}

/// Which inputs are typical: an input's typical distance is its median distance to the other
/// inputs (`raw`: the updates' Gram matrix before `clips`), and inputs whose typical distance
/// is more than `multiple` times the median input's are not. While fewer than half the inputs
/// collude, an input's median distance to the others is a distance to an honest input, so a
/// group sending one update (distance 0 to each other) gains nothing by it, and honest inputs
/// with nothing in common, all about as far from each other, are all typical. The spread is
/// never taken below 1e-3 of the median norm (most inputs may coincide), and `multiple` never
/// below 1 (the median input is always kept).
fn typical(raw: &Mat, clips: &[f64], multiple: f64) -> Vec<bool> {
    let k = clips.len();
    let at = |i: usize, j: usize| raw.at(i, j) * clips[i] * clips[j];
    let scores: Vec<f64> = (0..k)
        .map(|i| {
            let others: Vec<f64> = (0..k)
                .filter(|&j| j != i)
                .map(|j| (at(i, i) + at(j, j) - 2.0 * at(i, j)).max(0.0).sqrt())
                .collect();
            lower_median(&others)
        })
        .collect();
    let norms: Vec<f64> = (0..k).map(|i| at(i, i).max(0.0).sqrt()).collect();
    // Where most inputs nearly coincide, the spread is measured from a floor, not from zero.
    let spread = lower_median(&scores).max(lower_median(&norms) * 1e-3);
    let limit = spread * multiple.max(1.0);
    scores.iter().map(|&x| x <= limit).collect()
}

/// The distance of each point from `z = Σ β_k·x_k`, points known by their Gram matrix `g`:
/// `‖z − x_i‖² = βᵀgβ − 2(gβ)_i + g_ii`.
fn distances(g: &Mat, beta: &[f64]) -> Vec<f64> {
    let k = beta.len();
    let gb: Vec<f64> = (0..k)
        .map(|i| (0..k).map(|j| g.at(i, j) * beta[j]).sum())
        .collect();
    let q: f64 = beta.iter().zip(&gb).map(|(b, x)| b * x).sum();
    (0..k)
        .map(|i| (q - 2.0 * gb[i] + g.at(i, i)).max(0.0).sqrt())
        .collect()
}

/// The weights `β` (summing to 1) of the `alpha`-weighted geometric median `Σ β_k·x_k` of
/// points known by their Gram matrix `g` (`g_ij = ⟨x_i, x_j⟩`): Weiszfeld's iteration
/// `β_k ∝ alpha_k / max(‖z − x_k‖, ν)` from the weighted mean, with `‖z − x_k‖² = βᵀgβ −
/// 2(gβ)_k + g_kk`. A fixed sequence of operations, so every node gets the same bits.
fn weiszfeld(g: &Mat, alpha: &[f64]) -> Vec<f64> {
    let k = alpha.len();
    let total: f64 = alpha.iter().sum();
    if k == 0 || total <= 0.0 || total.is_nan() {
        return vec![1.0 / k.max(1) as f64; k];
    }
    let mut beta: Vec<f64> = alpha.iter().map(|a| a / total).collect();
    // The smoothing scale: the median input's norm (the largest's would let one huge input
    // blur every distance into the mean), or the largest where most inputs are zero.
    let norms: Vec<f64> = (0..k).map(|i| g.at(i, i).max(0.0).sqrt()).collect();
    let scale = match lower_median(&norms) {
        m if m > 0.0 => m,
        _ => norms.iter().copied().fold(0.0, f64::max),
    };
    if scale == 0.0 || !scale.is_finite() {
        return beta;
    }
    let nu = scale * GeoMedian::SMOOTHING;
    for _ in 0..GeoMedian::MAX_STEPS {
        let mut next: Vec<f64> = distances(g, &beta)
            .iter()
            .zip(alpha)
            .map(|(d, a)| a / d.max(nu))
            .collect();
        let sum: f64 = next.iter().sum();
        next.iter_mut().for_each(|x| *x /= sum);
        // How far the median moved, `‖Σ δ_k·x_k‖` with `δ = next − β`: done once it is below
        // the smoothing scale (a test on the weights alone would stop with an outlier's tiny
        // weight still times its huge norm).
        let delta: Vec<f64> = next.iter().zip(&beta).map(|(x, y)| x - y).collect();
        let moved: f64 = (0..k)
            .map(|i| delta[i] * (0..k).map(|j| g.at(i, j) * delta[j]).sum::<f64>())
            .sum();
        beta = next;
        if moved.max(0.0).sqrt() <= nu {
            break;
        }
    }
    beta
}

/// A merged module as its SVD: `U` (`out × k`), `σ`, `V` (`in × k`).
struct Spectral {
    u: Mat,
    s: Vec<f64>,
    v: Mat,
}

fn to_mat(t: &LoraTensor, coef: f64) -> Mat {
    Mat {
        rows: t.shape[0],
        cols: t.shape[1],
        data: t.data.iter().map(|&x| f64::from(x) * coef).collect(),
    }
}

/// The SVD of `B·A` from the factors.
fn lowrank_svd(b: &Mat, a: &Mat) -> Spectral {
    let (qb, rb) = qr(b);
    let (qa, ra) = qr(&a.transpose());
    let (u, s, v) = svd(&rb.matmul(&ra.transpose()));
    Spectral {
        u: qb.matmul(&u),
        s,
        v: qa.matmul(&v),
    }
}

/// `[x_1 | … | x_K]` (columns side by side).
fn hstack(parts: &[Mat]) -> Mat {
    let rows = parts.first().map_or(0, |p| p.rows);
    let cols = parts.iter().map(|p| p.cols).sum();
    let mut out = Mat::zeros(rows, cols);
    let mut at = 0;
    for p in parts {
        for r in 0..rows {
            for c in 0..p.cols {
                out.set(r, at + c, p.at(r, c));
            }
        }
        at += p.cols;
    }
    out
}

/// The stacked sum `Σ B_k·A_k` of `factors`, by its SVD.
fn sum_svd(factors: &[Factors]) -> Spectral {
    let b = hstack(&factors.iter().map(|f| f.b.clone()).collect::<Vec<_>>());
    let at = hstack(&factors.iter().map(|f| f.a.transpose()).collect::<Vec<_>>());
    lowrank_svd(&b, &at.transpose())
}

/// The nearest matrix with orthonormal columns to `m` (`P·Qᵀ` of `m = P·S·Qᵀ`).
fn orthonormalize(m: &Mat) -> Mat {
    let (p, _, q) = svd(m);
    p.matmul(&q.transpose())
}

/// How the merge rules' common frame weighs inputs.
#[derive(Clone, Copy)]
enum Weighing {
    /// Each input's factors are scaled by its share of `f(K)` (1 for a mean, `K` for a sum).
    Scaled(fn(usize) -> f64),
    /// The factors stay the updates themselves; `merge` gets the shares and their Gram matrix.
    Passed,
}

/// The merge rules' common frame: canonical inputs, each input's share of the weight, every
/// module's factors (bounded, weighed as `weighing` says) merged by `merge` into an SVD,
/// written back as a rank-`cap` adapter. `merge` gets the kept inputs' factors, their shares
/// and, with [`Weighing::Passed`], the Gram matrix of their (bounded) updates (empty
/// otherwise).
fn merge_adapters(
    inputs: &[WeightedAdapter],
    rule: &'static str,
    max_samples_per_input: u64,
    rank_cap: usize,
    bounds: Bounds,
    weighing: Weighing,
    merge: impl Fn(&[Factors], &[f64], &Mat) -> Spectral,
) -> Result<LoraAdapter, AdapterError> {
    let ordered = canonical_inputs(inputs)?;
    let reference = ordered[0];
    let fed = FedAvg::new(max_samples_per_input);
    let claimed: Vec<f64> = ordered
        .iter()
        .map(|i| fed.weight(i.samples) as f64)
        .collect();
    let weights = Bounds::cut(&claimed, bounds.weight_over_median);
    let total: f64 = weights.iter().sum();
    let scaling = reference.adapter.config.scaling();
    let shares: Vec<f64> = weights.iter().map(|w| w / total).collect();
    // Coefficient of input k: its share of `f(K)` (1 for a mean, K for a sum) times the LoRA
    // scaling; or the scaling alone.
    let coefs: Vec<f64> = match weighing {
        Weighing::Scaled(f) => {
            let share = f(ordered.len());
            weights
                .iter()
                .map(|w| w / total * share * scaling)
                .collect()
        }
        Weighing::Passed => vec![scaling; ordered.len()],
    };
    let rank = rank_cap
        .min(ordered.len().saturating_mul(reference.adapter.config.r))
        .max(1);
    let (mut kept, mut all) = (0.0f64, 0.0f64);
    let mut left_out = 0usize;
    let mut tensors = BTreeMap::new();
    for name in reference.adapter.tensors.keys() {
        let Some(path) = name.strip_suffix(A_SUFFIX) else {
            continue;
        };
        let b_name = format!("{path}{B_SUFFIX}");
        let mut factors = Vec::with_capacity(ordered.len());
        for input in &ordered {
            factors.push(Factors {
                a: to_mat(tensor(reference, input, name)?, 1.0),
                b: to_mat(tensor(reference, input, &b_name)?, 1.0),
            });
        }
        // Each update's norm, cut to the bound.
        let k = factors.len();
        let trimming = bounds.distance_over_median.is_finite() && k >= Bounds::MIN_TO_COMPARE;
        let passed = matches!(weighing, Weighing::Passed);
        let raw = gram(&factors, trimming || passed);
        let norms: Vec<f64> = (0..k).map(|i| raw.at(i, i).max(0.0).sqrt()).collect();
        let bounded = Bounds::cut(&norms, bounds.norm_over_median);
        let clips: Vec<f64> = norms
            .iter()
            .zip(&bounded)
            .map(|(&n, &m)| if n > m { m / n } else { 1.0 })
            .collect();
        // Inputs far from the others are left out of this module.
        let keep = if trimming {
            typical(&raw, &clips, bounds.distance_over_median)
        } else {
            vec![true; k]
        };
        let dropped = keep.iter().filter(|&&x| !x).count();
        left_out += dropped;
        // The kept inputs' coefficients, as if the others had not come.
        let renorm = match weighing {
            Weighing::Scaled(f) if dropped > 0 => {
                let kept_share: f64 = (0..k).filter(|&i| keep[i]).map(|i| shares[i]).sum();
                Some(f(k - dropped) / f(k) / kept_share)
            }
            _ => None,
        };
        let mut kept_factors = Vec::with_capacity(k - dropped);
        let mut kept_shares = Vec::with_capacity(k - dropped);
        for (i, mut f) in factors.into_iter().enumerate() {
            if !keep[i] {
                continue;
            }
            let (c, clip) = (coefs[i], clips[i]);
            f.b.data.iter_mut().for_each(|x| *x *= c * clip);
            if let Some(r) = renorm {
                f.b.data.iter_mut().for_each(|x| *x *= r);
            }
            kept_factors.push(f);
            kept_shares.push(shares[i]);
        }
        // The kept updates' Gram matrix, from the one above: updates `coef·clip·B·A`.
        let kept_gram = if passed {
            let kept: Vec<usize> = (0..k).filter(|&i| keep[i]).collect();
            let scale = |i: usize| coefs[i] * clips[i];
            let mut g = Mat::zeros(kept.len(), kept.len());
            for (a, &i) in kept.iter().enumerate() {
                for (b, &j) in kept.iter().enumerate() {
                    g.set(a, b, raw.at(i, j) * scale(i) * scale(j));
                }
            }
            g
        } else {
            Mat::zeros(0, 0)
        };
        let m = merge(&kept_factors, &kept_shares, &kept_gram);
        all += m.s.iter().map(|x| x * x).sum::<f64>();
        kept += m.s.iter().take(rank).map(|x| x * x).sum::<f64>();
        let (out, inp) = (m.u.rows, m.v.rows);
        let mut b = vec![0f32; out * rank];
        let mut a = vec![0f32; rank * inp];
        for (k, &sigma) in m.s.iter().take(rank).enumerate() {
            let root = sigma.max(0.0).sqrt();
            for r in 0..out {
                b[r * rank + k] = (m.u.at(r, k) * root) as f32;
            }
            for c in 0..inp {
                a[k * inp + c] = (root * m.v.at(c, k)) as f32;
            }
        }
        finite(name, &a)?;
        finite(&b_name, &b)?;
        tensors.insert(
            name.clone(),
            LoraTensor {
                shape: vec![rank, inp],
                data: a,
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
    let mut config = reference.adapter.config.unit_scaled(rank);
    let report = MergeReport {
        rank,
        kept_energy: if all > 0.0 { kept / all } else { 1.0 },
        left_out,
        energy: all,
        energy_kept: kept,
    };
    config.extra.insert(
        "hivemind_merge".into(),
        serde_json::json!({
            "rule": rule,
            "rank": report.rank,
            "kept_energy": report.kept_energy,
            "left_out": report.left_out,
            "energy": report.energy,
            "energy_kept": report.energy_kept,
        }),
    );
    LoraAdapter::new(config, tensors)
}

impl AggregationRule for ExactMean {
    fn id(&self) -> &'static str {
        Self::ID
    }

    fn aggregate(&self, inputs: &[WeightedAdapter]) -> Result<LoraAdapter, AdapterError> {
        merge_adapters(
            inputs,
            Self::ID,
            self.max_samples_per_input,
            self.rank_cap,
            self.bounds,
            Weighing::Scaled(|_| 1.0),
            |factors, _, _| sum_svd(factors),
        )
    }
}

impl AggregationRule for GeoMedian {
    fn id(&self) -> &'static str {
        Self::ID
    }

    fn aggregate(&self, inputs: &[WeightedAdapter]) -> Result<LoraAdapter, AdapterError> {
        merge_adapters(
            inputs,
            Self::ID,
            self.max_samples_per_input,
            self.rank_cap,
            self.bounds,
            Weighing::Passed,
            |factors, shares, gram| {
                let beta = weiszfeld(gram, shares);
                let weighed: Vec<Factors> = factors
                    .iter()
                    .zip(&beta)
                    .map(|(f, &w)| Factors {
                        a: f.a.clone(),
                        b: Mat {
                            rows: f.b.rows,
                            cols: f.b.cols,
                            data: f.b.data.iter().map(|x| x * w).collect(),
                        },
                    })
                    .collect();
                sum_svd(&weighed)
            },
        )
    }
}

impl AggregationRule for IsoMerge {
    fn id(&self) -> &'static str {
        Self::ID
    }

    fn aggregate(&self, inputs: &[WeightedAdapter]) -> Result<LoraAdapter, AdapterError> {
        let scale = self.scale;
        merge_adapters(
            inputs,
            Self::ID,
            self.max_samples_per_input,
            self.rank_cap,
            self.bounds,
            Weighing::Scaled(|k| k as f64),
            |factors, _, _| {
                let mut m = sum_svd(factors);
                // Only directions the update has: zero singular values stay zero.
                let top = m.s.first().copied().unwrap_or(0.0);
                let live: Vec<f64> = m.s.iter().copied().filter(|&x| x > top * 1e-9).collect();
                let mean = live.iter().sum::<f64>() / live.len().max(1) as f64;
                for x in &mut m.s {
                    if *x > top * 1e-9 {
                        *x = scale * mean;
                    }
                }
                m
            },
        )
    }
}

impl AggregationRule for TsvMerge {
    fn id(&self) -> &'static str {
        Self::ID
    }

    fn aggregate(&self, inputs: &[WeightedAdapter]) -> Result<LoraAdapter, AdapterError> {
        let scale = self.scale;
        merge_adapters(
            inputs,
            Self::ID,
            self.max_samples_per_input,
            self.rank_cap,
            self.bounds,
            Weighing::Scaled(|k| k as f64),
            |factors, _, _| {
                let parts: Vec<Spectral> =
                    factors.iter().map(|f| lowrank_svd(&f.b, &f.a)).collect();
                let u = orthonormalize(&hstack(
                    &parts.iter().map(|p| p.u.clone()).collect::<Vec<_>>(),
                ));
                let v = orthonormalize(&hstack(
                    &parts.iter().map(|p| p.v.clone()).collect::<Vec<_>>(),
                ));
                let s: Vec<f64> = parts
                    .iter()
                    .flat_map(|p| p.s.iter().map(|x| x * scale))
                    .collect();
                // Largest first, so a rank cap keeps the strongest directions.
                let mut order: Vec<usize> = (0..s.len()).collect();
                order.sort_by(|&x, &y| s[y].total_cmp(&s[x]).then(x.cmp(&y)));
                Spectral {
                    u: pick_columns(&u, &order),
                    s: order.iter().map(|&i| s[i]).collect(),
                    v: pick_columns(&v, &order),
                }
            },
        )
    }
}

fn pick_columns(m: &Mat, order: &[usize]) -> Mat {
    let mut out = Mat::zeros(m.rows, order.len());
    for r in 0..m.rows {
        for (k, &c) in order.iter().enumerate() {
            out.set(r, k, m.at(r, c));
        }
    }
    out
}

/// The exact sum of `adapters` (e.g. the round adapter and a user's personal one, to apply
/// both at once): their factors side by side, each `B` times its adapter's scaling, so the
/// result (rank the sum of theirs, scaling 1) applies `Σ s_i·B_i·A_i`. A module some adapters
/// do not adapt gets zero factors from them; a module adapted with different shapes is an
/// error.
pub fn stack(adapters: &[&LoraAdapter]) -> Result<LoraAdapter, AdapterError> {
    let Some(first) = adapters.first() else {
        return Err(AdapterError::NoInputs);
    };
    let rank: usize = adapters.iter().map(|a| a.config.r).sum();
    // Every module any adapter adapts, with its (out, in).
    let mut modules: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for ad in adapters {
        for (name, a) in &ad.tensors {
            let Some(path) = name.strip_suffix(A_SUFFIX) else {
                continue;
            };
            let b = ad
                .tensors
                .get(&format!("{path}{B_SUFFIX}"))
                .ok_or_else(|| AdapterError::Stack {
                    reason: format!("{path} has lora_A but no lora_B"),
                })?;
            let dims = (b.shape[0], a.shape[1]);
            if *modules.entry(path).or_insert(dims) != dims {
                return Err(AdapterError::Stack {
                    reason: format!("{path} has different shapes in different adapters"),
                });
            }
        }
    }
    let mut tensors = BTreeMap::new();
    for (path, (out, inp)) in modules {
        let (a_name, b_name) = (format!("{path}{A_SUFFIX}"), format!("{path}{B_SUFFIX}"));
        let mut a = vec![0f32; rank * inp];
        let mut b = vec![0f32; out * rank];
        let mut at = 0;
        for ad in adapters {
            let r = ad.config.r;
            if let (Some(ta), Some(tb)) = (ad.tensors.get(&a_name), ad.tensors.get(&b_name)) {
                a[at * inp..(at + r) * inp].copy_from_slice(&ta.data);
                let s = ad.config.scaling() as f32;
                for row in 0..out {
                    for k in 0..r {
                        b[row * rank + at + k] = tb.data[row * r + k] * s;
                    }
                }
            }
            at += r;
        }
        finite(&b_name, &b)?;
        tensors.insert(
            a_name,
            LoraTensor {
                shape: vec![rank, inp],
                data: a,
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
    let mut config = first.config.unit_scaled(rank);
    let names: std::collections::BTreeSet<String> = tensors
        .keys()
        .filter_map(|n| n.strip_suffix(A_SUFFIX))
        .filter_map(|p| p.rsplit('.').next())
        .map(str::to_string)
        .collect();
    config.target_modules = crate::adapter::TargetModules::from_names(names);
    config.extra.remove("hivemind_merge");
    LoraAdapter::new(config, tensors)
}

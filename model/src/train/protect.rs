//! Input directions a training run may not use: the principal subspace of the activations general
//! text produces at each module's input. With `A` kept orthogonal to it (`A·P = 0`), the update
//! `s·B·A` leaves the module's output on those inputs as it was, so what the model does on
//! general text changes little while new facts are learned in the other directions (the
//! null-space constraint of AlphaEdit, Fang et al., ICLR 2025, applied to LoRA's `A`).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{Gram, InputGrams};
use crate::aggregate::linalg::{cholesky, forward_solve, qr, Mat};
use crate::decoder::dot;
use crate::error::Result;

/// An orthonormal basis of the protected directions of one module input.
#[derive(Debug, Clone, PartialEq)]
pub struct Basis {
    /// Length of each direction (the input's width).
    pub dim: usize,
    /// The directions, one row of `dim` values each.
    pub rows: Vec<f32>,
    /// The fraction of the Gram matrix's trace (the inputs' energy) the directions hold.
    pub energy: f64,
}

impl Basis {
    /// How many directions.
    pub fn len(&self) -> usize {
        self.rows.len() / self.dim.max(1)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Removes the protected directions from each row of `a` (`r × dim`): `a ← a − a·Qᵀ·Q`.
    pub fn project_out(&self, a: &mut [f32]) {
        let d = self.dim;
        if d == 0 || self.rows.is_empty() {
            return;
        }
        let mut coefs = Vec::with_capacity(self.len());
        for row in a.chunks_exact_mut(d) {
            coefs.clear();
            coefs.extend(self.rows.chunks_exact(d).map(|q| dot(q, row)));
            for (q, &c) in self.rows.chunks_exact(d).zip(&coefs) {
                for (y, &x) in row.iter_mut().zip(q) {
                    *y -= c * x;
                }
            }
        }
    }
}

/// For each layer, the protected basis of each [`super::ModuleInput`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProtectedInputs {
    /// `layers[l][ModuleInput::index()]`.
    pub layers: Vec<[Basis; 4]>,
}

impl ProtectedInputs {
    /// The smallest principal subspaces of `grams` holding `energy` of each input's energy, at
    /// most `max_dims` directions each.
    pub fn from_grams(grams: &InputGrams, energy: f64, max_dims: usize) -> Result<ProtectedInputs> {
        let layers = grams
            .layers
            .iter()
            .enumerate()
            .map(|(l, g)| {
                let basis = |i: usize| principal(&g[i], energy, max_dims, l as u64 * 4 + i as u64);
                Ok([basis(0)?, basis(1)?, basis(2)?, basis(3)?])
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ProtectedInputs { layers })
    }

    /// The basis of what `m` of layer `l` reads.
    pub fn of(&self, l: usize, m: crate::Module) -> Option<&Basis> {
        self.layers
            .get(l)
            .map(|b| &b[super::ModuleInput::of(m).index()])
    }

    /// Mean fraction of the energy the bases hold, and mean directions per basis.
    pub fn summary(&self) -> (f64, f64) {
        let all: Vec<&Basis> = self.layers.iter().flatten().collect();
        let n = all.len().max(1) as f64;
        (
            all.iter().map(|b| b.energy).sum::<f64>() / n,
            all.iter().map(|b| b.len() as f64).sum::<f64>() / n,
        )
    }
}

/// `Qᵀ·G` for the `k` columns of `Q` given as the rows of `qt` (`k × n`, row-major), as the
/// rows of the result (`(G·Q)ᵀ`, `G` symmetric), by candle's matmul in `f32`: the directions
/// are this node's own (nothing else depends on their bits), so speed wins over exactness.
fn gram_times(g: &candle_core::Tensor, qt: &[f64], k: usize, n: usize) -> Result<Vec<f64>> {
    let q: Vec<f32> = qt.iter().map(|&x| x as f32).collect();
    let q = candle_core::Tensor::from_vec(q, (k, n), &candle_core::Device::Cpu)?;
    let y = q.matmul(g)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(y.into_iter().map(f64::from).collect())
}

/// Orthonormalises the `k` rows of `q` (`k × n`, `k ≤ n`) in place: the `Q` of the thin QR of
/// `qᵀ`.
fn orthonormalize(q: &mut [f64], n: usize, k: usize) {
    let rows = Mat {
        rows: k,
        cols: n,
        data: q.to_vec(),
    };
    let (basis, _) = qr(&rows.transpose());
    q.copy_from_slice(&basis.transpose().data);
}

/// Approximately the top eigenvectors of `g` holding `energy` of its trace, at most `max_dims`
/// of them: a few steps of orthogonal iteration (whose rows tend to the eigenvectors in
/// descending order of eigenvalue), then the rows with the most energy `qᵀ·G·q` until they hold
/// `energy`. Without a Rayleigh-Ritz rotation the rows are not exactly eigenvectors, so a few
/// more directions than the fewest possible may be taken for the same energy.
fn principal(g: &Gram, energy: f64, max_dims: usize, seed: u64) -> Result<Basis> {
    let n = g.dim;
    let k = max_dims.min(n);
    let trace: f64 = (0..n).map(|i| f64::from(g.data[i * n + i])).sum();
    let empty = Basis {
        dim: n,
        rows: Vec::new(),
        energy: 0.0,
    };
    if !trace.is_finite() || g.data.iter().any(|x| !x.is_finite()) {
        return Err(crate::ModelError::Training {
            reason: "the inputs' statistics are not finite".into(),
        });
    }
    if k == 0 || trace <= 0.0 || energy <= 0.0 {
        return Ok(empty);
    }
    let gt = candle_core::Tensor::from_slice(&g.data, (n, n), &candle_core::Device::Cpu)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut q: Vec<f64> = (0..n * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
    orthonormalize(&mut q, n, k);
    for _ in 0..ITERATIONS {
        q = gram_times(&gt, &q, k, n)?;
        // Twice, as CholeskyQR2 does; Gram-Schmidt where the rows are (nearly) dependent.
        if !(cholesky_qr(&mut q, n, k)? && cholesky_qr(&mut q, n, k)?) {
            orthonormalize(&mut q, n, k);
        }
    }
    // Each direction's share of the energy, `qᵀ·G·q`, largest first.
    let gq = gram_times(&gt, &q, k, n)?;
    let lambda: Vec<f64> = (0..k)
        .map(|c| {
            q[c * n..(c + 1) * n]
                .iter()
                .zip(&gq[c * n..(c + 1) * n])
                .map(|(x, y)| x * y)
                .sum()
        })
        .collect();
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|&x, &y| lambda[y].total_cmp(&lambda[x]).then(x.cmp(&y)));
    let mut rows = Vec::new();
    let mut held = 0.0;
    for &c in &order {
        if held >= energy * trace || lambda[c] <= 0.0 {
            break;
        }
        held += lambda[c];
        rows.extend(q[c * n..(c + 1) * n].iter().map(|&x| x as f32));
    }
    Ok(Basis {
        dim: n,
        rows,
        energy: (held / trace).min(1.0),
    })
}

/// Orthonormalises the `k` rows of `q` (`k × n`) by CholeskyQR: with `Q·Qᵀ = L·Lᵀ`, the rows of
/// `L⁻¹·Q` are orthonormal (two matmuls and a `k × k` factorisation, where Gram-Schmidt costs
/// `k²·n` plain operations). Returns false, leaving `q` as it was, when `Q·Qᵀ` is not safely
/// positive definite (its rows then scaled to unit length).
fn cholesky_qr(q: &mut Vec<f64>, n: usize, k: usize) -> Result<bool> {
    let dev = candle_core::Device::Cpu;
    // Rows scaled to unit length first (the row space is the same): after a product with `G`
    // their lengths span its eigenvalues' range, which would hide how independent they are.
    for row in q.chunks_exact_mut(n) {
        let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt();
        if !(norm > 0.0 && norm.is_finite()) {
            return Ok(false);
        }
        row.iter_mut().for_each(|x| *x /= norm);
    }
    let qt = candle_core::Tensor::from_vec(
        q.iter().map(|&x| x as f32).collect::<Vec<f32>>(),
        (k, n),
        &dev,
    )?;
    let s: Vec<f64> = qt
        .matmul(&qt.t()?)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f64::from)
        .collect();
    let max_diag = (0..k).map(|i| s[i * k + i]).fold(0.0f64, f64::max);
    // Refuse pivots that f32 rounding could have made.
    let Some(l) = cholesky(&s, k, 1e-5 * max_diag) else {
        return Ok(false);
    };
    // L⁻¹, a column of the identity at a time.
    let mut inv = vec![0.0f64; k * k];
    let mut col = vec![0.0f64; k];
    for c in 0..k {
        col.fill(0.0);
        col[c] = 1.0;
        forward_solve(&l, k, &mut col);
        for (i, &v) in col.iter().enumerate() {
            inv[i * k + c] = v;
        }
    }
    let inv = candle_core::Tensor::from_vec(
        inv.into_iter().map(|x| x as f32).collect::<Vec<f32>>(),
        (k, k),
        &dev,
    )?;
    *q = inv
        .matmul(&qt)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f64::from)
        .collect();
    Ok(true)
}

/// Orthogonal iteration steps.
const ITERATIONS: usize = 3;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_basis_spans_the_inputs_and_project_out_removes_them() {
        // Inputs in a 3-dimensional subspace of R^8, plus a little noise in the rest.
        let n = 8;
        let mut rng = StdRng::seed_from_u64(3);
        let dirs: Vec<Vec<f64>> = (0..3)
            .map(|_| (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect())
            .collect();
        let mut g = Gram {
            dim: n,
            data: vec![0.0f32; n * n],
        };
        for _ in 0..200 {
            let c: Vec<f64> = (0..3).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let x: Vec<f64> = (0..n)
                .map(|i| {
                    (0..3).map(|d| c[d] * dirs[d][i]).sum::<f64>() + 1e-3 * rng.gen_range(-1.0..1.0)
                })
                .collect();
            for i in 0..n {
                for j in 0..n {
                    g.data[i * n + j] += (x[i] * x[j]) as f32;
                }
            }
        }
        let b = principal(&g, 0.999, 6, 1).expect("a basis");
        assert_eq!(b.len(), 3, "three directions hold the energy");
        assert!(b.energy > 0.999);
        // A row inside the span is removed.
        let mut a: Vec<f32> = dirs[0].iter().map(|&x| x as f32).collect();
        b.project_out(&mut a);
        assert!(a.iter().all(|x| x.abs() < 1e-3), "{a:?}");
    }
}

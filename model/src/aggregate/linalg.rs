//! The small dense linear algebra the exact and spectral merges need, in `f64`: a thin
//! Householder QR and a one-sided Jacobi SVD.
//!
//! Written here rather than taken from a library because every node must get the same bits:
//! each result comes from one fixed sequence of IEEE-754 operations (plain loops, no threads,
//! no runtime-dispatched SIMD or fused multiply-add kernels such as BLAS-backed or
//! `matrixmultiply`-backed libraries pick per CPU), so the round adapter is byte-identical on
//! every machine. The matrices are small (a side of at most the users' summed rank).

/// A dense row-major matrix.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Mat {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) data: Vec<f64>,
}

impl Mat {
    pub(crate) fn zeros(rows: usize, cols: usize) -> Mat {
        Mat {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    pub(crate) fn identity(n: usize) -> Mat {
        let mut m = Mat::zeros(n, n);
        for i in 0..n {
            m.data[i * n + i] = 1.0;
        }
        m
    }

    pub(crate) fn at(&self, r: usize, c: usize) -> f64 {
        self.data[r * self.cols + c]
    }

    pub(crate) fn set(&mut self, r: usize, c: usize, v: f64) {
        self.data[r * self.cols + c] = v;
    }

    pub(crate) fn transpose(&self) -> Mat {
        let mut t = Mat::zeros(self.cols, self.rows);
        for r in 0..self.rows {
            for c in 0..self.cols {
                t.data[c * self.rows + r] = self.data[r * self.cols + c];
            }
        }
        t
    }

    /// `self · other`, each element summed in ascending index order.
    pub(crate) fn matmul(&self, other: &Mat) -> Mat {
        assert_eq!(self.cols, other.rows, "matmul shapes");
        let mut out = Mat::zeros(self.rows, other.cols);
        for i in 0..self.rows {
            for j in 0..other.cols {
                let mut acc = 0.0;
                for k in 0..self.cols {
                    acc += self.data[i * self.cols + k] * other.data[k * other.cols + j];
                }
                out.data[i * other.cols + j] = acc;
            }
        }
        out
    }
}

/// Thin QR of an `m × n` matrix: `Q` (`m × k`, orthonormal columns) and `R` (`k × n`, upper
/// triangular), `k = min(m, n)`, by Householder reflections.
pub(crate) fn qr(a: &Mat) -> (Mat, Mat) {
    let (m, n) = (a.rows, a.cols);
    let k = m.min(n);
    let mut r = a.clone();
    // Reflector j acts on rows j..m: H = I - 2 v vᵀ with |v| = 1 (v = 0: no reflection).
    let mut reflectors: Vec<Vec<f64>> = Vec::with_capacity(k);
    for j in 0..k {
        let mut v: Vec<f64> = (j..m).map(|i| r.at(i, j)).collect();
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm == 0.0 {
            reflectors.push(vec![0.0; m - j]);
            continue;
        }
        let alpha = if v[0] > 0.0 { -norm } else { norm };
        v[0] -= alpha;
        let vnorm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if vnorm == 0.0 {
            reflectors.push(vec![0.0; m - j]);
            continue;
        }
        for x in &mut v {
            *x /= vnorm;
        }
        for c in j..n {
            let dot: f64 = (j..m).map(|i| v[i - j] * r.at(i, c)).sum();
            for i in j..m {
                let x = r.at(i, c) - 2.0 * v[i - j] * dot;
                r.set(i, c, x);
            }
        }
        reflectors.push(v);
    }
    // Q = H_0 · … · H_{k-1} applied to the first k columns of the identity.
    let mut q = Mat::zeros(m, k);
    for i in 0..k {
        q.set(i, i, 1.0);
    }
    for j in (0..k).rev() {
        let v = &reflectors[j];
        for c in 0..k {
            let dot: f64 = (j..m).map(|i| v[i - j] * q.at(i, c)).sum();
            for i in j..m {
                let x = q.at(i, c) - 2.0 * v[i - j] * dot;
                q.set(i, c, x);
            }
        }
    }
    let mut rr = Mat::zeros(k, n);
    for i in 0..k {
        for c in i..n {
            rr.set(i, c, r.at(i, c));
        }
    }
    (q, rr)
}

/// Thin SVD `a = U · diag(s) · Vᵀ` of an `m × n` matrix, singular values in descending order
/// (ties keep column order), `U` `m × k`, `V` `n × k`, `k = min(m, n)`. One-sided Jacobi
/// rotations in a fixed cyclic order until a sweep changes nothing (at most 64 sweeps).
pub(crate) fn svd(a: &Mat) -> (Mat, Vec<f64>, Mat) {
    if a.rows < a.cols {
        let (u, s, v) = svd(&a.transpose());
        return (v, s, u);
    }
    let (m, n) = (a.rows, a.cols);
    let mut w = a.clone();
    let mut v = Mat::identity(n);
    for _sweep in 0..64 {
        let mut rotated = false;
        for p in 0..n {
            for q in p + 1..n {
                let (mut alpha, mut beta, mut gamma) = (0.0, 0.0, 0.0);
                for i in 0..m {
                    let (x, y) = (w.at(i, p), w.at(i, q));
                    alpha += x * x;
                    beta += y * y;
                    gamma += x * y;
                }
                if gamma == 0.0 || gamma.abs() <= 1e-15 * (alpha * beta).sqrt() {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                for i in 0..m {
                    let (x, y) = (w.at(i, p), w.at(i, q));
                    w.set(i, p, c * x - s * y);
                    w.set(i, q, s * x + c * y);
                }
                for i in 0..n {
                    let (x, y) = (v.at(i, p), v.at(i, q));
                    v.set(i, p, c * x - s * y);
                    v.set(i, q, s * x + c * y);
                }
            }
        }
        if !rotated {
            break;
        }
    }
    let norms: Vec<f64> = (0..n)
        .map(|c| (0..m).map(|i| w.at(i, c) * w.at(i, c)).sum::<f64>().sqrt())
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&x, &y| norms[y].total_cmp(&norms[x]).then(x.cmp(&y)));
    let mut u = Mat::zeros(m, n);
    let mut vs = Mat::zeros(n, n);
    let mut s = Vec::with_capacity(n);
    for (k, &c) in order.iter().enumerate() {
        let sigma = norms[c];
        s.push(sigma);
        for i in 0..m {
            u.set(i, k, if sigma > 0.0 { w.at(i, c) / sigma } else { 0.0 });
        }
        for i in 0..n {
            vs.set(i, k, v.at(i, c));
        }
    }
    (u, s, vs)
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn random(rows: usize, cols: usize, seed: u64) -> Mat {
        let mut rng = StdRng::seed_from_u64(seed);
        Mat {
            rows,
            cols,
            data: (0..rows * cols).map(|_| rng.gen_range(-1.0..1.0)).collect(),
        }
    }

    fn max_diff(a: &Mat, b: &Mat) -> f64 {
        a.data
            .iter()
            .zip(&b.data)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    impl Mat {
        /// Columns `from..from + n`.
        pub(crate) fn columns(&self, from: usize, n: usize) -> Mat {
            let mut out = Mat::zeros(self.rows, n);
            for r in 0..self.rows {
                for c in 0..n {
                    out.data[r * n + c] = self.at(r, from + c);
                }
            }
            out
        }
    }

    fn orthonormal_columns(q: &Mat) -> f64 {
        max_diff(&q.transpose().matmul(q), &Mat::identity(q.cols))
    }

    #[test]
    fn qr_reconstructs_with_orthonormal_q_and_triangular_r() {
        for (m, n) in [(9, 4), (4, 9), (6, 6), (1, 3)] {
            let a = random(m, n, (m * 10 + n) as u64);
            let (q, r) = qr(&a);
            assert!(max_diff(&q.matmul(&r), &a) < 1e-12, "{m}x{n}");
            assert!(orthonormal_columns(&q) < 1e-12, "{m}x{n}");
            for i in 0..r.rows {
                for c in 0..i.min(r.cols) {
                    assert_eq!(r.at(i, c), 0.0);
                }
            }
        }
    }

    #[test]
    fn svd_finds_the_singular_values_of_a_matrix_built_from_them() {
        // a = Q1 · diag(s) · Q2ᵀ with orthonormal Q1, Q2 from the QR of random matrices.
        let want = [5.0, 3.0, 2.0, 0.5, 1e-3];
        let (q1, _) = qr(&random(8, 5, 1));
        let (q2, _) = qr(&random(6, 5, 2));
        let mut d = Mat::zeros(5, 5);
        for (i, s) in want.iter().enumerate() {
            d.set(i, i, *s);
        }
        let a = q1.matmul(&d).matmul(&q2.transpose());
        for m in [a.clone(), a.transpose()] {
            let (u, s, v) = svd(&m);
            for (got, w) in s.iter().zip(want) {
                assert!((got - w).abs() < 1e-10, "{s:?}");
            }
            assert!(s[5..].iter().all(|x| x.abs() < 1e-10), "{s:?}");
            let mut ds = Mat::zeros(s.len(), s.len());
            for (i, x) in s.iter().enumerate() {
                ds.set(i, i, *x);
            }
            assert!(max_diff(&u.matmul(&ds).matmul(&v.transpose()), &m) < 1e-12);
            assert!(orthonormal_columns(&u.columns(0, 5)) < 1e-12);
            assert!(orthonormal_columns(&v.columns(0, 5)) < 1e-12);
        }
    }

    #[test]
    fn svd_is_bit_for_bit_reproducible() {
        let a = random(12, 7, 3);
        let (u1, s1, v1) = svd(&a);
        let (u2, s2, v2) = svd(&a.clone());
        assert_eq!((u1, s1, v1), (u2, s2, v2));
    }
}

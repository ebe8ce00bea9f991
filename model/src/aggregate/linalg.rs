//! The small dense linear algebra the exact and spectral merges need, in `f64`: a thin
//! Householder QR, a one-sided Jacobi SVD, and a Cholesky factorisation with its triangular
//! solves (RegMean's; the protected directions of training use them too).
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

    /// `self · other`, each element summed in ascending index order (from `0.0`, one product
    /// at a time, so the bits never depend on the machine).
    pub(crate) fn matmul(&self, other: &Mat) -> Mat {
        assert_eq!(self.cols, other.rows, "matmul shapes");
        // Row j of `other_t` is column j of `other`: both operands of each sum are contiguous.
        let other_t = other.transpose();
        let mut out = Mat::zeros(self.rows, other.cols);
        if self.cols == 0 {
            return out;
        }
        let n = self.cols;
        for (row, out_row) in self
            .data
            .chunks_exact(n)
            .zip(out.data.chunks_exact_mut(other.cols.max(1)))
        {
            // Four elements at a time: four independent sums the CPU overlaps, each still one
            // product at a time in ascending order.
            for (cols, o) in other_t.data.chunks(4 * n).zip(out_row.chunks_mut(4)) {
                if o.len() == 4 {
                    let (c0, rest) = cols.split_at(n);
                    let (c1, rest) = rest.split_at(n);
                    let (c2, c3) = rest.split_at(n);
                    let mut acc = [0.0; 4];
                    for (k, x) in row.iter().enumerate() {
                        acc[0] += x * c0[k];
                        acc[1] += x * c1[k];
                        acc[2] += x * c2[k];
                        acc[3] += x * c3[k];
                    }
                    o.copy_from_slice(&acc);
                } else {
                    for (col, o) in cols.chunks_exact(n).zip(o.iter_mut()) {
                        let mut acc = 0.0;
                        for (x, y) in row.iter().zip(col) {
                            acc += x * y;
                        }
                        *o = acc;
                    }
                }
            }
        }
        out
    }

    /// The columns, each contiguous.
    fn to_columns(&self) -> Vec<Vec<f64>> {
        (0..self.cols)
            .map(|c| {
                (0..self.rows)
                    .map(|r| self.data[r * self.cols + c])
                    .collect()
            })
            .collect()
    }

    /// The `rows × columns.len()` matrix whose columns are `columns`.
    fn from_columns(rows: usize, columns: &[Vec<f64>]) -> Mat {
        let mut m = Mat::zeros(rows, columns.len());
        for (c, col) in columns.iter().enumerate() {
            for (r, x) in col.iter().enumerate() {
                m.data[r * m.cols + c] = *x;
            }
        }
        m
    }
}

/// Columns `p < q` of `cols`, both mutable.
fn two_columns(cols: &mut [Vec<f64>], p: usize, q: usize) -> (&mut [f64], &mut [f64]) {
    let (left, right) = cols.split_at_mut(q);
    (&mut left[p], &mut right[0])
}

/// Applies the reflector `I - 2 v vᵀ` to `col`.
fn reflect(v: &[f64], col: &mut [f64]) {
    let dot: f64 = v.iter().zip(col.iter()).map(|(x, y)| x * y).sum();
    for (y, x) in col.iter_mut().zip(v) {
        *y -= 2.0 * x * dot;
    }
}

/// Applies the reflector `I - 2 v vᵀ` to the rows `from..from + v.len()` of every column of
/// `cols`, four columns at a time: their dot products with `v` are four independent sums the
/// CPU overlaps, each the same sequence of additions as [`reflect`]'s (from the empty sum's
/// zero, as `Iterator::sum` starts), so the bits are the same.
fn reflect_columns(v: &[f64], cols: &mut [Vec<f64>], from: usize) {
    let zero: f64 = std::iter::empty::<f64>().sum();
    let to = from + v.len();
    for group in cols.chunks_mut(4) {
        if let [a, b, c, d] = group {
            let (a, b, c, d) = (
                &mut a[from..to],
                &mut b[from..to],
                &mut c[from..to],
                &mut d[from..to],
            );
            let mut dot = [zero; 4];
            for (i, x) in v.iter().enumerate() {
                dot[0] += x * a[i];
                dot[1] += x * b[i];
                dot[2] += x * c[i];
                dot[3] += x * d[i];
            }
            for (i, x) in v.iter().enumerate() {
                a[i] -= 2.0 * x * dot[0];
                b[i] -= 2.0 * x * dot[1];
                c[i] -= 2.0 * x * dot[2];
                d[i] -= 2.0 * x * dot[3];
            }
        } else {
            for col in group {
                reflect(v, &mut col[from..to]);
            }
        }
    }
}

/// Thin QR of an `m × n` matrix: `Q` (`m × k`, orthonormal columns) and `R` (`k × n`, upper
/// triangular), `k = min(m, n)`, by Householder reflections. The work is done on contiguous
/// columns (the loops of the textbook algorithm in the same order, so the same bits, without
/// striding across rows).
pub(crate) fn qr(a: &Mat) -> (Mat, Mat) {
    let (m, n) = (a.rows, a.cols);
    let k = m.min(n);
    let mut r = a.to_columns();
    // Reflector j acts on rows j..m: H = I - 2 v vᵀ with |v| = 1 (v = 0: no reflection).
    let mut reflectors: Vec<Vec<f64>> = Vec::with_capacity(k);
    for j in 0..k {
        let mut v: Vec<f64> = r[j][j..m].to_vec();
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
        reflect_columns(&v, &mut r[j..n], j);
        reflectors.push(v);
    }
    // Q = H_0 · … · H_{k-1} applied to the first k columns of the identity.
    let mut q: Vec<Vec<f64>> = (0..k)
        .map(|c| {
            let mut col = vec![0.0; m];
            col[c] = 1.0;
            col
        })
        .collect();
    for j in (0..k).rev() {
        reflect_columns(&reflectors[j], &mut q, j);
    }
    let mut rr = Mat::zeros(k, n);
    for (c, col) in r.iter().enumerate() {
        for (i, x) in col.iter().enumerate().take(k.min(c + 1)) {
            rr.data[i * n + c] = *x;
        }
    }
    (Mat::from_columns(m, &q), rr)
}

/// The Cholesky factor `L` (row-major, lower triangular) of the symmetric `n × n` matrix `m`
/// (row-major), or `None` where a pivot is not above `min_pivot` (`m` not positive definite, or
/// not safely so).
pub(crate) fn cholesky(m: &[f64], n: usize, min_pivot: f64) -> Option<Vec<f64>> {
    let mut l = vec![0.0f64; n * n];
    for j in 0..n {
        let mut d = m[j * n + j];
        for p in 0..j {
            d -= l[j * n + p] * l[j * n + p];
        }
        if d.partial_cmp(&min_pivot) != Some(std::cmp::Ordering::Greater) {
            return None;
        }
        let d = d.sqrt();
        l[j * n + j] = d;
        for i in j + 1..n {
            let mut v = m[i * n + j];
            for p in 0..j {
                v -= l[i * n + p] * l[j * n + p];
            }
            l[i * n + j] = v / d;
        }
    }
    Some(l)
}

/// Solves `L·y = x` in place for the lower triangular `l` (`n × n`, row-major).
pub(crate) fn forward_solve(l: &[f64], n: usize, x: &mut [f64]) {
    for i in 0..n {
        let mut v = x[i];
        for k in 0..i {
            v -= l[i * n + k] * x[k];
        }
        x[i] = v / l[i * n + i];
    }
}

/// Solves `L·Lᵀ·y = x` in place, `l` from [`cholesky`].
pub(crate) fn cholesky_solve(l: &[f64], n: usize, x: &mut [f64]) {
    forward_solve(l, n, x);
    for i in (0..n).rev() {
        let mut v = x[i];
        for k in i + 1..n {
            v -= l[k * n + i] * x[k];
        }
        x[i] = v / l[i * n + i];
    }
}

/// Thin SVD `a = U · diag(s) · Vᵀ` of an `m × n` matrix, singular values in descending order
/// (ties keep column order), `U` `m × k`, `V` `n × k`, `k = min(m, n)`. One-sided Jacobi
/// rotations in a fixed cyclic order until a sweep changes nothing (at most 64 sweeps), on
/// contiguous columns.
pub(crate) fn svd(a: &Mat) -> (Mat, Vec<f64>, Mat) {
    if a.rows < a.cols {
        let (u, s, v) = svd(&a.transpose());
        return (v, s, u);
    }
    let (m, n) = (a.rows, a.cols);
    let mut w = a.to_columns();
    let mut v = Mat::identity(n).to_columns();
    for _sweep in 0..64 {
        let mut rotated = false;
        for p in 0..n {
            for q in p + 1..n {
                let (wp, wq) = two_columns(&mut w, p, q);
                let (mut alpha, mut beta, mut gamma) = (0.0, 0.0, 0.0);
                for (x, y) in wp.iter().zip(wq.iter()) {
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
                rotate(wp, wq, c, s);
                let (vp, vq) = two_columns(&mut v, p, q);
                rotate(vp, vq, c, s);
            }
        }
        if !rotated {
            break;
        }
    }
    let norms: Vec<f64> = w
        .iter()
        .map(|col| col.iter().map(|x| x * x).sum::<f64>().sqrt())
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&x, &y| norms[y].total_cmp(&norms[x]).then(x.cmp(&y)));
    let mut u = Mat::zeros(m, n);
    let mut vs = Mat::zeros(n, n);
    let mut s = Vec::with_capacity(n);
    for (k, &c) in order.iter().enumerate() {
        let sigma = norms[c];
        s.push(sigma);
        for (i, x) in w[c].iter().enumerate() {
            u.data[i * n + k] = if sigma > 0.0 { x / sigma } else { 0.0 };
        }
        for (i, x) in v[c].iter().enumerate() {
            vs.data[i * n + k] = *x;
        }
    }
    (u, s, vs)
}

/// The plane rotation of columns `p` and `q` by `(c, s)`.
fn rotate(p: &mut [f64], q: &mut [f64], c: f64, s: f64) {
    for (x, y) in p.iter_mut().zip(q.iter_mut()) {
        let (a, b) = (*x, *y);
        *x = c * a - s * b;
        *y = s * a + c * b;
    }
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

    /// The first version of this file, row-major and column-strided, kept as the reference the
    /// column-wise code must equal bit for bit (round adapters already committed were made by
    /// it, and every node must keep making the same bytes).
    mod reference {
        use super::Mat;

        /// `self · other`, each element summed in ascending index order.
        pub(super) fn matmul(a: &Mat, other: &Mat) -> Mat {
            assert_eq!(a.cols, other.rows, "matmul shapes");
            let mut out = Mat::zeros(a.rows, other.cols);
            for i in 0..a.rows {
                for j in 0..other.cols {
                    let mut acc = 0.0;
                    for k in 0..a.cols {
                        acc += a.data[i * a.cols + k] * other.data[k * other.cols + j];
                    }
                    out.data[i * other.cols + j] = acc;
                }
            }
            out
        }

        /// Thin QR of an `m × n` matrix: `Q` (`m × k`, orthonormal columns) and `R` (`k × n`, upper
        /// triangular), `k = min(m, n)`, by Householder reflections.
        pub(super) fn qr(a: &Mat) -> (Mat, Mat) {
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
        pub(super) fn svd(a: &Mat) -> (Mat, Vec<f64>, Mat) {
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
    }

    fn bits(m: &Mat) -> Vec<u64> {
        m.data.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn column_wise_code_equals_the_reference_bit_for_bit() {
        let mut cases = vec![
            random(40, 12, 11),
            random(12, 40, 12),
            random(33, 33, 13),
            random(1, 5, 14),
            random(7, 1, 15),
            Mat::zeros(6, 4),
        ];
        // Rank-deficient: repeated and zero columns.
        let mut dup = random(20, 6, 16);
        for r in 0..20 {
            let x = dup.at(r, 0);
            dup.set(r, 3, x);
            dup.set(r, 5, 0.0);
        }
        cases.push(dup);
        for a in &cases {
            let (q, r) = qr(a);
            let (q0, r0) = reference::qr(a);
            assert_eq!(
                (bits(&q), bits(&r)),
                (bits(&q0), bits(&r0)),
                "qr {}x{}",
                a.rows,
                a.cols
            );
            let (u, s, v) = svd(a);
            let (u0, s0, v0) = reference::svd(a);
            assert_eq!(bits(&u), bits(&u0), "svd u {}x{}", a.rows, a.cols);
            assert_eq!(bits(&v), bits(&v0), "svd v {}x{}", a.rows, a.cols);
            let sb: Vec<u64> = s.iter().map(|x| x.to_bits()).collect();
            let sb0: Vec<u64> = s0.iter().map(|x| x.to_bits()).collect();
            assert_eq!(sb, sb0, "svd s {}x{}", a.rows, a.cols);
            let b = random(a.cols, 9, 17);
            assert_eq!(bits(&a.matmul(&b)), bits(&reference::matmul(a, &b)));
        }
    }
}

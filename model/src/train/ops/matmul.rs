//! Strided matrix multiplication on slices (`gemm`).

// Matrix multiplication

/// A read-only strided matrix: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    /// The values.
    pub data: &'a [f32],
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// Row stride.
    pub rs: usize,
    /// Column stride.
    pub cs: usize,
}

impl<'a> View<'a> {
    /// A contiguous row-major `[rows, cols]` matrix.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        View {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// Rows of `cols` values that start every `rs` values (a column block of a wider matrix).
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, rs: usize) -> Self {
        View {
            data,
            rows,
            cols,
            rs,
            cs: 1,
        }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        View {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    fn span(&self) -> usize {
        span(self.rows, self.cols, self.rs, self.cs)
    }
}

fn span(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// `dst = scale * a b`, or `dst += scale * a b` with `accumulate`. `dst` is `[a.rows, b.cols]` with
/// row stride `dst_rs`. `parallel` lets `gemm` split the work over the rayon pool (off inside tasks
/// that already run in parallel). Each output element is reduced over `k` by one thread in a fixed
/// order, so the result does not depend on scheduling.
pub fn matmul(
    dst: &mut [f32],
    dst_rs: usize,
    a: View<'_>,
    b: View<'_>,
    scale: f32,
    accumulate: bool,
    parallel: bool,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(k, b.rows, "matmul: inner dimensions differ");
    assert!(a.data.len() >= a.span() && b.data.len() >= b.span());
    assert!(dst.len() >= span(m, n, dst_rs, 1) && (m <= 1 || dst_rs >= n));
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * dst_rs..i * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    let par = if parallel {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every index gemm touches is `(i, j) -> i * rs + j * cs` with `i < rows`,
    // `j < cols`, which the span checks above keep inside each slice; `dst` does not alias the
    // inputs (it is a unique borrow).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            par,
        );
    }
}

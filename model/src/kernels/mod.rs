//! CPU kernels for `y = x W^T` with `W` in a GGUF block format.
//!
//! For the 32-element formats (below): candle's CPU path quantizes activations to 8 bits and has
//! no SIMD dot product for Q4_1. Here the weights are dequantized block by block in registers (AVX2/FMA when the CPU has them) and multiplied
//! with the f32 activations, so the result equals `x` times the dequantized weight up to f32
//! summation order, the same arithmetic as a reference that dequantizes first. Each weight block is
//! decoded once and applied to every row of `x`, so prefill reuses it from registers.
//!
//! Formats ([`Format`]): Q4_0, Q4_1, Q5_0, Q8_0 (blocks of 32), and the K-quants Q4_K, Q5_K,
//! Q6_K of llama.cpp's Q4_K_M files (super-blocks of 256, [`kquants`]). Every 32-element kernel
//! can read a block as `scale * q + offset` ([`formats::chunk`], the scalar reference); Q4_1 and
//! Q8_0, the default model's formats, keep decoders of their own. The K-quants multiply on 8-bit
//! activations, as llama.cpp does: their 16-bit versions ran 2-6x slower than int8 ones (issue
//! 15's notes), while the 32-element formats keep 16-bit activations (one row) or f32 (several).

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx2_k;
mod formats;
pub mod kquants;
mod pool;

pub use formats::{chunk, dequant_block, Chunk, Format, BLOCK};
pub use kquants::X8;
pub use pool::{share, Pool};

/// `y[t, r] = sum_k x[t, k] W[r, k]` for `t < m`, `r` in `rows`, with `W` given as `w` (row-major
/// blocks, `k / fmt.block_elems()` blocks per row). `y` holds `m` rows of `y_stride` floats; only columns `rows`
/// are written. Requires `k % fmt.block_elems() == 0`.
#[allow(clippy::too_many_arguments)] // a kernel: the shapes are its arguments
pub fn matmul_rows(
    fmt: Format,
    w: &[u8],
    k: usize,
    x: &[f32],
    m: usize,
    rows: std::ops::Range<usize>,
    y: &mut [f32],
    y_stride: usize,
) {
    if fmt.is_k() {
        return kquants::matmul_rows(fmt, w, k, x, m, rows, y, y_stride);
    }
    #[cfg(target_arch = "x86_64")]
    {
        if simd() {
            // SAFETY: the CPU supports AVX2, FMA and F16C (checked above); slices are
            // bounds-checked inside except for the SIMD loads, which stay within one block / one
            // x row.
            if m == 1 {
                let xq = quantize_x16(&x[..k]);
                // SAFETY: as above.
                unsafe { avx2::matvec(fmt, w, k, &xq, rows, y) };
            } else {
                // SAFETY: as above.
                unsafe { avx2::matmul_rows(fmt, w, k, x, m, rows, y, y_stride) };
            }
            return;
        }
    }
    matmul_rows_scalar(fmt, w, k, x, m, rows, y, y_stride)
}

/// One activation row: `y[r] = sum_k x[k] W[r, k]` for `r` in `rows`, with `x` prepared once by
/// [`prepare_row`] (so threads that split the rows share it). `y` holds the results of `rows`
/// only (`y[0]` is row `rows.start`): `w` starts at row `rows.start`'s blocks.
pub fn matvec_rows(fmt: Format, w: &[u8], k: usize, x: &Row, rows: usize, y: &mut [f32]) {
    if fmt.is_k() {
        let x8 = x.int8.as_ref().expect("a row prepared for the K-quants");
        return kquants::matvec(fmt, w, k, x8, rows, y);
    }
    match &x.int16 {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `int16` is set only when the CPU has AVX2, FMA and F16C (`prepare_row`); the
        // kernel asserts its slice bounds.
        Some(xq) => unsafe { avx2::matvec(fmt, w, k, xq, 0..rows, y) },
        _ => matmul_rows_scalar(fmt, w, k, &x.f32, 1, 0..rows, y, rows),
    }
}

/// An activation row in the forms [`matvec_rows`] multiplies.
#[derive(Debug, Clone)]
pub struct Row {
    /// The f32 values (the portable 32-element kernels).
    f32: Vec<f32>,
    /// 16-bit integers for the SIMD 32-element kernels, where the CPU has them.
    int16: Option<X16>,
    /// 8-bit integers for the K-quants, where a weight needs them.
    int8: Option<X8>,
}

/// Prepares one activation row (length a multiple of every format's block) for [`matvec_rows`]
/// with weights in `formats`.
pub fn prepare_row(x: &[f32], formats: &[Format]) -> Row {
    let small = formats.iter().any(|f| !f.is_k());
    #[cfg(target_arch = "x86_64")]
    let int16 = (small && simd()).then(|| quantize_x16(x));
    #[cfg(not(target_arch = "x86_64"))]
    let int16 = None;
    Row {
        f32: if small && int16.is_none() {
            x.to_vec()
        } else {
            Vec::new()
        },
        int16,
        int8: formats
            .iter()
            .any(|f| f.is_k())
            .then(|| kquants::quantize_x8(x)),
    }
}

/// Whether this CPU runs the kernels of [`avx2`]: AVX2, FMA and F16C (every AVX2 CPU has the
/// other two).
#[cfg(target_arch = "x86_64")]
pub(crate) fn simd() -> bool {
    std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
}

/// One activation row as 16-bit integers with a scale per block of 32: `x ~= scale[b] * q`.
#[derive(Debug, Clone)]
pub struct X16 {
    /// The integers, `|q| <= 32767`.
    pub q: Vec<i16>,
    /// Per-block scale (`max |x| / 32767`).
    pub scale: Vec<f32>,
    /// Per-block exact f32 sum of `x` (for the Q4_1 offset term).
    pub sum: Vec<f32>,
}

/// Quantizes `x` (length a multiple of 32) to [`X16`]. The rounding error is at most
/// `max|x| / 65534` per element of a block, about 1.5e-5 relative: far below the gaps between
/// competing logits, and it keeps every integer product in the dot products exact.
pub fn quantize_x16(x: &[f32]) -> X16 {
    let nb = x.len() / BLOCK;
    let mut out = X16 {
        q: vec![0; nb * BLOCK],
        scale: vec![0.0; nb],
        sum: vec![0.0; nb],
    };
    for (b, xs) in x.chunks_exact(BLOCK).enumerate() {
        out.sum[b] = xs.iter().sum();
        let Some((scale, inv)) = symmetric_scale(xs, 32767.0) else {
            continue;
        };
        out.scale[b] = scale;
        for (q, v) in out.q[b * BLOCK..(b + 1) * BLOCK].iter_mut().zip(xs) {
            *q = (v * inv).round().clamp(-32767.0, 32767.0) as i16;
        }
    }
    out
}

/// The scale `max|x| / qmax` that maps a block onto integers `-qmax..=qmax`, with the factor
/// that rounds a value to them (`1 / scale`); `None` for a block of zeros or non-finite values
/// (left as zeros, scale 0).
pub(crate) fn symmetric_scale(xs: &[f32], qmax: f32) -> Option<(f32, f32)> {
    let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 || !amax.is_finite() {
        return None;
    }
    let scale = amax / qmax;
    Some((scale, 1.0 / scale))
}

/// [`matmul_rows`] without the single-row specialisation (for benchmarks).
#[allow(clippy::too_many_arguments)]
pub fn matmul_rows_tiled(
    fmt: Format,
    w: &[u8],
    k: usize,
    x: &[f32],
    m: usize,
    rows: std::ops::Range<usize>,
    y: &mut [f32],
    y_stride: usize,
) {
    if fmt.is_k() {
        return kquants::matmul_rows(fmt, w, k, x, m, rows, y, y_stride);
    }
    #[cfg(target_arch = "x86_64")]
    {
        if simd() {
            // SAFETY: the CPU supports AVX2 and FMA (and F16C).
            unsafe { avx2::matmul_rows(fmt, w, k, x, m, rows, y, y_stride) };
            return;
        }
    }
    matmul_rows_scalar(fmt, w, k, x, m, rows, y, y_stride)
}

/// The portable version of [`matmul_rows`] for the 32-element formats.
#[allow(clippy::too_many_arguments)]
pub fn matmul_rows_scalar(
    fmt: Format,
    w: &[u8],
    k: usize,
    x: &[f32],
    m: usize,
    rows: std::ops::Range<usize>,
    y: &mut [f32],
    y_stride: usize,
) {
    assert!(!fmt.is_k(), "{fmt:?}: use kquants::matvec_scalar");
    let be = BLOCK;
    let nb = k / be;
    let bb = fmt.block_bytes();
    let mut acc = vec![0f32; m];
    let mut deq = [0f32; BLOCK];
    for r in rows {
        acc.iter_mut().for_each(|a| *a = 0.0);
        for b in 0..nb {
            let off = (r * nb + b) * bb;
            dequant_block(fmt, &w[off..off + bb], &mut deq);
            for (t, a) in acc.iter_mut().enumerate() {
                let xs = &x[t * k + b * be..t * k + (b + 1) * be];
                *a += deq.iter().zip(xs).map(|(w, x)| w * x).sum::<f32>();
            }
        }
        for (t, a) in acc.iter().enumerate() {
            y[t * y_stride + r] = *a;
        }
    }
}

#[cfg(test)]
mod tests;

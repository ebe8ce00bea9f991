//! Frozen base weights kept in GGUF block formats, multiplied by the SIMD kernels of [`crate::kernels`]
//! through a candle custom op (with a backward pass to the input, so gradients flow through frozen
//! quantized layers to earlier trainable ones).

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::Result;
use crate::kernels::{self, Format};

/// Up to this many rows of activations go through [`kernels::Pool`] (split by weight rows); more go
/// to rayon in tiles of 8 rows.
const SHORT: usize = 32;

/// A `[rows, cols]` weight in a block format with a fast kernel.
#[derive(Debug)]
pub struct BlockWeight {
    fmt: Format,
    rows: usize,
    cols: usize,
    data: Data,
}

/// A weight's blocks: its own copy, or a range of a memory-mapped model file used in place.
#[derive(Debug)]
pub enum Data {
    /// Bytes owned by the weight.
    Owned(Vec<u8>),
    /// `range` of the mapped file `map`.
    Mapped {
        /// The whole file.
        map: Arc<memmap2::Mmap>,
        /// The weight's bytes in it.
        range: std::ops::Range<usize>,
    },
}

impl Data {
    fn bytes(&self) -> &[u8] {
        match self {
            Data::Owned(v) => v,
            Data::Mapped { map, range } => &map[range.clone()],
        }
    }
}

impl BlockWeight {
    /// Takes over a quantized tensor if its format has a fast kernel.
    pub fn from_qtensor(q: &QTensor) -> Result<Option<Self>> {
        let Some(fmt) = Format::of(q.dtype()) else {
            return Ok(None);
        };
        let (rows, cols) = q.shape().dims2()?;
        Ok(Self::new(
            fmt,
            rows,
            cols,
            Data::Owned(q.data()?.into_owned()),
        ))
    }

    /// A `[rows, cols]` weight of `fmt` blocks held in `data`, or `None` when the sizes do not
    /// make whole rows of blocks.
    pub fn new(fmt: Format, rows: usize, cols: usize, data: Data) -> Option<Self> {
        let be = fmt.block_elems();
        let len = (cols / be)
            .checked_mul(fmt.block_bytes())
            .and_then(|rb| rb.checked_mul(rows));
        (cols.is_multiple_of(be) && len == Some(data.bytes().len())).then_some(BlockWeight {
            fmt,
            rows,
            cols,
            data,
        })
    }

    /// The block format.
    pub fn format(&self) -> Format {
        self.fmt
    }

    /// Whether the blocks are used in place from a memory-mapped file.
    pub fn is_mapped(&self) -> bool {
        matches!(self.data, Data::Mapped { .. })
    }

    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Bytes of blocks.
    pub fn size_in_bytes(&self) -> usize {
        self.data.bytes().len()
    }

    fn row_bytes(&self) -> usize {
        self.cols / self.fmt.block_elems() * self.fmt.block_bytes()
    }

    fn dequant_row(&self, r: usize, out: &mut [f32]) {
        let bb = self.fmt.block_bytes();
        let row = &self.data.bytes()[r * self.row_bytes()..(r + 1) * self.row_bytes()];
        for (blk, chunk) in row
            .chunks_exact(bb)
            .zip(out.chunks_exact_mut(self.fmt.block_elems()))
        {
            kernels::dequant_block(self.fmt, blk, chunk);
        }
    }

    /// The whole weight as dense f32.
    pub fn dequantize(&self) -> Result<Tensor> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, row) in out.chunks_exact_mut(self.cols).enumerate() {
            self.dequant_row(r, row);
        }
        Ok(Tensor::from_vec(out, (self.rows, self.cols), &Device::Cpu)?)
    }

    /// Rows `ids` as dense f32 `[n, cols]`; an id out of range is an error.
    pub fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        let mut out = vec![0f32; ids.len() * self.cols];
        for (i, &id) in ids.iter().enumerate() {
            let r = id as usize;
            if r >= self.rows {
                return Err(candle_core::Error::Msg(format!(
                    "token id {id} out of range for a vocabulary of {}",
                    self.rows
                ))
                .into());
            }
            self.dequant_row(r, &mut out[i * self.cols..(i + 1) * self.cols]);
        }
        Ok(Tensor::from_vec(out, (ids.len(), self.cols), &Device::Cpu)?)
    }

    /// The block format and the raw bytes of rows `rows` (row-major blocks), for kernels outside
    /// this module (training dequantizes panels from them).
    pub fn raw_rows(&self, rows: std::ops::Range<usize>) -> (Format, &[u8]) {
        let rb = self.row_bytes();
        (self.fmt, &self.data.bytes()[rows.start * rb..rows.end * rb])
    }

    /// `y = x W^T` on raw slices: `x` is `[m, cols]`, the result `[m, rows]`.
    pub fn matmul_t_slice(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.rows, self.cols);
        let mut y = vec![0f32; m * n];
        let threads = rayon::current_num_threads();
        let pool = kernels::Pool::global();
        if m == 1 && pools_a_row(pool, n, k) {
            self.matvec_pooled(pool, x, &mut y);
        } else if m <= SHORT && m * n * k >= 1 << 18 && pool.threads() > 1 {
            self.matmul_pooled(pool, x, m, &mut y);
        } else if threads <= 1 || m * n * k < (1 << 18) {
            kernels::matmul_rows(self.fmt, self.data.bytes(), k, x, m, 0..n, &mut y, n);
        } else {
            let tile = 8usize;
            y.par_chunks_mut(tile * n).enumerate().for_each(|(i, ys)| {
                let t0 = i * tile;
                let mt = ys.len() / n;
                let xs = &x[t0 * k..(t0 + mt) * k];
                kernels::matmul_rows(self.fmt, self.data.bytes(), k, xs, mt, 0..n, ys, n);
            });
        }
        y
    }

    /// `y = x W^T` for a few rows `x` (a short prompt), the weight's rows split over the threads
    /// of `pool`: each thread multiplies its rows of `W` with every row of `x`.
    fn matmul_pooled(&self, pool: &kernels::Pool, x: &[f32], m: usize, y: &mut [f32]) {
        let (n, k) = (self.rows, self.cols);
        let t = pool.threads();
        let rb = self.row_bytes();
        let parts: Vec<std::sync::Mutex<Vec<f32>>> =
            (0..t).map(|_| std::sync::Mutex::new(Vec::new())).collect();
        pool.run(&|i, t| {
            let r = kernels::share(n, i, t, 8);
            let w = &self.data.bytes()[r.start * rb..r.end * rb];
            let mut out = vec![0f32; m * r.len()];
            kernels::matmul_rows(self.fmt, w, k, x, m, 0..r.len(), &mut out, r.len());
            *parts[i].lock().unwrap_or_else(|e| e.into_inner()) = out;
        });
        for (i, part) in parts.into_iter().enumerate() {
            let r = kernels::share(n, i, t, 8);
            let out = part.into_inner().unwrap_or_else(|e| e.into_inner());
            for (dst, src) in y.chunks_exact_mut(n).zip(out.chunks_exact(r.len().max(1))) {
                dst[r.clone()].copy_from_slice(src);
            }
        }
    }

    /// `y = W x` for one row `x`, its rows split over the threads of `pool`.
    fn matvec_pooled(&self, pool: &kernels::Pool, x: &[f32], y: &mut [f32]) {
        matvec_many(pool, &[self], x, &mut [y]);
    }

    /// `g_x = g_y W` on raw slices: `g_y` is `[m, rows]`, the result `[m, cols]`.
    pub fn matmul_slice(&self, gy: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.rows, self.cols);
        let mut gx = vec![0f32; m * k];
        let mut row = vec![0f32; k];
        for r in 0..n {
            self.dequant_row(r, &mut row);
            for t in 0..m {
                let g = gy[t * n + r];
                if g != 0.0 {
                    let out = &mut gx[t * k..(t + 1) * k];
                    out.iter_mut().zip(&row).for_each(|(o, w)| *o += g * w);
                }
            }
        }
        gx
    }
}

/// Whether one activation row through weights of `rows` rows in all, `cols` columns, goes through
/// `pool` (smaller products cost less than the threads' meeting).
fn pools_a_row(pool: &kernels::Pool, rows: usize, cols: usize) -> bool {
    pool.threads() > 1 && rows * cols >= 1 << 16
}

/// `x W_j^T` for several weights that read the same rows `x`: one row is a single
/// [`kernels::Pool`] job for all of them (q, k and v; gate and up), so the threads meet once
/// instead of once per weight; otherwise each weight's [`BlockWeight::matmul_t_slice`].
pub fn matmul_t_many(ws: &[&BlockWeight], x: &[f32], m: usize) -> Vec<Vec<f32>> {
    let pool = kernels::Pool::global();
    let rows = ws.iter().map(|w| w.rows).sum();
    if m == 1 && pools_a_row(pool, rows, x.len()) {
        let mut ys: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; w.rows]).collect();
        let mut outs: Vec<&mut [f32]> = ys.iter_mut().map(|y| &mut y[..]).collect();
        matvec_many(pool, ws, x, &mut outs);
        ys
    } else {
        ws.iter().map(|w| w.matmul_t_slice(x, m)).collect()
    }
}

/// Rows `range` of weight `j` of a [`matvec_many`] job, and their part of the output.
type Piece<'a> = (usize, std::ops::Range<usize>, &'a mut [f32]);

/// `ys[j] = ws[j] x` for weights that read the same row `x` (`cols` values each): one pool job
/// over all their rows, each thread taking a run of whole rows.
pub fn matvec_many(pool: &kernels::Pool, ws: &[&BlockWeight], x: &[f32], ys: &mut [&mut [f32]]) {
    assert!(ws.len() == ys.len());
    assert!(ws
        .iter()
        .zip(ys.iter())
        .all(|(w, y)| w.cols == x.len() && y.len() == w.rows));
    let formats: Vec<Format> = ws.iter().map(|w| w.fmt).collect();
    let xr = kernels::prepare_row(x, &formats);
    let total: usize = ws.iter().map(|w| w.rows).sum();
    let t = pool.threads();
    // Each thread's rows, as (weight, rows of it, the matching part of its output).
    let mut parts: Vec<Vec<Piece<'_>>> = (0..t).map(|_| Vec::new()).collect();
    let mut base = 0;
    for (j, (w, y)) in ws.iter().zip(ys.iter_mut()).enumerate() {
        let mut rest = &mut y[..];
        for (i, part) in parts.iter_mut().enumerate() {
            let s = kernels::share(total, i, t, 8);
            let lo = s.start.clamp(base, base + w.rows) - base;
            let hi = s.end.clamp(base, base + w.rows) - base;
            if hi > lo {
                let (mine, tail) = std::mem::take(&mut rest).split_at_mut(hi - lo);
                part.push((j, lo..hi, mine));
                rest = tail;
            }
        }
        base += w.rows;
    }
    let parts: Vec<std::sync::Mutex<_>> = parts.into_iter().map(std::sync::Mutex::new).collect();
    pool.run(&|i, _| {
        let mut part = parts[i].lock().unwrap_or_else(|e| e.into_inner());
        for (j, r, y) in part.iter_mut() {
            let w = ws[*j];
            let rb = w.row_bytes();
            let bytes = &w.data.bytes()[r.start * rb..r.end * rb];
            kernels::matvec_rows(w.fmt, bytes, w.cols, &xr, r.len(), y);
        }
    });
}

/// `x W^T` as a candle op.
struct MatMulT(Arc<BlockWeight>);

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("hivemind qmatmul: input must be contiguous"),
    }
}

impl CustomOp1 for MatMulT {
    fn name(&self) -> &'static str {
        "hivemind-qmatmul-t"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l)?;
        let dims = l.shape().dims();
        let k = *dims.last().unwrap_or(&0);
        if k != self.0.cols {
            candle_core::bail!(
                "qmatmul: input has {k} features, weight has {}",
                self.0.cols
            );
        }
        let m = x.len() / k.max(1);
        let y = self.0.matmul_t_slice(x, m);
        let mut out = dims.to_vec();
        if let Some(last) = out.last_mut() {
            *last = self.0.rows;
        }
        Ok((CpuStorage::F32(y), Shape::from(out)))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = grad.contiguous()?;
        Ok(Some(
            g.apply_op1_no_bwd(&MatMul(self.0.clone()))?
                .reshape(arg.shape())?,
        ))
    }
}

/// `g W` (the input gradient of [`MatMulT`]).
struct MatMul(Arc<BlockWeight>);

impl CustomOp1 for MatMul {
    fn name(&self) -> &'static str {
        "hivemind-qmatmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = contiguous_f32(s, l)?;
        let dims = l.shape().dims();
        let n = *dims.last().unwrap_or(&0);
        if n != self.0.rows {
            candle_core::bail!("qmatmul grad: {n} outputs, weight has {}", self.0.rows);
        }
        let m = g.len() / n.max(1);
        let gx = self.0.matmul_slice(g, m);
        let mut out = dims.to_vec();
        if let Some(last) = out.last_mut() {
            *last = self.0.cols;
        }
        Ok((CpuStorage::F32(gx), Shape::from(out)))
    }
}

/// `x W^T` for `x` of shape `[.., cols]`, differentiable with respect to `x`.
pub fn matmul_t(w: &Arc<BlockWeight>, x: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    Ok(x.apply_op1(MatMulT(w.clone()))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `[rows, cols]` Q4_1 weight of pseudo-random blocks.
    fn weight(rows: usize, cols: usize) -> BlockWeight {
        let fmt = Format::Q4_1;
        let mut seed = 7u64;
        let mut data = Vec::new();
        for _ in 0..rows * cols / kernels::BLOCK {
            data.extend_from_slice(&half::f16::from_f32(0.02).to_le_bytes());
            data.extend_from_slice(&half::f16::from_f32(-0.1).to_le_bytes());
            for _ in 4..fmt.block_bytes() {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                data.push((seed >> 56) as u8);
            }
        }
        BlockWeight {
            fmt,
            rows,
            cols,
            data: Data::Owned(data),
        }
    }

    #[test]
    fn a_row_split_over_threads_equals_the_one_thread_product_bit_for_bit() {
        let (rows, cols) = (1000, 96);
        let w = weight(rows, cols);
        let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut one = vec![0f32; rows];
        kernels::matmul_rows(w.fmt, w.data.bytes(), cols, &x, 1, 0..rows, &mut one, rows);
        for threads in [1, 2, 3, 5] {
            let pool = kernels::Pool::new(threads);
            let mut y = vec![f32::NAN; rows];
            w.matvec_pooled(&pool, &x, &mut y);
            assert_eq!(y, one, "{threads} threads");
            // Split between weights of one job (one boundary not a multiple of 8 rows): each
            // part as alone.
            let sizes = [rows - 235, 232, 3];
            let ws: Vec<BlockWeight> = sizes.iter().map(|&n| weight(n, cols)).collect();
            let mut ys: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![f32::NAN; n]).collect();
            let refs: Vec<&BlockWeight> = ws.iter().collect();
            let mut outs: Vec<&mut [f32]> = ys.iter_mut().map(|y| &mut y[..]).collect();
            matvec_many(&pool, &refs, &x, &mut outs);
            for (w, y) in ws.iter().zip(&ys) {
                let mut alone = vec![0f32; w.rows];
                w.matvec_pooled(&kernels::Pool::new(1), &x, &mut alone);
                assert_eq!(y, &alone, "{threads} threads, three weights");
            }
        }
        // A short prompt: 5 rows, the weight's rows split over 3 threads.
        let xs: Vec<f32> = (0..5 * cols).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut want = vec![0f32; 5 * rows];
        kernels::matmul_rows(
            w.fmt,
            w.data.bytes(),
            cols,
            &xs,
            5,
            0..rows,
            &mut want,
            rows,
        );
        let mut got = vec![f32::NAN; 5 * rows];
        w.matmul_pooled(&kernels::Pool::new(3), &xs, 5, &mut got);
        assert_eq!(got, want);
        // The dequantized weight times x agrees (the kernels' own reference).
        let dense = w.dequantize().and_then(|t| Ok(t.to_vec2::<f32>()?));
        let dense = dense.expect("dequantize");
        for (r, row) in dense.iter().enumerate() {
            let want: f32 = row.iter().zip(&x).map(|(a, b)| a * b).sum();
            assert!(
                (want - one[r]).abs() <= 1e-3 * (1.0 + want.abs()),
                "row {r}"
            );
        }
    }
}

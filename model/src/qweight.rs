//! Frozen base weights kept in GGUF block formats, multiplied by the SIMD kernels of [`crate::kernels`]
//! through a candle custom op (with a backward pass to the input, so gradients flow through frozen
//! quantized layers to earlier trainable ones).

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::Result;
use crate::kernels::{self, Format};

/// A `[rows, cols]` weight in a block format with a fast kernel.
#[derive(Debug)]
pub struct BlockWeight {
    fmt: Format,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl BlockWeight {
    /// Takes over a quantized tensor if its format has a fast kernel.
    pub fn from_qtensor(q: &QTensor) -> Result<Option<Self>> {
        let Some(fmt) = Format::of(q.dtype()) else {
            return Ok(None);
        };
        let (rows, cols) = q.shape().dims2()?;
        if cols % kernels::BLOCK != 0 {
            return Ok(None);
        }
        let data = q.data()?.into_owned();
        if data.len() != rows * cols / kernels::BLOCK * fmt.block_bytes() {
            return Ok(None);
        }
        Ok(Some(BlockWeight {
            fmt,
            rows,
            cols,
            data,
        }))
    }

    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Bytes held.
    pub fn size_in_bytes(&self) -> usize {
        self.data.len()
    }

    fn row_bytes(&self) -> usize {
        self.cols / kernels::BLOCK * self.fmt.block_bytes()
    }

    fn dequant_row(&self, r: usize, out: &mut [f32]) {
        let bb = self.fmt.block_bytes();
        let row = &self.data[r * self.row_bytes()..(r + 1) * self.row_bytes()];
        for (blk, chunk) in row
            .chunks_exact(bb)
            .zip(out.chunks_exact_mut(kernels::BLOCK))
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
        (self.fmt, &self.data[rows.start * rb..rows.end * rb])
    }

    /// `y = x W^T` on raw slices: `x` is `[m, cols]`, the result `[m, rows]`.
    pub fn matmul_t_slice(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.rows, self.cols);
        let mut y = vec![0f32; m * n];
        let threads = rayon::current_num_threads();
        if threads <= 1 || m * n * k < (1 << 18) {
            kernels::matmul_rows(self.fmt, &self.data, k, x, m, 0..n, &mut y, n);
        } else if m == 1 {
            let chunk = n.div_ceil(threads * 4).max(16);
            y.par_chunks_mut(chunk).enumerate().for_each(|(i, ys)| {
                let r0 = i * chunk;
                let rows = r0..r0 + ys.len();
                // Shift the row range so the kernel writes into this chunk at offset 0.
                let w = &self.data[r0 * self.row_bytes()..rows.end * self.row_bytes()];
                kernels::matmul_rows(self.fmt, w, k, x, 1, 0..rows.len(), ys, rows.len());
            });
        } else {
            let tile = 8usize;
            y.par_chunks_mut(tile * n).enumerate().for_each(|(i, ys)| {
                let t0 = i * tile;
                let mt = ys.len() / n;
                let xs = &x[t0 * k..(t0 + mt) * k];
                kernels::matmul_rows(self.fmt, &self.data, k, xs, mt, 0..n, ys, n);
            });
        }
        y
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

//! Differentiable building blocks of LoRA training on CPU, each a forward and a backward function on
//! plain row-major `f32` slices.
//!
//! candle 0.11's fused `rms_norm`, `rope` and `softmax_last_dim` have no backward pass (gradients
//! through them silently become zero) and its matmul backward also computes the gradient of the
//! frozen weight, so training does not use candle's autograd. [`crate::train`] chains these ops by
//! hand and keeps only what each backward needs.
//!
//! ```text
//!  frozen_forward / frozen_backward   x W^T and g W with W in its GGUF blocks: one weight at a time
//!                                     is dequantized into a scratch panel and multiplied by `gemm`
//!  lora_forward / lora_backward       s (x A^T) B^T, gradients of A and B and of x
//!  rms_norm_*, rope_*, silu_mul_*     elementwise and per-row ops
//!  attention_*                        causal GQA softmax attention per packed sequence; the backward
//!                                     recomputes the probabilities from the saved log-sum-exp
//!  cross_entropy_fused                lm head + softmax + NLL over the vocabulary in chunks, with the
//!                                     gradient of the hidden state accumulated online: the
//!                                     `[tokens, vocab]` logits never exist at once
//!  DropoutMask                        counter-based, reproducible dropout as a bitset
//! ```
//!
//! Nothing here reduces across rayon tasks in a schedule-dependent order, so results are the same
//! from run to run on one machine with one thread count.

// `is_multiple_of` needs Rust 1.87; the workspace supports 1.85.
#![allow(clippy::manual_is_multiple_of)]

use std::borrow::Cow;
use std::ops::Range;

use candle_core::quantized::{QStorage, QTensor};
use candle_core::{Device, Storage, Tensor};
use rayon::prelude::*;

use crate::decoder::Weight;
use crate::error::{ModelError, Result};
use crate::kernels::{self, Format, BLOCK};

// ---------------------------------------------------------------------------------------------
// Matrix multiplication
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Frozen base weights
// ---------------------------------------------------------------------------------------------

/// Runs `f` on the values of a dense f32 tensor without copying them.
fn with_dense<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(ModelError::Training {
            reason: "training runs on the CPU only".into(),
        });
    };
    let all = cpu.as_slice::<f32>()?;
    let (a, b) = layout
        .contiguous_offsets()
        .ok_or_else(|| ModelError::Training {
            reason: "dense weight is not contiguous".into(),
        })?;
    f(&all[a..b])
}

/// Rows `rows` of a frozen weight as dense f32 into `out` (`rows.len() * in` values). Block
/// formats with a HiveMind kernel dequantize exactly as [`Weight::dequantize`] does; other GGUF
/// formats go through candle's dequantization of just those rows.
pub fn dequantize_rows(w: &Weight, rows: Range<usize>, out: &mut [f32]) -> Result<()> {
    let (n, k) = w.dims()?;
    if rows.end > n || out.len() != rows.len() * k {
        return Err(ModelError::Training {
            reason: format!(
                "rows {rows:?} of a [{n}, {k}] weight do not fit {} values",
                out.len()
            ),
        });
    }
    match w {
        Weight::Blocks(b) => {
            let nrows = rows.len();
            let (fmt, bytes) = b.raw_rows(rows);
            let rb = bytes.len() / nrows.max(1);
            // About 64 KiB of output per task.
            let per_task = (16384 / k.max(1)).max(1);
            out.par_chunks_mut(per_task * k)
                .zip(bytes.par_chunks(per_task * rb.max(1)))
                .for_each(|(o, b)| dequant_blocks(fmt, b, o));
        }
        Weight::Dense(t) => with_dense(t, |s| {
            out.copy_from_slice(&s[rows.start * k..rows.end * k]);
            Ok(())
        })?,
        Weight::Quant(q) => {
            let data = q.data()?;
            let rb = data.len() / n.max(1);
            let sub = &data[rows.start * rb..rows.end * rb];
            // candle reinterprets the bytes as blocks and requires their alignment: copy into an
            // 8-byte aligned buffer when the sub-slice is not.
            let aligned: Vec<u64>;
            let bytes: &[u8] = if sub.as_ptr() as usize % 8 == 0 {
                sub
            } else {
                let mut buf = vec![0u64; sub.len().div_ceil(8)];
                for (w, c) in buf.iter_mut().zip(sub.chunks(8)) {
                    let mut b = [0u8; 8];
                    b[..c.len()].copy_from_slice(c);
                    *w = u64::from_ne_bytes(b);
                }
                aligned = buf;
                // SAFETY: a `[u64]` is readable as bytes (u8 has no alignment or validity
                // requirements); the length stays within the allocation.
                unsafe { std::slice::from_raw_parts(aligned.as_ptr() as *const u8, sub.len()) }
            };
            let st = QStorage::from_data(Cow::Borrowed(bytes), &Device::Cpu, q.dtype())?;
            let t = QTensor::new(st, (rows.len(), k))?.dequantize(&Device::Cpu)?;
            with_dense(&t, |s| {
                out.copy_from_slice(s);
                Ok(())
            })?;
        }
    }
    Ok(())
}

/// Dequantizes consecutive blocks `w` into `out` (`w.len() / block_bytes * 32` values) with the
/// arithmetic of [`kernels::dequant_block`] (`q * d + m` as a multiply then an add), so the values
/// equal [`Weight::dequantize`]'s bit for bit; vectorised with AVX2 where the CPU has it.
pub fn dequant_blocks(fmt: Format, w: &[u8], out: &mut [f32]) {
    let bb = fmt.block_bytes();
    assert!(w.len() % bb == 0 && out.len() == w.len() / bb * BLOCK);
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked above); lengths are checked above.
            unsafe { dequant_blocks_avx2(fmt, w, out) };
            return;
        }
    }
    let mut deq = [0f32; BLOCK];
    for (b, chunk) in w.chunks_exact(bb).zip(out.chunks_exact_mut(BLOCK)) {
        kernels::dequant_block(fmt, b, &mut deq);
        chunk.copy_from_slice(&deq);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dequant_blocks_avx2(fmt: Format, w: &[u8], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let bb = fmt.block_bytes();
    let nb = w.len() / bb;
    assert!(out.len() >= nb * BLOCK);
    let f16_at = |b: &[u8], i: usize| half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    for (blk, o) in w.chunks_exact(bb).zip(out.chunks_exact_mut(BLOCK)) {
        let d = _mm256_set1_ps(f16_at(blk, 0));
        let (q, m) = match fmt {
            Format::Q4_1 => {
                // SAFETY: a Q4_1 block is 20 bytes: 16 bytes of nibbles start at offset 4.
                let q = unsafe { _mm_loadu_si128(blk.as_ptr().add(4) as *const __m128i) };
                let mask = _mm_set1_epi8(0x0f);
                let lo = _mm_and_si128(q, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
                let f = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
                (
                    [
                        f(lo),
                        f(_mm_srli_si128(lo, 8)),
                        f(hi),
                        f(_mm_srli_si128(hi, 8)),
                    ],
                    Some(_mm256_set1_ps(f16_at(blk, 2))),
                )
            }
            Format::Q8_0 => {
                // SAFETY: a Q8_0 block is 34 bytes: 32 signed bytes start at offset 2.
                let q = unsafe { _mm256_loadu_si256(blk.as_ptr().add(2) as *const __m256i) };
                let lo = _mm256_castsi256_si128(q);
                let hi = _mm256_extracti128_si256(q, 1);
                let f = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
                (
                    [
                        f(lo),
                        f(_mm_srli_si128(lo, 8)),
                        f(hi),
                        f(_mm_srli_si128(hi, 8)),
                    ],
                    None,
                )
            }
        };
        for (j, v) in q.iter().enumerate() {
            let x = _mm256_mul_ps(*v, d);
            let x = match m {
                Some(m) => _mm256_add_ps(x, m),
                None => x,
            };
            // SAFETY: `o` holds 32 floats; j * 8 + 8 <= 32.
            unsafe { _mm256_storeu_ps(o.as_mut_ptr().add(j * 8), x) };
        }
    }
}

/// Runs `f` on the whole weight as a dense `[out, in]` slice: dense weights are used in place,
/// quantized ones are dequantized into `scratch` (one weight at a time: the base stays in its
/// blocks).
fn with_panel<R>(
    w: &Weight,
    scratch: &mut Vec<f32>,
    f: impl FnOnce(&[f32]) -> Result<R>,
) -> Result<R> {
    match w {
        Weight::Dense(t) => with_dense(t, f),
        _ => {
            let (n, k) = w.dims()?;
            if scratch.len() < n * k {
                scratch.resize(n * k, 0.0);
            }
            let panel = &mut scratch[..n * k];
            dequantize_rows(w, 0..n, panel)?;
            f(panel)
        }
    }
}

/// `y = x W^T` for `x` of `[t, in]` and a frozen `W` of `[out, in]`; `y` is `[t, out]`.
pub fn frozen_forward(
    w: &Weight,
    x: &[f32],
    t: usize,
    y: &mut [f32],
    scratch: &mut Vec<f32>,
) -> Result<()> {
    let (n, k) = w.dims()?;
    check_len("frozen_forward x", x.len(), t * k)?;
    check_len("frozen_forward y", y.len(), t * n)?;
    with_panel(w, scratch, |wd| {
        matmul(
            y,
            n,
            View::new(x, t, k),
            View::new(wd, n, k).t(),
            1.0,
            false,
            true,
        );
        Ok(())
    })
}

/// `gx = g W` (or `gx += g W` with `accumulate`) for `g` of `[t, out]`: the input gradient of
/// [`frozen_forward`]. No gradient of `W` is computed.
pub fn frozen_backward(
    w: &Weight,
    g: &[f32],
    t: usize,
    gx: &mut [f32],
    accumulate: bool,
    scratch: &mut Vec<f32>,
) -> Result<()> {
    let (n, k) = w.dims()?;
    check_len("frozen_backward g", g.len(), t * n)?;
    check_len("frozen_backward gx", gx.len(), t * k)?;
    with_panel(w, scratch, |wd| {
        matmul(
            gx,
            k,
            View::new(g, t, n),
            View::new(wd, n, k),
            1.0,
            accumulate,
            true,
        );
        Ok(())
    })
}

fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(ModelError::Training {
            reason: format!("{what}: {got} values, expected {want}"),
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// LoRA
// ---------------------------------------------------------------------------------------------

/// Shapes of one LoRA pair: A `[r, in]`, B `[out, r]`, applied as `y += scale (x A^T) B^T`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraDims {
    /// Rank.
    pub r: usize,
    /// Input features.
    pub inp: usize,
    /// Output features.
    pub out: usize,
    /// `alpha / r`.
    pub scale: f32,
}

/// `u = x A^T` (`[t, r]`, saved for the backward) and `y += scale u B^T`.
pub fn lora_forward(
    d: LoraDims,
    x: &[f32],
    t: usize,
    a: &[f32],
    b: &[f32],
    u: &mut [f32],
    y: &mut [f32],
) {
    matmul(
        u,
        d.r,
        View::new(x, t, d.inp),
        View::new(a, d.r, d.inp).t(),
        1.0,
        false,
        true,
    );
    matmul(
        y,
        d.out,
        View::new(u, t, d.r),
        View::new(b, d.out, d.r).t(),
        d.scale,
        true,
        true,
    );
}

/// The backward of [`lora_forward`] for the output gradient `gy` (`[t, out]`): accumulates
/// `ga += (scale gy B)^T x` and `gb += scale gy^T u`, and writes `gx = scale gy B A` (`[t, in]`,
/// the LoRA path's share of the input gradient). `gu` is scratch of `t * r` values.
#[allow(clippy::too_many_arguments)]
pub fn lora_backward(
    d: LoraDims,
    x: &[f32],
    u: &[f32],
    gy: &[f32],
    t: usize,
    a: &[f32],
    b: &[f32],
    ga: &mut [f32],
    gb: &mut [f32],
    gu: &mut [f32],
    gx: &mut [f32],
) {
    // gb[out, r] += scale gy^T u
    matmul(
        gb,
        d.r,
        View::new(gy, t, d.out).t(),
        View::new(u, t, d.r),
        d.scale,
        true,
        true,
    );
    // gu[t, r] = scale gy B
    matmul(
        gu,
        d.r,
        View::new(gy, t, d.out),
        View::new(b, d.out, d.r),
        d.scale,
        false,
        true,
    );
    // ga[r, in] += gu^T x
    matmul(
        ga,
        d.inp,
        View::new(gu, t, d.r).t(),
        View::new(x, t, d.inp),
        1.0,
        true,
        true,
    );
    // gx[t, in] = gu A
    matmul(
        gx,
        d.inp,
        View::new(gu, t, d.r),
        View::new(a, d.r, d.inp),
        1.0,
        false,
        true,
    );
}

// ---------------------------------------------------------------------------------------------
// Dropout
// ---------------------------------------------------------------------------------------------

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Mixes several words into one seed (for per-step, per-layer, per-module dropout streams).
pub fn mix_seed(words: &[u64]) -> u64 {
    words
        .iter()
        .fold(0x5eed_u64, |acc, &w| splitmix64(acc ^ splitmix64(w)))
}

/// Which elements inverted dropout keeps, as a bitset. Element `i` is dropped when a 16-bit value
/// hashed from `(seed, i)` is below `p * 65536`, so a mask depends only on its seed and length,
/// never on threads.
#[derive(Debug, Clone)]
pub struct DropoutMask {
    bits: Vec<u64>,
    len: usize,
    /// `1 / (1 - p)`, applied to kept elements.
    pub scale: f32,
}

impl DropoutMask {
    /// A mask of `len` elements with drop probability `p` (in `[0, 1)`).
    pub fn new(seed: u64, len: usize, p: f32) -> Self {
        let threshold = (p.clamp(0.0, 1.0) * 65536.0).round() as u32;
        let mut bits = vec![0u64; len.div_ceil(64)];
        bits.par_chunks_mut(256).enumerate().for_each(|(c, words)| {
            for (j, w) in words.iter_mut().enumerate() {
                let word = (c * 256 + j) as u64;
                let mut out = 0u64;
                for q in 0..16u64 {
                    let h = splitmix64(seed ^ splitmix64(word * 16 + q));
                    for lane in 0..4 {
                        let v = ((h >> (16 * lane)) & 0xffff) as u32;
                        if v >= threshold {
                            out |= 1 << (q * 4 + lane);
                        }
                    }
                }
                *w = out;
            }
        });
        DropoutMask {
            bits,
            len,
            scale: 1.0 / (1.0 - p),
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a mask of no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether element `i` is kept.
    pub fn keep(&self, i: usize) -> bool {
        self.bits[i / 64] >> (i % 64) & 1 == 1
    }

    /// `out = mask(x) * scale` (also the backward: it is linear and self-adjoint).
    pub fn apply(&self, x: &[f32], out: &mut [f32]) {
        self.apply_impl(x, out, false);
    }

    /// `out += mask(x) * scale`.
    pub fn apply_add(&self, x: &[f32], out: &mut [f32]) {
        self.apply_impl(x, out, true);
    }

    fn apply_impl(&self, x: &[f32], out: &mut [f32], add: bool) {
        assert!(x.len() == self.len && out.len() == self.len);
        let scale = self.scale;
        // 64 elements per mask word, 64 words per task.
        out.par_chunks_mut(64 * 64)
            .zip(x.par_chunks(64 * 64))
            .zip(self.bits.par_chunks(64))
            .for_each(|((o, x), words)| {
                for ((o, x), &w) in o.chunks_mut(64).zip(x.chunks(64)).zip(words) {
                    for (b, (o, x)) in o.iter_mut().zip(x).enumerate() {
                        let keep = ((w >> b) & 1) as f32 * scale;
                        if add {
                            *o += x * keep;
                        } else {
                            *o = x * keep;
                        }
                    }
                }
            });
    }
}

// ---------------------------------------------------------------------------------------------
// RMSNorm
// ---------------------------------------------------------------------------------------------

/// `y = x / rms(x) * g` per row of `h` values; `inv[i]` receives `1 / sqrt(mean(x_i^2) + eps)`.
pub fn rms_norm_forward(x: &[f32], g: &[f32], eps: f32, y: &mut [f32], inv: &mut [f32]) {
    let h = g.len();
    assert!(x.len() == y.len() && x.len() == inv.len() * h);
    y.par_chunks_mut(h)
        .zip(x.par_chunks(h))
        .zip(inv.par_iter_mut())
        .for_each(|((y, x), inv)| {
            let ss: f32 = x.iter().map(|v| v * v).sum();
            let r = 1.0 / (ss / h as f32 + eps).sqrt();
            *inv = r;
            for ((y, x), g) in y.iter_mut().zip(x).zip(g) {
                *y = x * r * g;
            }
        });
}

/// The input gradient of [`rms_norm_forward`]:
/// `gx = r g gy - r^3 / h * x * sum(g gy x)`, written or (with `accumulate`) added.
pub fn rms_norm_backward(
    x: &[f32],
    g: &[f32],
    inv: &[f32],
    gy: &[f32],
    gx: &mut [f32],
    accumulate: bool,
) {
    let h = g.len();
    assert!(x.len() == gy.len() && x.len() == gx.len() && x.len() == inv.len() * h);
    gx.par_chunks_mut(h)
        .zip(x.par_chunks(h).zip(gy.par_chunks(h)))
        .zip(inv.par_iter())
        .for_each(|((gx, (x, gy)), &r)| {
            let dot: f32 = x.iter().zip(gy).zip(g).map(|((x, gy), g)| x * gy * g).sum();
            let c = r * r * r * dot / h as f32;
            for ((gx, x), (gy, g)) in gx.iter_mut().zip(x).zip(gy.iter().zip(g)) {
                let v = r * g * gy - c * x;
                if accumulate {
                    *gx += v;
                } else {
                    *gx = v;
                }
            }
        });
}

// ---------------------------------------------------------------------------------------------
// RoPE
// ---------------------------------------------------------------------------------------------

/// Rotary tables for the "rotate half" form, computed like the decoder's (f32 inverse
/// frequencies times f32 positions), so training and inference rotate identically.
#[derive(Debug, Clone)]
pub struct RopeTable {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
    positions: usize,
}

impl RopeTable {
    /// Tables for positions `0..positions` of heads of `head_dim` (even) values.
    pub fn new(head_dim: usize, theta: f64, positions: usize) -> Self {
        let half = head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| (1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)) as f32)
            .collect();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        RopeTable {
            cos,
            sin,
            half,
            positions,
        }
    }

    /// Number of positions covered.
    pub fn positions(&self) -> usize {
        self.positions
    }

    fn rotate(&self, x: &mut [f32], pos: &[usize], head_dim: usize, inverse: bool) {
        let half = self.half;
        assert!(head_dim == 2 * half && x.len() % pos.len().max(1) == 0);
        let row = if pos.is_empty() {
            0
        } else {
            x.len() / pos.len()
        };
        if row == 0 {
            return;
        }
        x.par_chunks_mut(row)
            .zip(pos.par_iter())
            .for_each(|(x, &p)| {
                let c = &self.cos[p * half..(p + 1) * half];
                let s = &self.sin[p * half..(p + 1) * half];
                for head in x.chunks_exact_mut(head_dim) {
                    let (lo, hi) = head.split_at_mut(half);
                    for i in 0..half {
                        let (a, b) = (lo[i], hi[i]);
                        let sn = if inverse { -s[i] } else { s[i] };
                        lo[i] = a * c[i] - b * sn;
                        hi[i] = b * c[i] + a * sn;
                    }
                }
            });
    }
}

/// Rotates every head of every row of `x` (`[t, heads * head_dim]`) in place by its token's
/// position `pos[row]`: `(a, b) -> (a cos - b sin, b cos + a sin)` on the pairs `(i, i + d/2)`.
pub fn rope_forward(x: &mut [f32], pos: &[usize], head_dim: usize, table: &RopeTable) {
    table.rotate(x, pos, head_dim, false);
}

/// The backward of [`rope_forward`] in place: the rotation by minus the angle (its transpose).
pub fn rope_backward(g: &mut [f32], pos: &[usize], head_dim: usize, table: &RopeTable) {
    table.rotate(g, pos, head_dim, true);
}

// ---------------------------------------------------------------------------------------------
// SiLU-gated MLP activation
// ---------------------------------------------------------------------------------------------

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_fast(-x))
}

/// `out = silu(g) * u`.
pub fn silu_mul_forward(g: &[f32], u: &[f32], out: &mut [f32]) {
    assert!(g.len() == u.len() && g.len() == out.len());
    out.par_chunks_mut(4096)
        .zip(g.par_chunks(4096).zip(u.par_chunks(4096)))
        .for_each(|(o, (g, u))| {
            for ((o, g), u) in o.iter_mut().zip(g).zip(u) {
                *o = g * sigmoid(*g) * u;
            }
        });
}

/// The backward of [`silu_mul_forward`]: `gg = go u silu'(g)`, `gu = go silu(g)`, with
/// `silu'(g) = s (1 + g (1 - s))`, `s = sigmoid(g)`.
pub fn silu_mul_backward(g: &[f32], u: &[f32], go: &[f32], gg: &mut [f32], gu: &mut [f32]) {
    assert!(g.len() == u.len() && g.len() == go.len() && g.len() == gg.len());
    assert!(g.len() == gu.len());
    gg.par_chunks_mut(4096)
        .zip(gu.par_chunks_mut(4096))
        .zip(
            g.par_chunks(4096)
                .zip(u.par_chunks(4096))
                .zip(go.par_chunks(4096)),
        )
        .for_each(|((gg, gu), ((g, u), go))| {
            for i in 0..g.len() {
                let s = sigmoid(g[i]);
                gg[i] = go[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                gu[i] = go[i] * g[i] * s;
            }
        });
}

// ---------------------------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------------------------

/// Head layout of an attention block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads; query head `h` reads kv head `h / (heads / kv_heads)`.
    pub kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
}

impl AttnShape {
    fn check(&self, t: usize, q: usize, k: usize, v: usize) -> Result<()> {
        check_len("attention q", q, t * self.heads * self.head_dim)?;
        check_len("attention k", k, t * self.kv_heads * self.head_dim)?;
        check_len("attention v", v, t * self.kv_heads * self.head_dim)?;
        if self.kv_heads == 0 || self.heads % self.kv_heads != 0 {
            return Err(ModelError::Training {
                reason: format!("{} heads over {} kv heads", self.heads, self.kv_heads),
            });
        }
        Ok(())
    }
}

/// Causal softmax probabilities of one head of one sequence from its scores `s` (`[len, len]`, in
/// place): row `i` covers keys `0..=i`. Returns the row log-sum-exps.
fn causal_softmax(s: &mut [f32], len: usize, lse: &mut [f32]) {
    for i in 0..len {
        let row = &mut s[i * len..(i + 1) * len];
        let m = row[..=i].iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut z = 0f32;
        for v in &mut row[..=i] {
            *v = exp_fast(*v - m);
            z += *v;
        }
        let inv = 1.0 / z;
        row[..=i].iter_mut().for_each(|v| *v *= inv);
        row[i + 1..].fill(0.0);
        lse[i] = m + z.ln();
    }
}

/// Causal attention over packed sequences: `q` is `[t, heads * d]` and `k`, `v` are
/// `[t, kv_heads * d]` (after RoPE), and the tokens of sequence `segs[n]` attend only within it.
/// Writes the output `[t, heads * d]` and the log-sum-exp of each row's scores `lse`
/// (`[t, heads]`) for the backward.
pub fn attention_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    segs: &[Range<usize>],
    shape: AttnShape,
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<()> {
    let t = out.len() / (shape.heads * shape.head_dim).max(1);
    shape.check(t, q.len(), k.len(), v.len())?;
    check_len("attention out", out.len(), t * shape.heads * shape.head_dim)?;
    check_len("attention lse", lse.len(), t * shape.heads)?;
    let (nh, hd) = (shape.heads, shape.head_dim);
    let rep = nh / shape.kv_heads;
    let (qs, ks) = (nh * hd, shape.kv_heads * hd);
    let scale = 1.0 / (hd as f32).sqrt();
    let tasks: Vec<(usize, usize)> = (0..segs.len())
        .flat_map(|s| (0..nh).map(move |h| (s, h)))
        .collect();
    let results: Vec<(Vec<f32>, Vec<f32>)> = tasks
        .par_iter()
        .map(|&(si, h)| {
            let seg = &segs[si];
            let len = seg.len();
            let kvh = h / rep;
            let qh = View::strided(&q[seg.start * qs + h * hd..], len, hd, qs);
            let kh = View::strided(&k[seg.start * ks + kvh * hd..], len, hd, ks);
            let vh = View::strided(&v[seg.start * ks + kvh * hd..], len, hd, ks);
            let mut s = vec![0f32; len * len];
            matmul(&mut s, len, qh, kh.t(), scale, false, false);
            let mut l = vec![0f32; len];
            causal_softmax(&mut s, len, &mut l);
            let mut o = vec![0f32; len * hd];
            matmul(&mut o, hd, View::new(&s, len, len), vh, 1.0, false, false);
            (o, l)
        })
        .collect();
    for (&(si, h), (o, l)) in tasks.iter().zip(results) {
        let seg = &segs[si];
        for i in 0..seg.len() {
            let row = (seg.start + i) * qs + h * hd;
            out[row..row + hd].copy_from_slice(&o[i * hd..(i + 1) * hd]);
            lse[(seg.start + i) * nh + h] = l[i];
        }
    }
    Ok(())
}

/// The gradients one backward task of [`attention_backward`] produces: the dq blocks of its query
/// heads, then the dk and dv blocks of its kv head.
type KvHeadGrads = (Vec<Vec<f32>>, Vec<f32>, Vec<f32>);

/// The backward of [`attention_forward`] given the output gradient `go`: writes `dq`, `dk`, `dv`.
/// Probabilities are recomputed from `q`, `k` and `lse`; `o` is the forward output.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    go: &[f32],
    segs: &[Range<usize>],
    shape: AttnShape,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) -> Result<()> {
    let t = q.len() / (shape.heads * shape.head_dim).max(1);
    shape.check(t, q.len(), k.len(), v.len())?;
    for (what, len, want) in [
        ("attention o", o.len(), q.len()),
        ("attention go", go.len(), q.len()),
        ("attention dq", dq.len(), q.len()),
        ("attention dk", dk.len(), k.len()),
        ("attention dv", dv.len(), v.len()),
        ("attention lse", lse.len(), t * shape.heads),
    ] {
        check_len(what, len, want)?;
    }
    let (nh, nkv, hd) = (shape.heads, shape.kv_heads, shape.head_dim);
    let rep = nh / nkv;
    let (qs, ks) = (nh * hd, nkv * hd);
    let scale = 1.0 / (hd as f32).sqrt();
    let tasks: Vec<(usize, usize)> = (0..segs.len())
        .flat_map(|s| (0..nkv).map(move |h| (s, h)))
        .collect();
    // Per task: the dq blocks of its `rep` query heads, then its dk and dv blocks.
    let results: Vec<KvHeadGrads> = tasks
        .par_iter()
        .map(|&(si, kvh)| {
            let seg = &segs[si];
            let len = seg.len();
            let kh = View::strided(&k[seg.start * ks + kvh * hd..], len, hd, ks);
            let vh = View::strided(&v[seg.start * ks + kvh * hd..], len, hd, ks);
            let mut dkh = vec![0f32; len * hd];
            let mut dvh = vec![0f32; len * hd];
            let mut dqs = Vec::with_capacity(rep);
            let mut p = vec![0f32; len * len];
            let mut dp = vec![0f32; len * len];
            for h in kvh * rep..(kvh + 1) * rep {
                let qh = View::strided(&q[seg.start * qs + h * hd..], len, hd, qs);
                let oh = View::strided(&o[seg.start * qs + h * hd..], len, hd, qs);
                let goh = View::strided(&go[seg.start * qs + h * hd..], len, hd, qs);
                matmul(&mut p, len, qh, kh.t(), scale, false, false);
                for i in 0..len {
                    let l = lse[(seg.start + i) * nh + h];
                    let row = &mut p[i * len..(i + 1) * len];
                    row[..=i].iter_mut().for_each(|s| *s = exp_fast(*s - l));
                    row[i + 1..].fill(0.0);
                }
                // dV += P^T dO
                matmul(
                    &mut dvh,
                    hd,
                    View::new(&p, len, len).t(),
                    goh,
                    1.0,
                    true,
                    false,
                );
                // dP = dO V^T
                matmul(&mut dp, len, goh, vh.t(), 1.0, false, false);
                // dS = P (dP - rowsum(dO o O))
                for i in 0..len {
                    let dsum: f32 = (0..hd)
                        .map(|d| goh.data[i * qs + d] * oh.data[i * qs + d])
                        .sum();
                    let pr = &p[i * len..(i + 1) * len];
                    let dr = &mut dp[i * len..(i + 1) * len];
                    for j in 0..len {
                        dr[j] = pr[j] * (dr[j] - dsum);
                    }
                }
                let ds = View::new(&dp, len, len);
                let mut dqh = vec![0f32; len * hd];
                matmul(&mut dqh, hd, ds, kh, scale, false, false);
                matmul(&mut dkh, hd, ds.t(), qh, scale, true, false);
                dqs.push(dqh);
            }
            (dqs, dkh, dvh)
        })
        .collect();
    for (&(si, kvh), (dqs, dkh, dvh)) in tasks.iter().zip(results) {
        let seg = &segs[si];
        for i in 0..seg.len() {
            let r = seg.start + i;
            for (j, dqh) in dqs.iter().enumerate() {
                let h = kvh * rep + j;
                dq[r * qs + h * hd..r * qs + (h + 1) * hd]
                    .copy_from_slice(&dqh[i * hd..(i + 1) * hd]);
            }
            dk[r * ks + kvh * hd..r * ks + (kvh + 1) * hd]
                .copy_from_slice(&dkh[i * hd..(i + 1) * hd]);
            dv[r * ks + kvh * hd..r * ks + (kvh + 1) * hd]
                .copy_from_slice(&dvh[i * hd..(i + 1) * hd]);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Fused lm head + cross-entropy
// ---------------------------------------------------------------------------------------------

/// Reusable buffers of [`cross_entropy_fused`] (one chunk of weights and logits, per-row state).
#[derive(Debug, Default)]
pub struct CeScratch {
    panel: Vec<f32>,
    logits: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
    tgt: Vec<f32>,
    wt: Vec<f32>,
}

/// `e^x` for `x` in about `[-87, 88]` (clamped outside), relative error below 3e-7: `x = n ln 2 + r`
/// with `n` an integer (Cody-Waite: `ln 2` in a short high part and a low part, so `r` is exact),
/// `e^r`, `|r| <= ln 2 / 2`, by its degree-7 Taylor polynomial, times `2^n` built in the exponent
/// bits. Branch-free, so loops over it vectorise, unlike libm's `expf`.
#[inline(always)]
pub fn exp_fast(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Vocabulary rows per chunk of [`cross_entropy_fused`] for `n` rows of hidden states: the chunk's
/// logits hold about 4 Mi values.
pub fn ce_chunk_rows(n: usize, vocab: usize) -> usize {
    ((4 << 20) / n.max(1)).clamp(256, 8192).min(vocab.max(1))
}

/// Cross-entropy of the logits `hidden W^T` (`hidden` `[n, h]`, `W` the frozen `[vocab, h]` head)
/// against `targets`, computed over the vocabulary in chunks of [`ce_chunk_rows`] rows with an
/// online log-sum-exp. Returns each row's loss `logsumexp(l) - l[target]`, and writes the gradient
/// of `sum_i weight * loss_i` with respect to `hidden` into `dhidden`:
/// `weight * (sum_v softmax(l)_v W_v - W_target)`, accumulated chunk by chunk with the same
/// rescaling as the log-sum-exp. Peak extra memory is one chunk of weights and logits.
pub fn cross_entropy_fused(
    hidden: &[f32],
    head: &Weight,
    targets: &[u32],
    weight: f32,
    dhidden: &mut [f32],
    scratch: &mut CeScratch,
) -> Result<Vec<f32>> {
    let (vocab, h) = head.dims()?;
    let n = targets.len();
    check_len("cross-entropy hidden", hidden.len(), n * h)?;
    check_len("cross-entropy dhidden", dhidden.len(), n * h)?;
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= vocab) {
        return Err(ModelError::Training {
            reason: format!("target id {bad} is outside the vocabulary of {vocab}"),
        });
    }
    if n == 0 {
        return Ok(Vec::new());
    }
    let vc = ce_chunk_rows(n, vocab);
    let CeScratch {
        panel,
        logits,
        max,
        sum,
        tgt,
        wt,
    } = scratch;
    for (v, len) in [
        (&mut *panel, vc * h),
        (&mut *logits, n * vc),
        (&mut *wt, n * h),
    ] {
        if v.len() < len {
            v.resize(len, 0.0);
        }
    }
    max.clear();
    max.resize(n, f32::NEG_INFINITY);
    sum.clear();
    sum.resize(n, 0.0);
    tgt.clear();
    tgt.resize(n, 0.0);
    let wt = &mut wt[..n * h];
    dhidden.fill(0.0);
    let mut v0 = 0;
    while v0 < vocab {
        let v1 = (v0 + vc).min(vocab);
        let c = v1 - v0;
        let panel = &mut panel[..c * h];
        dequantize_rows(head, v0..v1, panel)?;
        let logits = &mut logits[..n * c];
        matmul(
            logits,
            c,
            View::new(hidden, n, h),
            View::new(panel, c, h).t(),
            1.0,
            false,
            true,
        );
        let panel: &[f32] = panel;
        logits
            .par_chunks_mut(c)
            .zip(max.par_iter_mut().zip(sum.par_iter_mut()))
            .zip(tgt.par_iter_mut().zip(wt.par_chunks_mut(h)))
            .zip(dhidden.par_chunks_mut(h).zip(targets.par_iter()))
            .for_each(|(((row, (m, s)), (tl, wt)), (acc, &target))| {
                let target = target as usize;
                if (v0..v1).contains(&target) {
                    *tl = row[target - v0];
                    wt.copy_from_slice(&panel[(target - v0) * h..(target - v0 + 1) * h]);
                }
                let cm = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let nm = m.max(cm);
                let f = if *m == f32::NEG_INFINITY {
                    0.0
                } else {
                    (*m - nm).exp()
                };
                let mut cs = 0f32;
                for v in row.iter_mut() {
                    *v = exp_fast(*v - nm);
                    cs += *v;
                }
                *s = *s * f + cs;
                *m = nm;
                if f != 1.0 {
                    acc.iter_mut().for_each(|a| *a *= f);
                }
            });
        // acc += exp(l - m) W_chunk
        matmul(
            dhidden,
            h,
            View::new(logits, n, c),
            View::new(panel, c, h),
            1.0,
            true,
            true,
        );
        v0 = v1;
    }
    let losses: Vec<f32> = (0..n).map(|i| max[i] + sum[i].ln() - tgt[i]).collect();
    dhidden
        .par_chunks_mut(h)
        .zip(wt.par_chunks(h))
        .zip(sum.par_iter())
        .for_each(|((d, wt), &s)| {
            let inv = 1.0 / s;
            for (d, w) in d.iter_mut().zip(wt) {
                *d = weight * (*d * inv - w);
            }
        });
    Ok(losses)
}

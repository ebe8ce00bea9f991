//! Frozen base weights: `x W^T` and `g W` with `W` dequantized one panel at a time, never its
//! gradient.

use std::borrow::Cow;
use std::ops::Range;

use candle_core::quantized::{QStorage, QTensor};
use candle_core::Device;
use rayon::prelude::*;

use super::{check_len, matmul, View};
use crate::decoder::{with_f32, Weight};
use crate::error::{ModelError, Result};
use crate::kernels::{self, Format, BLOCK};

// Frozen base weights

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
        Weight::Dense(t) => with_f32(t, |s| {
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
            with_f32(&t, |s| {
                out.copy_from_slice(s);
                Ok(())
            })?;
        }
    }
    Ok(())
}

/// Dequantizes consecutive blocks `w` into `out` (`w.len() / block_bytes * block_elems` values)
/// with the arithmetic of [`kernels::dequant_block`] (`q * d + m` as a multiply then an add), so
/// the values equal [`Weight::dequantize`]'s bit for bit; Q4_1 and Q8_0 vectorised with AVX2
/// where the CPU has it.
pub fn dequant_blocks(fmt: Format, w: &[u8], out: &mut [f32]) {
    let (bb, be) = (fmt.block_bytes(), fmt.block_elems());
    assert!(w.len() % bb == 0 && out.len() == w.len() / bb * be);
    #[cfg(target_arch = "x86_64")]
    {
        if matches!(fmt, Format::Q4_1 | Format::Q8_0) && std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked above); lengths are checked above.
            unsafe { dequant_blocks_avx2(fmt, w, out) };
            return;
        }
    }
    for (b, chunk) in w.chunks_exact(bb).zip(out.chunks_exact_mut(be)) {
        kernels::dequant_block(fmt, b, chunk);
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
            _ => unreachable!("dequant_blocks calls this for Q4_1 and Q8_0 only"),
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
        Weight::Dense(t) => with_f32(t, f),
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

//! The lm head fused with softmax cross-entropy, over the vocabulary in chunks.

use rayon::prelude::*;

use super::{check_len, dequantize_rows, matmul, View};
use crate::decoder::Weight;
use crate::error::{ModelError, Result};

// Fused lm head + cross-entropy

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

//! Causal grouped-query softmax attention per packed sequence; the backward recomputes the
//! probabilities from the saved log-sum-exp.

use std::ops::Range;

use rayon::prelude::*;

use super::{check_len, exp_fast, matmul, View};
use crate::error::{ModelError, Result};

// Attention

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
    /// The attention shape of a model with config `cfg`.
    pub fn of(cfg: &crate::config::ModelConfig) -> Self {
        AttnShape {
            heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
        }
    }

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

/// Causal softmax probabilities of one head from its scores `s` (`[lse.len(), cols]`, in place):
/// row `i` is the query at position `pos + i` and covers keys `0..=pos + i` (training passes
/// `pos = 0` and a square `s`; inference, the positions already cached). Writes the row
/// log-sum-exps into `lse`.
pub fn causal_softmax(s: &mut [f32], cols: usize, pos: usize, lse: &mut [f32]) {
    for (i, row) in s.chunks_exact_mut(cols).take(lse.len()).enumerate() {
        let seen = pos + i + 1;
        let m = row[..seen]
            .iter()
            .cloned()
            .fold(f32::NEG_INFINITY, f32::max);
        let mut z = 0f32;
        for v in &mut row[..seen] {
            *v = exp_fast(*v - m);
            z += *v;
        }
        let inv = 1.0 / z;
        row[..seen].iter_mut().for_each(|v| *v *= inv);
        row[seen..].fill(0.0);
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
            causal_softmax(&mut s, len, 0, &mut l);
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

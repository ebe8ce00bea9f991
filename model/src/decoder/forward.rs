//! Inference: the decoder's forward pass on plain f32 rows, continuing a sequence whose keys and
//! values a [`Cache`] holds.
//!
//! ```text
//!  ids ─embed─▶ x ─┬─ per layer: rms_norm ─ q,k,v ─ rope ─ append k,v to the cache
//!                  │             attention over the cache ─ o ─ (+x)
//!                  │             rms_norm ─ gate,up ─ silu·up ─ down ─ (+x)
//!                  └─▶ hidden rows ─ final norm ─ head ─▶ logits of the last row
//! ```
//!
//! Decoding one token of the default model is about 200 matrix-vector products of 10-60 µs
//! and a few hundred tiny elementwise steps. Here those steps are plain loops on the calling
//! thread, and the products split their rows over [`crate::kernels::Pool`]'s spinning threads;
//! through candle each step was a tensor allocation and a rayon dispatch, which together cost
//! more than the products once two threads shared them (issue 15). Prompts of several tokens
//! use rayon as before: their products are large enough to share.

use candle_core::{Device, Tensor};

use super::{with_f32, Decoder, Layer, Linear};
use crate::error::{ModelError, Result};
use crate::train::ops::{
    add_into, causal_softmax, matmul, rms_norm_forward, rope_forward, silu_mul_forward, View,
};

/// Per-sequence attention state: every processed position's keys and values, per layer.
#[derive(Debug, Clone)]
pub struct Cache {
    /// Per layer, `[len, kv_heads * head_dim]` row-major.
    k: Vec<Vec<f32>>,
    /// As `k`.
    v: Vec<Vec<f32>>,
    len: usize,
}

impl Cache {
    /// Number of positions already processed.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets everything (and keeps the memory for the next sequence).
    pub fn reset(&mut self) {
        self.k
            .iter_mut()
            .chain(self.v.iter_mut())
            .for_each(Vec::clear);
        self.len = 0;
    }
}

impl Decoder {
    /// A fresh attention cache.
    pub fn new_cache(&self) -> Cache {
        let n = self.cfg.num_layers;
        Cache {
            k: vec![Vec::new(); n],
            v: vec![Vec::new(); n],
            len: 0,
        }
    }

    /// Runs `ids` (continuing the sequence in `cache`) and returns the logits of the last position,
    /// shape `[vocab]`.
    pub fn forward_last(&self, ids: &[u32], cache: &mut Cache) -> Result<Tensor> {
        let h = self.cfg.hidden_size;
        let x = self.forward_rows(ids, cache)?;
        let last = &x[x.len() - h..];
        let mut normed = vec![0f32; h];
        with_f32(&self.norm, |g| {
            rms_norm_forward(
                last,
                g,
                self.cfg.rms_norm_eps as f32,
                &mut normed,
                &mut [0.0],
            );
            Ok(())
        })?;
        let logits = self.head_weight().matmul_t_rows(&normed, 1)?;
        let vocab = logits.len();
        Ok(Tensor::from_vec(logits, vocab, &Device::Cpu)?)
    }

    /// Runs `ids` and returns the hidden states before the final norm, `[1, seq, hidden]`.
    pub fn forward_hidden(&self, ids: &[u32], cache: &mut Cache) -> Result<Tensor> {
        let x = self.forward_rows(ids, cache)?;
        Ok(Tensor::from_vec(
            x,
            (1, ids.len(), self.cfg.hidden_size),
            &Device::Cpu,
        )?)
    }

    /// The hidden states of `ids` before the final norm, `[seq, hidden]` row-major. `ids` must not
    /// be empty.
    fn forward_rows(&self, ids: &[u32], cache: &mut Cache) -> Result<Vec<f32>> {
        let seq = ids.len();
        let pos = cache.len;
        if seq == 0 {
            return Err(candle_core::Error::Msg("forward: no tokens".into()).into());
        }
        if pos + seq > self.max_positions() {
            return Err(ModelError::ContextFull {
                tokens: pos + seq,
                max: self.max_positions(),
            });
        }
        let mut x = self.embed.rows_vec(ids)?;
        let positions: Vec<usize> = (pos..pos + seq).collect();
        for (l, layer) in self.layers.iter().enumerate() {
            let done =
                self.layer_forward(layer, &mut x, &positions, &mut cache.k[l], &mut cache.v[l]);
            if let Err(e) = done {
                // Keep the cache as it was: layers before `l` already appended these positions.
                let row = self.cfg.num_kv_heads * self.cfg.head_dim;
                for c in cache.k.iter_mut().chain(cache.v.iter_mut()) {
                    c.truncate(pos * row);
                }
                return Err(e);
            }
        }
        cache.len += seq;
        Ok(x)
    }

    /// One layer on the rows `x` (in place), at `positions`, appending their keys and values.
    fn layer_forward(
        &self,
        layer: &Layer,
        x: &mut [f32],
        positions: &[usize],
        kc: &mut Vec<f32>,
        vc: &mut Vec<f32>,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let seq = positions.len();
        let eps = cfg.rms_norm_eps as f32;
        let mut h = vec![0f32; x.len()];
        let mut inv = vec![0f32; seq];

        with_f32(&layer.attn_norm, |g| {
            rms_norm_forward(x, g, eps, &mut h, &mut inv);
            Ok(())
        })?;
        let qkv = [&layer.q_proj, &layer.k_proj, &layer.v_proj];
        let [mut q, mut k, v]: [Vec<f32>; 3] = Linear::forward_rows_many(&qkv, &h, seq)?
            .try_into()
            .map_err(|_| candle_core::Error::Msg("q, k, v: three products".into()))?;
        rope_forward(&mut q, positions, cfg.head_dim, &self.rope);
        rope_forward(&mut k, positions, cfg.head_dim, &self.rope);
        kc.extend_from_slice(&k);
        vc.extend_from_slice(&v);
        let o = self.attention(&q, kc, vc, positions[0], seq);
        add_into(x, &layer.o_proj.forward_rows(&o, seq)?);

        with_f32(&layer.mlp_norm, |g| {
            rms_norm_forward(x, g, eps, &mut h, &mut inv);
            Ok(())
        })?;
        let gu = [&layer.gate_proj, &layer.up_proj];
        let [gate, up]: [Vec<f32>; 2] = Linear::forward_rows_many(&gu, &h, seq)?
            .try_into()
            .map_err(|_| candle_core::Error::Msg("gate, up: two products".into()))?;
        let mut act = vec![0f32; gate.len()];
        silu_mul_forward(&gate, &up, &mut act);
        add_into(x, &layer.down_proj.forward_rows(&act, seq)?);
        Ok(())
    }

    /// Causal grouped-query attention of the `seq` query rows `q` (`[seq, heads * d]`, at
    /// positions `pos..pos + seq`) over the cached keys and values of positions
    /// `0..pos + seq`. Returns `[seq, heads * d]`.
    fn attention(&self, q: &[f32], kc: &[f32], vc: &[f32], pos: usize, seq: usize) -> Vec<f32> {
        let cfg = &self.cfg;
        let (nh, hd) = (cfg.num_heads, cfg.head_dim);
        let rep = nh / cfg.num_kv_heads.max(1);
        let (qs, ks) = (nh * hd, cfg.num_kv_heads * hd);
        let total = pos + seq;
        let scale = 1.0 / (hd as f32).sqrt();
        // One head: scores of every query row against the keys it may see, softmax, values.
        let head = |hi: usize, out: &mut [f32]| {
            let kv = hi / rep;
            let mut s = vec![0f32; seq * total];
            if seq == 1 {
                // One query: plain dot products (a gemm call costs more than this work).
                let qrow = &q[hi * hd..(hi + 1) * hd];
                for (j, sj) in s.iter_mut().enumerate() {
                    let krow = &kc[j * ks + kv * hd..j * ks + (kv + 1) * hd];
                    *sj = dot(qrow, krow) * scale;
                }
            } else {
                let qh = View::strided(&q[hi * hd..], seq, hd, qs);
                let kh = View::strided(&kc[kv * hd..], total, hd, ks);
                matmul(&mut s, total, qh, kh.t(), scale, false, false);
            }
            causal_softmax(&mut s, total, pos, &mut vec![0f32; seq]);
            if seq == 1 {
                out.fill(0.0);
                for (j, &p) in s.iter().enumerate() {
                    let vrow = &vc[j * ks + kv * hd..j * ks + (kv + 1) * hd];
                    out.iter_mut().zip(vrow).for_each(|(o, v)| *o += p * v);
                }
            } else {
                let vh = View::strided(&vc[kv * hd..], total, hd, ks);
                matmul(out, hd, View::new(&s, seq, total), vh, 1.0, false, false);
            }
        };
        let mut per_head = vec![0f32; nh * seq * hd];
        if seq * total * nh * hd < 1 << 18 {
            per_head
                .chunks_exact_mut(seq * hd)
                .enumerate()
                .for_each(|(hi, out)| head(hi, out));
        } else {
            use rayon::prelude::*;
            per_head
                .par_chunks_exact_mut(seq * hd)
                .enumerate()
                .for_each(|(hi, out)| head(hi, out));
        }
        // [heads, seq, d] -> [seq, heads * d]
        let mut out = vec![0f32; seq * qs];
        for (hi, block) in per_head.chunks_exact(seq * hd).enumerate() {
            for (i, row) in block.chunks_exact(hd).enumerate() {
                out[i * qs + hi * hd..i * qs + (hi + 1) * hd].copy_from_slice(row);
            }
        }
        out
    }
}

/// `a . b` in eight lanes (so the loop vectorises), then the lanes in order.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

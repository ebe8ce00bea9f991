//! An independent f64 reference transformer, shared by `tests/decoder.rs` (logits) and
//! `tests/gradients.rs` (finite differences of the LoRA training loss).
//!
//! Written from the Hugging Face modelling code's equations (RMSNorm, rotate-half RoPE, GQA
//! attention with a causal mask, SiLU-gated MLP, optional q/k/v bias), with plain loops instead of
//! tensor ops. It shares no code with the candle decoder or with `train::ops`. Weights are matrices
//! under their Hugging Face names; a caller-supplied `extra` term (LoRA in the gradient tests) is
//! added to every linear module's output.

use std::collections::BTreeMap;

use anyhow::Result;
use hivemind_model::config::ModelConfig;
use hivemind_model::decoder::Decoder;
use hivemind_model::Module;

/// A matrix as (rows, cols, row-major f64); a vector is one row.
pub(crate) type Mat = (usize, usize, Vec<f64>);

/// Weights under Hugging Face names (`model.layers.0.self_attn.q_proj.weight`, ...).
pub(crate) type Weights = BTreeMap<String, Mat>;

/// `extra(layer, module, x, y)` adds a term to `y`, the output of `module` (`q_proj`, ...) of
/// `layer` for the input `x`.
pub(crate) type Extra<'a> = &'a dyn Fn(usize, &str, &[f64], &mut [f64]);

/// A 1-D or 2-D tensor as a [`Mat`].
pub(crate) fn mat(t: &candle_core::Tensor) -> Result<Mat> {
    let t = t.to_dtype(candle_core::DType::F64)?;
    match t.dims().len() {
        1 => {
            let v = t.to_vec1::<f64>()?;
            Ok((1, v.len(), v))
        }
        _ => {
            let (r, c) = t.dims2()?;
            Ok((r, c, t.flatten_all()?.to_vec1::<f64>()?))
        }
    }
}

/// Sum of `a[i] * b[i]`.
pub(crate) fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(a, b)| a * b).sum()
}

/// `m x` for `m` of shape `[r, c]`.
pub(crate) fn matvec(m: &Mat, x: &[f64]) -> Vec<f64> {
    let (r, c, w) = m;
    assert_eq!(*c, x.len());
    (0..*r).map(|i| dot(&w[i * c..(i + 1) * c], x)).collect()
}

/// `x / sqrt(mean(x^2) + eps) * g`.
pub(crate) fn rmsnorm(x: &[f64], g: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let s = 1.0 / (ms + eps).sqrt();
    x.iter().zip(g).map(|(v, g)| v * s * g).collect()
}

/// Rotate-half RoPE of one head `x` at position `pos`, in place.
pub(crate) fn rope(x: &mut [f64], pos: usize, theta: f64) {
    let d = x.len();
    let half = d / 2;
    for i in 0..half {
        let freq = 1.0 / theta.powf(2.0 * i as f64 / d as f64);
        let (s, c) = (pos as f64 * freq).sin_cos();
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * c - b * s;
        x[i + half] = b * c + a * s;
    }
}

/// The Hugging Face submodule a linear module lives in.
fn group(module: &str) -> &'static str {
    if ["q_proj", "k_proj", "v_proj", "o_proj"].contains(&module) {
        "self_attn"
    } else {
        "mlp"
    }
}

/// The weights a loaded decoder actually uses (dequantized), under HF names.
pub(crate) fn decoder_weights(d: &Decoder) -> Result<Weights> {
    let mut w = BTreeMap::new();
    w.insert(
        "model.embed_tokens.weight".into(),
        mat(&d.embed.dequantize()?)?,
    );
    w.insert("model.norm.weight".into(), mat(&d.norm)?);
    if let Some(h) = &d.lm_head {
        w.insert("lm_head.weight".into(), mat(&h.dequantize()?)?);
    }
    for (l, layer) in d.layers.iter().enumerate() {
        let p = format!("model.layers.{l}");
        for m in Module::ALL {
            let lin = layer.module(m);
            let name = format!("{p}.{}.{m}", group(m.as_str()));
            w.insert(format!("{name}.weight"), mat(&lin.weight.dequantize()?)?);
            if let Some(b) = &lin.bias {
                w.insert(format!("{name}.bias"), mat(b)?);
            }
        }
        w.insert(
            format!("{p}.input_layernorm.weight"),
            mat(&layer.attn_norm)?,
        );
        w.insert(
            format!("{p}.post_attention_layernorm.weight"),
            mat(&layer.mlp_norm)?,
        );
    }
    Ok(w)
}

/// The final-normed hidden state at every position of `ids` (one sequence, causal).
pub(crate) fn final_hidden(
    cfg: &ModelConfig,
    w: &Weights,
    ids: &[u32],
    extra: Extra,
) -> Vec<Vec<f64>> {
    let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
    let eps = cfg.rms_norm_eps;
    let emb = &w["model.embed_tokens.weight"];
    let mut xs: Vec<Vec<f64>> = ids
        .iter()
        .map(|&id| emb.2[id as usize * emb.1..(id as usize + 1) * emb.1].to_vec())
        .collect();
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        let norm = |n: &str| &w[&format!("{p}.{n}.weight")].2;
        let lin = |m: &str, x: &[f64]| {
            let name = format!("{p}.{}.{m}", group(m));
            let mut y = matvec(&w[&format!("{name}.weight")], x);
            if let Some(b) = w.get(&format!("{name}.bias")) {
                y.iter_mut().zip(&b.2).for_each(|(y, b)| *y += b);
            }
            extra(l, m, x, &mut y);
            y
        };
        let (mut qs, mut ks, mut vs) = (Vec::new(), Vec::new(), Vec::new());
        for (t, x) in xs.iter().enumerate() {
            let h = rmsnorm(x, norm("input_layernorm"), eps);
            let mut q = lin("q_proj", &h);
            let mut k = lin("k_proj", &h);
            q.chunks_mut(hd).for_each(|x| rope(x, t, cfg.rope_theta));
            k.chunks_mut(hd).for_each(|x| rope(x, t, cfg.rope_theta));
            qs.push(q);
            ks.push(k);
            vs.push(lin("v_proj", &h));
        }
        for t in 0..xs.len() {
            let mut att = vec![0.0; nh * hd];
            for h in 0..nh {
                let kvh = h / (nh / nkv);
                let q = &qs[t][h * hd..(h + 1) * hd];
                let scores: Vec<f64> = (0..=t)
                    .map(|s| dot(q, &ks[s][kvh * hd..(kvh + 1) * hd]) / (hd as f64).sqrt())
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (s, ps) in e.iter().enumerate() {
                    for d in 0..hd {
                        att[h * hd + d] += ps / z * vs[s][kvh * hd + d];
                    }
                }
            }
            let o = lin("o_proj", &att);
            xs[t].iter_mut().zip(&o).for_each(|(x, o)| *x += o);
            let h = rmsnorm(&xs[t], norm("post_attention_layernorm"), eps);
            let g = lin("gate_proj", &h);
            let u = lin("up_proj", &h);
            let a: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let d = lin("down_proj", &a);
            xs[t].iter_mut().zip(&d).for_each(|(x, d)| *x += d);
        }
    }
    xs.iter()
        .map(|x| rmsnorm(x, &w["model.norm.weight"].2, eps))
        .collect()
}

/// Logits of one final hidden state (`lm_head`, or the tied embedding).
pub(crate) fn head_logits(w: &Weights, hidden: &[f64]) -> Vec<f64> {
    let head = w
        .get("lm_head.weight")
        .unwrap_or(&w["model.embed_tokens.weight"]);
    matvec(head, hidden)
}

//! Gradients of the training ops and of a whole tiny model, against finite differences.
//!
//! Every reference here is written independently of `train_ops`: plain f64 loops straight from the
//! equations (RMSNorm, rotate-half RoPE, causal GQA softmax attention, SiLU gate, LoRA, softmax
//! cross-entropy). A scalar loss `L = sum_i c_i y_i` with random `c` turns each op into a function
//! whose gradient is the op's backward applied to `c`; the reference gradient is the central
//! difference `(L(x + e) - L(x - e)) / 2e` of the f64 reference, with `e = 1e-4` (f64 round-off is
//! about 1e-12 there, so the reference is exact to ~1e-8 relative).

mod common;

use std::ops::Range;

use anyhow::Result;
use hivemind_model::decoder::Weight;
use hivemind_model::train::ops::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use common::reference::{dot, rope};

const EPS: f64 = 1e-4;

fn rand_vec(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| rng.gen_range(-1.0f32..1.0) * scale)
        .collect()
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// Central differences of `f` at `x` for the coordinates `idx`.
fn fd(x: &[f64], idx: &[usize], f: &dyn Fn(&[f64]) -> f64) -> Vec<f64> {
    idx.iter()
        .map(|&i| {
            let mut p = x.to_vec();
            p[i] += EPS;
            let up = f(&p);
            p[i] -= 2.0 * EPS;
            let down = f(&p);
            (up - down) / (2.0 * EPS)
        })
        .collect()
}

/// Asserts `got[idx[j]] ~= want[j]` relative to the largest reference gradient.
fn assert_grad(what: &str, got: &[f32], idx: &[usize], want: &[f64], tol: f64) {
    let scale = want.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
    for (j, &i) in idx.iter().enumerate() {
        let g = got[i] as f64;
        assert!(
            (g - want[j]).abs() <= tol * scale,
            "{what}[{i}]: analytic {g}, finite difference {}, scale {scale}",
            want[j]
        );
    }
}

fn sample(rng: &mut StdRng, n: usize, k: usize) -> Vec<usize> {
    (0..k.min(n)).map(|_| rng.gen_range(0..n)).collect()
}

#[test]
fn matmul_handles_transposes_strides_and_accumulation() {
    let mut rng = StdRng::seed_from_u64(1);
    let (m, k, n) = (13, 37, 11);
    let a = rand_vec(&mut rng, m * k, 1.0);
    let bt = rand_vec(&mut rng, n * k, 1.0); // B^T stored [n, k]
    let mut dst = vec![0.5f32; m * (n + 3)];
    let before = dst.clone();
    matmul(
        &mut dst,
        n + 3,
        View::new(&a, m, k),
        View::new(&bt, n, k).t(),
        0.5,
        true,
        true,
    );
    for i in 0..m {
        for j in 0..n + 3 {
            let want = if j < n {
                before[i * (n + 3) + j] as f64
                    + 0.5
                        * (0..k)
                            .map(|p| a[i * k + p] as f64 * bt[j * k + p] as f64)
                            .sum::<f64>()
            } else {
                before[i * (n + 3) + j] as f64
            };
            let got = dst[i * (n + 3) + j] as f64;
            assert!((got - want).abs() < 1e-4, "({i},{j}) {got} vs {want}");
        }
    }
}

#[test]
fn dequantized_panels_equal_the_decoders_weights_bit_for_bit() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(2);
    for dtype in [
        candle_core::quantized::GgmlDType::Q4_1,
        candle_core::quantized::GgmlDType::Q8_0,
        candle_core::quantized::GgmlDType::Q4K,
    ] {
        let (rows, cols) = (40, 256);
        let t = candle_core::Tensor::from_vec(
            rand_vec(&mut rng, rows * cols, 1.0),
            (rows, cols),
            &candle_core::Device::Cpu,
        )?;
        let w = Weight::from_qtensor(candle_core::quantized::QTensor::quantize(&t, dtype)?)?;
        let full = w.dequantize()?.flatten_all()?.to_vec1::<f32>()?;
        for r in [0..rows, 3..17, 39..40] {
            let mut out = vec![0f32; r.len() * cols];
            dequantize_rows(&w, r.clone(), &mut out)?;
            for (j, v) in out.iter().enumerate() {
                assert_eq!(
                    v.to_bits(),
                    full[r.start * cols + j].to_bits(),
                    "{dtype:?} rows {r:?} index {j}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn frozen_linear_forward_and_backward_match_reference() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(3);
    let (t, n, k) = (9, 24, 64);
    let wt = candle_core::Tensor::from_vec(
        rand_vec(&mut rng, n * k, 1.0),
        (n, k),
        &candle_core::Device::Cpu,
    )?;
    let w = Weight::from_qtensor(candle_core::quantized::QTensor::quantize(
        &wt,
        candle_core::quantized::GgmlDType::Q4_1,
    )?)?;
    let wd = f64s(&w.dequantize()?.flatten_all()?.to_vec1::<f32>()?);
    let x = rand_vec(&mut rng, t * k, 1.0);
    let c = f64s(&rand_vec(&mut rng, t * n, 1.0));
    let mut scratch = Vec::new();
    let mut y = vec![0f32; t * n];
    frozen_forward(&w, &x, t, &mut y, &mut scratch)?;
    let reference = |x: &[f64]| -> Vec<f64> {
        (0..t * n)
            .map(|o| {
                let (i, j) = (o / n, o % n);
                dot(&x[i * k..(i + 1) * k], &wd[j * k..(j + 1) * k])
            })
            .collect()
    };
    let x64 = f64s(&x);
    for (g, w) in y.iter().zip(reference(&x64)) {
        assert!((*g as f64 - w).abs() < 1e-4 * (1.0 + w.abs()));
    }
    let c32: Vec<f32> = c.iter().map(|&v| v as f32).collect();
    let mut gx = vec![1.0f32; t * k];
    frozen_backward(&w, &c32, t, &mut gx, true, &mut scratch)?;
    let idx = sample(&mut rng, t * k, 40);
    let want = fd(&x64, &idx, &|x| dot(&reference(x), &c));
    let shifted: Vec<f32> = gx.iter().map(|g| g - 1.0).collect();
    assert_grad("frozen gx", &shifted, &idx, &want, 1e-4);
    Ok(())
}

#[test]
fn rms_norm_backward_matches_finite_differences() {
    let mut rng = StdRng::seed_from_u64(4);
    let (t, h, eps) = (5, 48, 1e-5f32);
    let x = rand_vec(&mut rng, t * h, 2.0);
    let g: Vec<f32> = rand_vec(&mut rng, h, 0.3).iter().map(|v| v + 1.0).collect();
    let c = f64s(&rand_vec(&mut rng, t * h, 1.0));
    let reference = |x: &[f64]| -> f64 {
        let mut l = 0.0;
        for i in 0..t {
            let row = &x[i * h..(i + 1) * h];
            let ms = row.iter().map(|v| v * v).sum::<f64>() / h as f64;
            let r = 1.0 / (ms + eps as f64).sqrt();
            for j in 0..h {
                l += c[i * h + j] * row[j] * r * g[j] as f64;
            }
        }
        l
    };
    let mut y = vec![0f32; t * h];
    let mut inv = vec![0f32; t];
    rms_norm_forward(&x, &g, eps, &mut y, &mut inv);
    let l32: f64 = y.iter().zip(&c).map(|(y, c)| *y as f64 * c).sum();
    assert!((l32 - reference(&f64s(&x))).abs() < 1e-4);
    let c32: Vec<f32> = c.iter().map(|&v| v as f32).collect();
    let mut gx = vec![0f32; t * h];
    rms_norm_backward(&x, &g, &inv, &c32, &mut gx, false);
    let idx: Vec<usize> = (0..t * h).collect();
    let want = fd(&f64s(&x), &idx, &reference);
    assert_grad("rmsnorm gx", &gx, &idx, &want, 1e-4);
}

#[test]
fn rope_matches_reference_and_its_backward_is_the_transpose() {
    let mut rng = StdRng::seed_from_u64(5);
    let (t, heads, hd, theta) = (7, 3, 16, 10_000.0);
    let pos: Vec<usize> = vec![0, 1, 2, 3, 0, 1, 30];
    let table = RopeTable::new(hd, theta, 64);
    let x = rand_vec(&mut rng, t * heads * hd, 1.0);
    let c = f64s(&rand_vec(&mut rng, t * heads * hd, 1.0));
    let reference = |x: &[f64]| -> Vec<f64> {
        let mut y = x.to_vec();
        for (i, row) in y.chunks_mut(heads * hd).enumerate() {
            for head in row.chunks_mut(hd) {
                rope(head, pos[i], theta);
            }
        }
        y
    };
    let mut y = x.clone();
    rope_forward(&mut y, &pos, hd, &table);
    for (a, b) in y.iter().zip(reference(&f64s(&x))) {
        assert!((*a as f64 - b).abs() < 1e-4, "{a} vs {b}");
    }
    let mut g: Vec<f32> = c.iter().map(|&v| v as f32).collect();
    rope_backward(&mut g, &pos, hd, &table);
    let idx: Vec<usize> = (0..t * heads * hd).collect();
    let want = fd(&f64s(&x), &idx, &|x| dot(&reference(x), &c));
    assert_grad("rope gx", &g, &idx, &want, 1e-4);
}

#[test]
fn silu_mul_backward_matches_finite_differences() {
    let mut rng = StdRng::seed_from_u64(6);
    let n = 300;
    let g = rand_vec(&mut rng, n, 4.0);
    let u = rand_vec(&mut rng, n, 2.0);
    let c = f64s(&rand_vec(&mut rng, n, 1.0));
    let reference = |gu: &[f64]| -> f64 {
        (0..n)
            .map(|i| {
                let (g, u) = (gu[i], gu[n + i]);
                c[i] * g / (1.0 + (-g).exp()) * u
            })
            .sum()
    };
    let mut out = vec![0f32; n];
    silu_mul_forward(&g, &u, &mut out);
    let l: f64 = out.iter().zip(&c).map(|(o, c)| *o as f64 * c).sum();
    let both: Vec<f64> = f64s(&g).into_iter().chain(f64s(&u)).collect();
    assert!((l - reference(&both)).abs() < 1e-3);
    let c32: Vec<f32> = c.iter().map(|&v| v as f32).collect();
    let (mut gg, mut gu) = (vec![0f32; n], vec![0f32; n]);
    silu_mul_backward(&g, &u, &c32, &mut gg, &mut gu);
    let idx: Vec<usize> = (0..2 * n).collect();
    let want = fd(&both, &idx, &reference);
    let got: Vec<f32> = gg.into_iter().chain(gu).collect();
    assert_grad("silu", &got, &idx, &want, 1e-4);
}

/// Naive causal GQA attention over packed sequences, f64.
fn attention_ref(q: &[f64], k: &[f64], v: &[f64], segs: &[Range<usize>], s: AttnShape) -> Vec<f64> {
    let (nh, nkv, hd) = (s.heads, s.kv_heads, s.head_dim);
    let t = q.len() / (nh * hd);
    let mut out = vec![0.0; t * nh * hd];
    for seg in segs {
        for i in seg.clone() {
            for h in 0..nh {
                let kvh = h / (nh / nkv);
                let qi = &q[i * nh * hd + h * hd..i * nh * hd + (h + 1) * hd];
                let scores: Vec<f64> = (seg.start..=i)
                    .map(|j| {
                        dot(
                            qi,
                            &k[j * nkv * hd + kvh * hd..j * nkv * hd + (kvh + 1) * hd],
                        ) / (hd as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (n, j) in (seg.start..=i).enumerate() {
                    for d in 0..hd {
                        out[i * nh * hd + h * hd + d] += e[n] / z * v[j * nkv * hd + kvh * hd + d];
                    }
                }
            }
        }
    }
    out
}

#[test]
fn attention_matches_reference_and_finite_differences() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(7);
    let shape = AttnShape {
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
    };
    let segs = vec![0..5, 5..6, 6..13];
    let t = 13;
    let (qn, kn) = (t * 4 * 8, t * 2 * 8);
    let q = rand_vec(&mut rng, qn, 1.5);
    let k = rand_vec(&mut rng, kn, 1.5);
    let v = rand_vec(&mut rng, kn, 1.0);
    let c = f64s(&rand_vec(&mut rng, qn, 1.0));
    let mut out = vec![0f32; qn];
    let mut lse = vec![0f32; t * 4];
    attention_forward(&q, &k, &v, &segs, shape, &mut out, &mut lse)?;
    let want_out = attention_ref(&f64s(&q), &f64s(&k), &f64s(&v), &segs, shape);
    for (a, b) in out.iter().zip(&want_out) {
        assert!((*a as f64 - b).abs() < 1e-5, "{a} vs {b}");
    }
    let c32: Vec<f32> = c.iter().map(|&v| v as f32).collect();
    let (mut dq, mut dk, mut dv) = (vec![0f32; qn], vec![0f32; kn], vec![0f32; kn]);
    attention_backward(
        &q, &k, &v, &out, &lse, &c32, &segs, shape, &mut dq, &mut dk, &mut dv,
    )?;
    let all: Vec<f64> = f64s(&q)
        .into_iter()
        .chain(f64s(&k))
        .chain(f64s(&v))
        .collect();
    let loss = |x: &[f64]| {
        dot(
            &attention_ref(&x[..qn], &x[qn..qn + kn], &x[qn + kn..], &segs, shape),
            &c,
        )
    };
    let idx: Vec<usize> = (0..qn + 2 * kn).collect();
    let want = fd(&all, &idx, &loss);
    let got: Vec<f32> = dq.into_iter().chain(dk).chain(dv).collect();
    assert_grad("attention", &got, &idx, &want, 1e-4);
    Ok(())
}

#[test]
fn lora_backward_matches_finite_differences() {
    let mut rng = StdRng::seed_from_u64(8);
    let d = LoraDims {
        r: 3,
        inp: 10,
        out: 7,
        scale: 2.0,
    };
    let t = 6;
    let x = rand_vec(&mut rng, t * d.inp, 1.0);
    let a = rand_vec(&mut rng, d.r * d.inp, 1.0);
    let b = rand_vec(&mut rng, d.out * d.r, 1.0);
    let c = f64s(&rand_vec(&mut rng, t * d.out, 1.0));
    let (nx, na) = (t * d.inp, d.r * d.inp);
    let reference = |p: &[f64]| -> f64 {
        let (x, a, b) = (&p[..nx], &p[nx..nx + na], &p[nx + na..]);
        let mut l = 0.0;
        for i in 0..t {
            let u: Vec<f64> = (0..d.r)
                .map(|j| {
                    dot(
                        &x[i * d.inp..(i + 1) * d.inp],
                        &a[j * d.inp..(j + 1) * d.inp],
                    )
                })
                .collect();
            for o in 0..d.out {
                l += c[i * d.out + o] * d.scale as f64 * dot(&u, &b[o * d.r..(o + 1) * d.r]);
            }
        }
        l
    };
    let mut u = vec![0f32; t * d.r];
    let mut y = vec![0f32; t * d.out];
    lora_forward(d, &x, t, &a, &b, &mut u, &mut y);
    let all: Vec<f64> = f64s(&x)
        .into_iter()
        .chain(f64s(&a))
        .chain(f64s(&b))
        .collect();
    let l: f64 = y.iter().zip(&c).map(|(y, c)| *y as f64 * c).sum();
    assert!((l - reference(&all)).abs() < 1e-4);
    let c32: Vec<f32> = c.iter().map(|&v| v as f32).collect();
    let (mut ga, mut gb) = (vec![0f32; na], vec![0f32; d.out * d.r]);
    let (mut gu, mut gx) = (vec![0f32; t * d.r], vec![0f32; nx]);
    lora_backward(
        d, &x, &u, &c32, t, &a, &b, &mut ga, &mut gb, &mut gu, &mut gx,
    );
    let idx: Vec<usize> = (0..all.len()).collect();
    let want = fd(&all, &idx, &reference);
    let got: Vec<f32> = gx.into_iter().chain(ga).chain(gb).collect();
    assert_grad("lora", &got, &idx, &want, 1e-4);
}

#[test]
fn fast_exp_is_accurate_to_a_few_ulps() {
    let mut worst = 0f64;
    for i in 0..=200_000 {
        let x = -87.0 + 100.0 * i as f64 / 200_000.0;
        let want = x.exp();
        let got = exp_fast(x as f32) as f64;
        // Compare against the exact exp of the f32 argument.
        let want32 = (x as f32 as f64).exp();
        worst = worst.max(((got - want32) / want32).abs());
        assert!(want > 0.0);
    }
    assert!(worst < 5e-7, "worst relative error {worst}");
    assert_eq!(exp_fast(0.0), 1.0);
}

#[test]
fn dropout_masks_are_reproducible_and_drop_about_p() {
    let m1 = DropoutMask::new(42, 100_000, 0.1);
    let m2 = DropoutMask::new(42, 100_000, 0.1);
    let m3 = DropoutMask::new(43, 100_000, 0.1);
    let kept = (0..m1.len()).filter(|&i| m1.keep(i)).count();
    assert!((88_500..91_500).contains(&kept), "kept {kept}");
    assert!((0..m1.len()).all(|i| m1.keep(i) == m2.keep(i)));
    assert!((0..m1.len()).any(|i| m1.keep(i) != m3.keep(i)));
    let x: Vec<f32> = (0..m1.len()).map(|i| i as f32).collect();
    let mut y = vec![0f32; x.len()];
    m1.apply(&x, &mut y);
    for i in 0..x.len() {
        let want = if m1.keep(i) { x[i] / 0.9 } else { 0.0 };
        assert!((y[i] - want).abs() <= 1e-6 * want.abs());
    }
    let none = DropoutMask::new(1, 1000, 0.0);
    assert!((0..1000).all(|i| none.keep(i)));
}

#[test]
fn fused_cross_entropy_matches_full_softmax_over_several_chunks() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(9);
    // A vocabulary larger than one chunk for this many rows, with a ragged last chunk.
    let (n, h) = (600, 32);
    let vocab = ce_chunk_rows(n, usize::MAX) * 2 + 77;
    let wt = candle_core::Tensor::from_vec(
        rand_vec(&mut rng, vocab * h, 1.0),
        (vocab, h),
        &candle_core::Device::Cpu,
    )?;
    let w = Weight::from_qtensor(candle_core::quantized::QTensor::quantize(
        &wt,
        candle_core::quantized::GgmlDType::Q8_0,
    )?)?;
    let wd = f64s(&w.dequantize()?.flatten_all()?.to_vec1::<f32>()?);
    let hidden = rand_vec(&mut rng, n * h, 1.0);
    let targets: Vec<u32> = (0..n).map(|_| rng.gen_range(0..vocab as u32)).collect();
    let reference = |x: &[f64], rows: Range<usize>| -> Vec<f64> {
        rows.map(|i| {
            let l: Vec<f64> = (0..vocab)
                .map(|v| dot(&x[i * h..(i + 1) * h], &wd[v * h..(v + 1) * h]))
                .collect();
            let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = l.iter().map(|v| (v - m).exp()).sum();
            m + z.ln() - l[targets[i] as usize]
        })
        .collect()
    };
    let weight = 0.25f32;
    let mut dh = vec![0f32; n * h];
    let mut scratch = CeScratch::default();
    // Twice through the same scratch: buffers sized by a first call must not leak into a second.
    cross_entropy_fused(
        &hidden[..h * 5],
        &w,
        &targets[..5],
        1.0,
        &mut dh[..h * 5],
        &mut scratch,
    )?;
    let losses = cross_entropy_fused(&hidden, &w, &targets, weight, &mut dh, &mut scratch)?;
    let h64 = f64s(&hidden);
    let want = reference(&h64, 0..n);
    for (a, b) in losses.iter().zip(&want) {
        assert!((*a as f64 - b).abs() < 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
    }
    // Finite differences of `weight * loss_i` for a few rows (each row's loss depends only on
    // its own hidden state).
    for i in [0usize, 17, n - 1] {
        let idx: Vec<usize> = (i * h..(i + 1) * h).collect();
        let f = |x: &[f64]| weight as f64 * reference(x, i..i + 1)[0];
        let want = fd(&h64, &idx, &f);
        assert_grad("cross-entropy", &dh, &idx, &want, 1e-3);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// A whole tiny model: every LoRA tensor of every layer against finite differences of an
// independent f64 transformer (tests/common/reference.rs, the reference of tests/decoder.rs, plus
// LoRA and the mean cross-entropy over target tokens), on the decoder's own dequantized weights.
// ---------------------------------------------------------------------------------------------

mod model_level {
    use super::*;
    use std::collections::BTreeMap;

    use hivemind_model::adapter::{AdapterConfig, LoraAdapter, LoraTensor, TargetModules};
    use hivemind_model::config::{Arch, ModelConfig};
    use hivemind_model::dataset::Example;
    use hivemind_model::decoder::Decoder;
    use hivemind_model::lora::peft_name;
    use hivemind_model::testing::TinyModel;
    use hivemind_model::train::{LoraSpec, Trainer};
    use hivemind_model::Module;
    use hivemind_model::{BaseModel, LoadOptions};

    use crate::common::reference::{self, Weights};

    /// The LoRA parameters flattened in the order of `names`, with their shapes.
    struct Lora {
        names: Vec<String>,
        shapes: Vec<(usize, usize)>,
        offsets: Vec<usize>,
        scale: f64,
    }

    impl Lora {
        fn get<'a>(&self, p: &'a [f64], name: &str) -> Option<(&'a [f64], usize, usize)> {
            let i = self.names.iter().position(|n| n == name)?;
            let (r, c) = self.shapes[i];
            Some((&p[self.offsets[i]..self.offsets[i] + r * c], r, c))
        }
    }

    /// Mean cross-entropy over target tokens, every sequence separately, in f64: the shared
    /// reference transformer with the LoRA term `scale * B (A x)` added to every adapted module.
    fn reference_loss(
        cfg: &ModelConfig,
        w: &Weights,
        lora: &Lora,
        p: &[f64],
        batch: &[Example],
    ) -> f64 {
        let add_lora = |l: usize, m: &str, x: &[f64], y: &mut [f64]| {
            let m: Module = m.parse().expect("a decoder module");
            if let (Some((a, r, c)), Some((b, o, _))) = (
                lora.get(p, &peft_name(l, m, "A")),
                lora.get(p, &peft_name(l, m, "B")),
            ) {
                let u: Vec<f64> = (0..r).map(|i| dot(&a[i * c..(i + 1) * c], x)).collect();
                for j in 0..o {
                    y[j] += lora.scale * dot(&b[j * r..(j + 1) * r], &u);
                }
            }
        };
        let mut total = 0.0;
        let mut count = 0usize;
        for ex in batch {
            let hidden = reference::final_hidden(cfg, w, &ex.ids, &add_lora);
            for i in 0..ex.ids.len().saturating_sub(1) {
                if !ex.targets[i + 1] {
                    continue;
                }
                let logits = reference::head_logits(w, &hidden[i]);
                let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = logits.iter().map(|v| (v - m).exp()).sum();
                total += m + z.ln() - logits[ex.ids[i + 1] as usize];
                count += 1;
            }
        }
        total / count as f64
    }

    fn load_tiny(arch: Arch, dir: &std::path::Path) -> Result<BaseModel> {
        let path = dir.join(format!("tiny-{}.gguf", arch.as_str()));
        TinyModel::new(arch, 11)?.write_gguf(&path)?;
        Ok(BaseModel::load(&path, &LoadOptions::default())?)
    }

    /// A random adapter on all seven modules with non-zero B (so every A has a gradient).
    fn random_adapter(d: &Decoder, r: usize, seed: u64) -> Result<LoraAdapter> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut tensors = BTreeMap::new();
        for (l, layer) in d.layers.iter().enumerate() {
            for m in Module::ALL {
                let (out, inp) = layer.module(m).weight.dims()?;
                for (which, shape) in [("A", [r, inp]), ("B", [out, r])] {
                    tensors.insert(
                        peft_name(l, m, which),
                        LoraTensor {
                            shape: shape.to_vec(),
                            data: rand_vec(&mut rng, shape[0] * shape[1], 0.3),
                        },
                    );
                }
            }
        }
        let cfg = AdapterConfig::new(
            r,
            2.0 * r as f64,
            TargetModules::from_names(Module::ALL.map(Module::as_str)),
        );
        Ok(LoraAdapter::new(cfg, tensors)?)
    }

    fn batch(vocab: u32) -> Vec<Example> {
        let mut rng = StdRng::seed_from_u64(5);
        [9usize, 6, 1]
            .iter()
            .map(|&len| {
                let ids: Vec<u32> = (0..len).map(|_| rng.gen_range(0..vocab)).collect();
                let targets: Vec<bool> = (0..len).map(|i| i >= 2 || (i == 1 && len < 8)).collect();
                Example { ids, targets }
            })
            .collect()
    }

    fn spec(r: usize) -> LoraSpec {
        LoraSpec {
            rank: r,
            alpha: 2.0 * r as f64,
            dropout: 0.0,
            target_modules: Module::ALL.to_vec(),
        }
    }

    fn dense_copy(d: &Decoder) -> Result<Decoder> {
        let mut out = d.clone();
        for layer in &mut out.layers {
            for m in Module::ALL {
                let lin = layer.module_mut(m);
                lin.weight = Weight::Dense(lin.weight.dequantize()?);
            }
        }
        out.embed = Weight::Dense(out.embed.dequantize()?);
        if let Some(h) = &out.lm_head {
            out.lm_head = Some(Weight::Dense(h.dequantize()?));
        }
        Ok(out)
    }

    fn check_arch(arch: Arch) -> Result<()> {
        let dir = tempfile::tempdir()?;
        let model = load_tiny(arch, dir.path())?;
        let d = &model.decoder;
        assert!(
            matches!(d.layers[0].q_proj.weight, Weight::Blocks(_)),
            "the base must stay quantized"
        );
        let r = 4;
        let adapter = random_adapter(d, r, 7)?;
        let batch = batch(d.cfg.vocab_size as u32);
        let refs: Vec<&Example> = batch.iter().collect();
        let targets: usize = batch.iter().map(Example::num_targets).sum();
        let mut trainer = Trainer::new(d, &spec(r), Some(&adapter), 1)?;
        let loss = trainer.accumulate(&refs, 1.0 / targets as f32)?;
        let grads = trainer.gradients();

        // The same parameters, flattened for the reference.
        let names: Vec<String> = adapter.tensors.keys().cloned().collect();
        let mut offsets = Vec::new();
        let mut shapes = Vec::new();
        let mut p = Vec::new();
        for n in &names {
            let t = &adapter.tensors[n];
            offsets.push(p.len());
            shapes.push((t.shape[0], t.shape[1]));
            p.extend(f64s(&t.data));
        }
        let lora = Lora {
            names: names.clone(),
            shapes,
            offsets: offsets.clone(),
            scale: 2.0,
        };
        let w = reference::decoder_weights(d)?;
        let want_loss = reference_loss(&d.cfg, &w, &lora, &p, &batch);
        assert!(
            (loss.mean() - want_loss).abs() < 1e-4 * want_loss.abs().max(1.0),
            "{arch:?} loss {} vs reference {want_loss}",
            loss.mean()
        );

        // Layer by layer, module by module: sampled entries of A and B.
        let mut rng = StdRng::seed_from_u64(3);
        for (n, name) in names.iter().enumerate() {
            let len = adapter.tensors[name].data.len();
            let local = sample(&mut rng, len, 6);
            let global: Vec<usize> = local.iter().map(|i| offsets[n] + i).collect();
            let f = |q: &[f64]| reference_loss(&d.cfg, &w, &lora, q, &batch);
            let want = fd(&p, &global, &f);
            // Tolerance relative to the tensor's largest sampled gradient, floored by the
            // largest gradient of the model (f32 forward and backward vs f64 differences).
            let got = &grads[name];
            let scale = want.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
            for (j, &i) in local.iter().enumerate() {
                assert!(
                    (got[i] as f64 - want[j]).abs() <= 2e-3 * scale,
                    "{arch:?} {name}[{i}]: analytic {}, finite difference {}",
                    got[i],
                    want[j]
                );
            }
        }

        // The same model with dense f32 weights (dequantized) gives the same gradients.
        let dense = dense_copy(d)?;
        let mut t2 = Trainer::new(&dense, &spec(r), Some(&adapter), 1)?;
        let loss2 = t2.accumulate(&refs, 1.0 / targets as f32)?;
        assert!((loss2.mean() - loss.mean()).abs() < 1e-6 * loss.mean().abs().max(1.0));
        for (name, g) in t2.gradients() {
            let q = &grads[&name];
            let scale = q.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            for (a, b) in g.iter().zip(q) {
                assert!(
                    (a - b).abs() <= 1e-5 * scale,
                    "{arch:?} dense vs quantized {name}"
                );
            }
        }

        // Gradients reach the first layer through every frozen quantized layer after it.
        for m in Module::ALL {
            for which in ["A", "B"] {
                let g = &grads[&peft_name(0, m, which)];
                assert!(
                    g.iter().any(|v| v.abs() > 1e-6),
                    "layer 0 {m} {which} has no gradient"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn tiny_llama_lora_gradients_match_finite_differences_layer_by_layer() -> Result<()> {
        check_arch(Arch::Llama)
    }

    #[test]
    fn tiny_qwen2_lora_gradients_match_finite_differences_layer_by_layer() -> Result<()> {
        check_arch(Arch::Qwen2)
    }

    /// The training forward is the inference forward: the trainer's loss on a batch equals the
    /// loss computed from `Decoder::forward_hidden` + `head` logits with the adapter applied.
    #[test]
    fn training_loss_equals_inference_decoder_loss_with_the_adapter() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let mut model = load_tiny(Arch::Qwen2, dir.path())?;
        let adapter = random_adapter(&model.decoder, 4, 9)?;
        let batch = batch(model.decoder.cfg.vocab_size as u32);
        let refs: Vec<&Example> = batch.iter().collect();
        let mut trainer = Trainer::new(&model.decoder, &spec(4), Some(&adapter), 1)?;
        let got = trainer.evaluate(&refs)?;
        model.decoder.apply_adapter(&adapter)?;
        let (mut total, mut n) = (0.0, 0);
        for ex in &batch {
            let mut cache = model.decoder.new_cache();
            let hidden = model.decoder.forward_hidden(&ex.ids, &mut cache)?;
            let logits = model.decoder.head(&hidden)?.squeeze(0)?;
            let logits: Vec<Vec<f32>> = logits.to_vec2()?;
            for i in 0..ex.ids.len().saturating_sub(1) {
                if ex.targets[i + 1] {
                    let l = f64s(&logits[i]);
                    let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = l.iter().map(|v| (v - m).exp()).sum();
                    total += m + z.ln() - l[ex.ids[i + 1] as usize];
                    n += 1;
                }
            }
        }
        let want = total / n as f64;
        assert_eq!(got.targets, n);
        assert!((got.mean() - want).abs() < 1e-4, "{} vs {want}", got.mean());
        Ok(())
    }
}

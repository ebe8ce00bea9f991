//! The SiLU-gated MLP activation `silu(g) * u` and its backward.

use rayon::prelude::*;

use super::{exp_fast, SERIAL};

// SiLU-gated MLP activation

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_fast(-x))
}

/// `out = silu(g) * u`.
pub fn silu_mul_forward(g: &[f32], u: &[f32], out: &mut [f32]) {
    assert!(g.len() == u.len() && g.len() == out.len());
    let chunk = |(o, (g, u)): (&mut [f32], (&[f32], &[f32]))| {
        for ((o, g), u) in o.iter_mut().zip(g).zip(u) {
            *o = g * sigmoid(*g) * u;
        }
    };
    if out.len() <= SERIAL {
        chunk((out, (g, u)));
    } else {
        out.par_chunks_mut(4096)
            .zip(g.par_chunks(4096).zip(u.par_chunks(4096)))
            .for_each(chunk);
    }
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

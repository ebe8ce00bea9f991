//! RMSNorm forward and backward.

use rayon::prelude::*;

use super::SERIAL;

// RMSNorm

/// `y = x / rms(x) * g` per row of `h` values; `inv[i]` receives `1 / sqrt(mean(x_i^2) + eps)`.
pub fn rms_norm_forward(x: &[f32], g: &[f32], eps: f32, y: &mut [f32], inv: &mut [f32]) {
    let h = g.len();
    assert!(x.len() == y.len() && x.len() == inv.len() * h);
    let row = |((y, x), inv): ((&mut [f32], &[f32]), &mut f32)| {
        let ss: f32 = x.iter().map(|v| v * v).sum();
        let r = 1.0 / (ss / h as f32 + eps).sqrt();
        *inv = r;
        for ((y, x), g) in y.iter_mut().zip(x).zip(g) {
            *y = x * r * g;
        }
    };
    if x.len() <= SERIAL {
        y.chunks_mut(h)
            .zip(x.chunks(h))
            .zip(inv.iter_mut())
            .for_each(row);
    } else {
        y.par_chunks_mut(h)
            .zip(x.par_chunks(h))
            .zip(inv.par_iter_mut())
            .for_each(row);
    }
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

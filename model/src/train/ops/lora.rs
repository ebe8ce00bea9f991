//! The LoRA term `s (x A^T) B^T` and its gradients.

use super::{matmul, View};

// LoRA

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
    // gu[t, r] = scale gy B, gx[t, in] = gu A
    lora_input_grad(d, gy, t, a, b, gu, gx);
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
}

/// The input gradient of a frozen LoRA pair: `gx = scale gy B A` (`[t, in]`), through the scratch
/// `gu = scale gy B` (`[t, r]`).
pub fn lora_input_grad(
    d: LoraDims,
    gy: &[f32],
    t: usize,
    a: &[f32],
    b: &[f32],
    gu: &mut [f32],
    gx: &mut [f32],
) {
    matmul(
        gu,
        d.r,
        View::new(gy, t, d.out),
        View::new(b, d.out, d.r),
        d.scale,
        false,
        true,
    );
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

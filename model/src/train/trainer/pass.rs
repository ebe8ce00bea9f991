//! One linear layer's forward and backward inside a pass (frozen weight, bias, LoRA with dropout),
//! and the small buffer helpers the passes share.

use rayon::prelude::*;

use crate::decoder::Decoder;
use crate::error::Result;
use crate::module::Module;
use crate::train::ops::{self, DropoutMask};

use super::{LayerParams, Slot, Work};

pub(super) fn tensor_vec(t: &candle_core::Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// `v[..n]`, growing `v` if needed: a buffer shared by several sizes is zeroed only when it grows.
pub(super) fn grow(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

pub(super) fn resize(v: &mut Vec<f32>, n: usize) {
    if v.len() != n {
        v.resize(n, 0.0);
    }
}

/// Shared, read-only context of one forward/backward pass.
pub(super) struct Pass<'a> {
    pub(super) dec: &'a Decoder,
    pub(super) layers: &'a [LayerParams],
    pub(super) t: usize,
}

impl Pass<'_> {
    /// `y = x W^T + bias + LoRA` for module `m` of layer `l`; saves the LoRA projection in `u`
    /// and the dropout mask (drawn from `drop`) in `mask`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn linear_forward(
        &self,
        l: usize,
        m: Module,
        slot: Option<&Slot>,
        drop: Option<(f32, u64)>,
        x: &[f32],
        y: &mut Vec<f32>,
        u: &mut Vec<f32>,
        mask: &mut Option<DropoutMask>,
        work_xd: &mut Vec<f32>,
        panel: &mut Vec<f32>,
    ) -> Result<()> {
        let lin = self.dec.layers[l].module(m);
        let (out, _) = lin.weight.dims()?;
        resize(y, self.t * out);
        ops::frozen_forward(&lin.weight, x, self.t, y, panel)?;
        if let Some(b) = &self.layers[l].bias[m.index()] {
            y.par_chunks_mut(out)
                .for_each(|row| row.iter_mut().zip(b).for_each(|(y, b)| *y += b));
        }
        if let Some(f) = &self.layers[l].frozen[m.index()] {
            // The panel buffer is free once the frozen matmul is done.
            let uf = grow(panel, self.t * f.dims.r);
            ops::lora_forward(f.dims, x, self.t, &f.a, &f.b, uf, y);
        }
        *mask = None;
        if let Some(s) = slot {
            resize(u, self.t * s.dims.r);
            let xin: &[f32] = match drop {
                Some((p, seed)) if p > 0.0 => {
                    let mk = DropoutMask::new(seed, x.len(), p);
                    let xd = grow(work_xd, x.len());
                    mk.apply(x, xd);
                    *mask = Some(mk);
                    xd
                }
                _ => x,
            };
            ops::lora_forward(s.dims, xin, self.t, &s.a, &s.b, u, y);
        }
        Ok(())
    }

    /// The backward of [`Pass::linear_forward`] for output gradient `gy`: accumulates the LoRA
    /// gradients and, with `need_gx`, writes (or adds, with `accumulate`) the input gradient.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn linear_backward(
        &self,
        l: usize,
        m: Module,
        slot: Option<&mut Slot>,
        x: &[f32],
        u: &[f32],
        mask: Option<&DropoutMask>,
        gy: &[f32],
        gx: &mut Vec<f32>,
        accumulate: bool,
        need_gx: bool,
        w: &mut Work,
    ) -> Result<()> {
        let lin = self.dec.layers[l].module(m);
        let (_, inp) = lin.weight.dims()?;
        if need_gx {
            resize(gx, self.t * inp);
            ops::frozen_backward(&lin.weight, gy, self.t, gx, accumulate, &mut w.panel)?;
            if let Some(f) = &self.layers[l].frozen[m.index()] {
                let gu = grow(&mut w.gu, self.t * f.dims.r);
                let glx = grow(&mut w.glx, self.t * inp);
                ops::lora_input_grad(f.dims, gy, self.t, &f.a, &f.b, gu, glx);
                ops::add_into(gx, glx);
            }
        }
        if let Some(s) = slot {
            let xin: &[f32] = match mask {
                Some(mk) => {
                    let xd = grow(&mut w.xd, x.len());
                    mk.apply(x, xd);
                    xd
                }
                None => x,
            };
            let gu = grow(&mut w.gu, self.t * s.dims.r);
            let glx = grow(&mut w.glx, self.t * inp);
            let Slot { a, b, ga, gb, .. } = s;
            ops::lora_backward(s.dims, xin, u, gy, self.t, a, b, ga, gb, gu, glx);
            if need_gx {
                match mask {
                    Some(mk) => mk.apply_add(glx, gx),
                    None => ops::add_into(gx, glx),
                }
            }
        }
        Ok(())
    }
}

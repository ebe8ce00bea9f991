//! The backward pass through every layer, in reverse, accumulating the LoRA gradients.

use crate::decoder::Decoder;
use crate::error::Result;
use crate::module::Module;
use crate::train::ops::{self, AttnShape};

use super::pass::{resize, Pass};
use super::{LayerParams, Packed, Trainer};

impl Trainer<'_> {
    /// Backward through all layers from the gradient in `work.gx`, accumulating LoRA gradients.
    pub(super) fn backward(&mut self, p: &Packed) -> Result<()> {
        let cfg = &self.dec.cfg;
        let t = p.ids.len();
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let shape = AttnShape::of(cfg);
        let eps = cfg.rms_norm_eps as f32;
        let Trainer {
            dec,
            slots,
            index,
            layers,
            rope,
            saved,
            work: w,
            ..
        } = self;
        let (dec, layers): (&Decoder, &[LayerParams]) = (*dec, layers);
        let pass = Pass { dec, layers, t };
        let mut gx = std::mem::take(&mut w.gx);
        for l in (0..dec.layers.len()).rev() {
            let s = &saved[l];
            let lp = &layers[l];
            let idx = index[l];
            // The backward of module `m` of this layer: input `x`, output gradient `gy`, input
            // gradient into `gx` (added to it when `acc`, skipped unless `need`). Each LoRA
            // slot is borrowed mutably by one module at a time.
            macro_rules! back {
                ($m:expr, $x:expr, $gy:expr, $gx:expr, $acc:expr, $need:expr) => {
                    pass.linear_backward(
                        l,
                        $m,
                        match idx[$m.index()] {
                            Some(i) => Some(&mut slots[i]),
                            None => None,
                        },
                        $x,
                        &s.u[$m.index()],
                        s.masks[$m.index()].as_ref(),
                        $gy,
                        $gx,
                        $acc,
                        $need,
                        w,
                    )?
                };
            }
            // MLP: recompute its input and activation.
            resize(&mut w.h, t * h);
            resize(&mut w.inv, t);
            ops::rms_norm_forward(&s.x_mid, &lp.mlp_norm, eps, &mut w.h, &mut w.inv);
            resize(&mut w.act, s.gate.len());
            ops::silu_mul_forward(&s.gate, &s.up, &mut w.act);
            let act = std::mem::take(&mut w.act);
            let mut g_act = std::mem::take(&mut w.g_act);
            back!(Module::DownProj, &act, &gx, &mut g_act, false, true);
            w.act = act;
            resize(&mut w.gg, g_act.len());
            resize(&mut w.gup, g_act.len());
            ops::silu_mul_backward(&s.gate, &s.up, &g_act, &mut w.gg, &mut w.gup);
            w.g_act = g_act;
            let hbuf = std::mem::take(&mut w.h);
            let (gg, gup) = (std::mem::take(&mut w.gg), std::mem::take(&mut w.gup));
            let mut gh = std::mem::take(&mut w.gh);
            back!(Module::GateProj, &hbuf, &gg, &mut gh, false, true);
            back!(Module::UpProj, &hbuf, &gup, &mut gh, true, true);
            (w.gg, w.gup) = (gg, gup);
            ops::rms_norm_backward(&s.x_mid, &lp.mlp_norm, &s.inv2, &gh, &mut gx, true);
            // Attention.
            let mut go = std::mem::take(&mut w.go);
            back!(Module::OProj, &s.o, &gx, &mut go, false, true);
            resize(&mut w.dq, s.q.len());
            resize(&mut w.dk, s.k.len());
            resize(&mut w.dv, s.v.len());
            ops::attention_backward(
                &s.q, &s.k, &s.v, &s.o, &s.lse, &go, &p.segs, shape, &mut w.dq, &mut w.dk,
                &mut w.dv,
            )?;
            w.go = go;
            ops::rope_backward(&mut w.dq, &p.pos, hd, rope);
            ops::rope_backward(&mut w.dk, &p.pos, hd, rope);
            let mut hbuf = hbuf;
            let mut inv = std::mem::take(&mut w.inv);
            ops::rms_norm_forward(&s.x_in, &lp.attn_norm, eps, &mut hbuf, &mut inv);
            w.inv = inv;
            // The embedding is frozen: the first layer needs no input gradient.
            let need = l > 0;
            let (dq, dk, dv) = (
                std::mem::take(&mut w.dq),
                std::mem::take(&mut w.dk),
                std::mem::take(&mut w.dv),
            );
            back!(Module::QProj, &hbuf, &dq, &mut gh, false, need);
            back!(Module::KProj, &hbuf, &dk, &mut gh, true, need);
            back!(Module::VProj, &hbuf, &dv, &mut gh, true, need);
            (w.dq, w.dk, w.dv) = (dq, dk, dv);
            if need {
                ops::rms_norm_backward(&s.x_in, &lp.attn_norm, &s.inv1, &gh, &mut gx, true);
            }
            w.h = hbuf;
            w.gh = gh;
        }
        w.gx = gx;
        Ok(())
    }
}

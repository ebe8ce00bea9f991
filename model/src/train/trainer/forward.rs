//! The forward pass through every layer (saving what the backward needs) and the loss head.

use crate::decoder::Decoder;
use crate::error::Result;
use crate::module::Module;
use crate::train::ops::{self, AttnShape};

use super::pass::{resize, tensor_vec, Pass};
use super::{BatchLoss, LayerParams, Packed, Trainer};

impl Trainer<'_> {
    /// Forward through all layers, saving what the backward needs; leaves the last hidden state
    /// in `work.x_final`.
    pub(super) fn forward(&mut self, p: &Packed, train: bool) -> Result<()> {
        let cfg = &self.dec.cfg;
        let t = p.ids.len();
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let shape = AttnShape::of(cfg);
        let eps = cfg.rms_norm_eps as f32;
        let dropout = self.spec.dropout as f32;
        let micro = self.micro;
        let seed = self.seed;
        let Trainer {
            dec,
            slots,
            index,
            layers,
            rope,
            saved,
            work,
            ..
        } = self;
        let (dec, layers): (&Decoder, &[LayerParams]) = (*dec, layers);
        let pass = Pass { dec, layers, t };
        let mut x = tensor_vec(&dec.embed.rows(&p.ids)?)?;
        for (l, s) in saved.iter_mut().enumerate() {
            let lp = &layers[l];
            let slot = |m: Module| index[l][m.index()].map(|i| &slots[i]);
            let drop = |m: Module| {
                (train && dropout > 0.0).then(|| {
                    let words = [seed, micro, l as u64, m.index() as u64];
                    (dropout, ops::mix_seed(&words))
                })
            };
            s.x_in.clear();
            s.x_in.extend_from_slice(&x);
            resize(&mut work.h, t * h);
            resize(&mut s.inv1, t);
            ops::rms_norm_forward(&x, &lp.attn_norm, eps, &mut work.h, &mut s.inv1);
            let [uq, uk, uv, uo, ug, uu, ud] = &mut s.u;
            let [mq, mk, mv, mo, mg, mu, md] = &mut s.masks;
            pass.linear_forward(
                l,
                Module::QProj,
                slot(Module::QProj),
                drop(Module::QProj),
                &work.h,
                &mut s.q,
                uq,
                mq,
                &mut work.xd,
                &mut work.panel,
            )?;
            pass.linear_forward(
                l,
                Module::KProj,
                slot(Module::KProj),
                drop(Module::KProj),
                &work.h,
                &mut s.k,
                uk,
                mk,
                &mut work.xd,
                &mut work.panel,
            )?;
            pass.linear_forward(
                l,
                Module::VProj,
                slot(Module::VProj),
                drop(Module::VProj),
                &work.h,
                &mut s.v,
                uv,
                mv,
                &mut work.xd,
                &mut work.panel,
            )?;
            ops::rope_forward(&mut s.q, &p.pos, hd, rope);
            ops::rope_forward(&mut s.k, &p.pos, hd, rope);
            resize(&mut s.o, t * shape.heads * hd);
            resize(&mut s.lse, t * shape.heads);
            ops::attention_forward(&s.q, &s.k, &s.v, &p.segs, shape, &mut s.o, &mut s.lse)?;
            pass.linear_forward(
                l,
                Module::OProj,
                slot(Module::OProj),
                drop(Module::OProj),
                &s.o,
                &mut work.tmp,
                uo,
                mo,
                &mut work.xd,
                &mut work.panel,
            )?;
            ops::add_into(&mut x, &work.tmp);
            s.x_mid.clear();
            s.x_mid.extend_from_slice(&x);
            resize(&mut s.inv2, t);
            ops::rms_norm_forward(&x, &lp.mlp_norm, eps, &mut work.h, &mut s.inv2);
            pass.linear_forward(
                l,
                Module::GateProj,
                slot(Module::GateProj),
                drop(Module::GateProj),
                &work.h,
                &mut s.gate,
                ug,
                mg,
                &mut work.xd,
                &mut work.panel,
            )?;
            pass.linear_forward(
                l,
                Module::UpProj,
                slot(Module::UpProj),
                drop(Module::UpProj),
                &work.h,
                &mut s.up,
                uu,
                mu,
                &mut work.xd,
                &mut work.panel,
            )?;
            resize(&mut work.act, s.gate.len());
            ops::silu_mul_forward(&s.gate, &s.up, &mut work.act);
            pass.linear_forward(
                l,
                Module::DownProj,
                slot(Module::DownProj),
                drop(Module::DownProj),
                &work.act,
                &mut work.tmp,
                ud,
                md,
                &mut work.xd,
                &mut work.panel,
            )?;
            ops::add_into(&mut x, &work.tmp);
        }
        work.x_final = x;
        Ok(())
    }

    /// Final norm and fused cross-entropy on the target rows. Returns the loss and leaves the
    /// gradient of `loss_weight * sum(loss)` with respect to the last hidden state in `work.gx`.
    pub(super) fn head(&mut self, p: &Packed, loss_weight: f32) -> Result<BatchLoss> {
        let cfg = &self.dec.cfg;
        let (t, h) = (p.ids.len(), cfg.hidden_size);
        let eps = cfg.rms_norm_eps as f32;
        let w = &mut self.work;
        resize(&mut w.h, t * h);
        resize(&mut w.inv_final, t);
        ops::rms_norm_forward(
            &w.x_final,
            &self.final_norm,
            eps,
            &mut w.h,
            &mut w.inv_final,
        );
        let n = p.rows.len();
        resize(&mut w.tmp, n * h);
        for (j, &r) in p.rows.iter().enumerate() {
            w.tmp[j * h..(j + 1) * h].copy_from_slice(&w.h[r * h..(r + 1) * h]);
        }
        resize(&mut w.gh, n * h);
        let head = self.dec.lm_head.as_ref().unwrap_or(&self.dec.embed);
        let losses =
            ops::cross_entropy_fused(&w.tmp, head, &p.targets, loss_weight, &mut w.gh, &mut w.ce)?;
        // Scatter the row gradients and back through the final norm.
        resize(&mut w.tmp, t * h);
        w.tmp.fill(0.0);
        for (j, &r) in p.rows.iter().enumerate() {
            w.tmp[r * h..(r + 1) * h].copy_from_slice(&w.gh[j * h..(j + 1) * h]);
        }
        resize(&mut w.gx, t * h);
        ops::rms_norm_backward(
            &w.x_final,
            &self.final_norm,
            &w.inv_final,
            &w.tmp,
            &mut w.gx,
            false,
        );
        Ok(BatchLoss {
            loss_sum: losses.iter().map(|&l| l as f64).sum(),
            targets: n,
            tokens: t,
        })
    }
}

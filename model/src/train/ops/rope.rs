//! Rotary position embeddings (rotate-half layout) and their backward.

use rayon::prelude::*;

use super::SERIAL;

// RoPE

/// Rotary tables for the "rotate half" form, computed like the decoder's (f32 inverse
/// frequencies times f32 positions), so training and inference rotate identically.
#[derive(Debug, Clone)]
pub struct RopeTable {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
    positions: usize,
}

impl RopeTable {
    /// Tables for positions `0..positions` of heads of `head_dim` (even) values.
    pub fn new(head_dim: usize, theta: f64, positions: usize) -> Self {
        let half = head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| (1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)) as f32)
            .collect();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        RopeTable {
            cos,
            sin,
            half,
            positions,
        }
    }

    /// Number of positions covered.
    pub fn positions(&self) -> usize {
        self.positions
    }

    fn rotate(&self, x: &mut [f32], pos: &[usize], head_dim: usize, inverse: bool) {
        let half = self.half;
        assert!(head_dim == 2 * half && x.len() % pos.len().max(1) == 0);
        let row = if pos.is_empty() {
            0
        } else {
            x.len() / pos.len()
        };
        if row == 0 {
            return;
        }
        let one = |(x, &p): (&mut [f32], &usize)| {
            let c = &self.cos[p * half..(p + 1) * half];
            let s = &self.sin[p * half..(p + 1) * half];
            for head in x.chunks_exact_mut(head_dim) {
                let (lo, hi) = head.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (lo[i], hi[i]);
                    let sn = if inverse { -s[i] } else { s[i] };
                    lo[i] = a * c[i] - b * sn;
                    hi[i] = b * c[i] + a * sn;
                }
            }
        };
        if x.len() <= SERIAL {
            x.chunks_mut(row).zip(pos).for_each(one);
        } else {
            x.par_chunks_mut(row).zip(pos.par_iter()).for_each(one);
        }
    }
}

/// Rotates every head of every row of `x` (`[t, heads * head_dim]`) in place by its token's
/// position `pos[row]`: `(a, b) -> (a cos - b sin, b cos + a sin)` on the pairs `(i, i + d/2)`.
pub fn rope_forward(x: &mut [f32], pos: &[usize], head_dim: usize, table: &RopeTable) {
    table.rotate(x, pos, head_dim, false);
}

/// The backward of [`rope_forward`] in place: the rotation by minus the angle (its transpose).
pub fn rope_backward(g: &mut [f32], pos: &[usize], head_dim: usize, table: &RopeTable) {
    table.rotate(g, pos, head_dim, true);
}

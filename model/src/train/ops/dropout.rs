//! Counter-based, reproducible dropout masks stored as bitsets, and the seed mixing they use.

use rayon::prelude::*;

// Dropout

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Mixes several words into one seed (for per-step, per-layer, per-module dropout streams).
pub fn mix_seed(words: &[u64]) -> u64 {
    words
        .iter()
        .fold(0x5eed_u64, |acc, &w| splitmix64(acc ^ splitmix64(w)))
}

/// Which elements inverted dropout keeps, as a bitset. Element `i` is dropped when a 16-bit value
/// hashed from `(seed, i)` is below `p * 65536`, so a mask depends only on its seed and length,
/// never on threads.
#[derive(Debug, Clone)]
pub struct DropoutMask {
    bits: Vec<u64>,
    len: usize,
    /// `1 / (1 - p)`, applied to kept elements.
    pub scale: f32,
}

impl DropoutMask {
    /// A mask of `len` elements with drop probability `p` (in `[0, 1)`).
    pub fn new(seed: u64, len: usize, p: f32) -> Self {
        let threshold = (p.clamp(0.0, 1.0) * 65536.0).round() as u32;
        let mut bits = vec![0u64; len.div_ceil(64)];
        bits.par_chunks_mut(256).enumerate().for_each(|(c, words)| {
            for (j, w) in words.iter_mut().enumerate() {
                let word = (c * 256 + j) as u64;
                let mut out = 0u64;
                for q in 0..16u64 {
                    let h = splitmix64(seed ^ splitmix64(word * 16 + q));
                    for lane in 0..4 {
                        let v = ((h >> (16 * lane)) & 0xffff) as u32;
                        if v >= threshold {
                            out |= 1 << (q * 4 + lane);
                        }
                    }
                }
                *w = out;
            }
        });
        DropoutMask {
            bits,
            len,
            scale: 1.0 / (1.0 - p),
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a mask of no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether element `i` is kept.
    pub fn keep(&self, i: usize) -> bool {
        self.bits[i / 64] >> (i % 64) & 1 == 1
    }

    /// `out = mask(x) * scale` (also the backward: it is linear and self-adjoint).
    pub fn apply(&self, x: &[f32], out: &mut [f32]) {
        self.apply_impl(x, out, false);
    }

    /// `out += mask(x) * scale`.
    pub fn apply_add(&self, x: &[f32], out: &mut [f32]) {
        self.apply_impl(x, out, true);
    }

    fn apply_impl(&self, x: &[f32], out: &mut [f32], add: bool) {
        assert!(x.len() == self.len && out.len() == self.len);
        let scale = self.scale;
        // 64 elements per mask word, 64 words per task.
        out.par_chunks_mut(64 * 64)
            .zip(x.par_chunks(64 * 64))
            .zip(self.bits.par_chunks(64))
            .for_each(|((o, x), words)| {
                for ((o, x), &w) in o.chunks_mut(64).zip(x.chunks(64)).zip(words) {
                    for (b, (o, x)) in o.iter_mut().zip(x).enumerate() {
                        let keep = ((w >> b) & 1) as f32 * scale;
                        if add {
                            *o += x * keep;
                        } else {
                            *o = x * keep;
                        }
                    }
                }
            });
    }
}

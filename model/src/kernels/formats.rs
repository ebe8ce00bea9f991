//! The GGUF block formats with a kernel here, decoded the scalar way: the reference for the SIMD
//! paths and for training's dequantization. Every value is computed with the same f32 operations,
//! in the same order, as ggml's own dequantization, so the dense weights are bit for bit what
//! llama.cpp (and candle) compute.
//!
//! Each block of 32 elements is read as a [`Chunk`]: element `i` is `scale * q[i] + offset`, with
//! `q` a small integer. The SIMD kernels use the same split, which lets them take integer dot
//! products with the activations.

use half::f16;

/// Elements per block of the 32-element formats (Q4_0, Q4_1, Q5_0, Q8_0); the K-quants have
/// super-blocks of [`super::kquants::SUPER`] ([`Format::block_elems`]).
pub const BLOCK: usize = 32;

/// Block formats with a fast kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `d: f16, 16 bytes of nibbles`: `x = d (q - 8)`; low nibbles are elements 0..16.
    Q4_0,
    /// `d: f16, m: f16, 16 bytes of nibbles`: `x = d q + m`; low nibbles are elements 0..16.
    Q4_1,
    /// `d: f16, qh: u32, 16 bytes of nibbles`: `x = d (q - 16)`, bit `i` of `qh` is the fifth
    /// bit of element `i`.
    Q5_0,
    /// `d: f16, 32 i8`: `x = d q`.
    Q8_0,
    /// Super-blocks of 256 with 6-bit scales and mins per 32 (see [`super::kquants`]).
    Q4K,
    /// Q4K plus a fifth bit per element.
    Q5K,
    /// Super-blocks of 256, 6-bit integers with an 8-bit scale per 16.
    Q6K,
}

impl Format {
    /// The formats with blocks of [`BLOCK`] elements.
    pub const SMALL: [Format; 4] = [Format::Q4_0, Format::Q4_1, Format::Q5_0, Format::Q8_0];

    /// The K-quants, with super-blocks of 256 elements.
    pub const K: [Format; 3] = [Format::Q4K, Format::Q5K, Format::Q6K];

    /// Bytes per block of [`Format::block_elems`] elements.
    pub const fn block_bytes(self) -> usize {
        match self {
            Format::Q4_0 => 18,
            Format::Q4_1 => 20,
            Format::Q5_0 => 22,
            Format::Q8_0 => 34,
            Format::Q4K => 144,
            Format::Q5K => 176,
            Format::Q6K => 210,
        }
    }

    /// Elements per block: [`BLOCK`], or 256 for the K-quants.
    pub const fn block_elems(self) -> usize {
        if self.is_k() {
            super::kquants::SUPER
        } else {
            BLOCK
        }
    }

    /// Whether this is a K-quant (super-blocks of 256, products on 8-bit activations).
    pub const fn is_k(self) -> bool {
        matches!(self, Format::Q4K | Format::Q5K | Format::Q6K)
    }

    /// The format of a GGUF tensor type, where it has a kernel here.
    pub fn of(dtype: candle_core::quantized::GgmlDType) -> Option<Format> {
        use candle_core::quantized::GgmlDType as T;
        Some(match dtype {
            T::Q4_0 => Format::Q4_0,
            T::Q4_1 => Format::Q4_1,
            T::Q5_0 => Format::Q5_0,
            T::Q8_0 => Format::Q8_0,
            T::Q4K => Format::Q4K,
            T::Q5K => Format::Q5K,
            T::Q6K => Format::Q6K,
            _ => return None,
        })
    }
}

#[inline]
pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// One block of 32 elements: `x[i] = scale * q[i] + offset`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Chunk {
    /// The integers.
    pub q: [i16; BLOCK],
    /// The scale.
    pub scale: f32,
    /// Added to every element (`m` of Q4_1, else 0).
    pub offset: f32,
}

impl Chunk {
    /// The 32 values, with ggml's operations: `scale * q`, then `+ offset` where there is one.
    pub fn values(&self, out: &mut [f32]) {
        for (i, o) in out[..BLOCK].iter_mut().enumerate() {
            let v = self.scale * self.q[i] as f32;
            *o = if self.offset == 0.0 {
                v
            } else {
                v + self.offset
            };
        }
    }
}

/// Block `b` (`b.len() >= fmt.block_bytes()`) of a 32-element format as a [`Chunk`].
///
/// # Panics
/// For a K-quant.
pub fn chunk(fmt: Format, b: &[u8]) -> Chunk {
    let mut q = [0i16; BLOCK];
    let (scale, offset) = match fmt {
        Format::Q4_0 => {
            for j in 0..16 {
                q[j] = (b[2 + j] & 0x0f) as i16 - 8;
                q[j + 16] = (b[2 + j] >> 4) as i16 - 8;
            }
            (f16_at(b, 0), 0.0)
        }
        Format::Q4_1 => {
            for j in 0..16 {
                q[j] = (b[4 + j] & 0x0f) as i16;
                q[j + 16] = (b[4 + j] >> 4) as i16;
            }
            (f16_at(b, 0), f16_at(b, 2))
        }
        Format::Q5_0 => {
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            for j in 0..16 {
                let h0 = ((qh >> j) & 1) as i16;
                let h1 = ((qh >> (j + 16)) & 1) as i16;
                q[j] = ((b[6 + j] & 0x0f) as i16 | (h0 << 4)) - 16;
                q[j + 16] = ((b[6 + j] >> 4) as i16 | (h1 << 4)) - 16;
            }
            (f16_at(b, 0), 0.0)
        }
        Format::Q8_0 => {
            for (j, v) in q.iter_mut().enumerate() {
                *v = b[2 + j] as i8 as i16;
            }
            (f16_at(b, 0), 0.0)
        }
        Format::Q4K | Format::Q5K | Format::Q6K => unreachable!("{fmt:?} has no 32-element chunks"),
    };
    Chunk { q, scale, offset }
}

/// Dequantizes one block into `out` (`out.len() >= fmt.block_elems()`), scalar.
pub fn dequant_block(fmt: Format, b: &[u8], out: &mut [f32]) {
    if fmt.is_k() {
        super::kquants::dequant(fmt, b, out);
    } else {
        chunk(fmt, b).values(out);
    }
}

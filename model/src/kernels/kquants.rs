//! The K-quants of llama.cpp's `Q4_K_M` / `Q5_K_M` files (Q4_K, Q5_K, Q6_K): super-blocks of 256
//! elements with a 6- or 8-bit scale per sub-block of 32 (Q4_K, Q5_K) or 16 (Q6_K).
//!
//! Products run on integers, as llama.cpp's do: an activation row is rounded to 8 bits with one
//! scale per 256 values ([`X8`]), each sub-block's integer dot product is exact, and each
//! super-block adds `dx * (d * sum_j sc_j dot_j - dmin * sum_j m_j sum_j(x))` in f32. The SIMD
//! path ([`super::avx2_k`]) computes the same integers and scales them into f32 vectors summed
//! across lanes once per row, so it equals the scalar path here up to f32 rounding.
//!
//! Layouts (ggml's `block_q4_K`, `block_q5_K`, `block_q6_K`), element `i` of a super-block:
//! - Q4_K, 144 bytes: `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`. Sub-block `j = i / 32`
//!   has a 6-bit scale `sc_j` and min `m_j` ([`scales_q4k`]); `q = qs[32 (i / 64) + i % 32]`, low
//!   nibble when `i % 64 < 32`, else high; `x = d sc_j q - dmin m_j`.
//! - Q5_K, 176 bytes: `d, dmin, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]`: Q4_K's nibble plus
//!   16 times bit `i / 32` of `qh[i % 32]`.
//! - Q6_K, 210 bytes: `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`. In half `h = i /
//!   128`, `e = i % 128`: the low 4 bits are nibble `e / 64` of `ql[64 h + e % 64]`, the high 2 bits
//!   are bits `2 (e / 32)` of `qh[32 h + e % 32]`; `x = d sc[i / 16] (q - 32)`.

use super::formats::f16_at;
use super::Format;

/// Elements per super-block.
pub const SUPER: usize = 256;

/// An activation row rounded to 8 bits: `x ~= d[b] * q`, one scale per [`SUPER`] values.
#[derive(Debug, Clone)]
pub struct X8 {
    /// The integers, `|q| <= 127`.
    pub q: Vec<i8>,
    /// Per super-block scale (`max |x| / 127`; 0 for a block of zeros or non-finite values).
    pub d: Vec<f32>,
    /// Sums of `q` over each 16 values.
    pub sums: Vec<i16>,
}

/// Rounds `x` (length a multiple of [`SUPER`]) to [`X8`]. The error is at most `max|x| / 254`
/// per element of a super-block (llama.cpp's `Q8_K` makes the same trade).
pub fn quantize_x8(x: &[f32]) -> X8 {
    let nb = x.len() / SUPER;
    let mut out = X8 {
        q: vec![0; nb * SUPER],
        d: vec![0.0; nb],
        sums: vec![0; nb * SUPER / 16],
    };
    for (b, xs) in x.chunks_exact(SUPER).enumerate() {
        let Some((d, inv)) = super::symmetric_scale(xs, 127.0) else {
            continue;
        };
        out.d[b] = d;
        let qs = &mut out.q[b * SUPER..(b + 1) * SUPER];
        for (q, v) in qs.iter_mut().zip(xs) {
            *q = (v * inv).round().clamp(-127.0, 127.0) as i8;
        }
        for (s, q16) in out.sums[b * 16..(b + 1) * 16]
            .iter_mut()
            .zip(qs.chunks_exact(16))
        {
            *s = q16.iter().map(|&q| q as i16).sum();
        }
    }
    out
}

/// The eight 6-bit scales and eight 6-bit mins of a Q4_K / Q5_K super-block (its 12 scale
/// bytes): sub-blocks 0..4 keep theirs in the low 6 bits of bytes 0..4 (scales) and 4..8
/// (mins); sub-blocks 4..8 have 4 low bits in bytes 8..12 (scale low nibble, min high nibble)
/// and 2 high bits in the top bits of bytes 0..4 (scales) and 4..8 (mins).
pub fn scales_q4k(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut mn) = ([0u8; 8], [0u8; 8]);
    for j in 0..4 {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0x0f) | ((s[j] >> 6) << 4);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
    (sc, mn)
}

/// The 256 small integers of a super-block, in element order: Q4_K 0..16, Q5_K 0..32, Q6_K
/// 0..64 (before the `- 32`). The one decoder of the layouts, for [`dequant`] and the scalar dot
/// product.
fn ints(fmt: Format, b: &[u8]) -> [u8; SUPER] {
    let mut q = [0u8; SUPER];
    match fmt {
        Format::Q4K | Format::Q5K => {
            let five = fmt == Format::Q5K;
            let qs = &b[if five { 48 } else { 16 }..][..128];
            let qh = &b[16..48];
            for (c, o) in q.chunks_exact_mut(64).enumerate() {
                let (lo, hi) = o.split_at_mut(32);
                for l in 0..32 {
                    let byte = qs[32 * c + l];
                    lo[l] = byte & 0x0f;
                    hi[l] = byte >> 4;
                    if five {
                        lo[l] |= ((qh[l] >> (2 * c)) & 1) << 4;
                        hi[l] |= ((qh[l] >> (2 * c + 1)) & 1) << 4;
                    }
                }
            }
        }
        Format::Q6K => {
            for (h, o) in q.chunks_exact_mut(128).enumerate() {
                let (ql, qh) = (&b[64 * h..][..64], &b[128 + 32 * h..][..32]);
                for l in 0..32 {
                    let high = |shift: u32| ((qh[l] >> shift) & 3) << 4;
                    o[l] = (ql[l] & 0x0f) | high(0);
                    o[l + 32] = (ql[l + 32] & 0x0f) | high(2);
                    o[l + 64] = (ql[l] >> 4) | high(4);
                    o[l + 96] = (ql[l + 32] >> 4) | high(6);
                }
            }
        }
        _ => unreachable!("{fmt:?} is not a K-quant"),
    }
    q
}

/// Dequantizes one super-block into `out[..256]` with ggml's f32 operations in ggml's order
/// (`(d * sc) * q - dmin * m`; Q6_K `(d * sc) * (q - 32)`), so the values equal llama.cpp's and
/// candle's bit for bit.
pub fn dequant(fmt: Format, b: &[u8], out: &mut [f32]) {
    let q = ints(fmt, b);
    let out = &mut out[..SUPER];
    match fmt {
        Format::Q4K | Format::Q5K => {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let (sc, mn) = scales_q4k(&b[4..16]);
            for (j, (o, q)) in out.chunks_exact_mut(32).zip(q.chunks_exact(32)).enumerate() {
                let (d1, m1) = (d * sc[j] as f32, dmin * mn[j] as f32);
                for (o, &q) in o.iter_mut().zip(q) {
                    *o = d1 * q as f32 - m1;
                }
            }
        }
        Format::Q6K => {
            let d = f16_at(b, 208);
            for (j, (o, q)) in out.chunks_exact_mut(16).zip(q.chunks_exact(16)).enumerate() {
                let d1 = d * b[192 + j] as i8 as f32;
                for (o, &q) in o.iter_mut().zip(q) {
                    *o = d1 * (q as i8 - 32) as f32;
                }
            }
        }
        _ => unreachable!("{fmt:?} is not a K-quant"),
    }
}

/// One super-block's contribution to a dot product, from its integer sums: `isum = sum_j sc_j
/// dot_j` (Q6_K: with the `- 32` applied) and `msum = sum_j m_j sum_j(x)` (0 for Q6_K).
#[inline(always)]
pub(super) fn finish(dx: f32, d: f32, dmin: f32, isum: i32, msum: i32) -> f32 {
    dx * (d * isum as f32 - dmin * msum as f32)
}

/// `W[r] . x` for one row `w` (`x.d.len()` super-blocks), the portable way.
fn dot_scalar(fmt: Format, w: &[u8], x: &X8) -> f32 {
    let bb = fmt.block_bytes();
    let mut acc = 0f32;
    for (sb, b) in w.chunks_exact(bb).enumerate().take(x.d.len()) {
        let xq = &x.q[sb * SUPER..(sb + 1) * SUPER];
        let sums = &x.sums[sb * 16..(sb + 1) * 16];
        let q = ints(fmt, b);
        let dot = |range: std::ops::Range<usize>| -> i32 {
            range.map(|i| q[i] as i32 * xq[i] as i32).sum()
        };
        let (isum, msum, d, dmin) = match fmt {
            Format::Q4K | Format::Q5K => {
                let (sc, mn) = scales_q4k(&b[4..16]);
                let mut isum = 0i32;
                let mut msum = 0i32;
                for j in 0..8 {
                    isum += sc[j] as i32 * dot(32 * j..32 * (j + 1));
                    msum += mn[j] as i32 * (sums[2 * j] as i32 + sums[2 * j + 1] as i32);
                }
                (isum, msum, f16_at(b, 0), f16_at(b, 2))
            }
            Format::Q6K => {
                let mut isum = 0i32;
                for j in 0..16 {
                    let sc = b[192 + j] as i8 as i32;
                    isum += sc * (dot(16 * j..16 * (j + 1)) - 32 * sums[j] as i32);
                }
                (isum, 0, f16_at(b, 208), 0.0)
            }
            _ => unreachable!("{fmt:?} is not a K-quant"),
        };
        acc += finish(x.d[sb], d, dmin, isum, msum);
    }
    acc
}

/// `y[r] = W[r] . x` for `r < rows`, `w` holding those rows (`k / 256` super-blocks each).
pub fn matvec(fmt: Format, w: &[u8], k: usize, x: &X8, rows: usize, y: &mut [f32]) {
    let rb = k / SUPER * fmt.block_bytes();
    assert!(
        rows.checked_mul(rb).is_some_and(|n| w.len() >= n) && x.q.len() >= k && y.len() >= rows
    );
    #[cfg(target_arch = "x86_64")]
    {
        if super::simd() {
            // SAFETY: the CPU has AVX2, FMA and F16C (checked); the lengths are asserted above.
            unsafe { super::avx2_k::matmul(fmt, w, k, &[x], 0..rows, y, rows) };
            return;
        }
    }
    matvec_scalar(fmt, w, k, x, rows, y)
}

/// The portable [`matvec`], for tests.
pub fn matvec_scalar(fmt: Format, w: &[u8], k: usize, x: &X8, rows: usize, y: &mut [f32]) {
    let rb = k / SUPER * fmt.block_bytes();
    for (r, yr) in y[..rows].iter_mut().enumerate() {
        *yr = dot_scalar(fmt, &w[r * rb..(r + 1) * rb], x);
    }
}

/// `y[t, r] = x[t] . W[r]` for `t < m`, `r` in `rows` ([`super::matmul_rows`]'s contract): each
/// row of `x` rounded once, then each weight super-block decoded once for several rows of `x`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_rows(
    fmt: Format,
    w: &[u8],
    k: usize,
    x: &[f32],
    m: usize,
    rows: std::ops::Range<usize>,
    y: &mut [f32],
    y_stride: usize,
) {
    let rb = k / SUPER * fmt.block_bytes();
    let xs: Vec<X8> = x[..m * k].chunks_exact(k).map(quantize_x8).collect();
    #[cfg(target_arch = "x86_64")]
    {
        if super::simd() {
            let refs: Vec<&X8> = xs.iter().collect();
            // SAFETY: the CPU has AVX2, FMA and F16C (checked); the kernel asserts the lengths
            // of `w` and `y` (each x row has k values).
            unsafe { super::avx2_k::matmul(fmt, w, k, &refs, rows, y, y_stride) };
            return;
        }
    }
    for r in rows {
        for (t, xt) in xs.iter().enumerate() {
            y[t * y_stride + r] = dot_scalar(fmt, &w[r * rb..(r + 1) * rb], xt);
        }
    }
}

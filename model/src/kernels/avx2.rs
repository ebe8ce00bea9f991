//! The AVX2/FMA kernels (x86_64).

use std::arch::x86_64::*;

use super::formats::f16_at;
use super::{Format, BLOCK};

/// Up to this many rows of `x` share one pass over the weights.
const TILE: usize = 8;

/// How far ahead of the block in use [`matvec_q`] prefetches its weights, in bytes.
const PREFETCH: usize = 1024;

/// The sum of the 8 lanes of `v`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn hsum(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps(v, 1);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Decodes the block at `b` into four vectors of 8 floats (elements 0..8, 8..16, 16..24, 24..32):
/// Q4_1 and Q8_0 with their own decoders, the rest through [`chunk_f32`].
///
/// # Safety
/// As [`chunk_i16`].
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn decode(fmt: Format, b: *const u8) -> [__m256; 4] {
    match fmt {
        Format::Q4_1 => {
            // SAFETY (caller): b points at a whole 20-byte block.
            let head = unsafe { std::slice::from_raw_parts(b, 4) };
            let d = _mm256_set1_ps(f16_at(head, 0));
            let m = _mm256_set1_ps(f16_at(head, 2));
            // SAFETY (caller): b points at a whole 20-byte block.
            let q = unsafe { _mm_loadu_si128(b.add(4) as *const __m128i) };
            let mask = _mm_set1_epi8(0x0f);
            let lo = _mm_and_si128(q, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
            let f = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
            [
                _mm256_fmadd_ps(f(lo), d, m),
                _mm256_fmadd_ps(f(_mm_srli_si128(lo, 8)), d, m),
                _mm256_fmadd_ps(f(hi), d, m),
                _mm256_fmadd_ps(f(_mm_srli_si128(hi, 8)), d, m),
            ]
        }
        Format::Q8_0 => {
            // SAFETY (caller): b points at a whole 34-byte block.
            let d = _mm256_set1_ps(f16_at(unsafe { std::slice::from_raw_parts(b, 2) }, 0));
            // SAFETY (caller): b points at a whole 34-byte block.
            let q = unsafe { _mm256_loadu_si256(b.add(2) as *const __m256i) };
            let lo = _mm256_castsi256_si128(q);
            let hi = _mm256_extracti128_si256(q, 1);
            let f = |v: __m128i| _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), d);
            [
                f(lo),
                f(_mm_srli_si128(lo, 8)),
                f(hi),
                f(_mm_srli_si128(hi, 8)),
            ]
        }
        // SAFETY (caller): as chunk_i16.
        _ => unsafe { chunk_f32(fmt, b) },
    }
}

/// `y[r] = W[r] . x` for one activation row, one weight row after the other: a single
/// sequential stream through the weights, which the hardware prefetcher follows best (four
/// interleaved rows ran at 0.6x the speed on weights that do not fit the cache). `x` comes as 16-bit integers with one scale per block ([`super::quantize_x16`]):
/// `madd_epi16` multiplies 16 pairs per instruction with exact integer products, so a block
/// costs about ten instructions instead of the seventeen of the f32 path; the Q4_1 offset term
/// `m sum(x)` uses the exact f32 block sums.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn matvec(
    fmt: Format,
    w: &[u8],
    k: usize,
    xq: &super::X16,
    rows: std::ops::Range<usize>,
    y: &mut [f32],
) {
    // SAFETY (all three): as this function's.
    match fmt {
        Format::Q4_1 => unsafe { matvec_q::<false>(w, k, xq, rows, y) },
        Format::Q8_0 => unsafe { matvec_q::<true>(w, k, xq, rows, y) },
        _ => unsafe { matvec_chunks(fmt, w, k, xq, rows, y) },
    }
}

/// [`matvec`] for Q4_1 (`Q8 = false`) or Q8_0 (`Q8 = true`): one loop per format, two
/// accumulators (even and odd blocks) so consecutive blocks do not wait on one FMA chain, and the
/// f16 scales converted by the CPU (F16C), exactly as `half` converts them.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn matvec_q<const Q8: bool>(
    w: &[u8],
    k: usize,
    xq: &super::X16,
    rows: std::ops::Range<usize>,
    y: &mut [f32],
) {
    let fmt = if Q8 { Format::Q8_0 } else { Format::Q4_1 };
    let nb = k / BLOCK;
    let bb = fmt.block_bytes();
    assert!(w.len() >= rows.end * nb * bb && xq.q.len() >= k && y.len() >= rows.end);
    assert!(xq.scale.len() >= nb && xq.sum.len() >= nb);
    let wp = w.as_ptr();
    let xp = xq.q.as_ptr();
    let nib = _mm256_set1_epi16(0x0f);
    // The integer dot product of block `b` of the row at `row`, its scale `d` and offset `m`.
    let block = |row: *const u8, b: usize| -> (__m256i, f32, f32) {
        // SAFETY: b * 32 + 32 <= k <= xq.q.len(); `row` holds nb whole blocks (the callers'
        // bounds, asserted above).
        unsafe {
            let p = xp.add(b * BLOCK) as *const __m256i;
            let (xa, xb) = (_mm256_loadu_si256(p), _mm256_loadu_si256(p.add(1)));
            let blk = row.add(b * bb);
            if Q8 {
                let head = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(
                    blk as *const u16,
                ) as i32));
                let q = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                let wa = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(q));
                let wb = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(q, 1));
                let dot = _mm256_add_epi32(_mm256_madd_epi16(wa, xa), _mm256_madd_epi16(wb, xb));
                (dot, _mm_cvtss_f32(head), 0.0)
            } else {
                let head = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(
                    blk as *const i32,
                )));
                let q = _mm_loadu_si128(blk.add(4) as *const __m128i);
                let w16 = _mm256_cvtepu8_epi16(q);
                let lo = _mm256_and_si256(w16, nib);
                let hi = _mm256_srli_epi16(w16, 4);
                let dot = _mm256_add_epi32(_mm256_madd_epi16(lo, xa), _mm256_madd_epi16(hi, xb));
                (
                    dot,
                    _mm_cvtss_f32(head),
                    _mm_cvtss_f32(_mm_movehdup_ps(head)),
                )
            }
        }
    };
    for r in rows {
        // SAFETY: (r + 1) * nb * bb <= w.len() by the assert above.
        let row = unsafe { wp.add(r * nb * bb) };
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let (mut m0, mut m1) = (0f32, 0f32);
        let mut b = 0;
        while b + 1 < nb {
            // The weights stream from memory: ask for them PREFETCH bytes ahead of use.
            _mm_prefetch(
                row.wrapping_add(b * bb + PREFETCH) as *const i8,
                _MM_HINT_T0,
            );
            let (dot0, d0, o0) = block(row, b);
            let (dot1, d1, o1) = block(row, b + 1);
            acc0 = _mm256_fmadd_ps(
                _mm256_set1_ps(d0 * xq.scale[b]),
                _mm256_cvtepi32_ps(dot0),
                acc0,
            );
            acc1 = _mm256_fmadd_ps(
                _mm256_set1_ps(d1 * xq.scale[b + 1]),
                _mm256_cvtepi32_ps(dot1),
                acc1,
            );
            if !Q8 {
                m0 += o0 * xq.sum[b];
                m1 += o1 * xq.sum[b + 1];
            }
            b += 2;
        }
        if b < nb {
            let (dot0, d0, o0) = block(row, b);
            acc0 = _mm256_fmadd_ps(
                _mm256_set1_ps(d0 * xq.scale[b]),
                _mm256_cvtepi32_ps(dot0),
                acc0,
            );
            if !Q8 {
                m0 += o0 * xq.sum[b];
            }
        }
        y[r] = unsafe { hsum(_mm256_add_ps(acc0, acc1)) } + (m0 + m1);
    }
}

#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn matmul_rows(
    fmt: Format,
    w: &[u8],
    k: usize,
    x: &[f32],
    m: usize,
    rows: std::ops::Range<usize>,
    y: &mut [f32],
    y_stride: usize,
) {
    let nb = k / BLOCK;
    let bb = fmt.block_bytes();
    assert!(w.len() >= rows.end * nb * bb && x.len() >= m * k);
    assert!(m == 0 || y.len() >= (m - 1) * y_stride + rows.end);
    let wp = w.as_ptr();
    let xp = x.as_ptr();
    let mut t0 = 0;
    while t0 < m {
        let tn = (m - t0).min(TILE);
        for r in rows.clone() {
            let mut acc = [_mm256_setzero_ps(); TILE];
            for b in 0..nb {
                // SAFETY: (r * nb + b + 1) * bb <= w.len() by the assert above.
                let v = unsafe { decode(fmt, wp.add((r * nb + b) * bb)) };
                for (t, a) in acc.iter_mut().enumerate().take(tn) {
                    // SAFETY: (t0 + t) * k + b * 32 + 32 <= m * k <= x.len().
                    let xr = unsafe { xp.add((t0 + t) * k + b * BLOCK) };
                    unsafe {
                        *a = _mm256_fmadd_ps(v[0], _mm256_loadu_ps(xr), *a);
                        *a = _mm256_fmadd_ps(v[1], _mm256_loadu_ps(xr.add(8)), *a);
                        *a = _mm256_fmadd_ps(v[2], _mm256_loadu_ps(xr.add(16)), *a);
                        *a = _mm256_fmadd_ps(v[3], _mm256_loadu_ps(xr.add(24)), *a);
                    }
                }
            }
            for (t, a) in acc.iter().enumerate().take(tn) {
                y[(t0 + t) * y_stride + r] = unsafe { hsum(*a) };
            }
        }
        t0 += tn;
    }
}

/// The block at `b` as 16-bit integers (elements 0..16, 16..32) with its scale: the
/// SIMD twin of [`super::formats::chunk`] for the formats without a decoder of their own (Q4_1
/// and Q8_0 have theirs: [`matvec_q`], [`decode`]).
///
/// # Safety
/// The CPU has AVX2; `b` points at a whole block of `fmt`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn chunk_i16(fmt: Format, b: *const u8) -> (__m256i, __m256i, f32) {
    let nib = _mm_set1_epi8(0x0f);
    // SAFETY (caller): `b` points at a whole block, so every read below stays inside it.
    unsafe {
        let head = std::slice::from_raw_parts(b, fmt.block_bytes());
        match fmt {
            Format::Q4_0 => {
                let q = _mm_loadu_si128(b.add(2) as *const __m128i);
                let lo = _mm256_cvtepu8_epi16(_mm_and_si128(q, nib));
                let hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(q, 4), nib));
                let eight = _mm256_set1_epi16(8);
                (
                    _mm256_sub_epi16(lo, eight),
                    _mm256_sub_epi16(hi, eight),
                    f16_at(head, 0),
                )
            }
            Format::Q5_0 => {
                let qh = u32::from_le_bytes([head[2], head[3], head[4], head[5]]);
                let high = bits_to_bytes(qh, 0x10);
                let q = _mm_loadu_si128(b.add(6) as *const __m128i);
                let lo = _mm_or_si128(_mm_and_si128(q, nib), _mm256_castsi256_si128(high));
                let hi = _mm_or_si128(
                    _mm_and_si128(_mm_srli_epi16(q, 4), nib),
                    _mm256_extracti128_si256(high, 1),
                );
                let sixteen = _mm256_set1_epi16(16);
                let d = f16_at(head, 0);
                (
                    _mm256_sub_epi16(_mm256_cvtepu8_epi16(lo), sixteen),
                    _mm256_sub_epi16(_mm256_cvtepu8_epi16(hi), sixteen),
                    d,
                )
            }
            Format::Q4_1 | Format::Q8_0 => unreachable!("{fmt:?} has a decoder of its own"),
            Format::Q4K | Format::Q5K | Format::Q6K => {
                unreachable!("{fmt:?} has kernels in avx2_k")
            }
        }
    }
}

/// 32 bytes, byte `i` equal to `value` where bit `i` of `bits` is set, else 0.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn bits_to_bytes(bits: u32, value: i8) -> __m256i {
    let v = _mm256_set1_epi32(bits as i32);
    // Byte i takes byte i / 8 of `bits` (each 128-bit lane holds all four).
    let spread = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, //
        2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
    );
    let mask = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(v, spread), mask), mask);
    _mm256_and_si256(set, _mm256_set1_epi8(value))
}

/// [`matvec`] for Q4_0 and Q5_0, through [`chunk_i16`] (no offset term: their blocks are
/// `d q`).
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn matvec_chunks(
    fmt: Format,
    w: &[u8],
    k: usize,
    xq: &super::X16,
    rows: std::ops::Range<usize>,
    y: &mut [f32],
) {
    let nb = k / BLOCK;
    let bb = fmt.block_bytes();
    assert!(w.len() >= rows.end * nb * bb && xq.q.len() >= k && y.len() >= rows.end);
    assert!(xq.scale.len() >= nb);
    let wp = w.as_ptr();
    let xp = xq.q.as_ptr();
    for r in rows {
        let mut acc = _mm256_setzero_ps();
        for b in 0..nb {
            // SAFETY: (r * nb + b + 1) * bb <= w.len() by the assert above.
            let blk = unsafe { wp.add((r * nb + b) * bb) };
            // SAFETY: blk is a whole block.
            let (qa, qb, d) = unsafe { chunk_i16(fmt, blk) };
            // SAFETY: b * 32 + 32 <= k <= xq.q.len().
            let (xa, xb) = unsafe {
                let p = xp.add(b * BLOCK) as *const __m256i;
                (_mm256_loadu_si256(p), _mm256_loadu_si256(p.add(1)))
            };
            let (da, db) = (_mm256_madd_epi16(qa, xa), _mm256_madd_epi16(qb, xb));
            let dot = _mm256_cvtepi32_ps(_mm256_add_epi32(da, db));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d * xq.scale[b]), dot, acc);
        }
        y[r] = unsafe { hsum(acc) };
    }
}

/// The block at `b` as four vectors of 8 floats.
///
/// # Safety
/// As [`chunk_i16`].
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn chunk_f32(fmt: Format, b: *const u8) -> [__m256; 4] {
    // SAFETY (caller): as chunk_i16.
    let (qa, qb, d) = unsafe { chunk_i16(fmt, b) };
    let f = |v: __m128i| {
        _mm256_mul_ps(
            _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(v)),
            _mm256_set1_ps(d),
        )
    };
    [
        f(_mm256_castsi256_si128(qa)),
        f(_mm256_extracti128_si256(qa, 1)),
        f(_mm256_castsi256_si128(qb)),
        f(_mm256_extracti128_si256(qb, 1)),
    ]
}

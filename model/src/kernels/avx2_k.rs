//! The AVX2 K-quant dot products (x86_64): [`super::kquants`]'s integer sums with `maddubs`
//! (unsigned weight bytes times signed activation bytes, 32 products per instruction) and
//! `madd` (times the sub-block scales), then, as llama.cpp's do, each super-block's integer
//! sums scaled into f32 vectors that are summed across lanes once per row. The integers equal
//! the scalar path's; the f32 sums differ from its by rounding only.

use std::arch::x86_64::*;

use super::kquants::{SUPER, X8};
use super::Format;

/// How far ahead of the super-block in use the weights are prefetched, in bytes. On the 7B
/// decode, 1 KiB ahead (what the 32-element kernels use) streamed the weights at 15 GiB/s, 128-512
/// bytes or none at 21-23 (`profile_decode`, 2 threads).
const PREFETCH: usize = 256;

/// `y[t * y_stride + r] = W[r] . x_t` for every row `x_t` of `xs` and `r` in `rows`: up to
/// [`TILE`] rows of `x` share each decoded weight super-block (one row is the decode case).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `w` holds at least `rows.end` rows of `k / 256` super-blocks
/// of `fmt`, every `xs[t]` at least `k` values (asserted, as is `y`'s length).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn matmul(
    fmt: Format,
    w: &[u8],
    k: usize,
    xs: &[&X8],
    rows: std::ops::Range<usize>,
    y: &mut [f32],
    y_stride: usize,
) {
    let nb = k / SUPER;
    let bb = fmt.block_bytes();
    assert!(rows.end.checked_mul(nb * bb).is_some_and(|n| w.len() >= n));
    assert!(xs
        .iter()
        .all(|x| x.q.len() >= nb * SUPER && x.d.len() >= nb && x.sums.len() >= nb * 16));
    assert!(
        xs.is_empty()
            || (xs.len() - 1)
                .checked_mul(y_stride)
                .and_then(|n| n.checked_add(rows.end))
                .is_some_and(|n| y.len() >= n)
    );
    for (i, tile) in xs.chunks(TILE).enumerate() {
        let t0 = i * TILE;
        // SAFETY: as this function's (the lengths are asserted above).
        unsafe {
            match tile.len() {
                1 => rows_tile::<1>(fmt, w, nb, tile, rows.clone(), y, t0, y_stride),
                2 => rows_tile::<2>(fmt, w, nb, tile, rows.clone(), y, t0, y_stride),
                3 => rows_tile::<3>(fmt, w, nb, tile, rows.clone(), y, t0, y_stride),
                _ => rows_tile::<4>(fmt, w, nb, tile, rows.clone(), y, t0, y_stride),
            }
        }
    }
}

/// Up to this many activation rows share a decoded super-block.
pub(super) const TILE: usize = 4;

/// `d` and `dmin` of a Q4_K / Q5_K super-block (its first 4 bytes), converted by the CPU.
///
/// # Safety
/// `b` points at 4 readable bytes; the CPU has F16C.
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn d_dmin(b: *const u8) -> (f32, f32) {
    // SAFETY (caller): 4 bytes at b.
    let h = _mm_cvtph_ps(_mm_cvtsi32_si128(unsafe {
        std::ptr::read_unaligned(b as *const i32)
    }));
    (_mm_cvtss_f32(h), _mm_cvtss_f32(_mm_movehdup_ps(h)))
}

/// [`matmul`] for one tile of exactly `T` rows of `x`, written to rows `t0..t0 + T` of `y`.
/// Each row's sum is kept in one f32 vector across super-blocks (`d dx` times the integer sums,
/// minus `dmin dx` times the min sums) and summed across lanes once per row.
///
/// # Safety
/// As [`matmul`]'s, for the rows of the tile.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_tile<const T: usize>(
    fmt: Format,
    w: &[u8],
    nb: usize,
    xs: &[&X8],
    rows: std::ops::Range<usize>,
    y: &mut [f32],
    t0: usize,
    y_stride: usize,
) {
    let bb = fmt.block_bytes();
    for r in rows {
        let mut acc = [_mm256_setzero_ps(); T];
        for sb in 0..nb {
            // SAFETY: super-block `sb` of row `r` lies inside `w`, and super-block `sb` of every
            // x row inside it (the caller's bounds).
            unsafe {
                let b = w.as_ptr().add((r * nb + sb) * bb);
                _mm_prefetch(b.wrapping_add(PREFETCH) as *const i8, _MM_HINT_T0);
                let xq: [*const i8; T] = std::array::from_fn(|t| xs[t].q.as_ptr().add(sb * SUPER));
                let sums: [*const i16; T] =
                    std::array::from_fn(|t| xs[t].sums.as_ptr().add(sb * 16));
                match fmt {
                    Format::Q4K | Format::Q5K => {
                        let (d, dmin) = d_dmin(b);
                        let (isum, msum) = q45k::<T>(fmt == Format::Q5K, b, &xq, &sums);
                        for t in 0..T {
                            let dx = xs[t].d[sb];
                            acc[t] = _mm256_fmadd_ps(
                                _mm256_set1_ps(d * dx),
                                _mm256_cvtepi32_ps(isum[t]),
                                acc[t],
                            );
                            // The mins' 4 lanes, zero-extended, folded into the same sum.
                            acc[t] = _mm256_fnmadd_ps(
                                _mm256_set1_ps(dmin * dx),
                                _mm256_cvtepi32_ps(_mm256_zextsi128_si256(msum[t])),
                                acc[t],
                            );
                        }
                    }
                    Format::Q6K => {
                        let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                            std::ptr::read_unaligned(b.add(208) as *const u16) as i32,
                        )));
                        let isum = q6k::<T>(b, &xq, &sums);
                        for t in 0..T {
                            acc[t] = _mm256_fmadd_ps(
                                _mm256_set1_ps(d * xs[t].d[sb]),
                                _mm256_cvtepi32_ps(isum[t]),
                                acc[t],
                            );
                        }
                    }
                    _ => unreachable!("{fmt:?} is not a K-quant"),
                }
            }
        }
        for (t, a) in acc.into_iter().enumerate() {
            // SAFETY: the CPU has AVX2 (this function's contract).
            y[(t0 + t) * y_stride + r] = unsafe { super::avx2::hsum(a) };
        }
    }
}

/// The 8 scales (bytes 0..8) and 8 mins (bytes 8..16) of a Q4_K / Q5_K super-block's 12 scale
/// bytes at `s`, unpacked four at a time ([`super::kquants::scales_q4k`]'s layout).
///
/// # Safety
/// `s` points at 12 readable bytes.
#[inline]
unsafe fn scales_mins(s: *const u8) -> [u32; 4] {
    // SAFETY (caller): 12 bytes at s.
    let [a, b, c] = unsafe { std::ptr::read_unaligned(s as *const [u32; 3]) }.map(u32::from_le);
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const LOW2: u32 = 0x0303_0303;
    [
        a & LOW6,
        (c & LOW4) | (((a >> 6) & LOW2) << 4),
        b & LOW6,
        ((c >> 4) & LOW4) | (((b >> 6) & LOW2) << 4),
    ]
}

/// `v` with bit `p` of each byte moved to bit 4 (other bits are garbage: mask with 0x10).
#[target_feature(enable = "avx2")]
#[inline]
fn bit_to_4(v: __m256i, p: usize) -> __m256i {
    match p {
        0 => _mm256_slli_epi16(v, 4),
        1 => _mm256_slli_epi16(v, 3),
        2 => _mm256_slli_epi16(v, 2),
        3 => _mm256_slli_epi16(v, 1),
        4 => v,
        5 => _mm256_srli_epi16(v, 1),
        6 => _mm256_srli_epi16(v, 2),
        _ => _mm256_srli_epi16(v, 3),
    }
}

/// A shuffle that copies 16-bit lane `i` of each 128-bit half to all eight lanes of that half.
#[target_feature(enable = "avx2")]
#[inline]
fn lane16(i: usize) -> __m256i {
    let lo = (2 * i) as i8;
    let pair = i16::from_le_bytes([lo as u8, (lo + 1) as u8]);
    _mm256_set1_epi16(pair)
}

/// Per row of `x`: the integer sums `sc_j dot_j` of one Q4_K (`five` false) or Q5_K super-block
/// (8 lanes, to be scaled by `d dx`), and `m_j sum_j(x)` (4 lanes, scaled by `dmin dx`).
///
/// # Safety
/// `b` points at a whole super-block, each `xq[t]` at 256 values, each `sums[t]` at 16.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn q45k<const T: usize>(
    five: bool,
    b: *const u8,
    xq: &[*const i8; T],
    sums: &[*const i16; T],
) -> ([__m256i; T], [__m128i; T]) {
    // SAFETY (caller): every read is inside the super-block, x's 256 values or its 16 sums.
    unsafe {
        let sm = scales_mins(b.add(4));
        let packed = _mm_setr_epi32(sm[0] as i32, sm[1] as i32, sm[2] as i32, sm[3] as i32);
        // 16 lanes: the 8 scales, then the 8 mins.
        let both = _mm256_cvtepu8_epi16(packed);
        let mins = _mm256_extracti128_si256(both, 1);
        let scales = _mm256_broadcastsi128_si256(_mm256_castsi256_si128(both));
        let mut msum = [_mm_setzero_si128(); T];
        for t in 0..T {
            let s16 = _mm256_loadu_si256(sums[t] as *const __m256i);
            let s32 = _mm_hadd_epi16(
                _mm256_castsi256_si128(s16),
                _mm256_extracti128_si256(s16, 1),
            );
            msum[t] = _mm_madd_epi16(mins, s32);
        }
        let nib = _mm256_set1_epi8(0x0f);
        let qs = b.add(if five { 48 } else { 16 });
        let qh = if five {
            _mm256_loadu_si256(b.add(16) as *const __m256i)
        } else {
            _mm256_setzero_si256()
        };
        let bit4 = _mm256_set1_epi8(0x10);
        let mut acc = [_mm256_setzero_si256(); T];
        for c in 0..4 {
            let q = _mm256_loadu_si256(qs.add(32 * c) as *const __m256i);
            let mut lo = _mm256_and_si256(q, nib);
            let mut hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), nib);
            if five {
                // Bit 2c of qh for the low nibbles, 2c + 1 for the high ones, as bit 4.
                lo = _mm256_or_si256(lo, _mm256_and_si256(bit_to_4(qh, 2 * c), bit4));
                hi = _mm256_or_si256(hi, _mm256_and_si256(bit_to_4(qh, 2 * c + 1), bit4));
            }
            let sl = _mm256_shuffle_epi8(scales, lane16(2 * c));
            let sh = _mm256_shuffle_epi8(scales, lane16(2 * c + 1));
            for t in 0..T {
                let xl = _mm256_loadu_si256(xq[t].add(64 * c) as *const __m256i);
                let xh = _mm256_loadu_si256(xq[t].add(64 * c + 32) as *const __m256i);
                let pl = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, xl), sl);
                let ph = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, xh), sh);
                acc[t] = _mm256_add_epi32(acc[t], _mm256_add_epi32(pl, ph));
            }
        }
        (acc, msum)
    }
}

/// Per row of `x`: the integer sums `sc_j (dot_j - 32 sum_j(x))` of one Q6_K super-block
/// (sub-blocks of 16; 8 lanes, to be scaled by `d dx`).
///
/// # Safety
/// As [`q45k`].
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn q6k<const T: usize>(
    b: *const u8,
    xq: &[*const i8; T],
    sums: &[*const i16; T],
) -> [__m256i; T] {
    // SAFETY (caller): every read is inside the super-block, x's 256 values or its 16 sums.
    unsafe {
        let sc8 = _mm_loadu_si128(b.add(192) as *const __m128i);
        // The `- 32` of every weight: 32 sum_j sc_j sum_j(x).
        let sc16 = _mm256_cvtepi8_epi16(sc8);
        let mut acc = [_mm256_setzero_si256(); T];
        for t in 0..T {
            let s16 = _mm256_loadu_si256(sums[t] as *const __m256i);
            acc[t] = _mm256_slli_epi32(_mm256_madd_epi16(sc16, s16), 5);
            acc[t] = _mm256_sub_epi32(_mm256_setzero_si256(), acc[t]);
        }
        let nib = _mm256_set1_epi8(0x0f);
        let low2 = _mm256_set1_epi8(3);
        let bits45 = _mm256_set1_epi8(0x30);
        for h in 0..2 {
            let ql0 = _mm256_loadu_si256(b.add(64 * h) as *const __m256i);
            let ql1 = _mm256_loadu_si256(b.add(64 * h + 32) as *const __m256i);
            let qh = _mm256_loadu_si256(b.add(128 + 32 * h) as *const __m256i);
            let qs = [
                _mm256_or_si256(
                    _mm256_and_si256(ql0, nib),
                    _mm256_slli_epi16(_mm256_and_si256(qh, low2), 4),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(ql1, nib),
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), low2), 4),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(ql0, 4), nib),
                    _mm256_and_si256(qh, bits45),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(ql1, 4), nib),
                    _mm256_and_si256(_mm256_srli_epi16(qh, 2), bits45),
                ),
            ];
            for (g, q) in qs.into_iter().enumerate() {
                // Scale j for elements 0..16 of the group, j + 1 for 16..32.
                let j = (8 * h + 2 * g) as i64;
                let pick =
                    _mm_set_epi64x((j + 1) * 0x0101_0101_0101_0101, j * 0x0101_0101_0101_0101);
                let s = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc8, pick));
                for t in 0..T {
                    let x = _mm256_loadu_si256(xq[t].add(128 * h + 32 * g) as *const __m256i);
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), s);
                    acc[t] = _mm256_add_epi32(acc[t], p);
                }
            }
        }
        acc
    }
}

//! The kernels against independent computations: candle's dequantization (a port of ggml's) for
//! the formats, and a naive f64 dot product over the scalar dequantization for the SIMD paths.

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
use candle_core::Device;
use half::f16;
use rand::{Rng, SeedableRng};

use super::*;

/// `n` blocks of random bytes with finite, moderate f16 scales where the format has them.
fn random_blocks(fmt: Format, n: usize, rng: &mut impl Rng) -> Vec<u8> {
    let bb = fmt.block_bytes();
    let mut out = vec![0u8; n * bb];
    rng.fill(&mut out[..]);
    for blk in out.chunks_exact_mut(bb) {
        let mut put = |at: usize, v: f32| {
            blk[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
        };
        match fmt {
            Format::Q4_1 => {
                put(0, rng.gen_range(0.001f32..0.1));
                put(2, rng.gen_range(-0.5f32..0.5));
            }
            Format::Q4_0 | Format::Q5_0 | Format::Q8_0 => put(0, rng.gen_range(0.001f32..0.1)),
            Format::Q4K | Format::Q5K => {
                put(0, rng.gen_range(0.0001f32..0.01));
                put(2, rng.gen_range(0.0001f32..0.01));
            }
            Format::Q6K => put(208, rng.gen_range(0.0001f32..0.01)),
        }
    }
    out
}

fn dtype(fmt: Format) -> GgmlDType {
    match fmt {
        Format::Q4_0 => GgmlDType::Q4_0,
        Format::Q4_1 => GgmlDType::Q4_1,
        Format::Q5_0 => GgmlDType::Q5_0,
        Format::Q8_0 => GgmlDType::Q8_0,
        Format::Q4K => GgmlDType::Q4K,
        Format::Q5K => GgmlDType::Q5K,
        Format::Q6K => GgmlDType::Q6K,
    }
}

/// The scalar decoding equals candle's dequantization bit for bit, for every format.
#[test]
fn scalar_dequantization_equals_candles() -> anyhow::Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for fmt in Format::SMALL.into_iter().chain(Format::K) {
        assert_eq!(Format::of(dtype(fmt)), Some(fmt));
        assert_eq!(dtype(fmt).type_size(), fmt.block_bytes(), "{fmt:?}");
        assert_eq!(dtype(fmt).block_size(), fmt.block_elems(), "{fmt:?}");
        let (rows, k) = (3, 512);
        let w = random_blocks(fmt, rows * k / fmt.block_elems(), &mut rng);
        let q = qtensor_from_ggml(dtype(fmt), &w, vec![rows, k], &Device::Cpu)?;
        let want: Vec<f32> = q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?;
        let mut got = vec![0f32; rows * k];
        for (blk, out) in w
            .chunks_exact(fmt.block_bytes())
            .zip(got.chunks_exact_mut(fmt.block_elems()))
        {
            dequant_block(fmt, blk, out);
        }
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{fmt:?} element {i}: {g} vs {w}");
        }
    }
    Ok(())
}

/// Every kernel (single-row integer path, tiled f32 path, scalar path) against a naive f64 dot
/// product over the scalar dequantization.
#[test]
fn kernels_match_naive_reference() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for fmt in Format::SMALL {
        for m in [1usize, 3, 8, 11] {
            let (rows, k) = (5, 512);
            let w = random_blocks(fmt, rows * k / BLOCK, &mut rng);
            let x: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
            let mut deq = vec![0f32; rows * k];
            for (blk, out) in w
                .chunks_exact(fmt.block_bytes())
                .zip(deq.chunks_exact_mut(BLOCK))
            {
                dequant_block(fmt, blk, out);
            }
            let mut fast = vec![0f32; m * rows];
            matmul_rows(fmt, &w, k, &x, m, 0..rows, &mut fast, rows);
            let mut tiled = vec![0f32; m * rows];
            matmul_rows_tiled(fmt, &w, k, &x, m, 0..rows, &mut tiled, rows);
            let mut scalar = vec![0f32; m * rows];
            matmul_rows_scalar(fmt, &w, k, &x, m, 0..rows, &mut scalar, rows);
            for t in 0..m {
                for r in 0..rows {
                    let (mut want, mut bound) = (0f64, 0f64);
                    for c in 0..k / BLOCK {
                        let ws = &deq[r * k + c * BLOCK..r * k + (c + 1) * BLOCK];
                        let xs = &x[t * k + c * BLOCK..t * k + (c + 1) * BLOCK];
                        let amax = xs.iter().fold(0f64, |a, v| a.max(v.abs() as f64));
                        let mut absw = 0f64;
                        for (w, x) in ws.iter().zip(xs) {
                            want += *w as f64 * *x as f64;
                            absw += (*w as f64).abs();
                            // f32 rounding of the products and sums (and FMA decoding).
                            bound += 2e-6 * (*w as f64 * *x as f64).abs();
                        }
                        // The single-row path rounds x to 16 bits per block.
                        if m == 1 {
                            bound += absw * amax / 65534.0;
                        }
                    }
                    for (name, y) in [("fast", &fast), ("tiled", &tiled), ("scalar", &scalar)] {
                        let got = y[t * rows + r] as f64;
                        assert!(
                            (got - want).abs() <= bound + 1e-6,
                            "{fmt:?} {name} m={m} row {r}: {got} vs {want} (bound {bound})"
                        );
                    }
                }
            }
        }
    }
}

/// A row range that does not start at 0 writes only its own columns (the threaded callers
/// split rows this way).
#[test]
fn a_row_range_writes_only_its_columns() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    for fmt in Format::SMALL.into_iter().chain(Format::K) {
        let (rows, k, m) = (6, 256, 2);
        let w = random_blocks(fmt, rows * k / fmt.block_elems(), &mut rng);
        let x: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let mut all = vec![0f32; m * rows];
        matmul_rows(fmt, &w, k, &x, m, 0..rows, &mut all, rows);
        let mut part = vec![f32::NAN; m * rows];
        matmul_rows(fmt, &w, k, &x, m, 2..5, &mut part, rows);
        for t in 0..m {
            for r in 0..rows {
                let (a, p) = (all[t * rows + r], part[t * rows + r]);
                if (2..5).contains(&r) {
                    assert_eq!(a, p, "{fmt:?}");
                } else {
                    assert!(p.is_nan(), "{fmt:?}: row {r} written");
                }
            }
        }
    }
}

/// The K-quant products: the SIMD path equals the scalar one up to f32 rounding, both equal a naive f64
/// product of the dequantized weights (candle's dequantization, checked above) with the 8-bit
/// activations up to f32 rounding, and differ from the f32 activations by at most the 8-bit
/// rounding (`max|x| / 254` per element of a super-block).
#[test]
fn k_quant_products_match_the_dequantized_weights() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for fmt in Format::K {
        let (rows, k) = (7, 1024);
        let w = random_blocks(fmt, rows * k / 256, &mut rng);
        let mut deq = vec![0f32; rows * k];
        for (blk, out) in w
            .chunks_exact(fmt.block_bytes())
            .zip(deq.chunks_exact_mut(256))
        {
            dequant_block(fmt, blk, out);
        }
        for m in [1usize, 3] {
            // Values of both signs and one super-block of zeros.
            let mut x: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-2.0f32..1.0)).collect();
            x[256..512].iter_mut().for_each(|v| *v = 0.0);
            let mut y = vec![0f32; m * rows];
            matmul_rows(fmt, &w, k, &x, m, 0..rows, &mut y, rows);
            for t in 0..m {
                let xt = &x[t * k..(t + 1) * k];
                let x8 = kquants::quantize_x8(xt);
                let mut simd = vec![0f32; rows];
                kquants::matvec(fmt, &w, k, &x8, rows, &mut simd);
                let mut scalar = vec![0f32; rows];
                kquants::matvec_scalar(fmt, &w, k, &x8, rows, &mut scalar);
                for r in 0..rows {
                    assert_eq!(y[t * rows + r], simd[r], "{fmt:?} m={m}: matmul_rows");
                    let wr = &deq[r * k..(r + 1) * k];
                    let (mut exact8, mut exact, mut absw8, mut bound) = (0f64, 0f64, 0f64, 0f64);
                    for sb in 0..k / 256 {
                        let d = x8.d[sb] as f64;
                        let mut absw = 0f64;
                        for i in sb * 256..(sb + 1) * 256 {
                            let (wi, q) = (wr[i] as f64, x8.q[i] as f64);
                            exact8 += wi * d * q;
                            absw8 += (wi * d * q).abs();
                            exact += wi * xt[i] as f64;
                            absw += wi.abs();
                        }
                        bound += absw * d / 2.0;
                    }
                    let got = simd[r] as f64;
                    // The same integers as the scalar path; f32 sums in another order.
                    assert!(
                        (got - scalar[r] as f64).abs() <= 1e-5 * absw8 + 1e-6,
                        "{fmt:?} row {r}: SIMD {got} vs scalar {}",
                        scalar[r]
                    );
                    assert!(
                        (got - exact8).abs() <= 1e-5 * absw8 + 1e-6,
                        "{fmt:?} row {r}: {got} vs {exact8} on the 8-bit x"
                    );
                    assert!(
                        (got - exact).abs() <= bound * 1.001 + 1e-5 * absw8 + 1e-6,
                        "{fmt:?} row {r}: {got} vs {exact} (bound {bound})"
                    );
                }
            }
        }
    }
}

//! Frozen weights in the GGUF block formats people download (Q4_0, Q4_1, Q5_0, Q8_0, and the
//! K-quants Q4_K, Q5_K, Q6_K of Q4_K_M files), all through HiveMind's kernels, multiply, look up
//! and dequantize like candle's own dequantization of the same bytes (an independent port of
//! ggml's) followed by a plain f64 matrix product.

use anyhow::Result;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use hivemind_model::decoder::Weight;
use hivemind_model::train::ops::dequantize_rows;
use rand::{Rng, SeedableRng};

const FORMATS: [GgmlDType; 7] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q8_0,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

fn random(rng: &mut impl Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
}

/// `x W^T` in f64 from dense values.
fn reference(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
    let mut y = vec![0f64; m * n];
    for t in 0..m {
        for r in 0..n {
            y[t * n + r] = (0..k)
                .map(|i| x[t * k + i] as f64 * w[r * k + i] as f64)
                .sum();
        }
    }
    y
}

#[test]
fn every_kernel_format_matches_candles_dequantization() -> Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    // 512 x 512: large enough that the multi-threaded paths run (m * n * k >= 2^18).
    let (n, k) = (512usize, 512usize);
    for dtype in FORMATS {
        let dense = Tensor::from_vec(random(&mut rng, n * k, 0.1), (n, k), &Device::Cpu)?;
        let q = QTensor::quantize(&dense, dtype)?;
        let want: Vec<f32> = q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?;
        let w = Weight::from_qtensor(q)?;
        let k_quant = matches!(dtype, GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K);
        assert!(
            matches!(w, Weight::Blocks(_)),
            "{dtype:?}: a HiveMind kernel"
        );
        // Dequantization, whole and by rows, bit for bit.
        let got: Vec<f32> = w.dequantize()?.flatten_all()?.to_vec1()?;
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{dtype:?}: dequantize differs from candle's"
        );
        let mut part = vec![0f32; 5 * k];
        dequantize_rows(&w, 100..105, &mut part)?;
        assert_eq!(part, want[100 * k..105 * k], "{dtype:?}: dequantize_rows");
        let ids = [0u32, 511, 7];
        let rows: Vec<f32> = w.rows(&ids)?.flatten_all()?.to_vec1()?;
        for (i, id) in ids.iter().enumerate() {
            let id = *id as usize;
            assert_eq!(
                rows[i * k..(i + 1) * k],
                want[id * k..(id + 1) * k],
                "{dtype:?}"
            );
        }
        assert!(w.rows(&[512]).is_err(), "{dtype:?}: a row out of range");
        // Products: one row (decode), several rows (prefill), against f64.
        for m in [1usize, 3, 17] {
            let x = random(&mut rng, m * k, 1.0);
            let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu)?;
            let y: Vec<f32> = w.matmul_t(&xt)?.flatten_all()?.to_vec1()?;
            let r = reference(&x, &want, m, n, k);
            // f32 sums of 512 products (and, for one row, x rounded to 16 bits per 32); the
            // K-quant kernels round x to 8 bits (|x| <= 1 here), an error up to sum|w| / 254.
            let rel = if k_quant { 1.0 / 254.0 } else { 1e-4 };
            for (i, (a, b)) in y.iter().zip(&r).enumerate() {
                let row = i % n;
                let scale: f64 = (0..k)
                    .map(|j| (want[row * k + j] as f64).abs())
                    .sum::<f64>();
                assert!(
                    (*a as f64 - b).abs() <= rel * scale + 1e-5,
                    "{dtype:?} m={m} [{i}]: {a} vs {b}"
                );
            }
        }
    }
    Ok(())
}

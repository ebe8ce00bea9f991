//! Frozen-weight products in the block formats HiveMind has kernels for (Q4_0, Q4_1, Q5_0, Q8_0,
//! and the K-quants Q4_K, Q5_K, Q6_K), HiveMind's kernels against candle's `QMatMul` on the same
//! weights, interleaved in one run. One
//! 7B feed-forward shape by default (18944 x 3584, larger than the caches), one row (decode) and
//! 16 rows (prefill). Prints JSON.
//!
//! ```text
//! cargo run -p hivemind-model --example format_bench [-- ROWS COLS]
//! ```
//! Threads: rayon's default (`RAYON_NUM_THREADS` to pin; candle uses the same pool size).

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use hivemind_model::decoder::Weight;

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (n, k) = (
        *args.first().unwrap_or(&18944),
        *args.get(1).unwrap_or(&3584),
    );
    let dense = Tensor::randn(0f32, 0.05, (n, k), &Device::Cpu)?;
    let mut out = serde_json::Map::new();
    for dtype in [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ] {
        if k % dtype.block_size() != 0 {
            continue; // the K-quants need rows of whole 256-blocks
        }
        let q = QTensor::quantize(&dense, dtype)?;
        let candle = QMatMul::from_qtensor(QTensor::quantize(&dense, dtype)?)?;
        // What a loaded model uses: a HiveMind kernel where there is one, else candle's.
        let ours = Weight::from_qtensor(q)?;
        let kernel = if matches!(ours, Weight::Blocks(_)) {
            "hivemind"
        } else {
            "candle"
        };
        let mut entry = serde_json::Map::new();
        for m in [1usize, 16] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
            let reps = if m == 1 { 20 } else { 4 };
            // Interleaved: each round times both, best round kept for each.
            let (mut best_ours, mut best_candle) = (f64::MAX, f64::MAX);
            for _ in 0..3 {
                let t = Instant::now();
                for _ in 0..reps {
                    std::hint::black_box(ours.matmul_t(&x)?);
                }
                best_ours = best_ours.min(t.elapsed().as_secs_f64() / reps as f64);
                let t = Instant::now();
                for _ in 0..reps {
                    std::hint::black_box(candle.forward(&x)?);
                }
                best_candle = best_candle.min(t.elapsed().as_secs_f64() / reps as f64);
            }
            let gflops = |s: f64| 2.0 * (m * n * k) as f64 / s / 1e9;
            entry.insert(
                format!("rows_{m}"),
                serde_json::json!({
                    "used_ms": best_ours * 1e3,
                    "candle_ms": best_candle * 1e3,
                    "used_gflops": gflops(best_ours),
                    "candle_gflops": gflops(best_candle),
                    "speedup_vs_candle": best_candle / best_ours,
                }),
            );
        }
        entry.insert("used".into(), kernel.into());
        out.insert(format!("{dtype:?}"), serde_json::Value::Object(entry));
    }
    let threads = rayon::current_num_threads();
    println!(
        "{}",
        serde_json::json!({ "shape": [n, k], "threads": threads, "formats": out })
    );
    Ok(())
}

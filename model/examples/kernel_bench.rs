//! Single-row block matmul kernels against each other and against the scalar code, on random
//! weights of the default model's largest shape (1536 x 576), interleaved in one run. Prints JSON.

use std::time::Instant;

use hivemind_model::kernels::{self, Format};

fn main() {
    let rows: usize = std::env::var("ROWS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1536);
    let k = 576usize;
    let mut seed = 1u64;
    let mut next = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as u32
    };
    let mut out = serde_json::Map::new();
    for fmt in [Format::Q4_1, Format::Q8_0] {
        let nb = rows * k / 32;
        let mut w = Vec::with_capacity(nb * fmt.block_bytes());
        for _ in 0..nb {
            w.extend_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
            if fmt == Format::Q4_1 {
                w.extend_from_slice(&half::f16::from_f32(-0.05).to_le_bytes());
            }
            while w.len() % fmt.block_bytes() != 0 {
                w.push(next() as u8);
            }
        }
        let x: Vec<f32> = (0..k)
            .map(|_| (next() % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let mut y = vec![0f32; rows];
        let reps = (400 * 1536 / rows).max(4);
        let mut t = [0f64; 3];
        for round in 0..5 {
            type Kernel =
                fn(Format, &[u8], usize, &[f32], usize, std::ops::Range<usize>, &mut [f32], usize);
            let fns: [Kernel; 3] = [
                kernels::matmul_rows,
                kernels::matmul_rows_tiled,
                kernels::matmul_rows_scalar,
            ];
            for (i, f) in fns.iter().enumerate() {
                let n = if i == 2 { reps / 10 } else { reps };
                let s = Instant::now();
                for _ in 0..n {
                    f(fmt, &w, k, &x, 1, 0..rows, &mut y, rows);
                    std::hint::black_box(&y);
                }
                let per = s.elapsed().as_secs_f64() / n as f64;
                if round > 0 {
                    t[i] += per / 4.0;
                }
            }
        }
        let gib = |s: f64| w.len() as f64 / s / 1073741824.0;
        out.insert(
            format!("{fmt:?}"),
            serde_json::json!({
                "matvec_gib_s": gib(t[0]), "tiled_gib_s": gib(t[1]), "scalar_gib_s": gib(t[2]),
                "matvec_vs_tiled": t[1] / t[0], "matvec_vs_scalar": t[2] / t[0],
            }),
        );
    }
    println!("{}", serde_json::Value::Object(out));
}

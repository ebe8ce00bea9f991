//! Where decode time goes: the block matmuls alone versus a whole forward step, for the default
//! model (or a GGUF path as the first argument), on `HIVE_THREADS` threads (default 1). Prints JSON.

use std::time::Instant;

use anyhow::Result;
use hivemind_model::decoder::Weight;
use hivemind_model::Module;
use hivemind_model::{BaseModel, LoadOptions};

fn main() -> Result<()> {
    let threads = std::env::var("HIVE_THREADS").unwrap_or_else(|_| "1".into());
    std::env::set_var("RAYON_NUM_THREADS", &threads);
    let path = match std::env::args().nth(1) {
        Some(p) => p.into(),
        None => hivemind_model::pull::ensure_default_model(&mut |m| eprintln!("{m}"))?,
    };
    let m = BaseModel::load(&path, &LoadOptions::default())?;
    let d = &m.decoder;
    let n = 50;
    // Matmuls only, on raw slices.
    let mut blocks = Vec::new();
    for l in &d.layers {
        for m in Module::ALL {
            if let Weight::Blocks(b) = &l.module(m).weight {
                blocks.push(b.clone());
            }
        }
    }
    if let Weight::Blocks(b) = &d.embed {
        blocks.push(b.clone());
    }
    let t = Instant::now();
    for _ in 0..n {
        for b in &blocks {
            let x = vec![0.5f32; b.dims().1];
            std::hint::black_box(b.matmul_t_slice(&x, 1));
        }
    }
    let matmul_ms = t.elapsed().as_secs_f64() * 1000.0 / n as f64;
    let bytes: usize = blocks.iter().map(|b| b.size_in_bytes()).sum();
    // Whole steps.
    let mut cache = d.new_cache();
    d.forward_last(&[1, 2, 3, 4], &mut cache)?;
    let t = Instant::now();
    for i in 0..n {
        std::hint::black_box(d.forward_last(&[(i % 100) as u32 + 10], &mut cache)?);
    }
    let step_ms = t.elapsed().as_secs_f64() * 1000.0 / n as f64;
    println!(
        "{}",
        serde_json::json!({
            "matmul_ms_per_token": matmul_ms,
            "weight_mib": bytes as f64 / 1048576.0,
            "matmul_gib_s": bytes as f64 / 1073741824.0 / (matmul_ms / 1000.0),
            "step_ms": step_ms,
            "other_ms": step_ms - matmul_ms,
        })
    );
    Ok(())
}

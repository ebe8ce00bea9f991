//! Prompt and generation speed of the default model (or `--model PATH`), printed as JSON, against
//! candle-transformers' quantized llama on the same GGUF file in the same run (llama-family files
//! only; null for Qwen2), and against llama.cpp's `llama-bench` when
//! `LLAMA_BENCH=/path/to/llama-bench` is set. Our model is dropped before the baselines load
//! theirs, so a 7B file fits (`--model file.gguf --threads 2 --tokens 8`).
//!
//! Run: `cargo run --release -p hivemind-model --example bench_generate [-- --threads 1 --tokens 64]`

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use hivemind_model::{BaseModel, LoadOptions};
use serde_json::json;

/// A 16-token English prompt (ids from the model's own tokenizer).
const PROMPT: &str =
    "The history of federated learning starts with a simple question about privacy and";

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .unwrap_or(0.0)
        / 1024.0
}

fn main() -> Result<()> {
    let threads: usize = arg("--threads").and_then(|s| s.parse().ok()).unwrap_or(1);
    let n_gen: usize = arg("--tokens").and_then(|s| s.parse().ok()).unwrap_or(64);
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .ok();
    let path = match arg("--model") {
        Some(p) => p.into(),
        None => hivemind_model::pull::ensure_default_model(&mut |m| eprintln!("{m}"))?,
    };

    // HiveMind.
    let t = Instant::now();
    let model = BaseModel::load(&path, &LoadOptions::default())?;
    let load_s = t.elapsed().as_secs_f64();
    let ids = model.tokenizer.encode(PROMPT, false)?;
    let rss_after_load = rss_mib();
    let (ours_prefill, ours_decode) = {
        let mut best = (0f64, 0f64);
        for _ in 0..3 {
            let mut cache = model.decoder.new_cache();
            let t = Instant::now();
            let logits = model.decoder.forward_last(&ids, &mut cache)?;
            let prefill = ids.len() as f64 / t.elapsed().as_secs_f64();
            let mut next = hivemind_model::generate::argmax(&logits.to_vec1::<f32>()?);
            let t = Instant::now();
            for _ in 0..n_gen {
                let l = model.decoder.forward_last(&[next], &mut cache)?;
                next = hivemind_model::generate::argmax(&l.to_vec1::<f32>()?);
            }
            let decode = n_gen as f64 / t.elapsed().as_secs_f64();
            best = (best.0.max(prefill), best.1.max(decode));
        }
        best
    };
    let rss_ours = rss_mib();
    // Out of memory before the baselines load theirs (a 7B model is 10 GiB here).
    drop(model);

    // candle-transformers' quantized llama on the same file (only for llama-family GGUF: a
    // Qwen2 file has no such baseline, and the report says null).
    let baseline = (|| -> Result<(f64, f64)> {
        use candle_transformers::models::quantized_llama::ModelWeights;
        let mut f = std::fs::File::open(&path)?;
        let content = candle_core::quantized::gguf_file::Content::read(&mut f)?;
        let mut m = ModelWeights::from_gguf(content, &mut f, &Device::Cpu)?;
        let mut best = (0f64, 0f64);
        for _ in 0..3 {
            let x = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
            let t = Instant::now();
            let logits = m.forward(&x, 0)?;
            let prefill = ids.len() as f64 / t.elapsed().as_secs_f64();
            let mut next =
                hivemind_model::generate::argmax(&logits.flatten_all()?.to_vec1::<f32>()?);
            let t = Instant::now();
            for i in 0..n_gen {
                let x = Tensor::new(&[next], &Device::Cpu)?.unsqueeze(0)?;
                let l = m.forward(&x, ids.len() + i)?;
                next = hivemind_model::generate::argmax(&l.flatten_all()?.to_vec1::<f32>()?);
            }
            let decode = n_gen as f64 / t.elapsed().as_secs_f64();
            best = (best.0.max(prefill), best.1.max(decode));
        }
        Ok(best)
    })()
    .context("candle-transformers baseline")
    .map_err(|e| eprintln!("no candle-transformers baseline: {e:#}"))
    .ok();

    let llama_cpp = std::env::var("LLAMA_BENCH").ok().and_then(|bin| {
        let out = std::process::Command::new(bin)
            .args(["-m"])
            .arg(&path)
            .args([
                "-p",
                &ids.len().to_string(),
                "-n",
                &n_gen.to_string(),
                "-t",
                &threads.to_string(),
                "-o",
                "json",
                "-r",
                "3",
            ])
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let arr = v.as_array()?;
        let get = |is_prompt: bool| {
            arr.iter()
                .find(|r| (r["n_prompt"].as_u64().unwrap_or(0) > 0) == is_prompt)
                .and_then(|r| r["avg_ts"].as_f64())
        };
        Some((get(true)?, get(false)?))
    });

    let mut report = json!({
        "model": path.display().to_string(),
        "threads": threads,
        "prompt_tokens": ids.len(),
        "generated_tokens": n_gen,
        "hivemind": {"prefill_tok_s": ours_prefill, "decode_tok_s": ours_decode, "load_s": load_s,
                     "rss_after_load_mib": rss_after_load, "peak_rss_mib": rss_ours},
        "candle_transformers": baseline.map(|b| json!({"prefill_tok_s": b.0, "decode_tok_s": b.1})),
        "ratio_vs_candle_transformers": baseline.map(|b| json!({"prefill": ours_prefill / b.0, "decode": ours_decode / b.1})),
    });
    if let Some((p, d)) = llama_cpp {
        report["llama_cpp"] = json!({"prefill_tok_s": p, "decode_tok_s": d});
        report["ratio_vs_llama_cpp"] =
            json!({"prefill": ours_prefill / p, "decode": ours_decode / d});
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

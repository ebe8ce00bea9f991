//! Prompt and generation speed of the default model (or `--model PATH`), printed as JSON, against
//! candle-transformers' quantized llama on the same GGUF file in the same run (llama-family files
//! only; null for Qwen2), and against llama.cpp's `llama-bench` when
//! `LLAMA_BENCH=/path/to/llama-bench` is set.
//!
//! Each thread count of `--threads` (a list, default `1,2`) is measured in a child process of its
//! own (a process's thread pools are sized once), `--runs` times (default 5), and the medians are
//! reported; `llama-bench` runs as many repetitions and reports each, of which the median is taken
//! too. `llama-bench` does not report how long a model takes to load: with
//! `LLAMA_COMPLETION=/path/to/llama-completion` set too, that runs `--runs` times per thread
//! count on the same prompt for one token, and the median of its load time (from its log's
//! timestamps: model and context ready) is compared with our `BaseModel::load`, both with the
//! file in the page cache (it is read once before anything is measured). `best` compares each
//! side at its own best thread count. In the child our model is dropped before
//! candle-transformers loads its own, so a 7B file fits (`--model file.gguf --threads 2
//! --tokens 8 --runs 3`).
//!
//! Run: `cargo run --release -p hivemind-model --features bench-baseline --example bench_generate
//! [-- --threads 1,2 --tokens 64 --runs 5]`

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use hivemind_model::{BaseModel, LoadOptions};
use serde_json::{json, Value};

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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Medians of `runs` (prefill, decode) measurements, in tokens/s.
fn medians(runs: usize, mut once: impl FnMut() -> Result<(f64, f64)>) -> Result<(f64, f64)> {
    let mut p = Vec::new();
    let mut d = Vec::new();
    for _ in 0..runs {
        let (a, b) = once()?;
        p.push(a);
        d.push(b);
    }
    Ok((median(p), median(d)))
}

/// One thread count, in this process: ours, then candle-transformers'.
fn child(path: &std::path::Path, threads: usize, n_gen: usize, runs: usize) -> Result<Value> {
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .ok();

    let t = Instant::now();
    let model = BaseModel::load(path, &LoadOptions::default())?;
    let load_s = t.elapsed().as_secs_f64();
    let ids = model.tokenizer.encode(PROMPT, false)?;
    let rss_after_load = rss_mib();
    let (ours_prefill, ours_decode) = medians(runs, || {
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
        Ok((prefill, n_gen as f64 / t.elapsed().as_secs_f64()))
    })?;
    let rss_ours = rss_mib();
    // Out of memory before the baseline loads its own (a 7B model is 10 GiB here).
    drop(model);

    // candle-transformers' quantized llama on the same file (only for llama-family GGUF: a
    // Qwen2 file has no such baseline, and the report says null).
    let baseline = (|| -> Result<(f64, f64)> {
        use candle_transformers::models::quantized_llama::ModelWeights;
        let mut f = std::fs::File::open(path)?;
        let content = candle_core::quantized::gguf_file::Content::read(&mut f)?;
        let mut m = ModelWeights::from_gguf(content, &mut f, &Device::Cpu)?;
        medians(runs, || {
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
            Ok((prefill, n_gen as f64 / t.elapsed().as_secs_f64()))
        })
    })()
    .context("candle-transformers baseline")
    .map_err(|e| eprintln!("no candle-transformers baseline: {e:#}"))
    .ok();

    Ok(json!({
        "threads": threads,
        "prompt_tokens": ids.len(),
        "hivemind": {"prefill_tok_s": ours_prefill, "decode_tok_s": ours_decode, "load_s": load_s,
                     "rss_after_load_mib": rss_after_load, "peak_rss_mib": rss_ours},
        "candle_transformers": baseline.map(|b| json!({"prefill_tok_s": b.0, "decode_tok_s": b.1})),
    }))
}

/// llama.cpp's `llama-bench` on the same file: medians of its per-repetition speeds.
fn llama_bench(
    bin: &str,
    path: &std::path::Path,
    prompt: usize,
    n_gen: usize,
    threads: usize,
    runs: usize,
) -> Option<Value> {
    let out = std::process::Command::new(bin)
        .arg("-m")
        .arg(path)
        .args(["-p", &prompt.to_string(), "-n", &n_gen.to_string()])
        .args([
            "-t",
            &threads.to_string(),
            "-r",
            &runs.to_string(),
            "-o",
            "json",
        ])
        .output()
        .ok()?;
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    let arr = v.as_array()?;
    let get = |is_prompt: bool| {
        let r = arr
            .iter()
            .find(|r| (r["n_prompt"].as_u64().unwrap_or(0) > 0) == is_prompt)?;
        let samples: Vec<f64> = r["samples_ts"]
            .as_array()?
            .iter()
            .filter_map(Value::as_f64)
            .collect();
        Some(median(samples))
    };
    Some(json!({"prefill_tok_s": get(true)?, "decode_tok_s": get(false)?}))
}

/// llama.cpp's load time for `path` with `threads` threads, in seconds: the median over `runs`
/// runs of `llama-completion` generating one token (with a 256-token context), each the time its
/// log's timestamps put between "load the model" and the thread pool's start once the model and
/// context are ready. (The "load time" of its closing summary is not that: it counts from the
/// context's creation to the first token.)
fn llama_load(bin: &str, path: &std::path::Path, threads: usize, runs: usize) -> Option<f64> {
    // `0.00.534.759 I ...`: minutes, seconds, milliseconds, microseconds.
    let stamp = |line: &str| -> Option<f64> {
        let parts: Vec<f64> = line
            .split_whitespace()
            .next()?
            .split('.')
            .map(|p| p.parse::<f64>().ok())
            .collect::<Option<_>>()?;
        match parts[..] {
            [m, s, ms, us] => Some(m * 60.0 + s + ms / 1e3 + us / 1e6),
            _ => None,
        }
    };
    let mut times = Vec::new();
    for _ in 0..runs {
        let out = std::process::Command::new(bin)
            .arg("-m")
            .arg(path)
            .args([
                "-p",
                PROMPT,
                "-n",
                "1",
                "-c",
                "256",
                "-t",
                &threads.to_string(),
            ])
            .args(["-no-cnv", "--no-warmup"])
            .stdin(std::process::Stdio::null())
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stderr);
        let mut lines = text.lines();
        let start = lines
            .find(|l| l.contains("load the model"))
            .and_then(stamp)?;
        let ready = lines
            .find(|l| l.contains("threadpool init") || l.contains("system_info"))
            .and_then(stamp)?;
        times.push(ready - start);
    }
    Some(median(times))
}

/// The best value of `key` (`"decode_tok_s"`, ...) over `rows[..][side]`, with its thread count.
fn best(rows: &[Value], side: &str, key: &str) -> Option<(f64, u64)> {
    rows.iter()
        .filter_map(|r| Some((r[side][key].as_f64()?, r["threads"].as_u64()?)))
        .max_by(|a, b| a.0.total_cmp(&b.0))
}

fn main() -> Result<()> {
    let n_gen: usize = arg("--tokens").and_then(|s| s.parse().ok()).unwrap_or(64);
    let runs: usize = arg("--runs").and_then(|s| s.parse().ok()).unwrap_or(5);
    let path = match arg("--model") {
        Some(p) => p.into(),
        None => hivemind_model::pull::ensure_default_model(&mut |m| eprintln!("{m}"))?,
    };
    if let Some(t) = arg("--child") {
        let t: usize = t.parse().context("--child THREADS")?;
        println!("{}", child(&path, t, n_gen, runs)?);
        return Ok(());
    }
    let list = arg("--threads").unwrap_or_else(|| "1,2".into());
    let threads: Vec<usize> = list
        .split(',')
        .map(|s| s.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("--threads {list}: a comma-separated list of counts"))?;
    // The file is read once first, so that every load below (ours and llama.cpp's) finds it
    // in the page cache: load times compare what each does with the bytes, not the disk.
    std::io::copy(
        &mut std::fs::File::open(&path).with_context(|| format!("{}", path.display()))?,
        &mut std::io::sink(),
    )?;
    let exe = std::env::current_exe()?;
    let llama = std::env::var("LLAMA_BENCH").ok();
    let completion = std::env::var("LLAMA_COMPLETION").ok();
    let mut rows = Vec::new();
    for &t in &threads {
        let out = std::process::Command::new(&exe)
            .arg("--model")
            .arg(&path)
            .args(["--child", &t.to_string()])
            .args(["--tokens", &n_gen.to_string(), "--runs", &runs.to_string()])
            .stderr(std::process::Stdio::inherit())
            .output()?;
        if !out.status.success() {
            bail!("the run with {t} threads failed");
        }
        let mut row: Value = serde_json::from_slice(&out.stdout)?;
        let prompt = row["prompt_tokens"].as_u64().unwrap_or(16) as usize;
        if let Some(bin) = &llama {
            row["llama_cpp"] = llama_bench(bin, &path, prompt, n_gen, t, runs).into();
        }
        if let Some(bin) = &completion {
            let load = llama_load(bin, &path, t, runs);
            if load.is_none() {
                eprintln!("{bin}: no load time (it failed, or its log has no timestamps)");
            }
            if let Some(load) = load {
                row["llama_cpp"]["load_s"] = json!(load);
                if let Some(ours) = row["hivemind"]["load_s"].as_f64() {
                    row["ratio_vs_llama_cpp"]["load_time"] = json!(ours / load);
                }
            }
        }
        for base in ["candle_transformers", "llama_cpp"] {
            for key in ["prefill_tok_s", "decode_tok_s"] {
                if let (Some(a), Some(b)) = (row["hivemind"][key].as_f64(), row[base][key].as_f64())
                {
                    row[format!("ratio_vs_{base}")][key] = json!(a / b);
                }
            }
        }
        eprintln!("{row}");
        rows.push(row);
    }
    let mut report = json!({
        "model": path.display().to_string(),
        "generated_tokens": n_gen,
        "runs": runs,
        "per_thread_count": rows,
    });
    for base in ["candle_transformers", "llama_cpp"] {
        for key in ["prefill_tok_s", "decode_tok_s"] {
            if let (Some(a), Some(b)) = (best(&rows, "hivemind", key), best(&rows, base, key)) {
                report["best"][format!("ratio_vs_{base}")][key] = json!(a.0 / b.0);
                report["best"]["hivemind"][key] = json!({"tok_s": a.0, "threads": a.1});
                report["best"][base][key] = json!({"tok_s": b.0, "threads": b.1});
            }
        }
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

//! Peak memory of one aggregation against the number of inputs: a node's aggregation job
//! (`driver::aggregate`, which merges a module at a time, reading each input's tensors from the
//! store as it needs them) beside, as the baseline in the same run, the same rule over every
//! input loaded whole (how nodes merged before). Adapters of the default model's shape (rank
//! 8, all 7 modules, 30 layers: 9.8 MB each in f32), random values, in a real sled store.
//! Each measurement runs in a process of its own and reports its peak RSS (`VmHWM`, reset
//! before the job) beside what was resident when the job started. Prints one JSON object.
//!
//! ```sh
//! cargo run --example aggregate_memory                  # 8, 32 and 128 inputs, fedavg (a minute)
//! cargo run --example aggregate_memory -- --inputs 4,16 --rule iso
//! ```
//!
//! (The update-merging rules take longer, growing with the inputs' summed rank: on a 2-core box
//! an iso merge of 16 inputs of this shape takes 12 s, of 32 inputs 60 s.)

use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::Parser;
use hivemind_model::adapter::{AdapterConfig, AdapterShape, Limits, LoraAdapter, ModuleDims};
use hivemind_model::aggregate::WeightedAdapter;
use hivemind_model::testing::random_adapter;
use hivemind_node::driver::{aggregate, NetRule, NetSpec};
use hivemind_protocol::{AggregateInput, AggregationJob};
use hivemind_store::Store;
use serde_json::{json, Value};

#[derive(Parser)]
struct Args {
    /// Input counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "8,32,128")]
    inputs: Vec<usize>,
    /// The network's rule.
    #[arg(long, default_value = "fedavg")]
    rule: NetRule,
    /// Internal: measure one count in this process (`parts` or `whole`).
    #[arg(long, hide = true)]
    child: Option<String>,
}

const RANK: usize = 8;
const ALPHA: f64 = 16.0;

/// SmolLM2-135M's linear layers.
fn shape() -> AdapterShape {
    let dims = |out_features, in_features| ModuleDims {
        out_features,
        in_features,
    };
    AdapterShape {
        rank: RANK,
        num_layers: 30,
        modules: [
            ("down_proj", dims(576, 1536)),
            ("gate_proj", dims(1536, 576)),
            ("k_proj", dims(192, 576)),
            ("o_proj", dims(576, 576)),
            ("q_proj", dims(576, 576)),
            ("up_proj", dims(1536, 576)),
            ("v_proj", dims(192, 576)),
        ]
        .into_iter()
        .map(|(m, d)| (m.to_string(), d))
        .collect(),
    }
}

/// One adapter of [`shape`] in f32, in MiB.
fn adapter_mib() -> f64 {
    let s = shape();
    let per_layer: usize = s
        .modules
        .values()
        .map(|d| s.rank * (d.in_features + d.out_features))
        .sum();
    (per_layer * s.num_layers * 4) as f64 / (1024.0 * 1024.0)
}

/// This process's peak resident set (`VmHWM`), in MiB.
fn peak_rss_mib() -> Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/self/status")?;
    Ok(kib / 1024.0)
}

/// One measurement: `count` inputs stored, then one aggregation, `how` = `parts` (the node's
/// job) or `whole` (every input loaded, then the rule).
fn child(args: &Args, how: &str, count: usize) -> Result<Value> {
    let shape = shape();
    let config = AdapterConfig::new(
        RANK,
        ALPHA,
        hivemind_model::adapter::TargetModules::from_names(shape.target_modules()),
    );
    let spec = NetSpec {
        config: config.clone(),
        shape: shape.clone(),
        rule: args.rule,
        dp: None,
    };
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let mut inputs = Vec::with_capacity(count);
    for seed in 0..count as u64 {
        // Small values, as trained updates are; one adapter in memory at a time.
        let mut a = random_adapter(&shape, ALPHA, seed)?;
        a.tensors
            .values_mut()
            .for_each(|t| t.data.iter_mut().for_each(|v| *v *= 0.01));
        let hash = store.put_blob(&a.to_safetensors_bytes()?)?;
        inputs.push(AggregateInput {
            adapter: hash,
            samples: 12,
        });
    }
    inputs.sort_by_key(|i| i.adapter);
    let before = peak_rss_mib()?;
    // Resets the peak to what is resident now, so the job's own peak shows even where it stays
    // below the setup's (`proc(5)`, `/proc/pid/clear_refs`).
    std::fs::write("/proc/self/clear_refs", "5")?;
    let floor = peak_rss_mib()?;
    let t0 = std::time::Instant::now();
    match how {
        "parts" => {
            let job = AggregationJob {
                round: 1,
                parent: None,
                rule: spec.rule.id(),
                inputs,
            };
            let out = aggregate(&store, &spec, &job)?;
            anyhow::ensure!(
                out.excluded.is_empty(),
                "inputs left out: {:?}",
                out.excluded
            );
        }
        "whole" => {
            let mut whole = Vec::with_capacity(count);
            for i in &inputs {
                let bytes = store.get_blob(&i.adapter)?.context("blob")?;
                whole.push(WeightedAdapter {
                    hash: i.adapter,
                    samples: i.samples,
                    adapter: LoraAdapter::from_safetensors_bytes(
                        config.clone(),
                        &bytes,
                        &Limits::DEFAULT,
                    )?,
                });
            }
            spec.merge_rule().aggregate(&whole)?;
        }
        other => bail!("unknown measurement {other}"),
    }
    Ok(json!({
        "how": how,
        "inputs": count,
        "seconds": t0.elapsed().as_secs_f64(),
        "peak_rss_mib_setup": before,
        "rss_mib_at_start": floor,
        "peak_rss_mib": peak_rss_mib()?,
    }))
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(spec) = &args.child {
        let (how, count) = spec.split_once(':').context("--child HOW:COUNT")?;
        let out = child(&args, how, count.parse()?)?;
        println!("{out}");
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let mut rows = Vec::new();
    for &count in &args.inputs {
        let mut row = serde_json::Map::new();
        row.insert("inputs".into(), json!(count));
        for how in ["parts", "whole"] {
            eprintln!("{count} inputs, {how}...");
            let out = Command::new(&exe)
                .args(["--rule", args.rule.name(), "--child"])
                .arg(format!("{how}:{count}"))
                .output()?;
            if !out.status.success() {
                bail!(
                    "{how} with {count} inputs failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let v: Value = serde_json::from_slice(&out.stdout)?;
            row.insert(how.into(), v);
        }
        let peak = |how: &str| row[how]["peak_rss_mib"].as_f64().unwrap_or(f64::NAN);
        row.insert(
            "whole_over_parts".into(),
            json!(peak("whole") / peak("parts")),
        );
        rows.push(Value::Object(row));
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "bench": "aggregate-memory",
            "rule": args.rule.name(),
            "adapter_mib": adapter_mib(),
            "rows": rows,
        }))?
    );
    Ok(())
}

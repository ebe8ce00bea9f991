//! Aggregates PEFT adapter directories with FedAvg and prints the canonical result's hash
//! as JSON, to compare round adapters across processes and machines.
//!
//! ```text
//! cargo run -p hivemind-model --example aggregate_hash -- \
//!     [--cap N] [--out DIR] ADAPTER_DIR:SAMPLES [ADAPTER_DIR:SAMPLES ...]
//! ```
//!
//! Each input is named by the blake3 hash of its `adapter_model.safetensors` bytes, as in
//! the network. Output: `{"rule", "max_samples_per_input", "inputs": [{"dir", "hash",
//! "samples"}], "hash", "bytes"}`; with `--out`, the result is also written as a PEFT dir.

use anyhow::{bail, Context, Result};
use hivemind_model::adapter::{LoraAdapter, WEIGHTS_FILE};
use hivemind_model::aggregate::{AggregationRule, FedAvg, WeightedAdapter};
use hivemind_protocol::Hash;
use serde_json::json;

fn main() -> Result<()> {
    let mut cap = FedAvg::DEFAULT_MAX_SAMPLES_PER_INPUT;
    let mut out_dir = None;
    let mut specs = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--cap" => cap = args.next().context("--cap needs a number")?.parse()?,
            "--out" => out_dir = Some(args.next().context("--out needs a directory")?),
            _ => specs.push(arg),
        }
    }
    if specs.is_empty() {
        bail!("usage: aggregate_hash [--cap N] [--out DIR] ADAPTER_DIR:SAMPLES ...");
    }

    let mut inputs = Vec::new();
    let mut listed = Vec::new();
    for spec in &specs {
        let (dir, samples) = spec
            .rsplit_once(':')
            .with_context(|| format!("{spec}: expected ADAPTER_DIR:SAMPLES"))?;
        let samples: u64 = samples
            .parse()
            .with_context(|| format!("{spec}: bad sample count"))?;
        let adapter = LoraAdapter::read_dir(dir).with_context(|| format!("reading {dir}"))?;
        let blob = std::fs::read(std::path::Path::new(dir).join(WEIGHTS_FILE))?;
        let hash = Hash::of(&blob);
        listed.push(json!({"dir": dir, "hash": hash.to_hex(), "samples": samples}));
        inputs.push(WeightedAdapter {
            hash,
            samples,
            adapter,
        });
    }

    let rule = FedAvg::new(cap);
    let result = rule.aggregate(&inputs)?;
    let bytes = result.to_safetensors_bytes()?;
    if let Some(dir) = out_dir {
        result
            .write_dir(&dir)
            .with_context(|| format!("writing {dir}"))?;
    }
    let report = json!({
        "rule": rule.id(),
        "max_samples_per_input": cap,
        "inputs": listed,
        "hash": Hash::of(&bytes).to_hex(),
        "bytes": bytes.len(),
    });
    println!("{report}");
    Ok(())
}

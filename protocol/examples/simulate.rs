//! Runs the protocol simulator over many seeds.
//!
//! ```text
//! cargo run --release -p hivemind-protocol --example simulate -- --seeds 50 --nodes 200
//! cargo run -p hivemind-protocol --example simulate -- --seed 17        # replay one seed
//! ```
//!
//! Options: `--seeds N` (runs seeds 0..N, default 20), `--first S` (start at seed S),
//! `--seed S` (exactly one seed), `--nodes M` (honest nodes, default 100),
//! `--byzantine B`, `--duration-ms T`, `--no-partition`, `--trace-node I` (print every
//! action of honest node I), `--sybil-floods` (Byzantine senders also pose as many users;
//! see `SimConfig::sybil_floods`), `--sybil-keys` (they also make keys at will; see
//! `SimConfig::sybil_keys`), `--sybil-records` (they publish ever-heavier records of the tip's
//! round; see `SimConfig::sybil_records`), `--colluding-history` (they sign one forged history
//! together; see `SimConfig::colluding_history`), `--lying-signers` (they sign honest tips and
//! lie when asked for their ancestors; see `SimConfig::lying_signers`), `--key-work BITS` (the network refuses keys with
//! less work).

use anyhow::{bail, Context, Result};
use hivemind_protocol::sim::{self, SimConfig};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn main() -> Result<()> {
    let mut cfg = SimConfig::default();
    let (mut first, mut count) = (0u64, 20u64);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| -> Result<u64> {
            args.next()
                .with_context(|| format!("{name} needs a value"))?
                .parse::<u64>()
                .with_context(|| format!("{name} needs a number"))
        };
        match arg.as_str() {
            "--seeds" => count = value("--seeds")?,
            "--first" => first = value("--first")?,
            "--seed" => {
                first = value("--seed")?;
                count = 1;
            }
            "--nodes" => cfg.nodes = value("--nodes")? as usize,
            "--byzantine" => cfg.byzantine = value("--byzantine")? as usize,
            "--duration-ms" => cfg.duration_ms = value("--duration-ms")?,
            "--no-partition" => cfg.partition = None,
            "--sybil-floods" => cfg.sybil_floods = true,
            "--sybil-keys" => cfg.sybil_keys = true,
            "--sybil-records" => cfg.sybil_records = true,
            "--colluding-history" => cfg.colluding_history = true,
            "--lying-signers" => cfg.lying_signers = true,
            "--key-work" => {
                let bits = value("--key-work")?;
                if bits > u64::from(hivemind_protocol::MAX_KEY_WORK) {
                    bail!(
                        "--key-work {bits} is more than {}",
                        hivemind_protocol::MAX_KEY_WORK
                    );
                }
                cfg.round.min_key_work = bits as u32;
            }
            "--trace-node" => cfg.trace_node = Some(value("--trace-node")? as usize),
            other => bail!("unknown argument {other:?} (see the example's doc comment)"),
        }
    }
    let mut failed = Vec::new();
    let started = std::time::Instant::now();
    for seed in first..first + count {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let report = sim::run(&cfg, move || rng.next_u64());
        for line in &report.trace {
            println!("  {line}");
        }
        println!("seed {seed}: {report}");
        if cfg.colluding_history || cfg.lying_signers {
            println!(
                "seed {seed}: {} forged adoptions, {} lies served",
                report.forged_adoptions, report.lies_served
            );
        }
        if !report.passed() {
            println!(
                "seed {seed} FAILED; replay with --seed {seed} --nodes {}",
                cfg.nodes
            );
            failed.push(seed);
        }
    }
    println!(
        "{} runs, {} failed {:?}, {:.1} s",
        count,
        failed.len(),
        failed,
        started.elapsed().as_secs_f64()
    );
    if !failed.is_empty() {
        bail!("failing seeds: {failed:?}");
    }
    Ok(())
}

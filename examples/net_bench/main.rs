//! Network benchmarks of issue 5, each with its baseline measured in the same run.
//!
//! ```text
//! cargo run -p hivemind-node --example net_bench -- [gossip|transfer|commit|all]
//! ```
//!
//! Every benchmark prints one JSON object on stdout (progress goes to stderr) holding the
//! measured value, its baseline and their ratio. All nodes live in this process as tasks on
//! one multi-thread tokio runtime and talk real libp2p (TCP, noise, yamux) on 127.0.0.1.
//!
//! * `gossip`: 20 nodes, one topic; node 0 publishes 40 announcement-sized messages.
//!   Measured: per message, the time until all other nodes had it (p50/p99/max).
//!   Baseline: one hop of the same bytes over a plain tokio TCP connection (p50).
//! * `transfer`: a 64 MiB blob fetched with `fetch_blob` (verified and stored by the
//!   `BlobWriter`). Baseline: a plain tokio TCP copy of the same bytes into memory. Two
//!   like-for-like pairs are measured in the same reps: the blob stream into memory (the
//!   transport alone) vs that TCP copy, and `fetch_blob` vs a plain TCP copy into the same
//!   `BlobWriter` (hash check, fsync, install). Diagnostics split the cost, each with the
//!   cores the process kept busy: the blob stream from the store, `fetch_blob` from a
//!   memory source, the store sink alone (writes vs fsync), blake3.
//! * `commit`: 5 full nodes (network + round driver), one tiny adapter each. Measured: the
//!   time from the earliest window end to the last commit. Baseline: the configured grace
//!   period, the protocol's designed quiet time before a commit.
//! * `multi` (not in `all`: it needs root): a blob held by 4 peers whose uplinks tc shapes
//!   to 5 MB/s each, in a network namespace the benchmark makes. Measured: the fetch from
//!   all 4 at once (`fetch_blob_multi`). Baseline: the fetch from one (`fetch_blob`). Then
//!   with a holder serving garbage added: what that cost. See `multi.rs`.

use anyhow::Result;
use clap::{Parser, ValueEnum};

mod commit;
mod common;
mod gossip;
mod multi;
mod transfer;

use commit::commit;
use gossip::gossip;
use transfer::transfer;

/// Which benchmark to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Which {
    Gossip,
    Transfer,
    Commit,
    Multi,
    All,
}

/// Network benchmarks (issue 5). JSON on stdout, progress on stderr.
#[derive(Debug, Parser)]
struct Args {
    /// Benchmark to run.
    #[arg(value_enum, default_value = "all")]
    which: Which,
    /// Nodes of the gossip benchmark.
    #[arg(long, env = "BENCH_GOSSIP_NODES", default_value_t = 20)]
    gossip_nodes: usize,
    /// Messages node 0 publishes.
    #[arg(long, env = "BENCH_GOSSIP_MSGS", default_value_t = 40)]
    gossip_msgs: usize,
    /// Bytes per gossip message (an announcement is about 600).
    #[arg(long, env = "BENCH_GOSSIP_BYTES", default_value_t = 600)]
    gossip_bytes: usize,
    /// Milliseconds between two published messages.
    #[arg(long, env = "BENCH_GOSSIP_GAP_MS", default_value_t = 100)]
    gossip_gap_ms: u64,
    /// Size of the transferred blob in MiB.
    #[arg(long, env = "BENCH_BLOB_MIB", default_value_t = 64)]
    blob_mib: usize,
    /// Repetitions of the transfer (and of its TCP baseline).
    #[arg(long, env = "BENCH_REPS", default_value_t = 5)]
    reps: usize,
    /// Full nodes of the commit benchmark.
    #[arg(long, env = "BENCH_COMMIT_NODES", default_value_t = 5)]
    commit_nodes: usize,
    /// Collection window of the commit benchmark's round, in seconds.
    #[arg(long, env = "BENCH_ROUND_SECS", default_value_t = 3.0)]
    round_secs: f64,
    /// Holders of the blob in the multi-source benchmark.
    #[arg(long, default_value_t = 4)]
    holders: usize,
    /// Each holder's uplink in the multi-source benchmark, MB/s.
    #[arg(long, default_value_t = 5.0)]
    uplink_mbs: f64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let all = args.which == Which::All;
        if all || args.which == Which::Gossip {
            print(gossip(&args).await?);
        }
        if all || args.which == Which::Transfer {
            print(transfer(&args).await?);
        }
        if all || args.which == Which::Commit {
            print(commit(&args).await?);
        }
        if args.which == Which::Multi {
            if std::env::var_os(multi::INSIDE).is_some() {
                print(multi::multi_inside(&args).await?);
            } else {
                print(multi::multi_outside(&args)?);
            }
        }
        Ok(())
    })
}

fn print(v: serde_json::Value) {
    println!("{v}");
}

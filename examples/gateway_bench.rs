//! Upload throughput of the legacy REST gateway (issue 6), with its baseline measured in the
//! same run.
//!
//! ```text
//! cargo build -p hivemind-node --bin hive-node --example gateway_bench
//! target/debug/examples/gateway_bench [--uploads 50] [--users 10] [--iters 5] [--format zip]
//! ```
//!
//! The benchmark starts a real `hive-node serve` process (the binary next to this example's
//! directory, `target/<profile>/hive-node`, or `--bin`), so build both in one cargo command
//! as above: one command resolves one feature set, so the binary and the example share the
//! dependency build that `cargo test` made.
//!
//! The server runs on a tiny generated model (a rank-4 q_proj/v_proj adapter of a few KiB),
//! so the figure is the gateway's own cost per upload (HTTP, multipart, zip, validation,
//! canonical re-serialisation, blob + sled record with flush, signed announcement), not
//! the network's or the disk's bandwidth.
//!
//! Each iteration sends `--uploads` requests at once from as many threads (released by a
//! barrier; users round-robin over `--users`, every upload a distinct adapter):
//!
//! * baseline: the same number of `GET /api/v1/status` at the same concurrency (HTTP, routing
//!   and a small JSON answer), and of `GET /` (no store access at all, the constant floor).
//!   The status handler reads one index entry per user (not every upload), so its
//!   `per_s_each` stays flat while the iterations add uploads (with `--uploads 200 --users
//!   50`: 3800-5900/s from 200 to 1200 stored uploads; it read every upload before and
//!   fell to ~370/s at 1000);
//! * measured: that many `POST /api/v1/adapter/upload`.
//!
//! Requests per second of a burst = requests / (last answer - release). One warm-up
//! iteration is not counted; the JSON on stdout holds the medians over the iterations, the
//! upload/status and upload/root ratios, and the p50/p99 latency (release to answer) over all
//! counted requests. At the end the gateway must list every upload, or the run fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, ValueEnum};
use hivemind_model::adapter::LoraAdapter;
use hivemind_model::config::Arch;
use hivemind_model::testing::TinyModel;
use hivemind_node::harness::hive_node_bin;
use reqwest::blocking::{multipart, Client};
use serde_json::json;

/// How each upload is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Format {
    /// A zip of the PEFT dir (adapter_config.json + adapter_model.safetensors), as the legacy
    /// client sends it.
    Zip,
    /// The bare adapter_model.safetensors.
    Safetensors,
}

/// Legacy gateway upload benchmark. JSON on stdout, progress on stderr.
#[derive(Debug, Parser)]
struct Args {
    /// Concurrent uploads per burst.
    #[arg(long, env = "BENCH_UPLOADS", default_value_t = 50)]
    uploads: usize,
    /// Distinct users the uploads come from.
    #[arg(long, env = "BENCH_USERS", default_value_t = 10)]
    users: usize,
    /// Counted iterations (after one warm-up).
    #[arg(long, env = "BENCH_ITERS", default_value_t = 5)]
    iters: usize,
    /// How the adapters are sent.
    #[arg(long, value_enum, default_value = "zip")]
    format: Format,
    /// The hive-node binary (default: target/<profile>/hive-node next to this example).
    #[arg(long, env = "HIVE_NODE_BIN")]
    bin: Option<PathBuf>,
}

/// The `serve` process; killed on drop.
struct Serve {
    child: Child,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `serve` on a tiny model in `dir` and returns it with the gateway's base URL.
fn start_serve(bin: &Path, dir: &Path) -> Result<(Serve, String)> {
    let model = dir.join("tiny.gguf");
    TinyModel::new(Arch::Llama, 1)?.write_gguf(&model)?;
    let mut child = Command::new(bin)
        .args(["serve", "--host", "127.0.0.1", "--port", "0"])
        // Every upload comes from this one address: no per-address limit.
        .args(["--uploads-per-minute", "0"])
        .arg("--data-dir")
        .arg(dir.join("gateway"))
        .arg("--model")
        .arg(&model)
        .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
        .args(["--round-secs", "3600", "--grace-secs", "1"])
        .args(["--rank", "4", "--alpha", "8"])
        .args(["--target-modules", "q_proj,v_proj"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let out = child.stdout.take().context("serve's stdout")?;
    let serve = Serve { child };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(url) = l.strip_prefix("gateway on ") {
                let _ = tx.send(url.to_string());
            }
        }
    });
    let base = rx
        .recv_timeout(Duration::from_secs(120))
        .context("serve never printed its gateway address")?;
    Ok((serve, base))
}

/// A zip of a PEFT dir's two files at the archive root (as `shutil.make_archive` makes it).
fn peft_zip(a: &LoraAdapter) -> Result<Vec<u8>> {
    use std::io::Write;
    let mut buf = std::io::Cursor::new(Vec::new());
    let mut z = zip::ZipWriter::new(&mut buf);
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    z.start_file("adapter_config.json", opts)?;
    z.write_all(&a.config.to_json()?)?;
    z.start_file("adapter_model.safetensors", opts)?;
    z.write_all(&a.to_safetensors_bytes()?)?;
    z.finish()?;
    Ok(buf.into_inner())
}

/// One request of a burst, built before the release.
type Request = Box<dyn FnOnce() -> Result<u16> + Send>;

/// Sends every request from its own thread at once; returns the burst's wall time and each
/// request's latency from the release. Any answer other than 200 is an error.
fn burst(requests: Vec<Request>) -> Result<(Duration, Vec<Duration>)> {
    let go = Arc::new(Barrier::new(requests.len() + 1));
    let threads: Vec<_> = requests
        .into_iter()
        .map(|send| {
            let go = go.clone();
            std::thread::spawn(move || {
                go.wait();
                let start = Instant::now();
                send().map(|code| (code, start.elapsed()))
            })
        })
        .collect();
    go.wait();
    let start = Instant::now();
    let mut lat = Vec::with_capacity(threads.len());
    let mut failed = None;
    for t in threads {
        match t.join() {
            Ok(Ok((200, d))) => lat.push(d),
            Ok(Ok((code, _))) => failed = Some(format!("HTTP {code}")),
            Ok(Err(e)) => failed = Some(format!("{e:#}")),
            Err(_) => failed = Some("a request thread panicked".into()),
        }
    }
    let wall = start.elapsed();
    if let Some(f) = failed {
        bail!("a request of the burst failed: {f}");
    }
    Ok((wall, lat))
}

fn gets(http: &Client, url: &str, n: usize) -> Vec<Request> {
    (0..n)
        .map(|_| {
            let (http, url) = (http.clone(), url.to_string());
            Box::new(move || {
                let r = http.get(url).send()?;
                let code = r.status().as_u16();
                r.bytes()?;
                Ok(code)
            }) as Request
        })
        .collect()
}

fn uploads(http: &Client, base: &str, files: Vec<(String, &'static str, Vec<u8>)>) -> Vec<Request> {
    files
        .into_iter()
        .map(|(user, name, bytes)| {
            let (http, url) = (http.clone(), format!("{base}/api/v1/adapter/upload"));
            Box::new(move || {
                let form = multipart::Form::new()
                    .part("file", multipart::Part::bytes(bytes).file_name(name))
                    .text("user_id", user)
                    .text("training_samples", "10")
                    .text("epochs", "1");
                let r = http.post(url).multipart(form).send()?;
                let code = r.status().as_u16();
                let body = r.text()?;
                if code != 200 {
                    eprintln!("upload answered {code}: {body}");
                }
                Ok(code)
            }) as Request
        })
        .collect()
}

/// Nearest-rank percentile of sorted values (`p` in 0..=1).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

/// Requests per second of each burst, and every latency in ms (sorted).
#[derive(Default)]
struct Series {
    per_s: Vec<f64>,
    lat_ms: Vec<f64>,
}

impl Series {
    fn add(&mut self, (wall, lat): (Duration, Vec<Duration>)) {
        self.per_s.push(lat.len() as f64 / wall.as_secs_f64());
        self.lat_ms
            .extend(lat.iter().map(|d| d.as_secs_f64() * 1e3));
    }

    fn json(&self) -> serde_json::Value {
        let mut lat = self.lat_ms.clone();
        lat.sort_by(f64::total_cmp);
        let round = |x: f64| (x * 100.0).round() / 100.0;
        json!({
            "per_s_median": round(median(self.per_s.clone())),
            "per_s_each": self.per_s.iter().map(|&x| round(x)).collect::<Vec<_>>(),
            "latency_ms_p50": round(percentile(&lat, 0.5)),
            "latency_ms_p99": round(percentile(&lat, 0.99)),
            "latency_ms_max": round(lat.last().copied().unwrap_or(f64::NAN)),
        })
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        args.uploads > 0 && args.users > 0 && args.iters > 0,
        "counts must be positive"
    );
    let bin = hive_node_bin(args.bin.as_deref())?;
    let tmp = tempfile::tempdir()?;
    let (_serve, base) = start_serve(&bin, tmp.path())?;
    let http = Client::builder()
        .timeout(Duration::from_secs(300))
        .pool_max_idle_per_host(args.uploads)
        .build()?;

    // Every upload of every iteration is a distinct adapter, built before timing starts.
    let shape = TinyModel::new(Arch::Llama, 1)?
        .cfg
        .adapter_shape(4, &["q_proj".to_string(), "v_proj".to_string()])?;
    let total = args.uploads * (args.iters + 1);
    let mut files = Vec::with_capacity(total);
    let (mut weights_bytes, mut sent_bytes) = (0, 0);
    for i in 0..total {
        let a = hivemind_model::testing::random_adapter(&shape, 8.0, i as u64)?;
        let (name, bytes) = match args.format {
            Format::Zip => ("adapter.zip", peft_zip(&a)?),
            Format::Safetensors => ("adapter_model.safetensors", a.to_safetensors_bytes()?),
        };
        weights_bytes = a.to_safetensors_bytes()?.len();
        sent_bytes = bytes.len();
        files.push((format!("user{:03}", i % args.users), name, bytes));
    }

    let (mut up, mut status, mut root) = (Series::default(), Series::default(), Series::default());
    let status_url = format!("{base}/api/v1/status");
    let root_url = format!("{base}/");
    for it in 0..=args.iters {
        let s = burst(gets(&http, &status_url, args.uploads))?;
        let r = burst(gets(&http, &root_url, args.uploads))?;
        let batch: Vec<_> = files.drain(..args.uploads).collect();
        let u = burst(uploads(&http, &base, batch))?;
        eprintln!(
            "iteration {it}{}: {} uploads in {:?}, {} status in {:?}, {} GET / in {:?}",
            if it == 0 { " (warm-up)" } else { "" },
            args.uploads,
            u.0,
            args.uploads,
            s.0,
            args.uploads,
            r.0
        );
        if it > 0 {
            up.add(u);
            status.add(s);
            root.add(r);
        }
    }

    // Nothing lost: the gateway lists every upload.
    let listed: serde_json::Value = http.get(&status_url).send()?.json()?;
    let stored = listed["total_adapters"].as_u64().unwrap_or_default() as usize;
    ensure!(
        stored == total,
        "the gateway lists {stored} adapters, {total} were uploaded"
    );

    let up_json = up.json();
    let status_json = status.json();
    let ratio = median(up.per_s.clone()) / median(status.per_s.clone());
    let ratio_root = median(up.per_s.clone()) / median(root.per_s.clone());
    println!(
        "{}",
        json!({
            "bench": "gateway_upload",
            "format": format!("{:?}", args.format).to_lowercase(),
            "concurrency": args.uploads,
            "users": args.users,
            "iters": args.iters,
            "adapter_bytes": weights_bytes,
            "request_file_bytes": sent_bytes,
            "uploads": up_json,
            "baseline_status": status_json,
            "baseline_root": root.json(),
            "uploads_per_s": up_json["per_s_median"],
            "status_per_s": status_json["per_s_median"],
            "ratio_upload_to_status": (ratio * 1000.0).round() / 1000.0,
            "ratio_upload_to_root": (ratio_root * 1000.0).round() / 1000.0,
            "upload_latency_ms_p50": up_json["latency_ms_p50"],
            "upload_latency_ms_p99": up_json["latency_ms_p99"],
        })
    );
    Ok(())
}

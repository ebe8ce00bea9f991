//! A legacy upload client against a node's REST gateway: two users upload their adapters as
//! zips over HTTP, ask the gateway to aggregate, and download the round adapter, which is
//! byte for byte what the other node of the network committed.
//!
//! ```sh
//! cargo run --example upload_client
//! ```
//!
//! The gateway node and a second node run in this process (the harness's `Cluster`, node 0
//! with `NodeConfig::gateway` set) on a tiny generated model; the client half is plain
//! HTTP (reqwest) and would work the same against `hive-node serve` on another machine.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use hivemind_model::adapter::{CONFIG_FILE, WEIGHTS_FILE};
use hivemind_model::config::Arch;
use hivemind_model::testing::{random_adapter, TinyModel};
use hivemind_node::gateway::GatewayConfig;
use hivemind_node::harness::{node_dirs, Cluster};
use hivemind_node::node::{round_config, GatewaySettings, LoraSettings, NodeConfig};
use reqwest::multipart::{Form, Part};
use serde_json::Value;

/// The zip the legacy script sends: the adapter dir's config and weights at the zip's root.
fn zip_adapter(dir: &Path) -> Result<Vec<u8>> {
    let mut buf = std::io::Cursor::new(Vec::new());
    let mut z = zip::ZipWriter::new(&mut buf);
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for name in [CONFIG_FILE, WEIGHTS_FILE] {
        z.start_file(name, opts)?;
        z.write_all(&std::fs::read(dir.join(name))?)?;
    }
    z.finish()?;
    Ok(buf.into_inner())
}

/// The JSON body of an answer, or an error with the gateway's `detail`.
async fn json(what: &str, r: reqwest::Response) -> Result<Value> {
    let status = r.status();
    let v: Value = r
        .json()
        .await
        .with_context(|| format!("{what}: not JSON"))?;
    if !status.is_success() {
        bail!("{what}: HTTP {status}: {}", v["detail"]);
    }
    Ok(v)
}

#[tokio::main]
async fn main() -> Result<()> {
    let work = tempfile::tempdir()?;
    let model = work.path().join("tiny.gguf");
    let tiny = TinyModel::new(Arch::Llama, 1)?;
    tiny.write_gguf(&model)?;
    let lora = LoraSettings {
        rank: 4,
        alpha: 8.0,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        ..LoraSettings::default()
    };
    let dirs = node_dirs(work.path(), 2);
    // The round closes when a client asks for an aggregate, not on a timer.
    let cluster = Cluster::start(2, |i| {
        let mut cfg = NodeConfig::new(&dirs[i], &model, 3600.0);
        cfg.round = round_config(3600.0, Some(1.0));
        cfg.lora = lora.clone();
        if i == 0 {
            cfg.gateway = Some(GatewaySettings {
                bind: "127.0.0.1:0".into(),
                config: GatewayConfig {
                    max_upload_bytes: 8 << 20,
                    request_timeout: Duration::from_secs(60),
                    aggregate_wait: Duration::from_secs(60),
                    auth: Default::default(),
                    max_connections: GatewayConfig::MAX_CONNECTIONS,
                    header_timeout: GatewayConfig::HEADER_TIMEOUT,
                    uploads_per_minute: GatewayConfig::UPLOADS_PER_MINUTE,
                    user_uploads_per_minute: GatewayConfig::USER_UPLOADS_PER_MINUTE,
                },
            });
        }
        cfg
    })
    .await?;
    let result = run(&cluster, work.path(), &tiny, &lora).await;
    cluster.shutdown().await;
    result
}

async fn run(cluster: &Cluster, work: &Path, tiny: &TinyModel, lora: &LoraSettings) -> Result<()> {
    cluster.wait_connected(1, Duration::from_secs(30)).await?;
    let addr = cluster
        .node(0)
        .gateway_addr()
        .context("node 0 has no gateway")?;
    let base = format!("http://{addr}");
    let http = reqwest::Client::new();
    println!("gateway at {base}");

    // Two users upload their adapters, as `upload_to_server.py` did.
    let shape = tiny.cfg.adapter_shape(lora.rank, &lora.target_modules)?;
    for (user, seed) in [("alice", 1), ("bob", 2)] {
        let dir = work.join(format!("adapter-{user}"));
        random_adapter(&shape, lora.alpha, seed)?.write_dir(&dir)?;
        let form = Form::new()
            .part(
                "file",
                Part::bytes(zip_adapter(&dir)?).file_name(format!("{user}.zip")),
            )
            .text("user_id", user)
            .text("training_samples", "100")
            .text("epochs", "3");
        let r = http
            .post(format!("{base}/api/v1/adapter/upload"))
            .multipart(form)
            .send()
            .await?;
        let v = json(&format!("upload for {user}"), r).await?;
        println!("{user}: {}", v["message"]);
    }

    // Aggregate: the gateway's node closes the round and waits for the commit.
    let r = http.post(format!("{base}/api/v1/aggregate")).send().await?;
    let v = json("aggregate", r).await?;
    println!("aggregate: {}", v["message"]);

    // Download the round adapter and compare it with what the other node committed.
    let r = http
        .get(format!("{base}/api/v1/adapter/download/latest"))
        .send()
        .await?;
    ensure!(r.status().is_success(), "download: HTTP {}", r.status());
    let bytes = r.bytes().await?;
    let downloaded = blake3::hash(&bytes).to_hex().to_string();
    let rounds = cluster.wait_committed(1, Duration::from_secs(60)).await?;
    let other = &rounds[1];
    println!(
        "downloaded {} bytes, blake3 {downloaded}; node 1 committed {} = blake3 {}",
        bytes.len(),
        other.version,
        other.hash
    );
    ensure!(
        downloaded == other.hash,
        "the gateway served other bytes than the network agreed on"
    );
    Ok(())
}

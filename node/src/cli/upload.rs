//! `hive-node upload`: the legacy upload script as a subcommand, for users who move to the new
//! tool but keep a gateway in their workflow. It talks to any server with the legacy REST API
//! (`hive-node serve`, or the old Python server).
//!
//! ```text
//!   upload --adapter DIR ──zip (adapter_config.json + adapter_model.safetensors)──▶ POST /api/v1/adapter/upload
//!   upload --status      ──▶ GET /api/v1/status
//!   upload --download DIR ──▶ GET /api/v1/adapter/download/latest ──▶ DIR/hivemind_<version>.safetensors
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use hivemind_model::adapter::{CONFIG_FILE, WEIGHTS_FILE};
use reqwest::blocking::{multipart, Client, Response};
use serde_json::Value;

/// Arguments of `hive-node upload`.
#[derive(Debug, Clone, Args)]
pub struct UploadArgs {
    /// The PEFT adapter dir to upload (sent as a zip, as the legacy script did).
    #[arg(long, required_unless_present_any = ["status", "download"])]
    pub adapter: Option<PathBuf>,
    /// The gateway's base URL.
    #[arg(long, env = "HIVE_SERVER", default_value = "http://localhost:8000")]
    pub server: String,
    /// Your user id on the gateway (default: $USER).
    #[arg(long)]
    pub user_id: Option<String>,
    /// Training samples behind the adapter (default: from the dir's training_info.json, else 0).
    #[arg(long)]
    pub samples: Option<u64>,
    /// Training epochs (default: from training_info.json, else 0).
    #[arg(long)]
    pub epochs: Option<u64>,
    /// The base model name sent along (informational for the gateway).
    #[arg(long, default_value = crate::gateway::DEFAULT_BASE_MODEL)]
    pub base_model: String,
    /// Your user token, when the gateway requires one (sent as `Authorization: Bearer`).
    #[arg(long, env = "HIVE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the gateway's status instead of uploading.
    #[arg(long)]
    pub status: bool,
    /// Download the newest round adapter into this dir instead of uploading.
    #[arg(long)]
    pub download: Option<PathBuf>,
}

fn client() -> Result<Client> {
    Ok(Client::builder()
        .timeout(std::time::Duration::from_secs(600))
        .build()?)
}

fn url(server: &str, path: &str) -> String {
    format!("{}{path}", server.trim_end_matches('/'))
}

/// The body of a JSON answer, or an error naming the status and the server's detail.
fn json_of(what: &str, r: Response) -> Result<Value> {
    let status = r.status();
    let body = r.text().unwrap_or_default();
    let v: Value = serde_json::from_str(&body).unwrap_or(Value::String(body));
    if !status.is_success() {
        let detail = v.get("detail").cloned().unwrap_or(v);
        bail!("{what}: HTTP {status}: {detail}");
    }
    Ok(v)
}

/// A zip of the adapter dir's config and weights, at the zip's root (as
/// `shutil.make_archive(root_dir=DIR)` makes it).
fn zip_adapter_dir(dir: &Path) -> Result<Vec<u8>> {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        for name in [CONFIG_FILE, WEIGHTS_FILE] {
            let path = dir.join(name);
            let bytes = std::fs::read(&path).with_context(|| {
                format!("{} is not a PEFT adapter dir (no {name})", dir.display())
            })?;
            z.start_file(name, opts)?;
            z.write_all(&bytes)?;
        }
        z.finish()?;
    }
    Ok(buf.into_inner())
}

/// `samples` and `epochs` from the dir's `training_info.json`, when it has one.
fn training_info(dir: &Path) -> (Option<u64>, Option<u64>) {
    let info: Option<Value> = std::fs::read(dir.join("training_info.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let get = |k: &str| info.as_ref().and_then(|v| v.get(k)).and_then(Value::as_u64);
    (get("samples"), get("epochs"))
}

/// Runs `hive-node upload`.
pub(super) fn run(args: UploadArgs) -> Result<()> {
    let http = client()?;
    if args.status {
        let r = http
            .get(url(&args.server, "/api/v1/status"))
            .send()
            .with_context(|| format!("contacting {}", args.server))?;
        println!("{}", serde_json::to_string_pretty(&json_of("status", r)?)?);
        return Ok(());
    }
    if let Some(dir) = &args.download {
        let r = http
            .get(url(&args.server, "/api/v1/adapter/download/latest"))
            .send()
            .with_context(|| format!("contacting {}", args.server))?;
        if !r.status().is_success() {
            json_of("download", r)?;
            bail!("download failed");
        }
        let name = r
            .headers()
            .get(reqwest::header::CONTENT_DISPOSITION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split("filename=").nth(1))
            .map(|f| f.trim_matches('"').to_string())
            .filter(|f| !f.is_empty() && !f.contains(['/', '\\']) && !f.contains(".."))
            .unwrap_or_else(|| "hivemind_latest.safetensors".to_string());
        let bytes = r.bytes()?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(name);
        std::fs::write(&path, &bytes).with_context(|| format!("writing {}", path.display()))?;
        println!("{} ({} bytes)", path.display(), bytes.len());
        return Ok(());
    }
    let Some(dir) = &args.adapter else {
        bail!("--adapter DIR is required (or --status / --download DIR)");
    };
    let user_id = match &args.user_id {
        Some(u) => u.clone(),
        None => std::env::var("USER").unwrap_or_else(|_| "anonymous".to_string()),
    };
    crate::gateway::check_user_id(&user_id).map_err(|e| anyhow::anyhow!("--user-id: {e}"))?;
    let (info_samples, info_epochs) = training_info(dir);
    let samples = args.samples.or(info_samples).unwrap_or(0);
    let epochs = args.epochs.or(info_epochs).unwrap_or(0);
    let zip = zip_adapter_dir(dir)?;
    let file_name = format!(
        "{}.zip",
        dir.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "adapter".to_string())
    );
    let form = multipart::Form::new()
        .part("file", multipart::Part::bytes(zip).file_name(file_name))
        .text("user_id", user_id)
        .text("base_model", args.base_model.clone())
        .text("training_samples", samples.to_string())
        .text("epochs", epochs.to_string());
    super::args::progress(&format!("uploading {} to {}", dir.display(), args.server));
    let mut req = http.post(url(&args.server, "/api/v1/adapter/upload"));
    if let Some(t) = &args.token {
        req = req.bearer_auth(t);
    }
    let r = req
        .multipart(form)
        .send()
        .with_context(|| format!("contacting {}", args.server))?;
    let v = json_of("upload", r)?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

//! The legacy REST gateway of `hive-node serve`: the FastAPI server's paths, fields, JSON
//! shapes, status codes and `{"detail": ...}` errors, in front of a node of the network.
//!
//! ```text
//!   HTTP ──axum (body limit, timeout)──▶ handler ──validate──▶ Store (blob + upload record)
//!                                                     └──▶ Local::Upload ──▶ Driver (announce,
//!                                                          signed by this node, with user id)
//!   aggregate ──▶ Local::CloseNow ──▶ Driver ──▶ wait on the DriverView watch for the commit
//!   download  ──▶ Store (committed round adapter, the bytes every node agreed on)
//! ```
//!
//! Every upload is checked before anything is stored: the multipart fields, the user id,
//! the file (a `.safetensors` or a `.zip` of a PEFT dir; zip entries with absolute paths or
//! `..`, too many entries or too many inflated bytes are refused while reading), and the
//! adapter itself (safetensors header consistency, PEFT tensor names, and shapes that fit
//! the network's base model and LoRA shape). The canonical bytes of a valid adapter go into
//! the store, so every node hashes the same bytes.

use std::io::{Cursor, Read};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::multipart::{Multipart, MultipartRejection};
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hivemind_model::adapter::{AdapterConfig, Limits, LoraAdapter};
use hivemind_protocol::MAX_USER_ID_BYTES;
use hivemind_store::{Store, UploadRecord};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch};

use crate::driver::{version_name, DriverView, Local, NetSpec, Placement};

/// The legacy server's default `base_model` field.
pub const DEFAULT_BASE_MODEL: &str = "Qwen/Qwen2-7B";
/// Most entries a zip upload may hold.
const MAX_ZIP_ENTRIES: usize = 64;

/// Limits and timing of the gateway.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// Largest upload (the whole request body, and the inflated content of a zip).
    pub max_upload_bytes: u64,
    /// Longest a request may take, body upload included.
    pub request_timeout: Duration,
    /// How long `aggregate` waits for the round to commit before answering.
    pub aggregate_wait: Duration,
}

/// The gateway's shared state.
#[derive(Clone)]
pub struct Gateway {
    store: Store,
    spec: Arc<NetSpec>,
    local: mpsc::Sender<Local>,
    view: watch::Receiver<DriverView>,
    cfg: Arc<GatewayConfig>,
}

impl Gateway {
    /// A gateway over a node's store, network spec, driver channel and driver view.
    pub fn new(
        store: Store,
        spec: NetSpec,
        local: mpsc::Sender<Local>,
        view: watch::Receiver<DriverView>,
        cfg: GatewayConfig,
    ) -> Self {
        Gateway {
            store,
            spec: Arc::new(spec),
            local,
            view,
            cfg: Arc::new(cfg),
        }
    }
}

/// An HTTP error with the legacy `{"detail": ...}` body.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    detail: Value,
}

impl ApiError {
    fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            detail: Value::String(detail.into()),
        }
    }

    fn bad(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, detail)
    }

    fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "gateway request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("internal error: {e}"),
        )
    }

    /// FastAPI's 422 shape: a list of `{type, loc, msg, input}`.
    fn unprocessable(kind: &str, field: &str, msg: &str, input: Value) -> Self {
        ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            detail: json!([{ "type": kind, "loc": ["body", field], "msg": msg, "input": input }]),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "detail": self.detail }))).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// The router with every endpoint, the body limit and the request timeout.
pub fn router(gw: Gateway) -> Router {
    // The file may be up to max_upload_bytes; a body up to twice that is still read to the
    // end (and refused with 413) so the client sees the answer; beyond, the connection drops.
    let limit = usize::try_from(gw.cfg.max_upload_bytes)
        .unwrap_or(usize::MAX / 4)
        .saturating_mul(2)
        .saturating_add(1 << 20);
    let timeout = gw.cfg.request_timeout;
    Router::new()
        .route("/", get(root))
        .route("/api/v1/status", get(status))
        .route("/api/v1/adapter/upload", post(upload))
        .route("/api/v1/adapter/list", get(list))
        .route("/api/v1/aggregate", post(aggregate))
        .route("/api/v1/adapter/download/latest", get(download_latest))
        .route("/api/v1/adapter/download/{version}", get(download_version))
        .route("/openapi.json", get(openapi))
        .route("/docs", get(docs))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "Not Found") })
        .layer(DefaultBodyLimit::max(limit))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        .with_state(gw)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(ApiError::internal)?
}

async fn root() -> Json<Value> {
    Json(json!({
        "message": "HiveMind Server is running",
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

async fn status(State(gw): State<Gateway>) -> ApiResult<Json<Value>> {
    let store = gw.store.clone();
    // One index entry per user, not every upload (see Store::upload_stats).
    let (stats, pending) = blocking(move || {
        let stats = store.upload_stats().map_err(ApiError::internal)?;
        let pending = store.pending_uploads().map_err(ApiError::internal)?;
        Ok((stats, pending.len()))
    })
    .await?;
    let latest = gw.view.borrow().latest.as_ref().map(|r| r.version.clone());
    Ok(Json(json!({
        "total_adapters": stats.uploads,
        "total_users": stats.users,
        "latest_aggregated_version": latest,
        "pending_for_aggregation": pending,
    })))
}

/// Checks a user id: 1 to 128 bytes, no path separators, no `..`, no control characters.
pub fn check_user_id(user_id: &str) -> Result<(), String> {
    if user_id.trim().is_empty() {
        return Err("user_id must not be empty".into());
    }
    if user_id.len() > MAX_USER_ID_BYTES {
        return Err(format!(
            "user_id is {} bytes long; at most {MAX_USER_ID_BYTES} are allowed",
            user_id.len()
        ));
    }
    if user_id.contains(['/', '\\']) || user_id.contains("..") {
        return Err("user_id must not contain path separators or '..'".into());
    }
    if user_id.chars().any(char::is_control) {
        return Err("user_id must not contain control characters".into());
    }
    Ok(())
}

/// The multipart fields of an upload.
struct UploadForm {
    file: Option<(String, Vec<u8>)>,
    user_id: Option<String>,
    base_model: String,
    training_samples: u64,
    epochs: u64,
}

fn too_large(max: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("upload exceeds the limit of {max} bytes"),
    )
}

fn multipart_error(e: axum::extract::multipart::MultipartError) -> ApiError {
    let status = e.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::new(status, "upload exceeds the size limit of this gateway");
    }
    ApiError::new(
        status,
        format!("malformed multipart body: {}", e.body_text()),
    )
}

fn int_field(name: &str, text: &str) -> ApiResult<u64> {
    let t = text.trim();
    match t.parse::<i64>() {
        Ok(v) if v >= 0 => Ok(v as u64),
        Ok(_) => Err(ApiError::unprocessable(
            "greater_than_equal",
            name,
            "Input should be greater than or equal to 0",
            json!(t),
        )),
        Err(_) => Err(ApiError::unprocessable(
            "int_parsing",
            name,
            "Input should be a valid integer, unable to parse string as an integer",
            json!(t),
        )),
    }
}

async fn read_form(mut mp: Multipart, max_file: u64) -> ApiResult<UploadForm> {
    let mut form = UploadForm {
        file: None,
        user_id: None,
        base_model: DEFAULT_BASE_MODEL.to_string(),
        training_samples: 0,
        epochs: 0,
    };
    while let Some(mut field) = mp.next_field().await.map_err(multipart_error)? {
        let name = field.name().unwrap_or_default().to_string();
        match name.as_str() {
            "file" => {
                let filename = field.file_name().unwrap_or_default().to_string();
                let mut data = Vec::new();
                let mut seen = 0u64;
                while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
                    seen += chunk.len() as u64;
                    // Past the limit the rest is read and dropped (up to the body limit), so
                    // that clients still sending get the 413 instead of a reset connection.
                    if seen <= max_file {
                        data.extend_from_slice(&chunk);
                    }
                }
                if seen > max_file {
                    return Err(too_large(max_file));
                }
                form.file = Some((filename, data));
            }
            "user_id" | "base_model" | "training_samples" | "epochs" => {
                let text = field.text().await.map_err(multipart_error)?;
                if text.len() > 4096 {
                    return Err(ApiError::bad(format!("field {name} is too long")));
                }
                match name.as_str() {
                    "user_id" => form.user_id = Some(text),
                    "base_model" => form.base_model = text,
                    "training_samples" => form.training_samples = int_field(&name, &text)?,
                    _ => form.epochs = int_field(&name, &text)?,
                }
            }
            // Unknown fields are ignored, as FastAPI does.
            _ => while field.chunk().await.map_err(multipart_error)?.is_some() {},
        }
    }
    Ok(form)
}

/// What an uploaded file held: the safetensors bytes and, from a zip, its adapter config.
struct Extracted {
    weights: Vec<u8>,
    config: Option<AdapterConfig>,
}

/// Reads `adapter_model.safetensors` (and `adapter_config.json`) out of a zip, refusing
/// unsafe entry names, too many entries and more than `max` inflated bytes.
fn extract_zip(bytes: &[u8], max: u64) -> Result<Extracted, String> {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| format!("not a readable zip file: {e}"))?;
    if zip.len() > MAX_ZIP_ENTRIES {
        return Err(format!(
            "zip holds {} entries; at most {MAX_ZIP_ENTRIES} are allowed",
            zip.len()
        ));
    }
    let mut weights = None;
    let mut config = None;
    let mut inflated = 0u64;
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(|e| format!("zip entry {i}: {e}"))?;
        let name = entry.name().to_string();
        let unsafe_name = name.starts_with('/')
            || name.starts_with('\\')
            || name.contains(':')
            || name.split(['/', '\\']).any(|c| c == "..")
            || entry.enclosed_name().is_none();
        if unsafe_name {
            return Err(format!(
                "zip entry {name:?} has an absolute path or '..'; refused"
            ));
        }
        if entry.is_dir() {
            continue;
        }
        let base = name.rsplit(['/', '\\']).next().unwrap_or_default();
        let wanted = base == hivemind_model::adapter::WEIGHTS_FILE
            || base == hivemind_model::adapter::CONFIG_FILE;
        if !wanted {
            continue;
        }
        // Read at most what is left of the budget plus one byte: a header that lies about
        // the inflated size cannot make us inflate more.
        let left = max.saturating_sub(inflated);
        let mut data = Vec::new();
        (&mut entry)
            .take(left + 1)
            .read_to_end(&mut data)
            .map_err(|e| format!("zip entry {name:?}: {e}"))?;
        inflated += data.len() as u64;
        if inflated > max {
            return Err(format!(
                "zip content inflates past the upload limit of {max} bytes (zip bomb?)"
            ));
        }
        if base == hivemind_model::adapter::WEIGHTS_FILE {
            if weights.is_some() {
                return Err(format!(
                    "zip holds more than one {}",
                    hivemind_model::adapter::WEIGHTS_FILE
                ));
            }
            weights = Some(data);
        } else {
            if config.is_some() {
                return Err(format!(
                    "zip holds more than one {}",
                    hivemind_model::adapter::CONFIG_FILE
                ));
            }
            config = Some(AdapterConfig::from_json(&data).map_err(|e| format!("{name}: {e}"))?);
        }
    }
    let weights = weights.ok_or_else(|| {
        format!(
            "zip holds no {} (zip the PEFT adapter dir)",
            hivemind_model::adapter::WEIGHTS_FILE
        )
    })?;
    Ok(Extracted { weights, config })
}

/// Checks an uploaded file and returns the adapter's canonical bytes.
pub fn validate_upload(
    spec: &NetSpec,
    filename: &str,
    bytes: &[u8],
    max: u64,
) -> Result<Vec<u8>, String> {
    if bytes.is_empty() {
        return Err("the file is empty".into());
    }
    let is_zip = bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06");
    let lower = filename.to_ascii_lowercase();
    let extracted = if is_zip {
        extract_zip(bytes, max)?
    } else if lower.ends_with(".zip") {
        return Err(format!("{filename} is not a readable zip file"));
    } else if lower.ends_with(".safetensors") || bytes.len() >= 9 && bytes[8] == b'{' {
        Extracted {
            weights: bytes.to_vec(),
            config: None,
        }
    } else {
        return Err(format!(
            "{filename}: expected a .safetensors file or a .zip of a PEFT adapter dir"
        ));
    };
    if let Some(c) = &extracted.config {
        let want = &spec.config;
        if c.r != want.r
            || c.lora_alpha != want.lora_alpha
            || c.target_modules != want.target_modules
        {
            return Err(format!(
                "adapter_config.json (r={}, lora_alpha={}, target_modules={}) does not fit this \
                 network (r={}, lora_alpha={}, target_modules={})",
                c.r, c.lora_alpha, c.target_modules, want.r, want.lora_alpha, want.target_modules
            ));
        }
    }
    let limits = Limits {
        max_bytes: max,
        ..Limits::DEFAULT
    };
    let adapter: LoraAdapter = spec.parse(&extracted.weights, &limits)?;
    adapter.to_safetensors_bytes().map_err(|e| e.to_string())
}

async fn upload(
    State(gw): State<Gateway>,
    mp: Result<Multipart, MultipartRejection>,
) -> ApiResult<Json<Value>> {
    let mp = mp.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let form = read_form(mp, gw.cfg.max_upload_bytes).await?;
    let Some((filename, bytes)) = form.file else {
        return Err(ApiError::unprocessable(
            "missing",
            "file",
            "Field required",
            Value::Null,
        ));
    };
    let Some(user_id) = form.user_id else {
        return Err(ApiError::unprocessable(
            "missing",
            "user_id",
            "Field required",
            Value::Null,
        ));
    };
    check_user_id(&user_id).map_err(ApiError::bad)?;
    if form.base_model.len() > 256 {
        return Err(ApiError::bad("base_model is longer than 256 bytes"));
    }
    let spec = gw.spec.clone();
    let max = gw.cfg.max_upload_bytes;
    let store = gw.store.clone();
    let current = gw.view.borrow().current_round;
    let (user, samples, epochs, base_model) = (
        user_id.clone(),
        form.training_samples,
        form.epochs,
        form.base_model,
    );
    let (record, len) = blocking(move || {
        let canonical = validate_upload(&spec, &filename, &bytes, max)
            .map_err(|e| ApiError::bad(format!("invalid adapter: {e}")))?;
        let hash = store.put_blob(&canonical).map_err(ApiError::internal)?;
        let now = crate::driver::now_ms();
        let stamp = utc(now);
        let base_id = format!("{user}_{}", stamp.compact());
        let mut n = 1;
        loop {
            let id = if n == 1 {
                base_id.clone()
            } else {
                format!("{base_id}_{n}")
            };
            let record = UploadRecord {
                id,
                user_id: user.clone(),
                blob: hash,
                base_model: base_model.clone(),
                version: version_name(current),
                uploaded_at: stamp.iso(),
                training_samples: samples,
                epochs,
                round: None,
            };
            match store.insert_upload(&record) {
                Ok(()) => return Ok((record, canonical.len() as u64)),
                Err(hivemind_store::Error::UploadExists { .. }) if n < 1000 => n += 1,
                Err(e) => return Err(ApiError::internal(e)),
            }
        }
    })
    .await?;
    let (reply, rx) = oneshot::channel();
    gw.local
        .send(Local::Upload {
            hash: record.blob,
            byte_len: len,
            samples: record.training_samples,
            user_id: record.user_id.clone(),
            reply,
        })
        .await
        .map_err(|_| ApiError::internal("the node is shutting down"))?;
    let placement = rx
        .await
        .map_err(|_| ApiError::internal("the node is shutting down"))?
        .map_err(ApiError::internal)?;
    let message = match placement {
        Placement::Round(r) => format!(
            "Adapter uploaded successfully; announced in round {r} (blake3 {})",
            record.blob
        ),
        Placement::Deferred(r) => format!(
            "Adapter uploaded successfully; {} already has an adapter in this round (one per user \
             and round), so this one waits for round {r}, where the user's newest upload is \
             announced (blake3 {})",
            record.user_id, record.blob
        ),
    };
    tracing::info!(upload = %record.id, adapter = %record.blob.short(), ?placement, "gateway upload");
    Ok(Json(json!({
        "success": true,
        "adapter_id": record.id,
        "message": message,
    })))
}

#[derive(Deserialize)]
struct ListQuery {
    user_id: Option<String>,
}

fn upload_json(u: &UploadRecord) -> Value {
    let version = u.round.map_or_else(|| "pending".to_string(), version_name);
    json!({
        "id": u.id,
        "user_id": u.user_id,
        "path": format!("{}/{}", hivemind_store::BLOBS_DIR, u.blob.to_hex()),
        "metadata": {
            "user_id": u.user_id,
            "base_model": u.base_model,
            "version": version,
            "uploaded_at": u.uploaded_at,
            "training_samples": u.training_samples,
            "epochs": u.epochs,
        }
    })
}

async fn list(State(gw): State<Gateway>, Query(q): Query<ListQuery>) -> ApiResult<Json<Value>> {
    let store = gw.store.clone();
    let uploads = blocking(move || {
        match &q.user_id {
            Some(u) => store.list_uploads_by_user(u),
            None => store.list_uploads(),
        }
        .map_err(ApiError::internal)
    })
    .await?;
    Ok(Json(json!({
        "adapters": uploads.iter().map(upload_json).collect::<Vec<_>>(),
    })))
}

#[derive(Deserialize)]
struct AggregateQuery {
    version: Option<String>,
}

async fn aggregate(
    State(gw): State<Gateway>,
    Query(q): Query<AggregateQuery>,
) -> ApiResult<Json<Value>> {
    let store = gw.store.clone();
    let pending = blocking(move || store.pending_uploads().map_err(ApiError::internal)).await?;
    if pending.len() < 2 {
        return Err(ApiError::bad(format!(
            "Need at least 2 users' adapters pending for aggregation, have {}",
            pending.len()
        )));
    }
    let mut view = gw.view.clone();
    let round = view.borrow().current_round;
    gw.local
        .send(Local::CloseNow)
        .await
        .map_err(|_| ApiError::internal("the node is shutting down"))?;
    let committed = tokio::time::timeout(
        gw.cfg.aggregate_wait,
        view.wait_for(|v| v.latest.as_ref().is_some_and(|r| r.number >= round)),
    )
    .await;
    let note = match &q.version {
        Some(v) if *v != version_name(round) => {
            format!(" (requested version name {v:?} ignored: the network names rounds round-N)")
        }
        _ => String::new(),
    };
    match committed {
        Ok(Ok(v)) => {
            let r = v
                .latest
                .clone()
                .ok_or_else(|| ApiError::internal("no round"))?;
            Ok(Json(json!({
                "success": true,
                "version": r.version,
                "num_adapters": r.contributors.len(),
                "message": format!(
                    "Round {} committed: {} adapters averaged, blake3 {}{note}",
                    r.number,
                    r.contributors.len(),
                    r.hash
                ),
            })))
        }
        Ok(Err(_)) => Err(ApiError::internal("the node is shutting down")),
        Err(_) => Ok(Json(json!({
            "success": true,
            "version": version_name(round),
            "num_adapters": gw.view.borrow().current_contributors,
            "message": format!(
                "Round {round} is closed and commits once the network agrees; download it as {} \
                 when it appears in /api/v1/status{note}",
                version_name(round)
            ),
        }))),
    }
}

async fn send_round(gw: &Gateway, version: Option<String>) -> ApiResult<Response> {
    let store = gw.store.clone();
    let found = blocking(move || {
        let record = match &version {
            Some(v) => store.round_by_version(v),
            None => store.latest_round(),
        }
        .map_err(ApiError::internal)?;
        let Some(record) = record else {
            return Err(match version {
                Some(v) => ApiError::new(StatusCode::NOT_FOUND, format!("Version {v} not found")),
                None => ApiError::new(StatusCode::NOT_FOUND, "No aggregated adapter available"),
            });
        };
        let bytes = store
            .get_blob(&record.hash)
            .map_err(ApiError::internal)?
            .ok_or_else(|| {
                ApiError::internal(format!("round adapter {} is missing", record.hash))
            })?;
        Ok((record.version, bytes))
    })
    .await?;
    let (version, bytes) = found;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"hivemind_{version}.safetensors\""),
            ),
        ],
        bytes,
    )
        .into_response())
}

async fn download_latest(State(gw): State<Gateway>) -> ApiResult<Response> {
    send_round(&gw, None).await
}

async fn download_version(
    State(gw): State<Gateway>,
    UrlPath(version): UrlPath<String>,
) -> ApiResult<Response> {
    send_round(&gw, Some(version)).await
}

async fn openapi() -> Json<Value> {
    Json(openapi_document())
}

async fn docs() -> Html<String> {
    Html(docs_html(&openapi_document()))
}

/// The OpenAPI 3.1 description of every endpoint.
pub fn openapi_document() -> Value {
    let err = |desc: &str| json!({ "description": desc, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } });
    let ok = |desc: &str, schema: Value| json!({ "description": desc, "content": { "application/json": { "schema": schema } } });
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "HiveMind gateway",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The legacy HiveMind REST API, served by a node of the serverless network. Uploaded adapters are validated, stored, and announced into the current federated round; downloads return the round adapter every node committed."
        },
        "paths": {
            "/": { "get": { "summary": "Liveness", "responses": { "200": ok("Server is running", json!({ "type": "object", "properties": { "message": { "type": "string" }, "version": { "type": "string" } } })) } } },
            "/api/v1/status": { "get": { "summary": "Gateway status", "responses": { "200": ok("Counts and the latest round version", json!({ "$ref": "#/components/schemas/Status" })) } } },
            "/api/v1/adapter/upload": { "post": {
                "summary": "Upload a PEFT LoRA adapter (.safetensors, or .zip of the adapter dir)",
                "requestBody": { "required": true, "content": { "multipart/form-data": { "schema": {
                    "type": "object", "required": ["file", "user_id"],
                    "properties": {
                        "file": { "type": "string", "format": "binary", "description": "adapter_model.safetensors, or a zip of the PEFT adapter dir" },
                        "user_id": { "type": "string", "description": "1-128 bytes; no '/', '\\\\', '..' or control characters" },
                        "base_model": { "type": "string", "default": DEFAULT_BASE_MODEL },
                        "training_samples": { "type": "integer", "default": 0, "minimum": 0 },
                        "epochs": { "type": "integer", "default": 0, "minimum": 0 }
                    } } } } },
                "responses": {
                    "200": ok("Stored and announced", json!({ "type": "object", "properties": { "success": { "type": "boolean" }, "adapter_id": { "type": "string", "description": "<user_id>_<YYYYmmdd_HHMMSS>" }, "message": { "type": "string" } } })),
                    "400": err("Invalid file, adapter or user_id"),
                    "413": err("Upload over the size limit"),
                    "422": err("Missing or non-integer field")
                } } },
            "/api/v1/adapter/list": { "get": {
                "summary": "List uploaded adapters",
                "parameters": [ { "name": "user_id", "in": "query", "required": false, "schema": { "type": "string" } } ],
                "responses": { "200": ok("Uploads, oldest first", json!({ "type": "object", "properties": { "adapters": { "type": "array", "items": { "$ref": "#/components/schemas/Upload" } } } })) } } },
            "/api/v1/aggregate": { "post": {
                "summary": "Close the current round now and wait for its commit",
                "parameters": [ { "name": "version", "in": "query", "required": false, "schema": { "type": "string" }, "description": "accepted for compatibility; rounds are named round-N" } ],
                "responses": {
                    "200": ok("The round's version and size", json!({ "type": "object", "properties": { "success": { "type": "boolean" }, "version": { "type": "string" }, "num_adapters": { "type": "integer" }, "message": { "type": "string" } } })),
                    "400": err("Fewer than 2 users' adapters pending")
                } } },
            "/api/v1/adapter/download/latest": { "get": {
                "summary": "The newest round adapter (safetensors)",
                "responses": { "200": { "description": "hivemind_<version>.safetensors", "content": { "application/octet-stream": { "schema": { "type": "string", "format": "binary" } } } }, "404": err("No aggregated adapter available") } } },
            "/api/v1/adapter/download/{version}": { "get": {
                "summary": "One round adapter by version name (round-N)",
                "parameters": [ { "name": "version", "in": "path", "required": true, "schema": { "type": "string" } } ],
                "responses": { "200": { "description": "hivemind_<version>.safetensors", "content": { "application/octet-stream": { "schema": { "type": "string", "format": "binary" } } } }, "404": err("Version <v> not found") } } },
            "/openapi.json": { "get": { "summary": "This document", "responses": { "200": { "description": "OpenAPI 3.1" } } } },
            "/docs": { "get": { "summary": "Readable API documentation (HTML, works offline)", "responses": { "200": { "description": "HTML" } } } }
        },
        "components": { "schemas": {
            "Error": { "type": "object", "properties": { "detail": { "description": "a message, or for 422 a list of {type, loc, msg, input}" } } },
            "Status": { "type": "object", "properties": {
                "total_adapters": { "type": "integer" }, "total_users": { "type": "integer" },
                "latest_aggregated_version": { "type": ["string", "null"] }, "pending_for_aggregation": { "type": "integer" } } },
            "Upload": { "type": "object", "properties": {
                "id": { "type": "string" }, "user_id": { "type": "string" }, "path": { "type": "string" },
                "metadata": { "type": "object", "properties": {
                    "user_id": { "type": "string" }, "base_model": { "type": "string" }, "version": { "type": "string", "description": "round-N once in a committed round, else pending" },
                    "uploaded_at": { "type": "string" }, "training_samples": { "type": "integer" }, "epochs": { "type": "integer" } } } } }
        } }
    })
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A self-contained HTML page (no scripts, no external assets) rendered from the OpenAPI
/// document: one section per endpoint with its parameters, form fields and responses.
pub fn docs_html(doc: &Value) -> String {
    let mut out = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>HiveMind gateway API</title>\
         <style>body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.4}\
         code{background:#f3f3f3;padding:0 .2em}.m{font-weight:bold;color:#fff;padding:.1em .4em;\
         border-radius:3px}.get{background:#2a7}.post{background:#27a}section{border-top:1px solid #ccc;\
         padding:.5em 0}table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:.2em .5em}\
         </style></head><body>",
    );
    let info = &doc["info"];
    out.push_str(&format!(
        "<h1>{} {}</h1><p>{}</p><p>Machine-readable: <a href=\"/openapi.json\">/openapi.json</a></p>",
        escape(info["title"].as_str().unwrap_or_default()),
        escape(info["version"].as_str().unwrap_or_default()),
        escape(info["description"].as_str().unwrap_or_default())
    ));
    let empty = serde_json::Map::new();
    for (path, ops) in doc["paths"].as_object().unwrap_or(&empty) {
        for (method, op) in ops.as_object().unwrap_or(&empty) {
            out.push_str(&format!(
                "<section><h2><span class=\"m {method}\">{}</span> <code>{}</code></h2><p>{}</p>",
                method.to_uppercase(),
                escape(path),
                escape(op["summary"].as_str().unwrap_or_default())
            ));
            let mut rows = Vec::new();
            for p in op["parameters"].as_array().into_iter().flatten() {
                rows.push(format!(
                    "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    escape(p["name"].as_str().unwrap_or_default()),
                    escape(p["in"].as_str().unwrap_or_default()),
                    if p["required"].as_bool() == Some(true) {
                        "yes"
                    } else {
                        "no"
                    },
                    escape(p["description"].as_str().unwrap_or_default())
                ));
            }
            let form = &op["requestBody"]["content"]["multipart/form-data"]["schema"];
            let required: Vec<&str> = form["required"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            for (name, field) in form["properties"].as_object().unwrap_or(&empty) {
                let default = field
                    .get("default")
                    .map(|d| format!(" (default {d})"))
                    .unwrap_or_default();
                rows.push(format!(
                    "<tr><td><code>{}</code></td><td>form</td><td>{}</td><td>{}{}</td></tr>",
                    escape(name),
                    if required.contains(&name.as_str()) {
                        "yes"
                    } else {
                        "no"
                    },
                    escape(field["description"].as_str().unwrap_or_default()),
                    escape(&default)
                ));
            }
            if !rows.is_empty() {
                out.push_str(
                    "<table><tr><th>name</th><th>in</th><th>required</th><th>notes</th></tr>",
                );
                out.push_str(&rows.concat());
                out.push_str("</table>");
            }
            out.push_str("<ul>");
            for (code, r) in op["responses"].as_object().unwrap_or(&empty) {
                out.push_str(&format!(
                    "<li><b>{}</b> {}</li>",
                    escape(code),
                    escape(r["description"].as_str().unwrap_or_default())
                ));
            }
            out.push_str("</ul></section>");
        }
    }
    out.push_str(
        "<p>Errors are JSON: <code>{\"detail\": \"...\"}</code> (422: a list of \
         <code>{type, loc, msg, input}</code>).</p></body></html>",
    );
    out
}

/// A UTC calendar time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Utc {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
}

impl Utc {
    /// `YYYYmmdd_HHMMSS`, the legacy adapter id suffix.
    pub fn compact(&self) -> String {
        format!(
            "{:04}{:02}{:02}_{:02}{:02}{:02}",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }

    /// `YYYY-mm-ddTHH:MM:SS`.
    pub fn iso(&self) -> String {
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }
}

/// Unix milliseconds to a UTC calendar time (proleptic Gregorian; days-from-civil inverse).
pub fn utc(ms: u64) -> Utc {
    let secs = (ms / 1000) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Shift the epoch to 0000-03-01 so leap days fall at the end of a 400-year era.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    Utc {
        year,
        month,
        day,
        hour: (rem / 3600) as u32,
        minute: (rem % 3600 / 60) as u32,
        second: (rem % 60) as u32,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn utc_matches_known_dates() {
        // Independent reference values (date -u -d @SECONDS).
        let cases = [
            (0u64, "1970-01-01T00:00:00"),
            (951_782_400, "2000-02-29T00:00:00"),
            (1_709_251_199, "2024-02-29T23:59:59"),
            (1_798_761_600, "2027-01-01T00:00:00"),
            (4_107_542_400, "2100-03-01T00:00:00"),
        ];
        for (s, want) in cases {
            assert_eq!(utc(s * 1000).iso(), want, "{s}");
        }
        assert_eq!(utc(1_709_251_199_999).compact(), "20240229_235959");
    }

    #[test]
    fn user_ids_are_checked() {
        for ok in ["alice", "user-1_x", "用户", &"x".repeat(128)] {
            assert!(check_user_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "  ",
            "a/b",
            "a\\b",
            "..",
            "a..b",
            "x\u{0}y",
            &"x".repeat(129),
        ] {
            assert!(check_user_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn docs_render_every_path_of_the_openapi_document() {
        let doc = openapi_document();
        let html = docs_html(&doc);
        for path in doc["paths"].as_object().unwrap().keys() {
            assert!(html.contains(&escape(path)), "{path}");
        }
        assert!(!html.contains("<script"), "docs must work offline");
        assert!(html.contains("training_samples"));
    }
}

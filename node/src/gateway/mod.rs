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

mod auth;
mod docs;
mod error;
mod upload;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hivemind_store::{Store, UploadRecord};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

pub(crate) use auth::bearer;
pub use auth::{AuthFileError, CredentialsError, GatewayAuth, MIN_TOKEN_LEN};
pub use docs::{docs_html, openapi_document};
pub use error::ApiError;
use error::ApiResult;
pub use upload::{check_user_id, utc, validate_upload, Rejected, Utc};

use crate::driver::{version_name, DriverView, Local, NetSpec};
use crate::web::ClientAddr;

/// The legacy server's default `base_model` field.
pub const DEFAULT_BASE_MODEL: &str = "Qwen/Qwen2-7B";

/// Limits and timing of the gateway.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// Largest upload (the whole request body, and the inflated content of a zip).
    pub max_upload_bytes: u64,
    /// Longest a request may take, body upload included.
    pub request_timeout: Duration,
    /// How long `aggregate` waits for the round to commit before answering.
    pub aggregate_wait: Duration,
    /// Who may aggregate and upload (open by default).
    pub auth: GatewayAuth,
    /// Most connections served at once.
    pub max_connections: usize,
    /// A request's header must arrive within this.
    pub header_timeout: Duration,
    /// Most uploads one client address may make in a minute (0: no limit).
    pub uploads_per_minute: u32,
    /// Most uploads one user id may make in a minute, from any address (0: no limit).
    pub user_uploads_per_minute: u32,
}

impl GatewayConfig {
    /// Default of [`GatewayConfig::max_connections`].
    pub const MAX_CONNECTIONS: usize = 256;
    /// Default of [`GatewayConfig::header_timeout`].
    pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
    /// Default of [`GatewayConfig::uploads_per_minute`].
    pub const UPLOADS_PER_MINUTE: u32 = 60;
    /// Default of [`GatewayConfig::user_uploads_per_minute`]: a user uploads once a round,
    /// and may replace a bad upload a few times.
    pub const USER_UPLOADS_PER_MINUTE: u32 = 10;
}

/// Uploads per key (client IP address, user id) in the current minute (fixed windows).
#[derive(Debug)]
struct UploadRate<K> {
    minute: u64,
    counts: std::collections::HashMap<K, u32>,
}

impl<K> Default for UploadRate<K> {
    fn default() -> Self {
        UploadRate {
            minute: 0,
            counts: std::collections::HashMap::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq> UploadRate<K> {
    /// Counts an upload of `key` at `now_ms`; `false` when it is over `limit` this minute.
    fn allow(&mut self, key: K, now_ms: u64, limit: u32) -> bool {
        let minute = now_ms / 60_000;
        if minute != self.minute {
            self.minute = minute;
            self.counts.clear();
        }
        let n = self.counts.entry(key).or_insert(0);
        if *n >= limit {
            return false;
        }
        *n += 1;
        true
    }
}

/// Counts an upload of `key` in `rate` (no limit when `limit` is 0); a 429 naming `whose` when
/// it is over the limit this minute.
fn count<K: std::hash::Hash + Eq>(
    rate: &std::sync::Mutex<UploadRate<K>>,
    key: K,
    limit: u32,
    whose: &str,
) -> Result<(), ApiError> {
    if limit == 0 {
        return Ok(());
    }
    let now = crate::clock::now_ms();
    let allowed = rate
        .lock()
        .map(|mut r| r.allow(key, now, limit))
        .unwrap_or(true);
    if allowed {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("at most {limit} uploads a minute {whose}; try again shortly"),
        ))
    }
}

/// The gateway's shared state.
#[derive(Clone)]
pub struct Gateway {
    store: Store,
    spec: Arc<NetSpec>,
    local: mpsc::Sender<Local>,
    view: watch::Receiver<DriverView>,
    cfg: Arc<GatewayConfig>,
    upload_rate: Arc<std::sync::Mutex<UploadRate<std::net::IpAddr>>>,
    user_rate: Arc<std::sync::Mutex<UploadRate<String>>>,
}

impl Gateway {
    /// Counts an upload from `client` against the per-address limit.
    pub(crate) fn allow_upload(&self, client: Option<ClientAddr>) -> Result<(), ApiError> {
        let Some(ClientAddr(addr)) = client else {
            return Ok(());
        };
        let limit = self.cfg.uploads_per_minute;
        count(&self.upload_rate, addr.ip(), limit, "from one address")
    }

    /// Counts an upload of `user_id` against the per-user limit (after the address's: one
    /// user uploading from many addresses is still one user).
    pub(crate) fn allow_user_upload(&self, user_id: &str) -> Result<(), ApiError> {
        let limit = self.cfg.user_uploads_per_minute;
        count(
            &self.user_rate,
            user_id.to_string(),
            limit,
            "for one user_id",
        )
    }

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
            upload_rate: Arc::default(),
            user_rate: Arc::default(),
        }
    }
}

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
        .route("/api/v1/adapter/upload", post(upload::upload))
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

#[derive(Deserialize)]
struct StatusQuery {
    /// A user whose privacy spend to report (private networks).
    user_id: Option<String>,
}

async fn status(State(gw): State<Gateway>, Query(q): Query<StatusQuery>) -> ApiResult<Json<Value>> {
    let store = gw.store.clone();
    // A user's spend is asked for only where there is one: a private network.
    let user = q.user_id.filter(|_| gw.spec.dp.is_some());
    // One index entry per user, not every upload (see Store::upload_stats).
    let (stats, pending, user) = blocking(move || {
        let stats = store.upload_stats().map_err(ApiError::internal)?;
        let pending = store.pending_uploads().map_err(ApiError::internal)?;
        let user = match user {
            Some(u) => Some((store.user_upload_count(&u).map_err(ApiError::internal)?, u)),
            None => None,
        };
        Ok((stats, pending.len(), user))
    })
    .await?;
    let latest = gw.view.borrow().latest.as_ref().map(|r| r.version.clone());
    let mut body = json!({
        "total_adapters": stats.uploads,
        "total_users": stats.users,
        "latest_aggregated_version": latest,
        "pending_for_aggregation": pending,
    });
    // In a private network: what each upload's release costs a user, and what the users have
    // spent. Every upload is released once (noised at upload, one waiting per user at a
    // time), so a user's ε is that of as many releases as the user made uploads.
    if let Some(dp) = &gw.spec.dp {
        body["privacy"] = json!({
            "clip": dp.clip,
            "noise_multiplier": dp.noise_multiplier,
            "delta": dp.delta,
            "epsilon_per_round": dp.epsilon(1),
            "epsilon_after_10_rounds": dp.epsilon(10),
            "most_releases_by_one_user": stats.most_by_one_user,
            "epsilon_of_that_user": dp.epsilon(stats.most_by_one_user),
        });
        if let Some((releases, user)) = user {
            body["privacy"]["user"] = user_privacy(dp, &user, releases);
        }
    }
    Ok(Json(body))
}

/// A gateway user's privacy spend after `releases` uploads.
fn user_privacy(dp: &hivemind_model::dp::DpSettings, user: &str, releases: u64) -> Value {
    json!({
        "user_id": user,
        "releases": releases,
        "epsilon": dp.epsilon(releases),
    })
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
    headers: axum::http::HeaderMap,
    Query(q): Query<AggregateQuery>,
) -> ApiResult<Json<Value>> {
    gw.cfg.auth.check_admin(&headers)?;
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
            assert!(html.contains(&docs::escape(path)), "{path}");
        }
        assert!(!html.contains("<script"), "docs must work offline");
        assert!(html.contains("training_samples"));
    }
}

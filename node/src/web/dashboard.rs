//! The dashboard: one page (HTML, CSS and JavaScript embedded in the binary, no CDN) that
//! shows the node live, and its chat tab (which talks to the chat API of [`super::openai`]).
//!
//! ```text
//!   GET /ui/                 the page; /ui/app.js, /ui/style.css its assets
//!   GET /ui/api/state        one snapshot (JSON): node, peers and links, rounds, the current
//!                            round, this node's adapters, training, evals, gateway uploads
//!   GET /ui/api/events       server-sent events: a snapshot whenever it changes
//! ```
//!
//! A snapshot is read from what the node keeps in its data dir (status.json, network.json,
//! training.json, evals.json) and, on a gateway, from the store's upload index. The dashboard
//! changes nothing, so it needs no token; the gateway's routes that change things keep theirs.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Json;
use hivemind_store::Store;
use serde_json::{json, Value};

use crate::data_dir::DataDir;

const INDEX_HTML: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const STYLE_CSS: &str = include_str!("ui/style.css");

/// How often the event stream looks for a change.
const TICK: Duration = Duration::from_millis(500);
/// Uploads listed (the newest of each user, newest first).
const LISTED_UPLOADS: usize = 20;

/// Event streams open at once; more are refused (each rereads the data dir's files twice a
/// second).
const MAX_STREAMS: usize = 32;

/// What the dashboard reads.
#[derive(Clone, Debug)]
pub struct Dashboard {
    data_dir: DataDir,
    /// The gateway's store, on a node that has one.
    store: Option<Store>,
    streams: Arc<tokio::sync::Semaphore>,
}

impl Dashboard {
    /// A dashboard of the node in `data_dir` (and its gateway's uploads in `store`).
    pub fn new(data_dir: DataDir, store: Option<Store>) -> Self {
        Dashboard {
            data_dir,
            store,
            streams: Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS)),
        }
    }

    /// The snapshot the page draws (see the module docs).
    pub fn snapshot(&self) -> Value {
        let status = self.data_dir.running_status().ok();
        let network = self.data_dir.network().ok();
        let evals = self.data_dir.evals();
        let node = match (&status, &network) {
            (Some(s), n) => json!({
                "peer_id": s.peer_id,
                "listen_addrs": s.listen_addrs,
                "model_id": s.model_id,
                "base_model_hash": n.as_ref().map(|n| n.base_model_hash.clone()),
                "rule": n.as_ref().map(|n| n.rule.clone()),
                "adapter_config": s.adapter_config,
                "gateway": self.store.is_some(),
            }),
            (None, _) => Value::Null,
        };
        let peers: Vec<Value> = status
            .as_ref()
            .map(|s| {
                s.links
                    .iter()
                    .map(|(peer, links)| {
                        json!({
                            "peer_id": peer,
                            "links": links,
                            "score": s.scores.get(peer),
                            "penalties": s.penalties.get(peer).copied().unwrap_or(0),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let own: std::collections::BTreeSet<&str> = status
            .as_ref()
            .map(|s| s.own_adapters.iter().map(|a| a.hash.as_str()).collect())
            .unwrap_or_default();
        let rounds: Vec<Value> = status
            .as_ref()
            .map(|s| {
                s.rounds
                    .iter()
                    .map(|r| {
                        json!({
                            "number": r.number,
                            "version": r.version,
                            "hash": r.hash,
                            "contributors": r.contributors.len(),
                            "rule": r.rule,
                            "mine": r.contributors.iter().filter(|c| own.contains(c.as_str())).count(),
                            "eval": evals.get(&r.hash),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        // This node's adapters, newest first, and the committed round each went into.
        let mine: Vec<Value> = status
            .as_ref()
            .map(|s| {
                s.own_adapters
                    .iter()
                    .rev()
                    .map(|a| {
                        let into = s
                            .rounds
                            .iter()
                            .find(|r| r.contributors.contains(&a.hash))
                            .map(|r| r.version.clone());
                        json!({"round": a.round, "hash": a.hash, "committed_in": into})
                    })
                    .collect()
            })
            .unwrap_or_default();
        let current = status.as_ref().map(|s| {
            json!({
                "number": s.current_round,
                "contributors": s.current_contributors,
                "inbox_waiting": s.inbox_waiting,
                "transfers": s.transfers,
                "aggregating": s.aggregating,
            })
        });
        let training = self.data_dir.training().map(|(t, running)| {
            let mut v = serde_json::to_value(&t).unwrap_or(Value::Null);
            v["running"] = json!(running);
            v
        });
        json!({
            "node": node,
            "peers": peers,
            "rounds": rounds,
            "current": current,
            "mine": mine,
            "training": training,
            "uploads": self.uploads(),
        })
    }

    fn uploads(&self) -> Value {
        let Some(store) = &self.store else {
            return Value::Null;
        };
        let (Ok(stats), Ok(mut newest)) = (store.upload_stats(), store.newest_uploads()) else {
            return Value::Null;
        };
        newest.sort_by(|a, b| b.0.uploaded_at.cmp(&a.0.uploaded_at));
        newest.truncate(LISTED_UPLOADS);
        json!({
            "total": stats.uploads,
            "users": stats.users,
            "newest": newest.iter().map(|(u, count)| json!({
                "user_id": u.user_id,
                "id": u.id,
                "uploaded_at": u.uploaded_at,
                "training_samples": u.training_samples,
                "round": u.round,
                "uploads": count,
            })).collect::<Vec<_>>(),
        })
    }
}

async fn snapshot_of(d: Arc<Dashboard>) -> Value {
    tokio::task::spawn_blocking(move || d.snapshot())
        .await
        .unwrap_or(Value::Null)
}

/// `GET /ui/api/state`.
pub(crate) async fn state(State(d): State<Arc<Dashboard>>) -> Json<Value> {
    Json(snapshot_of(d).await)
}

/// `GET /ui/api/events`: the snapshot at once, then again whenever it changes; 503 when
/// [`MAX_STREAMS`] are open.
pub(crate) async fn events(State(d): State<Arc<Dashboard>>) -> Response {
    let Ok(permit) = d.streams.clone().try_acquire_owned() else {
        return (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            format!("at most {MAX_STREAMS} dashboards may be open at once"),
        )
            .into_response();
    };
    let state = (d, None::<Value>, permit);
    let stream = futures::stream::unfold(state, |(d, last, permit)| async move {
        loop {
            let now = snapshot_of(d.clone()).await;
            if last.as_ref() != Some(&now) {
                let ev = Event::default().event("state").data(now.to_string());
                return Some((Ok::<_, Infallible>(ev), (d, Some(now), permit)));
            }
            tokio::time::sleep(TICK).await;
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `GET /ui/`.
pub(crate) async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

/// `GET /ui/app.js`.
pub(crate) async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

/// `GET /ui/style.css`.
pub(crate) async fn style_css() -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

/// `GET /ui`: to `/ui/`, so the page's relative asset paths resolve.
pub(crate) async fn to_index() -> Redirect {
    Redirect::permanent("/ui/")
}

//! The node's HTTP server: the routes every node can serve (the dashboard in [`dashboard`],
//! the OpenAI-compatible chat API in [`openai`] over the [`Engine`] that holds the model), and
//! the server itself ([`serve`]: connection cap, header timeout) that also carries the legacy
//! gateway's routes for `hive-node serve`.
//!
//! ```text
//!   join --http ADDR ──▶ serve(web::router)                   (GET / redirects to /ui/)
//!   serve --port N   ──▶ serve(gateway::router + web::router)  (GET / is the legacy JSON)
//!   web::router: /ui/... ──▶ Dashboard (data dir files, gateway store)
//!                /v1/models, /v1/chat/completions ──▶ Engine (base model + adapters)
//! ```

mod dashboard;
mod engine;
mod openai;
mod serve;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;

pub use dashboard::Dashboard;
pub use engine::{ChatError, ChatModel, Engine, ListedModel, DEFAULT_MAX_TOKENS};
pub(crate) use serve::serve;
pub use serve::ClientAddr;

/// Largest chat request body.
const MAX_CHAT_BODY: usize = 4 << 20;

/// The dashboard's and the chat API's routes (no fallback: they merge into the gateway's
/// router). `root` adds `GET /` as a redirect to the dashboard (not on a gateway, whose `/`
/// is the legacy server's).
pub fn router(engine: Arc<Engine>, dashboard: Arc<Dashboard>, root: bool) -> Router {
    let chat = Router::new()
        .route("/v1/models", get(openai::models))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .layer(DefaultBodyLimit::max(MAX_CHAT_BODY))
        .with_state(engine);
    let ui = Router::new()
        .route("/ui", get(dashboard::to_index))
        .route("/ui/", get(dashboard::index))
        .route("/ui/app.js", get(dashboard::app_js))
        .route("/ui/style.css", get(dashboard::style_css))
        .route("/ui/api/state", get(dashboard::state))
        .route("/ui/api/events", get(dashboard::events))
        .with_state(dashboard);
    let mut r = chat.merge(ui);
    if root {
        r = r.route("/", get(dashboard::to_index));
    }
    r
}

//! The web routes' key (`--api-key`), as llama.cpp's server has one: when it is set, the chat
//! API and the dashboard's data answer only requests that carry it.
//!
//! - OpenAI clients send it as `Authorization: Bearer KEY` (the `api_key` of the `openai`
//!   client);
//! - the dashboard page asks for it once and `POST /ui/api/login` (`{"key": "..."}`) checks it
//!   and sets it as an HttpOnly, SameSite=Strict cookie, because `EventSource` cannot send
//!   headers.
//!
//! The page itself (HTML, script, style: no data) loads without the key, so it can ask for it.
//! Keys are compared by their blake3 hashes (constant time), never logged or echoed. Without a
//! key the routes stay open to whoever reaches them (only this machine, unless the operator
//! opened them).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

/// The cookie the dashboard holds the key in.
const COOKIE: &str = "hive_key";

/// Keys shorter than this are refused: they could be guessed.
pub const MIN_KEY_LEN: usize = crate::gateway::MIN_TOKEN_LEN;

/// A key [`ApiKey::new`] refuses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// Too short.
    #[error("the API key must be at least {MIN_KEY_LEN} characters")]
    Short,
    /// A character a cookie or a header cannot carry.
    #[error("the API key may hold only printable ASCII without spaces, quotes, commas, semicolons or backslashes")]
    Characters,
}

/// The web routes' key.
#[derive(Clone, Debug)]
pub struct ApiKey(blake3::Hash);

impl ApiKey {
    /// Checks `key` (length, characters a cookie can carry).
    pub fn new(key: &str) -> Result<Self, KeyError> {
        if key.len() < MIN_KEY_LEN {
            return Err(KeyError::Short);
        }
        let ok = |b: u8| b.is_ascii_graphic() && !matches!(b, b'"' | b',' | b';' | b'\\');
        if !key.bytes().all(ok) {
            return Err(KeyError::Characters);
        }
        Ok(ApiKey(blake3::hash(key.as_bytes())))
    }

    fn matches(&self, candidate: &str) -> bool {
        blake3::hash(candidate.as_bytes()) == self.0
    }

    /// Whether `headers` carry the key, as a bearer token or as the dashboard's cookie.
    fn carried_by(&self, headers: &HeaderMap) -> bool {
        if crate::gateway::bearer(headers).is_some_and(|t| self.matches(t)) {
            return true;
        }
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
            .any(|v| self.matches(v))
    }
}

/// Paths that carry no data and load without the key (the page that asks for it).
fn open_path(path: &str) -> bool {
    matches!(
        path,
        "/" | "/ui" | "/ui/" | "/ui/app.js" | "/ui/style.css" | "/ui/api/login"
    )
}

fn needs_key() -> Response {
    let mut r = (
        StatusCode::UNAUTHORIZED,
        Json(serde_json::json!({"error": {
            "message": "this node's web API needs its key: send `Authorization: Bearer KEY` \
                        (the api_key of OpenAI clients) or log in on the dashboard",
            "type": "invalid_request_error",
            "param": null,
            "code": "invalid_api_key",
        }})),
    )
        .into_response();
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// Lets a request through when no key is set, when its path is open, or when it carries the
/// key; answers 401 otherwise.
pub(crate) async fn require(
    State(key): State<Option<Arc<ApiKey>>>,
    req: Request,
    next: Next,
) -> Response {
    match key {
        Some(key) if !open_path(req.uri().path()) && !key.carried_by(req.headers()) => needs_key(),
        _ => next.run(req).await,
    }
}

#[derive(Deserialize)]
pub(crate) struct Login {
    key: String,
}

/// `POST /ui/api/login`: checks the key and sets the dashboard's cookie (204); 401 for a wrong
/// key; 204 and no cookie when the node has no key.
pub(crate) async fn login(
    State(key): State<Option<Arc<ApiKey>>>,
    Json(body): Json<Login>,
) -> Response {
    let Some(key) = key else {
        return StatusCode::NO_CONTENT.into_response();
    };
    // A key that matches passed ApiKey::new's character check, so it fits in a cookie.
    if !key.matches(&body.key) {
        return needs_key();
    }
    let cookie = format!("{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/", body.key);
    match HeaderValue::from_str(&cookie) {
        Ok(v) => (StatusCode::NO_CONTENT, [(header::SET_COOKIE, v)]).into_response(),
        Err(_) => needs_key(),
    }
}

//! The web routes' key (`--api-key`), as llama.cpp's server has one: when it is set, the chat
//! API and the dashboard's data answer only requests that carry it.
//!
//! - OpenAI clients send it as `Authorization: Bearer KEY` (the `api_key` of the `openai`
//!   client);
//! - the dashboard page asks for it once and `POST /ui/api/login` (`{"key": "..."}`) checks it
//!   and sets an HttpOnly, SameSite=Strict session cookie, because `EventSource` cannot send
//!   headers. The cookie holds a random token of this process, not the key (browsers send a
//!   host's cookies to all its ports), under a name of its own (two nodes on one host keep
//!   theirs); it ends when the node restarts.
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

/// Prefix of the dashboard's session cookie's name.
const COOKIE_PREFIX: &str = "hive_session_";

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

/// The web routes' key, and this process's dashboard session token.
#[derive(Clone, Debug)]
pub struct ApiKey {
    key: blake3::Hash,
    /// The session cookie's value (hex of 32 random bytes).
    session: String,
}

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
        let session: [u8; 32] = rand::random();
        Ok(ApiKey {
            key: blake3::hash(key.as_bytes()),
            session: blake3::Hash::from(session).to_hex().to_string(),
        })
    }

    fn matches(&self, candidate: &str) -> bool {
        blake3::hash(candidate.as_bytes()) == self.key
    }

    /// The session cookie's name: its prefix and the start of its value.
    fn cookie_name(&self) -> String {
        format!("{COOKIE_PREFIX}{}", &self.session[..16])
    }

    /// Whether `headers` carry the key, as a bearer token or as the dashboard's cookie.
    fn carried_by(&self, headers: &HeaderMap) -> bool {
        if crate::gateway::bearer(headers).is_some_and(|t| self.matches(t)) {
            return true;
        }
        // Compared as hashes, like the key: the token's bytes leak nothing through timing.
        let want = blake3::hash(self.session.as_bytes());
        let name = self.cookie_name();
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().strip_prefix(name.as_str())?.strip_prefix('='))
            .any(|v| blake3::hash(v.as_bytes()) == want)
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
    if !key.matches(&body.key) {
        return needs_key();
    }
    let cookie = format!(
        "{}={}; HttpOnly; SameSite=Strict; Path=/",
        key.cookie_name(),
        key.session
    );
    match HeaderValue::from_str(&cookie) {
        Ok(v) => (StatusCode::NO_CONTENT, [(header::SET_COOKIE, v)]).into_response(),
        Err(_) => needs_key(),
    }
}

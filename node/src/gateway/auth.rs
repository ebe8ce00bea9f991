//! Who may do what at the gateway. Open by default, as the legacy server was (its upload
//! script sends no credentials); an operator closes it with tokens:
//! - `--admin-token`: `POST /api/v1/aggregate` (which closes the round for everyone) needs
//!   `Authorization: Bearer <admin token>`;
//! - `--user-tokens FILE` (a JSON object `{"user id": "token", ...}`): an upload needs the
//!   bearer token of its `user_id`, checked before the body is read; user ids not in the file
//!   cannot upload.
//!
//! Tokens are compared by their blake3 hashes (constant time), never logged or echoed.

use std::collections::BTreeMap;
use std::path::Path;

use axum::http::{header, HeaderMap, StatusCode};

use super::error::ApiError;

/// The gateway's credentials; [`GatewayAuth::default`] is an open gateway.
#[derive(Clone, Debug, Default)]
pub struct GatewayAuth {
    /// blake3 of the admin token, when one is set.
    admin: Option<blake3::Hash>,
    /// blake3 of each user's token, to the user id; `None`: anyone uploads as anyone.
    users: Option<BTreeMap<[u8; 32], String>>,
}

/// Credentials [`GatewayAuth::new`] refuses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CredentialsError {
    /// The admin token is too short to be safe.
    #[error("the admin token must be at least {MIN_TOKEN_LEN} characters")]
    ShortAdminToken,
    /// A user's token is too short to be safe.
    #[error("the token of user {user:?} must be at least {MIN_TOKEN_LEN} characters")]
    ShortUserToken {
        /// The user.
        user: String,
    },
    /// A user id that cannot upload.
    #[error("user id {user:?}: {reason}")]
    BadUserId {
        /// The user id.
        user: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Two users share a token, so an upload could not say who sent it.
    #[error("user {user:?} shares its token with another user")]
    SharedToken {
        /// One of the two.
        user: String,
    },
}

/// What can be wrong with a user-tokens file.
#[derive(Debug, thiserror::Error)]
pub enum AuthFileError {
    /// It cannot be read.
    #[error("cannot read the user tokens file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It is not a JSON object of strings.
    #[error(
        "the user tokens file {path} is not a JSON object of \"user id\": \"token\": {source}"
    )]
    Json {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A user id or token that cannot be used.
    #[error("the user tokens file {path}: {problem}")]
    Entry {
        /// The file.
        path: String,
        /// What is wrong (the token itself is never shown).
        problem: String,
    },
}

/// Tokens shorter than this are refused: they could be guessed.
pub const MIN_TOKEN_LEN: usize = 16;

impl GatewayAuth {
    /// A gateway that needs `admin` for aggregation (if given) and the tokens of `users`
    /// (user id to token) for uploads (if given).
    pub fn new(
        admin: Option<&str>,
        users: Option<BTreeMap<String, String>>,
    ) -> Result<Self, CredentialsError> {
        if admin.is_some_and(|t| t.len() < MIN_TOKEN_LEN) {
            return Err(CredentialsError::ShortAdminToken);
        }
        let users = match users {
            None => None,
            Some(map) => {
                let mut by_hash = BTreeMap::new();
                for (user, token) in map {
                    super::check_user_id(&user).map_err(|e| CredentialsError::BadUserId {
                        user: user.clone(),
                        reason: e.to_string(),
                    })?;
                    if token.len() < MIN_TOKEN_LEN {
                        return Err(CredentialsError::ShortUserToken { user });
                    }
                    let h = *blake3::hash(token.as_bytes()).as_bytes();
                    if by_hash.insert(h, user.clone()).is_some() {
                        return Err(CredentialsError::SharedToken { user });
                    }
                }
                Some(by_hash)
            }
        };
        Ok(GatewayAuth {
            admin: admin.map(|t| blake3::hash(t.as_bytes())),
            users,
        })
    }

    /// Reads a user-tokens file (see the module docs).
    pub fn read_user_tokens(path: &Path) -> Result<BTreeMap<String, String>, AuthFileError> {
        let name = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| AuthFileError::Read {
            path: name.clone(),
            source,
        })?;
        let map: BTreeMap<String, String> =
            serde_json::from_slice(&bytes).map_err(|source| AuthFileError::Json {
                path: name.clone(),
                source,
            })?;
        if map.is_empty() {
            return Err(AuthFileError::Entry {
                path: name,
                problem: "it names no user".into(),
            });
        }
        Ok(map)
    }

    /// Whether uploads need a user token.
    pub fn closed_uploads(&self) -> bool {
        self.users.is_some()
    }

    /// Checks `POST /api/v1/aggregate`'s credentials.
    pub(crate) fn check_admin(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(want) = &self.admin else {
            return Ok(());
        };
        match bearer(headers) {
            Some(t) if blake3::hash(t.as_bytes()) == *want => Ok(()),
            Some(_) => Err(unauthorized("the admin token is wrong")),
            None => Err(unauthorized(
                "aggregation on this gateway needs the operator's token (Authorization: Bearer)",
            )),
        }
    }

    /// The user an upload's token belongs to: `None` on an open gateway.
    pub(crate) fn upload_user(&self, headers: &HeaderMap) -> Result<Option<String>, ApiError> {
        let Some(users) = &self.users else {
            return Ok(None);
        };
        let Some(t) = bearer(headers) else {
            return Err(unauthorized(
                "uploads to this gateway need your user token (Authorization: Bearer)",
            ));
        };
        // A BTreeMap lookup compares hashes, not tokens: nothing about a token leaks.
        match users.get(blake3::hash(t.as_bytes()).as_bytes()) {
            Some(user) => Ok(Some(user.clone())),
            None => Err(unauthorized("unknown user token")),
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn unauthorized(detail: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weak_or_ambiguous_credentials_are_refused_by_name() {
        let users = |pairs: &[(&str, &str)]| {
            Some(
                pairs
                    .iter()
                    .map(|(u, t)| (u.to_string(), t.to_string()))
                    .collect::<BTreeMap<_, _>>(),
            )
        };
        let err = |r: Result<GatewayAuth, CredentialsError>| {
            r.err().map(|e| e.to_string()).unwrap_or_default()
        };
        assert!(err(GatewayAuth::new(Some("short"), None)).contains("admin token"));
        assert!(err(GatewayAuth::new(None, users(&[("amy", "tiny")]))).contains("\"amy\""));
        let shared = users(&[
            ("amy", "same-token-0123456789"),
            ("bo", "same-token-0123456789"),
        ]);
        assert!(err(GatewayAuth::new(None, shared)).contains("shares its token"));
        assert!(err(GatewayAuth::new(
            None,
            users(&[("a/b", "token-0123456789abc")])
        ))
        .contains("a/b"));
        let open = GatewayAuth::new(None, None).unwrap_or_default();
        assert!(!open.closed_uploads());
        assert!(open.check_admin(&HeaderMap::new()).is_ok());
    }
}

//! [`ApiError`]: every failure of the gateway as the legacy server shaped it,
//! `{"detail": ...}` with the right status (422s as FastAPI's list of field errors).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

/// An HTTP error with the legacy `{"detail": ...}` body.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    detail: Value,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            detail: Value::String(detail.into()),
        }
    }

    pub(crate) fn bad(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, detail)
    }

    /// A failure of the node itself: the whole error (which may name files in the data dir)
    /// goes to the node's log under a number; the client gets only the number.
    pub(crate) fn internal(e: impl std::fmt::Display) -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::error!(error = %e, incident = n, "gateway request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("internal error (incident {n} in the node's log)"),
        )
    }

    /// FastAPI's 422 shape: a list of `{type, loc, msg, input}`.
    pub(crate) fn unprocessable(kind: &str, field: &str, msg: &str, input: Value) -> Self {
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

pub(crate) type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    /// A 500 used to carry the error text, with paths inside the data dir.
    #[tokio::test]
    async fn an_internal_error_names_an_incident_not_the_data_dir() {
        let e = std::io::Error::other("No space left on device: /srv/hive/data/blobs/ab/tmp-1");
        let response = ApiError::internal(e).into_response();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains("incident"), "{text}");
        assert!(
            !text.contains("/srv/hive") && !text.contains("No space"),
            "{text}"
        );
    }
}

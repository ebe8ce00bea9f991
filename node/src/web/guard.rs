//! What every web route checks before it runs, against other machines and against web pages in
//! the user's own browser:
//!
//! - a client that is not on this machine is refused when the routes are local-only (the
//!   gateway's port, which is public for the legacy API);
//! - a client on this machine must name this machine in `Host` (`localhost`, a loopback
//!   address): a page whose host name was rebound to 127.0.0.1 (DNS rebinding) names its own;
//! - a request with an `Origin` must come from the same host it is sent to: another site's
//!   page cannot drive the chat API (`fetch` with `mode: "no-cors"` still sends the request);
//! - a POST must be `application/json`, which a cross-site form or simple request cannot send
//!   without a CORS preflight (that this server never answers).
//!
//! Requests without a client address (not served by [`super::serve`]) are refused.

use std::net::IpAddr;

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::ClientAddr;

fn refuse(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(serde_json::json!({"error": {
            "message": message, "type": "forbidden", "param": null, "code": code,
        }})),
    )
        .into_response()
}

/// The host of a `Host` header or an origin's authority (`name`, `name:port`, `[v6]:port`),
/// lowercased, without port or brackets.
fn host_of(authority: &str) -> String {
    let a = authority.trim().to_ascii_lowercase();
    if let Some(rest) = a.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default().to_string();
    }
    match a.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h.to_string(),
        _ => a,
    }
}

/// Whether `host` names this machine: `localhost` (or a name under it) or a loopback address.
fn is_local_name(host: &str) -> bool {
    host == "localhost"
        || host.ends_with(".localhost")
        || host
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// The checks of the module docs; `local_only` refuses clients not on loopback.
pub(crate) async fn guard(State(local_only): State<bool>, req: Request, next: Next) -> Response {
    let Some(ClientAddr(client)) = req.extensions().get::<ClientAddr>().copied() else {
        return refuse(StatusCode::FORBIDDEN, "no_client", "no client address");
    };
    let local_client = client.ip().to_canonical().is_loopback();
    if local_only && !local_client {
        return refuse(
            StatusCode::FORBIDDEN,
            "local_only",
            "the dashboard and the chat API answer only clients on this machine (start \
             `hive-node serve` with --web-public to open them)",
        );
    }
    let headers = req.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(host_of);
    if local_client && !host.as_deref().is_some_and(is_local_name) {
        return refuse(
            StatusCode::FORBIDDEN,
            "host",
            "open the dashboard as http://localhost:PORT or http://127.0.0.1:PORT (a request \
             from this machine must name it in Host)",
        );
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin_host = origin
            .to_str()
            .ok()
            .and_then(|o| o.split_once("://"))
            .map(|(_, authority)| host_of(authority));
        if origin_host.is_none() || origin_host != host {
            return refuse(
                StatusCode::FORBIDDEN,
                "origin",
                "requests from another site's pages are refused",
            );
        }
    }
    if req.method() == Method::POST {
        let json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|c| c.to_str().ok())
            .is_some_and(|c| {
                c.trim_start()
                    .to_ascii_lowercase()
                    .starts_with("application/json")
            });
        if !json {
            return refuse(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "content_type",
                "send the request body as application/json",
            );
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_read_and_named() {
        assert_eq!(host_of("LocalHost:8080"), "localhost");
        assert_eq!(host_of("[::1]:80"), "::1");
        assert_eq!(host_of("127.0.0.1"), "127.0.0.1");
        assert_eq!(host_of("evil.example:1"), "evil.example");
        for ok in [
            "localhost",
            "ui.localhost",
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(is_local_name(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "localhost.evil.example",
            "192.0.2.1",
            "",
            "0.0.0.0",
        ] {
            assert!(!is_local_name(bad), "{bad}");
        }
    }
}

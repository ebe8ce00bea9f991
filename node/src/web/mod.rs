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
//!   every route: guard (local only, DNS rebinding, cross-site) ─▶ key (`--api-key`, if set)
//! ```

mod dashboard;
mod engine;
mod guard;
mod key;
mod openai;
mod serve;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;

pub use dashboard::Dashboard;
pub use engine::{ChatError, ChatModel, Engine, ListedModel, DEFAULT_MAX_TOKENS};
pub use key::{ApiKey, KeyError, MIN_KEY_LEN};
pub(crate) use serve::serve;
pub use serve::ClientAddr;

/// Largest chat request body.
const MAX_CHAT_BODY: usize = 4 << 20;
/// A request body must arrive within this (a slow sender must not hold a connection).
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The dashboard's and the chat API's routes (no fallback: they merge into the gateway's
/// router). `root` adds `GET /` as a redirect to the dashboard (not on a gateway, whose `/`
/// is the legacy server's); `local_only` answers only clients on loopback (the gateway's port
/// is public by default, the dashboard and chat API are not). Every route is behind
/// [`guard::guard`] (DNS rebinding, cross-site requests), then [`key::require`] when `key` is
/// set.
pub fn router(
    engine: Arc<Engine>,
    dashboard: Arc<Dashboard>,
    root: bool,
    local_only: bool,
    key: Option<Arc<ApiKey>>,
) -> Router {
    let chat = Router::new()
        .route("/v1/models", get(openai::models))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .layer(DefaultBodyLimit::max(MAX_CHAT_BODY))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            BODY_TIMEOUT,
        ))
        .with_state(engine);
    let ui = Router::new()
        .route("/ui", get(dashboard::to_index))
        .route("/ui/", get(dashboard::index))
        .route("/ui/app.js", get(dashboard::app_js))
        .route("/ui/style.css", get(dashboard::style_css))
        .route("/ui/api/state", get(dashboard::state))
        .route("/ui/api/events", get(dashboard::events))
        .with_state(dashboard);
    let login = Router::new()
        .route("/ui/api/login", post(key::login))
        .layer(DefaultBodyLimit::max(4096))
        .with_state(key.clone());
    let mut r = chat.merge(ui).merge(login);
    if root {
        r = r.route("/", get(dashboard::to_index));
    }
    r.layer(axum::middleware::from_fn_with_state(key, key::require))
        .layer(axum::middleware::from_fn_with_state(
            local_only,
            guard::guard,
        ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    fn request(
        method: &str,
        path: &str,
        from: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Request<Body> {
        let mut b = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let mut req = b.body(Body::from("{}")).unwrap();
        if let Some(from) = from {
            req.extensions_mut()
                .insert(ClientAddr(from.parse().unwrap()));
        }
        req
    }

    const LOCAL: &[(&str, &str)] = &[("host", "127.0.0.1:8080")];

    /// An engine (with no model: only the routes are exercised) and a dashboard on `dir`.
    fn parts(dir: &std::path::Path) -> (Arc<Engine>, Arc<Dashboard>) {
        let data = crate::DataDir::new(dir);
        let engine = Arc::new(Engine::new(dir.join("none.gguf"), data.clone(), None));
        (engine, Arc::new(Dashboard::new(data, None)))
    }

    #[tokio::test]
    async fn the_guard_refuses_remote_clients_rebound_hosts_and_other_sites() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, board) = parts(dir.path());
        let guarded = router(engine.clone(), board.clone(), false, true, None);
        let status = |r: &Router, req: Request<Body>| {
            let r = r.clone();
            async move { r.oneshot(req).await.unwrap().status() }
        };
        for path in ["/v1/models", "/ui/", "/ui/api/state"] {
            let remote = request(
                "GET",
                path,
                Some("192.0.2.7:5000"),
                &[("host", "192.0.2.1")],
            );
            assert_eq!(
                status(&guarded, remote).await,
                StatusCode::FORBIDDEN,
                "{path}"
            );
            for local in ["127.0.0.1:5000", "[::1]:5000", "[::ffff:127.0.0.1]:5000"] {
                let r = request("GET", path, Some(local), LOCAL);
                assert_eq!(
                    status(&guarded, r).await,
                    StatusCode::OK,
                    "{path} from {local}"
                );
            }
            // DNS rebinding: a local browser sent by a page of another host name.
            let rebound = request(
                "GET",
                path,
                Some("127.0.0.1:5000"),
                &[("host", "evil.example:8080")],
            );
            assert_eq!(
                status(&guarded, rebound).await,
                StatusCode::FORBIDDEN,
                "{path}"
            );
            // No client address: refused.
            assert_eq!(
                status(&guarded, request("GET", path, None, LOCAL)).await,
                StatusCode::FORBIDDEN
            );
        }
        // Another site's page posting to the chat API, with or without a JSON type.
        let json = ("content-type", "application/json");
        let cross = request(
            "POST",
            "/v1/chat/completions",
            Some("127.0.0.1:5000"),
            &[LOCAL[0], ("origin", "https://evil.example"), json],
        );
        assert_eq!(status(&guarded, cross).await, StatusCode::FORBIDDEN);
        let plain = request(
            "POST",
            "/v1/chat/completions",
            Some("127.0.0.1:5000"),
            &[LOCAL[0], ("content-type", "text/plain")],
        );
        assert_eq!(
            status(&guarded, plain).await,
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        // The dashboard's own page (same origin) and a script (no origin) get through the
        // guard to the handler (which refuses the empty request itself).
        for extra in [
            vec![LOCAL[0], json, ("origin", "http://127.0.0.1:8080")],
            vec![LOCAL[0], json],
        ] {
            let r = request(
                "POST",
                "/v1/chat/completions",
                Some("127.0.0.1:5000"),
                &extra,
            );
            assert_eq!(status(&guarded, r).await, StatusCode::BAD_REQUEST);
        }
        // Public routes (`--web-public`, `--http` on an address the user chose) serve others.
        let open = router(engine, board, true, false, None);
        let r = request(
            "GET",
            "/v1/models",
            Some("192.0.2.7:5000"),
            &[("host", "192.0.2.1")],
        );
        assert_eq!(status(&open, r).await, StatusCode::OK);
    }

    #[tokio::test]
    async fn with_a_key_the_data_routes_need_it_as_bearer_or_login_cookie() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, board) = parts(dir.path());
        const KEY: &str = "correct-horse-battery-staple";
        assert_eq!(ApiKey::new("short").unwrap_err(), KeyError::Short);
        assert_eq!(
            ApiKey::new("sixteen chars and a space").unwrap_err(),
            KeyError::Characters
        );
        let key = Some(Arc::new(ApiKey::new(KEY).unwrap()));
        let app = router(engine, board, true, true, key);
        let send = |req: Request<Body>| {
            let r = app.clone();
            async move { r.oneshot(req).await.unwrap() }
        };
        let local = Some("127.0.0.1:5000");
        let json = ("content-type", "application/json");
        let bearer = format!("Bearer {KEY}");
        let wrong = "Bearer correct-horse-battery-stapler".to_string();
        for path in ["/v1/models", "/ui/api/state"] {
            let r = send(request("GET", path, local, LOCAL)).await;
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path}");
            assert_eq!(r.headers()["www-authenticate"], "Bearer");
            for (auth, want) in [
                (&wrong, StatusCode::UNAUTHORIZED),
                (&bearer, StatusCode::OK),
            ] {
                let headers = [LOCAL[0], ("authorization", auth.as_str())];
                let r = send(request("GET", path, local, &headers)).await;
                assert_eq!(r.status(), want, "{path} with {auth}");
            }
        }
        // The chat API refuses before reading the request.
        let r = send(request(
            "POST",
            "/v1/chat/completions",
            local,
            &[LOCAL[0], json],
        ))
        .await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        // The page that asks for the key loads without it.
        for path in ["/ui/", "/ui/app.js", "/ui/style.css"] {
            let r = send(request("GET", path, local, LOCAL)).await;
            assert_eq!(r.status(), StatusCode::OK, "{path}");
        }
        // Login: a wrong key gets 401 and no cookie; the right one a cookie that opens the
        // dashboard's data (EventSource sends no headers but cookies).
        let login = |key: &str| {
            let mut req = Request::builder()
                .method("POST")
                .uri("/ui/api/login")
                .header("host", "127.0.0.1:8080")
                .header("content-type", "application/json")
                .body(Body::from(serde_json::json!({ "key": key }).to_string()))
                .unwrap();
            req.extensions_mut()
                .insert(ClientAddr("127.0.0.1:5000".parse().unwrap()));
            send(req)
        };
        let r = login("correct-horse-battery-stapler").await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert!(r.headers().get("set-cookie").is_none());
        let r = login(KEY).await;
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
        assert!(
            cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
            "{cookie}"
        );
        let pair = cookie.split(';').next().unwrap().to_string();
        assert!(
            !pair.contains(KEY),
            "the cookie holds a session token, not the key"
        );
        let with_cookie = format!("theme=dark; {pair}");
        let r = send(request(
            "GET",
            "/ui/api/state",
            local,
            &[LOCAL[0], ("cookie", &with_cookie)],
        ))
        .await;
        assert_eq!(r.status(), StatusCode::OK);
        // A cookie of that name with another value, or the key itself as a cookie: refused.
        let (name, _) = pair.split_once('=').unwrap();
        for forged in [
            format!("{name}=0000"),
            format!("{name}={KEY}"),
            format!("hive_key={KEY}"),
        ] {
            let r = send(request(
                "GET",
                "/ui/api/state",
                local,
                &[LOCAL[0], ("cookie", &forged)],
            ))
            .await;
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{forged}");
        }
        // Another process with the same key has its own session: this one's cookie does not open it.
        let (engine2, board2) = parts(dir.path());
        let other = router(
            engine2,
            board2,
            true,
            true,
            Some(Arc::new(ApiKey::new(KEY).unwrap())),
        );
        let r = other
            .oneshot(request(
                "GET",
                "/ui/api/state",
                local,
                &[LOCAL[0], ("cookie", &with_cookie)],
            ))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
}

//! Serving the node's HTTP routes (gateway, chat API) over TCP with the limits `axum::serve` cannot set: at most
//! `max_connections` connections at once (a connection past the cap waits in the kernel's
//! backlog until one closes), and a request's header must arrive within `header_timeout`
//! (hyper's HTTP/1 header-read timeout, which needs a timer): a client that opens
//! connections and sends half a request no longer holds them, or the node's file
//! descriptors, for as long as it likes. Bodies are bounded by the router's own limit and
//! request timeout.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// The address of the client a request came from (set per connection by [`serve`]).
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub std::net::SocketAddr);

/// How long a connection being shut down may finish its request.
const DRAIN: Duration = Duration::from_secs(5);

/// Serves `router` on `listener` until `cancel`, then lets open connections finish their
/// current request (for at most [`DRAIN`]) and returns when all are closed.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    max_connections: usize,
    header_timeout: Duration,
    cancel: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(max_connections.max(1)));
    let mut conns = JoinSet::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    loop {
        while conns.try_join_next().is_some() {}
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p,
            _ = cancel.cancelled() => break,
        };
        let Ok(permit) = permit else { break };
        let stream = tokio::select! {
            r = listener.accept() => r,
            _ = cancel.cancelled() => break,
        };
        let (stream, peer) = match stream {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "the HTTP server cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let conn = http.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(router.clone().layer(axum::Extension(ClientAddr(peer)))),
        );
        let stop = cancel.clone();
        conns.spawn(async move {
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(DRAIN, conn).await;
                }
            }
            drop(permit);
        });
    }
    while conns.join_next().await.is_some() {}
}

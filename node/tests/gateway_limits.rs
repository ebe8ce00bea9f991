//! The gateway's connection limits, on an in-process node with a gateway on loopback: a
//! client that opens connections and sends half a request holds them only until the header
//! timeout, and connections past the cap wait (unserved) until one closes. Before, `axum::serve`
//! kept half-sent requests open indefinitely, with no cap (issue 13: 200 of them stayed open
//! 47 s and more, and with the file descriptors used up the node's own writes failed).
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use hivemind_model::config::Arch;
use hivemind_model::testing::TinyModel;
use hivemind_node::gateway::GatewayConfig;
use hivemind_node::node::{GatewaySettings, Node, NodeConfig};

const HEADER_TIMEOUT: Duration = Duration::from_secs(1);
const CAP: usize = 3;

/// Reads until the peer closes the connection or `limit` passes; what was read, and whether
/// it was closed.
fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let start = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return (out, true),
        }
    }
    (out, false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_requests_are_dropped_and_connections_are_capped() {
    let work = tempfile::tempdir().unwrap();
    let model = work.path().join("tiny.gguf");
    TinyModel::new(Arch::Llama, 1)
        .unwrap()
        .write_gguf(&model)
        .unwrap();
    let mut cfg = NodeConfig::new(work.path().join("node"), &model, 3600.0);
    cfg.gateway = Some(GatewaySettings {
        bind: "127.0.0.1:0".into(),
        config: GatewayConfig {
            max_upload_bytes: 1 << 20,
            request_timeout: Duration::from_secs(30),
            aggregate_wait: Duration::from_secs(30),
            auth: Default::default(),
            max_connections: CAP,
            header_timeout: HEADER_TIMEOUT,
            uploads_per_minute: GatewayConfig::UPLOADS_PER_MINUTE,
            user_uploads_per_minute: GatewayConfig::USER_UPLOADS_PER_MINUTE,
        },
    });
    let node = Node::start(cfg).await.unwrap();
    let addr = node.gateway_addr().unwrap();

    let result = tokio::task::spawn_blocking(move || {
        // CAP connections, each with half a request header.
        let mut held: Vec<TcpStream> = (0..CAP)
            .map(|_| {
                let mut s = TcpStream::connect(addr).unwrap();
                s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
                s
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        // One more, with a whole request: past the cap, it waits.
        let mut late = TcpStream::connect(addr).unwrap();
        late.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        late.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let mut buf = [0u8; 64];
        let early = late.read(&mut buf);
        assert!(
            matches!(&early, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
            "a connection past the cap of {CAP} was served at once: {early:?}"
        );
        // The half-sent ones are closed by the server after the header timeout.
        for (i, s) in held.iter_mut().enumerate() {
            let (_, closed) = read_until_closed(s, HEADER_TIMEOUT * 8);
            assert!(closed, "half-sent request {i} still open after {:?}", HEADER_TIMEOUT * 8);
        }
        // Then the waiting one is served.
        let (answer, _) = read_until_closed(&mut late, Duration::from_secs(10));
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    })
    .await;
    node.shutdown().await;
    result.unwrap();
}

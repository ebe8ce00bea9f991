//! A 300 MiB adapter crosses the blob protocol between two in-process nodes with a few MiB
//! of memory, its progress visible while it runs (`Transfers`, which status.json and the
//! dashboard show). Alone in its test binary, so the process's peak RSS is this transfer's.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use hivemind_node::net::blob::{fetch_blob_tracked, Transfers, MAX_BLOB_BYTES};
use hivemind_store::Store;
use tokio_util::sync::CancellationToken;

mod blob_net;
use blob_net::{pair, pattern};

/// Peak resident memory of this process (Linux), in bytes.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adapter_of_hundreds_of_mb_moves_in_bounded_memory() {
    const LEN: usize = (300 << 20) + 12_345;
    let cancel = CancellationToken::new();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    // Written to a file 1 MiB at a time, so this process never holds the blob.
    let src = dir.path().join("big.safetensors");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&src).unwrap());
        let mut block = pattern(1 << 20, 4);
        let mut left = LEN;
        while left > 0 {
            let n = left.min(block.len());
            std::io::Write::write_all(&mut f, &block[..n]).unwrap();
            left -= n;
            block.rotate_left(7);
        }
        std::io::Write::flush(&mut f).unwrap();
    }
    let hash = store.put_blob_file(&src).unwrap();
    std::fs::remove_file(&src).unwrap();
    let (server, fetcher, fetcher_store, _d) = pair(50, Arc::new(store), &cancel).await;
    let server_id = server.client.local_peer_id();

    // Reset the peak so that it measures this fetch (Linux >= 4.0).
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let before = peak_rss().filter(|_| reset);
    let transfers = Transfers::default();
    let watch = transfers.clone();
    let seen = tokio::spawn(async move {
        // Every partial state seen while the transfer runs: (peer, bytes, total).
        let mut seen = Vec::new();
        for _ in 0..24_000 {
            let now = watch.snapshot();
            if now.is_empty() && !seen.is_empty() {
                break; // ended
            }
            for (h, t) in now {
                assert_eq!(h, hash);
                seen.push((t.peer, t.bytes, t.total));
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        seen
    });
    let got = fetch_blob_tracked(
        &fetcher.client,
        &fetcher_store,
        hash,
        &[server_id],
        MAX_BLOB_BYTES,
        &transfers,
    )
    .await;
    let after = peak_rss();
    assert!(
        transfers.snapshot().is_empty(),
        "a finished transfer is still listed"
    );
    let seen = seen.await.unwrap();
    assert_eq!(got, Some(server_id));
    assert_eq!(fetcher_store.blob_len(&hash).unwrap(), Some(LEN as u64));
    assert!(
        seen.iter()
            .any(|&(p, b, t)| p == server_id && t == LEN as u64 && b > 0 && b < t),
        "no partial progress seen: {:?}",
        seen.first()
    );
    assert!(fetcher_store.verify_blob(&hash).unwrap());
    // Both ends of the transfer live in this process; together they hold a few frames.
    // (Tests running alongside add to the peak; theirs are a few MiB.)
    if let (Some(before), Some(after)) = (before, after) {
        let grew = after.saturating_sub(before);
        assert!(
            grew < 64 << 20,
            "peak RSS grew by {} MiB while moving {} MiB",
            grew >> 20,
            LEN >> 20
        );
    }
    cancel.cancel();
}

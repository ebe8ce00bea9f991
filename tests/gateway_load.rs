//! Load on the legacy REST gateway of a real `hive-node serve` process: 50 uploads from 10
//! users (5 each, distinct adapters, half as bare safetensors and half as zipped PEFT dirs)
//! all sent at once, while `GET /` and `GET /api/v1/status` are polled. Every upload is
//! answered 200 and listed exactly once under its adapter's canonical hash; nothing is lost
//! or duplicated; the gateway keeps answering the status calls during the burst.
//!
//! No timing is asserted beyond a generous bound (CI is a loaded 2-core box); the
//! throughput figure comes from `examples/gateway_bench.rs`.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{Proc, WAIT};
use hivemind_model::adapter::LoraAdapter;
use hivemind_model::config::Arch;
use hivemind_model::testing::TinyModel;
use reqwest::blocking::{multipart, Client};
use serde_json::Value;

const USERS: usize = 10;
const PER_USER: usize = 5;
/// The most one status call may take during the burst (generous: CI is a loaded 2-core box).
const STATUS_BOUND: Duration = Duration::from_secs(20);

/// A zip of a PEFT adapter dir's two files at the archive's root (as `shutil.make_archive`
/// makes it).
fn peft_zip(a: &LoraAdapter) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        z.start_file("adapter_config.json", opts).unwrap();
        z.write_all(&a.config.to_json().unwrap()).unwrap();
        z.start_file("adapter_model.safetensors", opts).unwrap();
        z.write_all(&a.to_safetensors_bytes().unwrap()).unwrap();
        z.finish().unwrap();
    }
    buf.into_inner()
}

/// One upload of the burst.
struct Job {
    user: String,
    file_name: &'static str,
    bytes: Vec<u8>,
}

/// One status call made while the burst ran.
struct Poll {
    path: &'static str,
    start: Instant,
    end: Instant,
    code: u16,
    body: Value,
}

fn get(http: &Client, url: &str) -> (u16, Value) {
    let r = http.get(url).send().unwrap();
    (r.status().as_u16(), r.json().unwrap_or(Value::Null))
}

#[test]
fn fifty_concurrent_uploads_from_ten_users_are_all_listed_once() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_model(tmp.path(), 1);
    let tiny = TinyModel::new(Arch::Llama, 1).unwrap();
    let server = Proc::tiny(
        &["serve", "--host", "127.0.0.1", "--port", "0"],
        &model,
        &tmp.path().join("gateway"),
        &["--round-secs", "3600", "--grace-secs", "1"],
    );
    let base = server.line("gateway on ");
    let http = Client::builder().timeout(WAIT).build().unwrap();

    // 50 distinct adapters; what the store must end up holding is each one's canonical hash.
    let shape = tiny
        .cfg
        .adapter_shape(4, &["q_proj".to_string(), "v_proj".to_string()])
        .unwrap();
    let mut jobs = Vec::new();
    let mut expected = BTreeMap::new();
    for u in 0..USERS {
        for k in 0..PER_USER {
            let a =
                hivemind_model::testing::random_adapter(&shape, 8.0, (u * 100 + k) as u64).unwrap();
            let user = format!("user{u:02}");
            assert!(expected
                .insert(a.canonical_hash().unwrap().to_hex(), user.clone())
                .is_none());
            let (file_name, bytes) = if (u + k) % 2 == 0 {
                (
                    "adapter_model.safetensors",
                    a.to_safetensors_bytes().unwrap(),
                )
            } else {
                ("adapter.zip", peft_zip(&a))
            };
            jobs.push(Job {
                user,
                file_name,
                bytes,
            });
        }
    }
    let n = jobs.len();

    // Pollers of GET / and GET /api/v1/status, running before, during and after the burst.
    let done = Arc::new(AtomicBool::new(false));
    let pollers: Vec<_> = ["/", "/api/v1/status"]
        .into_iter()
        .map(|path| {
            let (http, url, done) = (http.clone(), format!("{base}{path}"), done.clone());
            std::thread::spawn(move || {
                let mut polls = Vec::new();
                while !done.load(Ordering::Acquire) {
                    let start = Instant::now();
                    let (code, body) = get(&http, &url);
                    polls.push(Poll {
                        path,
                        start,
                        end: Instant::now(),
                        code,
                        body,
                    });
                }
                polls
            })
        })
        .collect();

    // The burst: every upload waits on the barrier, then all are sent at once.
    let go = Arc::new(Barrier::new(n + 1));
    let uploaders: Vec<_> = jobs
        .into_iter()
        .map(|job| {
            let (http, url, go) = (
                http.clone(),
                format!("{base}/api/v1/adapter/upload"),
                go.clone(),
            );
            std::thread::spawn(move || {
                let form = multipart::Form::new()
                    .part(
                        "file",
                        multipart::Part::bytes(job.bytes).file_name(job.file_name),
                    )
                    .text("user_id", job.user.clone())
                    .text("training_samples", "7");
                go.wait();
                let r = http.post(url).multipart(form).send().unwrap();
                let code = r.status().as_u16();
                (job.user, code, r.json::<Value>().unwrap_or(Value::Null))
            })
        })
        .collect();
    go.wait();
    let burst_start = Instant::now();
    let answers: Vec<_> = uploaders.into_iter().map(|t| t.join().unwrap()).collect();
    let burst_end = Instant::now();
    done.store(true, Ordering::Release);
    let polls: Vec<Poll> = pollers
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();

    // Every upload answered 200 with its own id.
    let mut ids = BTreeSet::new();
    for (user, code, v) in &answers {
        assert_eq!(*code, 200, "upload of {user}: {v}");
        assert_eq!(v["success"], true, "{v}");
        let id = v["adapter_id"].as_str().unwrap();
        assert!(id.starts_with(&format!("{user}_")), "{id}");
        assert!(ids.insert(id.to_string()), "adapter id {id} given twice");
    }

    // The gateway kept answering: every poll 200 within the bound, and calls completed while
    // the burst was in flight.
    for p in &polls {
        assert_eq!(p.code, 200, "{} during the burst: {}", p.path, p.body);
        let took = p.end - p.start;
        assert!(took < STATUS_BOUND, "{} took {took:?}", p.path);
        if p.path == "/" {
            assert_eq!(p.body["message"], "HiveMind Server is running");
        } else {
            assert!(p.body["total_adapters"].as_u64().unwrap() <= n as u64);
        }
    }
    let during = |path: &str| {
        polls
            .iter()
            .filter(|p| p.path == path && p.end > burst_start && p.end <= burst_end)
            .count()
    };
    let (root_during, status_during) = (during("/"), during("/api/v1/status"));
    eprintln!(
        "burst of {n} uploads: {:?}; completed during it: {root_during} GET /, {status_during} \
         GET /api/v1/status; slowest poll {:?}",
        burst_end - burst_start,
        polls
            .iter()
            .map(|p| p.end - p.start)
            .max()
            .unwrap_or_default()
    );
    // Both kinds of call usually complete many times during the burst; the assertion asks for
    // one in all, so that a slow CI box cannot make it flaky while a gateway that stalls
    // every other request until the uploads are done still fails it.
    assert!(
        root_during + status_during > 0,
        "no GET / or GET /api/v1/status completed while the uploads were in flight"
    );

    // Nothing lost, nothing duplicated.
    let (code, status) = get(&http, &format!("{base}/api/v1/status"));
    assert_eq!(code, 200);
    assert_eq!(status["total_adapters"], n);
    assert_eq!(status["total_users"], USERS);
    // Pending: each user's newest upload.
    assert_eq!(status["pending_for_aggregation"], USERS);
    let (_, list) = get(&http, &format!("{base}/api/v1/adapter/list"));
    let list = list["adapters"].as_array().unwrap();
    assert_eq!(list.len(), n);
    let listed_ids: BTreeSet<String> = list
        .iter()
        .map(|a| a["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed_ids, ids, "listed ids vs the ids the uploads got");
    let mut by_hash: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for a in list {
        let hash = a["path"].as_str().unwrap().strip_prefix("blobs/").unwrap();
        by_hash.entry(hash.to_string()).or_default().push(a);
    }
    for (hash, user) in &expected {
        let entries = by_hash.get(hash).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(
            entries.len(),
            1,
            "adapter {hash} of {user} listed {entries:?}"
        );
        assert_eq!(entries[0]["user_id"], user.as_str());
        assert_eq!(entries[0]["metadata"]["training_samples"], 7);
    }
    assert_eq!(by_hash.len(), expected.len());
    for u in 0..USERS {
        let (_, mine) = get(
            &http,
            &format!("{base}/api/v1/adapter/list?user_id=user{u:02}"),
        );
        assert_eq!(mine["adapters"].as_array().unwrap().len(), PER_USER);
    }
    drop(server);
}

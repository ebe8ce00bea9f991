//! The legacy REST gateway over real HTTP (reqwest) against a real `hive-node serve` process,
//! with a second `hive-node join` process on loopback: every endpoint, every kind of bad
//! input (nothing stored), and an aggregate whose download is byte for byte the round adapter
//! the other node committed.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Command;

use common::{tiny_adapter, tiny_model, wait_for, Proc, BIN, RANK, WAIT};
use hivemind_model::adapter::{AdapterConfig, LoraAdapter, TargetModules};
use hivemind_model::config::Arch;
use hivemind_model::testing::TinyModel;
use hivemind_node::harness::wait_until_blocking;
use reqwest::blocking::{multipart, Client};
use serde_json::Value;

fn adapter(seed: u64, rank: usize, v_out: usize) -> LoraAdapter {
    tiny_adapter(seed, rank, v_out)
}

/// A zip of `entries` (name, bytes), deflated.
fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        for (name, bytes) in entries {
            z.start_file(*name, opts).unwrap();
            z.write_all(bytes).unwrap();
        }
        z.finish().unwrap();
    }
    buf.into_inner()
}

struct Api {
    base: String,
    http: Client,
}

impl Api {
    fn get(&self, path: &str) -> (u16, Value) {
        Self::json(self.http.get(format!("{}{path}", self.base)))
    }

    fn post(&self, path: &str) -> (u16, Value) {
        Self::json(self.http.post(format!("{}{path}", self.base)))
    }

    /// Status and JSON body (Null for a body that is not JSON, e.g. a download).
    fn json(req: reqwest::blocking::RequestBuilder) -> (u16, Value) {
        let r = req.send().unwrap();
        let code = r.status().as_u16();
        (code, r.json().unwrap_or(Value::Null))
    }

    fn upload(&self, file: Option<(&str, Vec<u8>)>, fields: &[(&str, &str)]) -> (u16, Value) {
        let mut form = multipart::Form::new();
        if let Some((name, bytes)) = file {
            form = form.part(
                "file",
                multipart::Part::bytes(bytes).file_name(name.to_string()),
            );
        }
        for (k, v) in fields {
            form = form.text(k.to_string(), v.to_string());
        }
        let r = self
            .http
            .post(format!("{}/api/v1/adapter/upload", self.base))
            .multipart(form)
            .send()
            .unwrap();
        let code = r.status().as_u16();
        (code, r.json().unwrap_or(Value::Null))
    }

    fn download(&self, path: &str) -> (u16, Vec<u8>, String) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .unwrap();
        let code = r.status().as_u16();
        let disposition = r
            .headers()
            .get("content-disposition")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        (code, r.bytes().unwrap().to_vec(), disposition)
    }
}

/// A `serve` gateway alone on the tiny network in `data`, rounds of an hour, with `extra`
/// flags, and a client of its API.
fn lone_gateway(model: &Path, data: &Path, extra: &[&str]) -> (Proc, Api) {
    let mut flags = vec!["--round-secs", "3600"];
    flags.extend_from_slice(extra);
    let server = Proc::tiny(
        &["serve", "--host", "127.0.0.1", "--port", "0"],
        model,
        data,
        &flags,
    );
    let api = Api {
        base: server.line("gateway on "),
        http: Client::builder().timeout(WAIT).build().unwrap(),
    };
    (server, api)
}

fn blob_count(data: &Path) -> usize {
    std::fs::read_dir(data.join(hivemind_store::BLOBS_DIR))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn legacy_api_validates_stores_announces_and_serves_the_round_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path(), 1);
    let gw_data = tmp.path().join("gateway");
    let round = ["--round-secs", "3600", "--grace-secs", "1"];
    let server = Proc::tiny(
        &[
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--max-upload-mb",
            "1",
        ],
        &model,
        &gw_data,
        &round,
    );
    let boot = server.line("listening on ");
    let base = server.line("gateway on ");
    // The peer contributes an adapter of its own: the round mixes it with the uploads.
    let peer_adapter = adapter(9, RANK, 32);
    let peer_dir = tmp.path().join("peer_adapter");
    peer_adapter.write_dir(&peer_dir).unwrap();
    let contribute = ["--contribute", peer_dir.to_str().unwrap()];
    let peer = Proc::tiny(
        &["join", "--bootstrap", &boot],
        &model,
        &tmp.path().join("peer"),
        &[&round[..], &contribute[..]].concat(),
    );
    peer.line("listening on ");
    server.wait_contributor(&peer_adapter.canonical_hash().unwrap().to_hex());
    let api = Api {
        base,
        http: Client::builder().timeout(WAIT).build().unwrap(),
    };

    // Empty gateway.
    let (code, v) = api.get("/");
    assert_eq!(code, 200);
    assert_eq!(v["message"], "HiveMind Server is running");
    assert!(v["version"].is_string());
    let (_, v) = api.get("/api/v1/status");
    assert_eq!(
        v,
        serde_json::json!({"total_adapters": 0, "total_users": 0,
            "latest_aggregated_version": null, "pending_for_aggregation": 0})
    );
    let (code, v) = api.get("/api/v1/adapter/download/latest");
    assert_eq!(
        (code, &v["detail"]),
        (404, &"No aggregated adapter available".into())
    );
    let (code, v) = api.post("/api/v1/aggregate");
    assert_eq!(code, 400, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("at least 2"));

    // Bad input: a clear 4xx, nothing stored.
    let good = adapter(1, RANK, 32);
    let good_bytes = good.to_safetensors_bytes().unwrap();
    let blobs_before = blob_count(&gw_data);
    let (code, v) = api.upload(Some(("a.safetensors", good_bytes.clone())), &[]);
    assert_eq!(code, 422);
    assert_eq!(
        v["detail"][0]["loc"],
        serde_json::json!(["body", "user_id"])
    );
    let (code, v) = api.upload(None, &[("user_id", "alice")]);
    assert_eq!(code, 422);
    assert_eq!(v["detail"][0]["loc"], serde_json::json!(["body", "file"]));
    let (code, _) = api.upload(
        Some(("a.safetensors", good_bytes.clone())),
        &[("user_id", "alice"), ("training_samples", "many")],
    );
    assert_eq!(code, 422);
    let mut lying = good_bytes.clone();
    let header_len = u64::from_le_bytes(lying[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(lying[8..8 + header_len].to_vec()).unwrap();
    let bigger = header.replacen("\"data_offsets\":[0,", "\"data_offsets\":[8,", 1);
    assert_ne!(header, bigger);
    lying[8..8 + header_len].copy_from_slice(bigger.as_bytes());
    // LoRA on k_proj, which this network does not adapt.
    let k_shape = TinyModel::new(Arch::Llama, 1)
        .unwrap()
        .cfg
        .adapter_shape(RANK, &["k_proj".to_string(), "q_proj".to_string()])
        .unwrap();
    let wrong_modules = hivemind_model::testing::random_adapter(&k_shape, 8.0, 6).unwrap();
    let mut bomb_content = vec![0u8; 3 << 20];
    bomb_content[..good_bytes.len()].copy_from_slice(&good_bytes);
    let bad_files: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "notes.txt",
            b"hello, not an adapter".to_vec(),
            "expected a .safetensors",
        ),
        (
            "a.safetensors",
            good_bytes[..good_bytes.len() / 2].to_vec(),
            "invalid adapter",
        ),
        ("a.safetensors", lying, "invalid adapter"),
        (
            "a.safetensors",
            adapter(2, 8, 32).to_safetensors_bytes().unwrap(),
            "invalid adapter",
        ),
        (
            "a.safetensors",
            adapter(3, RANK, 48).to_safetensors_bytes().unwrap(),
            "invalid adapter",
        ),
        (
            "a.safetensors",
            wrong_modules.to_safetensors_bytes().unwrap(),
            "invalid adapter",
        ),
        ("a.zip", b"PK\x03\x04 definitely not a zip".to_vec(), "zip"),
        (
            "a.zip",
            zip_of(&[("../adapter_model.safetensors", &good_bytes)]),
            "'..'",
        ),
        (
            "a.zip",
            zip_of(&[("/etc/adapter_model.safetensors", &good_bytes)]),
            "absolute",
        ),
        (
            "a.zip",
            zip_of(&[("adapter_model.safetensors", &bomb_content)]),
            "zip bomb",
        ),
        (
            "a.zip",
            zip_of(&[("README.md", b"no weights")]),
            "no adapter_model",
        ),
    ];
    // One user id each: a user id gets 10 uploads a minute (`--user-uploads-per-minute`).
    for (i, (name, bytes, why)) in bad_files.into_iter().enumerate() {
        let user = format!("mallory-{i}");
        let (code, v) = api.upload(Some((name, bytes)), &[("user_id", &user)]);
        assert_eq!(code, 400, "{name} ({why}): {v}");
        let detail = v["detail"].as_str().unwrap();
        assert!(detail.contains(why), "{why}: {detail}");
    }
    let (code, _) = api.upload(
        Some(("big.safetensors", vec![7u8; 2 << 20])),
        &[("user_id", "mallory")],
    );
    assert_eq!(code, 413, "over --max-upload-mb");
    for bad_user in ["", "a/b", "..", "x\\y", &"u".repeat(129)] {
        let (code, v) = api.upload(
            Some(("a.safetensors", good_bytes.clone())),
            &[("user_id", bad_user)],
        );
        assert_eq!(code, 400, "{bad_user:?}: {v}");
    }
    let mut wrong_cfg =
        AdapterConfig::new(RANK, 16.0, TargetModules::from_names(["q_proj", "v_proj"]));
    wrong_cfg.lora_dropout = 0.0;
    let zip_wrong_alpha = zip_of(&[
        ("adapter_model.safetensors", &good_bytes),
        ("adapter_config.json", &wrong_cfg.to_json().unwrap()),
    ]);
    let (code, v) = api.upload(Some(("a.zip", zip_wrong_alpha)), &[("user_id", "mallory")]);
    assert_eq!(code, 400, "{v}");
    assert_eq!(
        blob_count(&gw_data),
        blobs_before,
        "a refused upload stored a blob"
    );
    let (_, v) = api.get("/api/v1/adapter/list");
    assert_eq!(v["adapters"], serde_json::json!([]));

    // Two users upload: a bare safetensors and a zip of a PEFT dir (as shutil.make_archive
    // makes it: the files at the zip's root).
    let (code, v) = api.upload(
        Some(("adapter_model.safetensors", good_bytes.clone())),
        &[
            ("user_id", "alice"),
            ("training_samples", "30"),
            ("epochs", "2"),
        ],
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["success"], true);
    let alice_id = v["adapter_id"].as_str().unwrap().to_string();
    assert!(
        alice_id.starts_with("alice_") && alice_id.len() == "alice_".len() + 15,
        "{alice_id}"
    );
    let bob = adapter(4, RANK, 32);
    let dir = tmp.path().join("bob_adapter");
    bob.write_dir(&dir).unwrap();
    let zip = zip_of(&[
        (
            "adapter_model.safetensors",
            &std::fs::read(dir.join("adapter_model.safetensors")).unwrap(),
        ),
        (
            "adapter_config.json",
            &std::fs::read(dir.join("adapter_config.json")).unwrap(),
        ),
    ]);
    let (code, v) = api.upload(
        Some(("bob_adapter.zip", zip)),
        &[("user_id", "bob"), ("training_samples", "10")],
    );
    assert_eq!(code, 200, "{v}");

    let (_, v) = api.get("/api/v1/adapter/list");
    let list = v["adapters"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["id"], alice_id.as_str());
    assert_eq!(list[0]["metadata"]["base_model"], "Qwen/Qwen2-7B");
    assert_eq!(list[0]["metadata"]["training_samples"], 30);
    assert_eq!(list[0]["metadata"]["epochs"], 2);
    assert_eq!(list[0]["metadata"]["version"], "pending");
    let (_, v) = api.get("/api/v1/adapter/list?user_id=bob");
    assert_eq!(v["adapters"].as_array().unwrap().len(), 1);
    let (_, v) = api.get("/api/v1/status");
    assert_eq!(v["total_adapters"], 2);
    assert_eq!(v["total_users"], 2);
    assert_eq!(v["pending_for_aggregation"], 2);

    // Aggregate: the round closes now, the network commits, the gateway answers.
    let (code, v) = api.post("/api/v1/aggregate");
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["success"], true);
    assert_eq!(v["version"], "round-1");
    assert_eq!(v["num_adapters"], 3, "two uploads and the peer's adapter");
    let (code, bytes, disposition) = api.download("/api/v1/adapter/download/latest");
    assert_eq!(code, 200);
    assert_eq!(
        disposition,
        "attachment; filename=\"hivemind_round-1.safetensors\""
    );
    let (_, by_name, _) = api.download("/api/v1/adapter/download/round-1");
    assert_eq!(bytes, by_name);
    let (code, v) = api.get("/api/v1/adapter/download/round-9");
    assert_eq!(
        (code, &v["detail"]),
        (404, &"Version round-9 not found".into())
    );
    // The other node committed the very same bytes.
    let (_, peer_hash) = wait_for("the peer to commit round 1", || peer.committed(1));
    assert_eq!(blake3::hash(&bytes).to_hex().as_str(), peer_hash);
    let (_, v) = api.get("/api/v1/status");
    assert_eq!(v["latest_aggregated_version"], "round-1");
    assert_eq!(v["pending_for_aggregation"], 0);
    let (_, v) = api.get("/api/v1/adapter/list?user_id=alice");
    assert_eq!(v["adapters"][0]["metadata"]["version"], "round-1");

    // Documentation, offline.
    let (code, doc) = api.get("/openapi.json");
    assert_eq!(code, 200);
    for p in [
        "/api/v1/status",
        "/api/v1/adapter/upload",
        "/api/v1/adapter/list",
        "/api/v1/aggregate",
        "/api/v1/adapter/download/latest",
        "/api/v1/adapter/download/{version}",
    ] {
        assert!(doc["paths"].get(p).is_some(), "{p}");
    }
    let html = api
        .http
        .get(format!("{}/docs", api.base))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(html.contains("/api/v1/adapter/upload") && !html.contains("<script"));

    // `hive-node upload`: the legacy script as a subcommand.
    let cli = |args: &[&str]| {
        let out = Command::new(BIN)
            .arg("upload")
            .args(["--server", &api.base])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, out, err) = cli(&["--status"]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["latest_aggregated_version"], "round-1");
    let got = tmp.path().join("downloaded");
    let (ok, _, err) = cli(&["--download", got.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!(
        std::fs::read(got.join("hivemind_round-1.safetensors")).unwrap(),
        bytes
    );
    let carol = tmp.path().join("carol_adapter");
    adapter(5, RANK, 32).write_dir(&carol).unwrap();
    let (ok, out, err) = cli(&[
        "--adapter",
        carol.to_str().unwrap(),
        "--user-id",
        "carol",
        "--samples",
        "7",
    ]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(v["adapter_id"].as_str().unwrap().starts_with("carol_"));
    let (_, v) = api.get("/api/v1/adapter/list?user_id=carol");
    assert_eq!(v["adapters"][0]["metadata"]["training_samples"], 7);
    let (ok, _, err) = cli(&[
        "--adapter",
        tmp.path().to_str().unwrap(),
        "--user-id",
        "carol",
    ]);
    assert!(!ok && err.contains("not a PEFT adapter dir"), "{err}");
    let (ok, _, err) = cli(&["--adapter", carol.to_str().unwrap(), "--user-id", "../x"]);
    assert!(!ok && err.contains("--user-id"), "{err}");
    drop(server);
}

/// A user's second upload in a round waits for the next round, and still does after the node
/// is killed and restarted: before, the waiting upload was announced in the first upload's
/// round after a restart (the deferral lived in memory only), and peers saw one user with two
/// adapters in one round.
#[test]
fn a_deferred_upload_stays_deferred_across_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path(), 1);
    let data = tmp.path().join("gateway");
    let start = || {
        let p = Proc::tiny(
            &["serve", "--host", "127.0.0.1", "--port", "0"],
            &model,
            &data,
            &["--round-secs", "3600"],
        );
        let base = p.line("gateway on ");
        let api = Api {
            base,
            http: Client::builder().timeout(WAIT).build().unwrap(),
        };
        (p, api)
    };
    let (server, api) = start();
    let (first, second) = (adapter(31, RANK, 32), adapter(32, RANK, 32));
    let hex = |a: &LoraAdapter| a.canonical_hash().unwrap().to_hex();
    for (a, placed) in [(&first, "round 1"), (&second, "round 2")] {
        let bytes = a.to_safetensors_bytes().unwrap();
        let (code, v) = api.upload(Some(("a.safetensors", bytes)), &[("user_id", "alice")]);
        assert_eq!(code, 200, "{v}");
        assert!(v.to_string().contains(placed), "{placed}: {v}");
    }
    server.wait_contributor(&hex(&first));
    drop(server); // SIGKILL

    let (server, _api) = start();
    server.wait_contributor(&hex(&first));
    // Give the restarted node time to (wrongly) announce the waiting upload.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let status = server.status().unwrap();
    let contributors = status["current_contributors"].as_array().unwrap();
    assert_eq!(status["current_round"], 1);
    assert!(
        !contributors.iter().any(|h| h == hex(&second).as_str()),
        "the deferred upload joined round 1 after the restart: {contributors:?}"
    );
    assert_eq!(contributors.len(), 1, "{contributors:?}");
}

/// Uploads waiting in an open network are not announced when the data dir is restarted as
/// another network (here: with differential privacy, where they would go out un-noised).
/// Before, the restarted node announced them in the private network. The start is refused
/// with an error that says why, and the uploads wait for their own network.
#[test]
fn uploads_waiting_for_one_network_are_not_announced_in_another() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path(), 1);
    let data = tmp.path().join("gateway");
    let (server, api) = lone_gateway(&model, &data, &[]);
    let a = adapter(41, RANK, 32);
    let (code, v) = api.upload(
        Some(("a.safetensors", a.to_safetensors_bytes().unwrap())),
        &[("user_id", "alice")],
    );
    assert_eq!(code, 200, "{v}");
    let hex = a.canonical_hash().unwrap().to_hex();
    server.wait_contributor(&hex);
    drop(server); // SIGKILL

    let log = tmp.path().join("private.log");
    let mut child = Command::new(BIN)
        .args(["serve", "--host", "127.0.0.1", "--port", "0"])
        .args(common::tiny_network_flags(&model))
        .args([
            "--round-secs",
            "3600",
            "--dp-noise",
            "0.5",
            "--dp-clip",
            "1",
        ])
        .arg("--data-dir")
        .arg(&data)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // A refused start ends at once; one that serves runs until killed.
    let exited = wait_until_blocking("the private start to end", WAIT, || {
        child.try_wait().unwrap()
    });
    let _ = child.kill();
    let _ = child.wait();
    let err = std::fs::read_to_string(&log).unwrap();
    let status = exited.unwrap_or_else(|e| panic!("the private network started ({e}): {err}"));
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("1 gateway upload(s) waiting for a round of network"),
        "{err}"
    );
    // With its own network's options the node starts and announces alice's upload again.
    let (server, _api) = lone_gateway(&model, &data, &[]);
    server.wait_contributor(&hex);
}

/// A closed gateway: `--admin-token` guards aggregation (anyone could close every round
/// before), `--user-tokens` makes each upload prove its user id (anyone could upload as
/// anyone, and supersede them); `hive-node upload --token` sends the token. Every refusal is
/// a 401 and stores nothing.
#[test]
fn a_closed_gateway_needs_the_operator_token_to_aggregate_and_user_tokens_to_upload() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path(), 1);
    let data = tmp.path().join("gateway");
    let tokens = tmp.path().join("tokens.json");
    std::fs::write(
        &tokens,
        r#"{"alice": "alice-token-0123456789", "bob": "bob-token-0123456789ab"}"#,
    )
    .unwrap();
    let server = Proc::tiny(
        &["serve", "--host", "127.0.0.1", "--port", "0"],
        &model,
        &data,
        &[
            "--round-secs",
            "3600",
            "--admin-token",
            "operator-secret-0123",
            "--user-tokens",
            tokens.to_str().unwrap(),
            // One upload a user a minute: bob's token naming alice below must not use up hers.
            "--user-uploads-per-minute",
            "1",
        ],
    );
    let base = server.line("gateway on ");
    let http = Client::builder().timeout(WAIT).build().unwrap();
    let aggregate = |token: Option<&str>| {
        let mut r = http.post(format!("{base}/api/v1/aggregate"));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        let r = r.send().unwrap();
        (
            r.status().as_u16(),
            r.json::<Value>().unwrap_or(Value::Null),
        )
    };
    assert_eq!(aggregate(None).0, 401);
    assert_eq!(aggregate(Some("operator-secret-0124")).0, 401);
    // The right token passes (and finds nothing to aggregate yet).
    let (code, v) = aggregate(Some("operator-secret-0123"));
    assert_eq!(code, 400, "{v}");

    let bytes = adapter(41, RANK, 32).to_safetensors_bytes().unwrap();
    let upload = |token: Option<&str>, user: &str| {
        let form = multipart::Form::new()
            .part(
                "file",
                multipart::Part::bytes(bytes.clone()).file_name("a.safetensors"),
            )
            .text("user_id", user.to_string());
        let mut r = http.post(format!("{base}/api/v1/adapter/upload"));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        let r = r.multipart(form).send().unwrap();
        (
            r.status().as_u16(),
            r.json::<Value>().unwrap_or(Value::Null),
        )
    };
    for (token, user, why) in [
        (None, "alice", "need your user token"),
        (Some("not-a-token-of-anyone"), "alice", "unknown user token"),
        (Some("bob-token-0123456789ab"), "alice", "does not belong"),
        (Some("alice-token-0123456789"), "mallory", "does not belong"),
    ] {
        let (code, v) = upload(token, user);
        assert_eq!(code, 401, "{why}: {v}");
        assert!(v["detail"].as_str().unwrap().contains(why), "{why}: {v}");
        assert!(
            !v.to_string().contains("0123456789"),
            "a token is echoed: {v}"
        );
    }
    assert_eq!(blob_count(&data), 0, "a refused upload stored something");
    let (code, v) = upload(Some("alice-token-0123456789"), "alice");
    assert_eq!(code, 200, "{v}");

    // The upload command with --token.
    let dir = tmp.path().join("bob_adapter");
    adapter(42, RANK, 32).write_dir(&dir).unwrap();
    let cli = |token: &str| {
        Command::new(BIN)
            .args(["upload", "--server", &base, "--user-id", "bob", "--adapter"])
            .arg(&dir)
            .args(["--token", token])
            .output()
            .unwrap()
    };
    let out = cli("alice-token-0123456789");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
    let out = cli("bob-token-0123456789ab");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One client address can make at most `--uploads-per-minute` uploads a minute: before, one
/// client sent 200 user ids in 35 s and each was stored and counted. The refused upload is a
/// 429 and stores nothing.
#[test]
fn uploads_from_one_address_are_rate_limited() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path(), 1);
    let data = tmp.path().join("gateway");
    let (_server, api) = lone_gateway(&model, &data, &["--uploads-per-minute", "3"]);
    let mut codes = Vec::new();
    for i in 0..4u64 {
        let bytes = adapter(60 + i, RANK, 32).to_safetensors_bytes().unwrap();
        let user = format!("user-{i}");
        let (code, v) = api.upload(Some(("a.safetensors", bytes)), &[("user_id", &user)]);
        if code == 429 {
            assert!(
                v["detail"].as_str().unwrap().contains("3 uploads a minute"),
                "{v}"
            );
        }
        codes.push(code);
    }
    // A minute boundary can fall inside the loop and reset the window once.
    assert!(
        codes == [200, 200, 200, 429] || codes.iter().filter(|c| **c == 200).count() == 4,
        "{codes:?}"
    );
    if codes[3] == 429 {
        let (_, status) = api.get("/api/v1/status");
        assert_eq!(
            status["total_adapters"], 3,
            "the refused upload was stored: {status}"
        );
    }
}

/// One user id can make at most `--user-uploads-per-minute` uploads a minute, whatever the
/// address (here the address limit is off): before, only addresses were limited, so one user
/// behind many addresses could replace its upload without end. Another user is unaffected; the
/// refused upload is a 429 and stores nothing.
#[test]
fn uploads_of_one_user_id_are_rate_limited() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path(), 1);
    let minute = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            / 60
    };
    // The limit counts in fixed minutes: a try that a minute boundary cuts is repeated.
    for attempt in 0..3 {
        let data = tmp.path().join(format!("gateway-{attempt}"));
        let (_server, api) = lone_gateway(
            &model,
            &data,
            &[
                "--uploads-per-minute",
                "0",
                "--user-uploads-per-minute",
                "2",
            ],
        );
        let start = minute();
        let mut codes = Vec::new();
        let mut stored = serde_json::json!(0);
        for (i, user) in ["alice", "alice", "alice", "bob"].iter().enumerate() {
            let bytes = adapter(80 + i as u64, RANK, 32)
                .to_safetensors_bytes()
                .unwrap();
            let (code, v) = api.upload(Some(("a.safetensors", bytes)), &[("user_id", user)]);
            let (_, status) = api.get("/api/v1/status");
            if code == 429 {
                assert!(
                    v["detail"]
                        .as_str()
                        .unwrap()
                        .contains("2 uploads a minute for one user_id"),
                    "{v}"
                );
                assert_eq!(
                    status["total_adapters"], stored,
                    "the refused upload was stored"
                );
            }
            stored = status["total_adapters"].clone();
            codes.push(code);
        }
        if minute() != start {
            continue;
        }
        assert_eq!(codes, [200, 200, 429, 200]);
        return;
    }
    panic!("three tries each cut by a minute boundary");
}

/// An upload is read only as far as an adapter of the network (plus a PEFT dir's other files)
/// can reach, whatever the gateway's upload limit: 40 MiB of junk for a network whose adapters
/// take a few KiB is a 413. Before, it was read whole into memory (two 300 MiB junk uploads
/// took 1.2 GB) and only then refused as an invalid adapter.
#[test]
fn an_upload_larger_than_any_adapter_of_the_network_is_refused_while_reading() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path(), 1);
    let (_server, api) = lone_gateway(&model, &tmp.path().join("gateway"), &[]);
    let junk = vec![7u8; 40 << 20];
    let (code, v) = api.upload(Some(("a.safetensors", junk)), &[("user_id", "mallory")]);
    assert_eq!(code, 413, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("exceeds"), "{v}");
}

/// A gateway whose disk is below the floor it keeps free (`--min-free-mb`, here out of reach)
/// refuses uploads with 507 and a message that names the problem, and stores nothing. Before,
/// uploads were stored until the disk was full (one client grew a node's disk by 3.7 GB in
/// 35 s) and the node's own writes failed.
#[test]
fn uploads_are_refused_with_507_while_the_disk_is_below_the_floor() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path(), 1);
    let data = tmp.path().join("gateway");
    let (_server, api) = lone_gateway(&model, &data, &["--min-free-mb", "1000000000000"]);
    let before = blob_count(&data);
    let bytes = adapter(70, RANK, 32).to_safetensors_bytes().unwrap();
    let (code, v) = api.upload(Some(("a.safetensors", bytes)), &[("user_id", "alice")]);
    assert_eq!(code, 507, "{v}");
    let detail = v["detail"].as_str().unwrap();
    assert!(detail.contains("disk is nearly full"), "{v}");
    assert!(!detail.contains(&*data.to_string_lossy()), "a path in {v}");
    assert_eq!(blob_count(&data), before, "the refused upload was stored");
    let (_, status) = api.get("/api/v1/status");
    assert_eq!(status["total_adapters"], 0, "{status}");
}

/// A gateway of a network with differential privacy releases what its users upload noised,
/// reports ε in its status, per round and what each user has spent (ε of as many releases as
/// the user made uploads), keeps the sample counts out of what it lists, and lets a user have
/// one upload waiting at a time (a second, superseding one would be a second release of the
/// user's data for the same round).
#[test]
fn a_private_gateway_releases_uploads_noised_and_one_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path(), 1);
    let data = tmp.path().join("gateway");
    let (_server, api) = lone_gateway(
        &model,
        &data,
        &["--dp-noise", "0.5", "--dp-clip", "1", "--grace-secs", "1"],
    );
    let upload = |seed, user| {
        let bytes = adapter(seed, RANK, 32).to_safetensors_bytes().unwrap();
        api.upload(
            Some(("a.safetensors", bytes)),
            &[("user_id", user), ("training_samples", "123")],
        )
    };
    let eps = |releases| hivemind_model::dp::epsilon(0.5, releases, 1e-5);
    let close = |x: &serde_json::Value, want: f64| (x.as_f64().unwrap() - want).abs() < 1e-9;
    let (code, v) = upload(80, "alice");
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["privacy"]["releases"], 1, "{v}");
    assert!(close(&v["privacy"]["epsilon"], eps(1)), "{v}");
    let (code, v) = upload(81, "alice");
    assert_eq!(code, 409, "{v}");
    assert!(
        v["detail"].as_str().unwrap().contains("one upload waiting"),
        "{v}"
    );
    let (_, status) = api.get("/api/v1/status");
    assert!(
        close(&status["privacy"]["epsilon_per_round"], eps(1)),
        "{status}"
    );
    // What each user has spent: alice one release (the refused upload is none), bob nothing.
    let (_, status) = api.get("/api/v1/status?user_id=alice");
    assert_eq!(status["privacy"]["user"]["releases"], 1, "{status}");
    let (_, status) = api.get("/api/v1/status?user_id=bob");
    assert_eq!(status["privacy"]["user"]["releases"], 0, "{status}");
    assert!(
        close(&status["privacy"]["user"]["epsilon"], 0.0),
        "{status}"
    );
    // Once her upload is in a round, alice's next one is a second release: her ε is that of two.
    let (code, v) = upload(82, "bob");
    assert_eq!(code, 200, "{v}");
    let (code, v) = api.post("/api/v1/aggregate");
    assert_eq!(code, 200, "{v}");
    let (code, v) = upload(83, "alice");
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["privacy"]["releases"], 2, "{v}");
    assert!(close(&v["privacy"]["epsilon"], eps(2)), "{v}");
    assert!(eps(2) > eps(1));
    let (_, status) = api.get("/api/v1/status?user_id=alice");
    assert!(
        close(&status["privacy"]["user"]["epsilon"], eps(2)),
        "{status}"
    );
    assert_eq!(
        status["privacy"]["most_releases_by_one_user"], 2,
        "{status}"
    );
    assert!(
        close(&status["privacy"]["epsilon_of_that_user"], eps(2)),
        "{status}"
    );
    let (_, list) = api.get("/api/v1/adapter/list");
    // (Not a search for "123" in the text: the upload time 12:33 once matched it.)
    let adapters = list["adapters"].as_array().unwrap();
    assert!(!adapters.is_empty(), "{list}");
    assert!(
        adapters
            .iter()
            .all(|a| a["metadata"]["training_samples"].as_u64() != Some(123)),
        "the sample count is listed: {list}"
    );
    // The stored release is not the uploaded adapter.
    let original =
        hivemind_protocol::Hash::of(&adapter(80, RANK, 32).to_safetensors_bytes().unwrap());
    assert!(!list.to_string().contains(&original.to_hex()), "{list}");

    // Six uploads of one user at once: one is stored, the others refused. Before, the check
    // for a waiting upload and the insert were separate steps, and racing uploads could all
    // pass the check (several releases of carol's data for one round).
    let bodies: Vec<Vec<u8>> = (0..6)
        .map(|i| adapter(90 + i, RANK, 32).to_safetensors_bytes().unwrap())
        .collect();
    let start = std::sync::Barrier::new(bodies.len());
    let codes: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = bodies
            .iter()
            .map(|bytes| {
                let (api, start) = (&api, &start);
                s.spawn(move || {
                    start.wait();
                    api.upload(
                        Some(("a.safetensors", bytes.clone())),
                        &[("user_id", "carol")],
                    )
                    .0
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(codes.iter().filter(|c| **c == 200).count(), 1, "{codes:?}");
    assert!(codes.iter().all(|c| [200, 409].contains(c)), "{codes:?}");
    let (_, status) = api.get("/api/v1/status?user_id=carol");
    assert_eq!(status["privacy"]["user"]["releases"], 1, "{status}");
}

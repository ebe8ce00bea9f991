//! The OpenAI-compatible chat API of a node (`join --http`, and `serve` on its gateway port),
//! over real HTTP, on in-process nodes of a tiny generated network that commit one round:
//! - the node has an API key: requests without it, or with another, get 401;
//! - `GET /v1/models` lists base, round and round-1;
//! - a greedy answer from model `round` equals an independent computation: the committed
//!   round adapter exported and applied to a freshly loaded model, answered through
//!   `ChatSession` (the code path of `hive-node chat`); `base` answers without the adapter;
//! - streaming sends OpenAI chunks whose deltas add up to the same answer, then `[DONE]`;
//! - stop strings cut the answer; bad requests get 400/404 in OpenAI's error shape, and so do
//!   parameters the server does not implement (tools, logprobs, response_format, n > 1);
//! - frequency and presence penalties change a greedy answer;
//! - the official `openai` Python client (tools/openai/client_check.py) sees the same
//!   answers streaming and not. Its interpreter is `$HIVE_TEST_PYTHON` (default `python3`);
//!   without the `openai` package that part prints a notice and passes, unless
//!   `HIVE_REQUIRE_OPENAI=1` (set by `.ci/run`), which makes it fail.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use hivemind_model::generate::{ChatSession, SamplingParams};
use hivemind_model::{BaseModel, LoadOptions};
use hivemind_node::harness::TinyNetwork;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(120);
const PROMPT: &str = "Where does Valentina work?";
const MAX_TOKENS: usize = 12;

const CLIENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/openai/client_check.py");

/// The greedy answer of `hive-node chat`'s code path: a fresh model, the adapter in `dir` (if
/// any), one `ChatSession::ask` at temperature 0 without repeat penalty.
fn reference_answer(model: &std::path::Path, adapter: Option<&std::path::Path>) -> String {
    reference_answer_penalised(model, adapter, 0.0, 0.0)
}

/// [`reference_answer`] with OpenAI's frequency and presence penalties.
fn reference_answer_penalised(
    model: &std::path::Path,
    adapter: Option<&std::path::Path>,
    frequency_penalty: f32,
    presence_penalty: f32,
) -> String {
    let mut m = BaseModel::load(model, &LoadOptions::default()).unwrap();
    if let Some(dir) = adapter {
        let a = hivemind_model::adapter::LoraAdapter::read_dir(dir).unwrap();
        m.decoder.apply_adapter(&a).unwrap();
    }
    let params = SamplingParams {
        temperature: 0.0,
        repeat_penalty: 1.0,
        frequency_penalty,
        presence_penalty,
        ..Default::default()
    };
    let mut s = ChatSession::new(&m, None, params, MAX_TOKENS).unwrap();
    let mut streamed = String::new();
    s.ask(PROMPT, |p| streamed.push_str(p)).unwrap();
    streamed
}

/// The `data:` payloads of an event stream.
fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(|s| s.to_string())
        .collect()
}

fn request(model: &str, extra: Value) -> Value {
    let mut v = json!({
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
    });
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

/// Whether `python` can import the openai client; `None` when it can, else why not.
fn openai_missing(python: &str) -> Option<String> {
    match Command::new(python)
        .args(["-c", "import openai"])
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "{python} cannot import openai: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or_default()
        )),
        Err(e) => Some(format!("cannot run {python}: {e}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_api_answers_with_the_round_adapter_streaming_and_not() {
    let work = tempfile::tempdir().unwrap();
    let net = TinyNetwork::write(work.path()).unwrap();
    let cluster = net
        .start_with_round(
            work.path(),
            2,
            2.0,
            50,
            WAIT,
            common::http_with_key_on_first,
        )
        .await
        .unwrap();
    let round = cluster.node(0).view().borrow().latest.clone().unwrap();
    let base = format!("http://{}/v1", cluster.node(0).http_addr().unwrap());

    // The node has an API key: without it, or with another, every route answers 401.
    let bare = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    for key in [None, Some("Bearer test-key-2a9f0c41d7e4")] {
        let mut get = bare.get(format!("{base}/models"));
        let mut post = bare
            .post(format!("{base}/chat/completions"))
            .json(&request("round", json!({})));
        if let Some(k) = key {
            get = get.header("authorization", k);
            post = post.header("authorization", k);
        }
        for r in [get.send().await.unwrap(), post.send().await.unwrap()] {
            assert_eq!(r.status(), 401, "{key:?}");
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["error"]["code"], "invalid_api_key", "{v}");
        }
    }
    let mut auth = reqwest::header::HeaderMap::new();
    auth.insert(
        "authorization",
        format!("Bearer {}", common::API_KEY).parse().unwrap(),
    );
    let http = reqwest::Client::builder()
        .timeout(WAIT)
        .default_headers(auth)
        .build()
        .unwrap();

    // The models.
    let models: Value = http
        .get(format!("{base}/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["object"], "list");
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["base", "round", "round-1"], "{models}");

    // The references: the committed round adapter applied to a fresh model, and none.
    let exported = work.path().join("round-1");
    cluster
        .node(0)
        .data_dir()
        .export_round(Some(1), &exported)
        .unwrap();
    let (model_path, ex) = (net.model.clone(), exported.clone());
    let (want_round, want_base, want_penalised) = tokio::task::spawn_blocking(move || {
        (
            reference_answer(&model_path, Some(&ex)),
            reference_answer(&model_path, None),
            reference_answer_penalised(&model_path, Some(&ex), 2.0, 1.0),
        )
    })
    .await
    .unwrap();
    assert_ne!(
        want_penalised, want_round,
        "the penalties change nothing: the check below would not tell them apart"
    );
    assert_ne!(
        want_round, want_base,
        "the round adapter changes nothing: the check below would not tell them apart"
    );

    let post = |body: Value| {
        let http = http.clone();
        let url = format!("{base}/chat/completions");
        async move { http.post(url).json(&body).send().await.unwrap() }
    };
    for (model, want) in [
        ("round", &want_round),
        ("round-1", &want_round),
        ("base", &want_base),
    ] {
        let r = post(request(model, json!({}))).await;
        assert_eq!(r.status(), 200, "{model}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], model);
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert_eq!(
            v["choices"][0]["message"]["content"].as_str().unwrap(),
            want.as_str(),
            "{model}: {v}"
        );
        let usage = &v["usage"];
        assert!(usage["prompt_tokens"].as_u64().unwrap() > 0);
        let completion = usage["completion_tokens"].as_u64().unwrap();
        assert!(completion as usize <= MAX_TOKENS);
        let finish = v["choices"][0]["finish_reason"].as_str().unwrap();
        assert_eq!(
            finish,
            if completion as usize == MAX_TOKENS {
                "length"
            } else {
                "stop"
            },
            "{v}"
        );
    }

    // Frequency and presence penalties: the answer of the same penalties through ChatSession.
    let r = post(request(
        "round",
        json!({"frequency_penalty": 2.0, "presence_penalty": 1.0}),
    ))
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"].as_str().unwrap(),
        want_penalised,
        "{v}"
    );

    // Streaming: a role chunk, content chunks adding up to the answer, a finish chunk, [DONE].
    let r = post(request("round", json!({"stream": true}))).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let data = sse_data(&r.text().await.unwrap());
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(chunks.len() >= 3, "{chunks:?}");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    let mut text = String::new();
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], id, "one id for the whole stream");
        if let Some(t) = c["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
    }
    assert_eq!(text, want_round);
    let last = chunks.last().unwrap();
    assert!(last["choices"][0]["finish_reason"].is_string(), "{last}");

    // A stop string: the answer up to it (a piece of the reference answer that is not its
    // start, so the cut is visible).
    let chars: Vec<char> = want_round.chars().collect();
    if chars.len() >= 4 {
        let stop: String = chars[2..4].iter().collect();
        let cut = &want_round[..want_round.find(&stop).unwrap()];
        for stream in [false, true] {
            let r = post(request("round", json!({"stop": [stop], "stream": stream}))).await;
            assert_eq!(r.status(), 200);
            let got = if stream {
                sse_data(&r.text().await.unwrap())
                    .iter()
                    .filter_map(|d| serde_json::from_str::<Value>(d).ok())
                    .filter_map(|c| {
                        c["choices"][0]["delta"]["content"]
                            .as_str()
                            .map(String::from)
                    })
                    .collect::<String>()
            } else {
                let v: Value = r.json().await.unwrap();
                assert_eq!(v["choices"][0]["finish_reason"], "stop");
                v["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .to_string()
            };
            assert_eq!(got, cut, "stop {stop:?}, stream {stream}");
        }
    }

    // Refusals, in OpenAI's error shape; the node keeps answering after them.
    for (body, status, param) in [
        (request("gpt-4", json!({})), 404, "model"),
        (request("round-7", json!({})), 404, "model"),
        (
            request("round", json!({"temperature": 5})),
            400,
            "temperature",
        ),
        (
            request("round", json!({"max_tokens": 100_000})),
            400,
            "messages",
        ),
        (json!({"model": "round", "messages": []}), 400, "messages"),
        (
            request("round", json!({"stream": true, "max_tokens": 100_000})),
            400,
            "messages",
        ),
        // What this server does not implement is refused, naming the parameter.
        (
            request(
                "round",
                json!({"tools": [{"type": "function", "function": {"name": "f"}}]}),
            ),
            400,
            "tools",
        ),
        (request("round", json!({"logprobs": true})), 400, "logprobs"),
        (
            request("round", json!({"response_format": {"type": "json_object"}})),
            400,
            "response_format",
        ),
        (request("round", json!({"n": 2})), 400, "n"),
        (
            request("round", json!({"frequency_penalty": 3})),
            400,
            "frequency_penalty",
        ),
    ] {
        let r = post(body.clone()).await;
        assert_eq!(r.status(), status, "{body}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["param"], param, "{v}");
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
    }
    let r = http
        .post(format!("{base}/chat/completions"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");

    // The official Python client.
    let python = std::env::var("HIVE_TEST_PYTHON").unwrap_or_else(|_| "python3".to_string());
    if let Some(why) = openai_missing(&python) {
        if std::env::var("HIVE_REQUIRE_OPENAI").as_deref() == Ok("1") {
            panic!(
                "HIVE_REQUIRE_OPENAI=1 but {why}. Install tools/openai/requirements.txt into a \
                 venv and point HIVE_TEST_PYTHON at its python"
            );
        }
        eprintln!("NOTICE: skipping the openai client check: {why}");
    } else {
        let out = tokio::task::spawn_blocking(move || {
            Command::new(&python)
                .arg(CLIENT)
                .args(["--base-url", &base, "--model", "round", "--model", "base"])
                .args(["--prompt", PROMPT, "--max-tokens", &MAX_TOKENS.to_string()])
                .args(["--api-key", common::API_KEY])
                .stdin(Stdio::null())
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "client_check.py failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let seen: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        assert_eq!(
            seen["models"],
            json!(["base", "round", "round-1"]),
            "{seen}"
        );
        for (model, want) in [("round", &want_round), ("base", &want_base)] {
            let a = &seen["answers"][model];
            assert_eq!(a["content"], want.as_str(), "{model}: {seen}");
            assert_eq!(a["streamed"], want.as_str(), "{model}: {seen}");
            assert_eq!(a["role"], "assistant");
            assert_eq!(a["finish_reason"], a["stream_finish_reason"], "{seen}");
            assert_eq!(a["usage"], a["stream_usage"], "{seen}");
            assert!(a["stream_chunks"].as_u64().unwrap() >= 3, "{seen}");
        }
        assert_eq!(seen["unknown_model"]["status"], 404, "{seen}");
        assert_eq!(seen["unknown_model"]["code"], "model_not_found", "{seen}");
        assert_eq!(seen["wrong_key"]["status"], 401, "{seen}");
        assert_eq!(seen["wrong_key"]["code"], "invalid_api_key", "{seen}");
        assert_eq!(seen["tools"]["status"], 400, "{seen}");
        assert_eq!(seen["tools"]["param"], "tools", "{seen}");
    }
    assert_eq!(
        cluster
            .node(0)
            .view()
            .borrow()
            .latest
            .as_ref()
            .map(|r| r.hash.clone()),
        Some(round.hash)
    );
    cluster.shutdown().await;
}

//! The OpenAI-compatible chat API: `GET /v1/models` and `POST /v1/chat/completions` (messages,
//! temperature, top_p, max_tokens, stop, seed, and `stream` as server-sent events in OpenAI's
//! chunk format), so tools that speak that API (the `openai` client, chat front ends) talk to
//! a node as they talk to llama.cpp's server or Ollama. Errors have OpenAI's shape:
//! `{"error": {"message", "type", "param", "code"}}`.
//!
//! ```text
//!   POST /v1/chat/completions ─parse + check─▶ Engine::complete (one at a time, on a blocking
//!        thread) ─pieces─▶ StopFilter ─▶ JSON answer, or SSE chunks then `data: [DONE]`
//! ```
//!
//! `frequency_penalty` and `presence_penalty` work as in llama.cpp's server (over the last 64
//! tokens). What this server does not implement is refused with a 400 naming the parameter,
//! rather than ignored: `tools` (and `tool_choice`, `functions`, `function_call`), `logprobs`
//! and `top_logprobs`, `logit_bias`, a `response_format` other than text, `n` other than 1, and
//! audio output. Other unknown fields are ignored, as OpenAI-compatible servers do.
//!
//! Beyond OpenAI's fields, `top_k` and `repeat_penalty` are accepted as llama.cpp's server
//! accepts them. Defaults are `hive-node chat`'s (temperature 0.7, top_p 0.9, top_k 40, 256
//! tokens, fewer when the context has less room) except the repeat penalty, which is 1.0
//! (none), as OpenAI's API has none.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use hivemind_model::chat::{Message, Role};
use hivemind_model::generate::{Completion, Finish, SamplingParams};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::engine::{ChatError, ChatModel, Engine};

/// Most stop strings a request may give (OpenAI's limit).
const MAX_STOP: usize = 4;
/// Longest stop string, in bytes (the filter's work per token grows with its square).
const MAX_STOP_BYTES: usize = 256;
/// How long a client may leave streamed pieces unread before the answer is stopped: the model
/// answers one request at a time, so a client that stops reading must not hold it.
const STALLED_CLIENT: std::time::Duration = std::time::Duration::from_secs(30);
/// Longest one answer may take (it ends then, as if a stop string came).
const MAX_ANSWER_TIME: std::time::Duration = std::time::Duration::from_secs(300);
/// Most messages in one request.
const MAX_MESSAGES: usize = 1024;

/// An error in OpenAI's shape.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
            param,
            code: None,
        }
    }

    fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl From<ChatError> for ApiError {
    fn from(e: ChatError) -> Self {
        let message = e.to_string();
        match e {
            ChatError::UnknownModel(_) => ApiError {
                status: StatusCode::NOT_FOUND,
                kind: "invalid_request_error",
                message,
                param: Some("model"),
                code: Some("model_not_found"),
            },
            ChatError::Invalid(_) => ApiError::invalid(message, Some("messages")),
            ChatError::Busy(_) => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                kind: "server_error",
                message,
                param: None,
                code: Some("busy"),
            },
            ChatError::Gone => ApiError {
                status: StatusCode::REQUEST_TIMEOUT,
                kind: "invalid_request_error",
                message,
                param: None,
                code: Some("client_gone"),
            },
            ChatError::Internal(_) => {
                tracing::error!(error = %message, "chat completion failed");
                ApiError {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    kind: "server_error",
                    message,
                    param: None,
                    code: None,
                }
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// `GET /v1/models`.
pub(crate) async fn models(State(engine): State<Arc<Engine>>) -> Json<Value> {
    let listed = tokio::task::spawn_blocking(move || engine.models())
        .await
        .unwrap_or_default();
    Json(json!({
        "object": "list",
        "data": listed.iter().map(|m| {
            let mut listed = json!({
                "id": m.id,
                "object": "model",
                "created": 0,
                "owned_by": "hivemind",
                "description": m.description,
            });
            if let Some(note) = &m.note {
                listed["note"] = note.as_str().into();
            }
            listed
        }).collect::<Vec<_>>(),
    }))
}

/// A message's content: a string, or a list of parts of which only text is understood.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct InMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The request body (unknown fields are ignored, as OpenAI-compatible servers do).
#[derive(Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<InMessage>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<usize>,
    repeat_penalty: Option<f32>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    seed: Option<u64>,
    stop: Option<Stop>,
    n: Option<u64>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    // Refused when present (see the module docs).
    tools: Option<Value>,
    tool_choice: Option<Value>,
    functions: Option<Value>,
    function_call: Option<Value>,
    logprobs: Option<bool>,
    top_logprobs: Option<Value>,
    logit_bias: Option<Value>,
    response_format: Option<Value>,
    audio: Option<Value>,
    modalities: Option<Vec<String>>,
}

impl ChatRequest {
    /// The first parameter set to something this server does not implement.
    fn unsupported(&self) -> Option<(&'static str, &'static str)> {
        // null and [] (what some frameworks send by default) mean none.
        let set = |v: &Option<Value>| {
            v.as_ref()
                .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
        };
        let tools = "tools and function calling are not supported: this node's models are not \
                     trained for them";
        for (param, value) in [
            ("tools", &self.tools),
            ("tool_choice", &self.tool_choice),
            ("functions", &self.functions),
            ("function_call", &self.function_call),
        ] {
            if set(value) {
                return Some((param, tools));
            }
        }
        if self.logprobs == Some(true) {
            return Some(("logprobs", "logprobs are not supported"));
        }
        if set(&self.top_logprobs) {
            return Some(("top_logprobs", "logprobs are not supported"));
        }
        if self
            .logit_bias
            .as_ref()
            .is_some_and(|v| v.as_object().is_none_or(|m| !m.is_empty()))
        {
            return Some(("logit_bias", "logit_bias is not supported"));
        }
        if self
            .response_format
            .as_ref()
            .is_some_and(|v| !v.is_null() && v["type"] != "text")
        {
            return Some((
                "response_format",
                "only response_format {\"type\": \"text\"} is supported (no JSON mode)",
            ));
        }
        if set(&self.audio) {
            return Some(("audio", "only text output is supported"));
        }
        if self
            .modalities
            .as_ref()
            .is_some_and(|m| m.iter().any(|x| x != "text"))
        {
            return Some(("modalities", "only text output is supported"));
        }
        None
    }
}

/// A checked request.
struct Checked {
    model: ChatModel,
    name: String,
    messages: Vec<Message>,
    params: SamplingParams,
    max_tokens: Option<usize>,
    stops: Vec<String>,
    stream: bool,
    include_usage: bool,
}

fn check(body: &[u8]) -> Result<Checked, ApiError> {
    let req: ChatRequest = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(
            format!("the request body is not a valid chat completion request: {e}"),
            None,
        )
    })?;
    if let Some((param, message)) = req.unsupported() {
        return Err(ApiError::invalid(message, Some(param)));
    }
    let model = ChatModel::parse(&req.model).ok_or_else(|| {
        ApiError::from(ChatError::UnknownModel(format!(
            "no model {:?}: this node serves base, round, round-N, personal and \
             round+personal (GET /v1/models lists what it has)",
            req.model
        )))
    })?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages must not be empty",
            Some("messages"),
        ));
    }
    if req.messages.len() > MAX_MESSAGES {
        return Err(ApiError::invalid(
            format!(
                "at most {MAX_MESSAGES} messages, got {}",
                req.messages.len()
            ),
            Some("messages"),
        ));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => {
                return Err(ApiError::invalid(
                    format!("messages[{i}]: role {other:?} is not supported (system, developer, user, assistant)"),
                    Some("messages"),
                ))
            }
        };
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        (kind, _) => {
                            return Err(ApiError::invalid(
                                format!(
                                "messages[{i}]: content part {kind:?} is not supported (text only)"
                            ),
                                Some("messages"),
                            ))
                        }
                    }
                }
                text
            }
        };
        messages.push(Message::new(role, content));
    }
    if let Some(n) = req.n {
        if n != 1 {
            return Err(ApiError::invalid(
                format!("n must be 1, got {n}"),
                Some("n"),
            ));
        }
    }
    // Below 1e-3 the scaled logits overflow f32: greedy is what such a request means.
    let temperature = match req.temperature.unwrap_or(0.7) {
        t if (0.0..1e-3).contains(&t) => 0.0,
        t => t,
    };
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            format!("temperature must be between 0 and 2, got {temperature}"),
            Some("temperature"),
        ));
    }
    let top_p = req.top_p.unwrap_or(0.9);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            format!("top_p must be in (0, 1], got {top_p}"),
            Some("top_p"),
        ));
    }
    let repeat_penalty = req.repeat_penalty.unwrap_or(1.0);
    if !(0.01..=100.0).contains(&repeat_penalty) {
        return Err(ApiError::invalid(
            format!("repeat_penalty must be between 0.01 and 100, got {repeat_penalty}"),
            Some("repeat_penalty"),
        ));
    }
    let mut penalties = [0f32; 2];
    for (slot, (value, param)) in penalties.iter_mut().zip([
        (req.frequency_penalty, "frequency_penalty"),
        (req.presence_penalty, "presence_penalty"),
    ]) {
        let v = value.unwrap_or(0.0);
        if !(-2.0..=2.0).contains(&v) {
            return Err(ApiError::invalid(
                format!("{param} must be between -2 and 2, got {v}"),
                Some(param),
            ));
        }
        *slot = v;
    }
    let max_tokens = req.max_completion_tokens.or(req.max_tokens);
    if max_tokens == Some(0) {
        return Err(ApiError::invalid(
            "max_tokens must be at least 1",
            Some("max_tokens"),
        ));
    }
    // The context check happens with the prompt's length; this only keeps the number sane.
    let max_tokens = max_tokens.map(|n| usize::try_from(n.min(1 << 20)).unwrap_or(1 << 20));
    let stops = match req.stop {
        None => vec![],
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stops.len() > MAX_STOP
        || stops
            .iter()
            .any(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
    {
        return Err(ApiError::invalid(
            format!(
                "stop takes up to {MAX_STOP} non-empty strings of at most {MAX_STOP_BYTES} bytes"
            ),
            Some("stop"),
        ));
    }
    let params = SamplingParams {
        temperature,
        top_p,
        top_k: req.top_k.unwrap_or(40),
        repeat_penalty,
        frequency_penalty: penalties[0],
        presence_penalty: penalties[1],
        seed: req.seed.unwrap_or(42),
        ..Default::default()
    };
    Ok(Checked {
        model,
        name: req.model,
        messages,
        params,
        max_tokens,
        stops,
        stream: req.stream,
        include_usage: req.stream_options.unwrap_or_default().include_usage,
    })
}

/// Holds back text that may be the start of a stop string, and cuts the text at the first one.
#[derive(Debug, Default)]
struct StopFilter {
    stops: Vec<String>,
    pending: String,
}

impl StopFilter {
    /// Adds `piece`; returns the text that is safe to emit and whether a stop string was hit
    /// (then nothing after it is ever emitted).
    fn push(&mut self, piece: &str) -> (String, bool) {
        self.pending.push_str(piece);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        // Keep the longest tail that a stop string starts with.
        let keep = self
            .stops
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(|&k| s.is_char_boundary(k) && self.pending.ends_with(&s[..k]))
                    .max()
            })
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - keep;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    /// What is held back once the answer has ended without a stop string.
    fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// What the generating task sends to the response.
enum Step {
    Text(String),
    Done(Result<Completion, ChatError>),
}

/// Starts the completion on the engine; its pieces (after the stop filter) and then its
/// outcome arrive on the returned channel. Dropping the receiver stops the generation.
fn start(engine: Arc<Engine>, req: &Checked) -> mpsc::Receiver<Step> {
    let (tx, rx) = mpsc::channel(64);
    let (model, messages, params, max_tokens) = (
        req.model.clone(),
        req.messages.clone(),
        req.params.clone(),
        req.max_tokens,
    );
    let filter = Arc::new(std::sync::Mutex::new(StopFilter {
        stops: req.stops.clone(),
        pending: String::new(),
    }));
    let (pieces, held) = (tx.clone(), filter.clone());
    let probe = tx.clone();
    // The answer's clock starts with its first piece, not while the request waits its turn.
    let mut started: Option<std::time::Instant> = None;
    let on_text = move |piece: &str| {
        if started
            .get_or_insert_with(std::time::Instant::now)
            .elapsed()
            > MAX_ANSWER_TIME
        {
            return false;
        }
        let Ok(mut f) = held.lock() else { return false };
        let (out, stop) = f.push(piece);
        // A closed channel means the client went away, a full one for too long that it
        // stopped reading: either way, stop generating.
        let sent = out.is_empty() || send_within(&pieces, Step::Text(out), STALLED_CLIENT);
        sent && !stop
    };
    tokio::spawn(async move {
        let done = engine
            .complete(
                model,
                messages,
                params,
                max_tokens,
                move || probe.is_closed(),
                on_text,
            )
            .await;
        let rest = filter.lock().map(|mut f| f.finish()).unwrap_or_default();
        if done.is_ok() && !rest.is_empty() {
            let _ = tx.send(Step::Text(rest)).await;
        }
        let _ = tx.send(Step::Done(done)).await;
    });
    rx
}

/// Sends `step` from a blocking thread, waiting at most `limit` for room; `false` when the
/// receiver is gone or did not make room in time.
fn send_within(tx: &mpsc::Sender<Step>, step: Step, limit: std::time::Duration) -> bool {
    let start = std::time::Instant::now();
    let mut step = step;
    loop {
        match tx.try_send(step) {
            Ok(()) => return true,
            Err(mpsc::error::TrySendError::Closed(_)) => return false,
            Err(mpsc::error::TrySendError::Full(back)) => {
                if start.elapsed() >= limit {
                    return false;
                }
                step = back;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
    }
}

fn now_secs() -> u64 {
    crate::clock::now_ms() / 1000
}

fn completion_id() -> String {
    format!("chatcmpl-{:016x}", rand_u64())
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(crate::clock::now_ms());
    h.finish()
}

fn finish_reason(f: Finish) -> &'static str {
    match f {
        Finish::Stop => "stop",
        Finish::Length => "length",
    }
}

fn usage(c: &Completion) -> Value {
    json!({
        "prompt_tokens": c.stats.prompt_tokens,
        "completion_tokens": c.stats.generated_tokens,
        "total_tokens": c.stats.prompt_tokens + c.stats.generated_tokens,
    })
}

/// `POST /v1/chat/completions`.
pub(crate) async fn chat_completions(
    State(engine): State<Arc<Engine>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req = check(&body)?;
    let mut rx = start(engine, &req);
    let id = completion_id();
    let created = now_secs();
    if !req.stream {
        let mut text = String::new();
        while let Some(step) = rx.recv().await {
            match step {
                Step::Text(t) => text.push_str(&t),
                Step::Done(done) => {
                    let c = done?;
                    return Ok(Json(json!({
                        "id": id,
                        "object": "chat.completion",
                        "created": created,
                        "model": req.name,
                        "choices": [{
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "logprobs": null,
                            "finish_reason": finish_reason(c.finish),
                        }],
                        "usage": usage(&c),
                    }))
                    .into_response());
                }
            }
        }
        return Err(ChatError::Internal("the chat task ended without an answer".into()).into());
    }
    // Wait for the first step, so that a request that fails at once (busy, no such round,
    // too long) gets its HTTP status instead of an event stream.
    let first = rx
        .recv()
        .await
        .ok_or_else(|| ApiError::from(ChatError::Internal("the chat task ended".into())))?;
    if let Step::Done(Err(e)) = first {
        return Err(e.into());
    }
    let chunk = {
        let (id, name) = (id.clone(), req.name.clone());
        move |delta: Value, finish: Option<&str>, usage: Option<Value>| {
            let mut v = json!({
                "id": id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": name,
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
            });
            if let Some(u) = usage {
                v["usage"] = u;
            }
            Event::default().data(v.to_string())
        }
    };
    let include_usage = req.include_usage;
    let state = (Some(first), rx, false);
    let opening = chunk(json!({"role": "assistant", "content": ""}), None, None);
    let events = futures::stream::unfold(state, move |(mut next, mut rx, ended)| {
        let chunk = chunk.clone();
        async move {
            if ended {
                return None;
            }
            let step = match next.take() {
                Some(s) => s,
                None => rx.recv().await?,
            };
            let events: Vec<Event> = match step {
                Step::Text(t) => vec![chunk(json!({"content": t}), None, None)],
                Step::Done(Ok(c)) => {
                    let mut v = vec![chunk(json!({}), Some(finish_reason(c.finish)), None)];
                    if include_usage {
                        let mut last = json!({
                            "id": "", "object": "chat.completion.chunk", "choices": [],
                        });
                        last["usage"] = usage(&c);
                        v.push(Event::default().data(last.to_string()));
                    }
                    v.push(Event::default().data("[DONE]"));
                    return Some((v, (None, rx, true)));
                }
                Step::Done(Err(e)) => {
                    let e = ApiError::from(e);
                    vec![
                        Event::default().data(e.body().to_string()),
                        Event::default().data("[DONE]"),
                    ]
                }
            };
            Some((events, (None, rx, false)))
        }
    });
    use futures::StreamExt;
    let stream = futures::stream::once(async move { vec![opening] })
        .chain(events)
        .flat_map(|v| futures::stream::iter(v.into_iter().map(Ok::<_, Infallible>)));
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut f = StopFilter {
            stops: stops.iter().map(|s| s.to_string()).collect(),
            pending: String::new(),
        };
        let mut out = String::new();
        for p in pieces {
            let (o, hit) = f.push(p);
            out.push_str(&o);
            if hit {
                return (out, true);
            }
        }
        out.push_str(&f.finish());
        (out, false)
    }

    #[test]
    fn stop_strings_cut_the_answer_across_pieces() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        assert_eq!(run(&["\n\n"], &["one\n", "\ntwo"]), ("one".into(), true));
        assert_eq!(run(&["END"], &["xE", "N", "Dy"]), ("x".into(), true));
        // A held-back prefix that does not become a stop string is emitted later.
        assert_eq!(run(&["END"], &["xE", "Nz"]), ("xENz".into(), false));
        assert_eq!(run(&["END", "x"], &["abxEND"]), ("ab".into(), true));
        assert_eq!(run(&["é!"], &["caf", "é", "?"]), ("café?".into(), false));
    }

    #[test]
    fn a_reader_that_stalls_stops_the_answer() {
        let (tx, mut rx) = mpsc::channel(2);
        let limit = std::time::Duration::from_millis(50);
        assert!(send_within(&tx, Step::Text("a".into()), limit));
        assert!(send_within(&tx, Step::Text("b".into()), limit));
        // Full and never read: given up after the limit, not blocked for good.
        let t0 = std::time::Instant::now();
        assert!(!send_within(&tx, Step::Text("c".into()), limit));
        assert!(t0.elapsed() >= limit);
        // Read again: room again.
        assert!(matches!(rx.try_recv(), Ok(Step::Text(t)) if t == "a"));
        assert!(send_within(&tx, Step::Text("c".into()), limit));
        drop(rx);
        assert!(!send_within(&tx, Step::Text("d".into()), limit));
    }

    #[test]
    fn long_stop_strings_are_refused() {
        let body = format!(
            r#"{{"model":"base","messages":[{{"role":"user","content":"x"}}],"stop":"{}"}}"#,
            "x".repeat(MAX_STOP_BYTES + 1)
        );
        let e = check(body.as_bytes()).err().unwrap();
        assert_eq!(e.param, Some("stop"), "{}", e.message);
        let body = body.replace(&"x".repeat(MAX_STOP_BYTES + 1), &"x".repeat(MAX_STOP_BYTES));
        assert!(check(body.as_bytes()).is_ok());
    }

    #[test]
    fn requests_are_checked() {
        let ok = check(br#"{"model":"base","messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert_eq!(ok.max_tokens, None);
        assert_eq!(ok.messages[0].content, "hi");
        let parts = check(br#"{"model":"round-3","messages":[{"role":"developer","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}"#).unwrap();
        assert_eq!(parts.model, ChatModel::Round(Some(3)));
        assert_eq!(parts.messages[0], Message::new(Role::System, "ab"));
        // Harmless forms of the refused parameters pass; the penalties reach the sampler.
        let quiet = check(br#"{"model":"base","messages":[{"role":"user","content":"x"}],"tools":[],"functions":null,"logprobs":false,"logit_bias":{},"response_format":{"type":"text"},"modalities":["text"],"user":"u","frequency_penalty":0.5,"presence_penalty":-1}"#).unwrap();
        assert_eq!(quiet.params.frequency_penalty, 0.5);
        assert_eq!(quiet.params.presence_penalty, -1.0);
        for (bad, param) in [
            (
                r#"{"model":"base","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function"}]}"#,
                Some("tools"),
            ),
            (
                r#"{"model":"base","messages":[{"role":"user","content":"x"}],"tool_choice":"auto"}"#,
                Some("tool_choice"),
            ),
            (
                r#"{"model":"base","messages":[{"role":"user","content":"x"}],"logprobs":true}"#,
                Some("logprobs"),
            ),
            (
                r#"{"model":"base","messages":[{"role":"user","content":"x"}],"top_logprobs":2}"#,
                Some("top_logprobs"),
            ),
            (
                r#"{"model":"base","messages":[{"role":"user","content":"x"}],"logit_bias":{"5":10}}"#,
                Some("logit_bias"),
            ),
            (
                r#"{"model":"base","messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_schema"}}"#,
                Some("response_format"),
            ),
            (
                r#"{"model":"base","messages":[{"role":"user","content":"x"}],"modalities":["text","audio"]}"#,
                Some("modalities"),
            ),
            (
                r#"{"model":"base","messages":[{"role":"user","content":"x"}],"presence_penalty":-2.5}"#,
                Some("presence_penalty"),
            ),
            (
                r#"{"model":"gpt-4","messages":[{"role":"user","content":"hi"}]}"#,
                Some("model"),
            ),
            (r#"{"model":"base","messages":[]}"#, Some("messages")),
            (
                r#"{"model":"base","messages":[{"role":"tool","content":"x"}]}"#,
                Some("messages"),
            ),
            (
                r#"{"model":"base","messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#,
                Some("messages"),
            ),
            (
                r#"{"model":"base","messages":[{"role":"user","content":"x"}],"temperature":3}"#,
                Some("temperature"),
            ),
            (
                r#"{"model":"base","messages":[{"role":"user","content":"x"}],"top_p":0}"#,
                Some("top_p"),
            ),
            (
                r#"{"model":"base","messages":[{"role":"user","content":"x"}],"max_tokens":0}"#,
                Some("max_tokens"),
            ),
            (
                r#"{"model":"base","messages":[{"role":"user","content":"x"}],"n":2}"#,
                Some("n"),
            ),
            (
                r#"{"model":"base","messages":[{"role":"user","content":"x"}],"stop":["a","b","c","d","e"]}"#,
                Some("stop"),
            ),
            (
                r#"{"model":"base","messages":[{"role":"user","content":"x"}],"max_tokens":-1}"#,
                None,
            ),
            (r#"{"messages":[]}"#, None),
            ("not json", None),
        ] {
            let e = check(bad.as_bytes())
                .err()
                .unwrap_or_else(|| panic!("accepted {bad}"));
            assert_eq!(e.param, param, "{bad}: {}", e.message);
            assert!(e.status.is_client_error(), "{bad}");
        }
    }
}

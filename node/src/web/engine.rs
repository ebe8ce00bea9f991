//! The model a node chats with over HTTP: the base model, loaded once on first use, with one
//! of the node's adapters applied per request (`base`, `round`, `round-N`, `personal`,
//! `round+personal`). One answer is computed at a time; a few more requests may wait for
//! their turn, and the rest are told the node is busy.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hivemind_model::adapter::LoraAdapter;
use hivemind_model::chat::Message;
use hivemind_model::generate::{complete, Completion, SamplingParams};
use hivemind_model::train::TrainingInfo;
use hivemind_model::{BaseModel, LoadOptions};
use hivemind_protocol::Hash;
use tokio::sync::Semaphore;

use crate::data_dir::{DataDir, REFIT_COMMAND};

/// Tokens per answer when a request sets no limit (fewer when the context has less room).
pub const DEFAULT_MAX_TOKENS: usize = 256;

/// Round adapters listed as models, newest first.
const LISTED_ROUNDS: usize = 16;

/// Which adapters a chat applies to the base model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChatModel {
    /// The base model alone (`base`).
    Base,
    /// A committed round adapter: the latest (`round`) or round N (`round-N`).
    Round(Option<u64>),
    /// The node's personal adapter (`personal`).
    Personal,
    /// The latest round adapter plus the personal adapter (`round+personal`).
    RoundPersonal,
}

impl ChatModel {
    /// The model named `id`, if it is one of the forms above.
    pub fn parse(id: &str) -> Option<ChatModel> {
        match id {
            "base" => Some(ChatModel::Base),
            "round" => Some(ChatModel::Round(None)),
            "personal" => Some(ChatModel::Personal),
            "round+personal" => Some(ChatModel::RoundPersonal),
            _ => {
                let n = id.strip_prefix("round-")?;
                // Digits only: "round-+1" and "round-01" are not names of round 1.
                if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || n.starts_with('0') {
                    return None;
                }
                n.parse().ok().map(|n| ChatModel::Round(Some(n)))
            }
        }
    }
}

/// A model `GET /v1/models` lists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedModel {
    /// Its id (what a request's `model` names).
    pub id: String,
    /// What it is, for people.
    pub description: String,
    /// Why it may answer less than it should, and what to do, for people: a personal
    /// adapter that does not fit the round adapter under it (see
    /// [`DataDir::personal_misfit`]), or one trained on top of a round applied without it.
    pub note: Option<String>,
}

/// Why a chat could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The request names no model this node has.
    #[error("{0}")]
    UnknownModel(String),
    /// The request is well-formed but cannot be answered as asked (too long for the context).
    #[error("{0}")]
    Invalid(String),
    /// Too many requests are waiting already.
    #[error("the node is answering {0} other requests; try again shortly")]
    Busy(usize),
    /// The client left before its turn came.
    #[error("the client has gone")]
    Gone,
    /// The node failed (model missing, adapter unreadable).
    #[error("{0}")]
    Internal(String),
}

/// The node's chat model (see the module docs).
pub struct Engine {
    model_path: PathBuf,
    data_dir: DataDir,
    personal: Option<PathBuf>,
    loaded: Mutex<Option<Loaded>>,
    turn: Semaphore,
    waiting: AtomicUsize,
    max_waiting: usize,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model_path", &self.model_path)
            .field("personal", &self.personal)
            .finish_non_exhaustive()
    }
}

struct Loaded {
    model: BaseModel,
    /// The adapter dirs applied now, with their weights' modification times (empty: the
    /// base model).
    applied: Vec<(PathBuf, Option<std::time::SystemTime>)>,
}

impl Engine {
    /// Requests that may wait for their turn by default.
    pub const MAX_WAITING: usize = 8;

    /// An engine on the base model at `model_path` (loaded on first use), the round adapters of
    /// `data_dir` and the personal adapter at `personal`, if any.
    pub fn new(model_path: PathBuf, data_dir: DataDir, personal: Option<PathBuf>) -> Self {
        Engine {
            model_path,
            data_dir,
            personal,
            loaded: Mutex::new(None),
            turn: Semaphore::new(1),
            waiting: AtomicUsize::new(0),
            max_waiting: Self::MAX_WAITING,
        }
    }

    /// The network's base model hash, from the data dir's `network.json`.
    fn base_hash(&self) -> Option<Hash> {
        self.data_dir.network().ok()?.base_model_hash.parse().ok()
    }

    /// The personal adapter dir, when there is one trained on this base model.
    fn personal_dir(&self) -> Option<PathBuf> {
        let dir = self.personal.as_ref()?;
        let base = self.base_hash()?;
        TrainingInfo::trained_on(dir, &base).then(|| dir.clone())
    }

    /// The models a request may name: `base`, `round` and `round-N` for the latest committed
    /// rounds, `personal` and `round+personal` when there is a personal adapter.
    pub fn models(&self) -> Vec<ListedModel> {
        let mut out = vec![ListedModel {
            id: "base".into(),
            description: "the base model without an adapter".into(),
            note: None,
        }];
        let rounds = self.data_dir.rounds().map(|(r, _)| r).unwrap_or_default();
        if let Some(latest) = rounds.last() {
            out.push(ListedModel {
                id: "round".into(),
                description: format!(
                    "the latest round adapter ({}, blake3 {})",
                    latest.version, latest.hash
                ),
                note: None,
            });
        }
        for r in rounds.iter().rev().take(LISTED_ROUNDS) {
            out.push(ListedModel {
                id: r.version.clone(),
                description: format!(
                    "round {} adapter, {} inputs, blake3 {}",
                    r.number,
                    r.contributors.len(),
                    r.hash
                ),
                note: None,
            });
        }
        if let Some(personal) = self.personal_dir() {
            out.push(ListedModel {
                id: "personal".into(),
                description: "your personal adapter".into(),
                note: self.data_dir.personal_wants_round(&personal),
            });
            if let Some(latest) = rounds.last() {
                out.push(ListedModel {
                    id: "round+personal".into(),
                    description: "the latest round adapter and your personal adapter together"
                        .into(),
                    // Without paths: whoever reads the list is not told where files are.
                    note: self.data_dir.personal_misfit(&personal, latest).map(|why| {
                        format!(
                            "{why}; refit it to this round with `{REFIT_COMMAND}` and this \
                             node's --data-dir"
                        )
                    }),
                });
            }
        }
        out
    }

    /// The adapter dirs `model` applies.
    fn adapter_dirs(&self, model: &ChatModel) -> Result<Vec<PathBuf>, ChatError> {
        let round = |n: Option<u64>| -> Result<PathBuf, ChatError> {
            let rounds = self.data_dir.rounds().map(|(r, _)| r).unwrap_or_default();
            // Only the rounds `models` lists: each round served is exported once to disk,
            // so a client must not make the node export every round it ever committed.
            let found = match n {
                None => rounds.last(),
                Some(n) => rounds
                    .iter()
                    .rev()
                    .take(LISTED_ROUNDS)
                    .find(|r| r.number == n),
            };
            let Some(round) = found else {
                return Err(ChatError::UnknownModel(match n {
                    None => "this node has no committed round yet".into(),
                    Some(n) => format!(
                        "this node serves round N for its last {LISTED_ROUNDS} committed rounds, \
                         and round {n} is not one of them (GET /v1/models lists them)"
                    ),
                }));
            };
            self.data_dir
                .round_adapter_of(round)
                .map_err(|e| ChatError::Internal(format!("reading the round adapter: {e}")))
        };
        let personal = || {
            self.personal_dir().ok_or_else(|| {
                ChatError::UnknownModel(
                    "this node has no personal adapter trained on its base model".into(),
                )
            })
        };
        Ok(match model {
            ChatModel::Base => vec![],
            ChatModel::Round(n) => vec![round(*n)?],
            ChatModel::Personal => vec![personal()?],
            ChatModel::RoundPersonal => vec![round(None)?, personal()?],
        })
    }

    /// Answers the last turn of `messages` with `model`, calling `on_text` with each piece
    /// (return `false` to stop), in at most `max_tokens` tokens (`None`: [`DEFAULT_MAX_TOKENS`]
    /// or what fits the context). Waits for its turn; refuses when too many wait already.
    /// `gone` says whether the client has left: then a request whose turn comes is dropped
    /// before it costs anything.
    pub async fn complete(
        self: &Arc<Self>,
        model: ChatModel,
        messages: Vec<Message>,
        params: SamplingParams,
        max_tokens: Option<usize>,
        gone: impl Fn() -> bool,
        on_text: impl FnMut(&str) -> bool + Send + 'static,
    ) -> Result<Completion, ChatError> {
        let waiting = self.waiting.fetch_add(1, Ordering::SeqCst);
        let permit = if waiting >= self.max_waiting {
            Err(ChatError::Busy(waiting))
        } else {
            self.turn
                .acquire()
                .await
                .map_err(|_| ChatError::Internal("the node is shutting down".into()))
        };
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        let _permit = permit?;
        if gone() {
            return Err(ChatError::Gone);
        }
        let engine = self.clone();
        tokio::task::spawn_blocking(move || {
            engine.complete_now(&model, &messages, params, max_tokens, on_text)
        })
        .await
        .map_err(|e| ChatError::Internal(format!("the chat task failed: {e}")))?
    }

    fn complete_now(
        &self,
        model: &ChatModel,
        messages: &[Message],
        params: SamplingParams,
        max_tokens: Option<usize>,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Completion, ChatError> {
        let dirs = self.adapter_dirs(model)?;
        // An adapter rewritten in place (a new `train` of the personal adapter) is applied anew.
        let key: Vec<(PathBuf, Option<std::time::SystemTime>)> = dirs
            .iter()
            .map(|d| {
                let modified = std::fs::metadata(d.join(hivemind_model::adapter::WEIGHTS_FILE))
                    .and_then(|m| m.modified())
                    .ok();
                (d.clone(), modified)
            })
            .collect();
        // A chat that panicked mid-way left the model in an unknown state: load it again.
        let mut slot = self.loaded.lock().unwrap_or_else(|poisoned| {
            let mut slot = poisoned.into_inner();
            *slot = None;
            slot
        });
        self.loaded.clear_poison();
        if slot.is_none() {
            let model = BaseModel::load(&self.model_path, &LoadOptions::default())
                .map_err(|e| ChatError::Internal(format!("loading the base model: {e}")))?;
            *slot = Some(Loaded {
                model,
                applied: Vec::new(),
            });
        }
        let loaded = slot
            .as_mut()
            .ok_or_else(|| ChatError::Internal("no model".into()))?;
        if loaded.applied != key {
            if let Err(e) = apply(&mut loaded.model, &dirs) {
                // apply() removed the old adapter first: the model is the base model now.
                loaded.applied.clear();
                return Err(e);
            }
            loaded.applied = key;
        }
        let (budget, fit) = match max_tokens {
            Some(n) => (n, false),
            None => (DEFAULT_MAX_TOKENS, true),
        };
        complete(&loaded.model, messages, params, budget, fit, on_text).map_err(|e| match e {
            hivemind_model::ModelError::ContextTooLong { .. } => ChatError::Invalid(e.to_string()),
            e => ChatError::Internal(e.to_string()),
        })
    }
}

/// Applies the adapters in `dirs` (several are stacked into one) to `model`, or none.
fn apply(model: &mut BaseModel, dirs: &[PathBuf]) -> Result<(), ChatError> {
    model.decoder.remove_adapter();
    let adapters = dirs
        .iter()
        .map(|d| {
            LoraAdapter::read_dir(d)
                .map_err(|e| ChatError::Internal(format!("reading adapter {}: {e}", d.display())))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let applied = match adapters.as_slice() {
        [] => return Ok(()),
        [one] => one.clone(),
        many => hivemind_model::aggregate::stack(&many.iter().collect::<Vec<_>>())
            .map_err(|e| ChatError::Internal(format!("combining adapters: {e}")))?,
    };
    model
        .decoder
        .apply_adapter(&applied)
        .map_err(|e| ChatError::Internal(format!("applying the adapter: {e}")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn model_names_parse() {
        assert_eq!(ChatModel::parse("base"), Some(ChatModel::Base));
        assert_eq!(ChatModel::parse("round"), Some(ChatModel::Round(None)));
        assert_eq!(
            ChatModel::parse("round-12"),
            Some(ChatModel::Round(Some(12)))
        );
        assert_eq!(
            ChatModel::parse("round+personal"),
            Some(ChatModel::RoundPersonal)
        );
        for bad in [
            "",
            "round-",
            "round-01",
            "round-+1",
            "round-1x",
            "gpt-4",
            "round-99999999999999999999",
        ] {
            assert_eq!(ChatModel::parse(bad), None, "{bad}");
        }
    }
}

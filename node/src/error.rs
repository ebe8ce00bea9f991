//! The node library's one error type. The command line wraps it in `anyhow`; nothing in
//! the library does.

use std::path::PathBuf;

/// What can go wrong in a node: starting it, its data dir, its network, its adapters.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file or directory of the node could not be read or written.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done ("reading", "creating", ...).
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A JSON file of the data dir does not parse.
    #[error("{} is not a valid {what}: {source}", path.display())]
    Json {
        /// Which file kind.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// No node runs in the data dir (no status file, or its writer has exited).
    #[error("no running node found in {}: {why}", dir.display())]
    NoRunningNode {
        /// The data dir.
        dir: PathBuf,
        /// What was found instead.
        why: String,
    },
    /// A round that is not among the committed rounds was asked for.
    #[error("round {number} is not among the committed rounds of {}", dir.display())]
    NoSuchRound {
        /// The round asked for.
        number: u64,
        /// The data dir.
        dir: PathBuf,
    },
    /// No round has been committed yet.
    #[error("no committed round in {} yet", dir.display())]
    NoRounds {
        /// The data dir.
        dir: PathBuf,
    },
    /// A committed round adapter's blob is missing from the store.
    #[error("round adapter {hash} is not in the store of {}", dir.display())]
    MissingBlob {
        /// Its hash.
        hash: hivemind_protocol::Hash,
        /// The data dir.
        dir: PathBuf,
    },
    /// An adapter does not fit the network (alpha, rank, modules or a tensor shape).
    #[error("the adapter does not fit this network: {detail}")]
    NotOfNetwork {
        /// What differs.
        detail: String,
    },
    /// A contribution was refused by the running node.
    #[error("contribution refused: {detail}")]
    Refused {
        /// Why.
        detail: String,
    },
    /// A node's option is out of range.
    #[error("invalid option {option}: {detail}")]
    Config {
        /// The option.
        option: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// The node's key cannot serve as its libp2p identity.
    #[error("node identity: {detail}")]
    Identity {
        /// What is wrong.
        detail: String,
    },
    /// The gateway's address could not be bound.
    #[error("binding the gateway to {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A round asks for an aggregation rule this node does not run.
    #[error("round {round} asks for aggregation rule {rule}, this node runs fedavg")]
    UnknownRule {
        /// The round.
        round: u64,
        /// The rule it names.
        rule: String,
    },
    /// The driver task has stopped.
    #[error("the node's round driver has stopped")]
    DriverStopped,
    /// A wait of the harness ran past its deadline.
    #[error(transparent)]
    TimedOut(#[from] crate::harness::TimedOut),
    /// A blocking task panicked or was cancelled.
    #[error("a background task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] hivemind_store::Error),
    /// An adapter could not be read, written or checked.
    #[error(transparent)]
    Adapter(#[from] hivemind_model::adapter::AdapterError),
    /// The model crate failed (loading, adapters, aggregation).
    #[error(transparent)]
    Model(#[from] hivemind_model::ModelError),
    /// The protocol crate failed (signing, decoding, the round machine).
    #[error(transparent)]
    Protocol(#[from] hivemind_protocol::Error),
    /// The network failed.
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
}

/// Results of the node library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches a path and an action to an I/O error.
pub(crate) trait IoContext<T> {
    /// `Error::Io` with `what` and `path`.
    fn at(self, what: &'static str, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, what: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Io {
            what,
            path: path.into(),
            source,
        })
    }
}

//! A HiveMind node as a library: the node itself, and the `hive-node` command line over it.
//!
//! The node:
//!
//! | module | owns |
//! |---|---|
//! | [`node`] | [`Node`]: the one way a node starts ([`Node::start`]) and stops ([`Node::shutdown`]) |
//! | [`net`] | the libp2p event loop (only it touches the swarm), its [`net::Client`], and the blob protocol in [`net::blob`] |
//! | [`driver`] | the round driver: the sans-I/O round machine's actions carried out (fetch, aggregate, publish, commit), the network's adapter contract [`driver::NetSpec`] and the round adapter's aggregation |
//! | [`gateway`] | the legacy REST API (axum) in front of a node |
//! | [`web`] | the node's HTTP server and the OpenAI-compatible chat API ([`web::Engine`]: the model with the node's adapters) |
//! | [`data_dir`] | [`DataDir`]: every path and file of a node's data dir |
//! | [`identity`] | the node key as libp2p identity |
//! | [`harness`] | starting many nodes and waiting on them: for `demo`, tests, examples, benchmarks |
//! | [`error`] | the library's [`Error`] |
//!
//! The command line, [`cli`]: one module per command over shared argument types;
//! commands call the library and never each other.
//!
//! ```text
//!   cli::{join, serve, demo} ──NodeConfig──▶ Node::start ──▶ net (event loop, blob server)
//!                                                        ├─▶ driver (round machine, store)
//!                                                        └─▶ web server: chat API (join --http,
//!                                                            serve) + gateway routes (serve)
//!   cli::{status, rounds, export, contribute, chat, train} ──▶ DataDir (status.json,
//!                                                     network.json, inbox/, store blobs)
//! ```
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod cli;
mod clock;
pub mod data_dir;
pub mod driver;
pub mod error;
pub mod gateway;
pub mod harness;
pub mod identity;
pub mod net;
pub mod node;
pub mod web;

pub use data_dir::DataDir;
pub use error::{Error, Result};
pub use node::{Node, NodeConfig};

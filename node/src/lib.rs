//! The `hive-node` program as a library: the command line and the commands behind it.
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod chat;
pub mod cli;

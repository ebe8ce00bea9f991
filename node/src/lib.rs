//! The `hive-node` program as a library: the command line and the commands behind it.
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod blob_protocol;
pub mod chat;
pub mod cli;
pub mod demo;
pub mod driver;
pub mod gateway;
pub mod identity;
pub mod join;
pub mod network;
pub mod status;
pub mod train;
pub mod upload;

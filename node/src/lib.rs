//! The `hive-node` program as a library: the command line and the commands behind it.
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

#[cfg(feature = "network")]
pub mod blob_protocol;
pub mod chat;
pub mod cli;
#[cfg(feature = "network")]
pub mod driver;
pub mod identity;
#[cfg(feature = "network")]
pub mod join;
#[cfg(feature = "network")]
pub mod network;
#[cfg(feature = "network")]
pub mod status;
pub mod train;

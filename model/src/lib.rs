//! HiveMind models on candle: loading base models (GGUF, Hugging Face safetensors directories), the
//! tokenizer and chat template, generation, LoRA adapters (PEFT format) and their aggregation.
//!
//! ```text
//!  pull ──► loader ──► BaseModel { decoder, tokenizer, chat_template }
//!                          │                 ▲
//!  adapter (PEFT I/O) ──► lora (apply) ──────┘
//!  aggregate (FedAvg over adapters, canonical bytes)
//!  generate (sampling, ChatSession) ◄── chat (templates)
//! ```
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod adapter;
pub mod aggregate;
pub mod chat;
pub mod config;
pub mod dataset;
pub mod decoder;
pub mod dp;
mod error;
pub mod eval;
pub mod facts;
pub mod general;
pub mod generate;
pub mod gguf_export;
pub mod kernels;
pub mod loader;
pub mod lora;
mod module;
pub mod pull;
pub mod qweight;
#[doc(hidden)]
pub mod testing;
pub mod tokenizer;
pub mod train;

pub use error::{ModelError, Result};
pub use hivemind_protocol::Hash;
pub use loader::{model_hash, read_config, BaseModel, LoadOptions};
pub use module::{Module, UnknownModule};

//! The command line: [`Cli`] parses, [`run`] dispatches to one module per command.
//! Commands share the argument types of [`args`] and call the library; no command imports
//! another.

pub mod args;
mod chat;
mod contribute;
mod demo;
mod eval;
mod export;
mod identity;
mod join;
mod model;
mod rounds;
mod serve;
mod status;
mod train;
mod upload;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// HiveMind: a serverless federated-learning network for personal language models.
#[derive(Debug, Parser)]
#[command(name = "hive-node", version, about, long_about = None)]
pub struct Cli {
    /// More logging on stderr (-v info, -vv debug); `RUST_LOG` overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage base models.
    Model {
        /// What to do with models.
        #[command(subcommand)]
        command: model::ModelCommand,
    },
    /// Chat with the model (interactive, or one answer with --prompt).
    Chat(chat::ChatArgs),
    /// Print this node's libp2p PeerId (creates the identity key in the data dir on first use).
    Identity(identity::IdentityArgs),
    /// Train a LoRA adapter on local data (or write a sample dataset with --create-sample).
    Train(train::TrainArgs),
    /// Score the model with an adapter on a dataset: loss, perplexity, greedy exact match.
    Eval(eval::EvalArgs),
    /// Run one federated round on this machine: N nodes train on shards of the sample data,
    /// agree on the round adapter over libp2p on loopback, and it answers a question.
    Demo(demo::DemoArgs),
    /// Run a node of the network (a bootstrap node when no --bootstrap is given).
    Join(args::NodeArgs),
    /// Run a bootstrap node that also serves the legacy REST API (the gateway).
    Serve(serve::ServeArgs),
    /// The legacy upload script: send an adapter dir to a gateway (or --status, --download DIR).
    Upload(upload::UploadArgs),
    /// Show a running node's state (peer id, peers, rounds).
    Status(status::StatusArgs),
    /// List committed rounds.
    Rounds(rounds::RoundsArgs),
    /// Write a round adapter as a PEFT adapter dir.
    Export(export::ExportArgs),
    /// Hand an adapter dir to the running node, which announces it in the current round.
    Contribute(contribute::ContributeArgs),
}

/// Logging to stderr; `RUST_LOG` wins over `-v`.
pub fn init_tracing(verbose: u8) {
    let default = match verbose {
        // Kademlia warns on a bootstrap node that has no peers yet to bootstrap from.
        0 => "warn,libp2p_kad=error",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Model { command } => model::run(command),
        Command::Chat(a) => chat::run(a),
        Command::Identity(a) => identity::run(a),
        Command::Train(a) => train::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Demo(a) => demo::run(a),
        Command::Join(a) => join::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Upload(a) => upload::run(a),
        Command::Status(a) => status::run(a),
        Command::Rounds(a) => rounds::run(a),
        Command::Export(a) => export::run(a),
        Command::Contribute(a) => contribute::run(a),
    }
}

/// The multi-threaded runtime the node commands run on.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

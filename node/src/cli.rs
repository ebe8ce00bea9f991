//! Command-line interface: argument structs (flattened into subcommands, with env fallbacks) and
//! dispatch.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use crate::chat::{self, ChatArgs};

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
        command: ModelCommand,
    },
    /// Chat with the model (interactive, or one answer with --prompt).
    Chat(ChatArgs),
    /// Print this node's libp2p PeerId (creates the identity key in the data dir on first use).
    Identity(crate::identity::DataDirArgs),
    /// Train a LoRA adapter on local data (or write a sample dataset with --create-sample).
    Train(crate::train::TrainArgs),
    /// Run one federated round on this machine: N nodes train on shards of the sample data,
    /// agree on the round adapter over libp2p on loopback, and it answers a question.
    Demo(crate::demo::DemoArgs),
    /// Run a node of the network (a bootstrap node when no --bootstrap is given).
    Join(crate::join::JoinArgs),
    /// Run a bootstrap node that also serves the legacy REST API (the gateway).
    Serve(crate::join::ServeArgs),
    /// The legacy upload script: send an adapter dir to a gateway (or --status, --download DIR).
    Upload(crate::upload::UploadArgs),
    /// Show a running node's state (peer id, peers, rounds).
    Status(crate::status::StatusArgs),
    /// List committed rounds.
    Rounds(crate::status::RoundsArgs),
    /// Write a round adapter as a PEFT adapter dir.
    Export(crate::status::ExportArgs),
    /// Hand an adapter dir to the running node, which announces it in the current round.
    Contribute(crate::status::ContributeArgs),
}

/// `hive-node model ...`.
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Fetch the default base model (SmolLM2-135M-Instruct, Q4_1 GGUF) into the cache and verify it.
    Pull,
    /// Print where the default model is cached.
    Path,
}

/// Options shared by every command that loads a model.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Base model: `default`, a GGUF file, a Hugging Face model dir, or a hub id in the local HF cache.
    #[arg(long, env = "HIVE_MODEL", default_value = "default")]
    pub model: String,
    /// Keep safetensors weights in f32 instead of quantizing them to 4 bits at load.
    #[arg(long)]
    pub no_4bit: bool,
    /// Compute threads (default: 1 on machines with 2 or fewer cores, else half the cores).
    #[arg(long, env = "HIVE_THREADS")]
    pub threads: Option<usize>,
}

impl ModelArgs {
    /// Sets the compute thread count; must run before any tensor work.
    pub fn apply_threads(&self) {
        let n = self.threads.unwrap_or_else(default_threads).max(1);
        // candle's CPU kernels read the same variable as rayon.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        let _ = rayon_global(n);
    }
}

fn rayon_global(n: usize) -> Result<()> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// Token-by-token decoding is memory-bound and synchronisation-heavy: on small VMs extra threads
/// slow it down, so use one thread there and half the cores on bigger machines.
pub fn default_threads() -> usize {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    if cores <= 2 {
        1
    } else {
        cores / 2
    }
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

/// Progress lines for long work, on stderr.
pub fn progress(msg: &str) {
    eprintln!("hive-node: {msg}");
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Model { command } => match command {
            ModelCommand::Pull => {
                let path = hivemind_model::pull::ensure_default_model(&mut progress)?;
                println!("{}", path.display());
                Ok(())
            }
            ModelCommand::Path => {
                println!("{}", hivemind_model::pull::default_model_path().display());
                Ok(())
            }
        },
        Command::Chat(args) => chat::run(args),
        Command::Identity(args) => crate::identity::run(args),
        Command::Train(args) => crate::train::run(args),
        Command::Demo(args) => crate::demo::run(args),
        Command::Join(args) => crate::join::run(args),
        Command::Serve(args) => crate::join::serve(args),
        Command::Upload(args) => crate::upload::run(args),
        Command::Status(args) => crate::status::status(args),
        Command::Rounds(args) => crate::status::rounds(args),
        Command::Export(args) => crate::status::export(args),
        Command::Contribute(args) => crate::status::contribute(args),
    }
}

/// Resolves and loads the base model named by `args`.
pub fn load_model(args: &ModelArgs) -> Result<hivemind_model::BaseModel> {
    let spec = Some(args.model.as_str());
    let path: PathBuf = hivemind_model::pull::resolve_model(spec, &mut progress)?;
    let opts = hivemind_model::LoadOptions {
        no_4bit: args.no_4bit,
    };
    let model = hivemind_model::BaseModel::load(&path, &opts)?;
    Ok(model)
}

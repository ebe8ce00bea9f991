//! `hive-node model pull|path`: the default base model's cache.

use anyhow::Result;
use clap::Subcommand;

use super::args::progress;

/// `hive-node model ...`.
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Fetch the default base model (SmolLM2-135M-Instruct, Q4_1 GGUF) into the cache and verify it.
    Pull,
    /// Print where the default model is cached.
    Path,
}

/// Runs `hive-node model ...`.
pub(super) fn run(command: ModelCommand) -> Result<()> {
    match command {
        ModelCommand::Pull => {
            let path = hivemind_model::pull::ensure_default_model(&mut progress)?;
            println!("{}", path.display());
        }
        ModelCommand::Path => {
            println!("{}", hivemind_model::pull::default_model_path().display());
        }
    }
    Ok(())
}

//! `hive-node chat`: an interactive chat with streamed tokens, or one answer with `--prompt`.

use std::io::{BufRead, Write};
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use hivemind_model::generate::{ChatSession, GenStats, SamplingParams};

use super::args::{load_model, AdapterArgs, ModelArgs};

/// Options of `hive-node chat`.
#[derive(Debug, Clone, Args)]
pub struct ChatArgs {
    /// Base model options.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Which adapter to chat with.
    #[command(flatten)]
    pub adapter: AdapterArgs,
    /// System prompt (replaces the template's default one).
    #[arg(long)]
    pub system: Option<String>,
    /// Answer this prompt once and exit: only the reply on stdout.
    #[arg(long)]
    pub prompt: Option<String>,
    /// Upper bound of tokens per answer.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy and fully deterministic.
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f64,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f64,
    /// Sample among the k most likely tokens (0: all).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Penalty on recently generated tokens (1.0: none).
    #[arg(long, default_value_t = 1.1)]
    pub repeat_penalty: f32,
    /// Random seed.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Print one JSON line of timings on stderr after each answer.
    #[arg(long)]
    pub stats: bool,
}

#[derive(serde::Serialize)]
struct StatsLine<'a> {
    #[serde(flatten)]
    gen: &'a GenStats,
    load_seconds: f64,
}

/// Runs the chat command.
pub(super) fn run(args: ChatArgs) -> Result<()> {
    args.model.apply_threads();
    let t0 = Instant::now();
    let mut model = load_model(&args.model)?;
    args.adapter.apply(&mut model)?;
    let load_seconds = t0.elapsed().as_secs_f64();
    let params = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        repeat_penalty: args.repeat_penalty,
        seed: args.seed,
        ..Default::default()
    };
    let mut session = ChatSession::new(&model, args.system.clone(), params, args.max_new_tokens)?;
    let report = |stats: &GenStats| {
        if args.stats {
            let line = StatsLine {
                gen: stats,
                load_seconds,
            };
            if let Ok(s) = serde_json::to_string(&line) {
                eprintln!("{s}");
            }
        }
    };

    if let Some(prompt) = &args.prompt {
        let mut out = std::io::stdout().lock();
        let (_, stats) = session.ask(prompt, |piece| {
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        })?;
        writeln!(out)?;
        report(&stats);
        return Ok(());
    }

    eprintln!(
        "Chatting with {} ({} layers). Type `clear` to reset the conversation, `exit` to quit.",
        model.name, model.decoder.cfg.num_layers
    );
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        eprint!("\nYou: ");
        let Some(line) = lines.next() else { break };
        let line = line?;
        let input = line.trim();
        match input {
            "" => continue,
            "exit" | "quit" => break,
            "clear" => {
                session.clear();
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        let mut out = std::io::stdout().lock();
        write!(out, "Assistant: ")?;
        out.flush()?;
        let (_, stats) = session.ask(input, |piece| {
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        })?;
        writeln!(out)?;
        report(&stats);
    }
    Ok(())
}

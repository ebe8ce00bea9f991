//! `hive-node eval`: how well the model with an adapter (or none) knows a dataset: mean loss
//! and perplexity over reply tokens, greedy exact match and "answer contained", per item and
//! in total.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use hivemind_model::eval::{evaluate, EvalOptions, EvalReport};

use super::args::{load_model, progress, progress_bar, AdapterArgs, ModelArgs};

/// Options of `hive-node eval`.
#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    /// Base model options.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Which adapter to evaluate.
    #[command(flatten)]
    pub adapter: AdapterArgs,
    /// The data: the same Alpaca or ShareGPT JSON/JSONL files `train` reads. Each item's last
    /// assistant turn is the reference answer.
    #[arg(long)]
    pub data: PathBuf,
    /// Conversations are cut to this many tokens for the loss.
    #[arg(long, default_value_t = 512)]
    pub max_seq_len: usize,
    /// Upper bound of tokens per greedy answer.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Print the whole report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Runs the eval command.
pub(super) fn run(args: EvalArgs) -> Result<()> {
    args.model.apply_threads();
    let convs = hivemind_model::dataset::load_file(&args.data)?;
    anyhow::ensure!(!convs.is_empty(), "{}: no items", args.data.display());
    let mut model = load_model(&args.model)?;
    let adapters = args.adapter.apply(&mut model)?;
    progress(&if adapters.is_empty() {
        "evaluating the base model (no adapter)".into()
    } else {
        let names: Vec<String> = adapters.iter().map(|d| d.display().to_string()).collect();
        format!("evaluating with {}", names.join(" + "))
    });
    let opts = EvalOptions {
        max_len: args.max_seq_len,
        max_new_tokens: args.max_new_tokens,
    };
    let pb = progress_bar(convs.len(), "item");
    let report = evaluate(&model, &args.data, &convs, &opts, |done, _| {
        pb.set_position(done as u64)
    });
    pb.finish_and_clear();
    let report = report.with_context(|| format!("evaluating {}", args.data.display()))?;
    record_round_eval(&args, &adapters, &report);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

/// When the adapter evaluated is the data dir's latest round adapter alone, records the
/// scores in the data dir (the dashboard shows them beside the round).
fn record_round_eval(args: &EvalArgs, applied: &[PathBuf], r: &EvalReport) {
    let dir = args.adapter.data_dir.dir();
    let Ok(Some((round, round_dir))) = dir.latest_round_adapter() else {
        return;
    };
    if applied != [round_dir] {
        return;
    }
    let summary = serde_json::json!({
        "data": args.data.file_name().map(|n| n.to_string_lossy().into_owned()),
        "items": r.items,
        "exact_match": r.exact_match,
        "contains": r.contains,
        "mean_loss": r.mean_loss,
        "perplexity": r.perplexity,
        "evaluated_ms": crate::clock::now_ms(),
    });
    if let Err(e) = dir.record_eval(&round.hash, summary) {
        progress(&format!(
            "could not record the scores in {}: {e}",
            dir.path().display()
        ));
    }
}

fn print_report(r: &EvalReport) {
    println!(
        "{:>4}  {:>7}  {:>5}  {:>8}  answer",
        "item", "loss", "exact", "contains"
    );
    for s in &r.scores {
        let mark = |b: bool| if b { "yes" } else { "no" };
        println!(
            "{:>4}  {:>7.4}  {:>5}  {:>8}  {}",
            s.index,
            s.loss,
            mark(s.exact),
            mark(s.contains),
            s.answer.replace('\n', " ")
        );
    }
    println!(
        "{} items, {} reply tokens: mean loss {:.4}, perplexity {:.3}, exact match {:.3}, contains {:.3}",
        r.items, r.targets, r.mean_loss, r.perplexity, r.exact_match, r.contains
    );
}

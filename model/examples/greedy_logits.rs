//! HiveMind's side of a logit comparison with llama.cpp: greedy decoding through the decoder
//! `hive-node chat` uses, printing each step's 8 largest logits as JSON lines, the same lines
//! `tools/reference/llama_logits.cpp` prints for llama.cpp (`gguf_llamacpp_check.sh` compares
//! them).
//!
//! Usage: greedy_logits MODEL IDS N_STEPS [ADAPTER_DIR]
//!   IDS: the prompt's token ids, comma-separated (llama-logits prints them).
//!   FORCE (environment, optional): comma-separated token ids fed instead of the greedy ones.

use anyhow::{Context, Result};
use hivemind_model::adapter::LoraAdapter;
use hivemind_model::{BaseModel, LoadOptions};

fn ids(list: &str) -> Result<Vec<u32>> {
    list.split(',')
        .filter(|t| !t.trim().is_empty())
        .map(|t| {
            t.trim()
                .parse::<u32>()
                .with_context(|| format!("{t:?} is not a token id"))
        })
        .collect()
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, model, prompt, steps, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: greedy_logits MODEL IDS N_STEPS [ADAPTER_DIR]");
    };
    let mut m = BaseModel::load(std::path::Path::new(model), &LoadOptions::default())?;
    if let Some(dir) = rest.first() {
        m.decoder.apply_adapter(&LoraAdapter::read_dir(dir)?)?;
    }
    let force = ids(&std::env::var("FORCE").unwrap_or_default())?;
    let steps: usize = steps.parse().context("N_STEPS")?;
    let mut cache = m.decoder.new_cache();
    let mut input = ids(prompt)?;
    for step in 0..steps {
        let logits = m
            .decoder
            .forward_last(&input, &mut cache)?
            .to_vec1::<f32>()?;
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|a, b| logits[*b].total_cmp(&logits[*a]));
        let top: Vec<String> = order
            .iter()
            .take(8)
            .map(|i| format!("[{i},{}]", logits[*i]))
            .collect();
        println!("{{\"step\":{step},\"top\":[{}]}}", top.join(","));
        input = vec![force.get(step).copied().unwrap_or(order[0] as u32)];
    }
    Ok(())
}

//! The default model against Hugging Face transformers: same prompt ids, same greedy tokens.
//!
//! Reference: `model/tests/fixtures/greedy_smollm2.json`, made by `tools/reference/hf_greedy.py`
//! (its header records the exact command, package versions and the model's sha256). transformers
//! loads the same GGUF file, dequantizes it to float32 and decodes greedily on the CPU.
//!
//! These tests need the cached default model (`hive-node model pull`). Without it they print why
//! and return, unless `HIVE_REQUIRE_DEFAULT_MODEL=1` (set by `.ci/run`), where they fail.

use std::path::PathBuf;

use anyhow::Result;
use hivemind_model::chat::{ChatTemplate, Message, Role};
use hivemind_model::generate::argmax;
use hivemind_model::{BaseModel, LoadOptions};
use serde_json::Value;

fn default_model() -> Option<PathBuf> {
    let p = hivemind_model::pull::default_model_path();
    if p.exists() {
        return Some(p);
    }
    if std::env::var("HIVE_REQUIRE_DEFAULT_MODEL").is_ok_and(|v| v == "1") {
        panic!(
            "the default model is not cached at {}; run `hive-node model pull`",
            p.display()
        );
    }
    eprintln!(
        "skipping: default model not cached at {} (run `hive-node model pull`)",
        p.display()
    );
    None
}

fn fixture() -> Result<Value> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/greedy_smollm2.json"
    ))?;
    Ok(serde_json::from_str(&text)?)
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn config_read_from_gguf_matches_transformers() -> Result<()> {
    let Some(path) = default_model() else {
        return Ok(());
    };
    let fx = fixture()?;
    let m = BaseModel::load(&path, &LoadOptions::default())?;
    let c = &m.decoder.cfg;
    let f = &fx["config"];
    assert_eq!(c.hidden_size as u64, f["hidden_size"].as_u64().unwrap_or(0));
    assert_eq!(
        c.intermediate_size as u64,
        f["intermediate_size"].as_u64().unwrap_or(0)
    );
    assert_eq!(
        c.num_layers as u64,
        f["num_hidden_layers"].as_u64().unwrap_or(0)
    );
    assert_eq!(
        c.num_heads as u64,
        f["num_attention_heads"].as_u64().unwrap_or(0)
    );
    assert_eq!(
        c.num_kv_heads as u64,
        f["num_key_value_heads"].as_u64().unwrap_or(0)
    );
    assert_eq!(c.head_dim as u64, f["head_dim"].as_u64().unwrap_or(0));
    assert_eq!(c.vocab_size as u64, f["vocab_size"].as_u64().unwrap_or(0));
    assert!((c.rope_theta - f["rope_theta"].as_f64().unwrap_or(0.0)).abs() < 1e-3);
    assert!((c.rms_norm_eps - f["rms_norm_eps"].as_f64().unwrap_or(0.0)).abs() < 1e-9);
    assert_eq!(
        c.tie_word_embeddings,
        f["tie_word_embeddings"].as_bool().unwrap_or(false)
    );
    Ok(())
}

#[test]
fn greedy_tokens_match_transformers() -> Result<()> {
    let Some(path) = default_model() else {
        return Ok(());
    };
    let fx = fixture()?;
    let m = BaseModel::load(&path, &LoadOptions::default())?;
    let template = ChatTemplate::new(m.chat_template.as_deref(), "", "")?;
    let mut report = Vec::new();
    for p in fx["prompts"].as_array().into_iter().flatten() {
        let name = p["name"].as_str().unwrap_or("?");
        let prompt = p["prompt"].as_str().unwrap_or_default();
        let want_in = ids(&p["input_ids"]);
        // Our template renders the same prompt text, and our tokenizer gives the same ids.
        if p["kind"] == "chat" {
            let user = p["user_message"].as_str().unwrap_or_default();
            let rendered = template.render(&[Message::new(Role::User, user)], true)?;
            assert_eq!(rendered, prompt, "{name}: chat template");
        }
        assert_eq!(
            m.tokenizer.encode(prompt, false)?,
            want_in,
            "{name}: prompt ids"
        );

        let want = ids(&p["generated_ids"]);
        let mut cache = m.decoder.new_cache();
        let logits = m
            .decoder
            .forward_last(&want_in, &mut cache)?
            .to_vec1::<f32>()?;
        // The prompt's top-5 logits agree with transformers' to within float noise.
        for t in p["prompt_top5"].as_array().into_iter().flatten() {
            let id = t["id"].as_u64().or_else(|| t[0].as_u64()).unwrap_or(0) as usize;
            let l = t["logit"]
                .as_f64()
                .or_else(|| t[1].as_f64())
                .unwrap_or(f64::NAN);
            assert!(
                (logits[id] as f64 - l).abs() < 2e-2,
                "{name}: logit of {id}: {} vs {l}",
                logits[id]
            );
        }
        let mut got = vec![argmax(&logits)];
        while got.len() < want.len() {
            let l = m.decoder.forward_last(&[got[got.len() - 1]], &mut cache)?;
            got.push(argmax(&l.to_vec1::<f32>()?));
        }
        let same = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
        report.push(format!("{name}: {same}/{} tokens equal", want.len()));
        assert!(
            same >= 32,
            "{name}: only the first {same} greedy tokens match transformers\n ours: {got:?}\n hf:   {want:?}"
        );
    }
    eprintln!("{}", report.join("\n"));
    Ok(())
}

#[test]
fn the_templates_default_system_prompt_is_replaced_by_a_given_one() -> Result<()> {
    let Some(path) = default_model() else {
        return Ok(());
    };
    let m = BaseModel::load(&path, &LoadOptions::default())?;
    let template = ChatTemplate::new(m.chat_template.as_deref(), "", "")?;
    let plain = template.render(&[Message::new(Role::User, "hi")], true)?;
    assert!(plain.contains("named SmolLM"), "{plain}");
    let custom = template.render(
        &[
            Message::new(Role::System, "You are HiveMind."),
            Message::new(Role::User, "hi"),
        ],
        true,
    )?;
    assert!(
        custom.contains("You are HiveMind.") && !custom.contains("SmolLM"),
        "{custom}"
    );
    assert!(custom.ends_with("<|im_start|>assistant\n"), "{custom}");
    Ok(())
}

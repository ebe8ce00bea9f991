//! `hive-node chat` and `hive-node eval` as a user runs them: real processes on a tiny
//! generated GGUF model.

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::Result;
use hivemind_model::config::Arch;
use hivemind_model::testing::TinyModel;

fn hive() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hive-node"));
    // Never touch the user's cache from tests.
    c.env(
        "HIVE_HOME",
        std::env::temp_dir().join("hivemind-test-home-unused"),
    );
    c
}

fn tiny_gguf(dir: &std::path::Path, arch: Arch) -> Result<std::path::PathBuf> {
    let p = dir.join(format!("tiny-{}.gguf", arch.as_str()));
    TinyModel::new(arch, 1)?.write_gguf(&p)?;
    Ok(p)
}

#[test]
fn prompt_mode_prints_only_the_reply_and_is_deterministic_at_temperature_0() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = tiny_gguf(dir.path(), Arch::Llama)?;
    let run = || -> Result<std::process::Output> {
        Ok(hive()
            .args([
                "chat",
                "--prompt",
                "hello there",
                "--temperature",
                "0",
                "--max-new-tokens",
                "12",
                "--stats",
            ])
            .arg("--model")
            .arg(&model)
            .output()?)
    };
    let a = run()?;
    let b = run()?;
    assert!(
        a.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&a.stderr)
    );
    assert_eq!(a.stdout, b.stdout, "greedy output differs between runs");
    let stdout = String::from_utf8(a.stdout)?;
    assert!(stdout.ends_with('\n'));
    assert!(
        !stdout.contains("hive-node:"),
        "logs leaked to stdout: {stdout:?}"
    );
    // --stats: one JSON line on stderr with the documented keys.
    let stderr = String::from_utf8(a.stderr)?;
    let line = stderr
        .lines()
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| anyhow::anyhow!("no stats line in {stderr:?}"))?;
    let v: serde_json::Value = serde_json::from_str(line)?;
    for key in [
        "prompt_tokens",
        "prompt_tokens_per_s",
        "generated_tokens",
        "generation_tokens_per_s",
        "load_seconds",
    ] {
        assert!(v.get(key).is_some(), "stats line lacks {key}: {line}");
    }
    assert!(v["prompt_tokens"].as_u64().unwrap_or(0) > 3);
    assert!(v["generated_tokens"].as_u64().unwrap_or(0) >= 1);
    Ok(())
}

#[test]
fn interactive_mode_handles_clear_and_exit() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = tiny_gguf(dir.path(), Arch::Qwen2)?;
    let mut child = hive()
        .args(["chat", "--temperature", "0", "--max-new-tokens", "5"])
        .arg("--model")
        .arg(&model)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdin"))?
        .write_all(b"hi\nclear\nhi\nexit\nthis is never read\n")?;
    let out = child.wait_with_output()?;
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout)?;
    let answers: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("Assistant: "))
        .collect();
    assert_eq!(answers.len(), 2, "{stdout}");
    // After `clear` the same question gets the same greedy answer.
    assert_eq!(answers[0], answers[1]);
    assert!(String::from_utf8(out.stderr)?.contains("conversation cleared"));
    Ok(())
}

#[test]
fn bad_model_path_is_a_clear_error() -> Result<()> {
    let out = hive()
        .args([
            "chat",
            "--prompt",
            "x",
            "--model",
            "/nonexistent/model.gguf",
        ])
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr)?;
    assert!(err.contains("/nonexistent/model.gguf"), "{err}");
    Ok(())
}

#[test]
fn adapter_that_is_not_an_adapter_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = tiny_gguf(dir.path(), Arch::Llama)?;
    let bogus = dir.path().join("adapter");
    std::fs::create_dir_all(&bogus)?;
    std::fs::write(bogus.join("adapter_config.json"), "{not json")?;
    let out = hive()
        .args(["chat", "--prompt", "x"])
        .arg("--model")
        .arg(&model)
        .arg("--adapter")
        .arg(&bogus)
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr)?;
    assert!(err.contains("adapter"), "{err}");
    Ok(())
}

#[test]
fn eval_scores_a_dataset_with_the_chosen_adapter_and_names_bad_items() -> Result<()> {
    use hivemind_model::testing::random_adapter;
    let dir = tempfile::tempdir()?;
    let model = tiny_gguf(dir.path(), Arch::Llama)?;
    let data = dir.path().join("facts.json");
    std::fs::write(
        &data,
        r#"[{"instruction": "Where does Ana work?", "output": "Ana works at Brixova Labs."},
            {"instruction": "Say hi", "output": "hi"}]"#,
    )?;
    let cfg = TinyModel::new(Arch::Llama, 1)?.cfg;
    let shape = cfg.adapter_shape(4, &["q_proj".to_string(), "v_proj".to_string()])?;
    let personal = dir.path().join("adapters").join("my_adapter");
    random_adapter(&shape, 8.0, 3)?.write_dir(&personal)?;
    let eval = |extra: &[&str]| -> Result<std::process::Output> {
        Ok(hive()
            .current_dir(dir.path())
            .args(["eval", "--max-new-tokens", "6", "--json", "--data"])
            .arg(&data)
            .arg("--model")
            .arg(&model)
            .arg("--data-dir")
            .arg(dir.path().join("no-node"))
            .args(extra)
            .output()?)
    };
    let by_dir = eval(&["--adapter", "adapters/my_adapter"])?;
    assert!(
        by_dir.status.success(),
        "{}",
        String::from_utf8_lossy(&by_dir.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&by_dir.stdout)?;
    assert_eq!(report["items"], 2);
    assert_eq!(report["scores"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        report["scores"][0]["expected"],
        "Ana works at Brixova Labs."
    );
    let loss = report["mean_loss"].as_f64().unwrap_or(f64::NAN);
    let ppl = report["perplexity"].as_f64().unwrap_or(f64::NAN);
    assert!(loss.is_finite() && loss > 0.0, "{report}");
    assert!((ppl - loss.exp()).abs() < 1e-6 * ppl);
    // `--use personal` reads the same adapter; the base model scores differently.
    let by_choice = eval(&["--use", "personal"])?;
    assert!(
        by_choice.status.success(),
        "{}",
        String::from_utf8_lossy(&by_choice.stderr)
    );
    assert_eq!(by_choice.stdout, by_dir.stdout);
    let base = eval(&["--use", "none"])?;
    assert!(base.status.success());
    assert_ne!(base.stdout, by_dir.stdout);
    // With no --use, an adapter `train` did not make for this model is left out ...
    let auto = eval(&[])?;
    assert!(auto.status.success());
    assert_eq!(auto.stdout, base.stdout);
    // ... and one it made is applied (no node here, so no round adapter beside it).
    let trained = hive()
        .current_dir(dir.path())
        .args([
            "train",
            "--max-steps",
            "2",
            "--rank",
            "4",
            "--threads",
            "1",
            "--replay",
            "1",
        ])
        .args(["--output", "adapters/my_adapter", "--data"])
        .arg(&data)
        .arg("--model")
        .arg(&model)
        .output()?;
    let log = String::from_utf8_lossy(&trained.stderr);
    assert!(trained.status.success(), "{log}");
    assert!(log.contains("to replay 1 per step"), "{log}");
    let auto = eval(&[])?;
    assert!(auto.status.success());
    assert!(String::from_utf8_lossy(&auto.stderr).contains("personal adapter"));
    assert_eq!(auto.stdout, eval(&["--use", "personal"])?.stdout);
    assert_ne!(auto.stdout, base.stdout);
    // round+personal needs a node that runs this model.
    let both = eval(&["--use", "round+personal"])?;
    assert!(!both.status.success());
    let err = String::from_utf8_lossy(&both.stderr);
    assert!(err.contains("not on a network of this base model"), "{err}");
    // An item without an answer is named.
    std::fs::write(
        &data,
        r#"[{"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi"}]},
            {"conversations": [{"from": "human", "value": "no answer"}]}]"#,
    )?;
    let bad = eval(&["--use", "none"])?;
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("facts.json") && err.contains("item 1"),
        "{err}"
    );
    Ok(())
}

//! `hive-node chat` as a user runs it: a real process on a tiny generated GGUF model.

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

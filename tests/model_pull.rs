//! `hive-node model pull` failure modes: each names the problem and what to do.

use std::process::Command;

use anyhow::Result;

fn hive(home: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hive-node"));
    c.env("HIVE_HOME", home);
    c
}

#[test]
fn without_python_the_error_says_what_to_do() -> Result<()> {
    let home = tempfile::tempdir()?;
    let out = hive(home.path())
        .env("HIVE_PYTHON", "/nonexistent/python3")
        .args(["model", "pull"])
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr)?;
    assert!(err.contains("Python") && err.contains("--model"), "{err}");
    // Nothing half-done is left in the cache.
    let models = home.path().join("models");
    let leftovers: Vec<_> = std::fs::read_dir(&models)?.collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    Ok(())
}

#[test]
fn a_cached_file_with_the_wrong_hash_is_refused() -> Result<()> {
    let home = tempfile::tempdir()?;
    let models = home.path().join("models");
    std::fs::create_dir_all(&models)?;
    let file = models.join(hivemind_model::pull::DEFAULT_FILE);
    std::fs::write(&file, b"not the model")?;
    let out = hive(home.path())
        .args(["chat", "--prompt", "hi"])
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr)?;
    assert!(
        err.contains("sha256") && err.contains(hivemind_model::pull::DEFAULT_FILE),
        "{err}"
    );
    // The bad file is left for the user to inspect, not replaced silently.
    assert_eq!(std::fs::read(&file)?, b"not the model");
    Ok(())
}

#[test]
fn model_path_honours_hive_home() -> Result<()> {
    let home = tempfile::tempdir()?;
    let out = hive(home.path()).args(["model", "path"]).output()?;
    assert!(out.status.success());
    let p = String::from_utf8(out.stdout)?;
    assert!(
        p.trim().starts_with(home.path().to_str().unwrap_or("?")),
        "{p}"
    );
    Ok(())
}

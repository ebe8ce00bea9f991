//! Small file-system helpers for atomic, durable writes.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};

/// Creates `dir` (and its parents) if missing; new directories are owner-only on Unix.
pub(crate) fn create_dir_private(dir: &Path) -> Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).at(dir)
}

/// Makes the directory entries of `dir` (creations, renames, removals) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        File::open(dir).and_then(|d| d.sync_all()).at(dir)
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Creates a fresh file `dir/<prefix><random>` that did not exist before, with
/// permission bits `mode` applied at creation (Unix), open for reading and writing.
pub(crate) fn create_temp(dir: &Path, prefix: &str, mode: u32) -> Result<(File, PathBuf)> {
    loop {
        let path = dir.join(format!("{prefix}{:016x}", rand::random::<u64>()));
        let mut opts = OpenOptions::new();
        opts.read(true).write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(mode);
        }
        #[cfg(not(unix))]
        let _ = mode;
        match opts.open(&path) {
            Ok(file) => return Ok((file, path)),
            // 64 random bits collided with a leftover: draw again.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).at(&path),
        }
    }
}

/// Removes every file in `dir` whose name starts with `prefix`; returns how many.
pub(crate) fn remove_prefixed(dir: &Path, prefix: &str) -> Result<usize> {
    let mut removed = 0;
    for entry in fs::read_dir(dir).at(dir)? {
        let entry = entry.at(dir)?;
        if entry.file_name().to_string_lossy().starts_with(prefix) {
            let path = entry.path();
            match fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).at(&path),
            }
        }
    }
    Ok(removed)
}

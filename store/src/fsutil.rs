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

/// Bytes written between two [`Writeback::wrote`] kicks.
pub(crate) const WRITEBACK_BYTES: u64 = 8 << 20;

/// Starts the kernel writing a file's dirty pages to disk while more are written, so
/// the `fsync` that makes the file durable waits for the last few MiB rather than for
/// the whole file. Best effort (`sync_file_range` with `SYNC_FILE_RANGE_WRITE`, which does
/// not wait; Linux only): durability still comes from that `fsync`.
#[derive(Debug, Default)]
pub(crate) struct Writeback {
    /// Bytes `[0, kicked)` have been handed to writeback.
    kicked: u64,
}

impl Writeback {
    /// Records that `[0, upto)` has been written in order; kicks writeback every
    /// [`WRITEBACK_BYTES`].
    pub(crate) fn wrote(&mut self, file: &File, upto: u64) {
        if upto >= self.kicked + WRITEBACK_BYTES {
            start_writeback(file, self.kicked, upto - self.kicked);
            self.kicked = upto;
        }
    }

    /// Records that `[offset, offset + len)` was written out of order; kicks writeback for
    /// it when it is at least a MiB (smaller pieces wait for the closing fsync).
    pub(crate) fn wrote_range(&self, file: &File, offset: u64, len: u64) {
        if len >= 1 << 20 {
            start_writeback(file, offset, len);
        }
    }
}

#[cfg(target_os = "linux")]
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: the descriptor is open for the duration of the call (borrowed from `file`)
    // and the call only reads its arguments.
    let _ = unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE)
    };
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File, _offset: u64, _len: u64) {}

/// Bytes an unprivileged process may still write on the file system holding `path`
/// (`statvfs`: available blocks times the fragment size).
#[cfg(unix)]
pub(crate) fn available_bytes(path: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let io_err = |source: std::io::Error| crate::error::Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io_err(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path that outlives the call, and `st` points to
    // writable memory of the right type, which statvfs fills on success.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io_err(std::io::Error::last_os_error()));
    }
    // SAFETY: statvfs returned 0, so it initialised the whole struct (and it was zeroed).
    let st = unsafe { st.assume_init() };
    // The field types differ between platforms (u64 here, u32 on some).
    #[allow(clippy::useless_conversion)]
    let (blocks, size) = (u64::from(st.f_bavail), u64::from(st.f_frsize));
    Ok(blocks.saturating_mul(size))
}

/// Without `statvfs`, the floor cannot be checked: report no limit.
#[cfg(not(unix))]
pub(crate) fn available_bytes(_path: &Path) -> Result<u64> {
    Ok(u64::MAX)
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

//! The node's ed25519 identity key, kept in `<data dir>/identity.key`.
//!
//! The file holds the 64-byte key pair (secret half, then public half), so damage
//! to either half is detected: the public half must match the secret. It is
//! created owner-only (mode 0600 given to `open`, never widened and narrowed) and
//! atomically (temp file, fsync, hard link into place, fsync the directory). The
//! key is never printed: `SigningKey`'s `Debug` shows only the public key, and no
//! error carries key bytes.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

use ed25519_dalek::SigningKey;
use rand::rngs::OsRng;

use crate::error::{Error, IoContext, Result};
use crate::fsutil::{create_dir_private, create_temp, remove_prefixed, sync_dir};

/// File name of the identity key inside the data directory.
pub const IDENTITY_FILE: &str = "identity.key";
/// Prefix of a key being created; a leftover holds an unused secret and is deleted.
const TEMP_PREFIX: &str = ".identity.key.tmp-";
/// Length of the key file: secret key, then public key.
const KEY_FILE_LEN: usize = 64;

/// Loads the node identity from `dir/identity.key`, creating it (and `dir`) on
/// first start.
///
/// A key file that cannot be read as a key pair gives [`Error::CorruptIdentity`];
/// it is never replaced, since that would silently change the node's identity.
pub fn load_or_create_identity(dir: impl AsRef<Path>) -> Result<SigningKey> {
    load_or_create_identity_with(dir, || SigningKey::generate(&mut OsRng))
}

/// [`load_or_create_identity`], where `make` creates the key on first start (a key with a
/// network's proof of work, say). An existing key is loaded as it is, whatever `make` would
/// have made.
pub fn load_or_create_identity_with(
    dir: impl AsRef<Path>,
    mut make: impl FnMut() -> SigningKey,
) -> Result<SigningKey> {
    let dir = dir.as_ref();
    create_dir_private(dir)?;
    let path = dir.join(IDENTITY_FILE);
    loop {
        if let Some(key) = read_identity(&path)? {
            // Leftovers of a creation interrupted by a crash hold unused secrets.
            if remove_prefixed(dir, TEMP_PREFIX)? > 0 {
                sync_dir(dir)?;
            }
            return Ok(key);
        }
        let key = make();
        let (mut file, temp) = create_temp(dir, TEMP_PREFIX, 0o600)?;
        let written = file
            .write_all(&key.to_keypair_bytes())
            .and_then(|()| file.sync_all());
        drop(file);
        // A hard link, unlike a rename, never replaces an existing file: if another
        // process created the identity meanwhile, its key wins and we load it.
        let linked = written.and_then(|()| fs::hard_link(&temp, &path));
        let _ = fs::remove_file(&temp);
        match linked {
            // Load it back like any existing key (which also clears leftovers).
            Ok(()) => sync_dir(dir)?,
            // Lost a race: with another creator (AlreadyExists), or with another
            // process's cleanup removing our temp file (NotFound). Look again.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::AlreadyExists | io::ErrorKind::NotFound
                ) =>
            {
                continue
            }
            Err(e) => return Err(e).at(&path),
        }
    }
}

/// Reads the key pair at `path`; `Ok(None)` if there is no such file.
fn read_identity(path: &Path) -> Result<Option<SigningKey>> {
    let mut bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).at(path),
    };
    let parsed = <[u8; KEY_FILE_LEN]>::try_from(bytes.as_slice())
        .map_err(|_| format!("expected {KEY_FILE_LEN} bytes, found {}", bytes.len()))
        .and_then(|pair| {
            SigningKey::from_keypair_bytes(&pair)
                .map_err(|_| "its public key does not match its secret key".to_string())
        });
    // Best-effort wipe of the secret's copy in our buffer.
    bytes.fill(0);
    std::hint::black_box(&bytes);
    parsed.map(Some).map_err(|detail| Error::CorruptIdentity {
        path: path.to_path_buf(),
        detail,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(unix)]
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn created_owner_only_then_reloaded() -> anyhow::Result<()> {
        let parent = tempfile::tempdir()?;
        let dir = parent.path().join("data");
        let key = load_or_create_identity(&dir)?;
        let path = dir.join(IDENTITY_FILE);
        assert_eq!(fs::read(&path)?, key.to_keypair_bytes());
        #[cfg(unix)]
        {
            assert_eq!(fs::metadata(&path)?.permissions().mode() & 0o777, 0o600);
            assert_eq!(fs::metadata(&dir)?.permissions().mode() & 0o777, 0o700);
        }
        let again = load_or_create_identity(&dir)?;
        assert_eq!(again.to_bytes(), key.to_bytes());
        let names: Vec<_> = fs::read_dir(&dir)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        assert_eq!(names, [IDENTITY_FILE], "no temp files left");

        // Another data dir gets another key.
        let other = load_or_create_identity(parent.path().join("other"))?;
        assert_ne!(other.to_bytes(), key.to_bytes());

        // Never printed: Debug shows the public key only.
        let shown = format!("{key:?}");
        assert!(!shown.contains(&hex::encode(key.to_bytes())));
        assert!(!shown.contains(&format!("{:?}", key.to_bytes())));
        Ok(())
    }

    #[test]
    fn corrupt_key_file_is_an_error_and_kept() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let key = load_or_create_identity(dir.path())?;
        let path = dir.path().join(IDENTITY_FILE);
        let good = fs::read(&path)?;

        let mut flipped = good.clone();
        flipped[40] ^= 0x80; // a bit in the public half
        let truncated = good[..31].to_vec();
        for damaged in [flipped, truncated, Vec::new()] {
            fs::write(&path, &damaged)?;
            match load_or_create_identity(dir.path()) {
                Err(e @ Error::CorruptIdentity { .. }) => {
                    let msg = e.to_string();
                    assert!(msg.contains("identity.key"), "{msg}");
                    assert!(!msg.contains(&hex::encode(key.to_bytes())));
                }
                other => panic!("expected CorruptIdentity, got {other:?}"),
            }
            assert_eq!(fs::read(&path)?, damaged, "never replaced");
        }
        fs::write(&path, &good)?;
        assert_eq!(
            load_or_create_identity(dir.path())?.to_bytes(),
            key.to_bytes()
        );
        Ok(())
    }

    #[test]
    fn leftover_temp_key_is_removed() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let leftover = dir.path().join(format!("{TEMP_PREFIX}0000000000000001"));
        fs::write(&leftover, [9u8; 64])?;
        let key = load_or_create_identity(dir.path())?;
        assert!(!leftover.exists());
        assert_eq!(
            load_or_create_identity(dir.path())?.to_bytes(),
            key.to_bytes()
        );
        Ok(())
    }
}

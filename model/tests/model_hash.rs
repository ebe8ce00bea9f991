//! A large model's hash is computed once and remembered by the file's length, modification time
//! and inode; any change to the file computes it again.

use std::time::{Duration, SystemTime};

use anyhow::Result;
use hivemind_model::loader::file_hash_cached;
use hivemind_model::Hash;

#[test]
fn the_hash_is_remembered_until_the_file_changes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cache = dir.path().join("cache");
    let file = dir.path().join("model.gguf");
    std::fs::write(&file, b"weights, version one")?;
    let real = Hash::of(b"weights, version one");

    // Below the size threshold nothing is remembered.
    assert_eq!(file_hash_cached(&file, &cache, 1 << 20)?, real);
    assert!(!cache.exists(), "a small file leaves no cache entry");

    assert_eq!(file_hash_cached(&file, &cache, 0)?, real);
    let entries: Vec<_> = std::fs::read_dir(&cache)?.collect::<Result<_, _>>()?;
    assert_eq!(entries.len(), 1, "one entry");
    let entry = entries[0].path();

    // The entry is what is read back: replace its hash and the replacement comes back.
    let fake = Hash::of(b"something else");
    let text = std::fs::read_to_string(&entry)?;
    let (_, stamp) = text.split_once(' ').expect("hash, then the file's stamp");
    std::fs::write(&entry, format!("{} {stamp}", fake.to_hex()))?;
    assert_eq!(
        file_hash_cached(&file, &cache, 0)?,
        fake,
        "the remembered hash is used"
    );

    // New content (same length) with a new modification time: hashed again, entry replaced.
    std::fs::write(&file, b"weights, version two")?;
    let f = std::fs::File::options().write(true).open(&file)?;
    f.set_modified(SystemTime::now() + Duration::from_secs(5))?;
    let new = Hash::of(b"weights, version two");
    assert_eq!(file_hash_cached(&file, &cache, 0)?, new);
    assert_eq!(file_hash_cached(&file, &cache, 0)?, new);

    // A garbled entry is not trusted.
    std::fs::write(&entry, "not a hash at all")?;
    assert_eq!(file_hash_cached(&file, &cache, 0)?, new);
    Ok(())
}

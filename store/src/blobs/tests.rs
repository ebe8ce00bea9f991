//! Blob store tests.

use super::*;
use crate::fsutil::WRITEBACK_BYTES;
use rand::{Rng, SeedableRng};

fn random_bytes(rng: &mut impl Rng, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng.fill(&mut v[..]);
    v
}

#[test]
fn read_blob_unlocked_reads_while_the_store_is_open_and_checks_the_hash() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let bytes = b"a round adapter".to_vec();
    let hash = store.put_blob(&bytes).unwrap();
    // The database is locked by `store`; the blob is still readable.
    assert_eq!(
        Store::read_blob_unlocked(dir.path(), &hash).unwrap(),
        Some(bytes)
    );
    let absent = Hash::of(b"never stored");
    assert_eq!(
        Store::read_blob_unlocked(dir.path(), &absent).unwrap(),
        None
    );
    // A damaged file is refused, naming both hashes.
    fs::write(store.final_path(&hash), b"tampered").unwrap();
    match Store::read_blob_unlocked(dir.path(), &hash) {
        Err(Error::HashMismatch { expected, actual }) => {
            assert_eq!(expected, hash);
            assert_eq!(actual, Hash::of(b"tampered"));
        }
        other => panic!("expected a hash mismatch, got {other:?}"),
    }
}

/// Names of all entries in the blobs directory, sorted.
fn blob_dir_names(store: &Store) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(&store.blobs_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn put_get_round_trip_dedup_and_metadata() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let bytes = b"hello hivemind".to_vec();
    let hash = store.put_blob(&bytes)?;
    assert_eq!(hash, Hash::of(&bytes));
    assert_eq!(store.get_blob(&hash)?, Some(bytes.clone()));
    assert!(store.has_blob(&hash)?);
    assert_eq!(store.blob_len(&hash)?, Some(bytes.len() as u64));
    let path = store.blob_path(&hash)?.expect("stored blob has a path");
    assert_eq!(fs::read(&path)?, bytes);
    assert_eq!(
        path.file_name().unwrap().to_str(),
        Some(hash.to_hex().as_str())
    );
    assert!(store.verify_blob(&hash)?);

    // Storing again is a no-op; the empty blob is a blob like any other.
    assert_eq!(store.put_blob(&bytes)?, hash);
    let empty = store.put_blob(b"")?;
    assert_eq!(store.get_blob(&empty)?, Some(Vec::new()));
    let mut expected = vec![(hash, bytes.len() as u64), (empty, 0)];
    expected.sort();
    assert_eq!(store.list_blobs()?, expected);
    assert_eq!(blob_dir_names(&store).len(), 2, "no temp files left behind");

    let absent = Hash::of(b"absent");
    assert_eq!(store.get_blob(&absent)?, None);
    assert!(!store.has_blob(&absent)?);
    assert_eq!(store.blob_len(&absent)?, None);
    assert_eq!(store.blob_path(&absent)?, None);
    assert!(!store.verify_blob(&absent)?);
    assert_eq!(store.read_blob_range(&absent, 0, 10)?, None);

    // Survives reopening.
    drop(store);
    let store = Store::open(dir.path())?;
    assert_eq!(store.recovery(), Recovery::default());
    assert_eq!(store.get_blob(&hash)?, Some(bytes));
    Ok(())
}

#[test]
fn put_blob_file_streams_to_the_same_hash() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path().join("data"))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // Several buffers long, not a multiple of the buffer size.
    let bytes = random_bytes(&mut rng, 3 * CHUNK + 12_345);
    let src = dir.path().join("adapter.safetensors");
    fs::write(&src, &bytes)?;
    let hash = store.put_blob_file(&src)?;
    // Reference: blake3 of the whole buffer in one call.
    assert_eq!(hash, Hash::of(&bytes));
    assert_eq!(store.get_blob(&hash)?, Some(bytes.clone()));
    assert_eq!(store.put_blob_file(&src)?, hash, "second store is a no-op");
    assert_eq!(blob_dir_names(&store), vec![hash.to_hex()]);

    let missing = dir.path().join("nope");
    match store.put_blob_file(&missing) {
        Err(Error::Io { path, .. }) => assert_eq!(path, missing),
        other => panic!("expected an I/O error naming the path, got {other:?}"),
    }
    Ok(())
}

#[test]
fn corrupted_blob_file_is_detected_and_not_returned() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let bytes: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let hash = store.put_blob(&bytes)?;
    let path = store.blob_path(&hash)?.unwrap();
    let mut damaged = bytes.clone();
    damaged[5_000] ^= 0x01; // one flipped bit, same length
    fs::write(&path, &damaged)?;

    let err = store.get_blob(&hash).unwrap_err();
    match &err {
        Error::Corrupt {
            hash: h,
            actual,
            len,
            expected_len,
        } => {
            assert_eq!(*h, hash);
            assert_eq!(*actual, Hash::of(&damaged));
            assert_eq!((*len, *expected_len), (10_000, 10_000));
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(
        err.to_string().contains(&hash.to_hex()),
        "error names the hash: {err}"
    );
    assert!(matches!(
        store.verify_blob(&hash),
        Err(Error::Corrupt { .. })
    ));

    // Same length, so opening does not notice; reading always does. The fix
    // is to remove and fetch again.
    assert!(store.remove_blob(&hash)?);
    assert!(!path.exists());
    assert!(!store.has_blob(&hash)?);
    assert!(!store.remove_blob(&hash)?);
    assert_eq!(store.put_blob(&bytes)?, hash);
    assert_eq!(store.get_blob(&hash)?, Some(bytes));
    Ok(())
}

#[test]
fn read_blob_range_matches_slices() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let bytes = random_bytes(&mut rng, 100_003);
    let hash = store.put_blob(&bytes)?;
    let n = bytes.len() as u64;
    for (offset, len) in [
        (0, 10),
        (0, n),
        (17, 65_536),
        (n - 5, 100),
        (n, 10),
        (3, 0),
        (0, u64::MAX),
    ] {
        let got = store.read_blob_range(&hash, offset, len)?.unwrap();
        let end = offset.saturating_add(len).min(n);
        assert_eq!(
            got,
            bytes[offset as usize..end as usize],
            "offset {offset} len {len}"
        );
    }
    match store.read_blob_range(&hash, n + 1, 1) {
        Err(Error::RangeOutOfBounds {
            offset, blob_len, ..
        }) => assert_eq!((offset, blob_len), (n + 1, n)),
        other => panic!("expected RangeOutOfBounds, got {other:?}"),
    }
    Ok(())
}

#[test]
fn blobs_larger_than_the_writeback_step_arrive_whole() -> anyhow::Result<()> {
    // Several writeback kicks (every WRITEBACK_BYTES) and a tail that is not a multiple
    // of the chunk size, through both streaming writers.
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    let bytes = random_bytes(&mut rng, 2 * WRITEBACK_BYTES as usize + 300_001);
    let hash = Hash::of(&bytes);
    let mut w = store.blob_writer(hash, bytes.len() as u64)?;
    for (i, chunk) in bytes.chunks(1 << 20).enumerate() {
        w.write_at((i << 20) as u64, chunk)?;
    }
    assert_eq!(w.finish()?, hash);
    assert_eq!(store.get_blob(&hash)?.as_deref(), Some(&bytes[..]));
    assert!(store.remove_blob(&hash)?);
    let src = dir.path().join("source.bin");
    fs::write(&src, &bytes)?;
    assert_eq!(store.put_blob_file(&src)?, hash);
    assert!(store.verify_blob(&hash)?);
    Ok(())
}

#[test]
fn blob_writer_accepts_chunks_in_any_order() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let bytes = random_bytes(&mut rng, 70_000);
    let hash = Hash::of(&bytes);

    // In order, then shuffled with overlapping duplicates.
    for shuffle in [false, true] {
        let mut chunks: Vec<(usize, usize)> = (0..bytes.len())
            .step_by(4096)
            .map(|s| (s, (s + 4096).min(bytes.len())))
            .collect();
        if shuffle {
            chunks.push((1000, 9000));
            chunks.push((65_000, 70_000));
            for i in (1..chunks.len()).rev() {
                chunks.swap(i, rng.gen_range(0..=i));
            }
        }
        let mut w = store.blob_writer(hash, bytes.len() as u64)?;
        assert_eq!(w.missing(), vec![0..70_000]);
        for &(s, e) in &chunks {
            assert!(!w.is_complete());
            w.write_at(s as u64, &bytes[s..e])?;
        }
        assert!(w.is_complete());
        assert_eq!(w.received(), 70_000);
        assert!(w.missing().is_empty());
        assert!(
            !store.has_blob(&hash)? || shuffle,
            "invisible before finish"
        );
        assert_eq!(w.finish()?, hash);
        assert_eq!(store.get_blob(&hash)?, Some(bytes.clone()));
        assert_eq!(blob_dir_names(&store), vec![hash.to_hex()]);
    }
    Ok(())
}

#[test]
fn blob_writer_with_a_wrong_byte_leaves_nothing_visible() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let bytes: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let hash = Hash::of(&bytes);
    let mut bad = bytes.clone();
    bad[12_345] = bad[12_345].wrapping_add(1);

    let mut w = store.blob_writer(hash, bytes.len() as u64)?;
    for s in (0..bad.len()).step_by(1000) {
        w.write_at(s as u64, &bad[s..s + 1000])?;
    }
    match w.finish() {
        Err(Error::HashMismatch { expected, actual }) => {
            assert_eq!(expected, hash);
            assert_eq!(actual, Hash::of(&bad));
        }
        other => panic!("expected HashMismatch, got {other:?}"),
    }
    assert!(!store.has_blob(&hash)?);
    assert_eq!(store.get_blob(&hash)?, None);
    assert!(blob_dir_names(&store).is_empty(), "no file, temp or final");

    // Re-sending the bad chunk correctly repairs a transfer in progress (the
    // on-the-fly hash must restart when hashed bytes are overwritten).
    let mut w = store.blob_writer(hash, bytes.len() as u64)?;
    for s in (0..bad.len()).step_by(1000) {
        w.write_at(s as u64, &bad[s..s + 1000])?;
    }
    w.write_at(12_000, &bytes[12_000..13_000])?;
    assert_eq!(w.finish()?, hash);
    assert_eq!(store.get_blob(&hash)?, Some(bytes));
    Ok(())
}

#[test]
fn blob_writer_rejects_out_of_bounds_and_incomplete() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let bytes = vec![42u8; 1000];
    let hash = Hash::of(&bytes);
    let mut w = store.blob_writer(hash, 1000)?;
    assert!(matches!(
        w.write_at(990, &[0; 11]),
        Err(Error::ChunkOutOfBounds {
            offset: 990,
            len: 11,
            blob_len: 1000,
            ..
        })
    ));
    assert!(matches!(
        w.write_at(u64::MAX, &[0; 2]),
        Err(Error::ChunkOutOfBounds { .. })
    ));
    w.write_at(0, &bytes[..400])?;
    w.write_at(600, &bytes[600..])?;
    assert_eq!(w.missing(), vec![400..600]);
    match w.finish() {
        Err(Error::Incomplete {
            received, blob_len, ..
        }) => assert_eq!((received, blob_len), (800, 1000)),
        other => panic!("expected Incomplete, got {other:?}"),
    }
    // A dropped writer leaves nothing either.
    let mut w = store.blob_writer(hash, 1000)?;
    w.write_at(0, &bytes)?;
    drop(w);
    assert!(blob_dir_names(&store).is_empty());
    assert!(!store.has_blob(&hash)?);
    Ok(())
}

#[test]
fn open_repairs_interrupted_writes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let [a, b, c] =
        [b"blob a".as_slice(), b"blob b", b"blob c"].map(|x| store.put_blob(x).unwrap());
    let blobs = store.blobs_dir.clone();
    drop(store);

    fs::write(blobs.join(".tmp-0123456789abcdef"), b"half a bl")?; // interrupted write
    fs::remove_file(blobs.join(a.to_hex()))?; // file lost
    fs::write(blobs.join(b.to_hex()), b"blob")?; // truncated
    let d = Hash::of(b"blob d"); // renamed, index entry not yet written
    fs::write(blobs.join(d.to_hex()), b"blob d")?;
    let e = Hash::of(b"blob e"); // a file under a name its bytes do not match
    fs::write(blobs.join(e.to_hex()), b"something else")?;
    fs::write(blobs.join("README"), b"not ours")?;

    let store = Store::open(dir.path())?;
    assert_eq!(
        store.recovery(),
        Recovery {
            temp_files_removed: 1,
            entries_dropped: 2,
            files_adopted: 1,
            files_removed: 2, // e, and b once its entry was dropped
            uploads_reindexed: false,
        }
    );
    assert!(!store.has_blob(&a)?);
    assert!(!store.has_blob(&b)?);
    assert_eq!(store.get_blob(&c)?.as_deref(), Some(b"blob c".as_slice()));
    assert_eq!(store.get_blob(&d)?.as_deref(), Some(b"blob d".as_slice()));
    assert!(!store.has_blob(&e)?);
    let mut expected = vec![c.to_hex(), d.to_hex(), "README".to_string()];
    expected.sort();
    assert_eq!(blob_dir_names(&store), expected);
    assert_eq!(store.put_blob(b"blob b")?, b);
    assert_eq!(store.get_blob(&b)?.as_deref(), Some(b"blob b".as_slice()));
    drop(store);

    let store = Store::open(dir.path())?;
    assert_eq!(store.recovery(), Recovery::default(), "repair is done once");
    Ok(())
}

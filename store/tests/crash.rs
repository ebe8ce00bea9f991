//! Crash safety under `kill -9`.
//!
//! The test re-executes its own binary as a writer process: with
//! `HIVEMIND_STORE_CRASH_CHILD` set, the test function writes blobs and records in
//! a loop and prints `ack <kind> <key>` after each write returned `Ok`. The parent
//! SIGKILLs it at random moments, many times, and after each kill reopens the
//! store and checks that
//! - everything acknowledged is present and verifies against its hash or expected value,
//! - everything visible verifies (no half-written blob or record is visible),
//! - no temp file is left to be taken for a blob,
//! - opening needs no manual repair.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use hivemind_protocol::Hash;
use hivemind_store::{PeerRecord, Recovery, RoundRecord, Store, UploadRecord};
use rand::{Rng, SeedableRng};

const TEST_NAME: &str = "acknowledged_writes_survive_sigkill";
const CHILD_DIR_ENV: &str = "HIVEMIND_STORE_CRASH_CHILD";
const CHILD_INCARNATION_ENV: &str = "HIVEMIND_STORE_CRASH_INCARNATION";
const KILLS: u64 = 30;
/// A writer that outlives this (its parent is gone) stops by itself.
const CHILD_MAX_RUN: Duration = Duration::from_secs(20);

// ---- expected values, recomputed by the parent from the acknowledged keys ----

fn expected_round(number: u64) -> RoundRecord {
    RoundRecord {
        number,
        hash: Hash::of(&number.to_le_bytes()),
        version: format!("v{number}"),
        parent: number.checked_sub(1).map(|p| Hash::of(&p.to_le_bytes())),
        contributors: (0..number % 5).map(|i| Hash::of(&[i as u8])).collect(),
        rule: "fedavg".into(),
        digest: vec![number as u8; 64],
        committed_at_ms: 1_000 + number,
    }
}

fn expected_envelope(round: u64, adapter: &Hash) -> Vec<u8> {
    let mut v = b"signed envelope ".to_vec();
    v.extend_from_slice(&round.to_be_bytes());
    v.extend_from_slice(adapter.as_bytes());
    v
}

fn expected_upload(id: &str) -> UploadRecord {
    UploadRecord {
        id: id.to_string(),
        user_id: format!("user{}", id.len() % 3),
        blob: Hash::of(id.as_bytes()),
        base_model: "Qwen/Qwen2-7B".into(),
        version: "v0".into(),
        uploaded_at: "2025-01-01T00:00:00".into(),
        training_samples: id.len() as u64,
        epochs: 1,
        round: None,
    }
}

fn expected_peer(seen: u64) -> PeerRecord {
    PeerRecord {
        addrs: vec![format!("/ip4/127.0.0.1/tcp/{}", 4000 + seen % 1000)],
        last_seen_ms: seen,
    }
}

// ---- the writer (child process) -------------------------------------------------

fn run_writer(dir: &Path, incarnation: u64) -> anyhow::Result<()> {
    let store = Store::open(dir.join("data"))?;
    let scratch = dir.join("scratch");
    std::fs::create_dir_all(&scratch)?;
    let mut out = std::io::stdout().lock();
    let mut ack = |line: String| -> anyhow::Result<()> {
        writeln!(out, "{line}")?;
        out.flush()?;
        Ok(())
    };
    ack("ready".into())?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(incarnation);
    let started = Instant::now();
    let mut i = 0u64;
    while started.elapsed() < CHILD_MAX_RUN {
        let seq = incarnation * 100_000 + i;
        let mut bytes = vec![0u8; rng.gen_range(0..48 * 1024)];
        rng.fill(&mut bytes[..]);
        match i % 5 {
            0 => {
                let hash = store.put_blob(&bytes)?;
                ack(format!("ack blob {hash}"))?;
            }
            1 => {
                // A chunked transfer, chunks out of order.
                let hash = Hash::of(&bytes);
                let mut w = store.blob_writer(hash, bytes.len() as u64)?;
                let mut starts: Vec<usize> = (0..bytes.len()).step_by(8192).collect();
                starts.reverse();
                for s in starts {
                    w.write_at(s as u64, &bytes[s..(s + 8192).min(bytes.len())])?;
                }
                w.finish()?;
                ack(format!("ack blob {hash}"))?;
            }
            2 => {
                let src = scratch.join(format!("src-{seq}"));
                std::fs::write(&src, &bytes)?;
                let hash = store.put_blob_file(&src)?;
                ack(format!("ack blob {hash}"))?;
                store.put_announcement(seq, &hash, &expected_envelope(seq, &hash))?;
                ack(format!("ack ann {seq} {hash}"))?;
            }
            3 => {
                store.put_round(&expected_round(seq))?;
                ack(format!("ack round {seq}"))?;
                store.put_peer(&format!("peer{}", seq % 7), &expected_peer(seq))?;
                ack(format!("ack peer peer{} {seq}", seq % 7))?;
            }
            _ => {
                let id = format!("u{seq}");
                store.insert_upload(&expected_upload(&id))?;
                ack(format!("ack upload {id}"))?;
                store.mark_upload_included(&id, seq)?;
                ack(format!("ack included {id} {seq}"))?;
            }
        }
        i += 1;
    }
    Ok(())
}

// ---- the checker (parent) ---------------------------------------------------------

#[derive(Default)]
struct Acked {
    blobs: BTreeSet<Hash>,
    announcements: BTreeSet<(u64, Hash)>,
    rounds: BTreeSet<u64>,
    /// peer id -> last acknowledged `seen` value.
    peers: BTreeMap<String, u64>,
    uploads: BTreeSet<String>,
    included: BTreeMap<String, u64>,
    count: usize,
}

impl Acked {
    fn record(&mut self, line: &str) -> anyhow::Result<()> {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["ack", "blob", h] => {
                self.blobs.insert(h.parse()?);
            }
            ["ack", "ann", r, h] => {
                self.announcements.insert((r.parse()?, h.parse()?));
            }
            ["ack", "round", n] => {
                self.rounds.insert(n.parse()?);
            }
            ["ack", "peer", id, seen] => {
                self.peers.insert(id.to_string(), seen.parse()?);
            }
            ["ack", "upload", id] => {
                self.uploads.insert(id.to_string());
            }
            ["ack", "included", id, r] => {
                self.included.insert(id.to_string(), r.parse()?);
            }
            _ => return Ok(()), // test-harness chatter
        }
        self.count += 1;
        Ok(())
    }
}

fn check_store(dir: &Path, acked: &Acked) -> anyhow::Result<Recovery> {
    let store = Store::open(dir.join("data")).context("store opens without manual repair")?;

    // Every visible blob verifies, and the blobs dir holds exactly the visible blobs.
    let visible = store.list_blobs()?;
    for (hash, len) in &visible {
        let bytes = store.get_blob(hash)?.context("listed blob readable")?;
        ensure!(
            bytes.len() as u64 == *len,
            "blob {hash}: length {} != indexed {len}",
            bytes.len()
        );
    }
    let mut on_disk: Vec<String> = std::fs::read_dir(dir.join("data/blobs"))?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<anyhow::Result<_>>()?;
    on_disk.sort();
    let indexed: Vec<String> = visible.iter().map(|(h, _)| h.to_hex()).collect();
    ensure!(
        on_disk == indexed,
        "blobs dir holds files that are not visible blobs (temp files?)"
    );
    for hash in &acked.blobs {
        ensure!(store.verify_blob(hash)?, "acknowledged blob {hash} lost");
    }

    // Records: everything visible decodes to what was written; everything acknowledged is there.
    for round in store.list_rounds()? {
        ensure!(
            round == expected_round(round.number),
            "round {} damaged",
            round.number
        );
    }
    for n in &acked.rounds {
        ensure!(
            store.get_round(*n)?.is_some(),
            "acknowledged round {n} lost"
        );
    }
    for (round, hash) in &acked.announcements {
        let env = store.get_announcement(*round, hash)?;
        ensure!(
            env == Some(expected_envelope(*round, hash)),
            "announcement {round}/{hash} lost"
        );
    }
    for (id, peer) in store.list_peers()? {
        ensure!(
            peer == expected_peer(peer.last_seen_ms),
            "peer {id} damaged"
        );
        let acked_seen = acked.peers.get(&id).copied().unwrap_or(0);
        // An unacknowledged later write may have landed; an earlier one may not win.
        ensure!(
            peer.last_seen_ms >= acked_seen,
            "peer {id} went back in time"
        );
    }
    for id in acked.peers.keys() {
        ensure!(store.get_peer(id)?.is_some(), "acknowledged peer {id} lost");
    }
    let uploads = store.list_uploads()?;
    for upload in &uploads {
        let mut expected = expected_upload(&upload.id);
        expected.round = upload.round;
        ensure!(*upload == expected, "upload {} damaged", upload.id);
    }
    // The per-user index agrees with the records it indexes (same transaction): open
    // never had to rebuild it.
    ensure!(
        !store.recovery().uploads_reindexed,
        "a crash left the upload index stale"
    );
    let users: std::collections::BTreeSet<&str> =
        uploads.iter().map(|u| u.user_id.as_str()).collect();
    let stats = store.upload_stats()?;
    ensure!(
        (stats.uploads, stats.users) == (uploads.len() as u64, users.len() as u64),
        "upload index {stats:?} disagrees with {} uploads of {} users",
        uploads.len(),
        users.len()
    );
    for id in &acked.uploads {
        ensure!(
            store.get_upload(id)?.is_some(),
            "acknowledged upload {id} lost"
        );
    }
    for (id, round) in &acked.included {
        let got = store.get_upload(id)?.and_then(|u| u.round);
        ensure!(
            got == Some(*round),
            "inclusion of {id} in round {round} lost"
        );
    }
    Ok(store.recovery())
}

fn run_parent() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let seed: u64 = rand::random();
    println!("crash test seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let exe = std::env::current_exe()?;
    let started = Instant::now();
    let mut acked = Acked::default();
    let mut repaired = 0;
    for incarnation in 0..KILLS {
        let mut child = Command::new(&exe)
            .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_DIR_ENV, root.path())
            .env(CHILD_INCARNATION_ENV, incarnation.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().context("child stdout")?;
        let (tx, rx) = mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Mostly: wait until the writer has the store open, then let it write for
        // a random while and kill it wherever it is. Sometimes: kill it early,
        // possibly while `Store::open` is repairing the previous crash.
        let early = rng.gen_bool(0.2);
        if !early {
            let mut chatter = Vec::new();
            loop {
                let line = rx
                    .recv_timeout(Duration::from_secs(20))
                    .with_context(|| format!("writer {incarnation} did not start: {chatter:?}"))?;
                // libtest prints "test <name> ... " without a newline before our output.
                if line.ends_with("ready") {
                    break;
                }
                chatter.push(line);
                if chatter.len() > 20 {
                    chatter.remove(0);
                }
            }
        }
        let wait_us = if early { 0..30_000 } else { 0..60_000 };
        std::thread::sleep(Duration::from_micros(rng.gen_range(wait_us)));
        if let Some(status) = child.try_wait()? {
            bail!("writer exited by itself ({status}) before being killed");
        }
        child.kill()?; // SIGKILL
        child.wait()?;
        reader
            .join()
            .map_err(|_| anyhow::anyhow!("reader thread panicked"))?;
        // Every line the writer printed before dying is an acknowledged write.
        // (Harness chatter and "ready" are ignored by `record`.)
        for line in rx.try_iter() {
            acked.record(&line)?;
        }
        let recovery = check_store(root.path(), &acked)
            .with_context(|| format!("after kill {incarnation} (seed {seed})"))?;
        if recovery != Recovery::default() {
            repaired += 1;
        }
    }
    let elapsed = started.elapsed();
    println!(
        "{KILLS} kills, {} acknowledged writes, {} blobs; {repaired} opens repaired something; {elapsed:.1?}",
        acked.count,
        acked.blobs.len(),
    );
    ensure!(
        acked.count >= KILLS as usize,
        "the writer made too little progress to test anything"
    );
    ensure!(
        elapsed < Duration::from_secs(60),
        "crash test too slow: {elapsed:?}"
    );
    Ok(())
}

#[test]
fn acknowledged_writes_survive_sigkill() -> anyhow::Result<()> {
    if let Some(dir) = std::env::var_os(CHILD_DIR_ENV) {
        let incarnation = std::env::var(CHILD_INCARNATION_ENV)?.parse()?;
        return run_writer(&PathBuf::from(dir), incarnation);
    }
    run_parent()
}

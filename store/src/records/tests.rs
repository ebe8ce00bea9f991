//! Record tests.

use super::*;
use crate::Store;

fn round(number: u64, version: &str) -> RoundRecord {
    RoundRecord {
        number,
        hash: Hash::of(version.as_bytes()),
        version: version.to_string(),
        parent: (number > 0).then(|| Hash::of(b"parent")),
        contributors: vec![Hash::of(b"x"), Hash::of(b"y")],
        rule: "fedavg".to_string(),
        digest: vec![1, 2, 3, number as u8],
        committed_at_ms: 1_700_000_000_000 + number,
    }
}

fn upload(id: &str, user: &str) -> UploadRecord {
    UploadRecord {
        id: id.to_string(),
        user_id: user.to_string(),
        blob: Hash::of(id.as_bytes()),
        base_model: "Qwen/Qwen2-7B".to_string(),
        version: "v1".to_string(),
        uploaded_at: "2025-01-01T00:00:00".to_string(),
        training_samples: 100,
        epochs: 2,
        round: None,
    }
}

#[test]
fn announcements_by_round_sorted_first_wins() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let hashes: Vec<Hash> = (0..5u8).map(|i| Hash::of(&[i])).collect();
    for (i, h) in hashes.iter().enumerate() {
        assert!(store.put_announcement(7, h, &[i as u8; 3])?);
    }
    assert!(store.put_announcement(8, &hashes[0], b"other round")?);
    assert!(store.put_announcement(6, &hashes[1], b"earlier round")?);
    // A second envelope for the same (round, adapter) does not replace the first.
    assert!(!store.put_announcement(7, &hashes[2], b"replacement")?);
    assert_eq!(store.get_announcement(7, &hashes[2])?, Some(vec![2; 3]));
    assert_eq!(store.get_announcement(9, &hashes[2])?, None);

    let listed = store.list_announcements(7)?;
    let mut expected: Vec<(Hash, Vec<u8>)> = hashes
        .iter()
        .enumerate()
        .map(|(i, h)| (*h, vec![i as u8; 3]))
        .collect();
    expected.sort();
    assert_eq!(listed, expected);
    assert_eq!(
        store.list_announcements(8)?,
        vec![(hashes[0], b"other round".to_vec())]
    );
    assert!(store.list_announcements(100)?.is_empty());
    drop(store);
    assert_eq!(Store::open(dir.path())?.list_announcements(7)?, expected);
    Ok(())
}

#[test]
fn rounds_in_order_latest_by_version_and_replace() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    assert_eq!(store.latest_round()?, None);
    // 256 sorts before 3 as a string or little-endian; keys must be big-endian.
    for n in [3, 256, 1, 2] {
        store.put_round(&round(n, &format!("v{n}")))?;
    }
    let numbers: Vec<u64> = store.list_rounds()?.iter().map(|r| r.number).collect();
    assert_eq!(numbers, vec![1, 2, 3, 256]);
    assert_eq!(store.latest_round()?, Some(round(256, "v256")));
    assert_eq!(store.get_round(2)?, Some(round(2, "v2")));
    assert_eq!(store.get_round(4)?, None);
    assert_eq!(store.round_by_version("v3")?, Some(round(3, "v3")));
    assert_eq!(store.round_by_version("nope")?, None);

    store.put_round(&round(2, "v2-fork-winner"))?;
    assert_eq!(store.get_round(2)?, Some(round(2, "v2-fork-winner")));
    assert_eq!(store.list_rounds()?.len(), 4);
    drop(store);
    let store = Store::open(dir.path())?;
    assert_eq!(store.get_round(2)?, Some(round(2, "v2-fork-winner")));
    assert_eq!(store.latest_round()?.map(|r| r.number), Some(256));
    Ok(())
}

#[test]
fn commit_round_drops_the_rounds_a_rewind_orphans() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    for n in 1..=4 {
        assert!(store.commit_round(&round(n, &format!("v{n}")))?.is_empty());
    }
    // A fork choice switches to another round 2: rounds 3 and 4 built on the old one.
    assert_eq!(store.commit_round(&round(2, "v2-other"))?, vec![3, 4]);
    let numbers: Vec<u64> = store.list_rounds()?.iter().map(|r| r.number).collect();
    assert_eq!(numbers, vec![1, 2]);
    assert_eq!(store.latest_round()?, Some(round(2, "v2-other")));
    drop(store);
    let store = Store::open(dir.path())?;
    assert_eq!(store.latest_round()?, Some(round(2, "v2-other")));
    assert_eq!(store.list_rounds()?.len(), 2);
    // The chain goes on from there.
    assert!(store.commit_round(&round(3, "v3-new"))?.is_empty());
    assert_eq!(store.latest_round()?, Some(round(3, "v3-new")));
    Ok(())
}

#[test]
fn upload_index_counts_and_finds_the_newest_per_user() -> anyhow::Result<()> {
    let ids = |v: Vec<UploadRecord>| v.into_iter().map(|u| u.id).collect::<Vec<_>>();
    let dir = tempfile::tempdir()?;
    let mut store = Store::open(dir.path())?;
    assert_eq!(store.upload_stats()?, UploadStats::default());
    let uploads = [
        ("u1", "bob"),
        ("u2", "amy"),
        ("u3", "bob"),
        ("u4", "cat"),
        ("u5", "bob"),
    ];
    for (id, user) in uploads {
        store.insert_upload(&upload(id, user))?;
    }
    // A refused duplicate id changes nothing.
    assert!(matches!(
        store.insert_upload(&upload("u2", "dan")),
        Err(Error::UploadExists { id }) if id == "u2"
    ));
    let expected = UploadStats {
        uploads: 5,
        users: 3,
        most_by_one_user: 3,
    };
    assert_eq!(store.upload_stats()?, expected);
    // Against a naive computation over every record.
    let all = store.list_uploads()?;
    let users: std::collections::BTreeSet<&str> = all.iter().map(|u| u.user_id.as_str()).collect();
    assert_eq!((all.len() as u64, users.len() as u64), (5, 3));
    for user in ["amy", "bob", "cat", "dan"] {
        let naive = all.iter().filter(|u| u.user_id == user).count() as u64;
        assert_eq!(store.user_upload_count(user)?, naive, "{user}");
    }
    assert_eq!(ids(store.pending_uploads()?), ["u2", "u5", "u4"]);

    // A data dir from before the index (none at all), and one where an older binary
    // added uploads without indexing them (bob's entry gone): rebuilt on open.
    for stale in [None, Some("bob")] {
        match stale {
            None => store.upload_users.clear()?,
            Some(user) => drop(store.upload_users.remove(user.as_bytes())?),
        }
        store.flush()?;
        assert_ne!(store.upload_stats()?, expected);
        drop(store);
        store = Store::open(dir.path())?;
        assert!(store.recovery().uploads_reindexed);
        assert_eq!(store.upload_stats()?, expected);
        assert_eq!(ids(store.pending_uploads()?), ["u2", "u5", "u4"]);
    }
    store.insert_upload(&upload("u6", "amy"))?;
    assert_eq!(ids(store.pending_uploads()?), ["u6", "u5", "u4"]);
    assert_eq!(store.upload_stats()?.uploads, 6);
    Ok(())
}

#[test]
fn a_user_has_one_upload_waiting_when_asked_even_under_a_race() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    assert_eq!(store.waiting_upload("amy")?, None);
    store.insert_sole_waiting_upload(&upload("a1", "amy"))?;
    assert_eq!(store.waiting_upload("amy")?.as_deref(), Some("a1"));
    assert!(matches!(
        store.insert_sole_waiting_upload(&upload("a2", "amy")),
        Err(Error::UploadWaiting { user, id }) if user == "amy" && id == "a1"
    ));
    // Another user is not held up; once amy's upload is in a round, she may upload again.
    store.insert_sole_waiting_upload(&upload("b1", "bob"))?;
    store.mark_upload_included("a1", 1)?;
    assert_eq!(store.waiting_upload("amy")?, None);
    store.insert_sole_waiting_upload(&upload("a2", "amy"))?;
    // The plain insert still supersedes (open networks).
    store.insert_upload(&upload("a3", "amy"))?;

    // Eight threads racing for one user: exactly one upload gets in.
    for round in 0..20 {
        let user = format!("racer{round}");
        let won: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let (store, user) = (&store, &user);
                    s.spawn(move || {
                        store
                            .insert_sole_waiting_upload(&upload(&format!("{user}_{i}"), user))
                            .is_ok()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| usize::from(h.join().unwrap_or(false)))
                .sum()
        });
        assert_eq!(won, 1, "{user}");
        assert_eq!(store.user_upload_count(&user)?, 1);
    }
    Ok(())
}

#[test]
fn peers_put_list_remove() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let rec = |t: u64| PeerRecord {
        addrs: vec![format!("/ip4/127.0.0.1/tcp/{t}")],
        last_seen_ms: t,
    };
    store.put_peer("12D3KooWB", &rec(1))?;
    store.put_peer("12D3KooWA", &rec(2))?;
    store.put_peer("12D3KooWB", &rec(3))?;
    assert_eq!(store.get_peer("12D3KooWB")?, Some(rec(3)));
    assert_eq!(
        store.list_peers()?,
        vec![
            ("12D3KooWA".to_string(), rec(2)),
            ("12D3KooWB".to_string(), rec(3))
        ]
    );
    assert!(store.remove_peer("12D3KooWA")?);
    assert!(!store.remove_peer("12D3KooWA")?);
    assert_eq!(store.get_peer("12D3KooWA")?, None);
    drop(store);
    assert_eq!(Store::open(dir.path())?.list_peers()?.len(), 1);
    Ok(())
}

#[test]
fn uploads_registry_and_pending() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    // Ids are inserted out of alphabetical order: listing follows insertion.
    for (id, user) in [
        ("zed_1", "zed"),
        ("amy_1", "amy"),
        ("bob_1", "bob"),
        ("amy_2", "amy"),
        ("cat_1", "cat"),
        ("dan_1", "dan"),
        ("dan_2", "dan"),
    ] {
        store.insert_upload(&upload(id, user))?;
    }
    assert!(matches!(
        store.insert_upload(&upload("amy_1", "amy")),
        Err(Error::UploadExists { id }) if id == "amy_1"
    ));
    let ids = |v: Vec<UploadRecord>| v.into_iter().map(|u| u.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.list_uploads()?),
        ["zed_1", "amy_1", "bob_1", "amy_2", "cat_1", "dan_1", "dan_2"]
    );
    assert_eq!(ids(store.list_uploads_by_user("amy")?), ["amy_1", "amy_2"]);
    assert!(store.list_uploads_by_user("nobody")?.is_empty());
    assert_eq!(store.get_upload("bob_1")?, Some(upload("bob_1", "bob")));
    assert!(matches!(
        store.mark_upload_included("ghost", 1),
        Err(Error::UnknownUpload { id }) if id == "ghost"
    ));

    // Round 1 is committed with bob_1, amy_1 and dan_2; round 5 is not (yet).
    let with = |mut r: RoundRecord, ids: &[&str]| {
        r.contributors = ids.iter().map(|id| upload(id, "").blob).collect();
        r
    };
    store.put_round(&with(round(1, "v1"), &["bob_1", "amy_1", "dan_2"]))?;
    store.mark_upload_included("bob_1", 1)?; // aggregated: not pending
    store.mark_upload_included("cat_1", 5)?; // round 5 not committed: pending
    store.mark_upload_included("amy_1", 1)?; // old one aggregated, newest still pending
    store.mark_upload_included("dan_2", 1)?; // newest aggregated: dan_1 is superseded
    assert_eq!(store.get_upload("cat_1")?.and_then(|u| u.round), Some(5));
    assert_eq!(ids(store.pending_uploads()?), ["amy_2", "cat_1", "zed_1"]);

    // A round 5 that does not hold cat_1 (another history's round 5, after a rewind)
    // leaves it pending; the round 5 that holds it does not.
    store.put_round(&with(round(5, "v5-other"), &["zed_1"]))?;
    assert_eq!(ids(store.pending_uploads()?), ["amy_2", "cat_1", "zed_1"]);
    store.put_round(&with(round(5, "v5"), &["cat_1"]))?;
    assert_eq!(ids(store.pending_uploads()?), ["amy_2", "zed_1"]);
    drop(store);
    let store = Store::open(dir.path())?;
    assert_eq!(ids(store.pending_uploads()?), ["amy_2", "zed_1"]);
    // Insertion order survives a reopen.
    assert_eq!(ids(store.list_uploads()?)[..2], ["zed_1", "amy_1"]);
    Ok(())
}

#[test]
fn undecodable_records_are_errors_naming_the_tree() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    store
        .rounds
        .insert(9u64.to_be_bytes(), vec![RECORD_FORMAT, 0xff])?;
    store.rounds.insert(10u64.to_be_bytes(), vec![77, 0])?;
    store.rounds.insert(11u64.to_be_bytes(), Vec::<u8>::new())?;
    for n in [9, 10, 11] {
        match store.get_round(n) {
            Err(Error::CorruptRecord { tree, key, .. }) => {
                assert_eq!(tree, "rounds");
                assert_eq!(key, hex::encode(n.to_be_bytes()));
            }
            other => panic!("expected CorruptRecord, got {other:?}"),
        }
    }
    assert!(store.list_rounds().is_err());
    // An announcement key of the right prefix but the wrong length.
    let mut bad_key = 42u64.to_be_bytes().to_vec();
    bad_key.extend_from_slice(&[1, 2, 3]);
    store.announcements.insert(bad_key, b"x".as_slice())?;
    assert!(matches!(
        store.list_announcements(42),
        Err(Error::CorruptRecord {
            tree: "announcements",
            ..
        })
    ));
    Ok(())
}

#[test]
fn encoding_round_trips() -> anyhow::Result<()> {
    let r = round(42, "v42");
    let bytes = encode("rounds", &r)?;
    assert_eq!(bytes[0], RECORD_FORMAT);
    assert_eq!(decode::<RoundRecord>("rounds", b"k", &bytes)?, r);
    Ok(())
}

//! Scenario tests of the round machine, driven by hand event by event.
//!
//! The aggregator is the simulator's deterministic fake (`sim::fake_aggregate`: blake3
//! over the parent and the sorted adapter hashes), so every expected result below is
//! computed independently of the machine.

use std::collections::BTreeSet;

use hivemind_protocol::sim::fake_aggregate;
use hivemind_protocol::{
    Action, AggregationJob, Announcement, Event, FetchFailure, Hash, Ignored, Misbehaviour,
    ModelId, NodeId, NodeKey, Phase, RoundConfig, RoundDigest, RoundInput, RoundMachine,
    RoundRecord, RuleId, Signed, SignedAnnouncement, SignedDigest, Verdict,
};

fn model() -> ModelId {
    ModelId(Hash::of(b"test model"))
}

fn key(n: u8) -> NodeKey {
    NodeKey::from_bytes(&[n; 32])
}

fn cfg() -> RoundConfig {
    RoundConfig::testing() // window 3 s, grace 1 s, fetch timeout 1 s, heartbeat 1 s
}

fn machine(k: &NodeKey) -> RoundMachine {
    RoundMachine::new(cfg(), model(), k.node_id(), None, 0).expect("machine")
}

fn ann(
    k: &NodeKey,
    round: u64,
    adapter: Hash,
    parent: Option<Hash>,
    time_ms: u64,
) -> SignedAnnouncement {
    let a = Announcement {
        model: model(),
        round,
        adapter,
        byte_len: 100,
        samples: 10,
        contributor: k.node_id(),
        user_id: None,
        parent,
        time_ms,
    };
    Signed::sign(a, k).expect("sign")
}

fn digest(k: &NodeKey, record: RoundRecord, committed: bool, time_ms: u64) -> SignedDigest {
    let d = RoundDigest {
        record,
        signer: k.node_id(),
        committed,
        time_ms,
    };
    Signed::sign(d, k).expect("sign")
}

fn record(
    round: u64,
    parent: Option<Hash>,
    anns: &[&SignedAnnouncement],
    weight: u64,
) -> RoundRecord {
    let mut inputs: Vec<RoundInput> = anns
        .iter()
        .map(|a| RoundInput {
            adapter: a.adapter,
            announcement: a.id(),
        })
        .collect();
    inputs.sort();
    let adapters: Vec<Hash> = inputs.iter().map(|i| i.adapter).collect();
    RoundRecord {
        model: model(),
        round,
        parent,
        inputs,
        weight,
        rule: RuleId::FEDAVG,
        result: fake_aggregate(parent, &adapters),
    }
}

fn verdicts(actions: &[Action]) -> Vec<Verdict> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Verdict { verdict, .. } => Some(verdict.clone()),
            _ => None,
        })
        .collect()
}

fn jobs(actions: &[Action]) -> Vec<AggregationJob> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Aggregate(j) => Some(j.clone()),
            _ => None,
        })
        .collect()
}

fn commits(actions: &[Action]) -> Vec<(RoundRecord, Option<Hash>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Commit { record, replaces } => Some((record.clone(), *replaces)),
            _ => None,
        })
        .collect()
}

fn penalties(actions: &[Action]) -> Vec<(NodeId, Misbehaviour)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Penalise { peer, reason } => Some((*peer, reason.clone())),
            _ => None,
        })
        .collect()
}

fn fetched_announcements(actions: &[Action]) -> Vec<Hash> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::FetchAnnouncement { id, .. } => Some(*id),
            _ => None,
        })
        .collect()
}

fn fetched_blobs(actions: &[Action]) -> Vec<Hash> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::FetchBlob { hash, .. } => Some(*hash),
            _ => None,
        })
        .collect()
}

/// Answers every `Aggregate` in `actions` at `now` with the fake aggregator, returning
/// everything the machine did in response.
fn run_aggregations(m: &mut RoundMachine, now: u64, actions: &[Action]) -> Vec<Action> {
    let mut out = Vec::new();
    for job in jobs(actions) {
        let adapters: Vec<Hash> = job.inputs.iter().map(|i| i.adapter).collect();
        let result = fake_aggregate(job.parent, &adapters);
        out.extend(m.handle(now, Event::AggregationFinished { job, result }));
    }
    out
}

/// One node alone: contribute, close at the window's end, aggregate, publish, wait the
/// grace period, commit, and open the next round on the result.
#[test]
fn single_node_round_lifecycle() {
    let k = key(1);
    let mut m = machine(&k);
    assert_eq!((m.current_round(), m.current_parent()), (1, None));
    let a = ann(&k, 1, Hash::of(b"adapter a"), None, 100);
    let out = m.handle(100, Event::LocalContribution(a.clone()));
    assert_eq!(verdicts(&out), vec![Verdict::Accept]);
    assert!(out
        .iter()
        .any(|x| matches!(x, Action::PublishAnnouncement(s) if s.id() == a.id())));
    assert!(m.tick(2_999).is_empty(), "window still open");
    assert_eq!(m.phase(), Phase::Collecting);
    let out = m.tick(3_000);
    assert_eq!(m.phase(), Phase::Closed);
    let js = jobs(&out);
    assert_eq!(js.len(), 1);
    assert_eq!(
        (js[0].round, js[0].parent, js[0].inputs.len()),
        (1, None, 1)
    );
    assert_eq!(js[0].inputs[0].samples, 10);
    let out = run_aggregations(&mut m, 3_010, &out);
    // The in-progress digest goes out after a node-specific delay of at most grace/4.
    let mut published = out
        .iter()
        .any(|x| matches!(x, Action::PublishDigest(d) if !d.committed));
    let mut t = 3_010;
    while !published && t < 3_300 {
        t += 10;
        published = m
            .tick(t)
            .iter()
            .any(|x| matches!(x, Action::PublishDigest(d) if !d.committed && d.record.round == 1));
    }
    assert!(published, "in-progress digest published within grace/4");
    assert!(
        commits(&m.tick(3_999)).is_empty(),
        "grace runs from the close"
    );
    let out = m.tick(4_000);
    let c = commits(&out);
    assert_eq!(c.len(), 1);
    let (rec, replaces) = &c[0];
    assert_eq!(*replaces, None);
    assert_eq!((rec.round, rec.parent, rec.weight), (1, None, 1));
    assert_eq!(rec.result, fake_aggregate(None, &[Hash::of(b"adapter a")]));
    assert_eq!(rec.inputs[0].announcement, a.id());
    assert_eq!(m.tip(), Some(rec));
    assert_eq!(
        (m.current_round(), m.current_parent()),
        (2, Some(rec.result))
    );
    // Heartbeat: the committed tip is republished within one heartbeat period.
    let mut beat = false;
    for t in (4_010..=5_100).step_by(10) {
        beat |= m
            .tick(t)
            .iter()
            .any(|x| matches!(x, Action::PublishDigest(d) if d.committed && d.record == *rec));
    }
    assert!(beat);
}

#[test]
fn message_outcomes_are_typed() {
    let k = key(1);
    let other = key(2);
    let mut m = machine(&k);
    let good = ann(&other, 1, Hash::of(b"x"), None, 10);
    assert_eq!(
        verdicts(&m.handle(10, Event::Announcement(good.clone()))),
        vec![Verdict::Accept]
    );
    // Replay of the same bytes.
    assert_eq!(
        verdicts(&m.handle(11, Event::Announcement(good))),
        vec![Verdict::Ignore(Ignored::Duplicate)]
    );
    // Another network: rejected and penalised.
    let mut wrong = Announcement {
        model: ModelId(Hash::of(b"other model")),
        round: 1,
        adapter: Hash::of(b"w"),
        byte_len: 1,
        samples: 1,
        contributor: other.node_id(),
        user_id: None,
        parent: None,
        time_ms: 10,
    };
    let out = m.handle(
        12,
        Event::Announcement(Signed::sign(wrong.clone(), &other).expect("sign")),
    );
    assert!(matches!(
        verdicts(&out)[..],
        [Verdict::Reject(Misbehaviour::WrongModel { .. })]
    ));
    assert_eq!(penalties(&out).len(), 1);
    assert_eq!(penalties(&out)[0].0, other.node_id());
    // Too far ahead (lookahead is 2 rounds), and from the future.
    wrong.model = model();
    wrong.round = 4;
    let out = m.handle(
        13,
        Event::Announcement(Signed::sign(wrong.clone(), &other).expect("sign")),
    );
    assert_eq!(
        verdicts(&out),
        vec![Verdict::Ignore(Ignored::TooFarAhead {
            round: 4,
            current: 1
        })]
    );
    wrong.round = 1;
    wrong.time_ms = 1_000_000;
    let out = m.handle(
        14,
        Event::Announcement(Signed::sign(wrong.clone(), &other).expect("sign")),
    );
    assert!(matches!(
        verdicts(&out)[..],
        [Verdict::Ignore(Ignored::FromTheFuture { .. })]
    ));
    // A "local" contribution signed by someone else.
    let out = m.handle(
        15,
        Event::LocalContribution(ann(&other, 1, Hash::of(b"z"), None, 15)),
    );
    assert_eq!(verdicts(&out), vec![Verdict::Ignore(Ignored::NotOurs)]);
    // A digest signed by another network.
    let mut r = record(1, None, &[], 0);
    r.inputs = vec![RoundInput {
        adapter: Hash::of(b"q"),
        announcement: Hash::of(b"q ann"),
    }];
    r.weight = 1;
    r.model = ModelId(Hash::of(b"other model"));
    let out = m.handle(16, Event::Digest(digest(&key(3), r.clone(), true, 16)));
    assert!(matches!(
        verdicts(&out)[..],
        [Verdict::Reject(Misbehaviour::WrongModel { .. })]
    ));
    // `other` was penalised above: its digests are ignored for now.
    let out = m.handle(17, Event::Digest(digest(&other, r, true, 17)));
    assert_eq!(verdicts(&out), vec![Verdict::Ignore(Ignored::Banned)]);
    // Late: after committing round 1, a round-1 announcement is ignored.
    let mut m = machine(&k);
    m.handle(
        0,
        Event::LocalContribution(ann(&k, 1, Hash::of(b"mine"), None, 0)),
    );
    let out = m.tick(3_000);
    run_aggregations(&mut m, 3_000, &out);
    assert_eq!(commits(&m.tick(4_000)).len(), 1);
    let late = ann(&other, 1, Hash::of(b"late"), None, 4_000);
    assert_eq!(
        verdicts(&m.handle(4_001, Event::Announcement(late))),
        vec![Verdict::Ignore(Ignored::Late {
            round: 1,
            current: 2
        })]
    );
}

#[test]
fn a_second_local_adapter_in_one_round_is_refused() {
    let k = key(1);
    let mut m = machine(&k);
    let first = m.handle(
        0,
        Event::LocalContribution(ann(&k, 1, Hash::of(b"one"), None, 0)),
    );
    assert_eq!(verdicts(&first), vec![Verdict::Accept]);
    let second = m.handle(
        5,
        Event::LocalContribution(ann(&k, 1, Hash::of(b"two"), None, 5)),
    );
    assert!(matches!(
        verdicts(&second)[..],
        [Verdict::Reject(Misbehaviour::Equivocation { .. })]
    ));
    assert!(!second
        .iter()
        .any(|a| matches!(a, Action::PublishAnnouncement(_))));
    assert!(
        penalties(&second).is_empty(),
        "a node never penalises itself"
    );
    let js = jobs(&m.tick(3_000));
    let adapters: Vec<Hash> = js[0].inputs.iter().map(|i| i.adapter).collect();
    assert_eq!(adapters, vec![Hash::of(b"one")]);
}

#[test]
fn equivocation_is_penalised_and_the_lowest_adapter_is_used() {
    let k = key(1);
    let c = key(2);
    let mut m = machine(&k);
    let (x, y) = (Hash::of(b"x"), Hash::of(b"y"));
    let (low, high) = if x < y { (x, y) } else { (y, x) };
    m.handle(10, Event::Announcement(ann(&c, 1, high, None, 10)));
    let out = m.handle(11, Event::Announcement(ann(&c, 1, low, None, 11)));
    assert!(matches!(
        verdicts(&out)[..],
        [Verdict::Reject(Misbehaviour::Equivocation { .. })]
    ));
    assert_eq!(penalties(&out)[0].0, c.node_id());
    m.handle(20, Event::BlobAvailable { hash: low });
    m.handle(21, Event::BlobAvailable { hash: high });
    let js = jobs(&m.tick(3_000));
    assert_eq!(js.len(), 1);
    let adapters: Vec<Hash> = js[0].inputs.iter().map(|i| i.adapter).collect();
    assert_eq!(adapters, vec![low]);
}

/// A digest naming an input we lack: fetch its announcement, then its adapter, and
/// aggregate the union.
#[test]
fn reconciles_a_digest_naming_inputs_we_lack() {
    let (ka, kb) = (key(1), key(2));
    let mut a = machine(&ka);
    let mine = ann(&ka, 1, Hash::of(b"a"), None, 0);
    let theirs = ann(&kb, 1, Hash::of(b"b"), None, 0);
    a.handle(0, Event::LocalContribution(mine.clone()));
    let out = a.tick(3_000);
    run_aggregations(&mut a, 3_000, &out);
    // B's in-progress view names only its own adapter.
    let view = record(1, None, &[&theirs], 1);
    let out = a.handle(3_100, Event::Digest(digest(&kb, view, false, 3_100)));
    assert_eq!(fetched_announcements(&out), vec![theirs.id()]);
    // No commit while the announcement is outstanding, even after the grace period.
    assert!(commits(&a.tick(4_500)).is_empty());
    let out = a.handle(4_600, Event::Announcement(theirs.clone()));
    assert_eq!(fetched_blobs(&out), vec![Hash::of(b"b")]);
    assert!(jobs(&out).is_empty(), "waits for the blob");
    let out = a.handle(
        4_700,
        Event::BlobAvailable {
            hash: Hash::of(b"b"),
        },
    );
    assert_eq!(jobs(&out)[0].inputs.len(), 2);
    run_aggregations(&mut a, 4_700, &out);
    assert!(
        commits(&a.tick(5_600)).is_empty(),
        "grace restarts when inputs change"
    );
    let c = commits(&a.tick(5_700));
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].0, record(1, None, &[&mine, &theirs], 2));
}

#[test]
fn digest_naming_an_invalid_announcement_is_penalised_and_not_committed() {
    let (ka, kb) = (key(1), key(2));
    let mut a = machine(&ka);
    let mine = ann(&ka, 1, Hash::of(b"a"), None, 0);
    a.handle(0, Event::LocalContribution(mine.clone()));
    let bogus = RoundInput {
        adapter: Hash::of(b"junk"),
        announcement: Hash::of(b"junk announcement bytes"),
    };
    let mut view = record(1, None, &[&mine], 2);
    view.inputs.push(bogus);
    view.inputs.sort();
    let out = a.handle(100, Event::Digest(digest(&kb, view, false, 100)));
    assert_eq!(fetched_announcements(&out), vec![bogus.announcement]);
    let out = a.handle(
        200,
        Event::FetchFailed {
            hash: bogus.announcement,
            reason: FetchFailure::Invalid,
        },
    );
    assert_eq!(
        penalties(&out),
        vec![(
            kb.node_id(),
            Misbehaviour::NamedInvalidAnnouncement {
                id: bogus.announcement
            }
        )]
    );
    // B's junk digest did not close our window (it is not fully valid here).
    assert_eq!(a.phase(), Phase::Collecting);
    let out = a.tick(3_000);
    run_aggregations(&mut a, 3_000, &out);
    let c = commits(&a.tick(4_000));
    assert_eq!(c[0].0, record(1, None, &[&mine], 1));
}

/// After committing, a committed record of the same round and parent with more
/// contributors is verified by recomputation and replaces the tip.
#[test]
fn heavier_record_of_the_same_round_replaces_the_tip() {
    let (ka, kb) = (key(1), key(2));
    let mut a = machine(&ka);
    let mine = ann(&ka, 1, Hash::of(b"a"), None, 0);
    let theirs = ann(&kb, 1, Hash::of(b"b"), None, 0);
    a.handle(0, Event::LocalContribution(mine.clone()));
    let out = a.tick(3_000);
    run_aggregations(&mut a, 3_000, &out);
    let ours = commits(&a.tick(4_000))[0].0.clone();
    assert_eq!(ours.weight, 1);
    let better = record(1, None, &[&mine, &theirs], 2);
    let out = a.handle(
        4_100,
        Event::Digest(digest(&kb, better.clone(), true, 4_100)),
    );
    assert_eq!(fetched_announcements(&out), vec![theirs.id()]);
    let out = a.handle(4_200, Event::Announcement(theirs));
    assert_eq!(fetched_blobs(&out), vec![Hash::of(b"b")]);
    let out = a.handle(
        4_300,
        Event::BlobAvailable {
            hash: Hash::of(b"b"),
        },
    );
    let js = jobs(&out);
    assert_eq!(
        (js[0].round, js[0].parent, js[0].inputs.len()),
        (1, None, 2)
    );
    let out = run_aggregations(&mut a, 4_400, &out);
    let c = commits(&out);
    assert_eq!(c, vec![(better.clone(), Some(ours.result))]);
    assert_eq!(a.tip(), Some(&better));
    assert_eq!(
        (a.current_round(), a.current_parent()),
        (2, Some(better.result))
    );
}

#[test]
fn forged_result_and_forged_weight_are_penalised_not_adopted() {
    let (ka, kb) = (key(1), key(2));
    let mut a = machine(&ka);
    let mine = ann(&ka, 1, Hash::of(b"a"), None, 0);
    a.handle(0, Event::LocalContribution(mine.clone()));
    let out = a.tick(3_000);
    run_aggregations(&mut a, 3_000, &out);
    let ours = commits(&a.tick(4_000))[0].0.clone();
    // Same inputs, a lower (so "better") but wrong result.
    let mut forged = ours.clone();
    forged.result = Hash([0; 32]);
    let out = a.handle(4_100, Event::Digest(digest(&kb, forged, true, 4_100)));
    let out = run_aggregations(&mut a, 4_200, &out);
    assert!(matches!(
        penalties(&out)[..],
        [(_, Misbehaviour::WrongResult { round: 1, .. })]
    ));
    assert!(commits(&out).is_empty());
    // Same record, inflated weight: the parent (genesis) is known, so it is checked.
    let kc = key(3);
    let mut heavy = ours.clone();
    heavy.weight = 500;
    let out = a.handle(4_300, Event::Digest(digest(&kc, heavy, true, 4_300)));
    assert!(matches!(
        penalties(&out)[..],
        [(p, Misbehaviour::WrongWeight { claimed: 500, expected: 1, .. })] if p == kc.node_id()
    ));
    assert_eq!(a.tip(), Some(&ours));
}

/// A node with no chain adopts a record it cannot link to genesis (further back than the
/// ancestors it walks) only from a quorum of signers, and only after recomputing it.
#[test]
fn catch_up_beyond_reach_needs_a_quorum_and_recomputation() {
    let lag = key(1);
    let (kb, kc) = (key(2), key(3));
    let mut m = machine(&lag);
    let parent = Some(Hash::of(b"round 99 result"));
    let x = ann(&kb, 100, Hash::of(b"x"), parent, 50);
    let y = ann(&kc, 100, Hash::of(b"y"), parent, 50);
    let r100 = record(100, parent, &[&x, &y], 300);
    let out = m.handle(100, Event::Digest(digest(&kb, r100.clone(), true, 100)));
    assert!(
        fetched_announcements(&out).is_empty() && fetched_records(&out).is_empty(),
        "one signer is not a quorum, and round 99 is further back than a walk goes"
    );
    let out = m.handle(200, Event::Digest(digest(&kc, r100.clone(), true, 200)));
    let mut wanted = fetched_announcements(&out);
    wanted.sort();
    let mut expect = vec![x.id(), y.id()];
    expect.sort();
    assert_eq!(wanted, expect);
    m.handle(300, Event::Announcement(x));
    let out = m.handle(310, Event::Announcement(y));
    assert!(!fetched_blobs(&out).is_empty());
    m.handle(
        400,
        Event::BlobAvailable {
            hash: Hash::of(b"x"),
        },
    );
    let out = m.handle(
        410,
        Event::BlobAvailable {
            hash: Hash::of(b"y"),
        },
    );
    let out = run_aggregations(&mut m, 500, &out);
    assert_eq!(commits(&out), vec![(r100.clone(), None)]);
    assert_eq!(
        (m.current_round(), m.current_parent()),
        (101, Some(r100.result))
    );
}

/// The rounds `(record.round, record.result)` asked for with `FetchRecord`.
fn fetched_records(actions: &[Action]) -> Vec<(u64, Hash)> {
    record_requests(actions)
        .into_iter()
        .map(|(_, round, result)| (round, result))
        .collect()
}

/// The `(tag, round, result)` of every `FetchRecord` in `actions`.
fn record_requests(actions: &[Action]) -> Vec<(Hash, u64, Hash)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::FetchRecord {
                tag, round, result, ..
            } => Some((*tag, *round, *result)),
            _ => None,
        })
        .collect()
}

/// Node `k` alone commits round 1 of `mine`, and another node endorses it (so its tip is
/// not lonely): returns the machine at 4.5 s and the record.
fn endorsed_round_one(k: &NodeKey, mine: &SignedAnnouncement) -> (RoundMachine, RoundRecord) {
    let mut m = machine(k);
    m.handle(0, Event::LocalContribution(mine.clone()));
    let out = m.tick(3_000);
    run_aggregations(&mut m, 3_000, &out);
    let tip = commits(&m.tick(4_000))[0].0.clone();
    let friend = key(9);
    m.handle(
        4_500,
        Event::Digest(digest(&friend, tip.clone(), true, 4_500)),
    );
    (m, tip)
}

/// A coalition vouching for a record on a parent nobody can show: a node with a chain asks
/// the signers for that parent's record, gets none, and keeps its chain, however many sign.
/// (Before, a quorum's word on the weight sufficed, and every node adopted it.)
#[test]
fn a_made_up_history_is_not_taken_on_a_quorums_word() {
    let ka = key(1);
    let mine = ann(&ka, 1, Hash::of(b"a1"), None, 0);
    let (mut a, tip) = endorsed_round_one(&ka, &mine);
    let (kc, kd) = (key(3), key(4));
    let made_up = Some(Hash::of(b"a parent nobody made"));
    let z = ann(&kc, 2, Hash::of(b"z"), made_up, 4_000);
    let forged = record(2, made_up, &[&z], 1_000);
    let mut out = Vec::new();
    for (t, k) in [(5_000, &kc), (5_100, &kd)] {
        let step = a.handle(t, Event::Digest(digest(k, forged.clone(), true, t)));
        for (tag, round, result) in record_requests(&step) {
            assert_eq!((round, Some(result)), (1, made_up));
            out.extend(a.handle(
                t + 50,
                Event::Record {
                    tag,
                    round,
                    result,
                    digest: None,
                    unanswered: vec![k.node_id()],
                },
            ));
        }
        out.extend(step);
    }
    assert_eq!(
        fetched_records(&out).len(),
        2,
        "each signer asked for its parent"
    );
    // Its input is served and valid (a Sybil's, as far as anyone can tell).
    out.extend(a.handle(5_300, Event::Announcement(z.clone())));
    out.extend(a.handle(5_300, Event::BlobAvailable { hash: z.adapter }));
    for t in (5_400..12_000).step_by(200) {
        let step = a.tick(t);
        out.extend(run_aggregations(&mut a, t, &step));
        out.extend(step);
    }
    assert!(
        !commits(&out).iter().any(|(r, _)| r.parent == made_up),
        "adopted a history nobody could show"
    );
    assert!(a
        .tip()
        .is_some_and(|t| t.parent == Some(tip.result) || *t == tip));
}

/// A heavier history that forked below our tip links to our chain through its ancestors,
/// fetched from one signer and checked like the record itself (announcements, weight, and
/// the result recomputed from the adapters): no quorum is needed, and our chain then runs
/// through them (each committed). An ancestor of forged weight, or one with honest inputs
/// and a made-up result (on which a round of the attacker's would be built), gets the
/// signer of the digest it was served as penalised, and nothing is adopted.
#[test]
fn a_foreign_history_links_through_its_ancestors() {
    let ka = key(1);
    let mine = ann(&ka, 1, Hash::of(b"a1"), None, 0);
    let (kb, kx, ky, kz) = (key(2), key(5), key(6), key(7));
    let x = ann(&kx, 1, Hash::of(b"x"), None, 100);
    let y = ann(&ky, 1, Hash::of(b"y"), None, 100);
    enum Forgery {
        None,
        Weight,
        Result,
    }
    for forgery in [Forgery::None, Forgery::Weight, Forgery::Result] {
        let (mut a, tip) = endorsed_round_one(&ka, &mine);
        let mut b1 = record(1, None, &[&x, &y], 2);
        match forgery {
            Forgery::None => {}
            Forgery::Weight => b1.weight = 5,
            Forgery::Result => b1.result = Hash::of(b"a round adapter of the attacker's"),
        }
        let z = ann(&kz, 2, Hash::of(b"z"), Some(b1.result), 4_000);
        let b2 = record(2, Some(b1.result), &[&z], b1.weight + 1);
        let out = a.handle(5_000, Event::Digest(digest(&kb, b2.clone(), true, 5_000)));
        let asked = record_requests(&out);
        assert_eq!(
            asked.iter().map(|(_, r, h)| (*r, *h)).collect::<Vec<_>>(),
            vec![(1, b1.result)]
        );
        let mut out = a.handle(
            5_100,
            Event::Record {
                tag: asked[0].0,
                round: 1,
                result: b1.result,
                digest: Some(digest(&kb, b1.clone(), true, 5_050)),
                unanswered: Vec::new(),
            },
        );
        let mut wanted = fetched_announcements(&out);
        wanted.sort();
        let mut expect = vec![x.id(), y.id()];
        expect.sort();
        assert_eq!(wanted, expect, "the ancestor's inputs, to count its nodes");
        for s in [&x, &y] {
            out.extend(a.handle(5_200, Event::Announcement(s.clone())));
        }
        if let Forgery::Weight = forgery {
            assert!(matches!(
                penalties(&out)[..],
                [(p, Misbehaviour::WrongWeight { round: 1, claimed: 5, expected: 2 })]
                    if p == kb.node_id()
            ));
            assert_eq!(a.tip(), Some(&tip));
            continue;
        }
        // Its adapters, to recompute its result.
        let mut blobs = fetched_blobs(&out);
        blobs.sort();
        let mut expect = vec![x.adapter, y.adapter];
        expect.sort();
        assert_eq!(blobs, expect);
        for s in [&x, &y] {
            out.extend(a.handle(5_300, Event::BlobAvailable { hash: s.adapter }));
        }
        let mut out = run_aggregations(&mut a, 5_400, &out);
        if let Forgery::Result = forgery {
            assert!(matches!(
                penalties(&out)[..],
                [(p, Misbehaviour::WrongResult { round: 1, .. })] if p == kb.node_id()
            ));
            out.extend(a.handle(5_500, Event::Announcement(z.clone())));
            out.extend(a.handle(5_500, Event::BlobAvailable { hash: z.adapter }));
            let out = run_aggregations(&mut a, 5_600, &out);
            assert!(!commits(&out).iter().any(|(r, _)| *r == b1 || *r == b2));
            assert_eq!(a.tip(), Some(&tip));
            continue;
        }
        out.extend(a.handle(5_500, Event::Announcement(z.clone())));
        out.extend(a.handle(5_500, Event::BlobAvailable { hash: z.adapter }));
        let out = run_aggregations(&mut a, 5_600, &out);
        assert_eq!(
            commits(&out),
            vec![(b1.clone(), Some(tip.result)), (b2.clone(), None)]
        );
        assert_eq!(a.tip(), Some(&b2));
        assert!(penalties(&out).is_empty());
    }
}

#[test]
fn close_now_and_following_a_valid_digest_close_the_window_early() {
    let (ka, kb) = (key(1), key(2));
    let mut a = machine(&ka);
    a.handle(
        0,
        Event::LocalContribution(ann(&ka, 1, Hash::of(b"a"), None, 0)),
    );
    let out = a.handle(500, Event::CloseNow);
    assert_eq!(a.phase(), Phase::Closed);
    assert_eq!(jobs(&out).len(), 1);
    // Another node follows once it holds every input the closer's digest names.
    let mut b = machine(&kb);
    let theirs = ann(&ka, 1, Hash::of(b"a"), None, 0);
    b.handle(10, Event::Announcement(theirs.clone()));
    b.handle(
        20,
        Event::BlobAvailable {
            hash: Hash::of(b"a"),
        },
    );
    assert_eq!(b.phase(), Phase::Collecting);
    let out = b.handle(
        600,
        Event::Digest(digest(&ka, record(1, None, &[&theirs], 1), false, 600)),
    );
    assert_eq!(b.phase(), Phase::Closed);
    assert_eq!(jobs(&out).len(), 1);
}

#[test]
fn a_blob_nobody_serves_is_dropped_after_the_retries() {
    let (ka, kb) = (key(1), key(2));
    let mut a = machine(&ka);
    a.handle(
        0,
        Event::LocalContribution(ann(&ka, 1, Hash::of(b"a"), None, 0)),
    );
    let out = a.handle(
        10,
        Event::Announcement(ann(&kb, 1, Hash::of(b"gone"), None, 0)),
    );
    assert_eq!(fetched_blobs(&out), vec![Hash::of(b"gone")]);
    let gone = Event::FetchFailed {
        hash: Hash::of(b"gone"),
        reason: FetchFailure::Unavailable,
    };
    // fetch_attempts = 3: two retries, then the blob counts as unavailable.
    assert_eq!(fetched_blobs(&a.handle(100, gone.clone())).len(), 1);
    assert_eq!(fetched_blobs(&a.handle(200, gone.clone())).len(), 1);
    assert!(fetched_blobs(&a.handle(300, gone)).is_empty());
    let js = jobs(&a.tick(3_000));
    let adapters: Vec<Hash> = js[0].inputs.iter().map(|i| i.adapter).collect();
    assert_eq!(adapters, vec![Hash::of(b"a")]);
}

#[test]
fn a_pending_fetch_holds_the_aggregation_back() {
    let (ka, kb) = (key(1), key(2));
    let mut a = machine(&ka);
    a.handle(
        0,
        Event::LocalContribution(ann(&ka, 1, Hash::of(b"a"), None, 0)),
    );
    a.handle(
        2_500,
        Event::Announcement(ann(&kb, 1, Hash::of(b"slow"), None, 0)),
    );
    assert!(
        jobs(&a.tick(3_000)).is_empty(),
        "window over, fetch pending"
    );
    let out = a.handle(
        3_200,
        Event::BlobAvailable {
            hash: Hash::of(b"slow"),
        },
    );
    assert_eq!(jobs(&out)[0].inputs.len(), 2);
}

#[test]
fn restart_rejects_a_tip_of_another_network() {
    let k = key(1);
    let mut tip = record(1, None, &[], 1);
    tip.inputs = vec![RoundInput {
        adapter: Hash::of(b"a"),
        announcement: Hash::of(b"b"),
    }];
    assert!(RoundMachine::new(cfg(), model(), k.node_id(), Some(tip.clone()), 0).is_ok());
    tip.model = ModelId(Hash::of(b"elsewhere"));
    assert!(RoundMachine::new(cfg(), model(), k.node_id(), Some(tip), 0).is_err());
}

/// Chain weight counts distinct contributing nodes: one key announcing under many user ids
/// (or a gateway's many users) weighs as one node. Before, a record of 3 inputs from one key
/// weighed 3 and won over an honest record of 2 nodes; now its weight must be 1, a claim of 3
/// is penalised, and it is not adopted.
#[test]
fn many_user_ids_of_one_key_weigh_as_one_node() {
    let (ka, kb, kx) = (key(1), key(2), key(9));
    let mut a = machine(&ka);
    let theirs = ann(&kb, 1, Hash::of(b"b"), None, 0);
    a.handle(
        0,
        Event::LocalContribution(ann(&ka, 1, Hash::of(b"a"), None, 0)),
    );
    a.handle(10, Event::Announcement(theirs));
    a.handle(
        20,
        Event::BlobAvailable {
            hash: Hash::of(b"b"),
        },
    );
    let out = a.tick(3_000);
    run_aggregations(&mut a, 3_000, &out);
    let ours = commits(&a.tick(4_000))[0].0.clone();
    assert_eq!((ours.inputs.len(), ours.weight), (2, 2));

    let sybils: Vec<SignedAnnouncement> = (0..3u8)
        .map(|i| {
            let a = Announcement {
                model: model(),
                round: 1,
                adapter: Hash::of(&[b'x', i]),
                byte_len: 100,
                samples: 10,
                contributor: kx.node_id(),
                user_id: Some(format!("user-{i}")),
                parent: None,
                time_ms: 4_000,
            };
            Signed::sign(a, &kx).expect("sign")
        })
        .collect();
    let refs: Vec<&SignedAnnouncement> = sybils.iter().collect();
    let heavy = record(1, None, &refs, 3);
    assert!(heavy.beats(&ours), "as claimed, it would win");
    let mut out = a.handle(4_100, Event::Digest(digest(&kx, heavy, true, 4_100)));
    for (i, s) in sybils.iter().enumerate() {
        out.extend(a.handle(4_200 + i as u64, Event::Announcement(s.clone())));
    }
    for i in 0..3u8 {
        out.extend(a.handle(
            4_300 + u64::from(i),
            Event::BlobAvailable {
                hash: Hash::of(&[b'x', i]),
            },
        ));
    }
    out.extend(a.tick(4_400));
    let out = [out.clone(), run_aggregations(&mut a, 4_500, &out)].concat();
    assert!(
        penalties(&out).iter().any(|(p, m)| *p == kx.node_id()
            && matches!(
                m,
                Misbehaviour::WrongWeight {
                    claimed: 3,
                    expected: 1,
                    ..
                }
            )),
        "{:?}",
        penalties(&out)
    );
    assert!(commits(&out).is_empty());
    assert_eq!(a.tip(), Some(&ours));
    // Claiming its true weight, it is lighter than the honest round.
    let light = record(1, None, &refs, 1);
    assert!(!light.beats(&ours));
}

/// One key announcing 1,024 adapters for the current round under different user ids (and
/// never serving them) filled the round: every honest announcement after it was ignored as
/// `RoundFull`. Now one signer's announcements are capped at a quarter of the round's inputs
/// and the honest node's announcement is still taken.
#[test]
fn one_signer_cannot_fill_a_round() {
    let (ka, kb, kx) = (key(1), key(2), key(9));
    let mut a = machine(&ka);
    let mut ignored = 0;
    for i in 0..1024u32 {
        let ann = Announcement {
            model: model(),
            round: 1,
            adapter: Hash::of(&i.to_le_bytes()),
            byte_len: 100,
            samples: 10,
            contributor: kx.node_id(),
            user_id: Some(format!("user-{i}")),
            parent: None,
            time_ms: 10,
        };
        let out = a.handle(
            10,
            Event::Announcement(Signed::sign(ann, &kx).expect("sign")),
        );
        if verdicts(&out)
            .iter()
            .any(|v| matches!(v, Verdict::Ignore(Ignored::SignerFull { round: 1 })))
        {
            ignored += 1;
        }
    }
    assert_eq!(ignored, 1024 - 128, "one signer keeps at most 128 a round");
    let honest = ann(&kb, 1, Hash::of(b"honest"), None, 20);
    let out = a.handle(20, Event::Announcement(honest));
    assert_eq!(verdicts(&out), vec![Verdict::Accept]);
}

/// A blob that hashes right but is no usable adapter was fetched again up to the attempt
/// limit and its announcer never penalised. Now it is not fetched again (every holder has the
/// same bytes) and the node that announced it is penalised.
#[test]
fn an_adapter_that_is_no_adapter_is_not_refetched_and_its_announcer_is_penalised() {
    let (ka, kb) = (key(1), key(2));
    let mut a = machine(&ka);
    let bad = Hash::of(b"not an adapter");
    let out = a.handle(10, Event::Announcement(ann(&kb, 1, bad, None, 10)));
    assert_eq!(fetched_blobs(&out), vec![bad]);
    let out = a.handle(
        20,
        Event::FetchFailed {
            hash: bad,
            reason: FetchFailure::Invalid,
        },
    );
    assert!(fetched_blobs(&out).is_empty(), "fetched again: {out:?}");
    assert!(
        matches!(&penalties(&out)[..], [(p, Misbehaviour::InvalidAdapter { adapter })] if *p == kb.node_id() && *adapter == bad),
        "{:?}",
        penalties(&out)
    );
    // Nor later, when fetches are retried.
    assert!(fetched_blobs(&a.tick(5_000)).is_empty());
}

/// A source that keeps our share of its transfers busy through every attempt (the driver
/// reports `Busy`: it did not ask it) counts as not serving: its next adapter of the round is
/// not waited for. Before, such a source was never blamed, so one key trickling two transfers
/// and announcing one adapter after another (each under a new user id) held the round open
/// for the fetch attempts of each.
#[test]
fn a_source_that_keeps_our_share_busy_is_not_waited_for_again() {
    let (ka, kb) = (key(1), key(2));
    let mut a = machine(&ka);
    a.handle(
        0,
        Event::LocalContribution(ann(&ka, 1, Hash::of(b"a"), None, 0)),
    );
    let out = a.handle(
        10,
        Event::Announcement(ann(&kb, 1, Hash::of(b"slow"), None, 0)),
    );
    assert_eq!(fetched_blobs(&out), vec![Hash::of(b"slow")]);
    let busy = Event::FetchFailed {
        hash: Hash::of(b"slow"),
        reason: FetchFailure::Busy,
    };
    // Not asked: no retry at once, one at each deadline (fetch timeout 1 s, 3 attempts).
    assert!(fetched_blobs(&a.handle(20, busy.clone())).is_empty());
    assert_eq!(fetched_blobs(&a.tick(1_100)).len(), 1);
    a.handle(1_120, busy.clone());
    assert_eq!(fetched_blobs(&a.tick(2_200)).len(), 1);
    a.handle(2_220, busy);
    // The window is over by now; the next adapter it announces (as another user, just before
    // the blob fails) is not fetched nor waited for.
    let mut second = ann(&kb, 1, Hash::of(b"slow too"), None, 3_250)
        .payload()
        .clone();
    second.user_id = Some("another".into());
    let mut all = a.tick(3_300);
    assert!(fetched_blobs(&all).is_empty());
    let out = a.handle(
        3_400,
        Event::Announcement(Signed::sign(second, &kb).expect("sign")),
    );
    assert!(fetched_blobs(&out).is_empty(), "{out:?}");
    all.extend(out);
    all.extend(a.tick(4_000));
    let js = jobs(&all);
    let adapters: Vec<Hash> = js
        .last()
        .expect("a job")
        .inputs
        .iter()
        .map(|i| i.adapter)
        .collect();
    assert_eq!(adapters, vec![Hash::of(b"a")]);
}

/// One namer's unknown announcement ids take at most a record's worth (512) of the fetches in
/// flight: a second digest of the same key naming 512 more unknown ids starts none, while
/// another key's digest still gets its fetch. Before, four such digests filled all 2048 and
/// honest digests' announcements were no longer fetched.
#[test]
fn one_namer_cannot_fill_the_announcement_fetches() {
    let (ka, kb, kc) = (key(1), key(2), key(3));
    let mut a = machine(&ka);
    let unknown = |salt: u32| made_up_inputs(salt, 1);
    let out = a.handle(10, Event::Digest(digest(&kb, unknown(0), false, 10)));
    assert_eq!(fetched_announcements(&out).len(), 512);
    let out = a.handle(20, Event::Digest(digest(&kb, unknown(5_000), false, 20)));
    assert!(
        fetched_announcements(&out).is_empty(),
        "the same namer got more fetches"
    );
    let theirs = ann(&kc, 1, Hash::of(b"c"), None, 0);
    let view = record(1, None, &[&theirs], 1);
    let out = a.handle(30, Event::Digest(digest(&kc, view, false, 30)));
    assert_eq!(fetched_announcements(&out), vec![theirs.id()]);
}

/// A round-1 record of `weight` naming 512 announcements (and adapters) nobody has, each
/// set of them told apart by `salt` (512 apart at least).
fn made_up_inputs(salt: u32, weight: u64) -> RoundRecord {
    let mut inputs: Vec<RoundInput> = (0..512u32)
        .map(|i| RoundInput {
            adapter: Hash::of(&(salt + i).to_le_bytes()),
            announcement: Hash::of(&(salt + i + 1_000_000).to_le_bytes()),
        })
        .collect();
    inputs.sort();
    RoundRecord {
        model: model(),
        round: 1,
        parent: None,
        inputs,
        weight,
        rule: RuleId::FEDAVG,
        result: Hash::of(&salt.to_le_bytes()),
    }
}

/// Node 1 alone commits round 1 and is endorsed ([`endorsed_round_one`]); node 2 announced
/// an adapter for round 1 too. The machine, its tip, node 2's announcement and the heavier
/// round 1 of both (a switch).
fn a_heavier_round_one() -> (RoundMachine, RoundRecord, SignedAnnouncement, RoundRecord) {
    let ka = key(1);
    let mine = ann(&ka, 1, Hash::of(b"a1"), None, 0);
    let (a, tip) = endorsed_round_one(&ka, &mine);
    let theirs = ann(&key(2), 1, Hash::of(b"b"), None, 0);
    let better = record(1, None, &[&mine, &theirs], 2);
    (a, tip, theirs, better)
}

/// Key `key(40 + n)` publishes `records[n]`, committed, at `t`, for each `n` in `which`: all
/// the machine did.
fn each_by_a_key_of_its_own(
    a: &mut RoundMachine,
    records: &[RoundRecord],
    which: std::ops::Range<usize>,
    t: u64,
) -> Vec<Action> {
    let mut out = Vec::new();
    for n in which {
        let d = digest(&key(40 + n as u8), records[n].clone(), true, t);
        out.extend(a.handle(t, Event::Digest(d)));
    }
    out
}

/// Four keys each sign a committed record, heavier than our tip, naming 512 announcements
/// nobody serves, and publish it again every second. What verifying other histories asks
/// for takes at most half of the announcement fetches, so a current-round digest naming an
/// honest announcement still gets it fetched; and once a record's fetches run out, its
/// signers are not asked again for a while. (Before, the four records took all 2,048
/// fetches, and each was asked for again the moment its fetches ran out: no current-round
/// announcement could be fetched for as long as the keys kept publishing.)
#[test]
fn records_naming_announcements_nobody_serves_cannot_hold_the_fetches() {
    let ka = key(1);
    let mine = ann(&ka, 1, Hash::of(b"a1"), None, 0);
    let (mut a, tip) = endorsed_round_one(&ka, &mine);
    let ghosts: Vec<RoundRecord> = (0..4u32).map(|k| made_up_inputs(k * 10_000, 512)).collect();
    let publish = |a: &mut RoundMachine, t: u64| each_by_a_key_of_its_own(a, &ghosts, 0..4, t);
    let ids: Vec<BTreeSet<Hash>> = ghosts
        .iter()
        .map(|r| r.inputs.iter().map(|i| i.announcement).collect())
        .collect();
    let mut asked: Vec<Vec<u64>> = vec![Vec::new(); ghosts.len()];
    let mut out = publish(&mut a, 4_600);
    // Other keys name the ids already asked for in current-round digests: what verifying
    // the records asked for is still counted as such (before this was checked, such a
    // digest took the fetches out of that count, and the other records took the rest).
    let first_asked = fetched_announcements(&out);
    for (n, (r, ids)) in ghosts.iter().zip(&ids).enumerate() {
        if first_asked.iter().any(|id| ids.contains(id)) {
            let view = RoundRecord {
                round: 2,
                parent: Some(tip.result),
                weight: tip.weight + 1,
                ..r.clone()
            };
            let k = key(60 + n as u8);
            out.extend(a.handle(4_610, Event::Digest(digest(&k, view, false, 4_610))));
        }
    }
    out.extend(publish(&mut a, 4_620));
    let theirs = ann(&key(2), 2, Hash::of(b"b2"), Some(tip.result), 4_600);
    let view = record(2, Some(tip.result), &[&theirs], tip.weight + 1);
    let honest = a.handle(4_650, Event::Digest(digest(&key(2), view, false, 4_650)));
    assert!(
        fetched_announcements(&honest).contains(&theirs.id()),
        "the current round's announcement was not fetched"
    );
    for t in (4_700..14_000).step_by(100) {
        if t % 1_000 == 600 {
            out.extend(publish(&mut a, t));
        }
        out.extend(a.tick(t));
        let fetched = fetched_announcements(&out);
        for (times, ids) in asked.iter_mut().zip(&ids) {
            if fetched.iter().any(|id| ids.contains(id)) {
                times.push(t);
            }
        }
        out.clear();
    }
    // A record's fetches run out 3 s after it is first asked for (3 attempts of 1 s).
    for times in &asked {
        let Some(first) = times.first() else { continue };
        let quiet = first + 3_200..first + 5_500;
        assert!(
            !times.iter().any(|t| quiet.contains(t)),
            "asked for again at once after its fetches ran out: {asked:?}"
        );
    }
    assert!(
        asked.iter().filter(|t| !t.is_empty()).count() >= 2,
        "records were asked for: {asked:?}"
    );
}

/// Keys sign records naming 512 announcements nobody serves, with ids that sort before an
/// honest heavier record's: two take the fetches for other histories, and two more wait for
/// them. When the first two run out, the record more keys signed is served first, so the
/// honest one is fetched then rather than after the next two. (Before, candidates were
/// served in the order of their ids.)
#[test]
fn freed_fetches_go_first_to_the_record_more_keys_signed() {
    let (mut a, _, theirs, better) = a_heavier_round_one();
    let ghosts: Vec<RoundRecord> = (1..)
        .map(|n| made_up_inputs(n * 10_000, 512))
        .filter(|r| r.id() < better.id())
        .take(4)
        .collect();
    let mut asked_at = None;
    let mut out = each_by_a_key_of_its_own(&mut a, &ghosts, 0..2, 4_600);
    for k in [key(2), key(3)] {
        out.extend(a.handle(
            4_700,
            Event::Digest(digest(&k, better.clone(), true, 4_700)),
        ));
    }
    out.extend(each_by_a_key_of_its_own(&mut a, &ghosts, 2..4, 4_800));
    for t in (4_900..11_000).step_by(100) {
        out.extend(a.tick(t));
        if asked_at.is_none() && fetched_announcements(&out).contains(&theirs.id()) {
            asked_at = Some(t);
        }
        out.clear();
    }
    // The first two run out at 7.6 s (three attempts of a second from 4.6 s).
    assert!(
        asked_at.is_some_and(|t| t < 8_000),
        "the honest record's announcement was asked for at {asked_at:?}"
    );
}

/// How the driver of [`serve_from_one`] ends an attempt that does not ask the server.
#[derive(Clone, Copy)]
enum Unserved {
    /// Reported failed (`Unavailable`) 0.5 s after the driver saw it, as when the peers it
    /// asked said no (the node's driver also asks every connected peer, so this is a server
    /// it is not connected to). The fetch's attempts go out at 4.6, 5.2 and 5.8 s, and the
    /// last fails at 6.4 s, before its timer (6.8 s).
    Reported,
    /// Never reported: the attempt runs out on the machine's timer. The attempts go out at
    /// 4.6, 5.6 and 6.6 s, and the last runs out at 7.6 s.
    TimedOut,
}

impl Unserved {
    /// When the last attempt has gone out and not yet ended.
    fn after_the_last_attempt(self) -> u64 {
        match self {
            Unserved::Reported => 6_000,
            Unserved::TimedOut => 7_000,
        }
    }

    /// When the request, having asked only the first namer, ends.
    fn ends(self) -> u64 {
        match self {
            Unserved::Reported => 6_400,
            Unserved::TimedOut => 7_600,
        }
    }
}

/// Drives `a` from 4.7 s to 9.5 s, starting with `todo` (a fetch of `theirs` started at
/// 4.6 s). The driver sees the machine's actions on its next 100 ms step: `theirs` is served
/// by `server` alone, to an attempt that asks it; an attempt that does not ends as `unserved`
/// says. Every blob is served by anyone, aggregations are run, and `late` is handled between
/// the fetch's last attempt and its end. Returns every action the machine took, and when the
/// driver first asked `server` for `theirs`.
fn serve_from_one(
    a: &mut RoundMachine,
    theirs: &SignedAnnouncement,
    server: &NodeKey,
    mut todo: Vec<Action>,
    (late, unserved): (SignedDigest, Unserved),
) -> (Vec<Action>, Option<u64>) {
    let mut failures: Vec<(u64, Event)> = Vec::new();
    let mut all = Vec::new();
    let mut server_asked = None;
    for t in (4_700..9_500).step_by(100) {
        let mut out = Vec::new();
        if t == unserved.after_the_last_attempt() {
            out.extend(a.handle(t, Event::Digest(late.clone())));
        }
        for (_, e) in failures.extract_if(.., |(due, _)| *due <= t) {
            out.extend(a.handle(t, e));
        }
        for action in &todo {
            let event = match action {
                Action::FetchAnnouncement { id, from } if *id == theirs.id() => {
                    if from.contains(&server.node_id()) {
                        server_asked.get_or_insert(t);
                        Some(Event::Announcement(theirs.clone()))
                    } else if let Unserved::Reported = unserved {
                        failures.push((
                            t + 500,
                            Event::FetchFailed {
                                hash: *id,
                                reason: FetchFailure::Unavailable,
                            },
                        ));
                        None
                    } else {
                        None
                    }
                }
                Action::FetchBlob { hash, .. } => Some(Event::BlobAvailable { hash: *hash }),
                _ => None,
            };
            if let Some(e) = event {
                out.extend(a.handle(t, e));
            }
        }
        out.extend(run_aggregations(a, t, &todo));
        out.extend(a.tick(t + 100));
        all.append(&mut todo);
        todo = out;
    }
    all.append(&mut todo);
    (all, server_asked)
}

/// Key 40 names node 2's round-1 announcement in the digest `names` makes (given our tip and
/// the announcement) at 4.6 s and serves nothing; node 2's heavier round 1 holding it comes
/// late ([`serve_from_one`], the attempts that ask only key 40 ending as `unserved` says).
/// It is adopted.
fn the_honest_record_is_adopted_after(
    unserved: Unserved,
    names: impl FnOnce(&RoundRecord, &SignedAnnouncement) -> RoundDigest,
) {
    let (mut a, tip, theirs, better) = a_heavier_round_one();
    let (kb, kx) = (key(2), key(40));
    let first = Signed::sign(names(&tip, &theirs), &kx).expect("sign");
    let todo = a.handle(4_600, Event::Digest(first));
    assert!(fetched_announcements(&todo).contains(&theirs.id()));
    let at = unserved.after_the_last_attempt();
    let late = digest(&kb, better.clone(), true, at);
    let (all, server_asked) = serve_from_one(&mut a, &theirs, &kb, todo, (late, unserved));
    // Asked once the merged fetch ended, and (when its failure is reported, at 6.4 s) before
    // its timer (6.8 s): so what is tested is how a request both namers are in ends.
    let ends = unserved.ends();
    assert!(
        server_asked.is_some_and(|t| (ends..=ends + 400).contains(&t)),
        "node 2 was first asked at {server_asked:?}"
    );
    assert!(
        commits(&all).contains(&(better.clone(), Some(tip.result))),
        "the honest record was not adopted"
    );
    assert_eq!(a.tip(), Some(&better));
}

/// A key signs a heavier record naming an honest node's announcement and serves nothing;
/// the honest record naming it arrives late in that fetch's life, after its last attempt.
/// The fetch fails having asked only the key (reported, or on the machine's timer alone): the
/// honest signer, never asked, is not taken for one that does not show it. It is asked,
/// serves it, and its record is adopted.
#[test]
fn a_signer_never_asked_is_not_blamed_for_a_fetch_that_ran_out() {
    for unserved in [Unserved::Reported, Unserved::TimedOut] {
        the_honest_record_is_adopted_after(unserved, |_, theirs| {
            let mut false_record = record(1, None, &[theirs], 2);
            false_record.result = Hash::of(b"made up");
            RoundDigest {
                record: false_record,
                signer: key(40).node_id(),
                committed: true,
                time_ms: 4_600,
            }
        });
    }
}

/// The same announcement named two ways: a key names it in a current-round digest and serves
/// nothing; the honest record that holds it, for another history, arrives between the
/// fetch's last attempt and its failure. When the fetch fails, the current-round rule (a
/// namer that does not show what it named is not asked for a while) holds the key alone:
/// the honest signer named it only for the history and was never asked. It is asked,
/// serves it, and its record is adopted. (Before, every namer of a merged request was
/// marked unserved, and the honest record then had no signer left to ask.)
#[test]
fn a_signer_naming_an_announcement_for_a_history_is_not_held_to_a_current_round_claim() {
    the_honest_record_is_adopted_after(Unserved::Reported, |tip, theirs| RoundDigest {
        record: record(2, Some(tip.result), &[theirs], tip.weight + 1),
        signer: key(40).node_id(),
        committed: false,
        time_ms: 4_600,
    });
}

/// Nodes 2 and 3 publish node 2's heavier round 1 at 4.6 s. Drives `a` from 4.7 s to `until`
/// in 100 ms steps; the driver sees the machine's actions on its next step and answers a fetch
/// of node 2's announcement with `answer(t)` (the time it was asked), every blob as
/// available, and runs aggregations. Returns every action the machine took, the times the
/// announcement was asked for, and the machine.
fn answer_theirs(
    until: u64,
    answer: impl Fn(u64, &SignedAnnouncement) -> Event,
) -> (Vec<Action>, Vec<u64>, RoundMachine) {
    let (mut a, _, theirs, better) = a_heavier_round_one();
    let mut todo = Vec::new();
    for k in [key(2), key(3)] {
        todo.extend(a.handle(
            4_600,
            Event::Digest(digest(&k, better.clone(), true, 4_600)),
        ));
    }
    let (mut all, mut asked_at) = (Vec::new(), Vec::new());
    for t in (4_700..until).step_by(100) {
        let mut out = Vec::new();
        for action in &todo {
            let event = match action {
                Action::FetchAnnouncement { id, .. } if *id == theirs.id() => {
                    asked_at.push(t);
                    Some(answer(t, &theirs))
                }
                Action::FetchBlob { hash, .. } => Some(Event::BlobAvailable { hash: *hash }),
                _ => None,
            };
            if let Some(e) = event {
                out.extend(a.handle(t, e));
            }
        }
        out.extend(run_aggregations(&mut a, t, &todo));
        out.extend(a.tick(t + 100));
        all.append(&mut todo);
        todo = out;
    }
    all.append(&mut todo);
    (all, asked_at, a)
}

/// An announcement of another history that this node will not keep (the driver reports
/// `Local`: an outsider of its closed network signed it) is not asked for again: it would be
/// the same bytes. The record naming it is not adopted and its signers are not blamed.
/// (Before, it was fetched again at each attempt's deadline, and once the attempts ran out
/// the record asked for it again at once, for as long as it was published.)
#[test]
fn an_announcement_not_ours_to_keep_is_not_asked_for_again() {
    let (all, asked_at, a) = answer_theirs(7_000, |_, theirs| Event::FetchFailed {
        hash: theirs.id(),
        reason: FetchFailure::Local,
    });
    assert_eq!(asked_at.len(), 1, "asked for at {asked_at:?}");
    assert!(penalties(&all).is_empty(), "{:?}", penalties(&all));
    assert!(
        a.tip().is_some_and(|t| t.weight == 1),
        "adopted a record it could not check: {:?}",
        a.tip()
    );
    // Its signers are asked for what their next record names (not taken for silent).
    let (mut a, c) = (a, ann(&key(5), 1, Hash::of(b"c"), None, 0));
    let next = record(1, None, &[&c, &ann(&key(6), 1, Hash::of(b"d"), None, 0)], 2);
    let out = a.handle(7_000, Event::Digest(digest(&key(2), next, true, 7_000)));
    assert!(fetched_announcements(&out).contains(&c.id()), "{out:?}");
}

/// Every attempt to fetch an announcement of another history is reported `Busy` (this node
/// already receives its share from every peer asked, so none was asked) until 9 s. After the
/// last attempt the request runs out at that attempt's deadline, not at once; its namers,
/// never asked, are not taken for silent: the record asks for it again, gets it, and is
/// adopted. (Before, a last attempt reported busy ended the request at once, and the record
/// asked for it again at once.)
#[test]
fn a_fetch_whose_sources_stayed_busy_runs_out_on_its_timer() {
    let (all, asked_at, a) = answer_theirs(12_000, |t, theirs| {
        if t < 9_000 {
            Event::FetchFailed {
                hash: theirs.id(),
                reason: FetchFailure::Busy,
            }
        } else {
            Event::Announcement(theirs.clone())
        }
    });
    // Attempts a fetch timeout (1 s) apart, the last running out a timeout after it (the
    // first was seen by the driver a step after it was made, so 0.9 s before the second).
    let gaps: Vec<u64> = asked_at.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        asked_at.len() >= 4 && gaps.iter().all(|g| *g >= 900),
        "asked for at {asked_at:?}"
    );
    assert!(penalties(&all).is_empty(), "{:?}", penalties(&all));
    assert!(
        a.tip().is_some_and(|t| t.weight == 2),
        "the record was not adopted: {:?}",
        a.tip()
    );
}

/// Key 3 signs a record of another history while the fetch of an announcement it names runs
/// (for key 2, which signed it first); the next attempts name key 3 too, and the driver's one
/// report for all three is `Busy`: a named peer was left unasked, and which is not said. So
/// when the fetch runs out neither is taken for silent: the record asks for it again, and
/// what each signs next is asked of it. (Before, a busy report un-counted only the namers
/// its last attempt asked first: none here, so both were blamed and the record dropped.)
#[test]
fn namers_a_busy_fetch_may_have_left_unasked_are_not_taken_for_silent() {
    let (mut a, _, theirs, better) = a_heavier_round_one();
    let out = a.handle(
        4_600,
        Event::Digest(digest(&key(2), better.clone(), true, 4_600)),
    );
    assert!(fetched_announcements(&out).contains(&theirs.id()));
    a.handle(5_000, Event::Digest(digest(&key(3), better, true, 5_000)));
    let mut attempts = Vec::new();
    for t in (5_100..8_000).step_by(100) {
        if t == 7_000 {
            let hash = theirs.id();
            let reason = FetchFailure::Busy;
            a.handle(t, Event::FetchFailed { hash, reason });
        }
        if fetched_announcements(&a.tick(t)).contains(&theirs.id()) {
            attempts.push(t);
        }
    }
    // Attempts at 5.6 and 6.6 s; it runs out at 7.6 s and is asked for again.
    assert_eq!(attempts, [5_600, 6_600, 7_600]);
    let named_by = |a: &mut RoundMachine, k: u8| {
        let c = ann(&key(10 + k), 1, Hash::of(&[k]), None, 0);
        let d = ann(&key(20 + k), 1, Hash::of(&[k, k]), None, 0);
        let next = record(1, None, &[&c, &d], 2);
        let out = a.handle(8_000, Event::Digest(digest(&key(k), next, true, 8_000)));
        fetched_announcements(&out).contains(&c.id())
    };
    assert!(named_by(&mut a, 2), "key 2 was taken for silent");
    assert!(named_by(&mut a, 3), "key 3 was taken for silent");
}

/// Once the settled outcomes are full (four keys' records naming 2,048 announcements nobody
/// serves, every fetch run out), a record naming an announcement that is served but not kept
/// (stamped in the future) is not asked for again at once each time it is refused: the
/// request waits out its deadline. (Before, the refusal could not be remembered, the record
/// asked for it again at once, the envelope already held was refused again, and so on: a
/// fetch every step of the driver for as long as the record was published.)
#[test]
fn an_announcement_refused_when_the_settled_outcomes_are_full_is_not_asked_for_in_a_loop() {
    let (mut a, _, _, _) = a_heavier_round_one();
    let ghosts: Vec<RoundRecord> = (0..4u32).map(|k| made_up_inputs(k * 10_000, 512)).collect();
    for t in (4_600..12_000).step_by(100) {
        if t % 1_000 == 600 {
            each_by_a_key_of_its_own(&mut a, &ghosts, 0..4, t);
        }
        a.tick(t);
    }
    let mine = ann(&key(1), 1, Hash::of(b"a1"), None, 0);
    let future = ann(&key(2), 1, Hash::of(b"f"), None, 1 << 40);
    let better = record(1, None, &[&mine, &future], 2);
    let mut todo = Vec::new();
    for k in [key(2), key(3)] {
        let d = digest(&k, better.clone(), true, 12_000);
        todo.extend(a.handle(12_000, Event::Digest(d)));
    }
    let mut asked = 0;
    for t in (12_100..15_000).step_by(100) {
        let mut out = Vec::new();
        for id in fetched_announcements(&todo) {
            if id == future.id() {
                asked += 1;
                out.extend(a.handle(t, Event::Announcement(future.clone())));
            }
        }
        out.extend(a.tick(t));
        todo = out;
    }
    // Once when first named, then once at each deadline (1 s).
    assert!((1..=4).contains(&asked), "asked for {asked} times in 3 s");
}

/// Four keys each name, in a current-round digest, 512 announcements they signed and serve,
/// stamped far in the future: each is refused when it arrives (nobody's fault as far as the
/// node can tell) and is not asked for again for a while, but holds no fetch slot meanwhile,
/// so an honest digest's input is still asked for. (A first version of the refusal kept each
/// such request in place until its deadline: these keys held all 2,048 announcement fetches,
/// and honest inputs were neither fetched nor admitted.)
#[test]
fn announcements_refused_as_they_arrive_hold_no_fetch_slots() {
    let (mut a, tip, _, _) = a_heavier_round_one();
    for k in 0..4u8 {
        let signer = key(40 + k);
        let future: Vec<SignedAnnouncement> = (0..512u32)
            .map(|i| {
                let adapter = Hash::of(&[&[k][..], &i.to_le_bytes()[..]].concat());
                ann(&signer, 2, adapter, Some(tip.result), 1 << 40)
            })
            .collect();
        let named: Vec<&SignedAnnouncement> = future.iter().collect();
        let view = record(2, Some(tip.result), &named, tip.weight + 1);
        let out = a.handle(4_600, Event::Digest(digest(&signer, view, false, 4_600)));
        let asked = fetched_announcements(&out);
        assert_eq!(
            asked.len(),
            512,
            "key {k}'s announcements were not all asked for"
        );
        for f in &future {
            a.handle(4_610, Event::Announcement(f.clone()));
        }
    }
    let theirs = ann(&key(2), 2, Hash::of(b"b2"), Some(tip.result), 4_600);
    let view = record(2, Some(tip.result), &[&theirs], tip.weight + 1);
    let out = a.handle(4_700, Event::Digest(digest(&key(2), view, false, 4_700)));
    assert!(
        fetched_announcements(&out).contains(&theirs.id()),
        "the honest digest's input was not asked for"
    );
}

/// A network that asks for key work (`RoundConfig::min_key_work`) rejects what weaker keys
/// sign, announcements and digests, and penalises the signer; a ground key
/// (`NodeKey::grind`) counts. Before, every key counted, so one party weighed as many
/// contributors as it made keys, at no cost (Sybils).
#[test]
fn a_network_with_key_work_refuses_what_weak_keys_sign() {
    let bits = 8;
    let mut n = 0u64;
    let mut next = || {
        n += 1;
        let mut s = [9u8; 32];
        s[..8].copy_from_slice(&n.to_le_bytes());
        s
    };
    let me = NodeKey::grind(bits, &mut next, |_| {});
    let strong = NodeKey::grind(bits, &mut next, |_| {});
    let mut weak_keys = Vec::new();
    while weak_keys.len() < 2 {
        let k = NodeKey::from_bytes(&next());
        if k.node_id().key_work() < bits {
            weak_keys.push(k);
        }
    }
    let (weak, weak2) = (&weak_keys[0], &weak_keys[1]);
    let strict = |k: &NodeKey| {
        let cfg = RoundConfig {
            min_key_work: bits,
            ..cfg()
        };
        RoundMachine::new(cfg, model(), k.node_id(), None, 0).expect("machine")
    };
    let mut m = strict(&me);
    let out = m.handle(
        10,
        Event::Announcement(ann(weak, 1, Hash::of(b"w"), None, 10)),
    );
    assert_eq!(
        verdicts(&out),
        vec![Verdict::Reject(Misbehaviour::WeakKey {
            work: weak.node_id().key_work(),
            needed: bits,
        })]
    );
    assert_eq!(
        penalties(&out).iter().map(|p| p.0).collect::<Vec<_>>(),
        vec![weak.node_id()]
    );
    let strong_ann = ann(&strong, 1, Hash::of(b"s"), None, 11);
    let out = m.handle(11, Event::Announcement(strong_ann.clone()));
    assert_eq!(verdicts(&out), vec![Verdict::Accept]);
    let out = m.handle(
        12,
        Event::Digest(digest(weak2, record(1, None, &[&strong_ann], 1), false, 12)),
    );
    assert!(
        matches!(
            verdicts(&out)[..],
            [Verdict::Reject(Misbehaviour::WeakKey { .. })]
        ),
        "{out:?}"
    );
    assert_eq!(penalties(&out).len(), 1);
    // The machine does not judge its own node's contribution (the node refuses to start
    // with a weak key instead; its peers would refuse what it signs).
    let out = strict(weak).handle(
        13,
        Event::LocalContribution(ann(weak, 1, Hash::of(b"own"), None, 13)),
    );
    assert_eq!(verdicts(&out), vec![Verdict::Accept], "{out:?}");
    assert!(
        out.iter()
            .any(|a| matches!(a, Action::PublishAnnouncement(_))),
        "{out:?}"
    );
    // Without key work the same weak key counts: the checks above are not vacuous.
    let out = machine(weak).handle(
        14,
        Event::Announcement(ann(weak2, 1, Hash::of(b"w2"), None, 14)),
    );
    assert_eq!(verdicts(&out), vec![Verdict::Accept]);
}

/// Announcements that keep arriving (keys made at will cost nothing in an open network) cannot
/// keep a round open. After the close, an announcement that arrives unasked enters the round's
/// input set for two grace periods and one a digest names for four; later ones are kept but
/// change nothing, so the grace period runs out and the round commits. Before, every arrival
/// changed the input set and restarted the grace period, and the round never committed.
#[test]
fn announcements_arriving_without_end_do_not_keep_a_round_open() {
    let ka = key(1);
    let mut a = machine(&ka);
    let mine = ann(&ka, 1, Hash::of(b"a"), None, 0);
    a.handle(0, Event::LocalContribution(mine.clone()));
    let out = a.tick(3_000); // closes
    let mut held = vec![mine.clone()];
    let mut commit = Vec::new();
    let mut pending = out;
    // A new contributor every 400 ms (grace 1 s), each adapter held at once.
    for (n, t) in (3_100..12_000).step_by(400).enumerate() {
        let k = key(100 + n as u8);
        let adapter = Hash::of(format!("sybil {n}").as_bytes());
        let s = ann(&k, 1, adapter, None, t);
        let mut out = run_aggregations(&mut a, t, &pending);
        out.extend(a.handle(t, Event::Announcement(s.clone())));
        out.extend(a.handle(t, Event::BlobAvailable { hash: adapter }));
        out.extend(a.tick(t + 200));
        commit.extend(commits(&out));
        if !commit.is_empty() {
            break;
        }
        // Those within two grace periods of the close (3 s) are in.
        if t < 5_000 {
            held.push(s);
        }
        pending = out;
    }
    assert_eq!(commit.len(), 1, "the round never committed");
    let refs: Vec<&SignedAnnouncement> = held.iter().collect();
    let n = refs.len() as u64;
    assert_eq!(commit[0].0, record(1, None, &refs, n));
    assert_eq!(
        n, 6,
        "the close's own input and five arrivals within 2 s of it"
    );

    // One that a digest of the round names is taken for four grace periods after the close.
    let kb = key(2);
    let mut b = machine(&kb);
    let own = ann(&kb, 1, Hash::of(b"own"), None, 0);
    b.handle(0, Event::LocalContribution(own.clone()));
    let out = b.tick(3_000);
    run_aggregations(&mut b, 3_000, &out);
    let (kc, kd) = (key(3), key(4));
    let late = ann(&kc, 1, Hash::of(b"late"), None, 5_500);
    let too_late = ann(&kd, 1, Hash::of(b"too late"), None, 7_100);
    // Named at 5.5 s (within 4 s of the close): fetched and counted.
    let view = record(1, None, &[&late], 1);
    let out = b.handle(5_500, Event::Digest(digest(&kc, view, false, 5_500)));
    assert_eq!(fetched_announcements(&out), vec![late.id()]);
    // Named at 7.1 s: neither fetched nor counted.
    let view = record(1, None, &[&too_late], 1);
    let out = b.handle(7_100, Event::Digest(digest(&kd, view, false, 7_100)));
    assert!(fetched_announcements(&out).is_empty());
    let mut out = b.handle(7_200, Event::Announcement(late.clone()));
    out.extend(b.handle(7_200, Event::BlobAvailable { hash: late.adapter }));
    out.extend(b.handle(7_300, Event::Announcement(too_late.clone())));
    out.extend(b.handle(
        7_300,
        Event::BlobAvailable {
            hash: too_late.adapter,
        },
    ));
    let out = run_aggregations(&mut b, 7_300, &out);
    let mut c = commits(&out);
    for t in (7_400..10_000).step_by(100) {
        c.extend(commits(&b.tick(t)));
    }
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].0, record(1, None, &[&own, &late], 2));

    // This node's own contribution is held to the same time: refused (not published, so
    // the driver offers it in the next round) once two grace periods have passed.
    for (at, taken) in [(4_900, true), (5_100, false)] {
        let (ke, kf) = (key(5), key(6));
        let mut e = machine(&ke);
        let other = ann(&kf, 1, Hash::of(b"other"), None, 0);
        e.handle(0, Event::Announcement(other.clone()));
        e.handle(
            0,
            Event::BlobAvailable {
                hash: other.adapter,
            },
        );
        e.tick(3_000);
        let mine = ann(&ke, 1, Hash::of(b"mine"), None, at);
        let out = e.handle(at, Event::LocalContribution(mine.clone()));
        let published = out
            .iter()
            .any(|x| matches!(x, Action::PublishAnnouncement(s) if s.id() == mine.id()));
        assert_eq!(published, taken, "at {at}");
        if !taken {
            assert_eq!(
                verdicts(&out),
                vec![Verdict::Ignore(Ignored::InputsClosed { round: 1 })]
            );
        }
    }
}

/// A candidate whose parent was a round of our chain when it arrived (so its weight was
/// going to be checked, and it needed no quorum) loses that standing when our chain moves
/// off its parent: one signer's word on its weight is then not enough to adopt it.
#[test]
fn a_candidate_whose_parent_leaves_our_chain_needs_the_quorum_again() {
    let ka = key(1);
    let (mut a, mine, a1, a2) = two_rounds_alone(&ka);
    assert_eq!((a2.round, a2.weight), (2, 2));

    // One signer: a record of round 2 on A1 with a forged weight. A1 is ours, so the gate
    // lets it through to verification (its weight is to be checked against A1's).
    let (kb, kc, kd, kz) = (key(2), key(3), key(4), key(5));
    let z = ann(&kz, 2, Hash::of(b"z"), Some(a1.result), 4_200);
    let forged = record(2, Some(a1.result), &[&z], 100);
    let out = a.handle(
        8_300,
        Event::Digest(digest(&kd, forged.clone(), true, 8_300)),
    );
    assert_eq!(fetched_announcements(&out), vec![z.id()]);

    // Meanwhile a heavier round 1, B1 = {mine, x, y}, verified: a rewind off A1.
    let x = ann(&kb, 1, Hash::of(b"x"), None, 100);
    let y = ann(&kc, 1, Hash::of(b"y"), None, 100);
    let b1 = record(1, None, &[&mine, &x, &y], 3);
    a.handle(8_400, Event::Digest(digest(&kb, b1.clone(), true, 8_400)));
    // (Round 1's announcements were dropped when round 3 opened: ours is fetched again.)
    let mut out = Vec::new();
    for s in [&mine, &x, &y] {
        out.extend(a.handle(8_500, Event::Announcement(s.clone())));
        out.extend(a.handle(8_600, Event::BlobAvailable { hash: s.adapter }));
    }
    let out = run_aggregations(&mut a, 8_700, &out);
    assert_eq!(commits(&out), vec![(b1.clone(), Some(a1.result))]);

    // The forged record's inputs arrive: its parent is no round of our chain now, and one
    // signer is no quorum, so it is neither recomputed nor adopted.
    let mut out = a.handle(8_800, Event::Announcement(z.clone()));
    out.extend(a.handle(8_800, Event::BlobAvailable { hash: z.adapter }));
    let mut out = run_aggregations(&mut a, 8_900, &out);
    out.extend(tick_through(&mut a, 9_000..20_000, 250));
    assert!(
        !commits(&out).iter().any(|(r, _)| *r == forged),
        "adopted a record whose weight one signer vouched for"
    );
    assert_ne!(a.tip(), Some(&forged));
    assert!(a.tip().is_some_and(|t| t.weight < 100));
}

/// After a restart the driver passes the rounds its store kept before the tip
/// (`remember`): a record forking below the tip then has its weight checked against them.
/// Without them the machine knows only the tip, so once it has been alone on its tip for
/// as long as linking may take, two colluding signers' word on the weight of a record on
/// the tip's parent is taken (and it is adopted).
#[test]
fn a_restarted_node_checks_forks_below_its_tip_against_what_it_stored() {
    let ka = key(1);
    let (_, _, a1, a2) = two_rounds_alone(&ka);

    // A round-2 record on A1 with one input and a forged weight, signed by two keys.
    let (kc, kd) = (key(3), key(4));
    let z = ann(&kc, 2, Hash::of(b"z"), Some(a1.result), 4_200);
    let forged = record(2, Some(a1.result), &[&z], 100);
    for remembered in [true, false] {
        let mut m = RoundMachine::new(cfg(), model(), ka.node_id(), Some(a2.clone()), 10_000)
            .expect("machine");
        if remembered {
            m.remember(std::slice::from_ref(&a1));
        }
        let mut out = Vec::new();
        for (t, k) in [(16_100, &kc), (16_200, &kd)] {
            out.extend(m.handle(t, Event::Digest(digest(k, forged.clone(), true, t))));
        }
        out.extend(m.handle(16_300, Event::Announcement(z.clone())));
        out.extend(m.handle(16_300, Event::BlobAvailable { hash: z.adapter }));
        let done = run_aggregations(&mut m, 16_400, &out);
        out.extend(done);
        let adopted = commits(&out).iter().any(|(r, _)| *r == forged);
        assert_eq!(adopted, !remembered, "remembered: {remembered}");
        if remembered {
            assert!(penalties(&out).iter().any(|(p, why)| *p == kc.node_id()
                && matches!(
                    why,
                    Misbehaviour::WrongWeight {
                        claimed: 100,
                        expected: 2,
                        ..
                    }
                )));
        }
    }
}

/// Node `k` alone commits round 1 of one adapter (A1), then round 2 of another (A2): the
/// machine at 8.2 s, its round-1 announcement, A1 and A2.
fn two_rounds_alone(k: &NodeKey) -> (RoundMachine, SignedAnnouncement, RoundRecord, RoundRecord) {
    let (mut a, mine, a1) = round_one_alone(k);
    let mine2 = ann(k, 2, Hash::of(b"a2"), Some(a1.result), 4_100);
    a.handle(4_100, Event::LocalContribution(mine2));
    let out = a.tick(7_100);
    run_aggregations(&mut a, 7_100, &out);
    let a2 = commits(&a.tick(8_200))[0].0.clone();
    (a, mine, a1, a2)
}

/// One key publishing committed record after committed record whose announcements it never
/// serves holds one candidate slot, not all of them: an honest heavier record from another
/// node still gets in and is adopted. Before, a signer was held to one candidate only while
/// that one waited for its quorum, so one key filled all 16 slots and every honest switch or
/// catch-up was refused.
#[test]
fn one_key_cannot_fill_the_candidate_slots() {
    let (ka, kb, kc) = (key(1), key(2), key(3));
    let (mut a, mine, ours) = round_one_alone(&ka);
    // 20 records of round 1 naming announcements nobody serves, heavy on paper (the weight
    // is checked only once the announcements are known).
    for i in 0..20u32 {
        let ghost = RoundInput {
            adapter: Hash::of(&[b"ghost adapter".as_slice(), &i.to_le_bytes()].concat()),
            announcement: Hash::of(&[b"ghost ann".as_slice(), &i.to_le_bytes()].concat()),
        };
        let junk = RoundRecord {
            model: model(),
            round: 1,
            parent: None,
            inputs: vec![ghost],
            weight: 400,
            rule: RuleId::FEDAVG,
            result: Hash::of(&i.to_le_bytes()),
        };
        let t = 4_100 + u64::from(i);
        a.handle(t, Event::Digest(digest(&kc, junk, true, t)));
    }
    let theirs = ann(&kb, 1, Hash::of(b"b"), None, 0);
    let better = record(1, None, &[&mine, &theirs], 2);
    let mut out = a.handle(
        4_200,
        Event::Digest(digest(&kb, better.clone(), true, 4_200)),
    );
    out.extend(a.handle(4_300, Event::Announcement(theirs.clone())));
    out.extend(a.handle(
        4_400,
        Event::BlobAvailable {
            hash: theirs.adapter,
        },
    ));
    let mut out = run_aggregations(&mut a, 4_500, &out);
    out.extend(tick_through(&mut a, 4_600..6_000, 200));
    assert!(
        commits(&out).contains(&(better.clone(), Some(ours.result))),
        "the honest record was not adopted"
    );
}

/// Ticks `m` every `step` ms over `span`, answering every aggregation it asks for: all it did.
fn tick_through(m: &mut RoundMachine, span: std::ops::Range<u64>, step: usize) -> Vec<Action> {
    let mut out = Vec::new();
    for t in span.step_by(step) {
        let actions = m.tick(t);
        out.extend(run_aggregations(m, t, &actions));
        out.extend(actions);
    }
    out
}

/// Node `k` alone commits round 1 of one adapter: the machine at 4 s, its announcement and
/// the record.
fn round_one_alone(k: &NodeKey) -> (RoundMachine, SignedAnnouncement, RoundRecord) {
    let mut a = machine(k);
    let mine = ann(k, 1, Hash::of(b"a1"), None, 0);
    a.handle(0, Event::LocalContribution(mine.clone()));
    let out = a.tick(3_000);
    run_aggregations(&mut a, 3_000, &out);
    let ours = commits(&a.tick(4_000))[0].0.clone();
    (a, mine, ours)
}

/// What a stand-in driver serves for a record fetch: the peers asked, the round and the
/// result asked for.
type RecordServer<'a> = dyn Fn(&[NodeId], u64, Hash) -> Option<SignedDigest> + 'a;

/// A stand-in for the driver: answers every fetch in `actions` at `now` (announcements
/// from `anns`, any blob as available but those in `lost`, which nobody serves, a record
/// request with what `serve` returns for the signers asked, the round and the result) and
/// runs every aggregation but those `hold` keeps back,
/// until nothing new is asked. Returns everything the machine did and the jobs held.
fn serve_all(
    m: &mut RoundMachine,
    now: u64,
    mut todo: Vec<Action>,
    anns: &[&SignedAnnouncement],
    serve: &RecordServer<'_>,
    hold: &dyn Fn(&AggregationJob) -> bool,
    lost: &[Hash],
) -> (Vec<Action>, Vec<AggregationJob>) {
    let (mut all, mut held) = (Vec::new(), Vec::new());
    for _ in 0..64 {
        if todo.is_empty() {
            break;
        }
        let mut next = Vec::new();
        for action in &todo {
            let event = match action {
                Action::FetchAnnouncement { id, .. } => anns
                    .iter()
                    .find(|a| a.id() == *id)
                    .map(|a| Event::Announcement((*a).clone())),
                Action::FetchBlob { hash, .. } | Action::FetchRoundAdapter { hash, .. }
                    if lost.contains(hash) =>
                {
                    Some(Event::FetchFailed {
                        hash: *hash,
                        reason: FetchFailure::Unavailable,
                    })
                }
                Action::FetchBlob { hash, .. } | Action::FetchRoundAdapter { hash, .. } => {
                    Some(Event::BlobAvailable { hash: *hash })
                }
                Action::FetchRecord {
                    tag,
                    round,
                    result,
                    from,
                } => {
                    // Those asked before the one that served (or all of them) served nothing.
                    let digest = serve(from, *round, *result);
                    let unanswered = from
                        .iter()
                        .take(8)
                        .take_while(|p| digest.as_ref().is_none_or(|d| d.signer != **p))
                        .copied()
                        .collect();
                    Some(Event::Record {
                        tag: *tag,
                        round: *round,
                        result: *result,
                        digest,
                        unanswered,
                    })
                }
                Action::Aggregate(job) if hold(job) => {
                    held.push(job.clone());
                    None
                }
                Action::Aggregate(job) => {
                    let adapters: Vec<Hash> = job.inputs.iter().map(|i| i.adapter).collect();
                    let result = fake_aggregate(job.parent, &adapters);
                    Some(Event::AggregationFinished {
                        job: job.clone(),
                        result,
                    })
                }
                _ => None,
            };
            if let Some(event) = event {
                next.extend(m.handle(now, event));
            }
        }
        all.append(&mut todo);
        todo = next;
    }
    all.extend(todo);
    (all, held)
}

/// Keys among an honest history's signers serve a false variant of its ancestor (the
/// same round and result, a forged weight; or a parent no history can have, which ends
/// the walk) before the honest signer can, or serve nothing while the driver asks only
/// the first few signers: each such key is refused (penalised for a false record) and the
/// ancestor is asked of the others, and the honest history is adopted. (Before, the false
/// link, or no answer from the first eight signers, dropped the candidate, so a few keys
/// could keep every node off an honest heavier history.)
#[test]
fn keys_among_the_signers_cannot_keep_a_node_off_an_honest_history() {
    #[derive(Debug)]
    enum Liar {
        Weight,
        ParentAtRoundOne,
        Silent,
    }
    let ka = key(1);
    let mine = ann(&ka, 1, Hash::of(b"a1"), None, 0);
    let (kx, ky, kz) = (key(5), key(6), key(7));
    let x = ann(&kx, 1, Hash::of(b"x"), None, 100);
    let y = ann(&ky, 1, Hash::of(b"y"), None, 100);
    let b1 = record(1, None, &[&x, &y], 2);
    let z = ann(&kz, 2, Hash::of(b"z"), Some(b1.result), 4_000);
    let b2 = record(2, Some(b1.result), &[&z], 3);
    // The honest signer sorts after every lying one, so it is asked last.
    let mut keys: Vec<NodeKey> = (20..45).map(key).collect();
    keys.sort_by_key(|k| k.node_id());
    let kb = keys.pop().expect("keys");
    for liar in [Liar::Weight, Liar::ParentAtRoundOne, Liar::Silent] {
        let (mut a, tip) = endorsed_round_one(&ka, &mine);
        let liars: Vec<&NodeKey> = match liar {
            Liar::Silent => keys.iter().take(17).collect(),
            _ => keys.iter().take(1).collect(),
        };
        let mut variant = b1.clone();
        match liar {
            Liar::Weight => variant.weight = 5,
            Liar::ParentAtRoundOne => variant.parent = Some(Hash::of(b"no such parent")),
            Liar::Silent => {}
        }
        let asked = std::cell::RefCell::new(Vec::new());
        // The driver: the first of (at most 8 of) the peers asked that serves.
        let serve = |from: &[NodeId], round: u64, _: Hash| {
            asked.borrow_mut().push(from.to_vec());
            assert_eq!(round, 1);
            from.iter().take(8).find_map(|p| {
                if *p == kb.node_id() {
                    return Some(digest(&kb, b1.clone(), true, 5_050));
                }
                let liar = liars.iter().find(|k| k.node_id() == *p)?;
                // A silent one serves nothing; the others their variant.
                (variant != b1).then(|| digest(liar, variant.clone(), true, 5_050))
            })
        };
        let mut todo = Vec::new();
        for k in liars.iter().copied().chain([&kb]) {
            todo.extend(a.handle(5_000, Event::Digest(digest(k, b2.clone(), true, 5_000))));
        }
        let mut out = Vec::new();
        for t in (5_000..8_000).step_by(100) {
            let (done, _) = serve_all(&mut a, t, todo, &[&x, &y, &z], &serve, &|_| false, &[]);
            out.extend(done);
            todo = a.tick(t + 100);
        }
        let penalised = penalties(&out);
        match liar {
            Liar::Weight => assert!(
                matches!(
                    penalised[..],
                    [(p, Misbehaviour::WrongWeight { round: 1, claimed: 5, expected: 2 })]
                        if p == liars[0].node_id()
                ),
                "{penalised:?}"
            ),
            _ => assert!(penalised.is_empty(), "{liar:?}: {penalised:?}"),
        }
        let asked = asked.into_inner();
        assert!(asked.len() >= 2, "{liar:?}: asked again: {asked:?}");
        assert!(
            asked.last().is_some_and(|from| from.contains(&kb.node_id())
                && !from.iter().any(|p| liars.iter().any(|k| k.node_id() == *p))),
            "{liar:?}: the last ask went to the honest signer alone: {asked:?}"
        );
        assert_eq!(
            commits(&out),
            vec![(b1.clone(), Some(tip.result)), (b2.clone(), None)],
            "{liar:?}"
        );
        assert_eq!(a.tip(), Some(&b2));
    }
}

/// A node that restarts behind, its tip round 1, hears an honest round 3 (from two
/// signers), which links to its tip through round 2, and a coalition's record far in the
/// future on a parent nobody can show (nothing links to it). It takes the coalition's word
/// neither before its tip has been alone for as long as linking may take, nor, after, while
/// a history it can check has as many signers: it adopts the honest rounds. (Before, two
/// signers outnumbered the nodes it knew on its chain, none after a restart, and the
/// coalition's record was adopted at once.)
#[test]
fn a_restarted_node_takes_the_history_it_can_check_over_a_coalitions_word() {
    let ka = key(1);
    let (_, _, a1) = round_one_alone(&ka);
    let (kb, kc, kd, ke) = (key(2), key(3), key(4), key(5));
    let h2 = ann(&kb, 2, Hash::of(b"h2"), Some(a1.result), 5_000);
    let b2 = record(2, Some(a1.result), &[&h2], a1.weight + 1);
    let h3 = ann(&kc, 3, Hash::of(b"h3"), Some(b2.result), 9_000);
    let b3 = record(3, Some(b2.result), &[&h3], b2.weight + 1);
    let made_up = Some(Hash::of(b"a parent nobody made"));
    let f = ann(&kd, 500, Hash::of(b"f"), made_up, 10_000);
    let forged = record(500, made_up, &[&f], 100_000);
    let mut m =
        RoundMachine::new(cfg(), model(), ka.node_id(), Some(a1.clone()), 10_000).expect("machine");
    let anns = [&h2, &h3, &f];
    let serve = |from: &[NodeId], round: u64, _: Hash| {
        assert_eq!(round, 2, "only the honest history is walked");
        let k = if from.contains(&kb.node_id()) {
            &kb
        } else {
            &kc
        };
        Some(digest(k, b2.clone(), true, 9_500))
    };
    let is_tip = |j: &AggregationJob| j.round == 3;
    let mut out = Vec::new();
    let mut held = Vec::new();
    // Just restarted: the coalition comes first.
    let mut todo = Vec::new();
    for (t, k) in [(10_100, &kd), (10_200, &ke)] {
        todo.extend(m.handle(t, Event::Digest(digest(k, forged.clone(), true, t))));
    }
    // The honest round arrives; its aggregation is slow.
    for (t, k) in [(11_000, &kb), (11_100, &kc)] {
        todo.extend(m.handle(t, Event::Digest(digest(k, b3.clone(), true, t))));
    }
    // Alone on round 1 for long (nobody else is on it any more), so it would take a
    // quorum's word: the coalition again.
    for (t, k) in [(16_500, &kd), (16_600, &ke)] {
        todo.extend(m.handle(t, Event::Digest(digest(k, forged.clone(), true, t))));
    }
    for t in (16_600..18_000).step_by(100) {
        let (done, jobs) = serve_all(&mut m, t, todo, &anns, &serve, &is_tip, &[]);
        out.extend(done);
        held.extend(jobs);
        todo = m.tick(t + 100);
    }
    assert!(
        !commits(&out).iter().any(|(r, _)| *r == forged),
        "took the coalition's word"
    );
    // The honest round's aggregation finishes: adopted, with round 2 below it.
    held.dedup();
    assert!(!held.is_empty(), "the honest round was verified");
    let finish: Vec<Action> = held.into_iter().map(Action::Aggregate).collect();
    let (done, _) = serve_all(&mut m, 18_000, finish, &anns, &serve, &|_| false, &[]);
    out.extend(todo);
    out.extend(done);
    // (Round 2 may be committed as the node's own: it follows the input it fetched to check
    // the link, and the record it makes of it is the same.)
    let adopted: Vec<RoundRecord> = commits(&out).into_iter().map(|(r, _)| r).collect();
    assert_eq!(adopted, vec![b2.clone(), b3.clone()]);
    assert_eq!(m.tip(), Some(&b3));
}

/// A key that sorts first among an honest history's signers serves a variant of an
/// ancestor (the same round and result) on a parent nobody has, and nothing for that
/// parent: only that key is refused (the honest signer, asked for a parent only the liar
/// vouched for, served nothing either), the ancestor is asked of the honest signer, and
/// the history is adopted. (Before, everyone asked for the made-up parent was refused, the
/// honest signer too, and the history dropped.)
#[test]
fn a_link_to_a_parent_nobody_has_costs_only_its_server() {
    let ka = key(1);
    let mine = ann(&ka, 1, Hash::of(b"a1"), None, 0);
    let (mut a, tip) = endorsed_round_one(&ka, &mine);
    let (kx, ky, kz) = (key(5), key(6), key(7));
    let x = ann(&kx, 1, Hash::of(b"x"), None, 100);
    let b1 = record(1, None, &[&x], 1);
    let y = ann(&ky, 2, Hash::of(b"y"), Some(b1.result), 2_000);
    let b2 = record(2, Some(b1.result), &[&y], 2);
    let z = ann(&kz, 3, Hash::of(b"z"), Some(b2.result), 3_000);
    let b3 = record(3, Some(b2.result), &[&z], 3);
    let (liar, honest) = liar_and_honest();
    let (liar, honest) = (&liar, &honest);
    let mut variant = b2.clone();
    variant.parent = Some(Hash::of(b"a parent nobody has"));
    let asked = std::cell::RefCell::new(Vec::new());
    // The driver: the first of the peers asked that serves.
    let serve = |from: &[NodeId], round: u64, result: Hash| {
        asked.borrow_mut().push((round, from.to_vec()));
        from.iter().take(8).find_map(|p| {
            let is_liar = *p == liar.node_id();
            match round {
                2 if is_liar => Some(digest(liar, variant.clone(), true, 5_050)),
                2 => Some(digest(honest, b2.clone(), true, 5_050)),
                1 if !is_liar && result == b1.result => {
                    Some(digest(honest, b1.clone(), true, 5_050))
                }
                _ => None,
            }
        })
    };
    let out = signed_and_walked(
        &mut a,
        &b3,
        [liar, honest],
        &[&x, &y, &z],
        &serve,
        &[],
        8_000,
    );
    let asked = asked.into_inner();
    assert!(
        asked
            .iter()
            .any(|(r, from)| *r == 1 && from.first() == Some(&liar.node_id())),
        "the liar, asked first for the parent it vouched for: {asked:?}"
    );
    assert!(
        asked
            .iter()
            .any(|(r, from)| *r == 1 && from == &vec![honest.node_id()]),
        "the honest signer asked for its own: {asked:?}"
    );
    assert_eq!(
        commits(&out),
        vec![
            (b1.clone(), Some(tip.result)),
            (b2.clone(), None),
            (b3.clone(), None)
        ]
    );
    assert_eq!(a.tip(), Some(&b3));
}

/// A new node (no tip) in a network older than it can link hears an honest record from two
/// signers and a far-ahead record from three keys that never serve its input (it stalls).
/// It takes the honest one on its signers' word: a stalled record with more signers does
/// not hold every catch-up off.
#[test]
fn a_stalled_record_with_more_signers_does_not_hold_a_new_node_off() {
    let kn = key(1);
    let mut m = machine(&kn);
    let (kb, kc) = (key(2), key(3));
    let h = ann(&kb, 100, Hash::of(b"h"), Some(Hash::of(b"round 99")), 1_000);
    let honest = record(100, Some(Hash::of(b"round 99")), &[&h], 500);
    let f = ann(
        &key(4),
        300,
        Hash::of(b"f"),
        Some(Hash::of(b"made up")),
        1_000,
    );
    let stalled = record(300, Some(Hash::of(b"made up")), &[&f], 100_000);
    let mut todo = Vec::new();
    for (t, k) in [(1_000, key(4)), (1_010, key(5)), (1_020, key(6))] {
        todo.extend(m.handle(t, Event::Digest(digest(&k, stalled.clone(), true, t))));
    }
    for (t, k) in [(1_100, &kb), (1_110, &kc)] {
        todo.extend(m.handle(t, Event::Digest(digest(k, honest.clone(), true, t))));
    }
    // Only the honest record's input is served.
    let none = |_: &[NodeId], _: u64, _: Hash| None;
    let mut out = Vec::new();
    for t in (1_200..4_000).step_by(100) {
        let (done, _) = serve_all(&mut m, t, todo, &[&h], &none, &|_| false, &[]);
        out.extend(done);
        todo = m.tick(t + 100);
    }
    assert_eq!(commits(&out), vec![(honest.clone(), None)]);
    assert_eq!(m.tip(), Some(&honest));
}

/// A key that sorts first among an honest history's signers serves, for its parent, a
/// variant naming an input of its own that nobody serves. The failed fetch counts against
/// that key (the link's server) and the input's contributor, not against the candidate's
/// other signers, so the honest signer is then asked and shows the history, which is
/// adopted. (Before, the adapter was asked of every signer, all were marked as having
/// failed to serve, and the honest signer's link then failed at once: the history was
/// dropped.)
#[test]
fn an_input_nobody_serves_in_a_liars_link_costs_the_honest_signers_nothing() {
    let ka = key(1);
    let mine = ann(&ka, 1, Hash::of(b"a1"), None, 0);
    let (mut a, _) = endorsed_round_one(&ka, &mine);
    let (kx, ky) = (key(5), key(6));
    let x = ann(&kx, 1, Hash::of(b"x"), None, 100);
    let b1 = record(1, None, &[&x], 1);
    let y = ann(&ky, 2, Hash::of(b"y"), Some(b1.result), 2_000);
    let b2 = record(2, Some(b1.result), &[&y], 2);
    let (liar, honest) = liar_and_honest();
    let (liar, honest) = (&liar, &honest);
    let fake = ann(liar, 1, Hash::of(b"an adapter nobody has"), None, 100);
    let mut variant = record(1, None, &[&fake], 1);
    variant.result = b1.result;
    let serve = |from: &[NodeId], round: u64, _: Hash| {
        assert_eq!(round, 1);
        from.first().map(|p| {
            if *p == liar.node_id() {
                digest(liar, variant.clone(), true, 5_050)
            } else {
                digest(honest, b1.clone(), true, 5_050)
            }
        })
    };
    let anns = [&x, &y, &fake];
    let lost = [fake.adapter];
    let out = signed_and_walked(&mut a, &b2, [liar, honest], &anns, &serve, &lost, 9_000);
    // (The node may first commit a round 2 of its own with the input it fetched.)
    let adopted: Vec<RoundRecord> = commits(&out).into_iter().map(|(r, _)| r).collect();
    assert!(adopted.ends_with(&[b1.clone(), b2.clone()]), "{adopted:?}");
    assert_eq!(a.tip(), Some(&b2));
}

/// A key that sorts first among an honest history's signers announces the honest
/// ancestor's adapters as its own (under two user ids) and serves, for that ancestor, a
/// variant naming its announcements: the same result, a lighter weight, every check of its
/// own passed. The honest candidate then disagrees with the variant's weight, but a result
/// does not fix its record's weight, so nobody is penalised for that: the key that served
/// the variant is not asked again, the honest signer shows the honest ancestor, and the
/// history is adopted. (Before, every signer of the honest candidate was penalised for a
/// wrong weight, the honest one too.)
#[test]
fn a_lighter_variant_of_an_ancestor_gets_no_honest_signer_penalised() {
    let ka = key(1);
    let mine = ann(&ka, 1, Hash::of(b"a1"), None, 0);
    let (mut a, _) = endorsed_round_one(&ka, &mine);
    let (kx, ky, kz) = (key(5), key(6), key(7));
    let x = ann(&kx, 1, Hash::of(b"x"), None, 100);
    let y = ann(&ky, 1, Hash::of(b"y"), None, 100);
    let b1 = record(1, None, &[&x, &y], 2);
    let z = ann(&kz, 2, Hash::of(b"z"), Some(b1.result), 2_000);
    let b2 = record(2, Some(b1.result), &[&z], 3);
    let (liar, honest) = liar_and_honest();
    let (liar, honest) = (&liar, &honest);
    let stolen = |of: &SignedAnnouncement, user: &str| {
        let mut a = of.payload().clone();
        a.contributor = liar.node_id();
        a.user_id = Some(user.to_string());
        Signed::sign(a, liar).expect("sign")
    };
    let (x2, y2) = (stolen(&x, "u1"), stolen(&y, "u2"));
    let variant = record(1, None, &[&x2, &y2], 1);
    assert_eq!(variant.result, b1.result, "the same result");
    let serve = |from: &[NodeId], round: u64, _: Hash| {
        assert_eq!(round, 1);
        from.first().map(|p| {
            if *p == liar.node_id() {
                digest(liar, variant.clone(), true, 5_050)
            } else {
                digest(honest, b1.clone(), true, 5_050)
            }
        })
    };
    let anns = [&x, &y, &z, &x2, &y2];
    let out = signed_and_walked(&mut a, &b2, [liar, honest], &anns, &serve, &[], 9_000);
    let penalised: Vec<NodeId> = penalties(&out).into_iter().map(|(p, _)| p).collect();
    assert!(
        !penalised.contains(&honest.node_id()),
        "{:?}",
        penalties(&out)
    );
    let adopted: Vec<RoundRecord> = commits(&out).into_iter().map(|(r, _)| r).collect();
    assert!(adopted.ends_with(&[b1.clone(), b2.clone()]), "{adopted:?}");
    assert_eq!(a.tip(), Some(&b2));
}

/// A key that sorts first among an honest history's signers serves, for the candidate's
/// parent, a variant claiming one more weight than its inputs give, and then nothing for
/// that variant's parent, which the honest signer shows. The two links disagree; the key
/// did not back its own link, so it is the one not asked again: the honest signer shows the
/// history and it is adopted, with nobody honest penalised. (Before, the server of the lower
/// link, the honest one, was refused; the key then served nothing, and the honest history
/// was dropped as one nobody shows.)
#[test]
fn a_heavier_variant_whose_server_hides_its_parent_costs_only_that_server() {
    let ka = key(1);
    let mine = ann(&ka, 1, Hash::of(b"a1"), None, 0);
    let (mut a, tip) = endorsed_round_one(&ka, &mine);
    let (anns, [b1, b2, b3]) = three_rounds_of_another_chain();
    let anns: Vec<&SignedAnnouncement> = anns.iter().collect();
    let (liar, honest) = liar_and_honest();
    let (liar, honest) = (&liar, &honest);
    let mut heavier = b2.clone();
    heavier.weight += 1;
    let serve = |from: &[NodeId], round: u64, _: Hash| {
        from.iter().take(8).find_map(|p| {
            let is_liar = *p == liar.node_id();
            match round {
                2 if is_liar => Some(digest(liar, heavier.clone(), true, 5_050)),
                2 => Some(digest(honest, b2.clone(), true, 5_050)),
                1 if !is_liar => Some(digest(honest, b1.clone(), true, 5_050)),
                _ => None,
            }
        })
    };
    let out = signed_and_walked(&mut a, &b3, [liar, honest], &anns, &serve, &[], 9_000);
    let penalised: Vec<NodeId> = penalties(&out).into_iter().map(|(p, _)| p).collect();
    assert!(
        !penalised.contains(&honest.node_id()),
        "{:?}",
        penalties(&out)
    );
    let adopted: Vec<(RoundRecord, Option<Hash>)> = commits(&out);
    assert_eq!(
        adopted,
        vec![
            (b1.clone(), Some(tip.result)),
            (b2.clone(), None),
            (b3.clone(), None)
        ]
    );
    assert_eq!(a.tip(), Some(&b3));
}

/// Sixteen keys each publish a record far ahead on a parent nobody can show (one signer
/// each, nothing links to it). A node with company takes no one's word, so it does not
/// keep them waiting for a quorum: they do not fill the candidate slots, and an honest
/// heavier record that arrives after them is adopted. (Before, they held all 16 slots for
/// good, and no switch or catch-up could enter.)
#[test]
fn keys_publishing_unlinkable_records_cannot_fill_the_candidate_slots() {
    let ka = key(1);
    let mine = ann(&ka, 1, Hash::of(b"a1"), None, 0);
    let (mut a, tip) = endorsed_round_one(&ka, &mine);
    for n in 0..16u8 {
        let k = key(100 + n);
        let made_up = Some(Hash::of(&[b"made up".as_slice(), &[n]].concat()));
        let f = ann(
            &k,
            300,
            Hash::of(&[b"f".as_slice(), &[n]].concat()),
            made_up,
            4_600,
        );
        let r = record(300, made_up, &[&f], 10_000);
        a.handle(4_600, Event::Digest(digest(&k, r, true, 4_600)));
    }
    // A heavier round 1 (a switch).
    let (kx, kb) = (key(5), key(2));
    let x = ann(&kx, 1, Hash::of(b"x"), None, 100);
    let y = ann(&key(6), 1, Hash::of(b"y"), None, 100);
    let heavier = record(1, None, &[&x, &y], tip.weight + 1);
    let todo = a.handle(
        4_800,
        Event::Digest(digest(&kb, heavier.clone(), true, 4_800)),
    );
    let none = |_: &[NodeId], _: u64, _: Hash| None;
    let (out, _) = serve_all(&mut a, 4_900, todo, &[&x, &y], &none, &|_| false, &[]);
    let adopted: Vec<RoundRecord> = commits(&out).into_iter().map(|(r, _)| r).collect();
    assert!(adopted.contains(&heavier), "{adopted:?}");
}

/// Keys flood the current round with their own announcements until it is full. An honest
/// history whose ancestor is of that round still gets that ancestor's input kept when it is
/// fetched to check it, so the history is adopted and its server not refused. (Before, the
/// fetched announcement was refused as one of a full round, its server was taken not to show
/// it and refused, and the honest history was dropped as one nobody shows.)
#[test]
fn a_round_flooded_by_gossip_still_has_room_for_an_honest_records_inputs() {
    let ka = key(1);
    let mine = ann(&ka, 1, Hash::of(b"a1"), None, 0);
    let (mut a, tip) = endorsed_round_one(&ka, &mine);
    for k in 50..58u8 {
        let flooder = key(k);
        for i in 0..128u32 {
            let adapter = Hash::of(&[b"flood".as_slice(), &[k], &i.to_le_bytes()].concat());
            let f = ann(&flooder, 2, adapter, Some(tip.result), 4_600);
            a.handle(4_600, Event::Announcement(f));
        }
    }
    let one_more = ann(&key(59), 2, Hash::of(b"one more"), Some(tip.result), 4_600);
    assert_eq!(
        verdicts(&a.handle(4_600, Event::Announcement(one_more))),
        vec![Verdict::Ignore(Ignored::RoundFull { round: 2 })],
        "the round is full"
    );
    let (anns, [b1, b2, b3]) = three_rounds_of_another_chain();
    let anns: Vec<&SignedAnnouncement> = anns.iter().collect();
    let (kp, kq) = liar_and_honest();
    let serve = |from: &[NodeId], round: u64, _: Hash| {
        let k = if from.first() == Some(&kp.node_id()) {
            &kp
        } else {
            &kq
        };
        match round {
            2 => Some(digest(k, b2.clone(), true, 5_050)),
            1 => Some(digest(k, b1.clone(), true, 5_050)),
            _ => None,
        }
    };
    let out = signed_and_walked(&mut a, &b3, [&kp, &kq], &anns, &serve, &[], 6_900);
    assert_eq!(
        commits(&out),
        vec![
            (b1.clone(), Some(tip.result)),
            (b2.clone(), None),
            (b3.clone(), None)
        ]
    );
    assert!(penalties(&out).is_empty(), "{:?}", penalties(&out));
}

/// A new node takes two keys' word for a record far ahead, fetches its input and finds its
/// result false. What it kept of it goes: the announcement at once (another record naming
/// it has it fetched again), and the digests' ids once a few rounds have passed (the same
/// digest is no duplicate then). (Before, both were kept until the node reached that round,
/// for good when it is far enough: keys signing such records grew them without bound.)
#[test]
fn what_is_heard_for_rounds_far_ahead_is_forgotten() {
    let ka = key(1);
    let mut a = machine(&ka);
    let made_up = Some(Hash::of(b"made up"));
    let f = ann(&key(4), 1_000, Hash::of(b"f"), made_up, 0);
    let mut far = record(1_000, made_up, &[&f], 600);
    far.result = Hash::of(b"not what its input gives");
    let none = |_: &[NodeId], _: u64, _: Hash| None;
    let signed = |a: &mut RoundMachine, keys: [u8; 2], t: u64| {
        let d = digest(&key(keys[0]), far.clone(), true, t);
        let mut todo = a.handle(t, Event::Digest(d.clone()));
        todo.extend(a.handle(
            t,
            Event::Digest(digest(&key(keys[1]), far.clone(), true, t)),
        ));
        (d, todo)
    };
    let (d4, todo) = signed(&mut a, [4, 5], 10);
    assert!(fetched_announcements(&todo).contains(&f.id()));
    let (out, _) = serve_all(&mut a, 20, todo, &[&f], &none, &|_| false, &[]);
    let penalised: BTreeSet<NodeId> = penalties(&out).into_iter().map(|(p, _)| p).collect();
    assert_eq!(
        penalised,
        BTreeSet::from([key(4).node_id(), key(5).node_id()])
    );
    assert_eq!(
        verdicts(&a.handle(30, Event::Digest(d4.clone()))),
        vec![Verdict::Ignore(Ignored::Duplicate)]
    );
    let (_, todo) = signed(&mut a, [6, 7], 40);
    assert!(
        fetched_announcements(&todo).contains(&f.id()),
        "the announcement of a record found false was kept"
    );
    // Rounds go by, the node alone.
    let mut t = 1_000;
    while a.current_round() < 6 {
        let r = a.current_round();
        let adapter = Hash::of(&r.to_le_bytes());
        let mine = ann(&ka, r, adapter, a.current_parent(), t);
        a.handle(t, Event::LocalContribution(mine));
        while a.current_round() == r {
            t += 100;
            assert!(t < 60_000, "round {r} did not commit");
            let actions = a.tick(t);
            run_aggregations(&mut a, t, &actions);
        }
    }
    assert_ne!(
        verdicts(&a.handle(t, Event::Digest(d4))),
        vec![Verdict::Ignore(Ignored::Duplicate)],
        "the digest's id was kept"
    );
}

/// A history checked as the ancestry of a record that then fails (rounds 1 to 3 of another
/// chain), one of whose checked records is then forgotten (a record built on its round 1
/// claims a weight it cannot have), and a record on its round 3 that arrives after: it is
/// adopted only with the rounds below it, never with a hole where round 1 was (round 2
/// committed on a round 1 the node never had). (Before, rounds 2 to 4 were committed over
/// the node's own round 1.)
#[test]
fn a_history_is_never_adopted_with_a_hole() {
    let ka = key(1);
    let (mut a, _, a1, _) = two_rounds_alone(&ka);
    let (mut anns, [l0, l1, l2]) = three_rounds_of_another_chain();
    let v = ann(&key(5), 4, Hash::of(b"v4"), Some(l2.result), 4_000);
    let mut false_result = record(4, Some(l2.result), &[&v], 5);
    false_result.result = Hash::of(b"not what its input gives");
    let w = ann(&key(8), 2, Hash::of(b"w"), Some(l0.result), 2_000);
    let mut false_weight = record(2, Some(l0.result), &[&w], 3);
    false_weight.weight = 500;
    let u = ann(&key(6), 4, Hash::of(b"u"), Some(l2.result), 4_000);
    let honest = record(4, Some(l2.result), &[&u], 5);
    let (kp, kq, kr, ks) = (key(30), key(31), key(32), key(33));
    // Everyone serves the history but the signer of the false weight, who serves nothing.
    let serve = |from: &[NodeId], round: u64, _: Hash| {
        let k = [&kp, &kq, &ks]
            .into_iter()
            .find(|k| from.contains(&k.node_id()))?;
        let r = [&l0, &l1, &l2].into_iter().find(|r| r.round == round)?;
        Some(digest(k, r.clone(), true, 8_300))
    };
    anns.extend([v, w.clone(), u]);
    let anns: Vec<&SignedAnnouncement> = anns.iter().collect();
    let mut todo = Vec::new();
    for k in [&kp, &kq] {
        let d = digest(k, false_result.clone(), true, 8_300);
        todo.extend(a.handle(8_300, Event::Digest(d)));
    }
    let mut out = Vec::new();
    for t in (8_300..9_000).step_by(100) {
        let (done, _) = serve_all(&mut a, t, todo, &anns, &serve, &|_| false, &[]);
        out.extend(done);
        todo = a.tick(t + 100);
    }
    assert!(
        penalties(&out).len() == 2,
        "the false result: {:?}",
        penalties(&out)
    );
    let d = digest(&kr, false_weight.clone(), true, 9_000);
    todo.extend(a.handle(9_000, Event::Digest(d)));
    todo.extend(a.handle(
        9_100,
        Event::Digest(digest(&ks, honest.clone(), true, 9_100)),
    ));
    for t in (9_100..11_000).step_by(100) {
        let (done, _) = serve_all(&mut a, t, todo, &anns, &serve, &|_| false, &[]);
        out.extend(done);
        todo = a.tick(t + 100);
    }
    let committed: Vec<RoundRecord> = commits(&out).into_iter().map(|(r, _)| r).collect();
    // Each committed record follows the one before it (or our round 1, for a round 2).
    let mut below = a1.clone();
    for r in &committed {
        if r.round > 1 {
            assert_eq!(
                r.parent,
                Some(below.result),
                "a hole below {r:?}: {committed:?}"
            );
        }
        below = r.clone();
    }
    assert_eq!(
        committed,
        vec![l0.clone(), l1.clone(), l2.clone(), honest.clone()]
    );
    assert_eq!(a.tip(), Some(&honest));
}

/// Rounds 1 to 3 of another chain (round 1 of two contributing nodes, then one each): their
/// announcements and records.
fn three_rounds_of_another_chain() -> (Vec<SignedAnnouncement>, [RoundRecord; 3]) {
    let (kx, ky, kz) = (key(5), key(6), key(7));
    let x = ann(&kx, 1, Hash::of(b"x"), None, 100);
    let y = ann(&ky, 1, Hash::of(b"y"), None, 100);
    let b1 = record(1, None, &[&x, &y], 2);
    let z = ann(&kz, 2, Hash::of(b"z"), Some(b1.result), 2_000);
    let b2 = record(2, Some(b1.result), &[&z], 3);
    let v = ann(&kx, 3, Hash::of(b"v"), Some(b2.result), 3_000);
    let b3 = record(3, Some(b2.result), &[&v], 4);
    (vec![x, y, z, v], [b1, b2, b3])
}

/// Two keys that sign a history, ordered so that the first (the liar in a test) is asked
/// before the second (the honest signer).
fn liar_and_honest() -> (NodeKey, NodeKey) {
    let mut keys: Vec<NodeKey> = (20..30).map(key).collect();
    keys.sort_by_key(|k| k.node_id());
    let honest = keys.swap_remove(9);
    (keys.swap_remove(0), honest)
}

/// `signers` publish `record` (committed) to `a` at 5 s, and the machine is driven until
/// `end` ms with [`serve_all`]: everything it did.
fn signed_and_walked(
    a: &mut RoundMachine,
    record: &RoundRecord,
    signers: [&NodeKey; 2],
    anns: &[&SignedAnnouncement],
    serve: &RecordServer<'_>,
    lost: &[Hash],
    end: u64,
) -> Vec<Action> {
    let mut todo = Vec::new();
    for k in signers {
        todo.extend(a.handle(5_000, Event::Digest(digest(k, record.clone(), true, 5_000))));
    }
    let mut out = Vec::new();
    for t in (5_000..end).step_by(100) {
        let (done, _) = serve_all(a, t, todo, anns, serve, &|_| false, lost);
        out.extend(done);
        todo = a.tick(t + 100);
    }
    out
}

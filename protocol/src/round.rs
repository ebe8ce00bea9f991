//! The round state machine: sans-I/O agreement on one round adapter per round.
//!
//! A [`RoundMachine`] is fed [`Event`]s and the current time, and answers with
//! [`Action`]s. It never touches the network, the disk or a clock; the `node` crate
//! drives it from its libp2p event loop, the simulator ([`crate::sim`]) from a virtual
//! event queue.
//!
//! ```text
//!   gossip / fetch results / aggregator / timer          actions
//!   ───────────────────────────────────────────▶ RoundMachine ──────────▶ driver
//!     Announcement, Digest, BlobAvailable,        handle(now, ev)     Verdict, FetchBlob,
//!     FetchFailed, AggregationFinished,           tick(now)           FetchAnnouncement,
//!     LocalContribution, CloseNow                                     Aggregate, Publish*,
//!                                                                     Commit, Penalise
//! ```
//!
//! Messages come in already decoded by [`crate::Signed::decode`]: signature, version,
//! domain and size caps are the caller's checks (it scores the gossip source down when
//! decoding fails, and reports an undecodable *fetched* announcement as
//! [`FetchFailure::Invalid`]). The machine checks everything that needs protocol state:
//! model id, round, duplicates, equivocation, what digests name, weights and results.
//!
//! # Lifecycle of round `n`
//!
//! * **Open**: when round `n-1` commits (or at start, after the last committed record),
//!   with `parent` = round `n-1`'s result. The collection window ends `window_ms` later.
//! * **Collect**: valid announcements for round `n` join the pool and their adapters are
//!   fetched. Announcements for up to `lookahead_rounds` later rounds are kept for later.
//! * **Close**: at the window's end once `min_inputs` contributors are in the pool; early
//!   on [`Event::CloseNow`] (a gateway); or when a digest for round `n` arrives whose every
//!   input is a valid announcement we hold (nodes follow the first closer; a digest
//!   naming junk never closes a window).
//! * **Aggregate**: over the canonical selection (per contributor key, the lowest adapter
//!   hash whose blob is held; sorted by adapter hash) once no fetch is pending. Each
//!   result is published as an in-progress digest after a node-specific delay (skipped
//!   when three identical digests were already heard).
//! * **Reconcile**: a digest for round `n` naming inputs we lack makes us fetch their
//!   announcements (validated like gossip) and adapters, and recompute over the union.
//!   Inputs keep arriving until commit.
//! * **Commit**: once the inputs have been stable for `grace_ms` (counted from the close
//!   at the earliest), nothing is pending and the aggregate is known. Round `n+1` opens.
//!
//! # Fork choice, catch-up, rewind
//!
//! Every record carries a chain *weight*: its parent's weight plus its contributors. The
//! preferred record is the heaviest, then the one with the lowest result hash
//! ([`RoundRecord::beats`]); for two records of one round and parent that is "most
//! contributors, then lowest hash". After commit, a node republishes its tip as a
//! *committed* digest every `heartbeat_ms` (trickle style: skipped when it heard three
//! identical copies in the period). Any committed record that beats our tip becomes a
//! *candidate*: a heavier record of our round (switch), of a later round (catch-up after
//! a restart or a partition) or of an earlier round (rewind: we ran ahead on a light
//! fork). A candidate is adopted only after complete re-verification: every named
//! announcement fetched and valid for that round, at most one input per contributor,
//! every adapter fetched, the aggregation recomputed to the same result. When its parent
//! is a round of our own chain, its weight is checked exactly; otherwise (another
//! history) `catch_up_quorum` distinct signers must have published it, and its weight is
//! taken on their word. A node whose tip nobody else endorses for two heartbeat periods
//! yields to a quorum-endorsed record even when lighter, so that a lone node on a heavier
//! fork (which nobody can verify without a quorum) rejoins the network.
//!
//! In-progress digests only feed reconciliation; only committed records are candidates
//! (an in-progress record may never be committed by anyone). A peer caught misbehaving
//! is penalised, and its digests are ignored for the rest of that round and the next.

use std::collections::{BTreeMap, BTreeSet};

use crate::{
    Hash, ModelId, NodeId, RoundDigest, RoundInput, RoundRecord, RuleId, SignedAnnouncement,
    SignedDigest, MAX_ROUND_INPUTS,
};

/// Digests identical to our tip heard in one heartbeat period that make us skip ours.
const HEARTBEAT_REDUNDANCY: usize = 3;
/// Rounds of our own chain remembered for fork choice (results and weights).
const CHAIN_MEMORY: usize = 64;
/// Most foreign records under consideration at once.
const MAX_CANDIDATES: usize = 16;
/// Most announcement fetches in flight.
const MAX_REQUESTS: usize = 4 * MAX_ROUND_INPUTS;
/// Most signers whose current-round digests are kept.
const MAX_DIGEST_SIGNERS: usize = 4096;
/// Most announcements kept for one round (equivocations and re-announcements included).
const MAX_ANNOUNCEMENTS_PER_ROUND: usize = 2 * MAX_ROUND_INPUTS;

/// Timing and policy of the round machine. Every node of a network should use the same
/// `window_ms`, `min_inputs` and `rule`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoundConfig {
    /// Collection window, from the round's opening.
    pub window_ms: u64,
    /// Commit once the input set has been stable this long after closing.
    pub grace_ms: u64,
    /// Contributors needed before the window may close on its own.
    pub min_inputs: usize,
    /// Time to wait for one fetch attempt.
    pub fetch_timeout_ms: u64,
    /// Fetch attempts before an adapter or announcement counts as unavailable.
    pub fetch_attempts: u32,
    /// Period of tip-digest republication.
    pub heartbeat_ms: u64,
    /// Announcements stamped further than this in the future are ignored.
    pub max_clock_skew_ms: u64,
    /// Announcements for up to this many rounds after the current one are kept.
    pub lookahead_rounds: u64,
    /// Distinct signers a record from another history needs before it is verified.
    pub catch_up_quorum: usize,
    /// The aggregation rule of this network.
    pub rule: RuleId,
}

impl Default for RoundConfig {
    /// Production timing: one-hour rounds.
    fn default() -> Self {
        RoundConfig {
            window_ms: 60 * 60 * 1000,
            grace_ms: 5 * 60 * 1000,
            min_inputs: 1,
            fetch_timeout_ms: 2 * 60 * 1000,
            fetch_attempts: 3,
            heartbeat_ms: 60 * 1000,
            max_clock_skew_ms: 5 * 60 * 1000,
            lookahead_rounds: 2,
            catch_up_quorum: 2,
            rule: RuleId::FEDAVG,
        }
    }
}

impl RoundConfig {
    /// Timing for tests and the simulator: seconds instead of hours.
    pub fn testing() -> Self {
        RoundConfig {
            window_ms: 3_000,
            grace_ms: 1_000,
            fetch_timeout_ms: 1_000,
            heartbeat_ms: 1_000,
            max_clock_skew_ms: 5_000,
            ..RoundConfig::default()
        }
    }
}

/// Something that happened, told to [`RoundMachine::handle`].
#[derive(Clone, Debug)]
pub enum Event {
    /// An announcement from gossip, or one the machine asked for with
    /// [`Action::FetchAnnouncement`] (decoded by the driver with `Signed::decode`).
    Announcement(SignedAnnouncement),
    /// This node's own new adapter (or a gateway upload), signed by this node. Its blob
    /// must already be in the local store. The machine answers with
    /// [`Action::PublishAnnouncement`] when it is accepted. At most one adapter per
    /// (node, user id) per round: a second one is refused with
    /// `Verdict::Reject(Misbehaviour::Equivocation)` and not published (offer it in the
    /// next round); one for another round than the current is refused as `Late` or
    /// `TooFarAhead`.
    LocalContribution(SignedAnnouncement),
    /// A round digest from gossip.
    Digest(SignedDigest),
    /// An adapter blob is in the local store, its hash verified.
    BlobAvailable {
        /// blake3 of the blob.
        hash: Hash,
    },
    /// A requested blob or announcement could not be had from any listed peer.
    FetchFailed {
        /// The blob hash or announcement id.
        hash: Hash,
        /// Why.
        reason: FetchFailure,
    },
    /// The aggregator finished a job from [`Action::Aggregate`].
    AggregationFinished {
        /// The job, as it was asked for.
        job: AggregationJob,
        /// blake3 of the resulting round adapter (already in the local store).
        result: Hash,
    },
    /// Close the current round's window now (a gateway's explicit aggregate request).
    CloseNow,
}

/// Why a fetch failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FetchFailure {
    /// No listed peer had it (or none answered in time).
    Unavailable,
    /// A peer served bytes with the right hash that do not decode as a valid signed
    /// announcement. Whoever named it misbehaved.
    Invalid,
}

/// One adapter of an aggregation job, with its FedAvg weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AggregateInput {
    /// blake3 of the adapter.
    pub adapter: Hash,
    /// Training samples from its announcement.
    pub samples: u64,
}

/// What to aggregate. The aggregator must be deterministic in exactly these fields, and
/// its output must bind `round` and `parent` (the real one writes them into the round
/// adapter's metadata), so a result hash identifies its place in the chain.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AggregationJob {
    /// The round.
    pub round: u64,
    /// The previous round's result (`None`: base model).
    pub parent: Option<Hash>,
    /// The rule.
    pub rule: RuleId,
    /// Inputs, strictly ascending by adapter hash.
    pub inputs: Vec<AggregateInput>,
}

/// What the driver must do.
#[derive(Clone, Debug)]
pub enum Action {
    /// The outcome for one message event (for gossipsub manual validation: `Accept`
    /// propagates, `Ignore` drops silently, `Reject` drops and scores the source down).
    /// For fetched announcements and local contributions it is informational.
    Verdict {
        /// Message id (blake3 of its envelope).
        id: Hash,
        /// The outcome.
        verdict: Verdict,
    },
    /// Fetch an adapter blob, verify its hash, store it, then report
    /// [`Event::BlobAvailable`] (or [`Event::FetchFailed`] after trying every peer).
    FetchBlob {
        /// blake3 of the blob.
        hash: Hash,
        /// Peers known to hold it, best first.
        from: Vec<NodeId>,
    },
    /// Fetch an announcement's envelope bytes by id, verify the hash, store them, decode
    /// them with `Signed::decode` and report [`Event::Announcement`] (or
    /// [`Event::FetchFailed`], with [`FetchFailure::Invalid`] when they do not decode).
    FetchAnnouncement {
        /// The announcement id.
        id: Hash,
        /// Peers that named it.
        from: Vec<NodeId>,
    },
    /// Run the aggregation (off the network task) and report
    /// [`Event::AggregationFinished`] with the same job.
    Aggregate(AggregationJob),
    /// Gossip this node's announcement (and store its bytes).
    PublishAnnouncement(SignedAnnouncement),
    /// Sign this digest with the node key and gossip it on the digest topic.
    PublishDigest(RoundDigest),
    /// Persist `record` as the committed record of its round, and use its result as the
    /// base for training the next round.
    Commit {
        /// The committed record.
        record: RoundRecord,
        /// When it replaces the record we had committed for that round (a fork-choice
        /// switch or a rewind): that record's result. When `record.round` is below the
        /// previous tip's round, our records of the later rounds are orphaned.
        replaces: Option<Hash>,
    },
    /// Lower this peer's score: it signed something provably wrong.
    Penalise {
        /// The offender.
        peer: NodeId,
        /// What it did.
        reason: Misbehaviour,
    },
}

/// The outcome for one received message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Valid and useful (propagate).
    Accept,
    /// Not useful, not the sender's fault (do not propagate).
    Ignore(Ignored),
    /// The signer misbehaved (do not propagate; a [`Action::Penalise`] follows).
    Reject(Misbehaviour),
}

/// Why a message was ignored.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Ignored {
    /// Seen before (a replay of the same bytes, or gossip duplication).
    Duplicate,
    /// Our own digest coming back.
    Own,
    /// A local contribution not signed by this node.
    NotOurs,
    /// For a round that is already committed here.
    Late {
        /// The message's round.
        round: u64,
        /// Our current round.
        current: u64,
    },
    /// For a round too far ahead to buffer (a lagging node catches up through digests).
    TooFarAhead {
        /// The message's round.
        round: u64,
        /// Our current round.
        current: u64,
    },
    /// Timestamped beyond the allowed clock skew.
    FromTheFuture {
        /// The message's time.
        time_ms: u64,
        /// Our time.
        now_ms: u64,
    },
    /// A digest for another aggregation rule.
    OtherRule {
        /// Its rule.
        rule: RuleId,
    },
    /// A committed record that loses to our tip under fork choice.
    ForkLost {
        /// The round.
        round: u64,
    },
    /// A digest from a peer penalised this round or the last one.
    Banned,
    /// An in-progress digest for a round we committed or have not reached: only
    /// committed records are candidates for fork choice and catch-up.
    NotCommitted,
    /// The round already holds as many announcements as we keep.
    RoundFull {
        /// The round.
        round: u64,
    },
}

/// Provable misbehaviour of a signer.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Misbehaviour {
    /// Signed a message for another network.
    WrongModel {
        /// The model id it named.
        got: ModelId,
    },
    /// Announced two different adapters for one round (the lowest hash is used).
    Equivocation {
        /// The round.
        round: u64,
        /// The adapter we knew.
        first: Hash,
        /// The new one.
        second: Hash,
    },
    /// Named an announcement (in a digest) whose bytes are not a valid announcement.
    NamedInvalidAnnouncement {
        /// The announcement id.
        id: Hash,
    },
    /// Named an announcement for another round or adapter than it claimed.
    NamedMismatchedAnnouncement {
        /// The announcement id.
        id: Hash,
    },
    /// Listed two inputs of one contributor in one round record.
    DuplicateContributor {
        /// The round.
        round: u64,
    },
    /// Signed a record whose chain weight does not follow from its parent's.
    WrongWeight {
        /// The round.
        round: u64,
        /// The weight it signed.
        claimed: u64,
        /// The parent's weight plus its contributors.
        expected: u64,
    },
    /// Signed a result that recomputation does not reproduce.
    WrongResult {
        /// The round.
        round: u64,
        /// The result it signed.
        claimed: Hash,
        /// The result we computed from its inputs.
        computed: Hash,
    },
}

/// Where the current round is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Collecting announcements inside the window.
    Collecting,
    /// Window closed: aggregating, reconciling, waiting out the grace period.
    Closed,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum BlobState {
    Held,
    Fetching { deadline: u64, attempts: u32 },
    Failed,
}

#[derive(Clone, Debug)]
struct Blob {
    state: BlobState,
    sources: BTreeSet<NodeId>,
}

#[derive(Clone, Debug)]
struct AnnRequest {
    /// What each namer claimed the announcement is: (round, adapter).
    claims: BTreeMap<NodeId, (u64, Hash)>,
    /// Round used for pruning and for "pending" (the first claim's round).
    round: u64,
    deadline: u64,
    attempts: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Selection {
    inputs: Vec<RoundInput>,
    job_inputs: Vec<AggregateInput>,
    pending: bool,
}

#[derive(Clone, Debug)]
struct Computed {
    inputs: Vec<RoundInput>,
    job: AggregationJob,
    result: Hash,
}

#[derive(Clone, Debug)]
struct Current {
    round: u64,
    parent: Option<Hash>,
    window_end: u64,
    closed: bool,
    close_requested: bool,
    last_change: u64,
    selection: Selection,
    requested: Option<(AggregationJob, Vec<RoundInput>)>,
    computed: Option<Computed>,
    published: bool,
    digests: BTreeMap<NodeId, SignedDigest>,
    /// Ids of the distinct records reconciled so far.
    reconciled: BTreeSet<Hash>,
    /// Distinct contributors in the pool (derived, refreshed when dirty).
    pool: usize,
    /// The job for the current selection (derived).
    job: Option<AggregationJob>,
    /// `computed` is the result of `job` (derived).
    done: bool,
    /// When to publish the digest of `computed`.
    publish_at: Option<u64>,
}

impl Current {
    fn open(round: u64, parent: Option<Hash>, now: u64, window_ms: u64) -> Self {
        Current {
            round,
            parent,
            window_end: now.saturating_add(window_ms),
            closed: false,
            close_requested: false,
            last_change: now,
            selection: Selection::default(),
            requested: None,
            computed: None,
            published: false,
            digests: BTreeMap::new(),
            reconciled: BTreeSet::new(),
            pool: 0,
            job: None,
            done: false,
            publish_at: None,
        }
    }
}

#[derive(Clone, Debug)]
struct Candidate {
    record: RoundRecord,
    signers: BTreeSet<NodeId>,
    /// Passed the quorum/history gate: keeps its signers as fetch sources.
    verifying: bool,
    job: Option<AggregationJob>,
}

#[derive(Clone, Debug)]
struct Heartbeat {
    period_start: u64,
    period: u64,
    fire_at: u64,
    fired: bool,
    consistent: usize,
    inconsistent: bool,
}

/// The per-node round state machine. See the module docs for the protocol.
#[derive(Clone, Debug)]
pub struct RoundMachine {
    config: RoundConfig,
    model: ModelId,
    me: NodeId,
    tip: Option<RoundRecord>,
    /// Results and weights of our chain's last rounds (round -> (result, weight)).
    chain: BTreeMap<u64, (Hash, u64)>,
    cur: Current,
    /// Valid announcements by (round, id): current round, lookahead, tip round, and
    /// rounds of candidates.
    anns: BTreeMap<(u64, Hash), SignedAnnouncement>,
    /// id -> round index of `anns`.
    ann_round: BTreeMap<Hash, u64>,
    /// Announcement ids known invalid, with the round they were claimed for.
    invalid: BTreeMap<Hash, u64>,
    requests: BTreeMap<Hash, AnnRequest>,
    blobs: BTreeMap<Hash, Blob>,
    candidates: BTreeMap<Hash, Candidate>,
    /// Message ids seen, with their round (for pruning).
    seen: BTreeMap<Hash, u64>,
    /// Other signers whose committed digest matched our tip, and since when it is tip.
    tip_support: BTreeSet<NodeId>,
    tip_since: u64,
    /// Penalised peers whose digests are ignored up to and including a round.
    banned: BTreeMap<NodeId, u64>,
    heartbeat: Heartbeat,
    dirty: bool,
}

impl RoundMachine {
    /// A machine for node `me` on network `model`, resuming after `tip` (the last
    /// committed record, `None` at genesis). Round `tip.round + 1` opens at `now_ms`.
    pub fn new(
        config: RoundConfig,
        model: ModelId,
        me: NodeId,
        tip: Option<RoundRecord>,
        now_ms: u64,
    ) -> Result<Self, crate::Error> {
        if let Some(t) = &tip {
            if t.model != model {
                return Err(crate::Error::WrongModel {
                    expected: model,
                    got: t.model,
                });
            }
            t.check()?;
        }
        let (round, parent) = match &tip {
            Some(t) => (t.round + 1, Some(t.result)),
            None => (1, None),
        };
        let cur = Current::open(round, parent, now_ms, config.window_ms);
        let mut m = RoundMachine {
            config,
            model,
            me,
            tip: None,
            chain: BTreeMap::new(),
            cur,
            anns: BTreeMap::new(),
            ann_round: BTreeMap::new(),
            invalid: BTreeMap::new(),
            requests: BTreeMap::new(),
            blobs: BTreeMap::new(),
            candidates: BTreeMap::new(),
            seen: BTreeMap::new(),
            banned: BTreeMap::new(),
            tip_support: BTreeSet::new(),
            tip_since: now_ms,
            heartbeat: Heartbeat {
                period_start: now_ms,
                period: 0,
                fire_at: now_ms,
                fired: false,
                consistent: 0,
                inconsistent: false,
            },
            dirty: true,
        };
        if let Some(t) = tip {
            m.extend_chain(&t);
            m.tip = Some(t);
        }
        m.reset_heartbeat(now_ms);
        Ok(m)
    }

    /// The last committed record (`None`: still at the base model).
    pub fn tip(&self) -> Option<&RoundRecord> {
        self.tip.as_ref()
    }

    /// The round being collected.
    pub fn current_round(&self) -> u64 {
        self.cur.round
    }

    /// The parent of the round being collected: what local training should start from.
    pub fn current_parent(&self) -> Option<Hash> {
        self.cur.parent
    }

    /// The current round's phase.
    pub fn phase(&self) -> Phase {
        if self.cur.closed {
            Phase::Closed
        } else {
            Phase::Collecting
        }
    }

    /// Distinct contributors (node, user id) with a valid announcement for the current
    /// round (as of the last event).
    pub fn pool_contributors(&self) -> usize {
        self.cur.pool
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.me
    }

    /// The network's model id.
    pub fn model(&self) -> ModelId {
        self.model
    }

    /// An announcement of a local adapter for the current round, ready to sign and pass
    /// back as [`Event::LocalContribution`].
    pub fn draft_announcement(
        &self,
        adapter: Hash,
        byte_len: u64,
        samples: u64,
        user_id: Option<String>,
        now_ms: u64,
    ) -> crate::Announcement {
        crate::Announcement {
            model: self.model,
            round: self.cur.round,
            adapter,
            byte_len,
            samples,
            contributor: self.me,
            user_id,
            parent: self.cur.parent,
            time_ms: now_ms,
        }
    }

    /// The earliest time at which [`RoundMachine::tick`] has something to do, for a
    /// driver that sleeps between events.
    pub fn next_deadline(&self) -> Option<u64> {
        let mut t: Option<u64> = None;
        let mut at = |x: u64| t = Some(t.map_or(x, |y| y.min(x)));
        if !self.cur.closed {
            at(self.cur.window_end);
        } else if self.cur.computed.is_some() {
            at(self.cur.last_change.saturating_add(self.config.grace_ms));
            if let (false, Some(p)) = (self.cur.published, self.cur.publish_at) {
                at(p);
            }
        }
        if self.tip.is_some() {
            if self.heartbeat.fired {
                at(self.heartbeat.period_start + self.config.heartbeat_ms);
            } else {
                at(self.heartbeat.fire_at);
            }
        }
        for b in self.blobs.values() {
            if let BlobState::Fetching { deadline, .. } = b.state {
                at(deadline);
            }
        }
        for r in self.requests.values() {
            at(r.deadline);
        }
        t
    }

    /// Feeds one event at time `now_ms`.
    pub fn handle(&mut self, now_ms: u64, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::Announcement(msg) => self.on_announcement(now_ms, msg, false, &mut out),
            Event::LocalContribution(msg) => {
                if msg.contributor != self.me {
                    out.push(Action::Verdict {
                        id: msg.id(),
                        verdict: Verdict::Ignore(Ignored::NotOurs),
                    });
                } else {
                    self.on_announcement(now_ms, msg, true, &mut out);
                }
            }
            Event::Digest(msg) => self.on_digest(now_ms, msg, &mut out),
            Event::BlobAvailable { hash } => {
                let b = self.blobs.entry(hash).or_insert_with(|| Blob {
                    state: BlobState::Failed,
                    sources: BTreeSet::new(),
                });
                if b.state != BlobState::Held {
                    b.state = BlobState::Held;
                    self.dirty = true;
                }
            }
            Event::FetchFailed { hash, reason } => {
                self.on_fetch_failed(now_ms, hash, reason, &mut out)
            }
            Event::AggregationFinished { job, result } => {
                self.on_aggregated(now_ms, job, result, &mut out)
            }
            Event::CloseNow => {
                if !self.cur.close_requested {
                    self.cur.close_requested = true;
                    self.dirty = true;
                }
            }
        }
        self.progress(now_ms, &mut out);
        out
    }

    /// Advances timers (window end, grace, fetch timeouts, heartbeats).
    pub fn tick(&mut self, now_ms: u64) -> Vec<Action> {
        let mut out = Vec::new();
        let timeout = self.config.fetch_timeout_ms;
        let max = self.config.fetch_attempts;
        for (hash, b) in self.blobs.iter_mut() {
            if let BlobState::Fetching { deadline, attempts } = b.state {
                if now_ms >= deadline {
                    if attempts >= max {
                        b.state = BlobState::Failed;
                        self.dirty = true;
                    } else {
                        b.state = BlobState::Fetching {
                            deadline: now_ms.saturating_add(timeout),
                            attempts: attempts + 1,
                        };
                        out.push(Action::FetchBlob {
                            hash: *hash,
                            from: b.sources.iter().copied().collect(),
                        });
                    }
                }
            }
        }
        let mut expired = Vec::new();
        for (id, r) in self.requests.iter_mut() {
            if now_ms >= r.deadline {
                if r.attempts >= max {
                    expired.push(*id);
                } else {
                    r.attempts += 1;
                    r.deadline = now_ms.saturating_add(timeout);
                    out.push(Action::FetchAnnouncement {
                        id: *id,
                        from: r.claims.keys().copied().collect(),
                    });
                }
            }
        }
        for id in expired {
            self.requests.remove(&id);
            self.dirty = true;
        }
        self.progress(now_ms, &mut out);
        out
    }

    // ----- messages -------------------------------------------------------------------

    fn ann(&self, id: &Hash) -> Option<&SignedAnnouncement> {
        let round = self.ann_round.get(id)?;
        self.anns.get(&(*round, *id))
    }

    fn round_anns(&self, round: u64) -> impl Iterator<Item = (&Hash, &SignedAnnouncement)> {
        self.anns
            .range((round, Hash([0; 32]))..=(round, Hash([0xff; 32])))
            .map(|((_, id), a)| (id, a))
    }

    /// Reports misbehaviour, and ignores the offender's digests for the rest of this
    /// round and the next (so one liar cannot keep the round busy with fresh junk).
    fn penalise(&mut self, peer: NodeId, reason: Misbehaviour, out: &mut Vec<Action>) {
        if peer != self.me {
            self.banned.insert(peer, self.cur.round + 1);
            out.push(Action::Penalise { peer, reason });
        }
    }

    fn on_announcement(
        &mut self,
        now: u64,
        msg: SignedAnnouncement,
        local: bool,
        out: &mut Vec<Action>,
    ) {
        let id = msg.id();
        let verdict =
            |v: Verdict, out: &mut Vec<Action>| out.push(Action::Verdict { id, verdict: v });
        if self.ann_round.contains_key(&id) {
            return verdict(Verdict::Ignore(Ignored::Duplicate), out);
        }
        let mut request = self.requests.remove(&id);
        if request.is_some() {
            self.dirty = true;
        } else if self.seen.contains_key(&id) {
            return verdict(Verdict::Ignore(Ignored::Duplicate), out);
        }
        let a = msg.payload();
        if a.model != self.model {
            self.seen.insert(id, a.round);
            let round = request.as_ref().map_or(a.round, |r| r.round);
            self.invalid.insert(id, round);
            let why = Misbehaviour::WrongModel { got: a.model };
            self.penalise(a.contributor, why.clone(), out);
            if let Some(req) = request {
                for namer in req.claims.keys() {
                    self.penalise(*namer, Misbehaviour::NamedInvalidAnnouncement { id }, out);
                }
            }
            return verdict(Verdict::Reject(why), out);
        }
        if let Some(req) = &request {
            let mut liars = Vec::new();
            for (namer, (round, adapter)) in &req.claims {
                if *round != a.round || *adapter != a.adapter {
                    liars.push(*namer);
                }
            }
            for l in liars {
                self.penalise(l, Misbehaviour::NamedMismatchedAnnouncement { id }, out);
            }
        }
        if a.time_ms > now.saturating_add(self.config.max_clock_skew_ms) {
            return verdict(
                Verdict::Ignore(Ignored::FromTheFuture {
                    time_ms: a.time_ms,
                    now_ms: now,
                }),
                out,
            );
        }
        let current = self.cur.round;
        // A fetched announcement is wanted for its claimed round even when that round is
        // not the current one (candidate verification of the tip round or a later one).
        let wanted = request
            .as_ref()
            .is_some_and(|r| r.claims.values().any(|(round, _)| *round == a.round));
        if !wanted {
            request = None;
            if a.round < current {
                self.seen.insert(id, a.round);
                return verdict(
                    Verdict::Ignore(Ignored::Late {
                        round: a.round,
                        current,
                    }),
                    out,
                );
            }
            if a.round > current.saturating_add(self.config.lookahead_rounds) {
                return verdict(
                    Verdict::Ignore(Ignored::TooFarAhead {
                        round: a.round,
                        current,
                    }),
                    out,
                );
            }
        }
        let in_round = self.round_anns(a.round).count();
        if in_round >= MAX_ANNOUNCEMENTS_PER_ROUND {
            return verdict(Verdict::Ignore(Ignored::RoundFull { round: a.round }), out);
        }
        self.seen.insert(id, a.round);
        let key = a.contributor_key();
        let mut equivocated = None;
        for (_, o) in self.round_anns(a.round) {
            if o.contributor_key() == key && o.adapter != a.adapter {
                equivocated = Some(o.adapter);
                break;
            }
        }
        let (adapter, contributor, round) = (a.adapter, a.contributor, a.round);
        if let (true, Some(first)) = (local, equivocated) {
            // Never announce a second adapter for one (node, user) in one round: others
            // would penalise us. The driver should offer it for the next round.
            return verdict(
                Verdict::Reject(Misbehaviour::Equivocation {
                    round,
                    first,
                    second: adapter,
                }),
                out,
            );
        }
        self.anns.insert((round, id), msg.clone());
        self.ann_round.insert(id, round);
        self.dirty = true;
        if local {
            self.blobs.insert(
                adapter,
                Blob {
                    state: BlobState::Held,
                    sources: BTreeSet::new(),
                },
            );
        } else {
            let mut sources = vec![contributor];
            if let Some(req) = &request {
                sources.extend(req.claims.keys().copied());
            }
            self.want_blob(now, adapter, &sources, out);
        }
        match equivocated {
            Some(first) => {
                let why = Misbehaviour::Equivocation {
                    round,
                    first,
                    second: adapter,
                };
                self.penalise(contributor, why.clone(), out);
                verdict(Verdict::Reject(why), out);
            }
            None => verdict(Verdict::Accept, out),
        }
        if local {
            out.push(Action::PublishAnnouncement(msg));
        }
    }

    fn on_digest(&mut self, now: u64, msg: SignedDigest, out: &mut Vec<Action>) {
        let id = msg.id();
        let verdict =
            |v: Verdict, out: &mut Vec<Action>| out.push(Action::Verdict { id, verdict: v });
        if self.seen.contains_key(&id) {
            return verdict(Verdict::Ignore(Ignored::Duplicate), out);
        }
        let d = msg.payload();
        let r = &d.record;
        let signer = d.signer;
        self.seen.insert(id, r.round);
        if signer == self.me {
            return verdict(Verdict::Ignore(Ignored::Own), out);
        }
        if self
            .banned
            .get(&signer)
            .is_some_and(|until| *until >= self.cur.round)
        {
            return verdict(Verdict::Ignore(Ignored::Banned), out);
        }
        if r.model != self.model {
            let why = Misbehaviour::WrongModel { got: r.model };
            self.penalise(signer, why.clone(), out);
            return verdict(Verdict::Reject(why), out);
        }
        if r.rule != self.config.rule {
            return verdict(Verdict::Ignore(Ignored::OtherRule { rule: r.rule }), out);
        }
        let mut accepted = false;
        if r.round == self.cur.round {
            // Reconcile: anything it names that we lack, we fetch and add to the union.
            // Each distinct record is reconciled once.
            let inputs = r.inputs.clone();
            let round = r.round;
            let rid = r.id();
            if self.cur.digests.len() < MAX_DIGEST_SIGNERS || self.cur.digests.contains_key(&signer)
            {
                self.cur.digests.insert(signer, msg.clone());
            }
            if self.cur.reconciled.insert(rid) {
                for input in inputs {
                    self.want_input(now, input, round, signer, out);
                }
                self.dirty = true;
            }
            accepted = true;
        }
        if !d.committed {
            // An in-progress view: only useful for reconciling our current round (an
            // in-progress record may never be committed by anyone).
            let v = if accepted {
                Verdict::Accept
            } else {
                Verdict::Ignore(Ignored::NotCommitted)
            };
            return verdict(v, out);
        }
        // A committed record: compare with our tip (heaviest chain, then lowest hash).
        let (equal, better) = match &self.tip {
            Some(t) => (r == t, r.beats(t)),
            None => (false, true),
        };
        if equal {
            self.heartbeat.consistent += 1;
            self.tip_support.insert(signer);
            return verdict(Verdict::Accept, out);
        }
        let own_round = r.round == self.cur.round && r.parent == self.cur.parent;
        let ours = self
            .chain
            .get(&r.round)
            .is_some_and(|(h, _)| *h == r.result);
        // A node alone on its fork (nobody endorses its tip) yields to a fork that a
        // quorum endorses even when that fork is lighter: otherwise a lone node on a
        // heavier fork and the rest of the network would each wait for the other.
        let yield_to = !better && !ours && self.lonely(now);
        if (better || yield_to) && !own_round {
            // A heavier chain (a fork after a partition, a node that ran ahead alone, or
            // rounds we missed): verify it and switch, catch up or rewind.
            self.add_candidate(signer, r.clone());
            return verdict(Verdict::Accept, out);
        }
        if accepted {
            return verdict(Verdict::Accept, out);
        }
        if self
            .chain
            .get(&r.round)
            .is_some_and(|(h, _)| *h == r.result)
        {
            // An earlier round of our own chain: the signer is behind and will catch up
            // from heartbeats.
            return verdict(
                Verdict::Ignore(Ignored::Late {
                    round: r.round,
                    current: self.cur.round,
                }),
                out,
            );
        }
        if self.tip.as_ref().is_some_and(|t| t.round == r.round) {
            // A lighter record for our tip's round: its signer should learn ours, so do
            // not suppress our next heartbeat.
            self.heartbeat.inconsistent = true;
            self.heartbeat.consistent = 0;
        }
        verdict(Verdict::Ignore(Ignored::ForkLost { round: r.round }), out)
    }

    /// A current-round digest from `namer` lists `input`.
    fn want_input(
        &mut self,
        now: u64,
        input: RoundInput,
        round: u64,
        namer: NodeId,
        out: &mut Vec<Action>,
    ) {
        if let Some(a) = self.ann(&input.announcement) {
            if a.round != round || a.adapter != input.adapter {
                self.penalise(
                    namer,
                    Misbehaviour::NamedMismatchedAnnouncement {
                        id: input.announcement,
                    },
                    out,
                );
                return;
            }
            let contributor = a.contributor;
            self.want_blob(now, input.adapter, &[namer, contributor], out);
            return;
        }
        if self.invalid.contains_key(&input.announcement) {
            self.penalise(
                namer,
                Misbehaviour::NamedInvalidAnnouncement {
                    id: input.announcement,
                },
                out,
            );
            return;
        }
        self.request_announcement(now, input.announcement, round, input.adapter, namer, out);
    }

    fn request_announcement(
        &mut self,
        now: u64,
        id: Hash,
        round: u64,
        adapter: Hash,
        namer: NodeId,
        out: &mut Vec<Action>,
    ) {
        if let Some(req) = self.requests.get_mut(&id) {
            req.claims.entry(namer).or_insert((round, adapter));
            return;
        }
        if self.requests.len() >= MAX_REQUESTS {
            return;
        }
        let mut claims = BTreeMap::new();
        claims.insert(namer, (round, adapter));
        self.requests.insert(
            id,
            AnnRequest {
                claims,
                round,
                deadline: now.saturating_add(self.config.fetch_timeout_ms),
                attempts: 1,
            },
        );
        self.dirty = true;
        out.push(Action::FetchAnnouncement {
            id,
            from: vec![namer],
        });
    }

    fn want_blob(&mut self, now: u64, hash: Hash, sources: &[NodeId], out: &mut Vec<Action>) {
        let timeout = self.config.fetch_timeout_ms;
        let me = self.me;
        let b = self.blobs.entry(hash).or_insert_with(|| Blob {
            state: BlobState::Fetching {
                deadline: 0,
                attempts: 0,
            },
            sources: BTreeSet::new(),
        });
        let mut added = false;
        for s in sources {
            if *s != me {
                added |= b.sources.insert(*s);
            }
        }
        let start = match b.state {
            BlobState::Held => false,
            BlobState::Fetching { attempts, .. } => attempts == 0,
            BlobState::Failed => added,
        };
        if start {
            b.state = BlobState::Fetching {
                deadline: now.saturating_add(timeout),
                attempts: 1,
            };
            self.dirty = true;
            out.push(Action::FetchBlob {
                hash,
                from: b.sources.iter().copied().collect(),
            });
        }
    }

    fn on_fetch_failed(
        &mut self,
        now: u64,
        hash: Hash,
        reason: FetchFailure,
        out: &mut Vec<Action>,
    ) {
        let max = self.config.fetch_attempts;
        let timeout = self.config.fetch_timeout_ms;
        if let Some(req) = self.requests.get_mut(&hash) {
            if reason == FetchFailure::Invalid || req.attempts >= max {
                let req = self.requests.remove(&hash);
                self.dirty = true;
                if reason == FetchFailure::Invalid {
                    if let Some(req) = req {
                        self.invalid.insert(hash, req.round);
                        for namer in req.claims.keys() {
                            self.penalise(
                                *namer,
                                Misbehaviour::NamedInvalidAnnouncement { id: hash },
                                out,
                            );
                        }
                    }
                }
            } else {
                req.attempts += 1;
                req.deadline = now.saturating_add(timeout);
                out.push(Action::FetchAnnouncement {
                    id: hash,
                    from: req.claims.keys().copied().collect(),
                });
            }
            return;
        }
        if let Some(b) = self.blobs.get_mut(&hash) {
            if let BlobState::Fetching { attempts, .. } = b.state {
                if attempts >= max {
                    b.state = BlobState::Failed;
                    self.dirty = true;
                } else {
                    b.state = BlobState::Fetching {
                        deadline: now.saturating_add(timeout),
                        attempts: attempts + 1,
                    };
                    out.push(Action::FetchBlob {
                        hash,
                        from: b.sources.iter().copied().collect(),
                    });
                }
            }
        }
    }

    fn on_aggregated(
        &mut self,
        now: u64,
        job: AggregationJob,
        result: Hash,
        out: &mut Vec<Action>,
    ) {
        if let Some((req, inputs)) = &self.cur.requested {
            if *req == job {
                self.cur.computed = Some(Computed {
                    inputs: inputs.clone(),
                    job: job.clone(),
                    result,
                });
                self.cur.requested = None;
                self.cur.published = false;
                self.cur.publish_at = None;
                self.dirty = true;
            }
        }
        let key = self
            .candidates
            .iter()
            .find(|(_, c)| c.job.as_ref() == Some(&job))
            .map(|(k, _)| *k);
        let Some(key) = key else { return };
        let Some(c) = self.candidates.remove(&key) else {
            return;
        };
        if c.record.result == result {
            self.adopt(now, c.record, out);
        } else {
            for s in &c.signers {
                self.penalise(
                    *s,
                    Misbehaviour::WrongResult {
                        round: c.record.round,
                        claimed: c.record.result,
                        computed: result,
                    },
                    out,
                );
            }
        }
    }

    // ----- candidates (fork choice and catch-up) -------------------------------------

    fn add_candidate(&mut self, signer: NodeId, record: RoundRecord) {
        let key = record.id();
        if let Some(c) = self.candidates.get_mut(&key) {
            c.signers.insert(signer);
            self.dirty = true;
            return;
        }
        // A signer backs at most one candidate that is still waiting for its quorum.
        for c in self.candidates.values_mut() {
            if !c.verifying {
                c.signers.remove(&signer);
            }
        }
        self.candidates
            .retain(|_, c| c.verifying || !c.signers.is_empty());
        if self.candidates.len() >= MAX_CANDIDATES {
            return;
        }
        let mut signers = BTreeSet::new();
        signers.insert(signer);
        self.candidates.insert(
            key,
            Candidate {
                record,
                signers,
                verifying: false,
                job: None,
            },
        );
        self.dirty = true;
    }

    /// The weight `record` must have if its parent is a round of our own chain, or
    /// `None` when it comes from another history (then it needs a quorum).
    fn expected_weight(&self, record: &RoundRecord) -> Option<u64> {
        let n = record.inputs.len() as u64;
        if record.round == 1 {
            return record.parent.is_none().then_some(n);
        }
        let (result, weight) = self.chain.get(&(record.round - 1))?;
        (record.parent == Some(*result)).then(|| weight.saturating_add(n))
    }

    fn progress_candidates(&mut self, now: u64, out: &mut Vec<Action>) {
        let keys: Vec<Hash> = self.candidates.keys().copied().collect();
        for key in keys {
            let Some(c) = self.candidates.get(&key) else {
                continue;
            };
            if self.tip.as_ref().is_some_and(|t| !c.record.beats(t)) {
                if !self.lonely(now) {
                    self.candidates.remove(&key);
                    continue;
                }
                if c.signers.len() < self.config.catch_up_quorum {
                    continue;
                }
            }
            let expected = self.expected_weight(&c.record);
            if !c.verifying && expected.is_none() && c.signers.len() < self.config.catch_up_quorum {
                continue;
            }
            let record = c.record.clone();
            let signers: Vec<NodeId> = c.signers.iter().copied().collect();
            let had_job = c.job.clone();
            if let Some(c) = self.candidates.get_mut(&key) {
                c.verifying = true;
            }
            let mut failure =
                expected
                    .filter(|w| *w != record.weight)
                    .map(|w| Misbehaviour::WrongWeight {
                        round: record.round,
                        claimed: record.weight,
                        expected: w,
                    });
            let mut unverifiable = false;
            let mut missing = false;
            let mut keys_seen = BTreeSet::new();
            let mut job_inputs = Vec::with_capacity(record.inputs.len());
            for input in &record.inputs {
                if failure.is_some() {
                    break;
                }
                if self.invalid.contains_key(&input.announcement) {
                    failure = Some(Misbehaviour::NamedInvalidAnnouncement {
                        id: input.announcement,
                    });
                    break;
                }
                let Some(a) = self.ann(&input.announcement) else {
                    for s in &signers {
                        self.request_announcement(
                            now,
                            input.announcement,
                            record.round,
                            input.adapter,
                            *s,
                            out,
                        );
                    }
                    missing = true;
                    continue;
                };
                if a.round != record.round || a.adapter != input.adapter || a.model != self.model {
                    failure = Some(Misbehaviour::NamedMismatchedAnnouncement {
                        id: input.announcement,
                    });
                    break;
                }
                let ck = (a.contributor, a.user_id.clone());
                if !keys_seen.insert(ck) {
                    failure = Some(Misbehaviour::DuplicateContributor {
                        round: record.round,
                    });
                    break;
                }
                let samples = a.samples;
                let contributor = a.contributor;
                let state = self.blobs.get(&input.adapter).map(|b| b.state.clone());
                match state {
                    Some(BlobState::Held) => job_inputs.push(AggregateInput {
                        adapter: input.adapter,
                        samples,
                    }),
                    Some(BlobState::Fetching { .. }) => {
                        let mut srcs = signers.clone();
                        srcs.push(contributor);
                        self.want_blob(now, input.adapter, &srcs, out);
                        missing = true;
                    }
                    Some(BlobState::Failed) | None => {
                        let mut srcs = signers.clone();
                        srcs.push(contributor);
                        let before = self.blobs.get(&input.adapter).map(|b| b.sources.len());
                        self.want_blob(now, input.adapter, &srcs, out);
                        let after = self.blobs.get(&input.adapter).map(|b| b.sources.len());
                        if state.is_some() && before == after {
                            unverifiable = true;
                        }
                        missing = true;
                    }
                }
            }
            if let Some(why) = failure {
                self.candidates.remove(&key);
                for s in &signers {
                    self.penalise(*s, why.clone(), out);
                }
                continue;
            }
            if unverifiable {
                self.candidates.remove(&key);
                continue;
            }
            if missing {
                continue;
            }
            let job = AggregationJob {
                round: record.round,
                parent: record.parent,
                rule: record.rule,
                inputs: job_inputs,
            };
            if had_job.as_ref() != Some(&job) {
                if let Some(c) = self.candidates.get_mut(&key) {
                    c.job = Some(job.clone());
                }
                out.push(Action::Aggregate(job));
            }
        }
    }

    /// Makes a verified foreign record our tip: a switch within the tip's round, a
    /// catch-up to a later round, or a rewind to an earlier one (our later records are
    /// then orphaned).
    fn adopt(&mut self, now: u64, record: RoundRecord, out: &mut Vec<Action>) {
        if self.tip.as_ref().is_some_and(|t| !record.beats(t)) && !self.lonely(now) {
            return;
        }
        let replaces = self
            .chain
            .get(&record.round)
            .map(|(h, _)| *h)
            .filter(|h| *h != record.result);
        out.push(Action::Commit {
            record: record.clone(),
            replaces,
        });
        let same_round = self.tip.as_ref().is_some_and(|t| t.round == record.round);
        let (round, result) = (record.round, record.result);
        self.extend_chain(&record);
        self.tip = Some(record);
        if same_round {
            // Same round number collecting on: only the parent changes.
            self.cur.parent = Some(result);
            self.cur.requested = None;
            self.cur.computed = None;
            self.cur.published = false;
            self.cur.publish_at = None;
            self.cur.last_change = now;
            self.dirty = true;
        } else {
            self.open_round(now, round + 1, Some(result));
        }
        // Our endorsement of the adopted record goes out with the next heartbeat
        // (unless enough identical copies are heard first).
        self.reset_heartbeat(now);
    }

    /// Records `record` as the newest round of our chain, dropping anything at or
    /// above its round and any remembered history it does not descend from.
    fn extend_chain(&mut self, record: &RoundRecord) {
        let _orphans = self.chain.split_off(&record.round);
        let parent_known = record.round > 1
            && self
                .chain
                .get(&(record.round - 1))
                .is_some_and(|(h, _)| Some(*h) == record.parent);
        if !parent_known {
            self.chain.clear();
            if let Some(p) = record.parent {
                self.chain
                    .insert(record.round - 1, (p, record.parent_weight()));
            }
        }
        self.chain
            .insert(record.round, (record.result, record.weight));
        while self.chain.len() > CHAIN_MEMORY {
            self.chain.pop_first();
        }
    }

    // ----- the current round ---------------------------------------------------------

    /// The canonical selection for the current round, and the number of distinct
    /// contributors in its pool. Per contributor key, the lowest `(adapter, id)` whose
    /// blob is held wins, unless a lower one is still being fetched (then the selection
    /// is pending); announcements whose blob failed are skipped. Identical adapters of
    /// different contributors count once (lowest announcement id).
    fn compute_selection(&self) -> (Selection, usize) {
        #[derive(Default)]
        struct Best {
            held: Option<(Hash, Hash, u64)>,
            fetching: Option<(Hash, Hash)>,
        }
        let round = self.cur.round;
        let mut per: BTreeMap<(NodeId, Option<&str>), Best> = BTreeMap::new();
        for (id, a) in self.round_anns(round) {
            let best = per.entry(a.contributor_key()).or_default();
            let key = (a.adapter, *id);
            match self.blobs.get(&a.adapter).map(|b| &b.state) {
                Some(BlobState::Held) => {
                    if best.held.is_none_or(|(ad, i, _)| key < (ad, i)) {
                        best.held = Some((a.adapter, *id, a.samples));
                    }
                }
                Some(BlobState::Fetching { .. }) => {
                    if best.fetching.is_none_or(|f| key < f) {
                        best.fetching = Some(key);
                    }
                }
                Some(BlobState::Failed) | None => {}
            }
        }
        let pool = per.len();
        let mut pending = self.requests.values().any(|r| r.round == round);
        let mut chosen: BTreeMap<Hash, (Hash, u64)> = BTreeMap::new();
        for best in per.values() {
            match (best.held, best.fetching) {
                (Some((ad, i, _)), Some(f)) if f < (ad, i) => pending = true,
                (None, Some(_)) => pending = true,
                (Some((adapter, id, samples)), _) => {
                    let e = chosen.entry(adapter).or_insert((id, samples));
                    if id < e.0 {
                        *e = (id, samples);
                    }
                }
                (None, None) => {}
            }
        }
        let mut sel = Selection {
            pending,
            ..Selection::default()
        };
        for (adapter, (id, samples)) in chosen.into_iter().take(MAX_ROUND_INPUTS) {
            sel.inputs.push(RoundInput {
                adapter,
                announcement: id,
            });
            sel.job_inputs.push(AggregateInput { adapter, samples });
        }
        (sel, pool)
    }

    /// Returns true when it committed.
    fn progress_current(&mut self, now: u64, out: &mut Vec<Action>) -> bool {
        if self.dirty {
            // Everything derived from the pool is recomputed only when it may change.
            let (sel, pool) = self.compute_selection();
            // The grace period restarts when the inputs change, not when a fetch
            // merely starts or ends (pending fetches block the commit by themselves).
            if sel.inputs != self.cur.selection.inputs {
                self.cur.last_change = now;
            }
            self.cur.selection = sel;
            let round = self.cur.round;
            self.cur.pool = pool;
            // Follow another node's close once one of its digests is fully valid here:
            // every input it names is a known valid announcement of this round. (A
            // digest naming junk never closes our window.)
            if !self.cur.closed && !self.cur.close_requested {
                let anns = &self.anns;
                self.cur.close_requested = self.cur.digests.values().any(|d| {
                    d.record.inputs.iter().all(|i| {
                        anns.get(&(round, i.announcement))
                            .is_some_and(|a| a.adapter == i.adapter)
                    })
                });
            }
            let sel = &self.cur.selection;
            self.cur.job = (!sel.inputs.is_empty()).then(|| AggregationJob {
                round,
                parent: self.cur.parent,
                rule: self.config.rule,
                inputs: sel.job_inputs.clone(),
            });
            self.cur.done = match (&self.cur.computed, &self.cur.job) {
                (Some(c), Some(j)) => c.job == *j,
                _ => false,
            };
        }
        if !self.cur.closed {
            let threshold = if self.cur.close_requested {
                1
            } else {
                self.config.min_inputs.max(1)
            };
            if (now >= self.cur.window_end || self.cur.close_requested)
                && self.cur.pool >= threshold
            {
                self.cur.closed = true;
                self.cur.last_change = now;
            }
        }
        if !self.cur.closed || self.cur.selection.pending {
            return false;
        }
        let Some(job) = &self.cur.job else {
            return false;
        };
        if !self.cur.done {
            let asked = self.cur.requested.as_ref().is_some_and(|(j, _)| j == job);
            if !asked {
                let job = job.clone();
                self.cur.requested = Some((job.clone(), self.cur.selection.inputs.clone()));
                out.push(Action::Aggregate(job));
            }
            return false;
        }
        let Some(c) = &self.cur.computed else {
            return false;
        };
        let parent_weight = self.tip.as_ref().map_or(0, |t| t.weight);
        let record = |c: &Computed| RoundRecord {
            model: self.model,
            round: self.cur.round,
            parent: self.cur.parent,
            inputs: c.inputs.clone(),
            weight: parent_weight.saturating_add(c.inputs.len() as u64),
            rule: self.config.rule,
            result: c.result,
        };
        let commit_due = now >= self.cur.last_change.saturating_add(self.config.grace_ms);
        // Our digest goes out after a node-specific delay (a quarter of the grace period
        // at most), so that nodes holding the same record mostly hear each other first
        // and stay quiet.
        let publish_at = *self.cur.publish_at.get_or_insert_with(|| {
            let spread = (self.config.grace_ms / 4).max(1);
            now + jitter(&self.me, self.cur.round, &c.result) % spread
        });
        let publish_due = !self.cur.published && now >= publish_at;
        if !publish_due && !commit_due {
            return false;
        }
        let record = record(c);
        if !self.cur.published {
            self.cur.published = true;
            // Enough identical digests already circulate: ours adds nothing.
            let same = self
                .cur
                .digests
                .values()
                .filter(|d| d.record == record)
                .count();
            if same < HEARTBEAT_REDUNDANCY {
                out.push(Action::PublishDigest(RoundDigest {
                    record: record.clone(),
                    signer: self.me,
                    committed: false,
                    time_ms: now,
                }));
            }
        }
        if !commit_due {
            return false;
        }
        // Commit.
        out.push(Action::Commit {
            record: record.clone(),
            replaces: None,
        });
        let better: Vec<(NodeId, RoundRecord)> = self
            .cur
            .digests
            .values()
            .filter(|d| d.committed && d.record != record && d.record.beats(&record))
            .map(|d| (d.signer, d.record.clone()))
            .collect();
        let (round, result) = (record.round, record.result);
        self.extend_chain(&record);
        self.tip = Some(record);
        self.open_round(now, round + 1, Some(result));
        self.reset_heartbeat(now);
        for (s, r) in better {
            self.add_candidate(s, r);
        }
        true
    }

    fn open_round(&mut self, now: u64, round: u64, parent: Option<Hash>) {
        self.cur = Current::open(round, parent, now, self.config.window_ms);
        let keep_from = round.saturating_sub(1);
        let tip = self.tip.clone();
        self.candidates
            .retain(|_, c| tip.as_ref().is_none_or(|t| c.record.beats(t)));
        let kept = self.anns.split_off(&(keep_from, Hash([0; 32])));
        for (_, id) in self.anns.keys() {
            self.ann_round.remove(id);
        }
        self.anns = kept;
        self.seen.retain(|_, r| *r >= keep_from);
        self.banned.retain(|_, until| *until >= round);
        self.invalid.retain(|_, r| *r >= keep_from);
        self.requests.retain(|_, r| r.round >= keep_from);
        let referenced: BTreeSet<Hash> = self.anns.values().map(|a| a.adapter).collect();
        self.blobs.retain(|h, _| referenced.contains(h));
        self.dirty = true;
    }

    /// Our tip has been ours alone (no other signer's committed digest matched it) for
    /// two heartbeat periods.
    fn lonely(&self, now: u64) -> bool {
        self.tip.is_some()
            && now >= self.tip_since.saturating_add(2 * self.config.heartbeat_ms)
            && self.tip_support.len() + 1 < self.config.catch_up_quorum
    }

    fn reset_heartbeat(&mut self, now: u64) {
        self.tip_support.clear();
        self.tip_since = now;
        self.heartbeat = Heartbeat {
            period_start: now,
            period: 0,
            fire_at: now,
            fired: false,
            consistent: 0,
            inconsistent: false,
        };
        self.heartbeat.fire_at = self.fire_time(now, 0);
    }

    /// Trickle-style: each period fires at a node-specific point of its second half.
    fn fire_time(&self, period_start: u64, period: u64) -> u64 {
        let half = (self.config.heartbeat_ms / 2).max(1);
        let round = self.tip.as_ref().map_or(0, |t| t.round);
        period_start + half + jitter(&self.me, round, &Hash(period_to_bytes(period))) % half
    }

    fn run_heartbeat(&mut self, now: u64, out: &mut Vec<Action>) {
        let Some(tip) = &self.tip else { return };
        if now
            >= self
                .heartbeat
                .period_start
                .saturating_add(self.config.heartbeat_ms)
        {
            let period = self.heartbeat.period + 1;
            let inconsistent = self.heartbeat.inconsistent;
            self.heartbeat = Heartbeat {
                period_start: now,
                period,
                fire_at: now,
                fired: false,
                consistent: 0,
                inconsistent,
            };
            self.heartbeat.fire_at = self.fire_time(now, period);
        }
        if !self.heartbeat.fired && now >= self.heartbeat.fire_at {
            self.heartbeat.fired = true;
            if self.heartbeat.consistent < HEARTBEAT_REDUNDANCY || self.heartbeat.inconsistent {
                out.push(Action::PublishDigest(RoundDigest {
                    record: tip.clone(),
                    signer: self.me,
                    committed: true,
                    time_ms: now,
                }));
            }
            self.heartbeat.inconsistent = false;
        }
    }

    fn progress(&mut self, now: u64, out: &mut Vec<Action>) {
        // Candidates may adopt (changing the round), the current round may commit
        // (creating candidates): iterate a few times until quiet.
        for _ in 0..4 {
            let tip_before = self.tip.as_ref().map(|t| (t.round, t.result));
            if self.dirty && !self.candidates.is_empty() {
                self.progress_candidates(now, out);
            }
            let committed = self.progress_current(now, out);
            self.dirty = false;
            let tip_after = self.tip.as_ref().map(|t| (t.round, t.result));
            if !committed && tip_before == tip_after {
                break;
            }
            self.dirty = true;
        }
        self.run_heartbeat(now, out);
    }
}

fn period_to_bytes(period: u64) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[..8].copy_from_slice(&period.to_le_bytes());
    b
}

/// A deterministic per-node pseudo-random number (no RNG in the machine): spreads
/// publications of nodes that would otherwise all speak at once.
fn jitter(me: &NodeId, round: u64, salt: &Hash) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(b"hivemind jitter");
    h.update(me.as_bytes());
    h.update(&round.to_le_bytes());
    h.update(salt.as_bytes());
    let bytes = h.finalize();
    let mut eight = [0u8; 8];
    eight.copy_from_slice(&bytes.as_bytes()[..8]);
    u64::from_le_bytes(eight)
}

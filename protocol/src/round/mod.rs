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
//! Every record carries a chain *weight*: its parent's weight plus its distinct contributing
//! nodes (a node's many user ids count once). The preferred record is the heaviest, then the
//! one with the lowest result hash ([`RoundRecord::beats`]); for two records of one round
//! and parent that is "most contributing nodes, then lowest hash". After commit, a node republishes its tip as a
//! *committed* digest every `heartbeat_ms` (trickle style: skipped when it heard three
//! identical copies in the period). Any committed record that beats our tip becomes a
//! *candidate*: a heavier record of our round (switch), of a later round (catch-up after
//! a restart or a partition) or of an earlier round (rewind: we ran ahead on a light
//! fork). A candidate is adopted only after complete re-verification: every named
//! announcement fetched and valid for that round, at most one input per contributor,
//! every adapter fetched, the aggregation recomputed to the same result. When its parent
//! is a round of our own chain, its weight is checked exactly; otherwise (another
//! history) it is linked to our chain through its ancestors, each checked the same way
//! (`history.rs`); only a node with no tip, or a lonely one, takes the weight of a history
//! it cannot link on the word of `catch_up_quorum` distinct signers. A node whose tip
//! nobody else endorses for two heartbeat periods yields to a quorum-endorsed record even
//! when lighter, so that a lone node on a heavier fork (which nobody can verify without a
//! quorum) rejoins the network.
//!
//! In-progress digests only feed reconciliation; only committed records are candidates
//! (an in-progress record may never be committed by anyone). A peer caught misbehaving
//! is penalised, and its digests are ignored for the rest of that round and the next.
//!
//! # Where the code is
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | [`RoundMachine`]: its state, accessors, and the `handle`/`tick` dispatch |
//! | `config.rs` | [`RoundConfig`]: timing and policy |
//! | `events.rs` | what comes in: [`Event`], [`FetchFailure`], [`AggregationJob`] |
//! | `actions.rs` | what goes out: [`Action`], [`Verdict`], [`Ignored`], [`Misbehaviour`] |
//! | `announcements.rs` | intake of announcements (gossip, fetched, local) |
//! | `digests.rs` | intake of round digests: reconciliation and fork-choice candidates |
//! | `fetch.rs` | adapter and announcement fetches: sources, retries, failures |
//! | `current.rs` | the round being collected: selection, close, aggregation, publish, commit |
//! | `fork_choice.rs` | candidates: verification, adoption (switch, catch-up, rewind), our chain |
//! | `heartbeat.rs` | trickle-style republication of the tip |
//!
//! `PROTOCOL.md` next to this crate's manifest describes the protocol in full.

mod actions;
mod announcements;
mod config;
mod current;
mod digests;
mod events;
mod fetch;
mod fork_choice;
mod heartbeat;
mod history;

pub use actions::{Action, Ignored, Misbehaviour, Verdict};
pub use config::RoundConfig;
pub use events::{AggregateInput, AggregationJob, Event, FetchFailure};

use std::collections::{BTreeMap, BTreeSet};

use crate::{Hash, ModelId, NodeId, RoundRecord, SignedAnnouncement, MAX_ROUND_INPUTS};
use current::Current;
use fetch::{AnnRequest, Blob, BlobState, Settled};
use fork_choice::Candidate;
use heartbeat::Heartbeat;

/// Digests identical to our tip heard in one heartbeat period that make us skip ours.
const HEARTBEAT_REDUNDANCY: usize = 3;
/// Rounds of our own chain remembered for fork choice (results and weights), and the most
/// ancestors of another chain fetched to link it to ours.
pub const CHAIN_MEMORY: usize = 64;
/// Most records of other chains remembered as checked.
const MAX_VERIFIED: usize = 4 * CHAIN_MEMORY;
/// Most foreign records under consideration at once.
const MAX_CANDIDATES: usize = 16;
/// Most announcement fetches in flight.
const MAX_REQUESTS: usize = 4 * MAX_ROUND_INPUTS;
/// Most signers whose current-round digests are kept.
const MAX_DIGEST_SIGNERS: usize = 4096;
/// Most announcements kept for one round (equivocations and re-announcements included).
const MAX_ANNOUNCEMENTS_PER_ROUND: usize = 2 * MAX_ROUND_INPUTS;
/// Most announcements of one signer kept for one round (a gateway's users included), so that
/// one key cannot fill a round and crowd out every other node.
const MAX_ANNOUNCEMENTS_PER_SIGNER: usize = MAX_ROUND_INPUTS / 4;

/// Where the current round is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Collecting announcements inside the window.
    Collecting,
    /// Window closed: aggregating, reconciling, waiting out the grace period.
    Closed,
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
    /// Message ids seen, with their round (for pruning; see [`Self::pruning_round`]).
    seen: BTreeMap<Hash, u64>,
    /// How announcement fetches asked for to verify other histories ended without the
    /// announcement kept (see [`Settled`]). Cleared as each round opens.
    settled: BTreeMap<Hash, Settled>,
    /// Announcements served but not kept here, with when they may be asked for again (unix
    /// ms): not asked for before (see [`RoundMachine::refuse`]). At most [`MAX_REQUESTS`].
    refused: BTreeMap<Hash, u64>,
    /// Other signers whose committed digest matched our tip, and since when it is tip.
    tip_support: BTreeSet<NodeId>,
    /// Records of other chains whose weight and result this node checked (as ancestors of
    /// candidates), by result: a later candidate on one of them attaches there instead of
    /// walking its history again. At most [`MAX_VERIFIED`], the lowest rounds dropped first.
    verified: BTreeMap<Hash, RoundRecord>,
    /// Record fetches asked so far: each one's tag is unique, so a late answer to an
    /// earlier one is never taken for a later one.
    record_fetches: u64,
    tip_since: u64,
    /// Penalised peers whose digests are ignored up to and including a round.
    banned: BTreeMap<NodeId, u64>,
    /// Signers who did not serve what they named or announced: up to and including a
    /// round, and until a time (so a node stuck behind forgets it too), they are not asked
    /// and their digests are not reconciled (no penalty: a crashed honest node looks the
    /// same).
    unserved: BTreeMap<NodeId, (u64, u64)>,
    heartbeat: Heartbeat,
    dirty: bool,
    /// A candidate's history walk changed in a way that needs another pass at once (a
    /// signer refused, a checked record forgotten), with no event to come that would
    /// bring one.
    recheck: bool,
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
            settled: BTreeMap::new(),
            refused: BTreeMap::new(),
            banned: BTreeMap::new(),
            unserved: BTreeMap::new(),
            tip_support: BTreeSet::new(),
            verified: BTreeMap::new(),
            record_fetches: 0,
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
            recheck: false,
        };
        if let Some(t) = tip {
            // Its announcements are not in memory after a restart: its parent's weight is
            // not derived here (the driver passes the rounds before it to `remember`).
            m.extend_chain(&t, None);
            m.tip = Some(t);
        }
        m.reset_heartbeat(now_ms);
        Ok(m)
    }

    /// Our chain's rounds before the tip, as the driver stored them (oldest first), after a
    /// restart: their results and weights join the chain memory, so that a record forking
    /// below the tip is still checked (or linked) rather than taken on a quorum's word.
    /// Records that do not chain into the tip (and anything older than them) are ignored,
    /// as are more than the chain memory holds.
    pub fn remember(&mut self, older: &[RoundRecord]) {
        let Some(tip) = &self.tip else {
            return;
        };
        let (mut round, mut result) = (tip.round, tip.parent);
        for r in older.iter().rev() {
            if self.chain.len() >= CHAIN_MEMORY
                || r.model != self.model
                || Some(r.result) != result
                || r.round.checked_add(1) != Some(round)
            {
                break;
            }
            self.chain.insert(r.round, (r.result, r.weight));
            (round, result) = (r.round, r.parent);
        }
    }

    /// The round under which something of round `round` is remembered for pruning: its own,
    /// or, for one further ahead than announcements are kept, the last round they are kept
    /// for. So a message for a round far ahead (any round up to [`crate::MAX_ROUND`] is
    /// valid) is forgotten a few rounds on, like any other, rather than kept for good.
    fn pruning_round(&self, round: u64) -> u64 {
        round.min(self.cur.round.saturating_add(self.config.lookahead_rounds))
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
    /// round whose adapter is held or still being fetched (as of the last event).
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
            Event::BlobAvailable { hash } => self.on_blob_available(hash),
            Event::FetchFailed { hash, reason } => {
                self.on_fetch_failed(now_ms, hash, reason, &mut out)
            }
            Event::AggregationFinished { job, result } => {
                self.on_aggregated(&job, result);
                self.on_link_aggregated(&job, result, &mut out);
                self.on_candidate_aggregated(now_ms, &job, result, &mut out);
            }
            Event::Record {
                tag,
                round,
                result,
                digest,
                unanswered,
            } => self.on_record(tag, round, result, digest, &unanswered),
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
        self.retry_fetches(now_ms, &mut out);
        self.progress(now_ms, &mut out);
        out
    }

    /// Why `signer`'s messages do not count here: its key carries less work than the
    /// network asks for ([`RoundConfig::min_key_work`]).
    fn weak_key(&self, signer: &NodeId) -> Option<Misbehaviour> {
        let needed = self.config.min_key_work;
        if needed == 0 {
            return None;
        }
        let work = signer.key_work();
        (work < needed).then_some(Misbehaviour::WeakKey { work, needed })
    }

    /// Reports misbehaviour, and ignores the offender's digests for the rest of this
    /// round and the next (so one liar cannot keep the round busy with fresh junk).
    fn penalise(&mut self, peer: NodeId, reason: Misbehaviour, out: &mut Vec<Action>) {
        if peer != self.me {
            self.banned.insert(peer, self.cur.round + 1);
            out.push(Action::Penalise { peer, reason });
        }
    }

    /// Runs fork choice and the current round until neither changes anything, then the
    /// heartbeat.
    fn progress(&mut self, now: u64, out: &mut Vec<Action>) {
        // Candidates may adopt (changing the round), the current round may commit
        // (creating candidates): iterate a few times until quiet.
        for _ in 0..4 {
            let tip_before = self.tip.as_ref().map(|t| (t.round, t.result));
            if self.dirty && !self.candidates.is_empty() {
                self.progress_candidates(now, out);
            }
            let again = std::mem::take(&mut self.recheck);
            let committed = self.progress_current(now, out);
            self.dirty = false;
            let tip_after = self.tip.as_ref().map(|t| (t.round, t.result));
            if !committed && tip_before == tip_after && !again {
                break;
            }
            self.dirty = true;
        }
        self.prune_far_announcements();
        self.run_heartbeat(now, out);
    }
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

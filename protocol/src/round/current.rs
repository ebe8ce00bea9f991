//! The round being collected: the canonical selection, closing the window, asking for
//! the aggregation, publishing our digest, committing, and opening the next round.

use std::collections::{BTreeMap, BTreeSet};

use super::fetch::BlobState;
use super::{
    jitter, Action, AggregateInput, AggregationJob, RoundMachine, HEARTBEAT_REDUNDANCY,
    MAX_ANNOUNCEMENTS_PER_ROUND, MAX_REQUESTS,
};
use crate::{Hash, NodeId, RoundDigest, RoundInput, RoundRecord, SignedDigest, MAX_ROUND_INPUTS};

/// The canonical input set of the current round (see `compute_selection`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Selection {
    inputs: Vec<RoundInput>,
    job_inputs: Vec<AggregateInput>,
    pending: bool,
}

/// An aggregate the driver finished for the current round.
#[derive(Clone, Debug)]
pub(super) struct Computed {
    inputs: Vec<RoundInput>,
    job: AggregationJob,
    result: Hash,
}

/// The state of the round being collected.
#[derive(Clone, Debug)]
pub(super) struct Current {
    pub(super) round: u64,
    pub(super) parent: Option<Hash>,
    pub(super) window_end: u64,
    pub(super) closed: bool,
    /// When this node closed the window, or when its selection got its first input if it
    /// had none then (meaningful once `closed`).
    pub(super) closed_at: u64,
    /// Announcements of this round that may enter its selection: those that arrived before
    /// the close or within [`UNASKED_GRACES`] grace periods after it, and those a digest of
    /// this round named within [`NAMED_GRACES`] (known, or being fetched, when named). Later ones are kept (a digest may
    /// still name them, and candidates may need them) but do not change the selection, so
    /// announcements arriving without end (keys made at will) cannot keep a round open.
    pub(super) admitted: BTreeSet<Hash>,
    pub(super) close_requested: bool,
    pub(super) last_change: u64,
    pub(super) selection: Selection,
    pub(super) requested: Option<(AggregationJob, Vec<RoundInput>)>,
    pub(super) computed: Option<Computed>,
    pub(super) published: bool,
    pub(super) digests: BTreeMap<NodeId, SignedDigest>,
    /// Ids of the distinct records reconciled so far.
    pub(super) reconciled: BTreeSet<Hash>,
    /// Distinct contributors in the pool (derived, refreshed when dirty).
    pub(super) pool: usize,
    /// The job for the current selection (derived).
    pub(super) job: Option<AggregationJob>,
    /// `computed` is the result of `job` (derived).
    pub(super) done: bool,
    /// When to publish the digest of `computed`.
    pub(super) publish_at: Option<u64>,
}

impl Current {
    pub(super) fn open(round: u64, parent: Option<Hash>, now: u64, window_ms: u64) -> Self {
        Current {
            round,
            parent,
            window_end: now.saturating_add(window_ms),
            closed: false,
            closed_at: 0,
            admitted: BTreeSet::new(),
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

/// Grace periods after its close during which a round still admits announcements that a
/// digest of the round names.
pub(super) const NAMED_GRACES: u64 = 4;
/// Grace periods after its close during which a round still admits announcements that
/// arrive unasked (this node's own included: a later one waits for the next round).
pub(super) const UNASKED_GRACES: u64 = 2;

impl RoundMachine {
    /// Whether an announcement of the current round arriving now enters its selection: named
    /// by a digest of the round (`named`), or arriving unasked.
    pub(super) fn admits(&self, now: u64, named: bool) -> bool {
        let graces = if named { NAMED_GRACES } else { UNASKED_GRACES };
        !self.cur.closed
            || self.cur.selection.inputs.is_empty()
            || now
                < self
                    .cur
                    .closed_at
                    .saturating_add(self.config.grace_ms.saturating_mul(graces))
    }

    /// Keeps the admitted set within what can matter: past its bound (what the round's
    /// announcements and fetches can hold), ids that are neither an announcement of the
    /// round nor being fetched for it are dropped (requests that failed leave such ids).
    pub(super) fn prune_admitted(&mut self) {
        if self.cur.admitted.len() <= MAX_ANNOUNCEMENTS_PER_ROUND + MAX_REQUESTS {
            return;
        }
        let round = self.cur.round;
        let (anns, requests) = (&self.anns, &self.requests);
        self.cur.admitted.retain(|id| {
            anns.contains_key(&(round, *id)) || requests.get(id).is_some_and(|r| r.round == round)
        });
    }

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
            if !self.cur.admitted.contains(id) {
                continue;
            }
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
        // Contributors whose adapter is held or still coming: one whose every adapter
        // failed (never served, or no adapter) cannot count, so a flood of announcements
        // nobody serves neither closes the window nor stands in for an input.
        let pool = per
            .values()
            .filter(|b| b.held.is_some() || b.fetching.is_some())
            .count();
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
    pub(super) fn progress_current(&mut self, now: u64, out: &mut Vec<Action>) -> bool {
        if self.dirty {
            // Everything derived from the pool is recomputed only when it may change.
            let (sel, pool) = self.compute_selection();
            // The grace period restarts when the inputs change, not when a fetch
            // merely starts or ends (pending fetches block the commit by themselves).
            if sel.inputs != self.cur.selection.inputs {
                self.cur.last_change = now;
            }
            // A closed round whose selection was empty (every input it had failed) takes
            // what arrives as if open, and its admission clock starts with its first input.
            let was_empty = self.cur.selection.inputs.is_empty();
            self.cur.selection = sel;
            if self.cur.closed && was_empty && !self.cur.selection.inputs.is_empty() {
                self.cur.closed_at = now;
            }
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
                self.cur.closed_at = now;
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
        // A round adds its distinct contributing nodes to the chain's weight: a node's
        // (or a gateway's) many user ids count once. Every input's announcement is held here
        // (it was aggregated), so the count is exact.
        let nodes = self
            .contributor_nodes(&c.inputs)
            .unwrap_or(c.inputs.len() as u64);
        let record = |c: &Computed| RoundRecord {
            model: self.model,
            round: self.cur.round,
            parent: self.cur.parent,
            inputs: c.inputs.clone(),
            weight: parent_weight.saturating_add(nodes),
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
        let nodes = self.contributor_nodes(&record.inputs);
        self.extend_chain(&record, nodes);
        self.tip = Some(record);
        self.open_round(now, round + 1, Some(result));
        self.reset_heartbeat(now);
        for (s, r) in better {
            self.add_candidate(s, r);
        }
        true
    }

    pub(super) fn open_round(&mut self, now: u64, round: u64, parent: Option<Hash>) {
        self.cur = Current::open(round, parent, now, self.config.window_ms);
        // Announcements that came ahead of their round are in it.
        self.cur.admitted = self.round_anns(round).map(|(id, _)| *id).collect();
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
        self.settled.clear();
        self.banned.retain(|_, until| *until >= round);
        self.unserved.retain(|_, (until, _)| *until >= round);
        self.invalid.retain(|_, r| *r >= keep_from);
        self.requests.retain(|_, r| r.round >= keep_from);
        let referenced: BTreeSet<Hash> = self.anns.values().map(|a| a.adapter).collect();
        self.blobs.retain(|h, _| referenced.contains(h));
        self.dirty = true;
    }

    /// [`Event::AggregationFinished`](super::Event::AggregationFinished) for the current
    /// round's job: its result becomes the computed aggregate.
    pub(super) fn on_aggregated(&mut self, job: &AggregationJob, result: Hash) {
        if let Some((req, inputs)) = &self.cur.requested {
            if req == job {
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
    }
}

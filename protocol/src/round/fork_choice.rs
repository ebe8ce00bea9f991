//! Fork choice: committed records that beat our tip become candidates, are verified in
//! full (announcements, contributors, weight, recomputed result) and adopted as a
//! switch, a catch-up or a rewind. Also our chain's memory of results and weights.

use std::collections::BTreeSet;

use super::fetch::{BlobState, Settled};
use super::history::{Ancestry, Linking};
use super::{
    Action, AggregateInput, AggregationJob, Misbehaviour, RoundMachine, CHAIN_MEMORY,
    MAX_CANDIDATES,
};

/// Most signers remembered for one candidate: its fetch sources, and what its quorum
/// counts (a quorum is a handful).
const MAX_CANDIDATE_SIGNERS: usize = 64;
use crate::{Hash, NodeId, RoundRecord};

/// A committed foreign record that beats our tip, with who signed it.
#[derive(Clone, Debug)]
pub(super) struct Candidate {
    pub(super) record: RoundRecord,
    pub(super) signers: BTreeSet<NodeId>,
    job: Option<AggregationJob>,
    /// Its ancestors, when its parent is no round of our chain.
    pub(super) ancestry: Ancestry,
    /// Its weight was taken on a quorum's word (nothing of ours to link it to).
    trusted: bool,
}

impl RoundMachine {
    /// `signer` published the committed record `record`, which beats our tip (or our
    /// tip is lonely).
    pub(super) fn add_candidate(&mut self, signer: NodeId, record: RoundRecord) {
        let key = record.id();
        if let Some(c) = self.candidates.get_mut(&key) {
            if c.signers.len() < MAX_CANDIDATE_SIGNERS {
                c.signers.insert(signer);
                self.dirty = true;
            }
            return;
        }
        // A signer backs at most one candidate that is still waiting, for its quorum or for
        // what verifying it needs (its job not asked yet): one key publishing record after
        // record whose announcements it never serves holds one slot, not all of them.
        for c in self.candidates.values_mut() {
            if c.job.is_none() {
                c.signers.remove(&signer);
            }
        }
        self.candidates.retain(|_, c| !c.signers.is_empty());
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
                job: None,
                ancestry: Ancestry::default(),
                trusted: false,
            },
        );
        self.dirty = true;
    }

    /// The weight of `record`'s parent if it is a round of our own chain (0 at genesis), or
    /// `None` when it comes from another history (then its ancestors link it to our chain,
    /// see `history.rs`). The record must weigh that plus its distinct contributing nodes.
    pub(super) fn expected_parent_weight(&self, record: &RoundRecord) -> Option<u64> {
        if record.round == 1 {
            return record.parent.is_none().then_some(0);
        }
        let below = record.round - 1;
        if let Some((result, weight)) = self.chain.get(&below) {
            if record.parent == Some(*result) {
                return Some(*weight);
            }
        }
        // Or a record of another chain we checked before.
        let checked = self.verified.get(&record.parent?)?;
        (checked.round == below).then_some(checked.weight)
    }

    /// Whether `record`'s parent is a round of our own chain (or genesis for round 1): then
    /// its weight is ours to know, and a record that claims another was signed falsely.
    /// (A record of another chain we checked is no such proof: a result does not fix its
    /// record's weight, since one key can announce others' adapters as its own and serve a
    /// variant of a record, the same inputs under its own announcements, of another weight.)
    pub(super) fn parent_on_our_chain(&self, record: &RoundRecord) -> bool {
        if record.round == 1 {
            return record.parent.is_none();
        }
        self.chain
            .get(&(record.round - 1))
            .is_some_and(|(result, _)| record.parent == Some(*result))
    }

    /// Forgets the checked record of another chain whose result is `result`: a record built
    /// on it disagreed with its weight (one of the two is a variant).
    pub(super) fn forget_checked(&mut self, result: Option<Hash>) {
        if let Some(r) = result {
            if self.verified.remove(&r).is_some() {
                self.dirty = true;
                self.recheck = true;
            }
        }
    }

    /// The checked records of other chains between our chain and `from` (whose parent is
    /// one of them, or on our chain), oldest first.
    fn checked_path(&self, from: &RoundRecord) -> Vec<RoundRecord> {
        let mut path = Vec::new();
        let (mut round, mut parent) = (from.round.saturating_sub(1), from.parent);
        while let Some(p) = parent {
            if round == 0 || self.chain.get(&round).is_some_and(|(h, _)| *h == p) {
                break;
            }
            let Some(r) = self.verified.get(&p).filter(|r| r.round == round) else {
                break;
            };
            path.push(r.clone());
            (round, parent) = (r.round.saturating_sub(1), r.parent);
        }
        path.reverse();
        path
    }

    /// Remembers `record`, an ancestor whose weight and result were checked.
    pub(super) fn remember_checked(&mut self, record: RoundRecord) {
        if let Some(known) = self.verified.get(&record.result) {
            if known.weight != record.weight {
                // Two checked records of one result and different weights (a variant): the
                // result is not attached through either; candidates on it walk instead.
                self.verified.remove(&record.result);
                return;
            }
        }
        self.verified.insert(record.result, record);
        while self.verified.len() > super::MAX_VERIFIED {
            let lowest = self
                .verified
                .iter()
                .min_by_key(|(_, r)| r.round)
                .map(|(h, _)| *h);
            match lowest {
                Some(h) => self.verified.remove(&h),
                None => break,
            };
        }
    }

    /// `WrongWeight` when `record`'s parent is a round of our chain (`expected`: its weight)
    /// and `record` does not weigh that plus its `nodes` distinct contributing nodes.
    pub(super) fn wrong_weight(
        &self,
        record: &RoundRecord,
        expected: Option<u64>,
        nodes: u64,
    ) -> Option<Misbehaviour> {
        let w = expected?.saturating_add(nodes);
        (w != record.weight).then_some(Misbehaviour::WrongWeight {
            round: record.round,
            claimed: record.weight,
            expected: w,
        })
    }

    pub(super) fn progress_candidates(&mut self, now: u64, out: &mut Vec<Action>) {
        // Most signers first: what fetch slots free up goes to the records more keys vouch
        // for. (In the order of their ids, keys signing fresh records with ids ground to sort
        // first took every freed slot, and an honest record waited for good.)
        let mut keys: Vec<(usize, Hash)> = self
            .candidates
            .iter()
            .map(|(k, c)| (c.signers.len(), *k))
            .collect();
        keys.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let keys = keys.into_iter().map(|(_, k)| k);
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
            // The history gate, asked again each time: our chain may have changed since the
            // candidate last passed it (a switch can take its parent off our chain, and then
            // its history must link to our chain again).
            let signer_count = c.signers.len();
            let trusted = c.trusted;
            let expected = match self.expected_parent_weight(&c.record) {
                Some(w) => Some(w),
                // Already taken on a quorum's word: not walked again.
                None if trusted => None,
                None => match self.link_history(now, key, out) {
                    Linking::Linked(w) => Some(w),
                    Linking::Pending => continue,
                    Linking::Failed(server, why) => {
                        // The link's server signed a false record (or one it cannot show):
                        // the candidate's other signers are asked instead.
                        self.refuse_server(key, server);
                        if let Some(why) = why {
                            self.penalise(server, why, out);
                        }
                        continue;
                    }
                    Linking::Unserved => {
                        // A history its signers do not show is not taken on their word.
                        self.candidates.remove(&key);
                        continue;
                    }
                    Linking::Unlinkable => {
                        // Nothing of ours to link it to (or not in time). A node with no tip,
                        // or a lonely one (left behind), takes the weight on a quorum's word;
                        // any other keeps its chain (a later digest brings it back).
                        if let Some(c) = self.candidates.get_mut(&key) {
                            c.ancestry.unlinkable = true;
                        }
                        // A node that takes no one's word does not keep it waiting for a
                        // quorum either: keys each publishing such a record would fill the
                        // candidate slots for good.
                        if !self.takes_quorums_word(now) {
                            self.candidates.remove(&key);
                            continue;
                        }
                        if signer_count < self.config.catch_up_quorum {
                            continue;
                        }
                        if !self.may_trust(now, key) {
                            self.candidates.remove(&key);
                            continue;
                        }
                        None
                    }
                },
            };
            let Some(c) = self.candidates.get_mut(&key) else {
                continue;
            };
            c.trusted = expected.is_none();
            let record = c.record.clone();
            let signers: Vec<NodeId> = c.signers.iter().copied().collect();
            let had_job = c.job.clone();
            let mut failure = None;
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
                    // Its signers committed it, so they hold its inputs' announcements. One
                    // whose fetch ran out, asking some of them, is one those do not show: the
                    // record is not waited for, and they are not asked again for a while (a
                    // signer never asked is not held to it). One served but not kept here is
                    // not checkable here. (Before, such a record was asked for again and
                    // again: a few keys each signing one that names 512 made-up announcements
                    // held every announcement fetch, the current round's too.)
                    let id = input.announcement;
                    match self.settled.get(&id) {
                        Some(Settled::Unkept) => {
                            (unverifiable, missing) = (true, true);
                            break;
                        }
                        Some(Settled::Silent(silent)) => {
                            let blamed: Vec<NodeId> = signers
                                .iter()
                                .filter(|s| silent.contains(s))
                                .copied()
                                .collect();
                            if !blamed.is_empty() {
                                for s in blamed {
                                    self.mark_unserved(now, s);
                                }
                                (unverifiable, missing) = (true, true);
                                break;
                            }
                        }
                        None => {}
                    }
                    if signers.iter().all(|s| self.is_unserved(s)) {
                        (unverifiable, missing) = (true, true);
                        break;
                    }
                    for s in &signers {
                        self.request_announcement(
                            now,
                            id,
                            (record.round, input.adapter),
                            *s,
                            true,
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
            // Every announcement known: the weight is the parent's plus the distinct nodes.
            if failure.is_none() && !missing {
                let nodes: BTreeSet<NodeId> = keys_seen.iter().map(|(n, _)| *n).collect();
                failure = self.wrong_weight(&record, expected, nodes.len() as u64);
            }
            // A rule that builds on the parent needs the parent round adapter too: ours when
            // the parent is on our chain, else fetched from the record's signers.
            if failure.is_none() && record.rule.builds_on_parent() {
                if let Some(parent) = record.parent {
                    let ours = self.chain.values().any(|(result, _)| *result == parent);
                    let state = self.blobs.get(&parent).map(|b| b.state.clone());
                    if !ours && state != Some(BlobState::Held) {
                        let before = self.blobs.get(&parent).map(|b| b.sources.len());
                        self.want_round_adapter(now, parent, &signers, out);
                        let after = self.blobs.get(&parent).map(|b| b.sources.len());
                        if state == Some(BlobState::Failed) && before == after {
                            unverifiable = true;
                        }
                        missing = true;
                    }
                }
            }
            if let Some(why) = failure {
                if matches!(why, Misbehaviour::WrongWeight { .. })
                    && !self.parent_on_our_chain(&record)
                {
                    // The parent's weight came from another chain's record, which may be a
                    // variant: nobody is blamed. Its server is not asked again (a linked
                    // parent), or the checked record is forgotten and the history walked.
                    let server = self
                        .candidates
                        .get(&key)
                        .filter(|c| c.ancestry.complete())
                        .and_then(|c| c.ancestry.first_server());
                    match server {
                        Some(s) => self.refuse_server(key, s),
                        None => self.forget_checked(record.parent),
                    }
                    continue;
                }
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
    /// then orphaned). `links`: its verified ancestors (newest first) when its parent was no
    /// round of our chain; they join our chain memory with it. `false` when its path to our
    /// chain no longer holds (nothing adopted: it is to be verified again); `true` when it
    /// was adopted, or no longer beats our tip.
    fn adopt(
        &mut self,
        now: u64,
        record: RoundRecord,
        links: &[RoundRecord],
        out: &mut Vec<Action>,
    ) -> bool {
        if self.tip.as_ref().is_some_and(|t| !record.beats(t)) && !self.lonely(now) {
            return true;
        }
        // Its ancestors first, oldest first (checked earlier, then linked now): our chain
        // now runs through them (each replaces our record of its round, and the first
        // orphans the rest of our fork).
        let oldest = links.last().unwrap_or(&record);
        let mut path = self.checked_path(oldest);
        path.extend(links.iter().rev().cloned());
        // The path must reach our chain (or genesis; a record taken on a quorum's word has no
        // path). A checked record in it may have been
        // forgotten since (a variant of it, or too many others checked): then the record
        // above the gap is forgotten too and nothing is adopted (a later digest brings the
        // candidate back, and its history is walked again). Before, the rounds above the gap
        // were committed on a parent this node never had.
        if let Some(first) = path.first().filter(|f| !self.parent_on_our_chain(f)) {
            self.forget_checked(Some(first.result));
            return false;
        }
        for link in path.iter().chain(std::iter::once(&record)) {
            let replaces = self
                .chain
                .get(&link.round)
                .map(|(h, _)| *h)
                .filter(|h| *h != link.result);
            out.push(Action::Commit {
                record: link.clone(),
                replaces,
            });
            if link.round < record.round {
                let nodes = self.contributor_nodes(&link.inputs);
                self.extend_chain(link, nodes);
            }
        }
        let same_round = self.tip.as_ref().is_some_and(|t| t.round == record.round);
        let (round, result) = (record.round, record.result);
        let nodes = self.contributor_nodes(&record.inputs);
        self.extend_chain(&record, nodes);
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
        true
    }

    /// Records `record` as the newest round of our chain, dropping anything at or
    /// above its round and any remembered history it does not descend from. `nodes`: its
    /// distinct contributing nodes, when known, which give its parent's weight.
    pub(super) fn extend_chain(&mut self, record: &RoundRecord, nodes: Option<u64>) {
        let _orphans = self.chain.split_off(&record.round);
        let parent_known = record.round > 1
            && self
                .chain
                .get(&(record.round - 1))
                .is_some_and(|(h, _)| Some(*h) == record.parent);
        if !parent_known {
            self.chain.clear();
            if let (Some(p), Some(n)) = (record.parent, nodes) {
                self.chain
                    .insert(record.round - 1, (p, record.weight.saturating_sub(n)));
            }
        }
        self.chain
            .insert(record.round, (record.result, record.weight));
        while self.chain.len() > CHAIN_MEMORY {
            self.chain.pop_first();
        }
    }

    /// Whether candidate `key`, of a history we cannot link, may have its weight taken on
    /// the word of its signers: at least `catch_up_quorum` of them, at a node with no tip or
    /// one alone on it for a while (left behind: [`Self::takes_quorums_word`]), and never
    /// while a candidate we can still link has as many signers: a node that lags or
    /// restarts takes the history it can check, and a coalition's unlinkable record waits
    /// behind it. (Not behind an unlinkable one with more signers: one that stalls, its
    /// inputs never served, would hold every catch-up off.) A node with company on its chain never takes
    /// another history on anyone's word: signers are keys, which cost nothing in an open
    /// network, so their number is no measure of a chain's weight. (Counting them against
    /// the nodes known on our chain, tried, had a coalition of 4 keys adopted by nodes that
    /// knew fewer: simulator, `--colluding-history --sybil-keys`, seed 7.)
    pub(super) fn may_trust(&self, now: u64, key: Hash) -> bool {
        let Some(signers) = self.candidates.get(&key).map(|c| c.signers.len()) else {
            return false;
        };
        let outvoted = self.candidates.iter().any(|(k, c)| {
            *k != key && !c.trusted && !c.ancestry.unlinkable && c.signers.len() >= signers
        });
        signers >= self.config.catch_up_quorum && !outvoted && self.takes_quorums_word(now)
    }

    /// Our tip has been ours alone (no other signer's committed digest matched it) for
    /// two heartbeat periods.
    pub(super) fn lonely(&self, now: u64) -> bool {
        self.lonely_for(now, 2 * self.config.heartbeat_ms)
    }

    /// Our tip has been ours alone for `span`.
    fn lonely_for(&self, now: u64, span: u64) -> bool {
        self.tip.is_some()
            && now >= self.tip_since.saturating_add(span)
            && self.tip_support.len() + 1 < self.config.catch_up_quorum
    }

    /// Whether we take a history we cannot link on a quorum's word at all: with no tip,
    /// or with one that has been ours alone for as long as linking a history may take
    /// (and two heartbeat periods at least). A tip is often alone for a moment (just
    /// committed, or on a small fork that a linkable heavier history will replace): a
    /// coalition's far-ahead record waiting for such a moment must not be taken then.
    pub(super) fn takes_quorums_word(&self, now: u64) -> bool {
        let span = self.link_patience().max(2 * self.config.heartbeat_ms);
        self.tip.is_none() || self.lonely_for(now, span)
    }

    /// [`Event::AggregationFinished`](super::Event::AggregationFinished) for a
    /// candidate's job: adopt it when the result matches, penalise its signers otherwise.
    pub(super) fn on_candidate_aggregated(
        &mut self,
        now: u64,
        job: &AggregationJob,
        result: Hash,
        out: &mut Vec<Action>,
    ) {
        let key = self
            .candidates
            .iter()
            .find(|(_, c)| c.job.as_ref() == Some(job))
            .map(|(k, _)| *k);
        let Some(key) = key else { return };
        let trusted =
            self.candidates.get(&key).is_some_and(|c| c.trusted) && self.may_trust(now, key);
        let Some(c) = self.candidates.remove(&key) else {
            return;
        };
        // The history gate and the weight once more: our chain may have changed while the
        // job ran. (Every input's announcement is held: the job was made from them.)
        let on_chain = self.expected_parent_weight(&c.record);
        let linked = on_chain
            .is_none()
            .then(|| self.linked_weight(&c.ancestry))
            .flatten();
        let expected = on_chain.or(linked);
        if expected.is_none() && !trusted {
            return;
        }
        let nodes = self.contributor_nodes(&c.record.inputs);
        if let Some(why) = nodes.and_then(|n| self.wrong_weight(&c.record, expected, n)) {
            // Blamed only against our own chain's weight (see `parent_on_our_chain`).
            if self.parent_on_our_chain(&c.record) {
                for s in &c.signers {
                    self.penalise(*s, why.clone(), out);
                }
            }
            return;
        }
        if c.record.result == result {
            let links = if linked.is_some() {
                c.ancestry.links.clone()
            } else {
                Vec::new()
            };
            if !self.adopt(now, c.record.clone(), &links, out) {
                // Its path to our chain broke meanwhile: it is verified again from the
                // start, its history walked anew.
                self.candidates.insert(
                    key,
                    Candidate {
                        job: None,
                        ancestry: Ancestry::default(),
                        trusted: false,
                        ..c
                    },
                );
                self.dirty = true;
                self.recheck = true;
            }
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
}

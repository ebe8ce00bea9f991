//! Histories of other chains. A candidate whose parent is no round of our chain is linked
//! to our chain through its ancestors: fetched from its signers one round at a time
//! (`Action::FetchRecord`) until one's parent is a round we remember (or genesis). Then,
//! from the oldest up, each ancestor is checked as a candidate is: its inputs'
//! announcements (valid, of its round, one per contributor), its weight (its parent's plus
//! its distinct contributing nodes) and its result, recomputed from its inputs' adapters.
//! So neither a chain's weight nor a round adapter is taken on anyone's word where we can
//! link the chain; only a node that knows no chain to link to (no tip, or a lonely one)
//! takes a quorum's word, as before.

use std::collections::BTreeSet;

use super::fetch::{BlobState, Settled};
use super::{Action, AggregateInput, AggregationJob, Misbehaviour, RoundMachine, CHAIN_MEMORY};
use crate::{Hash, NodeId, RoundRecord, SignedDigest};

/// Where a candidate's history stands.
pub(super) enum Linking {
    /// Linked to our chain (or genesis) through checked ancestors: its parent's weight.
    Linked(u64),
    /// Waiting for an ancestor, or for the announcements, adapters or aggregation of one.
    Pending,
    /// Its history runs below what we remember (further back than our chain memory, or
    /// than [`CHAIN_MEMORY`] links), or names inputs nobody serves any more, as every
    /// signer asked showed it, or was not linked in time: nothing of ours to link it to.
    Unlinkable,
    /// No signer is left to ask (each served nothing, or a path that does not hold), and
    /// none showed a history too deep to link: a history nobody shows.
    Unserved,
    /// A link, as `server` served it, does not hold: with a misbehaviour when its record
    /// names an invalid or mismatched announcement or a contributor twice, or claims a
    /// wrong weight or result (its server signed a false record); without one when its
    /// parent or one of its input adapters is to be had from nobody. The link and the
    /// ones below it are dropped and `server` is not asked again for this candidate; the
    /// walk goes on with the other signers (see [`RoundMachine::refuse_server`]).
    Failed(NodeId, Option<Misbehaviour>),
}

/// A candidate's ancestors fetched so far, newest first, and the work on them.
#[derive(Clone, Debug, Default)]
pub(super) struct Ancestry {
    pub(super) links: Vec<RoundRecord>,
    /// Who signed each link's digest, as served (parallel to `links`).
    servers: Vec<NodeId>,
    /// The pending fetch: its round and result, and its tag.
    asked: Option<(u64, Hash, Hash)>,
    /// Who the pending fetch asked.
    asked_from: Vec<NodeId>,
    /// Signers not asked again for this candidate's history: they served a link that did
    /// not hold, or a path that does not reach us, or did not serve what they were asked.
    /// So keys among honest signers cannot get an honest candidate dropped by serving a
    /// variant of an ancestor first, or by serving nothing.
    refused: BTreeSet<NodeId>,
    /// A path some signer showed ran deeper than we can link, or named inputs to be had
    /// from nobody (too old): when no signer is left, the history is unlinkable rather
    /// than unserved.
    deep: bool,
    /// The walk ended without a link to our chain (see [`Linking::Unlinkable`]).
    pub(super) unlinkable: bool,
    /// When the walk began.
    since: Option<u64>,
    /// Links, from the oldest, whose weight and result are checked.
    checked: usize,
    /// The aggregation recomputing the oldest unchecked link.
    job: Option<AggregationJob>,
    /// Where the checked links attach: the weight of our round below the oldest. A walk
    /// that goes further back (our chain moved) or a new attachment starts the checks over.
    base: Option<u64>,
}

impl Ancestry {
    /// Every link is checked (and there is at least one).
    pub(super) fn complete(&self) -> bool {
        !self.links.is_empty() && self.checked == self.links.len()
    }

    /// Who served the newest link (the candidate's parent).
    pub(super) fn first_server(&self) -> Option<NodeId> {
        self.servers.first().copied()
    }
}

/// Most signers one record fetch asks (one after another).
const RECORD_SOURCES: usize = 8;

impl RoundMachine {
    /// Walks the history of candidate `key` toward our chain: asks for the next ancestor,
    /// or, once linked, checks the oldest unchecked one (asking for its announcements and
    /// adapters, then for its aggregation).
    pub(super) fn link_history(&mut self, now: u64, key: Hash, out: &mut Vec<Action>) -> Linking {
        let linking = self.walk(now, key, out);
        let patience = self.link_patience();
        let Some(c) = self.candidates.get_mut(&key) else {
            return linking;
        };
        let since = *c.ancestry.since.get_or_insert(now);
        match linking {
            Linking::Pending if now >= since.saturating_add(patience) => Linking::Unlinkable,
            other => other,
        }
    }

    /// How long a history may take to link: a walk that does not end within the time a few
    /// fetches take counts as one that cannot link (peers forget the inputs of old rounds:
    /// a node keeps 16 rounds of them, so an honest history far enough back cannot be
    /// checked either).
    pub(super) fn link_patience(&self) -> u64 {
        self.config
            .fetch_timeout_ms
            .saturating_mul(u64::from(self.config.fetch_attempts))
            .saturating_mul(2)
    }

    fn walk(&mut self, now: u64, key: Hash, out: &mut Vec<Action>) -> Linking {
        let Some(c) = self.candidates.get(&key) else {
            return Linking::Pending;
        };
        let signers: Vec<NodeId> = c
            .signers
            .iter()
            .filter(|s| !c.ancestry.refused.contains(s))
            .copied()
            .collect();
        let oldest = c.ancestry.links.last().unwrap_or(&c.record);
        if let Some(base) = self.expected_parent_weight(oldest) {
            if let Some(c) = self.candidates.get_mut(&key) {
                // Attached: an answer still on its way is not wanted any more.
                c.ancestry.asked = None;
                c.ancestry.asked_from.clear();
            }
            return self.check_next_link(now, key, base, &signers, out);
        }
        // The next ancestor: the oldest one's parent. `Err(deep)`: no chain of ours links
        // to it, because it runs deeper than we can link (`deep`) or cannot link at all.
        let next = match (oldest.round.saturating_sub(1), oldest.parent) {
            // A record after round 1 trained from the base model, or a round-1 record with
            // a parent (no history has one).
            (_, None) | (0, Some(_)) => Err(false),
            (round, Some(parent)) => {
                // Below the rounds we remember nothing links (but genesis, for a node that
                // remembers none), and no more than [`CHAIN_MEMORY`] links are fetched.
                let below = self
                    .chain
                    .first_key_value()
                    .is_some_and(|(r, _)| round < *r);
                let reach = self.chain.last_key_value().map_or(0, |(r, _)| *r);
                let budget = CHAIN_MEMORY.saturating_sub(c.ancestry.links.len()) as u64;
                if below || budget == 0 || round > reach.saturating_add(budget) {
                    Err(true)
                } else {
                    Ok((round, parent))
                }
            }
        };
        let oldest_server = c.ancestry.servers.last().copied();
        let (deep, pending) = (c.ancestry.deep, c.ancestry.asked);
        let (round, parent) = match (next, oldest_server) {
            (Ok(next), _) => next,
            (Err(too_deep), Some(server)) => {
                // The oldest link, as its server showed it, does not reach us: that server
                // is not asked again, its links go, and the walk goes on from the link above
                // them with the other signers (an honest one may show a path that reaches
                // us where the liar's did not; honest signers all show the same one, so a
                // history that is truly too deep ends once every signer showed it).
                if let Some(c) = self.candidates.get_mut(&key) {
                    c.ancestry.deep |= too_deep;
                }
                self.refuse_server(key, server);
                return Linking::Pending;
            }
            // The candidate itself cannot link.
            (Err(_), None) => return Linking::Unlinkable,
        };
        if signers.is_empty() {
            return if deep {
                Linking::Unlinkable
            } else {
                Linking::Unserved
            };
        }
        if pending.is_some_and(|(r, h, _)| (r, h) == (round, parent)) {
            return Linking::Pending;
        }
        // The server of the oldest link is asked first for its parent: it vouched for it.
        let mut from: Vec<NodeId> = Vec::with_capacity(RECORD_SOURCES);
        from.extend(oldest_server.filter(|s| signers.contains(s)));
        from.extend(
            signers
                .iter()
                .filter(|s| Some(**s) != oldest_server)
                .take(RECORD_SOURCES - from.len()),
        );
        self.record_fetches = self.record_fetches.wrapping_add(1);
        let tag = Hash::of(&[key.0.as_slice(), &self.record_fetches.to_le_bytes()].concat());
        if let Some(c) = self.candidates.get_mut(&key) {
            c.ancestry.asked = Some((round, parent, tag));
            c.ancestry.asked_from = from.clone();
        }
        out.push(Action::FetchRecord {
            tag,
            round,
            result: parent,
            from,
        });
        Linking::Pending
    }

    /// Checks the oldest unchecked link of candidate `key` (its parent weighs `base` if it
    /// is the oldest link, else the link below it): announcements, weight, then its
    /// result, recomputed once its input adapters (and, for a rule that builds on the
    /// parent, its parent round adapter) are held.
    fn check_next_link(
        &mut self,
        now: u64,
        key: Hash,
        base: u64,
        signers: &[NodeId],
        out: &mut Vec<Action>,
    ) -> Linking {
        let Some(c) = self.candidates.get_mut(&key) else {
            return Linking::Pending;
        };
        if c.ancestry.base != Some(base) {
            c.ancestry.base = Some(base);
            c.ancestry.checked = 0;
            c.ancestry.job = None;
        }
        let a = &c.ancestry;
        let n = a.links.len();
        if a.checked >= n {
            return match a.links.first() {
                Some(l) => Linking::Linked(l.weight),
                None => Linking::Pending,
            };
        }
        let idx = n - 1 - a.checked;
        let link = a.links[idx].clone();
        let server = a.servers[idx];
        // What the link must weigh above, and who vouched for that weight: our chain (or
        // genesis), a record of another chain checked before, or the link below it (and its
        // server).
        let (below, below_server) = if a.checked == 0 {
            (base, None)
        } else {
            (a.links[idx + 1].weight, Some(a.servers[idx + 1]))
        };
        let pending_job = a.job.clone();
        let fail = |why| Linking::Failed(server, Some(why));
        // Announcements: valid, of this round and adapter, one per contributor.
        let mut keys = BTreeSet::new();
        let mut inputs = Vec::with_capacity(link.inputs.len());
        let mut contributors = Vec::with_capacity(link.inputs.len());
        let mut missing = false;
        for input in &link.inputs {
            let id = input.announcement;
            if self.invalid.contains_key(&id) {
                return fail(Misbehaviour::NamedInvalidAnnouncement { id });
            }
            let Some(ann) = self.ann(&id) else {
                // Of the link's server alone: it committed the link, so it holds its inputs
                // (for 16 rounds), and what it cannot show counts against it, not against
                // the candidate's other signers.
                match self.settled.get(&id) {
                    // Served, but not kept here: not checkable here, nobody's fault.
                    Some(Settled::Unkept) => return Linking::Unlinkable,
                    // Asked of it until its fetch ran out.
                    Some(Settled::Silent(silent)) if silent.contains(&server) => {
                        return Linking::Failed(server, None)
                    }
                    _ => {}
                }
                if self.is_unserved(&server) {
                    // It failed to serve what it named lately: not waited for.
                    return Linking::Failed(server, None);
                }
                self.request_announcement(now, id, (link.round, input.adapter), server, true, out);
                missing = true;
                continue;
            };
            if ann.round != link.round || ann.adapter != input.adapter || ann.model != self.model {
                return fail(Misbehaviour::NamedMismatchedAnnouncement { id });
            }
            if !keys.insert((ann.contributor, ann.user_id.clone())) {
                return fail(Misbehaviour::DuplicateContributor { round: link.round });
            }
            contributors.push(ann.contributor);
            inputs.push(AggregateInput {
                adapter: input.adapter,
                samples: ann.samples,
            });
        }
        if missing {
            return Linking::Pending;
        }
        let nodes: BTreeSet<NodeId> = keys.iter().map(|(n, _)| *n).collect();
        if let Some(why) = self.wrong_weight(&link, Some(below), nodes.len() as u64) {
            // A weight is only proven false against our own chain's, or against a record its
            // own server signed too. A result does not fix its record's weight (one key can
            // announce others' adapters as its own and serve a variant of another weight), so
            // against a record another server showed nobody is penalised. That server is
            // asked for a link's parent first and answers unless it cannot: a parent from
            // someone else means this link's server did not back its own link, so it is the
            // one not asked again. (Refusing the server below instead let one key serve a
            // heavier variant, stay silent for its parent, and get every honest server that
            // showed the parent refused, one after another, until the honest history was
            // dropped as unserved.) Against a record checked before, that record is
            // forgotten and the history walked.
            return match below_server {
                None if self.parent_on_our_chain(&link) => fail(why),
                None => {
                    self.forget_checked(link.parent);
                    Linking::Pending
                }
                Some(s) if s == server => fail(why),
                Some(_) => Linking::Failed(server, None),
            };
        }
        // Its result: recomputed from its inputs' adapters.
        // An adapter that failed from every source we knew is asked again of any source we
        // did not try; one with none left is to be had from nobody.
        let mut nowhere = false;
        for (input, contributor) in link.inputs.iter().zip(&contributors) {
            let state = self.blobs.get(&input.adapter).map(|b| b.state.clone());
            if state == Some(BlobState::Held) {
                continue;
            }
            // From the link's server and the input's contributor only: a fetch that fails
            // marks its sources unserved, which must not reach the candidate's other signers
            // for a link a liar served.
            let srcs = [server, *contributor];
            let before = self.blobs.get(&input.adapter).map(|b| b.sources.len());
            self.want_blob(now, input.adapter, &srcs, out);
            let after = self.blobs.get(&input.adapter).map(|b| b.sources.len());
            nowhere |= state == Some(BlobState::Failed) && before == after;
            missing = true;
        }
        if link.rule.builds_on_parent() {
            if let Some(parent) = link.parent {
                let state = self.blobs.get(&parent).map(|b| b.state.clone());
                let ours = self.chain.values().any(|(r, _)| *r == parent);
                if state != Some(BlobState::Held) && !ours {
                    let before = self.blobs.get(&parent).map(|b| b.sources.len());
                    self.want_round_adapter(now, parent, signers, out);
                    let after = self.blobs.get(&parent).map(|b| b.sources.len());
                    nowhere |= state == Some(BlobState::Failed) && before == after;
                    missing = true;
                }
            }
        }
        if nowhere {
            // Gone everywhere: too old to check (nodes keep 16 rounds of inputs), or never
            // served. Either way no chain of ours links through it.
            if let Some(c) = self.candidates.get_mut(&key) {
                c.ancestry.deep = true;
            }
            return Linking::Failed(server, None);
        }
        if missing {
            return Linking::Pending;
        }
        let job = AggregationJob {
            round: link.round,
            parent: link.parent,
            rule: link.rule,
            inputs,
        };
        if pending_job.as_ref() != Some(&job) {
            if let Some(c) = self.candidates.get_mut(&key) {
                c.ancestry.job = Some(job.clone());
            }
            out.push(Action::Aggregate(job));
        }
        Linking::Pending
    }

    /// The weight of the parent of a candidate whose links are all checked, if the oldest
    /// still attaches to our chain (it may have moved meanwhile).
    pub(super) fn linked_weight(&self, ancestry: &Ancestry) -> Option<u64> {
        if !ancestry.complete() {
            return None;
        }
        let base = self.expected_parent_weight(ancestry.links.last()?)?;
        if ancestry.base != Some(base) {
            // Checked above another weight (our chain moved meanwhile).
            return None;
        }
        ancestry.links.first().map(|l| l.weight)
    }

    /// [`Event::Record`](super::Event::Record): the answer to the record fetch tagged
    /// `tag`, as a peer served it (a signed digest), or `None`, with the peers asked that
    /// served nothing.
    pub(super) fn on_record(
        &mut self,
        tag: Hash,
        round: u64,
        result: Hash,
        digest: Option<SignedDigest>,
        unanswered: &[NodeId],
    ) {
        let (model, rule) = (self.model, self.config.rule);
        let Some((key, c)) = self
            .candidates
            .iter_mut()
            .find(|(_, c)| c.ancestry.asked == Some((round, result, tag)))
        else {
            return;
        };
        let key = *key;
        c.ancestry.asked = None;
        self.dirty = true;
        let asked_from = std::mem::take(&mut c.ancestry.asked_from);
        // The candidate's own parent: every signer signed a record on it, so those asked
        // that served nothing are not asked again (whoever served after them). A link's
        // parent: only the link's server vouched for it (a liar's link names a parent no
        // honest signer holds), so if nobody served it, that server alone is refused, with
        // its links.
        let oldest_server = c.ancestry.servers.last().copied();
        if oldest_server.is_none() {
            c.ancestry.refused.extend(
                unanswered
                    .iter()
                    .filter(|p| asked_from.contains(p))
                    .copied(),
            );
        }
        let Some(d) = digest else {
            match oldest_server {
                Some(server) => self.refuse_server(key, server),
                None => c.ancestry.refused.extend(asked_from),
            }
            return;
        };
        let (r, server) = (&d.payload().record, d.payload().signer);
        let fits = d.payload().committed
            && r.round == round
            && r.result == result
            && r.model == model
            && r.rule == rule
            && r.check().is_ok();
        if !fits || !asked_from.contains(&server) || c.ancestry.refused.contains(&server) {
            // Not what was asked, or from a signer we did not ask: asked again of the others.
            c.ancestry.refused.insert(server);
            return;
        }
        // One further back: whatever was checked was checked above another base.
        c.ancestry.links.push(r.clone());
        c.ancestry.servers.push(server);
        c.ancestry.checked = 0;
        c.ancestry.job = None;
        c.ancestry.base = None;
    }

    /// `server` served a link of candidate `key`'s history that does not hold: that link and
    /// the ones below it (fetched through it) are dropped, and the walk goes on with the
    /// candidate's other signers. Links checked already stay remembered as checked.
    pub(super) fn refuse_server(&mut self, key: Hash, server: NodeId) {
        let Some(c) = self.candidates.get_mut(&key) else {
            return;
        };
        let a = &mut c.ancestry;
        a.refused.insert(server);
        if let Some(idx) = a.servers.iter().position(|s| *s == server) {
            a.links.truncate(idx);
            a.servers.truncate(idx);
        }
        a.asked = None;
        a.asked_from.clear();
        a.checked = 0;
        a.job = None;
        a.base = None;
        self.dirty = true;
        self.recheck = true;
    }

    /// [`Event::AggregationFinished`](super::Event::AggregationFinished) for a job that
    /// recomputes a link: the link is checked, or its candidate dropped and the link's
    /// signer penalised.
    pub(super) fn on_link_aggregated(
        &mut self,
        job: &AggregationJob,
        result: Hash,
        out: &mut Vec<Action>,
    ) {
        let keys: Vec<Hash> = self
            .candidates
            .iter()
            .filter(|(_, c)| c.ancestry.job.as_ref() == Some(job))
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            let Some(c) = self.candidates.get_mut(&key) else {
                continue;
            };
            let a = &mut c.ancestry;
            a.job = None;
            let Some(idx) = a.links.len().checked_sub(1 + a.checked) else {
                continue;
            };
            let link = &a.links[idx];
            if link.round != job.round || link.parent != job.parent {
                // Not the link this job was for any more.
                continue;
            }
            if link.result == result {
                a.checked += 1;
                let link = link.clone();
                self.dirty = true;
                self.remember_checked(link);
                continue;
            }
            let why = Misbehaviour::WrongResult {
                round: link.round,
                claimed: link.result,
                computed: result,
            };
            let server = a.servers[idx];
            self.refuse_server(key, server);
            self.penalise(server, why, out);
        }
    }
}

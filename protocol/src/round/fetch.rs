//! Fetches of adapter blobs and announcements: who to ask, timeouts and retries, and
//! what a failure means (an invalid announcement penalises whoever named it).

use std::collections::{BTreeMap, BTreeSet};

use super::{Action, FetchFailure, Misbehaviour, RoundMachine, MAX_REQUESTS};

/// Announcement fetches one namer's digests or records may have in flight: one record's
/// inputs.
const MAX_REQUESTS_PER_NAMER: usize = crate::MAX_ROUND_INPUTS;
/// Announcement fetches in flight to verify records of other histories (candidates and
/// their ancestors).
const MAX_CATCH_UP_REQUESTS: usize = MAX_REQUESTS / 2;
use crate::{Hash, NodeId, RoundInput};

/// Where an adapter blob is in the local store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum BlobState {
    Held,
    Fetching { deadline: u64, attempts: u32 },
    Failed,
}

/// An adapter blob the machine wants, with the peers to fetch it from.
#[derive(Clone, Debug)]
pub(super) struct Blob {
    pub(super) state: BlobState,
    pub(super) sources: BTreeSet<NodeId>,
    /// A parent round adapter rather than an input adapter.
    pub(super) round_adapter: bool,
    /// How the last attempt failed, if it did.
    pub(super) last_failure: Option<FetchFailure>,
}

impl Blob {
    /// The action that fetches this blob.
    fn fetch(&self, hash: Hash) -> Action {
        let from = self.sources.iter().copied().collect();
        if self.round_adapter {
            Action::FetchRoundAdapter { hash, from }
        } else {
            Action::FetchBlob { hash, from }
        }
    }
}

/// An announcement fetch in flight, asked for because digests or candidates named it.
#[derive(Clone, Debug)]
pub(super) struct AnnRequest {
    /// What each namer claimed the announcement is: (round, adapter).
    pub(super) claims: BTreeMap<NodeId, (u64, Hash)>,
    /// Round used for pruning and for "pending" (the first claim's round).
    pub(super) round: u64,
    pub(super) deadline: u64,
    pub(super) attempts: u32,
    /// Namers that named it in a record of another history (a candidate or an ancestor of
    /// one) being verified: they are not held to serve it the way a current-round digest's
    /// namers are (see [`RoundMachine::distrust_namers`]); what their fetch came to is
    /// settled instead (see [`Settled`]).
    pub(super) history: BTreeSet<NodeId>,
    /// Namers that at least one attempt asked.
    pub(super) asked: BTreeSet<NodeId>,
    /// Of `asked`, those first asked by attempts made since the last failure reported: not
    /// asked after all if the next is [`FetchFailure::Busy`] (some were left unasked).
    pub(super) unconfirmed: BTreeSet<NodeId>,
}

impl AnnRequest {
    /// Asked for to verify another history (by some namer at least).
    pub(super) fn for_history(&self) -> bool {
        !self.history.is_empty()
    }

    /// The next attempt's action: every namer is asked (see [`Action`] for what the driver
    /// does with an attempt made while another runs).
    fn attempt(&mut self, id: Hash) -> Action {
        for n in self.claims.keys() {
            if self.asked.insert(*n) {
                self.unconfirmed.insert(*n);
            }
        }
        Action::FetchAnnouncement {
            id,
            from: self.claims.keys().copied().collect(),
        }
    }
}

/// How an announcement fetch asked for to verify another history ended without the
/// announcement being kept. Remembered until the next round opens, at most
/// [`MAX_REQUESTS`] of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Settled {
    /// Every attempt ran out: these namers were asked and served nothing.
    Silent(BTreeSet<NodeId>),
    /// It was served but not kept (its round or its signer's share was full, or it was
    /// stamped in the future): not checkable here, and nobody's fault.
    Unkept,
}

impl RoundMachine {
    /// A current-round digest from `namer` lists `input`.
    pub(super) fn want_input(
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
        self.request_announcement(
            now,
            input.announcement,
            (round, input.adapter),
            namer,
            false,
            out,
        );
    }

    pub(super) fn request_announcement(
        &mut self,
        now: u64,
        id: Hash,
        (round, adapter): (u64, Hash),
        namer: NodeId,
        catch_up: bool,
        out: &mut Vec<Action>,
    ) {
        // A namer that did not serve what it named is not asked again for a while (and
        // what only it names is not waited for); nor is what was served and refused lately.
        if self.is_unserved(&namer) || self.refused.get(&id).is_some_and(|until| *until > now) {
            return;
        }
        if let Some(req) = self.requests.get_mut(&id) {
            req.claims.entry(namer).or_insert((round, adapter));
            if catch_up {
                req.history.insert(namer);
            }
            return;
        }
        if self.requests.len() >= MAX_REQUESTS {
            return;
        }
        // What verifying other histories asks for takes at most half of the fetches, so
        // records that name announcements nobody serves cannot crowd out the current
        // round's.
        if catch_up
            && self.requests.values().filter(|r| r.for_history()).count() >= MAX_CATCH_UP_REQUESTS
        {
            return;
        }
        // One namer's unknown ids take at most a record's worth of the fetches in flight, so
        // one key cannot fill them and crowd out what honest digests name.
        let by_namer = self
            .requests
            .values()
            .filter(|r| r.claims.contains_key(&namer))
            .count();
        if by_namer >= MAX_REQUESTS_PER_NAMER {
            return;
        }
        let mut req = AnnRequest {
            claims: BTreeMap::from([(namer, (round, adapter))]),
            round,
            deadline: now.saturating_add(self.config.fetch_timeout_ms),
            attempts: 1,
            history: BTreeSet::new(),
            asked: BTreeSet::new(),
            unconfirmed: BTreeSet::new(),
        };
        if catch_up {
            req.history.insert(namer);
        }
        out.push(req.attempt(id));
        self.requests.insert(id, req);
        self.dirty = true;
    }

    pub(super) fn want_blob(
        &mut self,
        now: u64,
        hash: Hash,
        sources: &[NodeId],
        out: &mut Vec<Action>,
    ) {
        self.want(now, hash, sources, false, out);
    }

    /// A parent round adapter that a record's verification needs, from its signers.
    pub(super) fn want_round_adapter(
        &mut self,
        now: u64,
        hash: Hash,
        sources: &[NodeId],
        out: &mut Vec<Action>,
    ) {
        self.want(now, hash, sources, true, out);
    }

    fn want(
        &mut self,
        now: u64,
        hash: Hash,
        sources: &[NodeId],
        round_adapter: bool,
        out: &mut Vec<Action>,
    ) {
        let timeout = self.config.fetch_timeout_ms;
        let me = self.me;
        let trusted: Vec<NodeId> = sources
            .iter()
            .filter(|s| **s != me && !self.is_unserved(s))
            .copied()
            .collect();
        let b = self.blobs.entry(hash).or_insert_with(|| Blob {
            state: BlobState::Fetching {
                deadline: 0,
                attempts: 0,
            },
            sources: BTreeSet::new(),
            round_adapter,
            last_failure: None,
        });
        let mut added = false;
        for s in trusted {
            added |= b.sources.insert(s);
        }
        let start = match b.state {
            BlobState::Held => false,
            BlobState::Fetching { .. } if b.sources.is_empty() => {
                // Nobody we still trust to serve it: not waited for.
                b.state = BlobState::Failed;
                self.dirty = true;
                false
            }
            BlobState::Fetching { attempts, .. } => attempts == 0,
            BlobState::Failed => added,
        };
        if start {
            b.state = BlobState::Fetching {
                deadline: now.saturating_add(timeout),
                attempts: 1,
            };
            self.dirty = true;
            out.push(b.fetch(hash));
        }
    }

    pub(super) fn on_fetch_failed(
        &mut self,
        now: u64,
        hash: Hash,
        reason: FetchFailure,
        out: &mut Vec<Action>,
    ) {
        let max = self.config.fetch_attempts;
        let timeout = self.config.fetch_timeout_ms;
        if let Some(req) = self.requests.get_mut(&hash) {
            match reason {
                FetchFailure::Invalid => {
                    let round = req.round;
                    let namers: Vec<NodeId> = req.claims.keys().copied().collect();
                    self.requests.remove(&hash);
                    self.dirty = true;
                    self.invalid.insert(hash, self.pruning_round(round));
                    for namer in namers {
                        self.penalise(
                            namer,
                            Misbehaviour::NamedInvalidAnnouncement { id: hash },
                            out,
                        );
                    }
                }
                // Served, and not ours to keep (an outsider of a closed network signed it):
                // asking again brings the same bytes (see `refuse`). (Before, it was asked for
                // at every attempt's deadline, then at once again by the record naming it.)
                FetchFailure::Local => {
                    let req = self.requests.remove(&hash);
                    self.refuse(now, hash, req);
                }
                // Some namers were left unasked: those not asked before are not counted as
                // asked; asked again at the attempt's deadline, and after the last attempt it
                // runs out there. (Before, a last attempt reported busy ended the request at
                // once, and a record naming it asked for it again at once.)
                FetchFailure::Busy => {
                    let unasked = std::mem::take(&mut req.unconfirmed);
                    req.asked.retain(|n| !unasked.contains(n));
                }
                FetchFailure::Unavailable if req.attempts >= max => {
                    if let Some(req) = self.requests.remove(&hash) {
                        self.dirty = true;
                        self.settle_silent(hash, &req);
                        self.distrust_namers(now, &req);
                    }
                }
                FetchFailure::Unavailable => {
                    req.unconfirmed.clear();
                    req.attempts += 1;
                    req.deadline = now.saturating_add(timeout);
                    out.push(req.attempt(hash));
                }
            }
            return;
        }
        if let Some(b) = self.blobs.get_mut(&hash) {
            if reason == FetchFailure::Invalid {
                // The bytes hash right, so every holder has the same unusable bytes: no
                // retry, and whoever announced them as an adapter is at fault.
                let round_adapter = b.round_adapter;
                b.state = BlobState::Failed;
                self.dirty = true;
                if !round_adapter {
                    let announcers: BTreeSet<NodeId> = self
                        .anns
                        .values()
                        .map(|a| a.payload())
                        .filter(|a| a.adapter == hash)
                        .map(|a| a.contributor)
                        .collect();
                    for who in announcers {
                        self.penalise(who, Misbehaviour::InvalidAdapter { adapter: hash }, out);
                    }
                }
                return;
            }
            b.last_failure = Some(reason);
            if let BlobState::Fetching { attempts, .. } = b.state {
                if attempts >= max {
                    b.state = BlobState::Failed;
                    self.dirty = true;
                    if reason != FetchFailure::Local {
                        self.blob_unserved(now, hash);
                    }
                } else if matches!(reason, FetchFailure::Local | FetchFailure::Busy) {
                    // Not asked: try again at the attempt's deadline, not at once.
                } else {
                    b.state = BlobState::Fetching {
                        deadline: now.saturating_add(timeout),
                        attempts: attempts + 1,
                    };
                    out.push(b.fetch(hash));
                }
            }
        }
    }

    /// [`Event::BlobAvailable`](super::Event::BlobAvailable): the blob is in the local
    /// store.
    pub(super) fn on_blob_available(&mut self, hash: Hash) {
        let b = self.blobs.entry(hash).or_insert_with(|| Blob {
            state: BlobState::Failed,
            sources: BTreeSet::new(),
            round_adapter: false,
            last_failure: None,
        });
        if b.state != BlobState::Held {
            b.state = BlobState::Held;
            self.dirty = true;
        }
    }

    /// Retries fetches whose attempt timed out, and gives up after `fetch_attempts`.
    pub(super) fn retry_fetches(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        let timeout = self.config.fetch_timeout_ms;
        let max = self.config.fetch_attempts;
        let mut busy_out = Vec::new();
        for (hash, b) in self.blobs.iter_mut() {
            if let BlobState::Fetching { deadline, attempts } = b.state {
                if now_ms >= deadline {
                    if attempts >= max {
                        // Failed, but nobody is held to blame on our timer alone (the
                        // fetch may have waited here for a slot): only a fetch that asked
                        // its sources and got nothing makes them unserved, or sources that
                        // kept our share of their transfers busy through every attempt.
                        b.state = BlobState::Failed;
                        self.dirty = true;
                        if b.last_failure == Some(FetchFailure::Busy) {
                            busy_out.push(*hash);
                        }
                    } else {
                        b.state = BlobState::Fetching {
                            deadline: now_ms.saturating_add(timeout),
                            attempts: attempts + 1,
                        };
                        out.push(b.fetch(*hash));
                    }
                }
            }
        }
        for hash in busy_out {
            self.blob_unserved(now_ms, hash);
        }
        self.unserved.retain(|_, (_, expires)| *expires > now_ms);
        self.refused.retain(|_, until| *until > now_ms);
        let mut expired = Vec::new();
        for (id, r) in self.requests.iter_mut() {
            if now_ms >= r.deadline {
                if r.attempts >= max {
                    expired.push(*id);
                } else {
                    r.attempts += 1;
                    r.deadline = now_ms.saturating_add(timeout);
                    out.push(r.attempt(*id));
                }
            }
        }
        for id in expired {
            if let Some(req) = self.requests.remove(&id) {
                self.settle_silent(id, &req);
            }
            self.dirty = true;
        }
    }

    /// Whether `who` failed to serve what it announced or named, recently enough that it
    /// is not asked again.
    pub(super) fn is_unserved(&self, who: &NodeId) -> bool {
        self.unserved
            .get(who)
            .is_some_and(|(until, _)| *until >= self.cur.round)
    }

    /// Marks `who` unserved for this round and the next, and for at most as long as a
    /// fetch's attempts take.
    pub(super) fn mark_unserved(&mut self, now: u64, who: NodeId) {
        let span = self
            .config
            .fetch_timeout_ms
            .saturating_mul(u64::from(self.config.fetch_attempts));
        self.unserved
            .insert(who, (self.cur.round + 1, now.saturating_add(span)));
    }

    /// No source of adapter blob `hash` served it: they are not asked again this round and
    /// the next, and blobs only they could serve are no longer waited for. Before, one key
    /// announcing dozens of adapters it never served, again and again, kept every round
    /// waiting (each adapter took its fetch attempts before the round could close).
    fn blob_unserved(&mut self, now: u64, hash: Hash) {
        let Some(b) = self.blobs.get(&hash) else {
            return;
        };
        if b.round_adapter {
            return;
        }
        for s in b.sources.clone() {
            self.mark_unserved(now, s);
        }
        let unserved = &self.unserved;
        for b in self.blobs.values_mut() {
            if !b.round_adapter
                && matches!(b.state, BlobState::Fetching { .. })
                && b.sources.iter().all(|s| unserved.contains_key(s))
            {
                b.state = BlobState::Failed;
                self.dirty = true;
            }
        }
    }

    /// A fetch asked for to verify another history ran out: the history namers it asked
    /// served nothing (what verifying the record does with that is up to fork choice).
    fn settle_silent(&mut self, id: Hash, req: &AnnRequest) {
        if !req.for_history() {
            return;
        }
        let silent = req.history.intersection(&req.asked).copied().collect();
        self.settle(id, Settled::Silent(silent));
    }

    /// Announcement `id`, asked for (`request`), was served but is not kept here (see
    /// [`Settled::Unkept`]): nobody's fault, and for another history not checkable here. It
    /// is not asked for again for a fetch timeout, whether or not that outcome could be
    /// remembered: the settled outcomes are bounded, and one not remembered was asked for
    /// again at once, the envelope already held, refused again, and so on (a loop, until the
    /// round changed, for anyone who filled the settled outcomes first). The ids refused are
    /// kept apart from the fetches in flight, so they hold none of their slots.
    pub(super) fn refuse(&mut self, now: u64, id: Hash, request: Option<AnnRequest>) {
        let Some(req) = request else {
            return;
        };
        self.dirty = true;
        if req.for_history() {
            self.settle(id, Settled::Unkept);
        }
        if self.refused.len() >= MAX_REQUESTS && !self.refused.contains_key(&id) {
            // Full: the one free soonest makes room.
            let soonest = self.refused.iter().min_by_key(|(_, until)| **until);
            if let Some(old) = soonest.map(|(old, _)| *old) {
                self.refused.remove(&old);
            }
        }
        let until = now.saturating_add(self.config.fetch_timeout_ms);
        self.refused.insert(id, until);
    }

    /// Remembers how a fetch for another history ended (see [`Settled`]).
    pub(super) fn settle(&mut self, id: Hash, how: Settled) {
        if self.settled.len() < MAX_REQUESTS || self.settled.contains_key(&id) {
            self.settled.insert(id, how);
            self.dirty = true;
        }
    }

    /// An announcement its namers claimed to hold was not served by any of them: their
    /// digests are not reconciled this round and the next, and what they alone named is
    /// no longer waited for. Before, a digest naming hundreds of announcements that do not
    /// exist, sent again with fresh ids, kept the round pending for good.
    /// (Only the namers of current-round digests: a namer that named it only in a record
    /// of another history is settled with instead, see [`Self::settle_silent`].)
    fn distrust_namers(&mut self, now: u64, req: &AnnRequest) {
        // (A namer whose claim came after the last attempt was never asked: not held to it.)
        let current: Vec<NodeId> = req
            .claims
            .keys()
            .filter(|n| !req.history.contains(n) && req.asked.contains(n))
            .copied()
            .collect();
        if current.is_empty() {
            return;
        }
        for namer in current {
            self.mark_unserved(now, namer);
        }
        let unserved = &self.unserved;
        let before = self.requests.len();
        self.requests
            .retain(|_, r| r.claims.keys().any(|n| !unserved.contains_key(n)));
        if self.requests.len() != before {
            self.dirty = true;
        }
    }
}

//! Intake of announcements: from gossip, fetched for a digest or a candidate, or this
//! node's own ([`Event::LocalContribution`](super::Event::LocalContribution)).

use std::collections::BTreeSet;

use super::fetch::{Blob, BlobState};
use super::{
    Action, Ignored, Misbehaviour, RoundMachine, Verdict, MAX_ANNOUNCEMENTS_PER_ROUND,
    MAX_ANNOUNCEMENTS_PER_SIGNER, MAX_REQUESTS,
};
use crate::{Hash, SignedAnnouncement};

impl RoundMachine {
    pub(super) fn ann(&self, id: &Hash) -> Option<&SignedAnnouncement> {
        let round = self.ann_round.get(id)?;
        self.anns.get(&(*round, *id))
    }

    /// How many distinct nodes signed the announcements of `inputs` (what a round adds to
    /// its chain's weight); `None` while one of them is unknown here.
    pub(super) fn contributor_nodes(&self, inputs: &[crate::RoundInput]) -> Option<u64> {
        let mut nodes = BTreeSet::new();
        for i in inputs {
            nodes.insert(self.ann(&i.announcement)?.payload().contributor);
        }
        Some(nodes.len() as u64)
    }

    /// Drops the announcements of rounds further ahead than announcements are kept that no
    /// candidate (or ancestor of one) names: they were fetched to verify a record that is
    /// gone. (Kept, they stayed until the node reached their round: keys signing record
    /// after record for rounds far ahead grew them without bound.)
    pub(super) fn prune_far_announcements(&mut self) {
        let Some(from) = self
            .cur
            .round
            .saturating_add(self.config.lookahead_rounds)
            .checked_add(1)
        else {
            return;
        };
        let far: Vec<(u64, Hash)> = self
            .anns
            .range((from, Hash([0; 32]))..)
            .map(|(k, _)| *k)
            .collect();
        if far.is_empty() {
            return;
        }
        let named: BTreeSet<Hash> = self
            .candidates
            .values()
            .flat_map(|c| std::iter::once(&c.record).chain(&c.ancestry.links))
            .filter(|r| r.round >= from)
            .flat_map(|r| r.inputs.iter().map(|i| i.announcement))
            .collect();
        for (round, id) in far {
            if !named.contains(&id) {
                self.anns.remove(&(round, id));
                self.ann_round.remove(&id);
                self.dirty = true;
            }
        }
    }

    pub(super) fn round_anns(
        &self,
        round: u64,
    ) -> impl Iterator<Item = (&Hash, &SignedAnnouncement)> {
        self.anns
            .range((round, Hash([0; 32]))..=(round, Hash([0xff; 32])))
            .map(|((_, id), a)| (id, a))
    }

    pub(super) fn on_announcement(
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
        // Signed for another network, or (from a peer) by a key without the network's work.
        let why = if a.model != self.model {
            Some(Misbehaviour::WrongModel { got: a.model })
        } else if !local {
            self.weak_key(&a.contributor)
        } else {
            None
        };
        if let Some(why) = why {
            // Remembered as invalid when a digest named it, or when it is for another network
            // (which decoding already refuses). A weak key's unasked-for announcement is not:
            // keys cost nothing to make, and its round could be any.
            if request.is_some() || matches!(why, Misbehaviour::WrongModel { .. }) {
                self.seen.insert(id, self.pruning_round(a.round));
                let round = request.as_ref().map_or(a.round, |r| r.round);
                self.invalid.insert(id, self.pruning_round(round));
            }
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
        // Asked for to verify another history: served, so what keeps it out below is
        // nobody's fault (see `Settled::Unkept`).
        let for_history = request.as_ref().is_some_and(|r| r.for_history());
        if a.time_ms > now.saturating_add(self.config.max_clock_skew_ms) {
            self.refuse(now, id, request);
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
        if local && a.round == current && !self.admits(now, false) {
            // Published, it would be in no one's selection (theirs closed as ours did), and
            // the driver would take it as placed: refused, it goes into the next round.
            return verdict(
                Verdict::Ignore(Ignored::InputsClosed { round: a.round }),
                out,
            );
        }
        // One asked for to verify a record of another history has room beyond what gossip
        // may fill: keys flooding a round with their own announcements cannot keep a node
        // from checking an honest record of that round. (Before, it was refused, its server
        // was taken not to show what it named, and the honest history was dropped.) (Asked
        // for and still wanted: a request claiming another round was dropped above.)
        let for_history = for_history && request.is_some();
        let room = if for_history {
            MAX_ANNOUNCEMENTS_PER_ROUND + MAX_REQUESTS
        } else {
            MAX_ANNOUNCEMENTS_PER_ROUND
        };
        let in_round = self.round_anns(a.round).count();
        let of_signer = self
            .round_anns(a.round)
            .filter(|(_, o)| o.payload().contributor == a.contributor)
            .count();
        let full = if in_round >= room {
            Some(Ignored::RoundFull { round: a.round })
        } else if of_signer >= MAX_ANNOUNCEMENTS_PER_SIGNER {
            Some(Ignored::SignerFull { round: a.round })
        } else {
            None
        };
        if let Some(why) = full {
            self.refuse(now, id, request);
            return verdict(Verdict::Ignore(why), out);
        }
        self.seen.insert(id, self.pruning_round(a.round));
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
        // (Past what gossip may fill, one fetched for another history is not in our own
        // selection.)
        if round == self.cur.round
            && self.admits(now, false)
            && in_round < MAX_ANNOUNCEMENTS_PER_ROUND
        {
            self.cur.admitted.insert(id);
        }
        self.dirty = true;
        if local {
            self.blobs.insert(
                adapter,
                Blob {
                    state: BlobState::Held,
                    sources: BTreeSet::new(),
                    round_adapter: false,
                    last_failure: None,
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
}

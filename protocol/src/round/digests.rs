//! Intake of round digests: a current-round digest is reconciled (what it names and we
//! lack is fetched), a committed one is compared with our tip and may become a
//! fork-choice candidate.

use super::{Action, Ignored, Misbehaviour, RoundMachine, Verdict, MAX_DIGEST_SIGNERS};
use crate::SignedDigest;

impl RoundMachine {
    pub(super) fn on_digest(&mut self, now: u64, msg: SignedDigest, out: &mut Vec<Action>) {
        let id = msg.id();
        let verdict =
            |v: Verdict, out: &mut Vec<Action>| out.push(Action::Verdict { id, verdict: v });
        if self.seen.contains_key(&id) {
            return verdict(Verdict::Ignore(Ignored::Duplicate), out);
        }
        let d = msg.payload();
        let r = &d.record;
        let signer = d.signer;
        self.seen.insert(id, self.pruning_round(r.round));
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
        let why = if r.model != self.model {
            Some(Misbehaviour::WrongModel { got: r.model })
        } else {
            self.weak_key(&signer)
        };
        if let Some(why) = why {
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
            // Past the round's time for named additions, what a digest names no longer
            // enters the selection, so it is not fetched either.
            if !self.is_unserved(&signer)
                && self.admits(now, true)
                && self.cur.reconciled.insert(rid)
            {
                for input in inputs {
                    self.want_input(now, input, round, signer, out);
                    // Admitted when it matches an announcement we hold or is being fetched
                    // for this round: what the digest names beyond that (junk, or more than
                    // the fetch caps take) does not grow the set.
                    let id = input.announcement;
                    let known = self
                        .ann(&id)
                        .is_some_and(|a| a.round == round && a.adapter == input.adapter);
                    if known || self.requests.get(&id).is_some_and(|r| r.round == round) {
                        self.cur.admitted.insert(id);
                    }
                }
                self.prune_admitted();
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
}

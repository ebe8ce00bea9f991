//! Fork choice: committed records that beat our tip become candidates, are verified in
//! full (announcements, contributors, weight, recomputed result) and adopted as a
//! switch, a catch-up or a rewind. Also our chain's memory of results and weights.

use std::collections::BTreeSet;

use super::fetch::BlobState;
use super::{
    Action, AggregateInput, AggregationJob, Misbehaviour, RoundMachine, CHAIN_MEMORY,
    MAX_CANDIDATES,
};
use crate::{Hash, NodeId, RoundRecord};

/// A committed foreign record that beats our tip, with who signed it.
#[derive(Clone, Debug)]
pub(super) struct Candidate {
    pub(super) record: RoundRecord,
    signers: BTreeSet<NodeId>,
    job: Option<AggregationJob>,
}

impl RoundMachine {
    /// `signer` published the committed record `record`, which beats our tip (or our
    /// tip is lonely).
    pub(super) fn add_candidate(&mut self, signer: NodeId, record: RoundRecord) {
        let key = record.id();
        if let Some(c) = self.candidates.get_mut(&key) {
            c.signers.insert(signer);
            self.dirty = true;
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
            },
        );
        self.dirty = true;
    }

    /// The weight of `record`'s parent if it is a round of our own chain (0 at genesis), or
    /// `None` when it comes from another history (then it needs a quorum). The record must
    /// weigh that plus its distinct contributing nodes.
    fn expected_parent_weight(&self, record: &RoundRecord) -> Option<u64> {
        if record.round == 1 {
            return record.parent.is_none().then_some(0);
        }
        let (result, weight) = self.chain.get(&(record.round - 1))?;
        (record.parent == Some(*result)).then_some(*weight)
    }

    /// `WrongWeight` when `record`'s parent is a round of our chain (`expected`: its weight)
    /// and `record` does not weigh that plus its `nodes` distinct contributing nodes.
    fn wrong_weight(
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
            // The history gate, asked again each time: our chain may have changed since the
            // candidate last passed it (a switch can take its parent off our chain, and then
            // its weight is no longer checked, so it needs the quorum again).
            let expected = self.expected_parent_weight(&c.record);
            if expected.is_none() && c.signers.len() < self.config.catch_up_quorum {
                continue;
            }
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
                    for s in &signers {
                        self.request_announcement(
                            now,
                            input.announcement,
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

    /// Our tip has been ours alone (no other signer's committed digest matched it) for
    /// two heartbeat periods.
    pub(super) fn lonely(&self, now: u64) -> bool {
        self.tip.is_some()
            && now >= self.tip_since.saturating_add(2 * self.config.heartbeat_ms)
            && self.tip_support.len() + 1 < self.config.catch_up_quorum
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
        let Some(c) = self.candidates.remove(&key) else {
            return;
        };
        // The history gate and the weight once more: our chain may have changed while the
        // job ran. (Every input's announcement is held: the job was made from them.)
        let expected = self.expected_parent_weight(&c.record);
        if expected.is_none() && c.signers.len() < self.config.catch_up_quorum {
            return;
        }
        let nodes = self.contributor_nodes(&c.record.inputs);
        if let Some(why) = nodes.and_then(|n| self.wrong_weight(&c.record, expected, n)) {
            for s in &c.signers {
                self.penalise(*s, why.clone(), out);
            }
            return;
        }
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
}

//! What each honest node's driver does in the simulator: decode gossip, broadcast,
//! serve and time fetches and aggregations, train and contribute.

use std::rc::Rc;

use super::{Ev, Sim, Wire};
use crate::round::{Action, Event};
use crate::{Hash, Signed, SignedAnnouncement, SignedDigest};

impl Sim<'_> {
    /// A receiver's driver could not decode a gossip message from `from` (it would
    /// score the gossip source down).
    pub(super) fn decode_failed(&mut self, from: usize) {
        self.report.decode_rejects += 1;
        if self.nodes[from].honest {
            self.violation(format!("a message from honest node {from} failed decoding"));
        }
    }

    pub(super) fn decode_ann(&mut self, id: Hash, bytes: &[u8]) -> Option<SignedAnnouncement> {
        self.ann_cache
            .entry(id)
            .or_insert_with(|| Signed::decode(bytes).ok())
            .clone()
    }

    pub(super) fn decode_digest(&mut self, id: Hash, bytes: &[u8]) -> Option<SignedDigest> {
        self.digest_cache
            .entry(id)
            .or_insert_with(|| Signed::decode(bytes).ok())
            .clone()
    }

    pub(super) fn feed(&mut self, i: usize, event: Event) {
        let now = self.now;
        let actions = match self.nodes[i].machine.as_mut() {
            Some(m) => m.handle(now, event),
            None => return,
        };
        self.apply(i, actions);
    }

    pub(super) fn broadcast(&mut self, from: usize, msg: Wire) {
        for to in 0..self.cfg.nodes {
            if to == from || !self.reachable(from, to) {
                continue;
            }
            if self.rng.chance(self.cfg.drop_per_mille) {
                continue;
            }
            let d = self.rng.range(self.cfg.delay_ms);
            self.at(
                self.now + d,
                Ev::Gossip {
                    to,
                    from,
                    msg: msg.clone(),
                },
            );
        }
        if self.nodes[from].honest && self.rng.chance(50) && self.replay_pool.len() < 200 {
            self.replay_pool.push(msg);
        }
    }

    /// A node decides whether to train for its current round; one that does not asks
    /// itself again a window later while the round is still open (so no round stays
    /// empty forever).
    pub(super) fn maybe_train(&mut self, i: usize) {
        if self.now + self.cfg.quiet_ms > self.cfg.duration_ms {
            return;
        }
        let Some(round) = self.nodes[i].machine.as_ref().map(|m| m.current_round()) else {
            return;
        };
        let epoch = self.nodes[i].epoch;
        if self.rng.chance(self.cfg.contribute_per_mille) {
            let t = self.now + self.rng.range(self.cfg.train_ms);
            self.at(
                t,
                Ev::Train {
                    node: i,
                    epoch,
                    round,
                },
            );
        } else {
            let t = self.now + self.cfg.round.window_ms;
            self.at(
                t,
                Ev::Consider {
                    node: i,
                    epoch,
                    round,
                },
            );
        }
    }

    pub(super) fn contribute(&mut self, i: usize, round: u64) {
        let now = self.now;
        let n = &mut self.nodes[i];
        let Some(m) = n.machine.as_ref() else { return };
        if m.current_round() != round || !n.contributed.insert(round) {
            return;
        }
        n.counter += 1;
        let mut h = blake3::Hasher::new();
        h.update(b"sim adapter");
        h.update(n.id.as_bytes());
        h.update(&round.to_le_bytes());
        h.update(&n.counter.to_le_bytes());
        let adapter = Hash::from(h.finalize());
        let samples = 1 + (u64::from(adapter.0[0]) % 100);
        let draft = m.draft_announcement(adapter, 1000, samples, None, now);
        let Ok(signed) = Signed::sign(draft, &n.key) else {
            return;
        };
        n.blobs.insert(adapter);
        self.valid_anns.insert(signed.id(), (round, adapter));
        self.feed(i, Event::LocalContribution(signed));
    }

    pub(super) fn apply(&mut self, i: usize, actions: Vec<Action>) {
        if self.cfg.trace_node == Some(i) {
            for a in &actions {
                let line = match a {
                    Action::Verdict { id, verdict } => {
                        format!("verdict {} {:?}", id.short(), verdict)
                    }
                    Action::PublishDigest(d) => format!(
                        "publish digest round {} inputs {} weight {} result {} committed {}",
                        d.record.round,
                        d.record.inputs.len(),
                        d.record.weight,
                        d.record.result.short(),
                        d.committed
                    ),
                    Action::Commit { record, replaces } => format!(
                        "commit round {} inputs {} weight {} result {} replaces {:?}",
                        record.round,
                        record.inputs.len(),
                        record.weight,
                        record.result.short(),
                        replaces
                    ),
                    Action::Aggregate(j) => {
                        format!("aggregate round {} inputs {}", j.round, j.inputs.len())
                    }
                    other => format!("{other:?}").chars().take(160).collect(),
                };
                self.report.trace.push(format!("t={} {line}", self.now));
            }
        }
        for a in actions {
            match a {
                Action::Verdict { .. } => {}
                Action::FetchBlob { hash, from } | Action::FetchRoundAdapter { hash, from } => {
                    let holders: Vec<usize> = from
                        .iter()
                        .filter_map(|id| self.index.get(id).copied())
                        .filter(|&j| self.reachable(i, j) && self.nodes[j].blobs.contains(&hash))
                        .collect();
                    let epoch = self.nodes[i].epoch;
                    let ok = !holders.is_empty() && !self.rng.chance(self.cfg.drop_per_mille);
                    let d = if ok {
                        self.rng.range(self.cfg.fetch_ms)
                    } else {
                        self.cfg.fetch_ms.1
                    };
                    self.at(
                        self.now + d,
                        Ev::BlobDone {
                            to: i,
                            epoch,
                            hash,
                            ok,
                        },
                    );
                }
                Action::FetchAnnouncement { id, from } => {
                    let holders: Vec<usize> = from
                        .iter()
                        .filter_map(|nid| self.index.get(nid).copied())
                        .filter(|&j| self.reachable(i, j) && self.nodes[j].anns.contains_key(&id))
                        .collect();
                    let epoch = self.nodes[i].epoch;
                    let ok = !holders.is_empty() && !self.rng.chance(self.cfg.drop_per_mille);
                    let bytes = if ok {
                        let j = holders[self.rng.below(holders.len())];
                        self.nodes[j].anns.get(&id).cloned()
                    } else {
                        None
                    };
                    let d = if ok {
                        self.rng.range(self.cfg.fetch_ms)
                    } else {
                        self.cfg.fetch_ms.1
                    };
                    self.at(
                        self.now + d,
                        Ev::AnnDone {
                            to: i,
                            epoch,
                            id,
                            bytes,
                        },
                    );
                }
                Action::FetchRecord {
                    tag,
                    round,
                    result,
                    from,
                } => {
                    // From the committed history of the first reachable peer asked that holds
                    // it, as the digest that peer signed (Byzantine senders keep no history,
                    // but lie with `lying_signers`); those asked before it served nothing.
                    let mut unanswered = Vec::new();
                    let mut holder = None;
                    for nid in &from {
                        let held = self.index.get(nid).copied().and_then(|j| {
                            if !self.reachable(i, j) || !self.nodes[j].up {
                                return None;
                            }
                            if !self.nodes[j].honest {
                                let lie = self.lying_record(round, result)?;
                                return (self.nodes[j].id == *nid).then_some((j, lie));
                            }
                            let r = self.nodes[j].history.get(&round)?;
                            (r.result == result).then(|| (j, r.clone()))
                        });
                        if held.is_some() {
                            holder = held;
                            break;
                        }
                        unanswered.push(*nid);
                    }
                    let digest = holder.and_then(|(j, record)| {
                        let d = crate::RoundDigest {
                            record,
                            signer: self.nodes[j].id,
                            committed: true,
                            time_ms: self.now,
                        };
                        Signed::sign(d, &self.nodes[j].key).ok()
                    });
                    let epoch = self.nodes[i].epoch;
                    let d = self.rng.range(self.cfg.fetch_ms);
                    self.at(
                        self.now + d,
                        Ev::RecordDone {
                            to: i,
                            epoch,
                            tag,
                            unanswered,
                            round,
                            result,
                            digest,
                        },
                    );
                }
                Action::Aggregate(job) => {
                    let epoch = self.nodes[i].epoch;
                    let d = self.rng.range(self.cfg.aggregate_ms);
                    self.at(self.now + d, Ev::AggDone { to: i, epoch, job });
                }
                Action::PublishAnnouncement(s) => {
                    let bytes = Rc::new(s.encode());
                    self.nodes[i].anns.insert(s.id(), bytes.clone());
                    self.ann_cache.insert(s.id(), Some(s.clone()));
                    self.broadcast(i, Wire::Announcement(s.id(), bytes));
                }
                Action::PublishDigest(d) => match Signed::sign(d, &self.nodes[i].key) {
                    Ok(s) => {
                        let w = Wire::Digest(s.id(), Rc::new(s.encode()));
                        self.digest_cache.insert(s.id(), Some(s));
                        self.broadcast(i, w);
                    }
                    Err(e) => self.violation(format!("node {i} cannot sign its digest: {e}")),
                },
                Action::Commit { record, replaces } => self.on_commit(i, record, replaces),
                Action::Penalise { peer, reason } => match self.index.get(&peer) {
                    Some(&j) if self.nodes[j].honest => {
                        self.violation(format!(
                            "t={} honest node {i} penalised honest node {j}: {reason:?}",
                            self.now
                        ));
                    }
                    _ => self.report.byzantine_penalties += 1,
                },
            }
        }
    }
}

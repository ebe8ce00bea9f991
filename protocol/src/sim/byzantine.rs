//! The Byzantine senders: bad signatures, wrong model ids, digests naming invalid
//! announcements, forged results and weights, replays, and one key posing as many users
//! (many announcements whose blobs it never serves, and a record of them claiming one unit
//! of weight per user), digests naming hundreds of announcements that do not exist, and keys
//! made at will (Sybils) announcing adapters the sender serves.

use std::rc::Rc;

use super::{Sim, Wire};
use crate::{Announcement, Hash, RoundDigest, RoundInput, RoundRecord, RuleId, Signed};

impl Sim<'_> {
    pub(super) fn byzantine(&mut self, b: usize) {
        let honest_up: Vec<usize> = (0..self.cfg.nodes)
            .filter(|&j| self.nodes[j].up && self.reachable(b, j))
            .collect();
        if honest_up.is_empty() {
            return;
        }
        let oracle = honest_up[self.rng.below(honest_up.len())];
        let Some(m) = self.nodes[oracle].machine.as_ref() else {
            return;
        };
        let (round, parent, tip) = (m.current_round(), m.current_parent(), m.tip().cloned());
        let id = self.nodes[b].id;
        let now = self.now;
        let fresh = self.rng.hash();
        let base = Announcement {
            model: self.model,
            round,
            adapter: fresh,
            byte_len: 1000,
            samples: 10,
            contributor: id,
            user_id: None,
            parent,
            time_ms: now,
        };
        // A record of `inputs` on the oracle's tip with a forged result, claiming a unit of
        // weight per input.
        let (model, tip_weight) = (self.model, tip.as_ref().map_or(0, |t| t.weight));
        let claim = |inputs: Vec<RoundInput>| RoundRecord {
            model,
            round,
            parent,
            weight: tip_weight + inputs.len() as u64,
            inputs,
            rule: RuleId::FEDAVG,
            result: fresh,
        };
        // Without sybil floods the draw is the one of old, so seeds replay as before.
        let strategies = if self.cfg.sybil_floods { 8 } else { 6 };
        let strategy = if self.cfg.lying_signers && self.rng.chance(500) {
            12
        } else if self.cfg.colluding_history && self.rng.chance(500) {
            11
        } else if self.cfg.sybil_records && self.rng.chance(500) {
            10
        } else if self.cfg.sybil_keys && self.rng.chance(500) {
            8 + self.rng.below(2)
        } else {
            self.rng.below(strategies)
        };
        match strategy {
            0 => {
                // A bad signature.
                let Ok(s) = Signed::sign(base, &self.nodes[b].key) else {
                    return;
                };
                let mut bytes = s.encode();
                bytes[10] ^= 0x40;
                let bad = Hash::of(&bytes);
                self.invalid_anns.insert(bad);
                self.invalid_adapters.insert(fresh);
                self.broadcast(b, Wire::Announcement(bad, Rc::new(bytes)));
            }
            1 => {
                // A validly signed announcement for another network.
                let mut a = base;
                a.model = self.other_model;
                let Ok(s) = Signed::sign(a, &self.nodes[b].key) else {
                    return;
                };
                self.invalid_anns.insert(s.id());
                self.invalid_adapters.insert(fresh);
                self.nodes[b].blobs.insert(fresh);
                self.broadcast(b, Wire::Announcement(s.id(), Rc::new(s.encode())));
            }
            2 => {
                // A digest for the current round naming real inputs plus one adapter whose
                // announcement is invalid (bad signature or wrong model), served on request.
                let bytes = if self.rng.chance(500) {
                    let Ok(s) = Signed::sign(base, &self.nodes[b].key) else {
                        return;
                    };
                    let mut bytes = s.encode();
                    bytes[20] ^= 0x01;
                    bytes
                } else {
                    let mut a = base;
                    a.model = self.other_model;
                    let Ok(s) = Signed::sign(a, &self.nodes[b].key) else {
                        return;
                    };
                    s.encode()
                };
                let bad = Hash::of(&bytes);
                self.invalid_anns.insert(bad);
                self.invalid_adapters.insert(fresh);
                self.nodes[b].blobs.insert(fresh);
                self.nodes[b].anns.insert(bad, Rc::new(bytes));
                let mut inputs = vec![RoundInput {
                    adapter: fresh,
                    announcement: bad,
                }];
                let known: Vec<(Hash, Rc<Vec<u8>>)> = self.nodes[oracle]
                    .anns
                    .iter()
                    .map(|(k, v)| (*k, v.clone()))
                    .collect();
                for (aid, bytes) in known {
                    if let Some(s) = self.decode_ann(aid, &bytes) {
                        if s.round == round && s.model == self.model {
                            self.nodes[b].anns.insert(aid, bytes.clone());
                            inputs.push(RoundInput {
                                adapter: s.adapter,
                                announcement: aid,
                            });
                        }
                    }
                }
                inputs.sort();
                inputs.dedup_by_key(|x| x.adapter);
                inputs.truncate(crate::MAX_ROUND_INPUTS);
                let record = claim(inputs);
                let committed = self.rng.chance(500);
                self.publish_byzantine_digest(b, record, committed);
            }
            3 => {
                // A replay of an old honest message.
                if !self.replay_pool.is_empty() {
                    let k = self.rng.below(self.replay_pool.len());
                    let msg = self.replay_pool[k].clone();
                    self.broadcast(b, msg);
                }
            }
            4 => {
                // The tip's inputs with a forged, lowest-possible result: wins fork choice
                // on paper, fails recomputation.
                if let Some(mut t) = tip {
                    t.result = Hash([0; 32]);
                    t.result.0[31] = b as u8;
                    self.publish_byzantine_digest(b, t, true);
                }
            }
            6 => {
                // One key as many users: 40 validly signed announcements for the current
                // round under distinct user ids, blobs never served, and a committed record
                // of them claiming a weight per user. Weight counts distinct nodes, so the
                // claim is wrong; and the announcements must not crowd out honest ones.
                let mut inputs = Vec::new();
                for u in 0..40u32 {
                    let adapter = self.rng.hash();
                    let mut a = base.clone();
                    a.adapter = adapter;
                    a.user_id = Some(format!("sybil-{b}-{u}"));
                    let Ok(s) = Signed::sign(a, &self.nodes[b].key) else {
                        return;
                    };
                    self.invalid_adapters.insert(adapter);
                    let bytes = Rc::new(s.encode());
                    self.nodes[b].anns.insert(s.id(), bytes.clone());
                    inputs.push(RoundInput {
                        adapter,
                        announcement: s.id(),
                    });
                    self.broadcast(b, Wire::Announcement(s.id(), bytes));
                }
                inputs.sort();
                self.publish_byzantine_digest(b, claim(inputs), true);
            }
            7 => {
                // An in-progress digest of the current round naming as many announcements
                // as a record can hold, none of which exists: each is asked of the signer,
                // who never answers. Sent again with fresh ids every time, it kept the round
                // pending (waiting for the announcements) for good.
                let mut inputs: Vec<RoundInput> = (0..crate::MAX_ROUND_INPUTS)
                    .map(|_| RoundInput {
                        adapter: self.rng.hash(),
                        announcement: self.rng.hash(),
                    })
                    .collect();
                inputs.sort();
                for i in &inputs {
                    self.invalid_anns.insert(i.announcement);
                    self.invalid_adapters.insert(i.adapter);
                }
                self.publish_byzantine_digest(b, claim(inputs), false);
            }
            8 | 9 => {
                // A key made for the occasion, without the network's key work (one that has
                // it by luck is one the sender paid for), announces an adapter the sender
                // serves: one more contributor, as far as anyone can tell. In 9 a second
                // such key also names it in an in-progress digest of the round, as a node
                // that holds it would, so it is fetched even after the round closed.
                if now.saturating_add(self.cfg.quiet_ms) > self.cfg.duration_ms {
                    return; // A contribution: none starts in the quiet end (see 11).
                }
                let sybil = self.sybil_key();
                let mut a = base;
                a.contributor = sybil.node_id();
                let Ok(s) = Signed::sign(a, &sybil) else {
                    return;
                };
                // Its blob and announcement are served by the sender, under the new key.
                self.index.insert(sybil.node_id(), b);
                self.nodes[b].blobs.insert(fresh);
                let bytes = Rc::new(s.encode());
                self.nodes[b].anns.insert(s.id(), bytes.clone());
                self.sybil_anns.insert(s.id());
                let named = RoundInput {
                    adapter: fresh,
                    announcement: s.id(),
                };
                self.broadcast(b, Wire::Announcement(s.id(), bytes));
                if strategy == 9 {
                    let namer = self.sybil_key();
                    self.index.insert(namer.node_id(), b);
                    let d = RoundDigest {
                        record: claim(vec![named]),
                        signer: namer.node_id(),
                        committed: false,
                        time_ms: now,
                    };
                    if let Ok(s) = Signed::sign(d, &namer) {
                        self.broadcast(b, Wire::Digest(s.id(), Rc::new(s.encode())));
                    }
                }
            }
            10 => {
                // The tip's record with one more input, of a key made at will: a valid,
                // heavier record of the tip's round.
                let Some(t) = tip else { return };
                if t.inputs.len() >= crate::MAX_ROUND_INPUTS {
                    return;
                }
                if now.saturating_add(self.cfg.quiet_ms) > self.cfg.duration_ms {
                    return; // A contribution: none starts in the quiet end (see 11).
                }
                let sybil = self.sybil_key();
                let mut a = base;
                a.round = t.round;
                a.parent = t.parent;
                a.contributor = sybil.node_id();
                let Ok(s) = Signed::sign(a, &sybil) else {
                    return;
                };
                self.index.insert(sybil.node_id(), b);
                self.nodes[b].blobs.insert(fresh);
                self.nodes[b].anns.insert(s.id(), Rc::new(s.encode()));
                self.sybil_anns.insert(s.id());
                let mut record = t;
                record.inputs.push(RoundInput {
                    adapter: fresh,
                    announcement: s.id(),
                });
                record.inputs.sort();
                let adapters: Vec<Hash> = record.inputs.iter().map(|i| i.adapter).collect();
                record.result = super::fake_aggregate(record.parent, &adapters);
                record.weight += 1;
                self.publish_byzantine_digest(b, record, true);
            }
            11 => {
                // The coalition's forged history on the oracle's tip: every sender builds
                // the same record from the tip (one announcement of the first sender, dated
                // 0 so that it is the same bytes whoever signs it), so each vouches for it.
                let Some(t) = tip else { return };
                // Its input is a valid contribution, so, like an honest node's training, none
                // starts in the quiet end of the run (the final tips are compared then).
                if now.saturating_add(self.cfg.quiet_ms) > self.cfg.duration_ms {
                    return;
                }
                let (b0, id0) = (self.cfg.nodes, self.nodes[self.cfg.nodes].id);
                // For half the tips the record is far ahead (100 rounds, deeper than any node
                // can link): only a node that takes a quorum's word could adopt it.
                let round = if t.result.0[0] & 2 == 2 {
                    t.round + 100
                } else {
                    t.round + 1
                };
                let parent = Some(Hash::of(
                    &[b"forged parent".as_slice(), &t.result.0].concat(),
                ));
                let adapter = Hash::of(&[b"forged input".as_slice(), &t.result.0].concat());
                let a = Announcement {
                    round,
                    adapter,
                    contributor: id0,
                    parent,
                    time_ms: 0,
                    ..base
                };
                let Ok(s) = Signed::sign(a, &self.nodes[b0].key) else {
                    return;
                };
                let bytes = Rc::new(s.encode());
                for c in self.cfg.nodes..self.cfg.nodes + self.cfg.byzantine {
                    self.nodes[c].blobs.insert(adapter);
                    self.nodes[c].anns.insert(s.id(), bytes.clone());
                }
                // Its input is a valid announcement of the round (like a Sybil's, it may
                // enter honest records); the made-up parent is what must not be adopted.
                self.sybil_anns.insert(s.id());
                if let Some(p) = parent {
                    self.forged_parents.insert(p);
                }
                // For half the tips the coalition also serves the made-up parent as a record:
                // the tip's own inputs and weight under the made-up result, so that only its
                // recomputation shows it false, and the claim is the exact weight on it.
                let served = t.result.0[0] & 1 == 1 && round == t.round + 1;
                let claimed = if served {
                    let mut link = t.clone();
                    if let Some(p) = parent {
                        link.result = p;
                    }
                    for c in self.cfg.nodes..self.cfg.nodes + self.cfg.byzantine {
                        self.nodes[c].history.insert(link.round, link.clone());
                    }
                    t.weight + 1
                } else {
                    t.weight + 1_000
                };
                let record = RoundRecord {
                    model,
                    round,
                    parent,
                    inputs: vec![RoundInput {
                        adapter,
                        announcement: s.id(),
                    }],
                    weight: claimed,
                    rule: RuleId::FEDAVG,
                    result: super::fake_aggregate(parent, &[adapter]),
                };
                self.publish_byzantine_digest(b, record, true);
            }
            12 => {
                // An honest tip, signed: the sender is then among the signers nodes ask for
                // that history's ancestors (and lies to them, see `lying_record`).
                if let Some(t) = tip {
                    self.publish_byzantine_digest(b, t, true);
                }
            }
            _ => {
                // The tip with an inflated chain weight: heavier on paper, but its parent
                // is known, so the weight is checked.
                if let Some(mut t) = tip {
                    // Senders act independently (no coalition): each forges its own
                    // weight, so no two forgeries form a quorum by accident.
                    t.weight += 1_000 + b as u64;
                    self.publish_byzantine_digest(b, t, true);
                }
            }
        }
    }

    /// A key made at will: without the network's key work (one that has it by luck is one
    /// the sender paid for).
    fn sybil_key(&mut self) -> crate::NodeKey {
        let needed = self.cfg.round.min_key_work;
        loop {
            let key = crate::NodeKey::from_bytes(&self.rng.hash().0);
            if needed == 0 || key.node_id().key_work() < needed {
                return key;
            }
        }
    }

    /// With `lying_signers`, what a Byzantine sender serves when asked for the record of
    /// round `round` with result `result`: a variant of the honest one on a made-up parent
    /// (remembered as forged), or of a forged weight, or nothing, by the result's bytes.
    pub(super) fn lying_record(&mut self, round: u64, result: Hash) -> Option<RoundRecord> {
        if !self.cfg.lying_signers {
            return None;
        }
        let honest = self
            .nodes
            .iter()
            .filter(|n| n.honest)
            .find_map(|n| n.history.get(&round).filter(|r| r.result == result))?;
        let mut lie = honest.clone();
        match result.0[1] % 3 {
            0 => {
                let parent = Hash::of(&[b"lying parent".as_slice(), &result.0].concat());
                self.forged_parents.insert(parent);
                lie.parent = Some(parent);
            }
            1 => lie.weight = lie.weight.saturating_add(1),
            _ => return None,
        }
        self.report.lies_served += 1;
        Some(lie)
    }

    fn publish_byzantine_digest(&mut self, b: usize, record: RoundRecord, committed: bool) {
        let d = RoundDigest {
            record,
            signer: self.nodes[b].id,
            committed,
            time_ms: self.now,
        };
        if let Ok(s) = Signed::sign(d, &self.nodes[b].key) {
            let w = Wire::Digest(s.id(), Rc::new(s.encode()));
            self.broadcast(b, w);
        }
    }
}

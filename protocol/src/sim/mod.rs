//! A deterministic network simulator for the round machine.
//!
//! Many virtual nodes each run a real [`RoundMachine`]; a virtual clock and one event
//! queue (ordered by time, then insertion) stand in for the network, the blob store
//! and the aggregator. All randomness comes from one `FnMut() -> u64` the caller passes
//! in; the tests and `examples/simulate.rs` pass a ChaCha8 stream seeded with the run's
//! seed and print that seed when a run fails, so any run can be replayed exactly.
//!
//! What it models:
//!
//! * gossip: every message reaches every other reachable, running node after a random
//!   delay, unless dropped (independently per receiver);
//! * fetches: blobs and announcement bytes come from one of the listed peers that holds
//!   them and is reachable, after a delay, or fail;
//! * aggregation: a deterministic fake, blake3 over the parent and the sorted input
//!   hashes, finished after a delay;
//! * training: at each round opening a node contributes with some probability after a
//!   random training time (sometimes after others closed the window);
//! * crashes (state lost, committed history kept, some nodes restart with their last
//!   committed record and must catch up) and one partition that heals;
//! * Byzantine senders: bad signatures, wrong model ids, digests naming adapters whose
//!   announcement is invalid, wrong results, and replays.
//!
//! Each distinct message is decoded once with the real
//! [`Signed::decode`](crate::Signed::decode) and the result is shared by all receivers
//! (decoding is a pure function of the bytes).
//!
//! Properties checked in every run ([`SimReport::violations`]):
//!
//! 1. no node commits a round containing an adapter whose announcement failed
//!    validation, or any announcement no honest node made, or a wrong result;
//! 2. no honest node is penalised, and no honest message fails decoding;
//! 3. at the end, every running honest node has the same tip;
//! 4. after the partition heals, histories agree from the second round after the heal
//!    on (and they agree on every round committed before the partition started);
//! 5. the network made progress after the heal, and Byzantine messages were caught.
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | [`run`], the event queue and its loop, node crashes, restarts, the partition |
//! | `config.rs` | [`SimConfig`], [`PartitionSpec`]: the scenario |
//! | `report.rs` | [`SimReport`]: what a run found |
//! | `driver.rs` | what each honest node's driver does: decode, gossip, fetch, aggregate, train |
//! | `byzantine.rs` | the Byzantine senders' misbehaviour |
//! | `checks.rs` | the properties above, checked at each commit and at the end |

mod byzantine;
mod checks;
mod config;
mod driver;
mod report;

pub use config::{PartitionSpec, SimConfig};
pub use report::SimReport;

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use crate::round::{AggregationJob, Event, FetchFailure, RoundMachine};
use crate::{
    BaseModel, Hash, LoraShape, ModelId, NodeId, NodeKey, RoundRecord, SignedAnnouncement,
    SignedDigest,
};

/// The simulated aggregator: blake3 over the parent and the sorted input hashes.
pub fn fake_aggregate(parent: Option<Hash>, adapters: &[Hash]) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(b"hivemind-sim-aggregate");
    match parent {
        Some(p) => {
            h.update(&[1]);
            h.update(p.as_bytes());
        }
        None => {
            h.update(&[0]);
        }
    }
    let mut sorted = adapters.to_vec();
    sorted.sort();
    for a in sorted {
        h.update(a.as_bytes());
    }
    Hash::from(h.finalize())
}

/// Runs one simulation. `rand` supplies all randomness (pass a seeded ChaCha stream).
pub fn run(config: &SimConfig, rand: impl FnMut() -> u64) -> SimReport {
    let mut sim = Sim::new(config.clone(), Rng(Box::new(rand)));
    sim.run();
    sim.finish()
}

struct Rng<'a>(Box<dyn FnMut() -> u64 + 'a>);

impl Rng<'_> {
    fn next(&mut self) -> u64 {
        (self.0)()
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, (lo, hi): (u64, u64)) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next() % (hi - lo + 1)
    }
    fn chance(&mut self, per_mille: u32) -> bool {
        self.next() % 1000 < u64::from(per_mille)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        (self.next() % n as u64) as usize
    }
    fn hash(&mut self) -> Hash {
        let mut b = [0u8; 32];
        for chunk in b.chunks_mut(8) {
            chunk.copy_from_slice(&self.next().to_le_bytes());
        }
        Hash(b)
    }
}

#[derive(Clone)]
enum Wire {
    Announcement(Hash, Rc<Vec<u8>>),
    Digest(Hash, Rc<Vec<u8>>),
}

enum Ev {
    Tick(usize, u64),
    Gossip {
        to: usize,
        from: usize,
        msg: Wire,
    },
    BlobDone {
        to: usize,
        epoch: u64,
        hash: Hash,
        ok: bool,
    },
    AnnDone {
        to: usize,
        epoch: u64,
        id: Hash,
        bytes: Option<Rc<Vec<u8>>>,
    },
    AggDone {
        to: usize,
        epoch: u64,
        job: AggregationJob,
    },
    RecordDone {
        to: usize,
        epoch: u64,
        tag: Hash,
        unanswered: Vec<NodeId>,
        round: u64,
        result: Hash,
        digest: Option<SignedDigest>,
    },
    Train {
        node: usize,
        epoch: u64,
        round: u64,
    },
    Consider {
        node: usize,
        epoch: u64,
        round: u64,
    },
    Crash(usize),
    Restart(usize),
    Byzantine(usize),
    PartitionStart,
    Heal,
}

struct SimNode {
    key: NodeKey,
    id: NodeId,
    honest: bool,
    machine: Option<RoundMachine>,
    up: bool,
    epoch: u64,
    side: u8,
    blobs: BTreeSet<Hash>,
    anns: BTreeMap<Hash, Rc<Vec<u8>>>,
    history: BTreeMap<u64, RoundRecord>,
    counter: u64,
    /// Rounds this node announced an adapter for (persisted across crashes, like the
    /// node's store: a restarted node does not announce a second adapter).
    contributed: BTreeSet<u64>,
    /// Highest round committed before the last restart: a crash can freeze a record
    /// that the network later replaced, so those rounds are not compared.
    restart_floor: u64,
    /// (time, round, inputs, result, parent, switch) of every commit, for diagnostics.
    commits: Vec<(u64, u64, usize, Hash, Option<Hash>, bool)>,
}

struct Sim<'a> {
    cfg: SimConfig,
    rng: Rng<'a>,
    now: u64,
    seq: u64,
    queue: BTreeMap<(u64, u64), Ev>,
    nodes: Vec<SimNode>,
    index: BTreeMap<NodeId, usize>,
    model: ModelId,
    other_model: ModelId,
    partitioned: bool,
    ann_cache: BTreeMap<Hash, Option<SignedAnnouncement>>,
    digest_cache: BTreeMap<Hash, Option<SignedDigest>>,
    /// Announcements made by honest nodes: id -> (round, adapter).
    valid_anns: BTreeMap<Hash, (u64, Hash)>,
    invalid_anns: BTreeSet<Hash>,
    invalid_adapters: BTreeSet<Hash>,
    /// Announcements signed by keys Byzantine senders made at will.
    sybil_anns: BTreeSet<Hash>,
    /// The made-up parents of the colluding senders' forged histories.
    forged_parents: BTreeSet<Hash>,
    replay_pool: Vec<Wire>,
    partition_round: Option<u64>,
    report: SimReport,
}

impl<'a> Sim<'a> {
    fn new(cfg: SimConfig, mut rng: Rng<'a>) -> Self {
        let shape = LoraShape {
            rank: 8,
            alpha: 16.0,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
        };
        let model = ModelId::derive(&BaseModel::Name("sim-base".into()), &shape);
        let other_model = ModelId::derive(&BaseModel::Name("other-base".into()), &shape);
        let mut nodes = Vec::new();
        let mut index = BTreeMap::new();
        for i in 0..cfg.nodes + cfg.byzantine {
            // Every node's key carries the network's work (with none asked, the first key
            // drawn: the draws of old, so seeds replay as before).
            let key = NodeKey::grind(cfg.round.min_key_work, || rng.hash().0, |_| {});
            let id = key.node_id();
            index.insert(id, i);
            let honest = i < cfg.nodes;
            let machine = if honest {
                RoundMachine::new(cfg.round.clone(), model, id, None, 0).ok()
            } else {
                None
            };
            nodes.push(SimNode {
                key,
                id,
                honest,
                machine,
                up: true,
                epoch: 0,
                side: 0,
                blobs: BTreeSet::new(),
                anns: BTreeMap::new(),
                history: BTreeMap::new(),
                counter: 0,
                contributed: BTreeSet::new(),
                restart_floor: 0,
                commits: Vec::new(),
            });
        }
        Sim {
            cfg,
            rng,
            now: 0,
            seq: 0,
            queue: BTreeMap::new(),
            nodes,
            index,
            model,
            other_model,
            partitioned: false,
            ann_cache: BTreeMap::new(),
            digest_cache: BTreeMap::new(),
            valid_anns: BTreeMap::new(),
            invalid_anns: BTreeSet::new(),
            invalid_adapters: BTreeSet::new(),
            sybil_anns: BTreeSet::new(),
            forged_parents: BTreeSet::new(),
            replay_pool: Vec::new(),
            partition_round: None,
            report: SimReport::default(),
        }
    }

    fn at(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.insert((at, self.seq), ev);
    }

    fn violation(&mut self, v: String) {
        if self.report.violations.len() < 50 {
            self.report.violations.push(v);
        }
    }
    fn run(&mut self) {
        let honest = self.cfg.nodes;
        for i in 0..honest {
            let t = self.rng.range((0, self.cfg.tick_ms));
            self.at(t, Ev::Tick(i, 0));
            self.maybe_train(i);
        }
        for b in honest..honest + self.cfg.byzantine {
            let t = self.rng.range((500, 500 + self.cfg.byzantine_every_ms));
            self.at(t, Ev::Byzantine(b));
        }
        // Crashes and restarts.
        let mut victims: Vec<usize> = (0..honest).collect();
        for k in 0..self.cfg.crashes.min(honest) {
            let j = k + self.rng.below(victims.len() - k);
            victims.swap(k, j);
            let d = self.cfg.duration_ms;
            let crash_at = self.rng.range((d / 10, d / 2));
            let v = victims[k];
            self.at(crash_at, Ev::Crash(v));
            if k < self.cfg.restarts {
                let latest = d.saturating_sub(self.cfg.quiet_ms / 2);
                let back = (crash_at + self.rng.range((6_000, 12_000))).min(latest);
                self.at(back.max(crash_at + 1), Ev::Restart(v));
            }
        }
        if let Some(p) = self.cfg.partition.clone() {
            self.at(p.start_ms, Ev::PartitionStart);
            self.at(p.heal_ms, Ev::Heal);
        }
        while let Some(((t, _), ev)) = self.queue.pop_first() {
            if t > self.cfg.duration_ms {
                break;
            }
            self.now = t;
            self.step(ev);
        }
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        let (na, nb) = (&self.nodes[a], &self.nodes[b]);
        nb.up && na.up && (!self.partitioned || na.side == nb.side)
    }

    fn step(&mut self, ev: Ev) {
        match ev {
            Ev::Tick(i, epoch) => {
                if !self.nodes[i].up || self.nodes[i].epoch != epoch {
                    return;
                }
                let now = self.now;
                let actions = match self.nodes[i].machine.as_mut() {
                    Some(m) => m.tick(now),
                    None => return,
                };
                self.apply(i, actions);
                let next = now + self.cfg.tick_ms;
                self.at(next, Ev::Tick(i, epoch));
            }
            Ev::Gossip { to, from, msg } => {
                if !self.nodes[to].up {
                    return;
                }
                self.report.deliveries += 1;
                let event = match &msg {
                    Wire::Announcement(id, bytes) => match self.decode_ann(*id, bytes) {
                        Some(s) => {
                            self.nodes[to].anns.insert(*id, bytes.clone());
                            Event::Announcement(s)
                        }
                        None => {
                            self.decode_failed(from);
                            return;
                        }
                    },
                    Wire::Digest(id, bytes) => match self.decode_digest(*id, bytes) {
                        Some(s) => Event::Digest(s),
                        None => {
                            self.decode_failed(from);
                            return;
                        }
                    },
                };
                self.feed(to, event);
            }
            Ev::BlobDone {
                to,
                epoch,
                hash,
                ok,
            } => {
                if !self.live(to, epoch) {
                    return;
                }
                if ok {
                    self.nodes[to].blobs.insert(hash);
                    self.feed(to, Event::BlobAvailable { hash });
                } else {
                    self.feed(
                        to,
                        Event::FetchFailed {
                            hash,
                            reason: FetchFailure::Unavailable,
                        },
                    );
                }
            }
            Ev::AnnDone {
                to,
                epoch,
                id,
                bytes,
            } => {
                if !self.live(to, epoch) {
                    return;
                }
                let event = match bytes {
                    Some(bytes) => match self.decode_ann(id, &bytes) {
                        Some(s) => {
                            self.nodes[to].anns.insert(id, bytes);
                            Event::Announcement(s)
                        }
                        None => Event::FetchFailed {
                            hash: id,
                            reason: FetchFailure::Invalid,
                        },
                    },
                    None => Event::FetchFailed {
                        hash: id,
                        reason: FetchFailure::Unavailable,
                    },
                };
                self.feed(to, event);
            }
            Ev::RecordDone {
                to,
                epoch,
                tag,
                unanswered,
                round,
                result,
                digest,
            } => {
                if self.live(to, epoch) {
                    self.feed(
                        to,
                        Event::Record {
                            tag,
                            round,
                            result,
                            digest,
                            unanswered,
                        },
                    );
                }
            }
            Ev::AggDone { to, epoch, job } => {
                if !self.live(to, epoch) {
                    return;
                }
                if job.rule.builds_on_parent() {
                    if let Some(parent) = job.parent {
                        if !self.nodes[to].blobs.contains(&parent) {
                            self.violation(format!(
                                "t={} node {to} aggregated round {} without its parent round \
                                 adapter {}",
                                self.now,
                                job.round,
                                parent.short()
                            ));
                        }
                    }
                }
                let adapters: Vec<Hash> = job.inputs.iter().map(|i| i.adapter).collect();
                let result = fake_aggregate(job.parent, &adapters);
                self.nodes[to].blobs.insert(result);
                self.feed(to, Event::AggregationFinished { job, result });
            }
            Ev::Train { node, epoch, round } => {
                if !self.live(node, epoch) {
                    return;
                }
                self.contribute(node, round);
            }
            Ev::Consider { node, epoch, round } => {
                // Only a round nobody contributed to yet gets another chance.
                let idle = self.nodes[node]
                    .machine
                    .as_ref()
                    .is_some_and(|m| m.current_round() == round && m.pool_contributors() == 0);
                if self.live(node, epoch) && idle {
                    self.maybe_train(node);
                }
            }
            Ev::Crash(i) => {
                let n = &mut self.nodes[i];
                n.up = false;
                n.epoch += 1;
                n.machine = None;
            }
            Ev::Restart(i) => {
                let now = self.now;
                let n = &mut self.nodes[i];
                n.up = true;
                n.epoch += 1;
                let tip = n.history.values().next_back().cloned();
                n.restart_floor = tip.as_ref().map_or(0, |t| t.round);
                let older: Vec<RoundRecord> = n.history.values().cloned().collect();
                n.machine =
                    RoundMachine::new(self.cfg.round.clone(), self.model, n.id, tip, now).ok();
                if let Some(m) = n.machine.as_mut() {
                    // What the store kept, as a real driver passes it.
                    m.remember(older.split_last().map_or(&[][..], |(_, o)| o));
                }
                let epoch = n.epoch;
                self.at(now + 1, Ev::Tick(i, epoch));
                self.maybe_train(i);
            }
            Ev::Byzantine(b) => {
                self.byzantine(b);
                let next = self.now + self.cfg.byzantine_every_ms;
                self.at(next, Ev::Byzantine(b));
            }
            Ev::PartitionStart => {
                let Some(p) = self.cfg.partition.clone() else {
                    return;
                };
                for i in 0..self.nodes.len() {
                    let minority = self.rng.chance(p.minority_per_mille);
                    self.nodes[i].side = u8::from(minority);
                }
                self.partitioned = true;
                self.partition_round = self
                    .nodes
                    .iter()
                    .filter(|n| n.honest && n.up)
                    .filter_map(|n| n.machine.as_ref())
                    .map(|m| m.tip().map_or(0, |t| t.round))
                    .min();
            }
            Ev::Heal => {
                self.partitioned = false;
                self.report.heal_round = self
                    .nodes
                    .iter()
                    .filter(|n| n.honest && n.up)
                    .filter_map(|n| n.machine.as_ref())
                    .map(|m| m.tip().map_or(0, |t| t.round))
                    .max()
                    .unwrap_or(0);
            }
        }
    }

    fn live(&self, i: usize, epoch: u64) -> bool {
        self.nodes[i].up && self.nodes[i].epoch == epoch
    }
}

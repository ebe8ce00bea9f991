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
//! Each distinct message is decoded once with the real [`Signed::decode`] and the result
//! is shared by all receivers (decoding is a pure function of the bytes).
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

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::rc::Rc;

use crate::round::{Action, AggregationJob, Event, FetchFailure, RoundConfig, RoundMachine};
use crate::{
    Announcement, BaseModel, Hash, LoraShape, ModelId, NodeId, NodeKey, RoundDigest, RoundInput,
    RoundRecord, RuleId, Signed, SignedAnnouncement, SignedDigest,
};

/// A partition of the honest nodes into two sides, healed later.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionSpec {
    /// When the partition starts (virtual ms).
    pub start_ms: u64,
    /// When it heals.
    pub heal_ms: u64,
    /// Share of honest nodes on the minority side, per mille.
    pub minority_per_mille: u32,
}

/// Simulation parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimConfig {
    /// Honest nodes.
    pub nodes: usize,
    /// Byzantine senders, on top of the honest nodes.
    pub byzantine: usize,
    /// Virtual run time.
    pub duration_ms: u64,
    /// No node starts training in the last `quiet_ms`, so the run can settle.
    pub quiet_ms: u64,
    /// Round machine configuration (all nodes).
    pub round: RoundConfig,
    /// Gossip delay range (min, max).
    pub delay_ms: (u64, u64),
    /// Gossip messages dropped, per mille per receiver.
    pub drop_per_mille: u32,
    /// Chance a node trains in a round, per mille.
    pub contribute_per_mille: u32,
    /// Training time range.
    pub train_ms: (u64, u64),
    /// Fetch time range.
    pub fetch_ms: (u64, u64),
    /// Aggregation time range.
    pub aggregate_ms: (u64, u64),
    /// Honest nodes that crash.
    pub crashes: usize,
    /// How many of the crashed nodes restart later.
    pub restarts: usize,
    /// The partition, if any.
    pub partition: Option<PartitionSpec>,
    /// Timer tick period of every node.
    pub tick_ms: u64,
    /// Period of each Byzantine sender's misbehaviour.
    pub byzantine_every_ms: u64,
    /// Record every action of this honest node in [`SimReport::trace`] (for replays).
    pub trace_node: Option<usize>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            nodes: 100,
            byzantine: 4,
            duration_ms: 60_000,
            quiet_ms: 16_000,
            round: RoundConfig::testing(),
            delay_ms: (10, 250),
            drop_per_mille: 30,
            contribute_per_mille: 300,
            train_ms: (100, 2_800),
            fetch_ms: (20, 300),
            aggregate_ms: (20, 200),
            crashes: 6,
            restarts: 3,
            partition: Some(PartitionSpec {
                start_ms: 10_000,
                heal_ms: 24_000,
                minority_per_mille: 400,
            }),
            tick_ms: 100,
            byzantine_every_ms: 700,
            trace_node: None,
        }
    }
}

/// What a run found.
#[derive(Clone, Debug, Default)]
pub struct SimReport {
    /// Broken properties (empty when the run passed).
    pub violations: Vec<String>,
    /// Honest nodes running at the end (the ones checked).
    pub checked_nodes: usize,
    /// The common final tip round (lowest, if they differ).
    pub final_round: u64,
    /// Highest tip round at the moment the partition healed.
    pub heal_round: u64,
    /// Commit actions, all nodes (fork switches and catch-ups included).
    pub commits: u64,
    /// Of those, fork-choice switches of an already committed round.
    pub switches: u64,
    /// Penalties honest nodes gave Byzantine senders.
    pub byzantine_penalties: u64,
    /// Messages that failed decoding at a receiver (bad signatures).
    pub decode_rejects: u64,
    /// Gossip deliveries.
    pub deliveries: u64,
    /// Rounds whose records differ between checked nodes (forks; each must be
    /// resolved by the next round, except inside the partition).
    pub disagreeing_rounds: u64,
    /// The actions of [`SimConfig::trace_node`], one line each.
    pub trace: Vec<String>,
}

impl SimReport {
    /// True when no property was broken.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

impl fmt::Display for SimReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} nodes checked, final round {}, heal round {}, {} commits ({} switches), \
             {} Byzantine penalties, {} decode rejects, {} deliveries, {} disagreeing rounds",
            self.checked_nodes,
            self.final_round,
            self.heal_round,
            self.commits,
            self.switches,
            self.byzantine_penalties,
            self.decode_rejects,
            self.deliveries,
            self.disagreeing_rounds
        )?;
        for v in &self.violations {
            write!(f, "\n  VIOLATION: {v}")?;
        }
        Ok(())
    }
}

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
            let mut seed = [0u8; 32];
            for chunk in seed.chunks_mut(8) {
                chunk.copy_from_slice(&rng.next().to_le_bytes());
            }
            let key = NodeKey::from_bytes(&seed);
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
            Ev::AggDone { to, epoch, job } => {
                if !self.live(to, epoch) {
                    return;
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
                n.machine =
                    RoundMachine::new(self.cfg.round.clone(), self.model, n.id, tip, now).ok();
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

    /// A receiver's driver could not decode a gossip message from `from` (it would
    /// score the gossip source down).
    fn decode_failed(&mut self, from: usize) {
        self.report.decode_rejects += 1;
        if self.nodes[from].honest {
            self.violation(format!("a message from honest node {from} failed decoding"));
        }
    }

    fn live(&self, i: usize, epoch: u64) -> bool {
        self.nodes[i].up && self.nodes[i].epoch == epoch
    }

    fn decode_ann(&mut self, id: Hash, bytes: &[u8]) -> Option<SignedAnnouncement> {
        self.ann_cache
            .entry(id)
            .or_insert_with(|| Signed::decode(bytes).ok())
            .clone()
    }

    fn decode_digest(&mut self, id: Hash, bytes: &[u8]) -> Option<SignedDigest> {
        self.digest_cache
            .entry(id)
            .or_insert_with(|| Signed::decode(bytes).ok())
            .clone()
    }

    fn feed(&mut self, i: usize, event: Event) {
        let now = self.now;
        let actions = match self.nodes[i].machine.as_mut() {
            Some(m) => m.handle(now, event),
            None => return,
        };
        self.apply(i, actions);
    }

    fn broadcast(&mut self, from: usize, msg: Wire) {
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
    fn maybe_train(&mut self, i: usize) {
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

    fn contribute(&mut self, i: usize, round: u64) {
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

    fn apply(&mut self, i: usize, actions: Vec<Action>) {
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
                Action::FetchBlob { hash, from } => {
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

    fn on_commit(&mut self, i: usize, record: RoundRecord, replaces: Option<Hash>) {
        self.report.commits += 1;
        if replaces.is_some() {
            self.report.switches += 1;
        }
        for input in &record.inputs {
            if self.invalid_anns.contains(&input.announcement)
                || self.invalid_adapters.contains(&input.adapter)
            {
                self.violation(format!(
                    "node {i} committed round {} with invalid input {:?}",
                    record.round, input
                ));
            }
            match self.valid_anns.get(&input.announcement) {
                Some(&(round, adapter)) if round == record.round && adapter == input.adapter => {}
                _ => self.violation(format!(
                    "node {i} committed round {} naming an announcement no honest node made: {:?}",
                    record.round, input
                )),
            }
        }
        let adapters: Vec<Hash> = record.inputs.iter().map(|x| x.adapter).collect();
        if fake_aggregate(record.parent, &adapters) != record.result {
            self.violation(format!(
                "node {i} committed a wrong result for round {}",
                record.round
            ));
        }
        let entry = (
            self.now,
            record.round,
            record.inputs.len(),
            record.result,
            record.parent,
            replaces.is_some(),
        );
        self.nodes[i].commits.push(entry);
        let opened_new = self.nodes[i]
            .history
            .keys()
            .next_back()
            .is_none_or(|&r| record.round > r);
        self.nodes[i].history.insert(record.round, record);
        if opened_new {
            self.maybe_train(i);
        }
    }

    fn byzantine(&mut self, b: usize) {
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
        match self.rng.below(6) {
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
                let weight = tip.as_ref().map_or(0, |t| t.weight) + inputs.len() as u64;
                let record = RoundRecord {
                    model: self.model,
                    round,
                    parent,
                    inputs,
                    weight,
                    rule: RuleId::FEDAVG,
                    result: fresh,
                };
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

    /// Which nodes hold which record of round `r`, with the minority's commit logs.
    fn describe_round(&self, checked: &[usize], r: u64) -> String {
        let mut by_record: BTreeMap<Hash, Vec<usize>> = BTreeMap::new();
        for &i in checked.iter().filter(|&&i| r > self.nodes[i].restart_floor) {
            if let Some(rec) = self.nodes[i].history.get(&r) {
                by_record.entry(rec.result).or_default().push(i);
            }
        }
        let mut out = String::new();
        for (result, nodes) in &by_record {
            let shown: Vec<String> = nodes.iter().take(6).map(|n| n.to_string()).collect();
            out += &format!(
                "\n    result {}: {} nodes [{}]",
                result.short(),
                nodes.len(),
                shown.join(",")
            );
            if nodes.len() <= 3 {
                for &n in nodes {
                    for c in &self.nodes[n].commits {
                        if c.1 + 2 >= r && c.1 <= r + 2 {
                            out += &format!(
                                "\n      node {n}: t={} round {} inputs {} result {} parent {} {}",
                                c.0,
                                c.1,
                                c.2,
                                c.3.short(),
                                c.4.map_or("-".into(), |p| p.short()),
                                if c.5 { "(switch)" } else { "" }
                            );
                        }
                    }
                }
            }
        }
        out
    }

    fn finish(mut self) -> SimReport {
        let checked: Vec<usize> = (0..self.cfg.nodes)
            .filter(|&i| self.nodes[i].up && self.nodes[i].machine.is_some())
            .collect();
        self.report.checked_nodes = checked.len();
        // 3. Same tip everywhere.
        let mut tips: BTreeMap<Option<(u64, Hash)>, usize> = BTreeMap::new();
        for &i in &checked {
            let t = self.nodes[i]
                .machine
                .as_ref()
                .and_then(|m| m.tip().map(|t| (t.round, t.result)));
            *tips.entry(t).or_default() += 1;
        }
        self.report.final_round = tips
            .keys()
            .map(|t| t.map_or(0, |(r, _)| r))
            .min()
            .unwrap_or(0);
        if tips.len() > 1 {
            let desc: Vec<String> = tips
                .iter()
                .map(|(t, n)| match t {
                    Some((r, h)) => format!("{n} nodes at round {r} {}", h.short()),
                    None => format!("{n} nodes at genesis"),
                })
                .collect();
            self.violation(format!("final tips differ: {}", desc.join(", ")));
        }
        // 4. Forks last at most one round: if nodes disagree on round r, they agree on
        //    round r+1. Inside the partition (from the round committed everywhere when
        //    it started to the first round after the heal) forks may last longer.
        let max_round = self
            .nodes
            .iter()
            .flat_map(|n| n.history.keys().next_back().copied())
            .max()
            .unwrap_or(0);
        let zone: Option<(u64, u64)> = match (&self.cfg.partition, self.partition_round) {
            (Some(_), Some(p)) => Some((p, self.report.heal_round + 1)),
            _ => None,
        };
        let in_zone = |r: u64| zone.is_some_and(|(lo, hi)| lo <= r && r <= hi);
        let mut disagreeing = BTreeSet::new();
        for r in 1..=max_round {
            let records: BTreeSet<Hash> = checked
                .iter()
                .filter(|&&i| r > self.nodes[i].restart_floor)
                .filter_map(|&i| self.nodes[i].history.get(&r).map(|rec| rec.id()))
                .collect();
            if records.len() > 1 {
                disagreeing.insert(r);
            }
        }
        self.report.disagreeing_rounds = disagreeing.len() as u64;
        for &r in &disagreeing {
            if disagreeing.contains(&(r + 1)) && !(in_zone(r) && in_zone(r + 1)) {
                let detail = self.describe_round(&checked, r + 1);
                self.violation(format!(
                    "the fork of round {r} is not resolved in round {}:{detail}",
                    r + 1
                ));
            }
        }
        // 5. Progress after the heal, and Byzantine behaviour caught.
        if self.cfg.partition.is_some() && self.report.final_round < self.report.heal_round + 2 {
            self.violation(format!(
                "no progress after the heal: final round {} < heal round {} + 2",
                self.report.final_round, self.report.heal_round
            ));
        }
        if self.cfg.byzantine > 0 && self.report.byzantine_penalties == 0 {
            self.violation("no Byzantine sender was penalised".into());
        }
        if checked.is_empty() {
            self.violation("no honest node survived".into());
        }
        self.report
    }
}

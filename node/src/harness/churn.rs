//! A churning network of `hive-node join` processes on loopback. Each round a few live nodes
//! contribute adapters; while the churn lasts, some nodes are then killed (SIGKILL) and as
//! many are started (killed ones restarting on their data dirs and new ones joining, in
//! turn); the round must commit on every node that was running before it. After the churn
//! stops, every live node must reach the same tip within one round. `tests/churn.rs` runs
//! a small network in CI; `examples/churn_bench.rs` runs 50 nodes and prints the report.
//!
//! Times come from the nodes' own clocks in their status.json: when each node first held
//! each announcement (`current_seen_ms`), when its window closed (`current_closed_ms`) and
//! when it committed (`committed_ms`). The harness only polls, so its polling
//! period does not blur them.
//!
//! ```text
//!   round r:  contribute (k live nodes) ─▶ their own status lists the adapter
//!             ─▶ kill `kills_per_round` (never node 0) ─▶ restart / join as many
//!             ─▶ every node started before round r commits r ─▶ gossip, close-to-commit, RSS
//!   end:      every live node on the same tip (the last round); restarted ones too
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

use super::{NodeProcess, TimedOut, TinyNetwork};
use crate::data_dir::{DataDir, StatusFile};

/// How often the harness reads the nodes' status files.
const POLL: Duration = Duration::from_millis(200);

/// What to run.
#[derive(Clone, Debug, Serialize)]
pub struct ChurnPlan {
    /// Nodes running at any time. Node 0 is the bootstrap node and is never killed.
    pub nodes: usize,
    /// Rounds with churn.
    pub churn_rounds: u64,
    /// Rounds without churn after them (at least 1: the convergence check).
    pub calm_rounds: u64,
    /// Nodes killed in each churn round; as many are started again.
    pub kills_per_round: usize,
    /// Live nodes that contribute an adapter in each round.
    pub contributors_per_round: usize,
    /// Collection window of a round, seconds.
    pub round_secs: f64,
    /// How long any one wait (start-up, a round's commit) may take, seconds.
    pub wait_secs: f64,
    /// Seed of every choice (who contributes, who is killed) and of the adapters.
    pub seed: u64,
}

/// The plan cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ChurnError {
    /// The plan's numbers do not make a network.
    #[error("churn plan: {0}")]
    Plan(&'static str),
    /// Writing the tiny model or an adapter.
    #[error(transparent)]
    Node(Box<crate::Error>),
    /// Starting a process.
    #[error("starting a node: {0}")]
    Io(#[from] std::io::Error),
    /// The bootstrap node did not come up.
    #[error(transparent)]
    TimedOut(#[from] TimedOut),
}

impl From<crate::Error> for ChurnError {
    fn from(e: crate::Error) -> Self {
        ChurnError::Node(Box::new(e))
    }
}

/// Percentiles (nearest rank) of a sample, milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Percentiles {
    /// Values in the sample.
    pub n: usize,
    /// Median.
    pub p50: Option<u64>,
    /// 99th percentile.
    pub p99: Option<u64>,
    /// Largest value.
    pub max: Option<u64>,
}

impl Percentiles {
    /// The percentiles of `v`.
    pub fn of(mut v: Vec<u64>) -> Self {
        v.sort_unstable();
        let rank = |q: f64| {
            let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len().max(1)) - 1;
            v.get(i).copied()
        };
        Percentiles {
            n: v.len(),
            p50: rank(0.5),
            p99: rank(0.99),
            max: v.last().copied(),
        }
    }
}

/// One round of the run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RoundReport {
    /// Round number.
    pub round: u64,
    /// Adapters handed to live nodes for it.
    pub contributed: usize,
    /// Nodes killed in it.
    pub killed: usize,
    /// Of those, nodes that had contributed in it (killed right after announcing).
    pub contributors_killed: usize,
    /// Killed nodes restarted on their data dirs in it.
    pub restarted: usize,
    /// New nodes started in it.
    pub joined: usize,
    /// Nodes running when it committed.
    pub live: usize,
    /// Nodes that had to commit it (running since before it) and did: all of them, or the
    /// run failed.
    pub expected: usize,
    /// Running nodes that had committed it, the expected ones and any newer ones.
    pub committed: usize,
    /// Distinct round-adapter hashes among the expected nodes (1: they agree).
    pub hashes: usize,
    /// Nodes started during the round that committed another round adapter than the
    /// expected nodes' (they met the round late; the next round's fork choice aligns them).
    pub newcomers_off: usize,
    /// Inputs of the round adapter most of them hold.
    pub inputs: usize,
    /// From the earliest window close on any node to the last expected node's commit.
    pub close_to_commit_ms: Option<u64>,
    /// Wall time of the round in the harness, from the first contribution.
    pub wall_ms: u64,
}

/// What a run measured.
#[derive(Clone, Debug, Serialize)]
pub struct ChurnReport {
    /// What was run.
    pub plan: ChurnPlan,
    /// Each round in order.
    pub rounds: Vec<RoundReport>,
    /// Per (announcement, node that had to get it): from the contributor holding it to the
    /// node holding it.
    pub gossip_ms: Percentiles,
    /// Per announcement: until the last node that had to get it held it.
    pub gossip_to_all_ms: Percentiles,
    /// (announcement, node) pairs where the node never held it through gossip.
    pub gossip_missed: usize,
    /// Over the rounds: earliest window close to the last expected commit.
    pub close_to_commit_ms: Percentiles,
    /// The grace period the nodes ran with (inputs stable this long before a commit): the
    /// lower bound of `close_to_commit_ms`.
    pub grace_ms: u64,
    /// Resident memory per node at the end, mean, MiB.
    pub rss_mib_mean: f64,
    /// Largest resident memory of any node at any round's end, MiB.
    pub rss_mib_max: f64,
    /// Every live node at the end holds the last round with one hash.
    pub converged: bool,
    /// The tip they hold: `round-N <hash>`.
    pub tip: Option<String>,
    /// Live nodes at the end that had been killed and restarted, and how many of them hold
    /// the tip.
    pub restarted_live: usize,
    /// See `restarted_live`.
    pub restarted_caught_up: usize,
    /// `hive-node` processes started in all.
    pub processes_started: usize,
    /// Nodes that exited without being killed (none, in a healthy run).
    pub exited: Vec<String>,
    /// Wall time of the whole run, seconds.
    pub wall_s: f64,
    /// Why the run stopped before its last round, if it did.
    pub failure: Option<String>,
}

struct Member {
    dir: PathBuf,
    proc: Option<NodeProcess>,
    /// The round in which it was last started (0: before round 1).
    started_in: u64,
    restarts: u32,
}

struct Run<'a> {
    bin: &'a Path,
    root: &'a Path,
    plan: &'a ChurnPlan,
    net: TinyNetwork,
    rng: rand::rngs::StdRng,
    members: Vec<Member>,
    bootstrap: String,
    /// First time each member held each announcement, by its own clock.
    seen: BTreeMap<(usize, String), u64>,
    /// Earliest window close of each round on any node.
    closed: BTreeMap<u64, u64>,
    gossip: Vec<u64>,
    gossip_to_all: Vec<u64>,
    missed: usize,
    rss_max: u64,
    started: usize,
    exited: Vec<String>,
    rounds: Vec<RoundReport>,
}

/// Runs `plan` with the `hive-node` binary `bin` in `root`.
pub fn run(bin: &Path, root: &Path, plan: &ChurnPlan) -> Result<ChurnReport, ChurnError> {
    if plan.nodes < 2 || plan.kills_per_round + 1 >= plan.nodes {
        return Err(ChurnError::Plan(
            "need at least 2 nodes and fewer kills per round than nodes besides node 0",
        ));
    }
    if plan.calm_rounds == 0 || plan.contributors_per_round == 0 {
        return Err(ChurnError::Plan(
            "need a calm round and a contributor per round",
        ));
    }
    let t0 = Instant::now();
    let mut run = Run {
        bin,
        root,
        plan,
        net: TinyNetwork::write(root)?,
        rng: rand::rngs::StdRng::seed_from_u64(plan.seed),
        members: Vec::new(),
        bootstrap: String::new(),
        seen: BTreeMap::new(),
        closed: BTreeMap::new(),
        gossip: Vec::new(),
        gossip_to_all: Vec::new(),
        missed: 0,
        rss_max: 0,
        started: 0,
        exited: Vec::new(),
        rounds: Vec::new(),
    };
    run.start_network()?;
    let mut failure = run.wait_connected().err();
    if failure.is_none() {
        for r in 1..=plan.churn_rounds + plan.calm_rounds {
            if let Err(e) = run.round(r) {
                failure = Some(format!("round {r}: {e}"));
                break;
            }
        }
    }
    let report = run.finish(failure, t0);
    Ok(report)
}

impl Run<'_> {
    fn args(&self, bootstrap: bool) -> Vec<String> {
        let mut a = vec!["join".to_string()];
        a.extend(self.net.join_flags());
        a.extend(["--round-secs".into(), self.plan.round_secs.to_string()]);
        if !bootstrap {
            a.extend(["--bootstrap".into(), self.bootstrap.clone()]);
        }
        a
    }

    fn start(&mut self, i: usize, round: u64) -> std::io::Result<()> {
        let p = NodeProcess::start(self.bin, &self.args(i == 0), &self.members[i].dir)?;
        let m = &mut self.members[i];
        m.proc = Some(p);
        m.started_in = round;
        self.started += 1;
        Ok(())
    }

    fn add_member(&mut self) -> usize {
        let i = self.members.len();
        self.members.push(Member {
            dir: self.root.join(format!("node-{i}")),
            proc: None,
            started_in: 0,
            restarts: 0,
        });
        i
    }

    fn start_network(&mut self) -> Result<(), ChurnError> {
        let limit = Duration::from_secs_f64(self.plan.wait_secs);
        let boot = self.add_member();
        self.start(boot, 0)?;
        let addr = match &self.members[boot].proc {
            Some(p) => p.line("listening on ", limit)?,
            None => String::new(),
        };
        self.bootstrap = addr;
        for _ in 1..self.plan.nodes {
            let i = self.add_member();
            self.start(i, 0)?;
        }
        Ok(())
    }

    fn live(&self) -> impl Iterator<Item = (usize, &NodeProcess)> {
        self.members
            .iter()
            .enumerate()
            .filter_map(|(i, m)| m.proc.as_ref().map(|p| (i, p)))
    }

    /// Reads every live node's status (skipping files an earlier process of the same data
    /// dir left) and keeps the first-seen and close times in them.
    fn observe(&mut self) -> BTreeMap<usize, StatusFile> {
        for (i, m) in self.members.iter_mut().enumerate() {
            if let Some(p) = &mut m.proc {
                if let Ok(Some(status)) = p.child().try_wait() {
                    self.exited
                        .push(format!("node {i} exited by itself: {status}"));
                    m.proc = None;
                }
            }
        }
        let got: BTreeMap<usize, StatusFile> = self
            .live()
            .filter_map(|(i, p)| p.status().filter(|s| s.pid == p.pid()).map(|s| (i, s)))
            .collect();
        for (i, s) in &got {
            for (h, ms) in &s.current_seen_ms {
                self.seen.entry((*i, h.clone())).or_insert(*ms);
            }
            if let Some(ms) = s.current_closed_ms {
                let e = self.closed.entry(s.current_round).or_insert(ms);
                *e = (*e).min(ms);
            }
        }
        got
    }

    /// Polls until `done` holds for the statuses, for at most the plan's wait.
    fn wait(
        &mut self,
        what: &str,
        mut done: impl FnMut(&BTreeMap<usize, StatusFile>) -> bool,
    ) -> Result<BTreeMap<usize, StatusFile>, String> {
        let t0 = Instant::now();
        loop {
            let got = self.observe();
            if done(&got) {
                return Ok(got);
            }
            if t0.elapsed().as_secs_f64() > self.plan.wait_secs {
                return Err(format!(
                    "timed out after {:.0} s waiting for {what}",
                    t0.elapsed().as_secs_f64()
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    fn wait_connected(&mut self) -> Result<(), String> {
        let all: Vec<usize> = self.live().map(|(i, _)| i).collect();
        self.wait("every node to have a peer", |st| {
            all.iter()
                .all(|i| st.get(i).is_some_and(|s| s.connected_peers > 0))
        })
        .map(|_| ())
    }

    fn round(&mut self, r: u64) -> Result<(), String> {
        let t0 = Instant::now();
        let mut report = RoundReport {
            round: r,
            ..Default::default()
        };
        // Contributors: nodes whose current round is this one (they committed the round
        // before). A node still catching up would announce into the round it is in, which
        // the others closed already: that adapter would be lost (see ARCHITECTURE.md, Churn).
        let st = self.observe();
        let mut eligible: Vec<usize> = self
            .live()
            .filter(|(i, _)| {
                self.members[*i].started_in < r && st.get(i).is_some_and(|s| s.current_round == r)
            })
            .map(|(i, _)| i)
            .collect();
        eligible.shuffle(&mut self.rng);
        eligible.truncate(self.plan.contributors_per_round);
        let mut sent: Vec<(usize, String)> = Vec::new();
        for (j, &i) in eligible.iter().enumerate() {
            let seed = self.plan.seed.wrapping_mul(1_000_003) ^ (r << 20) ^ j as u64;
            let adapter = self.net.adapter(seed).map_err(|e| e.to_string())?;
            let dir = self.root.join(format!("adapters/r{r}-{j}"));
            adapter.write_dir(&dir).map_err(|e| e.to_string())?;
            let hash = adapter.canonical_hash().map_err(|e| e.to_string())?;
            DataDir::new(&self.members[i].dir)
                .hand_over(&dir, 10)
                .map_err(|e| e.to_string())?;
            sent.push((i, hash.to_hex()));
        }
        report.contributed = sent.len();
        let origins = sent.clone();
        self.wait("the contributors to announce their adapters", |st| {
            origins
                .iter()
                .all(|(i, h)| st.get(i).is_some_and(|s| s.current_seen_ms.contains_key(h)))
        })?;

        if r <= self.plan.churn_rounds {
            self.churn(r, &mut report).map_err(|e| e.to_string())?;
            report.contributors_killed = sent
                .iter()
                .filter(|(i, _)| {
                    self.members[*i].started_in == r || self.members[*i].proc.is_none()
                })
                .count();
        }

        let expected: BTreeSet<usize> = self
            .live()
            .filter(|(i, _)| self.members[*i].started_in < r)
            .map(|(i, _)| i)
            .collect();
        let must = expected.clone();
        let st = self.wait(
            &format!(
                "the {} nodes running before round {r} to commit it",
                must.len()
            ),
            |st| {
                must.iter().all(|i| {
                    st.get(i)
                        .is_some_and(|s| s.rounds.iter().any(|v| v.number == r))
                })
            },
        )?;

        // Agreement and timing of the round.
        let mut by_hash: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
        let mut last_commit = 0u64;
        let mut held: Vec<(usize, &str)> = Vec::new();
        for (i, s) in &st {
            if let Some(v) = s.rounds.iter().find(|v| v.number == r) {
                held.push((*i, v.hash.as_str()));
                if expected.contains(i) {
                    let e = by_hash
                        .entry(v.hash.as_str())
                        .or_insert((0, v.contributors.len()));
                    e.0 += 1;
                    let at = s.committed_ms.get(&r).copied().unwrap_or(0);
                    last_commit = last_commit.max(at);
                }
            }
        }
        let majority = by_hash.iter().max_by_key(|(_, (n, _))| *n);
        report.live = self.live().count();
        report.expected = expected.len();
        report.committed = held.len();
        report.hashes = by_hash.len();
        report.inputs = majority.map_or(0, |(_, (_, k))| *k);
        report.newcomers_off = held
            .iter()
            .filter(|(i, h)| !expected.contains(i) && majority.is_some_and(|(m, _)| m != h))
            .count();
        report.close_to_commit_ms = self.closed.get(&r).map(|c| last_commit.saturating_sub(*c));

        // Gossip: every node expected to commit the round should have had each announcement.
        for (origin, h) in &sent {
            let Some(t) = self.seen.get(&(*origin, h.clone())).copied() else {
                continue;
            };
            let mut slowest = Some(0u64);
            for e in expected.iter().filter(|e| *e != origin) {
                match self.seen.get(&(*e, h.clone())) {
                    Some(ms) => {
                        let d = ms.saturating_sub(t);
                        self.gossip.push(d);
                        slowest = slowest.map(|s| s.max(d));
                    }
                    None => {
                        self.missed += 1;
                        slowest = None;
                    }
                }
            }
            if let Some(d) = slowest {
                self.gossip_to_all.push(d);
            }
        }
        let rss = self.live().filter_map(|(_, p)| p.rss_bytes()).max();
        self.rss_max = self.rss_max.max(rss.unwrap_or(0));
        report.wall_ms = t0.elapsed().as_millis() as u64;
        self.rounds.push(report);
        Ok(())
    }

    /// Kills `kills_per_round` random nodes (never node 0), then starts as many: a killed
    /// node restarting on its data dir and a new node, in turn.
    fn churn(&mut self, r: u64, report: &mut RoundReport) -> std::io::Result<()> {
        let mut victims: Vec<usize> = self.live().map(|(i, _)| i).filter(|i| *i != 0).collect();
        victims.shuffle(&mut self.rng);
        victims.truncate(self.plan.kills_per_round);
        for &v in &victims {
            // Dropping the process kills it (SIGKILL) and reaps it.
            self.members[v].proc = None;
        }
        report.killed = victims.len();
        for k in 0..victims.len() {
            // A dead node, preferably one killed in an earlier round (it restarts behind).
            let dead: Vec<usize> = (0..self.members.len())
                .filter(|i| self.members[*i].proc.is_none())
                .collect();
            let older: Vec<usize> = dead
                .iter()
                .copied()
                .filter(|i| !victims.contains(i))
                .collect();
            let restart = if k % 2 == 0 {
                older
                    .choose(&mut self.rng)
                    .or_else(|| dead.choose(&mut self.rng))
                    .copied()
            } else {
                None
            };
            match restart {
                Some(i) => {
                    self.start(i, r)?;
                    self.members[i].restarts += 1;
                    report.restarted += 1;
                }
                None => {
                    let i = self.add_member();
                    self.start(i, r)?;
                    report.joined += 1;
                }
            }
        }
        Ok(())
    }

    fn finish(mut self, mut failure: Option<String>, t0: Instant) -> ChurnReport {
        let last = self.plan.churn_rounds + self.plan.calm_rounds;
        let st = self.observe();
        let tip_of = |i: &usize| {
            st.get(i)
                .and_then(|s| s.latest_round.as_ref())
                .map(|v| (v.number, v.hash.clone()))
        };
        // Node 0 never restarts: its tip is the reference.
        let reference = tip_of(&0);
        let live: Vec<usize> = self.live().map(|(i, _)| i).collect();
        let on_tip = |i: &&usize| reference.is_some() && tip_of(i) == reference;
        let converged = failure.is_none()
            && reference.as_ref().is_some_and(|(n, _)| *n == last)
            && live.iter().filter(on_tip).count() == live.len();
        let tip = reference.as_ref().map(|(n, h)| format!("round-{n} {h}"));
        let restarted: Vec<usize> = live
            .iter()
            .copied()
            .filter(|i| self.members[*i].restarts > 0)
            .collect();
        let caught_up = restarted.iter().filter(on_tip).count();
        let rss: Vec<u64> = self.live().filter_map(|(_, p)| p.rss_bytes()).collect();
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let rss_mean = if rss.is_empty() {
            0.0
        } else {
            mib(rss.iter().sum::<u64>()) / rss.len() as f64
        };
        if failure.is_none() && !converged {
            let off = live.len() - live.iter().filter(on_tip).count();
            failure = Some(format!(
                "{off} of {} live nodes are not on node 0's tip {tip:?} (round {last} expected)",
                live.len()
            ));
        }
        let report = ChurnReport {
            plan: self.plan.clone(),
            close_to_commit_ms: Percentiles::of(
                self.rounds
                    .iter()
                    .filter_map(|r| r.close_to_commit_ms)
                    .collect(),
            ),
            grace_ms: crate::node::round_config(self.plan.round_secs, None).grace_ms,
            rounds: std::mem::take(&mut self.rounds),
            gossip_ms: Percentiles::of(std::mem::take(&mut self.gossip)),
            gossip_to_all_ms: Percentiles::of(std::mem::take(&mut self.gossip_to_all)),
            gossip_missed: self.missed,
            rss_mib_mean: rss_mean,
            rss_mib_max: mib(self.rss_max.max(rss.iter().copied().max().unwrap_or(0))),
            converged,
            tip,
            restarted_live: restarted.len(),
            restarted_caught_up: caught_up,
            processes_started: self.started,
            exited: std::mem::take(&mut self.exited),
            wall_s: t0.elapsed().as_secs_f64(),
            failure,
        };
        // Dropping the members kills every process.
        self.members.clear();
        report
    }
}

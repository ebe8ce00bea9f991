//! The round driver: glue between the sans-I/O [`RoundMachine`], the [`Store`], the
//! aggregator and the network [`Client`].
//!
//! ```text
//!   NetEvent (gossip) ──decode+verify──▶ ┌──────────┐ ──Verdict──▶ Client::validate
//!   fetch / aggregate results ─────────▶ │  Driver  │ ──FetchBlob/FetchAnnouncement──▶ fetch tasks
//!   timer (next_deadline) ─────────────▶ │ (1 task) │ ──Aggregate──▶ spawn_blocking(FedAvg)
//!   Local (contribute) ────────────────▶ └──────────┘ ──Publish*──▶ Client::publish
//!                                                      ──Commit──▶ Store + status.json
//! ```
//!
//! Everything CPU- or disk-heavy (aggregation, hashing, store writes) runs on blocking
//! threads; results come back as [`Event`]s on an internal channel. Shutdown: the
//! cancellation token is checked first in a `biased` select.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hivemind_model::adapter::LoraAdapter;
use hivemind_protocol::{
    announce_topic, digest_topic, Action, Event, FetchFailure, Hash, ModelId, NodeKey, RoundConfig,
    RoundDigest, RoundMachine, Signed, SignedAnnouncement, SignedDigest, Verdict,
};
use hivemind_store::Store;
use libp2p::gossipsub::{MessageAcceptance, MessageId};
use libp2p::PeerId;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::data_dir::{
    AggregationView, DataDir, OwnAdapter, PrivacyView, RoundView, StatusFile, TransferView,
};
use crate::error::{Error, Result};
use crate::identity::peer_id_of;
use crate::net::blob::{fetch_blob_fair, Fetched, Transfers};
use crate::net::{with_peer, Client, NetEvent};

mod aggregate;
mod spec;

pub use aggregate::{aggregate, merge_excluding, round_metadata, version_name, Aggregated, Merge};
pub use spec::{
    check_adapter_blob, check_round_adapter_blob, NetRule, NetSpec, ISO_SCALE, ROUND_RANK_FACTOR,
    TSV_SCALE,
};

/// Adapter fetches (transfer and validation) a node runs at once; more wait for a free one
/// (the round machine's fetch deadline covers the wait). Announcements do not count.
pub const MAX_CONCURRENT_FETCHES: usize = 8;

/// What the driver needs to know about its network.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// The network's model id.
    pub model: ModelId,
    /// Round timing.
    pub round: RoundConfig,
    /// What every adapter of this network is.
    pub spec: NetSpec,
    /// The data dir (status file, inbox).
    pub data_dir: DataDir,
    /// Rounds whose inputs the store keeps.
    pub retain_rounds: u64,
    /// A closed network's members (see [`crate::NodeConfig::allow_peers`]): messages signed
    /// by anyone else are ignored, and an announcement of theirs that a peer names counts as
    /// invalid. `None`: an open network.
    pub allow: Option<Arc<BTreeSet<PeerId>>>,
}

/// Requests to the driver from the local node.
#[derive(Debug)]
pub enum Local {
    /// Announce an adapter dir in the current round.
    Contribute {
        /// PEFT adapter dir.
        dir: PathBuf,
        /// Training samples (the FedAvg weight).
        samples: u64,
        /// The adapter's hash, once announced.
        reply: oneshot::Sender<Result<Hash>>,
    },
    /// Announce a gateway upload (its canonical bytes already in the store) for `user_id`.
    Upload {
        /// blake3 of the adapter blob.
        hash: Hash,
        /// Its length.
        byte_len: u64,
        /// Training samples the user reported (the FedAvg weight).
        samples: u64,
        /// The uploading user.
        user_id: String,
        /// Where it went.
        reply: oneshot::Sender<Result<Placement>>,
    },
    /// Close the current round's window now (the gateway's aggregate request).
    CloseNow,
}

/// Where an upload was announced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// In the current round, this one.
    Round(u64),
    /// The user already has an adapter in the current round (one per user and round):
    /// this one is announced when the next round opens.
    Deferred(u64),
}

/// What the gateway reads of the driver's state (a `watch` channel).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DriverView {
    /// The round being collected.
    pub current_round: u64,
    /// Contributors announced for it so far.
    pub current_contributors: usize,
    /// The last committed round.
    pub latest: Option<RoundView>,
}

/// What a blob fetch is for, which decides its size bound and its check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fetch {
    Announcement,
    Adapter,
    RoundAdapter,
}

/// An aggregation shown in status.json while it runs: each try updates it, and it goes when
/// this is dropped (the job's task ends, however it ends).
struct Aggregating {
    shown: Arc<std::sync::Mutex<BTreeMap<u64, AggregationView>>>,
    round: u64,
    inputs: usize,
    since_ms: u64,
}

impl Aggregating {
    fn new(
        shown: Arc<std::sync::Mutex<BTreeMap<u64, AggregationView>>>,
        job: &hivemind_protocol::AggregationJob,
    ) -> Self {
        Aggregating {
            shown,
            round: job.round,
            inputs: job.inputs.len(),
            since_ms: now_ms(),
        }
    }

    fn attempt(&self, attempt: u32) {
        if let Ok(mut m) = self.shown.lock() {
            let view = AggregationView {
                round: self.round,
                inputs: self.inputs,
                since_ms: self.since_ms,
                attempt,
            };
            m.insert(self.round, view);
        }
    }
}

impl Drop for Aggregating {
    fn drop(&mut self) {
        if let Ok(mut m) = self.shown.lock() {
            m.remove(&self.round);
        }
    }
}

/// Rounds of this node's own announcements that status.json lists.
const OWN_ROUNDS: usize = 16;

/// Rounds whose inputs (adapters and announcements) a node keeps; older ones are collected.
pub const RETAIN_ROUNDS: u64 = 16;

/// The first pause before a failed aggregation is retried; it doubles up to
/// [`AGGREGATE_RETRY_MAX`], for at most [`AGGREGATE_ATTEMPTS`] tries (about an hour).
const AGGREGATE_RETRY_FIRST: Duration = Duration::from_secs(1);
const AGGREGATE_RETRY_MAX: Duration = Duration::from_secs(60);
const AGGREGATE_ATTEMPTS: u32 = 64;

struct DeferredUpload {
    hash: Hash,
    byte_len: u64,
    samples: u64,
    after_round: u64,
}

struct PendingMsg {
    id: MessageId,
    source: PeerId,
    data: Vec<u8>,
    announcement: Option<(u64, Hash)>,
}

/// The round driver task.
pub struct Driver {
    cfg: DriverConfig,
    key: NodeKey,
    store: Store,
    client: Client,
    machine: RoundMachine,
    net_events: mpsc::Receiver<NetEvent>,
    local: mpsc::Receiver<Local>,
    done_tx: mpsc::Sender<Event>,
    done_rx: mpsc::Receiver<Event>,
    pending: BTreeMap<Hash, PendingMsg>,
    fetching: BTreeSet<Hash>,
    /// Bounds the blob transfers in flight (each holds a few MiB of frames and two threads).
    fetch_slots: Arc<tokio::sync::Semaphore>,
    announced: BTreeMap<u64, BTreeSet<Hash>>,
    /// Adapters this node announced (its own, and its gateway's uploads), by round; the last
    /// [`OWN_ROUNDS`] rounds (shown in status.json).
    own: BTreeMap<u64, BTreeSet<Hash>>,
    /// Rounds in which this node released its own adapter under differential privacy
    /// (persisted: `privacy.json`).
    released: BTreeSet<u64>,
    unpublished: Vec<(String, Vec<u8>)>,
    rounds: Vec<RoundView>,
    /// Gateway uploads waiting for the next round, by user id.
    deferred: BTreeMap<String, DeferredUpload>,
    /// Actions produced outside `act` (by `announce`), run next.
    queued: Vec<Action>,
    /// Inbox dirs refused because their round already had our adapter, with that round.
    inbox_waiting: BTreeMap<PathBuf, u64>,
    view: tokio::sync::watch::Sender<DriverView>,
    /// Fetches, aggregations and announcement writes in flight; joined when the driver stops.
    tasks: JoinSet<()>,
    /// Blob transfers in progress (shown in status.json).
    transfers: Transfers,
    /// Aggregations in progress, by round (shown in status.json).
    aggregating: Arc<std::sync::Mutex<BTreeMap<u64, AggregationView>>>,
}

impl Driver {
    /// A driver resuming after the store's latest committed round.
    pub fn new(
        cfg: DriverConfig,
        key: NodeKey,
        store: Store,
        client: Client,
        net_events: mpsc::Receiver<NetEvent>,
        local: mpsc::Receiver<Local>,
    ) -> Result<Driver> {
        let stored = store.list_rounds()?;
        let tip = match stored.last() {
            Some(r) => Some(SignedDigest::decode(&r.digest)?.payload().record.clone()),
            None => None,
        };
        let machine =
            RoundMachine::new(cfg.round.clone(), cfg.model, key.node_id(), tip, now_ms())?;
        let (done_tx, done_rx) = mpsc::channel(1024);
        let released = cfg.data_dir.released_rounds();
        Ok(Driver {
            rounds: stored.iter().map(RoundView::of).collect(),
            cfg,
            key,
            store,
            client,
            machine,
            net_events,
            local,
            done_tx,
            done_rx,
            pending: BTreeMap::new(),
            fetching: BTreeSet::new(),
            fetch_slots: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_FETCHES)),
            announced: BTreeMap::new(),
            own: BTreeMap::new(),
            released,
            unpublished: Vec::new(),
            deferred: BTreeMap::new(),
            queued: Vec::new(),
            inbox_waiting: BTreeMap::new(),
            tasks: JoinSet::new(),
            transfers: Transfers::default(),
            aggregating: Arc::default(),
            view: tokio::sync::watch::Sender::new(DriverView::default()),
        })
    }

    /// A live view of the round state (current round, contributors, latest commit).
    pub fn view(&self) -> tokio::sync::watch::Receiver<DriverView> {
        self.view.subscribe()
    }

    fn publish_view(&self) {
        let v = DriverView {
            current_round: self.machine.current_round(),
            current_contributors: self
                .announced
                .get(&self.machine.current_round())
                .map_or(0, BTreeSet::len),
            latest: self.rounds.last().cloned(),
        };
        self.view.send_if_modified(|old| {
            let changed = *old != v;
            *old = v;
            changed
        });
    }

    /// Announces gateway uploads that were waiting when the node stopped: each user's newest
    /// upload not in a committed round. Where we had already announced an upload of that user
    /// in this very round, that stored envelope is handed back (the same message, so peers see
    /// no second announcement), and a newer upload of the user waits for the next round again,
    /// as it did before the restart (one adapter per node, user and round).
    async fn resume_uploads(&mut self) {
        let store = self.store.clone();
        let round = self.machine.current_round();
        let found = tokio::task::spawn_blocking(move || -> hivemind_store::Result<_> {
            let mut pending = Vec::new();
            for u in store.pending_uploads()? {
                let len = store.blob_len(&u.blob)?;
                pending.push((u, len));
            }
            Ok((pending, store.list_announcements(round)?))
        })
        .await;
        let Ok(Ok((pending, stored))) = found else {
            tracing::error!("cannot read pending uploads from the store");
            return;
        };
        // Our own announcements of this round, by user.
        let mut ours: BTreeMap<String, SignedAnnouncement> = BTreeMap::new();
        let mut own = None;
        for (_, bytes) in stored {
            let Ok(a) = SignedAnnouncement::decode_for(&bytes, &self.cfg.model) else {
                continue;
            };
            let p = a.payload();
            if p.contributor != self.key.node_id() || p.round != round {
                continue;
            }
            match p.user_id.clone() {
                Some(user) => {
                    ours.entry(user).or_insert(a);
                }
                None => own = own.or(Some(a)),
            }
        }
        // This node's own adapter of this round, announced before a restart: the round has it
        // (the same signed bytes go out again), so a hand-over waiting in the inbox waits for
        // the next round instead of becoming a second contribution (and, in a private
        // network, a second release of the user's data) in this one.
        if let Some(a) = own {
            let actions = self.machine.handle(now_ms(), Event::LocalContribution(a));
            self.act(actions).await;
        }
        for (u, len) in pending {
            let Some(len) = len else {
                continue;
            };
            match ours.remove(&u.user_id) {
                Some(a) => {
                    let announced = a.payload().adapter;
                    let actions = self.machine.handle(now_ms(), Event::LocalContribution(a));
                    self.act(actions).await;
                    if announced != u.blob {
                        self.deferred.insert(
                            u.user_id.clone(),
                            DeferredUpload {
                                hash: u.blob,
                                byte_len: len,
                                samples: u.training_samples,
                                after_round: round,
                            },
                        );
                    }
                }
                None => {
                    let r = self
                        .announce_upload(u.blob, len, u.training_samples, u.user_id.clone())
                        .await;
                    if let Err(e) = r {
                        tracing::error!(upload = %u.id, error = %e, "cannot announce a pending upload");
                    }
                }
            }
        }
    }

    /// Runs until `cancel` fires.
    pub async fn run(mut self, cancel: CancellationToken) {
        self.resume_uploads().await;
        let mut housekeeping = tokio::time::interval(Duration::from_millis(300));
        loop {
            let now = now_ms();
            let wait = self
                .machine
                .next_deadline()
                .map_or(1000, |d| d.saturating_sub(now).min(1000));
            let timer = tokio::time::sleep(Duration::from_millis(wait));
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                Some(ev) = self.done_rx.recv() => {
                    if let Event::BlobAvailable { hash } | Event::FetchFailed { hash, .. } = &ev {
                        self.fetching.remove(hash);
                    }
                    let actions = self.machine.handle(now_ms(), ev);
                    self.act(actions).await;
                }
                Some(ev) = self.net_events.recv() => self.on_net_event(ev).await,
                Some(req) = self.local.recv() => self.on_local(req).await,
                _ = housekeeping.tick() => self.housekeeping().await,
                Some(done) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    if let Err(e) = done {
                        tracing::error!(error = %e, "driver task failed");
                    }
                }
                _ = timer => {
                    let actions = self.machine.tick(now_ms());
                    self.act(actions).await;
                }
            }
        }
        // Fetches stop at their next await; a blocking write or aggregation already running
        // finishes (abort cannot stop it), so nothing is left half-written when `run` returns.
        self.done_rx.close();
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        tracing::debug!("driver stopped");
    }

    async fn on_net_event(&mut self, ev: NetEvent) {
        let NetEvent::Gossip {
            topic,
            id,
            source,
            data,
        } = ev
        else {
            return;
        };
        let model = self.cfg.model;
        let event = if topic == announce_topic(&model) {
            SignedAnnouncement::decode_for(&data, &model).map(|m| {
                let p = m.payload();
                let signer = p.contributor;
                (
                    Some((p.round, p.adapter)),
                    m.id(),
                    signer,
                    Event::Announcement(m),
                )
            })
        } else if topic == digest_topic(&model) {
            SignedDigest::decode_for(&data, &model)
                .map(|m| (None, m.id(), m.payload().signer, Event::Digest(m)))
        } else {
            self.client
                .validate(id, source, MessageAcceptance::Ignore)
                .await;
            return;
        };
        match event {
            Ok((_, _, signer, _)) if !allowed(self.cfg.allow.as_deref(), &signer) => {
                // A closed network ignores outsiders' messages, relayed by a member or not
                // (the member forwarding them is not at fault).
                self.client
                    .validate(id, source, MessageAcceptance::Ignore)
                    .await;
            }
            Ok((announcement, hash, _, event)) => {
                self.pending.insert(
                    hash,
                    PendingMsg {
                        id,
                        source,
                        data,
                        announcement,
                    },
                );
                let actions = self.machine.handle(now_ms(), event);
                self.act(actions).await;
                // A message the machine gave no verdict for is not propagated.
                if let Some(p) = self.pending.remove(&hash) {
                    self.client
                        .validate(p.id, p.source, MessageAcceptance::Ignore)
                        .await;
                }
            }
            Err(e) => {
                tracing::warn!(%source, error = %e, %topic, "invalid gossip message; rejecting");
                self.client
                    .validate(id, source, MessageAcceptance::Reject)
                    .await;
            }
        }
    }

    async fn on_local(&mut self, req: Local) {
        match req {
            Local::Contribute {
                dir,
                samples,
                reply,
            } => {
                let round = self.machine.current_round();
                let r = match self.contribute(&dir, samples).await {
                    Ok(Some(hash)) => Ok(hash),
                    Ok(None) => Err(Error::Refused {
                        detail: format!(
                            "round {round} already has this node's adapter (one per node and \
                             round); offer it in the next round"
                        ),
                    }),
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            Local::Upload {
                hash,
                byte_len,
                samples,
                user_id,
                reply,
            } => {
                let r = self.announce_upload(hash, byte_len, samples, user_id).await;
                let _ = reply.send(r);
                self.publish_view();
            }
            Local::CloseNow => {
                let actions = self.machine.handle(now_ms(), Event::CloseNow);
                self.act(actions).await;
            }
        }
    }

    /// Announces a stored gateway upload for `user_id` in the current round, or defers it to
    /// the next round when that user already has one in this round.
    async fn announce_upload(
        &mut self,
        hash: Hash,
        byte_len: u64,
        samples: u64,
        user_id: String,
    ) -> Result<Placement> {
        let round = self.machine.current_round();
        let accepted = self.announce(hash, byte_len, samples, Some(user_id.clone()))?;
        self.flush_queued().await;
        if accepted {
            Ok(Placement::Round(round))
        } else {
            // The newest upload of a user is the one that waits.
            self.deferred.insert(
                user_id,
                DeferredUpload {
                    hash,
                    byte_len,
                    samples,
                    after_round: round,
                },
            );
            Ok(Placement::Deferred(round + 1))
        }
    }

    /// Signs and hands one of our adapters to the round machine; `true` when it was
    /// accepted for the current round (and is being published).
    fn announce(
        &mut self,
        hash: Hash,
        byte_len: u64,
        samples: u64,
        user_id: Option<String>,
    ) -> Result<bool> {
        let now = now_ms();
        // A sample count says something about the user's data outside the noise: a private
        // network announces 1 for everyone.
        let samples = if self.cfg.spec.dp.is_some() {
            1
        } else {
            samples
        };
        let draft = self
            .machine
            .draft_announcement(hash, byte_len, samples, user_id, now);
        let signed = Signed::sign(draft, &self.key)?;
        let id = signed.id();
        tracing::info!(adapter = %hash.short(), round = self.machine.current_round(), "contributing");
        let actions = self.machine.handle(now, Event::LocalContribution(signed));
        let accepted = actions
            .iter()
            .any(|a| matches!(a, Action::PublishAnnouncement(s) if s.id() == id));
        self.queued.extend(actions);
        Ok(accepted)
    }

    /// Reads, checks and stores an adapter dir, then announces it in the current round;
    /// `None` when this round already has this node's adapter (one per node and round).
    pub async fn contribute(&mut self, dir: &Path, samples: u64) -> Result<Option<Hash>> {
        let dir = dir.to_path_buf();
        let store = self.store.clone();
        let spec = self.cfg.spec.clone();
        let (hash, len) = tokio::task::spawn_blocking(move || -> Result<(Hash, u64)> {
            let adapter = LoraAdapter::read_dir(&dir)?;
            spec.check(&adapter)?;
            let bytes = spec.release(&adapter)?;
            let hash = store.put_blob(&bytes)?;
            Ok((hash, bytes.len() as u64))
        })
        .await??;
        let accepted = self.announce(hash, len, samples, None)?;
        self.flush_queued().await;
        Ok(accepted.then_some(hash))
    }

    async fn flush_queued(&mut self) {
        let actions = std::mem::take(&mut self.queued);
        self.act(actions).await;
    }

    async fn act(&mut self, actions: Vec<Action>) {
        for a in actions {
            self.act_one(a).await;
        }
    }

    async fn act_one(&mut self, action: Action) {
        match action {
            Action::Verdict { id, verdict } => {
                let Some(p) = self.pending.remove(&id) else {
                    return;
                };
                let acceptance = match &verdict {
                    Verdict::Accept => MessageAcceptance::Accept,
                    Verdict::Ignore(_) => MessageAcceptance::Ignore,
                    Verdict::Reject(why) => {
                        tracing::warn!(source = %p.source, ?why, "message rejected by the round machine");
                        MessageAcceptance::Reject
                    }
                };
                if verdict == Verdict::Accept {
                    if let Some((round, adapter)) = p.announcement {
                        self.announced.entry(round).or_default().insert(adapter);
                        self.keep_announcement(round, adapter, p.data.clone());
                    }
                }
                self.client.validate(p.id, p.source, acceptance).await;
            }
            Action::FetchBlob { hash, from } => self.spawn_fetch(hash, from, Fetch::Adapter).await,
            Action::FetchRoundAdapter { hash, from } => {
                self.spawn_fetch(hash, from, Fetch::RoundAdapter).await
            }
            Action::FetchAnnouncement { id, from } => {
                self.spawn_fetch(id, from, Fetch::Announcement).await
            }
            Action::Aggregate(job) => {
                let store = self.store.clone();
                let spec = self.cfg.spec.clone();
                let tx = self.done_tx.clone();
                let (client, model) = (self.client.clone(), self.cfg.model);
                // A failure (the disk full, a blob unreadable) is retried with a growing
                // pause: the machine waits for this job's result, and before, one failure
                // left the round stuck for good, even after space came back.
                let shown = Aggregating::new(self.aggregating.clone(), &job);
                self.tasks.spawn(async move {
                    let mut pause = AGGREGATE_RETRY_FIRST;
                    for attempt in 1..=AGGREGATE_ATTEMPTS {
                        shown.attempt(attempt);
                        let (st, sp, j) = (store.clone(), spec.clone(), job.clone());
                        let r = tokio::task::spawn_blocking(move || aggregate(&st, &sp, &j)).await;
                        match r {
                            Ok(Ok(done)) => {
                                drop(shown);
                                penalise_blamed(&client, &store, &model, job.round, &done.blamed).await;
                                let result = done.hash;
                                let _ = tx.send(Event::AggregationFinished { job, result }).await;
                                return;
                            }
                            Ok(Err(e)) => tracing::error!(
                                round = job.round, attempt, error = %e,
                                "aggregation failed; retrying in {pause:?}"
                            ),
                            Err(e) => tracing::error!(round = job.round, error = %e, "aggregation task failed"),
                        }
                        if tx.is_closed() {
                            return;
                        }
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(AGGREGATE_RETRY_MAX);
                    }
                });
            }
            Action::PublishAnnouncement(s) => {
                let p = s.payload();
                self.announced.entry(p.round).or_default().insert(p.adapter);
                self.own.entry(p.round).or_default().insert(p.adapter);
                while self.own.len() > OWN_ROUNDS {
                    self.own.pop_first();
                }
                self.keep_announcement(p.round, p.adapter, s.as_bytes().to_vec());
                if self.cfg.spec.dp.is_some()
                    && p.user_id.is_none()
                    && self.released.insert(p.round)
                {
                    if let Err(e) = self.cfg.data_dir.write_released_rounds(&self.released) {
                        tracing::error!(error = %e, "cannot record the release for privacy accounting");
                    }
                }
                self.publish(announce_topic(&self.cfg.model), s.encode())
                    .await;
            }
            Action::PublishDigest(d) => match Signed::sign(d, &self.key) {
                Ok(s) => {
                    self.publish(digest_topic(&self.cfg.model), s.encode())
                        .await
                }
                Err(e) => tracing::error!(error = %e, "cannot sign digest"),
            },
            Action::Commit { record, replaces } => self.commit(record, replaces).await,
            Action::Penalise { peer, reason } => {
                if peer == self.key.node_id() {
                    // Our own refused contribution (e.g. a second one in a round).
                    return;
                }
                if let Some(p) = peer_id_of(&peer) {
                    self.client.penalise(p, format!("{reason:?}")).await;
                }
            }
        }
    }

    /// Fetches a blob (an adapter, or an announcement envelope named by its id) and
    /// reports the outcome as an event.
    async fn spawn_fetch(&mut self, hash: Hash, from: Vec<hivemind_protocol::NodeId>, kind: Fetch) {
        let announcement = kind == Fetch::Announcement;
        if !self.fetching.insert(hash) {
            return;
        }
        let mut peers: Vec<PeerId> = from.iter().filter_map(peer_id_of).collect();
        if let Ok(info) = self.client.info().await {
            for p in info.connected {
                if !peers.contains(&p) {
                    peers.push(p);
                }
            }
        }
        let me = self.client.local_peer_id();
        peers.retain(|p| *p != me);
        let client = self.client.clone();
        let store = self.store.clone();
        let tx = self.done_tx.clone();
        let model = self.cfg.model;
        let spec = self.cfg.spec.clone();
        let allow = self.cfg.allow.clone();
        // A peer that claims more bytes than the blob can have is skipped unread.
        let max_len = match kind {
            Fetch::Announcement => hivemind_protocol::MAX_MESSAGE_BYTES as u64,
            Fetch::Adapter => spec.max_adapter_bytes(),
            Fetch::RoundAdapter => spec.max_round_adapter_bytes(),
        };
        let slots = self.fetch_slots.clone();
        let transfers = self.transfers.clone();
        self.tasks.spawn(async move {
            // Adapter transfers (and their validation, which loads the adapter) take a slot;
            // announcements (a few KiB) and blobs already held do not wait behind them.
            let held = matches!(store.has_blob(&hash), Ok(true));
            if !announcement && !held {
                if let Err(why) = store.ensure_room(max_len) {
                    // Not the sources' fault: the machine retries at its fetch timeout.
                    tracing::warn!(blob = %hash.short(), %why, "not fetching");
                    let reason = FetchFailure::Local;
                    let _ = tx.send(Event::FetchFailed { hash, reason }).await;
                    return;
                }
            }
            let _slot = if announcement || held {
                None
            } else {
                slots.acquire_owned().await.ok()
            };
            let got = if held {
                Fetched::From(client.local_peer_id())
            } else {
                fetch_blob_fair(&client, &store, hash, &peers, max_len, &transfers).await
            };
            let ev = if got == Fetched::Deferred {
                // Its sources were not asked (we receive our share from them already).
                Event::FetchFailed {
                    hash,
                    reason: FetchFailure::Busy,
                }
            } else if got == Fetched::Failed {
                Event::FetchFailed {
                    hash,
                    reason: FetchFailure::Unavailable,
                }
            } else if announcement {
                let st = store.clone();
                let bytes = tokio::task::spawn_blocking(move || st.get_blob(&hash))
                    .await
                    .ok()
                    .and_then(|r| r.ok())
                    .flatten();
                match bytes.map(|b| SignedAnnouncement::decode_for(&b, &model)) {
                    // An outsider's announcement, named by a member of a closed network, is
                    // no input here. Not the namer's fault (its list may differ from ours for
                    // a while): dropped without blame.
                    Some(Ok(a)) if !allowed(allow.as_deref(), &a.payload().contributor) => {
                        Event::FetchFailed {
                            hash,
                            reason: FetchFailure::Local,
                        }
                    }
                    Some(Ok(a)) => Event::Announcement(a),
                    Some(Err(_)) => Event::FetchFailed {
                        hash,
                        reason: FetchFailure::Invalid,
                    },
                    None => Event::FetchFailed {
                        hash,
                        reason: FetchFailure::Unavailable,
                    },
                }
            } else {
                // An adapter blob: its hash is right, but its content must be an adapter
                // of this network's shape, or aggregation could not use it.
                let st = store.clone();
                let valid = tokio::task::spawn_blocking(move || {
                    if kind == Fetch::RoundAdapter {
                        check_round_adapter_blob(&st, &spec, &hash)
                    } else {
                        check_adapter_blob(&st, &spec, &hash)
                    }
                })
                .await
                .unwrap_or_else(|e| Err(Error::Task(e)));
                match valid {
                    Ok(()) => Event::BlobAvailable { hash },
                    Err(why) => {
                        tracing::warn!(adapter = %hash.short(), %why, "fetched adapter is not usable; dropped");
                        Event::FetchFailed {
                            hash,
                            reason: FetchFailure::Invalid,
                        }
                    }
                }
            };
            let _ = tx.send(ev).await;
        });
    }

    fn keep_announcement(&mut self, round: u64, adapter: Hash, envelope: Vec<u8>) {
        let store = self.store.clone();
        self.tasks.spawn_blocking(move || {
            if let Err(e) = store
                .put_blob(&envelope)
                .and_then(|_| store.put_announcement(round, &adapter, &envelope))
            {
                tracing::error!(error = %e, "cannot store announcement");
            }
        });
    }

    async fn publish(&mut self, topic: String, data: Vec<u8>) {
        if let Err(e) = self.client.publish(topic.clone(), data.clone()).await {
            tracing::debug!(error = %e, "publish failed; will retry");
            self.unpublished.push((topic, data));
        }
    }

    async fn commit(&mut self, record: hivemind_protocol::RoundRecord, replaces: Option<Hash>) {
        let digest = RoundDigest {
            record: record.clone(),
            signer: self.key.node_id(),
            committed: true,
            time_ms: now_ms(),
        };
        let digest = match Signed::sign(digest, &self.key) {
            Ok(d) => d.encode(),
            Err(e) => {
                tracing::error!(error = %e, "cannot sign the committed digest");
                return;
            }
        };
        let stored = hivemind_store::RoundRecord {
            number: record.round,
            hash: record.result,
            version: version_name(record.round),
            parent: record.parent,
            contributors: record.inputs.iter().map(|i| i.adapter).collect(),
            rule: aggregate::rule_name(record.rule).to_string(),
            digest,
            committed_at_ms: now_ms(),
        };
        tracing::info!(round = record.round, hash = %record.result.short(), contributors = record.inputs.len(), ?replaces, "round committed");
        let store = self.store.clone();
        let s2 = stored.clone();
        let retain = self.cfg.retain_rounds.max(1);
        let committed = tokio::task::spawn_blocking(move || -> hivemind_store::Result<()> {
            // The new tip: rounds above it (orphaned by a rewind) leave the store too.
            let orphaned = store.commit_round(&s2)?;
            if !orphaned.is_empty() {
                tracing::info!(?orphaned, "dropped rounds orphaned by the commit");
            }
            // Gateway uploads that made it into this round are no longer pending.
            for u in store.list_uploads()? {
                if s2.contributors.contains(&u.blob) && u.round != Some(s2.number) {
                    store.mark_upload_included(&u.id, s2.number)?;
                }
            }
            // Inputs of rounds far behind are forgotten (round adapters and pending uploads
            // are kept): the disk holds `retain_rounds` rounds of inputs, not all of them.
            if let Some(cut) = (s2.number + 1).checked_sub(retain) {
                let done = store.collect_rounds_before(cut)?;
                if done.blobs > 0 {
                    tracing::info!(
                        before_round = cut,
                        blobs = done.blobs,
                        bytes = done.bytes,
                        "collected old round inputs"
                    );
                }
            }
            Ok(())
        });
        match committed.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "cannot store the committed round"),
            Err(e) => tracing::error!(error = %e, "commit task failed"),
        }
        // Our records of later rounds are orphaned by a commit of an earlier one.
        self.rounds.retain(|r| r.number < stored.number);
        self.rounds.push(RoundView::of(&stored));
        self.rounds.sort_by_key(|r| r.number);
        self.announced.retain(|r, _| *r > record.round);
        // status.json first: whoever sees the commit in the view (a test, the gateway) then
        // finds it in the data dir too (`export`, `rounds` read status.json).
        self.write_status().await;
        self.publish_view();
    }

    async fn housekeeping(&mut self) {
        let round = self.machine.current_round();
        let due: Vec<String> = self
            .deferred
            .iter()
            .filter(|(_, d)| d.after_round < round)
            .map(|(u, _)| u.clone())
            .collect();
        for user in due {
            if let Some(d) = self.deferred.remove(&user) {
                match self
                    .announce_upload(d.hash, d.byte_len, d.samples, user)
                    .await
                {
                    Ok(p) => {
                        tracing::info!(adapter = %d.hash.short(), placement = ?p, "deferred upload announced")
                    }
                    Err(e) => tracing::error!(error = %e, "cannot announce a deferred upload"),
                }
            }
        }
        self.publish_view();
        let retry = std::mem::take(&mut self.unpublished);
        for (topic, data) in retry {
            self.publish(topic, data).await;
        }
        self.poll_inbox().await;
        self.write_status().await;
    }

    async fn poll_inbox(&mut self) {
        let ready = self.cfg.data_dir.inbox_ready();
        let round = self.machine.current_round();
        self.inbox_waiting.retain(|_, r| *r >= round);
        for dir in ready {
            if self.inbox_waiting.contains_key(&dir) {
                continue;
            }
            let samples = DataDir::inbox_samples(&dir);
            match self.contribute(&dir, samples).await {
                Ok(Some(h)) => tracing::info!(adapter = %h.short(), "contributed from the inbox"),
                Ok(None) => {
                    // This round has our adapter already: the dir waits for the next round.
                    tracing::info!(dir = %dir.display(), round, "inbox adapter waits for the next round");
                    self.inbox_waiting.insert(dir, round);
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, dir = %dir.display(), "inbox contribution refused")
                }
            }
            DataDir::inbox_done(&dir);
        }
    }

    async fn write_status(&self) {
        let Ok(info) = self.client.info().await else {
            return;
        };
        let peer = self.client.local_peer_id();
        let round = self.machine.current_round();
        let status = StatusFile {
            pid: std::process::id(),
            peer_id: peer.to_string(),
            listen_addrs: info
                .listen_addrs
                .iter()
                .map(|a| with_peer(a, peer).to_string())
                .collect(),
            connected_peers: info.connected.len(),
            current_round: round,
            current_contributors: self
                .announced
                .get(&round)
                .map(|s| s.iter().map(Hash::to_hex).collect())
                .unwrap_or_default(),
            latest_round: self.rounds.last().cloned(),
            model_id: self.cfg.model.to_hex(),
            adapter_config: serde_json::to_value(&self.cfg.spec.config)
                .unwrap_or(serde_json::Value::Null),
            inbox_waiting: self
                .inbox_waiting
                .keys()
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect(),
            penalties: info
                .penalties
                .iter()
                .map(|(p, n)| (p.to_string(), *n))
                .collect(),
            scores: info
                .scores
                .iter()
                .map(|(p, s)| (p.to_string(), *s))
                .collect(),
            own_adapters: self
                .own
                .iter()
                .flat_map(|(round, hashes)| {
                    hashes.iter().map(|h| OwnAdapter {
                        round: *round,
                        hash: h.to_hex(),
                    })
                })
                .collect(),
            transfers: self
                .transfers
                .snapshot()
                .into_iter()
                .map(|(hash, t)| TransferView {
                    hash: hash.to_hex(),
                    peer: t.peer.to_string(),
                    bytes: t.bytes,
                    total: t.total,
                    bytes_per_s: t.bytes as f64 / t.started.elapsed().as_secs_f64().max(1e-3),
                })
                .collect(),
            privacy: self.cfg.spec.dp.map(|dp| {
                let n = self.released.len() as u64;
                PrivacyView {
                    clip: dp.clip,
                    noise_multiplier: dp.noise_multiplier,
                    delta: dp.delta,
                    epsilon_per_round: dp.epsilon(1),
                    rounds_released: n,
                    epsilon_total: dp.epsilon(n),
                }
            }),
            aggregating: self
                .aggregating
                .lock()
                .map(|m| m.values().cloned().collect())
                .unwrap_or_default(),
            links: info
                .links
                .iter()
                .map(|(p, l)| (p.to_string(), l.clone()))
                .collect(),
            rounds: self.rounds.clone(),
            updated_ms: now_ms(),
        };
        let dir = self.cfg.data_dir.clone();
        let _ = tokio::task::spawn_blocking(move || dir.write_status(&status)).await;
    }
}

/// Penalises the contributors of round `round`'s inputs an aggregation had to leave out
/// because they fail on their own (each named by its stored announcement; this node's own
/// are skipped).
async fn penalise_blamed(
    client: &Client,
    store: &Store,
    model: &ModelId,
    round: u64,
    blamed: &[Hash],
) {
    for adapter in blamed {
        let envelope = store.get_announcement(round, adapter).ok().flatten();
        let Some(a) = envelope.and_then(|e| SignedAnnouncement::decode_for(&e, model).ok()) else {
            continue;
        };
        let Some(peer) = peer_id_of(&a.payload().contributor) else {
            continue;
        };
        if peer != client.local_peer_id() {
            client
                .penalise(
                    peer,
                    format!(
                        "input {} of round {round} cannot be aggregated",
                        adapter.short()
                    ),
                )
                .await;
        }
    }
}

/// Whether a message signed by `signer` counts here: always in an open network (`None`),
/// else only a member's (or this node's own).
fn allowed(allow: Option<&BTreeSet<PeerId>>, signer: &hivemind_protocol::NodeId) -> bool {
    match allow {
        None => true,
        Some(members) => peer_id_of(signer).is_some_and(|p| members.contains(&p)),
    }
}

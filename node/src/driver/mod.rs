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
//!
//! Where the driver's parts live: the event loop and the round machine's actions here;
//! `local` (this node's contributions, the inbox, gateway uploads and their deferral),
//! `fetch` (blob fetches and their checks), `commit` (aggregation jobs and commits),
//! `status` (status.json); `spec` is the network's adapter contract and `aggregate` the
//! round adapter's bytes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hivemind_protocol::{
    announce_topic, digest_topic, Action, Event, Hash, ModelId, NodeKey, Phase, RoundConfig,
    RoundMachine, Signed, SignedAnnouncement, SignedDigest, Verdict,
};
use hivemind_store::Store;
use libp2p::gossipsub::{MessageAcceptance, MessageId};
use libp2p::PeerId;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::data_dir::{AggregationView, DataDir, RoundView};
use crate::error::Result;
use crate::identity::peer_id_of;
use crate::net::blob::Transfers;
use crate::net::{Client, NetEvent};

mod aggregate;
mod commit;
mod fetch;
mod local;
mod spec;
mod status;

pub use fetch::MAX_CONCURRENT_FETCHES;
use fetch::{Fetch, InFlight};
use local::DeferredUpload;

pub use aggregate::{aggregate, merge_excluding, round_metadata, version_name, Aggregated, Merge};
pub use spec::{
    check_adapter_blob, check_round_adapter_blob, NetRule, NetSpec, ISO_SCALE, ROUND_RANK_FACTOR,
    TSV_SCALE,
};

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

/// Rounds of this node's own announcements that status.json lists.
const OWN_ROUNDS: usize = 16;

/// Rounds whose inputs (adapters and announcements) a node keeps; older ones are collected.
pub const RETAIN_ROUNDS: u64 = 16;

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
    fetching: InFlight,
    /// Bounds the blob transfers in flight (each holds a few MiB of frames and two threads).
    fetch_slots: Arc<tokio::sync::Semaphore>,
    /// Announcements accepted, by round: adapter hash and when it was first held (unix ms).
    announced: BTreeMap<u64, BTreeMap<Hash, u64>>,
    /// The round whose window this node saw close, and when (unix ms).
    closed: Option<(u64, u64)>,
    /// Adapters this node announced (its own, and its gateway's uploads), by round; the last
    /// [`OWN_ROUNDS`] rounds (shown in status.json).
    own: BTreeMap<u64, BTreeSet<Hash>>,
    /// Rounds in which this node released its own adapter under differential privacy
    /// (persisted: `privacy.json`).
    released: BTreeSet<u64>,
    unpublished: Vec<(String, Vec<u8>)>,
    rounds: Vec<RoundView>,
    /// When this node committed each round (unix ms, by number).
    committed_ms: BTreeMap<u64, u64>,
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
        let mut machine =
            RoundMachine::new(cfg.round.clone(), cfg.model, key.node_id(), tip, now_ms())?;
        // The rounds before the tip: a record forking below it has its weight checked
        // against them rather than taken on a quorum's word.
        let mut older: Vec<_> = stored
            .iter()
            .rev()
            .skip(1)
            .take(hivemind_protocol::CHAIN_MEMORY)
            .map_while(|r| SignedDigest::decode(&r.digest).ok())
            .map(|d| d.payload().record.clone())
            .collect();
        older.reverse();
        machine.remember(&older);
        let (done_tx, done_rx) = mpsc::channel(1024);
        let released = cfg.data_dir.released_rounds();
        Ok(Driver {
            rounds: stored.iter().map(RoundView::of).collect(),
            committed_ms: stored
                .iter()
                .map(|r| (r.number, r.committed_at_ms))
                .collect(),
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
            fetching: InFlight::default(),
            fetch_slots: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_FETCHES)),
            announced: BTreeMap::new(),
            closed: None,
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
                .map_or(0, BTreeMap::len),
            latest: self.rounds.last().cloned(),
        };
        self.view.send_if_modified(|old| {
            let changed = *old != v;
            *old = v;
            changed
        });
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
                    // A fetch's failure waits for the other fetches of its hash.
                    let Some(ev) = self.fetching.finish(ev) else {
                        continue;
                    };
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

    async fn flush_queued(&mut self) {
        let actions = std::mem::take(&mut self.queued);
        self.act(actions).await;
    }

    async fn act(&mut self, actions: Vec<Action>) {
        for a in actions {
            self.act_one(a).await;
        }
        let round = self.machine.current_round();
        if self.machine.phase() == Phase::Closed && self.closed.is_none_or(|(r, _)| r != round) {
            self.closed = Some((round, now_ms()));
        }
    }

    /// Records an accepted announcement and when it was first held.
    fn note_announced(&mut self, round: u64, adapter: Hash) {
        self.announced
            .entry(round)
            .or_default()
            .entry(adapter)
            .or_insert_with(now_ms);
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
                        self.note_announced(round, adapter);
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
            Action::FetchRecord {
                tag,
                round,
                result,
                from,
            } => self.spawn_record_fetch(tag, round, result, from),
            Action::Aggregate(job) => self.spawn_aggregation(job),
            Action::PublishAnnouncement(s) => {
                let p = s.payload();
                self.note_announced(p.round, p.adapter);
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
                if matches!(reason, hivemind_protocol::Misbehaviour::WeakKey { .. }) {
                    // A key without the network's work costs nothing: the message is refused
                    // (and gossipsub scores whoever forwarded it), but a ban would only let
                    // free keys crowd the network layer's bounded ban records.
                    return;
                }
                if let Some(p) = peer_id_of(&peer) {
                    self.client.penalise(p, format!("{reason:?}")).await;
                }
            }
        }
    }

    async fn publish(&mut self, topic: String, data: Vec<u8>) {
        if let Err(e) = self.client.publish(topic.clone(), data.clone()).await {
            tracing::debug!(error = %e, "publish failed; will retry");
            self.unpublished.push((topic, data));
        }
    }

    async fn housekeeping(&mut self) {
        self.announce_due_uploads().await;
        self.publish_view();
        let retry = std::mem::take(&mut self.unpublished);
        for (topic, data) in retry {
            self.publish(topic, data).await;
        }
        self.poll_inbox().await;
        self.write_status().await;
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

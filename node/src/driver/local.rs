//! Requests from this node: its own contributions (`contribute`, the inbox) and its
//! gateway's uploads, which wait for the next round when their user already has one in this
//! round (and are resumed after a restart).

use std::collections::BTreeMap;
use std::path::Path;

use hivemind_model::adapter::LoraAdapter;
use hivemind_protocol::{Action, Event, Hash, Signed, SignedAnnouncement};

use super::{Driver, Local, Placement};
use crate::clock::now_ms;
use crate::data_dir::DataDir;
use crate::error::{Error, Result};

pub(super) struct DeferredUpload {
    hash: Hash,
    byte_len: u64,
    samples: u64,
    after_round: u64,
}

impl Driver {
    /// Announces the deferred uploads whose round has come.
    pub(super) async fn announce_due_uploads(&mut self) {
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
    }

    /// Announces gateway uploads that were waiting when the node stopped: each user's newest
    /// upload not in a committed round. Where we had already announced an upload of that user
    /// in this very round, that stored envelope is handed back (the same message, so peers see
    /// no second announcement), and a newer upload of the user waits for the next round again,
    /// as it did before the restart (one adapter per node, user and round).
    pub(super) async fn resume_uploads(&mut self) {
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

    pub(super) async fn on_local(&mut self, req: Local) {
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
                            "round {round} does not take this adapter: it has this node's \
                             adapter already (one per node and round), or it closed and takes \
                             no more inputs; offer it in the next round"
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
    pub(super) async fn announce_upload(
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
    pub(super) fn announce(
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

    pub(super) async fn poll_inbox(&mut self) {
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
}

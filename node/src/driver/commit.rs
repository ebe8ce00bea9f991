//! Aggregation jobs (retried until the store lets them finish) and commits of rounds to the
//! store.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use hivemind_protocol::{Event, Hash, ModelId, RoundDigest, Signed, SignedAnnouncement};
use hivemind_store::Store;

use super::{aggregate, version_name, Driver};
use crate::clock::now_ms;
use crate::data_dir::{AggregationView, RoundView};
use crate::identity::peer_id_of;
use crate::net::Client;

/// An aggregation shown in status.json while it runs: each try updates it, and it goes when
/// this is dropped (the job's task ends, however it ends).
pub(super) struct Aggregating {
    shown: Arc<std::sync::Mutex<BTreeMap<u64, AggregationView>>>,
    round: u64,
    inputs: usize,
    since_ms: u64,
}

impl Aggregating {
    pub(super) fn new(
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

    pub(super) fn attempt(&self, attempt: u32) {
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

/// The first pause before a failed aggregation is retried; it doubles up to
/// [`AGGREGATE_RETRY_MAX`], for at most [`AGGREGATE_ATTEMPTS`] tries (about an hour).
const AGGREGATE_RETRY_FIRST: Duration = Duration::from_secs(1);

const AGGREGATE_RETRY_MAX: Duration = Duration::from_secs(60);

const AGGREGATE_ATTEMPTS: u32 = 64;

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

impl Driver {
    /// Runs an aggregation job on a blocking thread, retried with a growing pause, and
    /// reports its result to the round machine.
    pub(super) fn spawn_aggregation(&mut self, job: hivemind_protocol::AggregationJob) {
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
                    Err(e) => {
                        tracing::error!(round = job.round, error = %e, "aggregation task failed")
                    }
                }
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(AGGREGATE_RETRY_MAX);
            }
        });
    }

    pub(super) async fn commit(
        &mut self,
        record: hivemind_protocol::RoundRecord,
        replaces: Option<Hash>,
    ) {
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
        self.committed_ms.retain(|n, _| *n < stored.number);
        self.committed_ms
            .insert(stored.number, stored.committed_at_ms);
        self.rounds.sort_by_key(|r| r.number);
        self.announced.retain(|r, _| *r > record.round);
        // status.json first: whoever sees the commit in the view (a test, the gateway) then
        // finds it in the data dir too (`export`, `rounds` read status.json).
        self.write_status().await;
        self.publish_view();
    }
}

//! Blob fetches (adapters, round adapters, announcement envelopes) in tasks of their own,
//! each checked before the round machine hears of it.

use hivemind_protocol::{Event, FetchFailure, Hash, SignedAnnouncement, SignedDigest};
use libp2p::PeerId;

use super::{allowed, check_adapter_blob, check_round_adapter_blob, Driver};
use crate::error::Error;
use crate::identity::peer_id_of;
use crate::net::blob::{fetch_blob_fair, fetch_blob_multi, Fetched};

/// Adapter fetches (transfer and validation) a node runs at once; more wait for a free one
/// (the round machine's fetch deadline covers the wait). Announcements do not count.
pub const MAX_CONCURRENT_FETCHES: usize = 8;
/// Peers asked, one after another, for one record of another chain's history.
const RECORD_PEERS: usize = 8;

/// What a blob fetch is for, which decides its size bound and its check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Fetch {
    Announcement,
    Adapter,
    RoundAdapter,
}

impl Driver {
    /// Fetches a blob (an adapter, or an announcement envelope named by its id) and
    /// reports the outcome as an event.
    pub(super) async fn spawn_fetch(
        &mut self,
        hash: Hash,
        from: Vec<hivemind_protocol::NodeId>,
        kind: Fetch,
    ) {
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
            } else if announcement {
                fetch_blob_fair(&client, &store, hash, &peers, max_len, &transfers).await
            } else {
                // Adapters from several holders at once when they are large enough.
                fetch_blob_multi(&client, &store, hash, &peers, max_len, &transfers).await
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
                    let valid = if kind == Fetch::RoundAdapter {
                        check_round_adapter_blob(&st, &spec, &hash)
                    } else {
                        check_adapter_blob(&st, &spec, &hash)
                    };
                    // What this fetch brought and is no adapter of the network goes (neither
                    // served nor aggregated); a blob held before stays (the node's own round
                    // adapter, named as an input by someone's announcement).
                    if valid.is_err() && !held {
                        let _ = st.remove_blob(&hash);
                    }
                    valid
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

    /// Asks the peers in `from` (at most [`RECORD_PEERS`] of them), one at a time, for the
    /// committed record of round `round` with result `result`, and reports
    /// [`Event::Record`] (tagged `tag`) with the first signed committed digest of this
    /// network (its signature checked), signed by the peer that served it, whose record
    /// has that round and result, and the peers asked before it that served nothing (or
    /// all of them). (The round machine asks others, without those peers or that one if
    /// the record does not hold.)
    pub(super) fn spawn_record_fetch(
        &mut self,
        tag: Hash,
        round: u64,
        result: Hash,
        from: Vec<hivemind_protocol::NodeId>,
    ) {
        let me = self.client.local_peer_id();
        let peers: Vec<(hivemind_protocol::NodeId, PeerId)> = from
            .iter()
            .filter_map(|n| Some((*n, peer_id_of(n)?)))
            .filter(|(_, p)| *p != me)
            .take(RECORD_PEERS)
            .collect();
        let (client, tx, model) = (self.client.clone(), self.done_tx.clone(), self.cfg.model);
        self.tasks.spawn(async move {
            let mut digest = None;
            let mut unanswered = Vec::new();
            for (node, peer) in peers {
                let bytes = match client.fetch_record(peer, round, &result).await {
                    Ok(Some(b)) => b,
                    Ok(None) => {
                        unanswered.push(node);
                        continue;
                    }
                    Err(e) => {
                        tracing::debug!(%peer, round, error = %e, "record fetch failed");
                        unanswered.push(node);
                        continue;
                    }
                };
                // A peer serves the records it committed itself, signed by its own key.
                let found = SignedDigest::decode_for(&bytes, &model).ok().filter(|d| {
                    let p = d.payload();
                    p.committed
                        && p.record.round == round
                        && p.record.result == result
                        && peer_id_of(&p.signer) == Some(peer)
                });
                if found.is_some() {
                    digest = found;
                    break;
                }
                tracing::debug!(%peer, round, "peer served no such committed record");
                unanswered.push(node);
            }
            let _ = tx
                .send(Event::Record {
                    tag,
                    round,
                    result,
                    digest,
                    unanswered,
                })
                .await;
        });
    }

    pub(super) fn keep_announcement(&mut self, round: u64, adapter: Hash, envelope: Vec<u8>) {
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
}

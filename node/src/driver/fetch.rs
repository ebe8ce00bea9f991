//! Blob fetches (adapters, round adapters, announcement envelopes) in tasks of their own,
//! each checked before the round machine hears of it.

use std::collections::{BTreeMap, BTreeSet};

use hivemind_protocol::{Event, FetchFailure, Hash, NodeId, SignedAnnouncement, SignedDigest};
use libp2p::PeerId;

use super::{allowed, check_adapter_blob, check_round_adapter_blob, Driver};
use crate::error::Error;
use crate::identity::peer_id_of;
use crate::net::blob::{fetch_blob_multi, fetch_blob_side_by_side, Fetched};

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

/// The fetches running, by hash. The round machine counts every peer an attempt names as
/// asked when it makes the attempt, so each named peer is asked at once: an attempt made while
/// a fetch of the same hash runs starts another for the named peers no fetch of it asks yet;
/// and a failure is reported once none runs. (Before, such an attempt was dropped, so a signer
/// named only by it was taken for one that did not serve what it signed without being asked.
/// And a fetched announcement stayed "running" for good: when the machine had forgotten it
/// and needed it again, to check another history, no fetch was made.)
#[derive(Debug, Default)]
pub(super) struct InFlight(BTreeMap<Hash, Running>);

#[derive(Debug, Default)]
struct Running {
    /// Named peers a fetch of it asks or asked.
    asked: BTreeSet<NodeId>,
    /// Fetches of it running.
    tasks: usize,
    /// How those that ended failed: the failure to report once none runs (see
    /// [`InFlight::finish`]).
    failed: Option<FetchFailure>,
    /// Its outcome was reported: what the fetches still running come to is not.
    reported: bool,
    /// An announcement: `Local` (an outsider signed it) speaks of the bytes, as `Invalid` does.
    announcement: bool,
}

/// A fetch to start.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Start {
    /// The named peers it asks.
    pub(super) ask: Vec<NodeId>,
    /// The first of its hash: it also asks the peers we are connected to.
    pub(super) first: bool,
}

impl InFlight {
    /// The fetch of `hash` to start for an attempt naming `from`, if any: all of it when no
    /// fetch of it runs (or every one running has been reported), the named peers no running
    /// fetch asks otherwise.
    pub(super) fn start(&mut self, hash: Hash, from: &[NodeId], kind: Fetch) -> Option<Start> {
        let running = self.0.entry(hash).or_default();
        let first = running.tasks == 0 || running.reported;
        if first {
            // Fetches of it still running after it was reported count with this one's.
            let tasks = running.tasks;
            *running = Running {
                tasks,
                announcement: kind == Fetch::Announcement,
                ..Running::default()
            };
        }
        let ask: Vec<NodeId> = from
            .iter()
            .filter(|n| running.asked.insert(**n))
            .copied()
            .collect();
        if !first && ask.is_empty() {
            return None;
        }
        running.tasks += 1;
        Some(Start { ask, first })
    }

    /// A fetch has ended with `ev` (anything else the driver's tasks report passes): what to
    /// report now, if anything. A success is reported at once (and again, harmlessly, if
    /// another fetch of it succeeds too), and so are bytes that are no valid blob
    /// (`Invalid`: every holder has the same) and an announcement an outsider signed (`Local`,
    /// the same). Other failures wait until no fetch of the hash runs, and then the one
    /// reported is the one that blames least: `Local` (no room here) before `Busy` (a named
    /// peer left unasked) before `Unavailable`. Once a failure or `Invalid` is reported, the
    /// outcomes of fetches still running are not, unless they succeed.
    pub(super) fn finish(&mut self, ev: Event) -> Option<Event> {
        let hash = match &ev {
            Event::BlobAvailable { hash } | Event::FetchFailed { hash, .. } => *hash,
            Event::Announcement(a) => a.id(),
            _ => return Some(ev),
        };
        let Some(running) = self.0.get_mut(&hash) else {
            return Some(ev);
        };
        running.tasks = running.tasks.saturating_sub(1);
        let out = match &ev {
            Event::FetchFailed { .. } if running.reported => None,
            Event::FetchFailed {
                reason: FetchFailure::Invalid,
                ..
            } => Some(ev),
            Event::FetchFailed {
                reason: FetchFailure::Local,
                ..
            } if running.announcement => Some(ev),
            Event::FetchFailed { reason, .. } => {
                let rank = |r: &FetchFailure| match r {
                    FetchFailure::Local => 3,
                    FetchFailure::Busy => 2,
                    _ => 1,
                };
                if running
                    .failed
                    .as_ref()
                    .is_none_or(|f| rank(reason) > rank(f))
                {
                    running.failed = Some(*reason);
                }
                match running.failed {
                    Some(reason) if running.tasks == 0 => Some(Event::FetchFailed { hash, reason }),
                    _ => None,
                }
            }
            _ => Some(ev),
        };
        if out.is_some() {
            running.reported = true;
        }
        if running.tasks == 0 {
            self.0.remove(&hash);
        }
        out
    }
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
        let Some(start) = self.fetching.start(hash, &from, kind) else {
            return;
        };
        let me = self.client.local_peer_id();
        let named: Vec<PeerId> = start
            .ask
            .iter()
            .filter_map(peer_id_of)
            .filter(|p| *p != me)
            .collect();
        // Others that may hold it, asked after the named peers: those we are connected to.
        let mut others = Vec::new();
        if start.first {
            if let Ok(info) = self.client.info().await {
                others = info.connected;
                others.retain(|p| *p != me && !named.contains(p));
            }
        }
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
            // Another fetch of it may have stored it while this one waited for a slot.
            let held = held || matches!(store.has_blob(&hash), Ok(true));
            let got = if held {
                Fetched::From(client.local_peer_id())
            } else if announcement {
                // Side by side: the round machine holds each namer to serve it within its
                // fetch timeout, and one after another a few slow ones would use it all up.
                fetch_blob_side_by_side(&client, &store, hash, (named, &others), max_len, &transfers)
                    .await
            } else {
                // Adapters from several holders at once when they are large enough.
                let mut peers = named;
                peers.extend(others);
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

#[cfg(test)]
mod tests {
    use hivemind_protocol::{Announcement, ModelId, NodeKey, Signed};

    use super::*;

    fn node(n: u8) -> NodeId {
        NodeKey::from_bytes(&[n; 32]).node_id()
    }

    fn failed(hash: Hash, reason: FetchFailure) -> Option<Event> {
        Some(Event::FetchFailed { hash, reason })
    }

    /// Events compare by how they show (`Event` has no `PartialEq`).
    fn shown(ev: Option<Event>) -> String {
        format!("{ev:?}")
    }

    /// What `f` reports when a fetch ends with `ev`, shown.
    fn ends(f: &mut InFlight, ev: Option<Event>) -> String {
        shown(ev.and_then(|ev| f.finish(ev)))
    }

    fn start(ask: &[NodeId], first: bool) -> Option<Start> {
        let ask = ask.to_vec();
        Some(Start { ask, first })
    }

    /// An attempt naming a peer the running fetch does not ask starts a fetch that asks it at
    /// once (and only it); a failure is reported once every fetch of the hash has ended, as
    /// `Busy` if any left a named peer unasked. (Before, the attempt was dropped: node 2 was
    /// counted as asked and never was.)
    #[test]
    fn every_named_peer_is_asked_before_a_failure_is_reported() {
        let (h, mut f) = (Hash::of(b"blob"), InFlight::default());
        assert_eq!(
            f.start(h, &[node(1)], Fetch::Adapter),
            start(&[node(1)], true)
        );
        assert_eq!(
            f.start(h, &[node(1)], Fetch::Adapter),
            None,
            "nobody new to ask"
        );
        assert_eq!(
            f.start(h, &[node(1), node(2)], Fetch::Adapter),
            start(&[node(2)], false)
        );
        assert_eq!(
            f.start(h, &[node(3), node(2)], Fetch::Adapter),
            start(&[node(3)], false)
        );
        let none = shown(None);
        assert_eq!(ends(&mut f, failed(h, FetchFailure::Unavailable)), none);
        assert_eq!(ends(&mut f, failed(h, FetchFailure::Busy)), none);
        assert_eq!(
            ends(&mut f, failed(h, FetchFailure::Unavailable)),
            shown(failed(h, FetchFailure::Busy)),
            "a named peer was left unasked"
        );
        // Then a fetch of it starts afresh, with every peer named.
        assert_eq!(
            f.start(h, &[node(1), node(2)], Fetch::Adapter),
            start(&[node(1), node(2)], true)
        );
        assert_eq!(
            ends(&mut f, failed(h, FetchFailure::Unavailable)),
            shown(failed(h, FetchFailure::Unavailable))
        );
    }

    /// A success is reported at once, even when another fetch of the hash failed first for
    /// want of room here (before, that `Local` was reported at once and the success was then
    /// dropped: the machine took a stored adapter for failed); bytes that are no valid blob
    /// are reported at once, and then what the others come to is not, unless they succeed.
    #[test]
    fn a_success_is_reported_at_once_and_a_failure_waits_for_the_others() {
        let h = Hash::of(b"blob");
        let available = Some(Event::BlobAvailable { hash: h });
        let none = shown(None);
        let mut f = InFlight::default();
        f.start(h, &[node(1)], Fetch::Adapter);
        f.start(h, &[node(2)], Fetch::Adapter);
        assert_eq!(ends(&mut f, failed(h, FetchFailure::Local)), none);
        assert_eq!(ends(&mut f, available.clone()), shown(available.clone()));
        assert_eq!(
            f.start(h, &[node(1)], Fetch::Adapter),
            start(&[node(1)], true)
        );

        let mut f = InFlight::default();
        for n in 1..=3 {
            f.start(h, &[node(n)], Fetch::Adapter);
        }
        let invalid = failed(h, FetchFailure::Invalid);
        assert_eq!(ends(&mut f, invalid.clone()), shown(invalid));
        assert_eq!(ends(&mut f, failed(h, FetchFailure::Unavailable)), none);
        assert_eq!(ends(&mut f, available.clone()), shown(available));

        let mut f = InFlight::default();
        f.start(h, &[node(1)], Fetch::Adapter);
        let other = failed(Hash::of(b"other"), FetchFailure::Unavailable);
        assert_eq!(ends(&mut f, other.clone()), shown(other));
        assert_eq!(
            ends(&mut f, Some(Event::CloseNow)),
            shown(Some(Event::CloseNow))
        );
        assert_eq!(
            f.start(h, &[node(1)], Fetch::Adapter),
            None,
            "still running"
        );
    }

    /// Of the failures of fetches of one hash, the one reported blames least: `Local` (served
    /// and refused, or no room here), then `Busy`, then `Unavailable`.
    #[test]
    fn the_failure_reported_is_the_one_that_blames_least() {
        let h = Hash::of(b"blob");
        for (order, want) in [
            (
                [
                    FetchFailure::Unavailable,
                    FetchFailure::Local,
                    FetchFailure::Busy,
                ],
                FetchFailure::Local,
            ),
            (
                [
                    FetchFailure::Busy,
                    FetchFailure::Unavailable,
                    FetchFailure::Unavailable,
                ],
                FetchFailure::Busy,
            ),
        ] {
            let mut f = InFlight::default();
            for n in 1..=3 {
                f.start(h, &[node(n)], Fetch::Adapter);
            }
            let got: Vec<String> = order.iter().map(|r| ends(&mut f, failed(h, *r))).collect();
            assert_eq!(got[..2], [shown(None), shown(None)]);
            assert_eq!(got[2], shown(failed(h, want)));
        }
    }

    /// An outsider's announcement (`Local` for an announcement) is reported at once, as bytes
    /// that are no valid blob are: every holder has the same. (Waiting for the other fetches
    /// of it could take past the request's deadline, and its namers were then taken for
    /// silent although it was served.)
    #[test]
    fn an_outsiders_announcement_is_reported_at_once() {
        let h = Hash::of(b"envelope");
        let mut f = InFlight::default();
        f.start(h, &[node(1)], Fetch::Announcement);
        f.start(h, &[node(2)], Fetch::Announcement);
        let local = failed(h, FetchFailure::Local);
        assert_eq!(ends(&mut f, local.clone()), shown(local));
        assert_eq!(
            ends(&mut f, failed(h, FetchFailure::Unavailable)),
            shown(None)
        );
    }

    /// A fetched announcement ends its fetch, so the announcement can be fetched again
    /// (before, it stayed running for good, and a later fetch of it was dropped).
    #[test]
    fn a_fetched_announcement_can_be_fetched_again() {
        let k = NodeKey::from_bytes(&[7; 32]);
        let a = Announcement {
            model: ModelId(Hash::of(b"model")),
            round: 1,
            adapter: Hash::of(b"adapter"),
            byte_len: 100,
            samples: 10,
            contributor: k.node_id(),
            user_id: None,
            parent: None,
            time_ms: 0,
        };
        let signed = Signed::sign(a, &k).expect("sign");
        let mut f = InFlight::default();
        assert!(f
            .start(signed.id(), &[node(1)], Fetch::Announcement)
            .is_some());
        let got = f.finish(Event::Announcement(signed.clone()));
        assert!(matches!(got, Some(Event::Announcement(_))));
        assert_eq!(
            f.start(signed.id(), &[node(1)], Fetch::Announcement),
            start(&[node(1)], true)
        );
    }
}

//! The node's status.json, written from the driver's state.

use hivemind_protocol::Hash;

use super::Driver;
use crate::clock::now_ms;
use crate::data_dir::{OwnAdapter, PrivacyView, StatusFile, TransferView};
use crate::net::with_peer;

impl Driver {
    pub(super) async fn write_status(&self) {
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
                .map(|s| s.keys().map(Hash::to_hex).collect())
                .unwrap_or_default(),
            current_seen_ms: self
                .announced
                .get(&round)
                .map(|s| s.iter().map(|(h, ms)| (h.to_hex(), *ms)).collect())
                .unwrap_or_default(),
            current_closed_ms: self.closed.filter(|(r, _)| *r == round).map(|(_, ms)| ms),
            latest_round: self.rounds.last().cloned(),
            committed_ms: self.committed_ms.clone(),
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
            reachability: info.reachability.clone(),
            served: self
                .client
                .served()
                .into_iter()
                .map(|(h, n)| (h.to_hex(), n))
                .collect(),
            relays: info.relays.iter().map(|p| p.to_string()).collect(),
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

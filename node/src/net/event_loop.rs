//! The event loop: the one task that owns the [`Swarm`]. It answers [`Command`]s from
//! clients and turns swarm events into [`NetEvent`]s for the driver.

use super::*;

pub(super) struct EventLoop {
    pub(super) swarm: Swarm<Behaviour>,
    pub(super) commands: mpsc::Receiver<Command>,
    pub(super) events: mpsc::Sender<NetEvent>,
    pub(super) listen_addrs: BTreeSet<Multiaddr>,
    pub(super) penalties: BTreeMap<PeerId, u32>,
    pub(super) banned: Banned,
    pub(super) dialled: BTreeSet<PeerId>,
    pub(super) bootstrapped: bool,
    /// Open connections by peer.
    pub(super) links: BTreeMap<PeerId, BTreeMap<libp2p::swarm::ConnectionId, Link>>,
}

impl EventLoop {
    pub(super) async fn run(mut self, cancel: CancellationToken) {
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => break,
                },
                ev = self.swarm.select_next_some() => self.on_swarm_event(ev).await,
            }
        }
        tracing::debug!("network event loop stopped");
    }

    fn on_command(&mut self, cmd: Command) {
        let b = self.swarm.behaviour_mut();
        match cmd {
            Command::Publish { topic, data, reply } => {
                let r = b
                    .gossipsub
                    .publish(IdentTopic::new(topic.clone()), data)
                    .map(|_| ())
                    .map_err(|source| NetError::Publish { topic, source });
                let _ = reply.send(r);
            }
            Command::Validate {
                id,
                source,
                acceptance,
            } => {
                b.gossipsub
                    .report_message_validation_result(&id, &source, acceptance);
            }
            Command::Penalise { peer, reason } => {
                let n = self.penalties.entry(peer).or_insert(0);
                *n += 1;
                tracing::warn!(%peer, %reason, penalties = *n, "penalising peer");
                b.gossipsub
                    .set_application_score(&peer, PENALTY_SCORE * f64::from(*n));
                b.gossipsub.blacklist_peer(&peer);
                self.banned.insert(peer);
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            Command::Info { reply } => {
                let connected: Vec<PeerId> = {
                    let mut v: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
                    v.sort();
                    v
                };
                let g = &self.swarm.behaviour().gossipsub;
                let scores = connected
                    .iter()
                    .filter_map(|p| g.peer_score(p).map(|s| (*p, s)))
                    .collect();
                let _ = reply.send(NetInfo {
                    peer_id: Some(*self.swarm.local_peer_id()),
                    listen_addrs: self.listen_addrs.iter().cloned().collect(),
                    connected,
                    scores,
                    penalties: self.penalties.clone(),
                    links: self
                        .links
                        .iter()
                        .map(|(p, l)| (*p, l.values().cloned().collect()))
                        .collect(),
                });
            }
            Command::Dial { addr, reply } => {
                let r = self
                    .swarm
                    .dial(addr.clone())
                    .map_err(|source| NetError::Dial { addr, source });
                let _ = reply.send(r);
            }
        }
    }

    pub(super) async fn on_swarm_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                self.listen_addrs.insert(address);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.remove(&address);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                connection_id,
                ..
            } => {
                if self.banned.contains(&peer_id) {
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return;
                }
                let addr = endpoint.get_remote_address();
                self.links.entry(peer_id).or_default().insert(
                    connection_id,
                    Link {
                        addr: addr.to_string(),
                        outbound: endpoint.is_dialer(),
                        relayed: addr.iter().any(|p| matches!(p, Protocol::P2pCircuit)),
                    },
                );
                if endpoint.is_dialer() {
                    let addr = endpoint.get_remote_address().clone();
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                }
                if !self.bootstrapped {
                    self.bootstrapped = self.swarm.behaviour_mut().kad.bootstrap().is_ok();
                }
                let _ = self.events.try_send(NetEvent::PeerConnected(peer_id));
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                ..
            } => {
                if let Some(l) = self.links.get_mut(&peer_id) {
                    l.remove(&connection_id);
                    if l.is_empty() {
                        self.links.remove(&peer_id);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            })) => {
                let ev = NetEvent::Gossip {
                    topic: message.topic.into_string(),
                    id: message_id.clone(),
                    source: propagation_source,
                    data: message.data,
                };
                if self.events.try_send(ev).is_err() {
                    // The driver is overwhelmed: drop without propagating, no penalty.
                    self.swarm
                        .behaviour_mut()
                        .gossipsub
                        .report_message_validation_result(
                            &message_id,
                            &propagation_source,
                            MessageAcceptance::Ignore,
                        );
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                for addr in info.listen_addrs {
                    if is_dialable(&addr) {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::RoutingUpdated {
                peer, ..
            })) if !self.swarm.is_connected(&peer)
                && !self.banned.contains(&peer)
                && self.dialled.len() < MAX_DISCOVERED_DIALS
                && self.dialled.insert(peer) =>
            {
                let _ = self.swarm.dial(peer);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(list))) => {
                for (peer, addr) in list {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, addr.clone());
                    if !self.swarm.is_connected(&peer) {
                        let _ = self.swarm.dial(addr);
                    }
                }
            }
            _ => {}
        }
    }
}

fn is_dialable(addr: &Multiaddr) -> bool {
    !addr.iter().any(|p| {
        matches!(p, Protocol::Ip4(ip) if ip.is_unspecified())
            || matches!(p, Protocol::Ip6(ip) if ip.is_unspecified())
    })
}

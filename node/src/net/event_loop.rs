//! The event loop: the one task that owns the [`Swarm`]. It answers [`Command`]s from
//! clients and turns swarm events into [`NetEvent`]s for the driver.

use super::*;

pub(super) struct EventLoop {
    pub(super) swarm: Swarm<Behaviour>,
    pub(super) commands: mpsc::Receiver<Command>,
    pub(super) events: mpsc::Sender<NetEvent>,
    pub(super) listen_addrs: BTreeSet<Multiaddr>,
    pub(super) penalties: super::penalties::Penalties,
    pub(super) banned: Banned,
    /// Peers dialled from discovery, and when.
    pub(super) dialled: BTreeMap<PeerId, std::time::Instant>,
    pub(super) bootstrapped: bool,
    /// Open connections by peer.
    pub(super) links: BTreeMap<PeerId, BTreeMap<libp2p::swarm::ConnectionId, Link>>,
    /// Connected peers that offer to relay (circuit relay v2 HOP), with an address of theirs.
    pub(super) relays: BTreeMap<PeerId, Multiaddr>,
    /// Our listeners through relays, by listener (what `listen_on` returned: the relay's own
    /// reply cannot redirect this bookkeeping), and the relays that accepted (a reservation).
    pub(super) relay_listens:
        std::collections::HashMap<libp2p::core::transport::ListenerId, PeerId>,
    pub(super) reserved: BTreeSet<PeerId>,
    /// Relays whose listener closed (refused, dropped, gone): not asked again before the
    /// instant, and the pause the next failure gets.
    pub(super) relay_backoff: BTreeMap<PeerId, (std::time::Instant, Duration)>,
    /// Direct connections DCUtR reported before the swarm did.
    pub(super) upgrades: BTreeSet<libp2p::swarm::ConnectionId>,
}

/// How often the event loop looks again for relays to listen through, and (while this node
/// is unreachable) for peers that became reachable through relays.
const RELAY_TICK: Duration = Duration::from_secs(15);
/// The first pause before a relay whose listener closed is asked again; doubled per failure.
const RELAY_BACKOFF_FIRST: Duration = Duration::from_secs(15);
const RELAY_BACKOFF_MAX: Duration = Duration::from_secs(600);
/// How long a discovery dial holds its slot when it did not lead to a connection.
const DIAL_SLOT_HELD: Duration = Duration::from_secs(600);

impl EventLoop {
    pub(super) async fn run(mut self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(RELAY_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => break,
                },
                ev = self.swarm.select_next_some() => self.on_swarm_event(ev).await,
                _ = tick.tick() => self.on_tick(),
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
                let (n, forgotten) = self.penalties.penalise(peer, std::time::Instant::now());
                tracing::warn!(%peer, %reason, penalties = n, "penalising peer");
                b.gossipsub
                    .set_application_score(&peer, PENALTY_SCORE * f64::from(n));
                b.gossipsub.blacklist_peer(&peer);
                self.banned.insert(peer);
                let _ = self.swarm.disconnect_peer_id(peer);
                if let Some(p) = forgotten {
                    self.unban(p);
                }
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
                    penalties: self.penalties.counts(),
                    links: self
                        .links
                        .iter()
                        .map(|(p, l)| (*p, l.values().cloned().collect()))
                        .collect(),
                    reachability: match self.swarm.behaviour().autonat.nat_status() {
                        autonat::NatStatus::Public(_) => "public",
                        autonat::NatStatus::Private => "private",
                        autonat::NatStatus::Unknown => "unknown",
                    }
                    .to_string(),
                    relays: self.reserved.iter().copied().collect(),
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
                let circuit = |a: &Multiaddr| a.iter().any(|p| matches!(p, Protocol::P2pCircuit));
                // An inbound relayed connection arrives on our `/p2p-circuit` listen address,
                // from `/p2p/<peer>`.
                let relayed = match &endpoint {
                    libp2p::core::ConnectedPoint::Dialer { address, .. } => circuit(address),
                    libp2p::core::ConnectedPoint::Listener {
                        local_addr,
                        send_back_addr,
                    } => circuit(local_addr) || circuit(send_back_addr),
                };
                let upgraded = self.upgrades.remove(&connection_id);
                // Peers arriving through relays share one TCP connection of the relay's: however
                // many ids a relay brings, they get MAX_RELAYED_INBOUND slots, not all of ours.
                let relayed_in = relayed && !endpoint.is_dialer();
                if relayed_in
                    && self
                        .links
                        .values()
                        .flat_map(|l| l.values())
                        .filter(|l| l.relayed && !l.outbound)
                        .count()
                        >= MAX_RELAYED_INBOUND
                {
                    tracing::debug!(peer = %peer_id, "too many relayed inbound connections; closing");
                    let _ = self.swarm.close_connection(connection_id);
                    return;
                }
                self.links.entry(peer_id).or_default().insert(
                    connection_id,
                    Link {
                        addr: addr.to_string(),
                        outbound: endpoint.is_dialer(),
                        relayed,
                        upgraded,
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
                        // A relay we are no longer connected to is no candidate.
                        self.relays.remove(&peer_id);
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
                let relays = info.protocols.contains(&relay::HOP_PROTOCOL_NAME);
                // A peer's loopback addresses lead to that peer only from its own host (the
                // tests): from anywhere else they lead back to ourselves, and a dial that meets
                // the wrong peer there fails as a whole, the useful addresses with it.
                let same_host = self
                    .links
                    .get(&peer_id)
                    .is_some_and(|l| l.values().any(|l| is_loopback_str(&l.addr)));
                for addr in info.listen_addrs {
                    if !is_dialable(&addr) || (is_loopback(&addr) && !same_host) {
                        continue;
                    }
                    let circuit = addr.iter().any(|p| matches!(p, Protocol::P2pCircuit));
                    if relays && !circuit && !self.relays.contains_key(&peer_id) {
                        self.relays.insert(peer_id, addr.clone());
                    }
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                }
                self.listen_via_relays();
            }
            SwarmEvent::Behaviour(BehaviourEvent::Autonat(autonat::Event::StatusChanged {
                old,
                new,
            })) => {
                tracing::info!(?old, ?new, "reachability");
                self.listen_via_relays();
            }
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(
                relay::client::Event::ReservationReqAccepted { relay_peer_id, .. },
            )) if self.reserved.insert(relay_peer_id) => {
                tracing::info!(relay = %relay_peer_id, "listening through a relay");
                // Look for peers again: those behind NATs are reachable now, through relays,
                // where a first lookup found only their private addresses.
                let _ = self.swarm.behaviour_mut().kad.bootstrap();
            }
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            })) => match result {
                Ok(direct) => {
                    tracing::info!(peer = %remote_peer_id, "relayed connection upgraded to a direct one");
                    let links = self.links.entry(remote_peer_id).or_default();
                    match links.get_mut(&direct) {
                        Some(l) => l.upgraded = true,
                        None => {
                            self.upgrades.insert(direct);
                        }
                    }
                    // Traffic takes the direct path from now on: the relayed connections go,
                    // and the relay carries nothing more between us.
                    let relayed: Vec<_> = links
                        .iter()
                        .filter(|(_, l)| l.relayed)
                        .map(|(id, _)| *id)
                        .collect();
                    for id in relayed {
                        self.swarm.close_connection(id);
                    }
                }
                Err(e) => {
                    tracing::info!(peer = %remote_peer_id, error = %e, "hole punching failed; staying relayed")
                }
            },
            SwarmEvent::ListenerClosed {
                listener_id,
                addresses,
                ..
            } => {
                for a in addresses {
                    self.listen_addrs.remove(&a);
                }
                // A relay that refused, dropped or lost our reservation: asked again after a
                // growing pause, another one (if any) in the meantime.
                if let Some(relay) = self.relay_listens.remove(&listener_id) {
                    self.reserved.remove(&relay);
                    let pause = self
                        .relay_backoff
                        .get(&relay)
                        .map_or(RELAY_BACKOFF_FIRST, |(_, p)| {
                            (*p * 2).min(RELAY_BACKOFF_MAX)
                        });
                    tracing::info!(%relay, ?pause, "no longer listening through relay");
                    self.relay_backoff
                        .insert(relay, (std::time::Instant::now() + pause, pause));
                    self.listen_via_relays();
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::RoutingUpdated {
                peer, ..
            })) if !self.swarm.is_connected(&peer)
                && !self.banned.contains(&peer)
                && self.dialled.len() < MAX_DISCOVERED_DIALS
                && !self.dialled.contains_key(&peer) =>
            {
                self.dialled.insert(peer, std::time::Instant::now());
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

impl EventLoop {
    /// Once AutoNAT says this node cannot be reached, listens through relays it knows (at most
    /// [`MAX_RELAYS`]: a peer that offers to relay and then drops the traffic costs one of
    /// them, not every path to us): peers then reach it at `<relay>/p2p-circuit/p2p/<us>`, and
    /// DCUtR tries to turn such connections into direct ones.
    fn listen_via_relays(&mut self) {
        if self.swarm.behaviour().autonat.nat_status() != autonat::NatStatus::Private {
            return;
        }
        let now = std::time::Instant::now();
        let mut candidates: Vec<(PeerId, Multiaddr)> = self
            .relays
            .iter()
            .filter(|(p, _)| {
                !self.relay_listens.values().any(|r| r == *p)
                    && !self.banned.contains(p)
                    && self.relay_backoff.get(p).is_none_or(|(at, _)| *at <= now)
            })
            .map(|(p, a)| (*p, a.clone()))
            .collect();
        // In random order: peers that grind low ids cannot count on being picked first.
        rand::seq::SliceRandom::shuffle(&mut candidates[..], &mut rand::thread_rng());
        let room = MAX_RELAYS.saturating_sub(self.relay_listens.len());
        for (relay, addr) in candidates.into_iter().take(room) {
            let circuit = with_peer(&addr, relay).with(Protocol::P2pCircuit);
            match self.swarm.listen_on(circuit.clone()) {
                Ok(id) => {
                    self.relay_listens.insert(id, relay);
                }
                Err(e) => tracing::warn!(%circuit, error = %e, "cannot listen through relay"),
            }
        }
    }

    /// Every [`RELAY_TICK`]: relays whose pause ended are tried again, and a node that cannot be
    /// reached looks again for peers that became reachable through relays (Kademlia's own
    /// lookup runs every five minutes).
    fn on_tick(&mut self) {
        for p in self.penalties.expire(std::time::Instant::now()) {
            self.unban(p);
        }
        // Discovered peers we dialled a while ago and are not connected to (the dial failed,
        // or they left) free their slot: discovery may bring them, or others, again. Not
        // sooner, so a routing table fed junk costs at most MAX_DISCOVERED_DIALS dials per
        // DIAL_SLOT_HELD.
        let (swarm, now) = (&self.swarm, std::time::Instant::now());
        self.dialled
            .retain(|p, at| swarm.is_connected(p) || now.duration_since(*at) < DIAL_SLOT_HELD);
        self.listen_via_relays();
        if self.swarm.behaviour().autonat.nat_status() == autonat::NatStatus::Private {
            let _ = self.swarm.behaviour_mut().kad.bootstrap();
        }
    }
}

impl EventLoop {
    /// Lets `peer` in again: its ban ended, or its record was dropped to bound memory.
    fn unban(&mut self, peer: PeerId) {
        tracing::debug!(%peer, "ban ended");
        self.banned.remove(&peer);
        let g = &mut self.swarm.behaviour_mut().gossipsub;
        g.remove_blacklisted_peer(&peer);
        // Else its score (kept an hour after it leaves) would keep it graylisted.
        g.set_application_score(&peer, 0.0);
    }
}

pub(super) fn is_loopback(addr: &Multiaddr) -> bool {
    addr.iter().next().is_some_and(|p| {
        matches!(p, Protocol::Ip4(ip) if ip.is_loopback())
            || matches!(p, Protocol::Ip6(ip) if ip.is_loopback())
    })
}

fn is_loopback_str(addr: &str) -> bool {
    addr.parse::<Multiaddr>().is_ok_and(|a| is_loopback(&a))
}

pub(super) fn is_dialable(addr: &Multiaddr) -> bool {
    !addr.iter().any(|p| {
        matches!(p, Protocol::Ip4(ip) if ip.is_unspecified())
            || matches!(p, Protocol::Ip6(ip) if ip.is_unspecified())
    })
}

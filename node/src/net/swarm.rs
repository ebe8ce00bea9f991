//! The libp2p behaviour of a node and how its swarm is built: transports, noise, yamux,
//! identify, ping, Kademlia, gossipsub (scoring, strict signing, manual validation), the
//! blob stream protocol, mDNS, and the NAT traversal of issue 16: AutoNAT (reachability), circuit
//! relay v2 (client always, server with `--relay`) and DCUtR (hole punching).

use super::*;
use libp2p::{allow_block_list, connection_limits};

/// Most connections kept with one peer (a TCP and a QUIC one, and one being replaced).
pub(super) const MAX_PER_PEER: u32 = 3;

#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    /// Caps on connections (issue 13: there were none): pending and established incoming
    /// connections ([`NetConfig::max_incoming`], pending a quarter of it) and connections per
    /// peer ([`MAX_PER_PEER`]).
    pub(super) limits: connection_limits::Behaviour,
    /// A closed network's allow-list ([`NetConfig::allow`]): no connection with anyone else.
    pub(super) allow: Toggle<allow_block_list::Behaviour<allow_block_list::AllowedPeers>>,
    pub(super) gossipsub: gossipsub::Behaviour,
    pub(super) kad: kad::Behaviour<MemoryStore>,
    pub(super) identify: identify::Behaviour,
    pub(super) ping: ping::Behaviour,
    pub(super) blob: libp2p_stream::Behaviour,
    pub(super) mdns: Toggle<mdns::tokio::Behaviour>,
    /// Listening and dialling through relays.
    pub(super) relay_client: relay::client::Behaviour,
    /// Relaying for others ([`NetConfig::relay`]).
    pub(super) relay: Toggle<relay::Behaviour>,
    /// Upgrading relayed connections to direct ones.
    pub(super) dcutr: dcutr::Behaviour,
    /// Whether this node is reachable from outside (and answering others' probes).
    pub(super) autonat: autonat::Behaviour,
}

/// AutoNAT's settings: first probe soon after start, retries every 30 s until it knows. Private
/// addresses count (`only_global_ips: false`): home networks, containers and test namespaces
/// use them.
fn autonat_config() -> autonat::Config {
    autonat::Config {
        boot_delay: Duration::from_secs(2),
        retry_interval: Duration::from_secs(30),
        refresh_interval: Duration::from_secs(5 * 60),
        throttle_server_period: Duration::from_secs(30),
        only_global_ips: false,
        ..Default::default()
    }
}

fn relay_config() -> relay::Config {
    let l = RELAY_LIMITS;
    relay::Config {
        max_reservations: l.reservations,
        max_reservations_per_peer: l.reservations_per_peer,
        max_circuits: l.circuits,
        max_circuits_per_peer: l.circuits_per_peer,
        max_circuit_bytes: l.circuit_bytes,
        max_circuit_duration: l.circuit_duration,
        ..Default::default()
    }
}

fn score_params(topics: &[String]) -> gossipsub::PeerScoreParams {
    let mut p = gossipsub::PeerScoreParams {
        // Tests and local demos put every node on 127.0.0.1.
        ip_colocation_factor_weight: 0.0,
        ..Default::default()
    };
    for t in topics {
        let tp = gossipsub::TopicScoreParams {
            topic_weight: 1.0,
            // Rounds are sparse: neither mesh time nor delivery rates say much about a peer.
            time_in_mesh_weight: 0.0,
            first_message_deliveries_weight: 0.1,
            mesh_message_deliveries_weight: 0.0,
            mesh_failure_penalty_weight: 0.0,
            invalid_message_deliveries_weight: -10.0,
            invalid_message_deliveries_decay: 0.9,
            ..Default::default()
        };
        p.topics.insert(IdentTopic::new(t.clone()).hash(), tp);
    }
    p
}

pub(super) fn build_swarm(key: Keypair, cfg: &NetConfig) -> Result<Swarm<Behaviour>, NetError> {
    let err = |e: &dyn std::fmt::Display| NetError::Build {
        detail: e.to_string(),
    };
    let gcfg = gossipsub::ConfigBuilder::default()
        .validation_mode(gossipsub::ValidationMode::Strict)
        .message_id_fn(|m: &gossipsub::Message| {
            MessageId::from(blake3::hash(&m.data).as_bytes().to_vec())
        })
        .max_transmit_size(MAX_TRANSMIT_BYTES)
        .validate_messages()
        .heartbeat_interval(cfg.heartbeat)
        .build()
        .map_err(|e| err(&e))?;
    let mdns_on = cfg.mdns;
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established_incoming(Some(cfg.max_incoming))
        .with_max_pending_incoming(Some((cfg.max_incoming / 4).max(1)))
        .with_max_established_per_peer(Some(MAX_PER_PEER));
    let topics = cfg.topics.clone();
    let relay_on = cfg.relay;
    let allow = cfg.allow.as_ref().map(|peers| {
        let mut b = allow_block_list::Behaviour::<allow_block_list::AllowedPeers>::default();
        for p in peers {
            b.allow_peer(*p);
        }
        b
    });
    let swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| err(&e))?
        .with_quic()
        .with_dns()
        .map_err(|e| err(&e))?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| err(&e))?
        .with_behaviour(|key, relay_client| {
            let peer = key.public().to_peer_id();
            let mut gossipsub =
                gossipsub::Behaviour::new(MessageAuthenticity::Signed(key.clone()), gcfg)?;
            gossipsub.with_peer_score(
                score_params(&topics),
                gossipsub::PeerScoreThresholds::default(),
            )?;
            let mut kcfg = kad::Config::new(KAD_PROTOCOL);
            kcfg.set_query_timeout(Duration::from_secs(30));
            // Kademlia serves peer routing only: records others PUT are never stored (they
            // come back as events, which the event loop drops).
            kcfg.set_record_filtering(kad::StoreInserts::FilterBoth);
            let kad = kad::Behaviour::with_config(peer, MemoryStore::new(peer), kcfg);
            // Listen addresses gained later (a relay reservation) reach connected peers at once.
            let identify = identify::Behaviour::new(
                identify::Config::new(IDENTIFY_PROTOCOL.to_string(), key.public())
                    .with_push_listen_addr_updates(true),
            );
            let ping = ping::Behaviour::new(ping::Config::new());
            let blob = libp2p_stream::Behaviour::new();
            let mdns = if mdns_on {
                Some(mdns::tokio::Behaviour::new(mdns::Config::default(), peer)?)
            } else {
                None
            };
            Ok(Behaviour {
                limits: connection_limits::Behaviour::new(limits),
                allow: Toggle::from(allow),
                gossipsub,
                kad,
                identify,
                ping,
                blob,
                mdns: Toggle::from(mdns),
                relay_client,
                relay: Toggle::from(relay_on.then(|| relay::Behaviour::new(peer, relay_config()))),
                dcutr: dcutr::Behaviour::new(peer),
                autonat: autonat::Behaviour::new(peer, autonat_config()),
            })
        })
        .map_err(|e| err(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build();
    Ok(swarm)
}

//! Wire types and round logic of HiveMind: what nodes say to each other, and how they
//! agree on one round adapter per round without a server. No I/O, no async, no clock,
//! no RNG: time and randomness come in as arguments.
//!
//! | module | owns |
//! |---|---|
//! | [`Hash`](struct@Hash) | blake3 content addresses of every blob, adapter and round |
//! | [`NodeKey`], [`NodeId`] | ed25519 identity; secret keys never print |
//! | [`ModelId`], [`announce_topic`], [`digest_topic`] | the network partition: base model identity plus LoRA shape |
//! | [`Signed`], [`Announcement`], [`RoundDigest`], [`RoundRecord`] | versioned signed envelopes (postcard, domain-separated ed25519, `verify_strict`, 64 KiB cap checked first) |
//! | [`round`] | the sans-I/O [`RoundMachine`]: events and time in, actions out (`round/`: one file per concern: config, events, actions, announcements, digests, fetch, current, fork_choice, heartbeat) |
//! | [`sim`] | a deterministic simulator running hundreds of machines (`sim/`: event loop, config, report, driver, byzantine, checks) |
//!
//! ```text
//!  libp2p gossip ──bytes──▶ Signed::decode ──▶ Event ──▶ RoundMachine ──▶ Action ──▶ driver
//!  (node crate)             (caps, version,             (handle/tick)            (fetch, aggregate,
//!                            domain, signature)                                    publish, commit)
//! ```
//!
//! A round in one paragraph: nodes announce adapters for round `n`
//! ([`Announcement`]), fetch each other's adapters by hash, close the round after a
//! window, aggregate the canonical input set deterministically, publish what they got
//! ([`RoundDigest`]), fetch whatever others' digests name that they lack, recompute over
//! the union, and commit after a quiet grace period. Forks (a partition, a crash, a
//! lagging node) resolve towards the heaviest verified chain. `PROTOCOL.md` next to
//! this crate's manifest describes the design in full.
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod error;
mod hash;
mod identity;
mod message;
mod model_id;
pub mod round;
pub mod sim;

pub use error::Error;
pub use hash::{Hash, ParseHashError};
pub use identity::{NodeId, NodeKey, MAX_KEY_WORK};
pub use message::{
    Announcement, MessageKind, Payload, RoundDigest, RoundInput, RoundRecord, RuleId, Signed,
    SignedAnnouncement, SignedDigest, ANNOUNCEMENT_DOMAIN, HEADER_BYTES, MAX_MESSAGE_BYTES,
    MAX_ROUND, MAX_ROUND_INPUTS, MAX_USER_ID_BYTES, ROUND_DIGEST_DOMAIN, WIRE_VERSION,
};
pub use model_id::{announce_topic, digest_topic, BaseModel, LoraShape, ModelId};
pub use round::{
    Action, AggregateInput, AggregationJob, Event, FetchFailure, Ignored, Misbehaviour, Phase,
    RoundConfig, RoundMachine, Verdict, CHAIN_MEMORY,
};

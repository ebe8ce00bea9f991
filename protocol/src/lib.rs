//! Wire types and round logic of HiveMind. No I/O, no async, no clock.
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod error;
mod hash;
mod identity;
mod message;
mod model_id;

pub use error::Error;
pub use hash::{Hash, ParseHashError};
pub use identity::{NodeId, NodeKey};
pub use message::{
    Announcement, MessageKind, Payload, RoundDigest, RoundInput, RoundRecord, RuleId, Signed,
    SignedAnnouncement, SignedDigest, ANNOUNCEMENT_DOMAIN, HEADER_BYTES, MAX_MESSAGE_BYTES,
    MAX_ROUND_INPUTS, MAX_USER_ID_BYTES, ROUND_DIGEST_DOMAIN, WIRE_VERSION,
};
pub use model_id::{announce_topic, digest_topic, BaseModel, LoraShape, ModelId};
pub mod round;
pub use round::{
    Action, AggregateInput, AggregationJob, Event, FetchFailure, Ignored, Misbehaviour, Phase,
    RoundConfig, RoundMachine, Verdict,
};
pub mod sim;

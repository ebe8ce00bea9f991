//! The crate's one error type.

use crate::{MessageKind, ModelId, NodeId};

/// Everything that can go wrong decoding, checking or signing protocol messages.
///
/// Decoding untrusted bytes only ever returns one of these; it never panics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The input is longer than the cap; rejected before any decoding or allocation.
    #[error("{len} bytes is more than the {max}-byte message cap")]
    TooLarge {
        /// Input length.
        len: usize,
        /// The cap, [`crate::MAX_MESSAGE_BYTES`].
        max: usize,
    },
    /// The input is shorter than the fixed envelope header.
    #[error("{len} bytes is shorter than the {min}-byte envelope header")]
    Truncated {
        /// Input length.
        len: usize,
        /// Header length.
        min: usize,
    },
    /// The envelope's version byte is not one this build speaks.
    #[error("unknown wire version {got} (this build speaks {supported})")]
    UnknownVersion {
        /// The version byte found.
        got: u8,
        /// The version this build speaks, [`crate::WIRE_VERSION`].
        supported: u8,
    },
    /// The envelope's kind byte names another domain than the one expected (for
    /// example a digest handed to the announcement decoder).
    #[error("message kind tag {got} where a {expected:?} was expected (wrong domain)")]
    WrongDomain {
        /// The kind the caller decodes.
        expected: MessageKind,
        /// The kind tag found.
        got: u8,
    },
    /// The payload does not decode (postcard error, trailing bytes, invalid UTF-8 ...).
    #[error("malformed {kind:?} payload: {reason}")]
    Malformed {
        /// Payload kind.
        kind: MessageKind,
        /// What the decoder said.
        reason: String,
    },
    /// The payload decodes but is not byte-identical to its canonical re-encoding.
    #[error("{kind:?} payload is not canonically encoded")]
    NonCanonical {
        /// Payload kind.
        kind: MessageKind,
    },
    /// The signer bytes are not a valid ed25519 public key.
    #[error("signer {signer} is not a valid ed25519 public key")]
    BadKey {
        /// The claimed signer.
        signer: NodeId,
    },
    /// `verify_strict` rejected the signature.
    #[error("bad {kind:?} signature for signer {signer}")]
    BadSignature {
        /// Payload kind.
        kind: MessageKind,
        /// The claimed signer.
        signer: NodeId,
    },
    /// Signing a payload whose signer field is not the signing key's node id.
    #[error("payload names signer {signer} but the signing key is {key}")]
    SignerMismatch {
        /// The signing key's node id.
        key: NodeId,
        /// The signer the payload names.
        signer: NodeId,
    },
    /// An announcement's `user_id` is longer than [`crate::MAX_USER_ID_BYTES`].
    #[error("user id is {len} bytes, more than {max}")]
    UserIdTooLong {
        /// Its length in bytes.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// A round record lists more than [`crate::MAX_ROUND_INPUTS`] inputs.
    #[error("round record has {count} inputs, more than {max}")]
    TooManyInputs {
        /// Inputs listed.
        count: usize,
        /// The cap.
        max: usize,
    },
    /// A round record's inputs are not strictly ascending by adapter hash.
    #[error("round record inputs are not strictly ascending by adapter hash at index {index}")]
    UnsortedInputs {
        /// First offending index.
        index: usize,
    },
    /// A round record with no inputs.
    #[error("round record has no inputs")]
    EmptyRound,
    /// A round record whose chain weight is 0 (every round has at least one contributing node).
    #[error("round record weight {weight} is below 1 (it has {contributors} inputs)")]
    WeightTooLow {
        /// The claimed weight.
        weight: u64,
        /// Its inputs.
        contributors: usize,
    },
    /// A round record whose chain weight is more than its rounds can hold: a weight no honest
    /// chain could beat.
    #[error("round record weight {weight} is above the {max} that {round} rounds can reach")]
    WeightTooHigh {
        /// The claimed weight.
        weight: u64,
        /// The record's round.
        round: u64,
        /// `round * MAX_ROUND_INPUTS`.
        max: u64,
    },
    /// A round number so high that the next round's number could overflow.
    #[error("round {round} is above the highest round {max}")]
    RoundTooHigh {
        /// The round named.
        round: u64,
        /// [`crate::message::MAX_ROUND`].
        max: u64,
    },
    /// Round 0 is the base model; no message may name it.
    #[error("round 0 is the base model and carries no messages")]
    RoundZero,
    /// A message or record for another network.
    #[error("message for model {got}, this network is {expected}")]
    WrongModel {
        /// This network's model id.
        expected: ModelId,
        /// The model id found.
        got: ModelId,
    },
    /// A string that is not 64 hex characters where an id was expected.
    #[error("not a {what} (64 hex characters): {input:?}")]
    ParseId {
        /// What was being parsed.
        what: &'static str,
        /// The input (first 80 characters).
        input: String,
    },
    /// Encoding a value failed (cannot happen for this crate's types; kept so encoding
    /// never panics).
    #[error("encoding failed: {reason}")]
    Encode {
        /// What the encoder said.
        reason: String,
    },
}

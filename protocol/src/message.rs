//! Wire messages: [`Announcement`]s and [`RoundDigest`]s inside signed, versioned
//! envelopes ([`Signed`]).
//!
//! Envelope layout (version 1), fixed so it needs no parsing before the checks:
//!
//! ```text
//! byte 0       version      = WIRE_VERSION (1)
//! byte 1       kind         = 1 announcement, 2 round digest
//! bytes 2..66  signature    ed25519 over DOMAIN(kind) || payload
//! bytes 66..   payload      postcard encoding of the Announcement / RoundDigest
//! ```
//!
//! Decoding checks, in this order: length cap ([`MAX_MESSAGE_BYTES`], before anything is
//! read or allocated), header length, version, kind (the domain), payload decode with no
//! trailing bytes, canonical re-encoding (so one signed content has exactly one byte
//! string and one id), field caps, signer key validity, then `verify_strict` over the
//! domain prefix plus the exact payload bytes. A message's id is the blake3
//! [`Hash`](struct@Hash) of its whole envelope; the `store` crate keeps announcements as
//! these bytes under that id.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use ed25519_dalek::Signature;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{Error, Hash, ModelId, NodeId, NodeKey};

/// The envelope version this build writes and reads.
pub const WIRE_VERSION: u8 = 1;
/// Cap on one encoded envelope; longer input is rejected before decoding.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Cap on an announcement's `user_id`, in bytes.
pub const MAX_USER_ID_BYTES: usize = 128;
/// Cap on the inputs of one round (512 x 64 bytes keeps a digest near 32 KiB).
pub const MAX_ROUND_INPUTS: usize = 512;
/// The highest round number a message may name: 2^48 (a round a second for 8.9 million
/// years), so `round + 1` and `round * MAX_ROUND_INPUTS` never overflow.
pub const MAX_ROUND: u64 = 1 << 48;
/// Envelope header: version, kind, signature.
pub const HEADER_BYTES: usize = 2 + 64;

/// Domain-separation prefix signed before announcement payloads.
pub const ANNOUNCEMENT_DOMAIN: &[u8] = b"hivemind/announcement/v1\0";
/// Domain-separation prefix signed before round-digest payloads.
pub const ROUND_DIGEST_DOMAIN: &[u8] = b"hivemind/round-digest/v1\0";

/// The kinds of signed message; each has its own domain prefix and envelope tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum MessageKind {
    /// An [`Announcement`] (tag 1).
    Announcement,
    /// A [`RoundDigest`] (tag 2).
    RoundDigest,
}

impl MessageKind {
    /// The envelope tag byte.
    pub fn tag(self) -> u8 {
        match self {
            MessageKind::Announcement => 1,
            MessageKind::RoundDigest => 2,
        }
    }

    /// The domain-separation prefix signed before the payload.
    pub fn domain(self) -> &'static [u8] {
        match self {
            MessageKind::Announcement => ANNOUNCEMENT_DOMAIN,
            MessageKind::RoundDigest => ROUND_DIGEST_DOMAIN,
        }
    }
}

/// "I trained adapter `adapter` for round `round` of network `model`".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    /// The network.
    pub model: ModelId,
    /// The round this adapter is a contribution to (1-based; 0 is the base model).
    pub round: u64,
    /// blake3 of the adapter bytes.
    pub adapter: Hash,
    /// Length of the adapter bytes.
    pub byte_len: u64,
    /// Number of training samples (the FedAvg weight).
    pub samples: u64,
    /// The signing node (for gateway uploads, the gateway).
    pub contributor: NodeId,
    /// For gateway uploads: the legacy user id (at most [`MAX_USER_ID_BYTES`]).
    pub user_id: Option<String>,
    /// The round adapter this one was trained from (`None`: the base model). Advisory:
    /// inputs of a round are not filtered by parent (see [`crate::round`]).
    pub parent: Option<Hash>,
    /// Creation time, unix milliseconds.
    pub time_ms: u64,
}

impl Announcement {
    /// Who contributes: one adapter per (node, user id) per round is aggregated.
    pub fn contributor_key(&self) -> (NodeId, Option<&str>) {
        (self.contributor, self.user_id.as_deref())
    }
}

/// The id of a deterministic aggregation rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RuleId(pub u16);

impl RuleId {
    /// FedAvg weighted by sample count, canonical order and serialisation.
    pub const FEDAVG: RuleId = RuleId(1);
    /// The exact weighted mean of the users' updates, added to the parent round adapter.
    pub const EXACT_MEAN: RuleId = RuleId(2);
    /// Iso-C style merge of the users' updates (flattened spectrum), added to the parent.
    pub const ISO: RuleId = RuleId(3);
    /// TSV-Merge style merge of the users' updates (decorrelated), added to the parent.
    pub const TSV: RuleId = RuleId(4);
    /// Geometric median of the users' updates (RFA), added to the parent.
    pub const GEOMEDIAN: RuleId = RuleId(5);

    /// Whether a round's result is its parent's result plus the merge of the round's inputs
    /// (the inputs are updates trained on top of the parent): computing or verifying it
    /// needs the parent round adapter's bytes, not only the inputs'.
    pub fn builds_on_parent(self) -> bool {
        matches!(
            self,
            RuleId::EXACT_MEAN | RuleId::ISO | RuleId::TSV | RuleId::GEOMEDIAN
        )
    }
}

/// One input of a round: an adapter and the announcement that vouches for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RoundInput {
    /// blake3 of the adapter bytes.
    pub adapter: Hash,
    /// Id (blake3 of the signed envelope) of its announcement.
    pub announcement: Hash,
}

/// The outcome of a round: what was aggregated, from what, into what.
///
/// Committed records form a chain through `parent`. The store keeps them as
/// [`RoundRecord::encode`] bytes under [`RoundRecord::id`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundRecord {
    /// The network.
    pub model: ModelId,
    /// Round number (1-based).
    pub round: u64,
    /// The previous round's result (`None` for a round trained from the base model).
    pub parent: Option<Hash>,
    /// Inputs, strictly ascending by adapter hash, at least one, at most
    /// [`MAX_ROUND_INPUTS`].
    pub inputs: Vec<RoundInput>,
    /// Chain weight: the parent's weight plus this round's distinct contributing nodes (a
    /// node's many user ids, e.g. a gateway's, count once), i.e. the contributing nodes of
    /// every round since genesis along this chain. Fork choice prefers heavier chains.
    pub weight: u64,
    /// The aggregation rule.
    pub rule: RuleId,
    /// blake3 of the aggregated round adapter: the "round hash".
    pub result: Hash,
}

impl RoundRecord {
    /// Number of contributors (inputs).
    pub fn contributors(&self) -> usize {
        self.inputs.len()
    }

    /// Fork choice: does `self` win over `other`? The heavier chain (most contributing nodes
    /// since the fork), then the lower result hash. For two records of one round with
    /// one parent this is "most contributing nodes, then lowest hash". Strict: distinct
    /// results never tie, and a record never beats itself.
    pub fn beats(&self, other: &RoundRecord) -> bool {
        (self.weight, std::cmp::Reverse(self.result))
            > (other.weight, std::cmp::Reverse(other.result))
    }

    /// Structural checks: round in 1..=[`MAX_ROUND`], 1 to [`MAX_ROUND_INPUTS`] inputs strictly
    /// ascending by adapter, weight at least 1 (one contributing node) and at most what
    /// `round` rounds of [`MAX_ROUND_INPUTS`] contributors can add up to.
    pub fn check(&self) -> Result<(), Error> {
        if self.round == 0 {
            return Err(Error::RoundZero);
        }
        check_round(self.round)?;
        // Each round adds at most MAX_ROUND_INPUTS contributors to the chain.
        let most = self.round * MAX_ROUND_INPUTS as u64;
        if self.weight > most {
            return Err(Error::WeightTooHigh {
                weight: self.weight,
                round: self.round,
                max: most,
            });
        }
        if self.inputs.is_empty() {
            return Err(Error::EmptyRound);
        }
        if self.weight == 0 {
            return Err(Error::WeightTooLow {
                weight: self.weight,
                contributors: self.inputs.len(),
            });
        }
        if self.inputs.len() > MAX_ROUND_INPUTS {
            return Err(Error::TooManyInputs {
                count: self.inputs.len(),
                max: MAX_ROUND_INPUTS,
            });
        }
        for (i, w) in self.inputs.windows(2).enumerate() {
            if w[0].adapter >= w[1].adapter {
                return Err(Error::UnsortedInputs { index: i + 1 });
            }
        }
        Ok(())
    }

    /// Canonical bytes (postcard).
    pub fn encode(&self) -> Result<Vec<u8>, Error> {
        encode_postcard(self)
    }

    /// Decodes and checks record bytes, capped at [`MAX_MESSAGE_BYTES`].
    pub fn decode(bytes: &[u8]) -> Result<RoundRecord, Error> {
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(Error::TooLarge {
                len: bytes.len(),
                max: MAX_MESSAGE_BYTES,
            });
        }
        let record: RoundRecord = decode_canonical(bytes, MessageKind::RoundDigest)?;
        record.check()?;
        Ok(record)
    }

    /// blake3 of the canonical bytes: the record's content address.
    pub fn id(&self) -> Hash {
        match self.encode() {
            Ok(bytes) => Hash::of(&bytes),
            // Unreachable for this type; keep ids total without panicking.
            Err(_) => Hash([0; 32]),
        }
    }
}

/// A node's signed statement "round `record.round` of my view is `record`".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundDigest {
    /// The round as the signer computed it.
    pub record: RoundRecord,
    /// The signing node.
    pub signer: NodeId,
    /// `true`: the signer committed this record (a heartbeat); `false`: its current,
    /// still open view of the round (reconciliation only). Only committed records are
    /// fork-choice or catch-up candidates.
    pub committed: bool,
    /// When it was published, unix milliseconds. Every (re)publication is a new
    /// message, so periodic heartbeats are not swallowed by gossip duplicate caches.
    pub time_ms: u64,
}

/// A payload that travels inside a [`Signed`] envelope: implemented by
/// [`Announcement`] and [`RoundDigest`].
pub trait Payload:
    Serialize + DeserializeOwned + Clone + fmt::Debug + Send + Sync + 'static
{
    /// Its kind (envelope tag and domain prefix).
    const KIND: MessageKind;
    /// The node whose key must have signed it.
    fn signer(&self) -> NodeId;
    /// The network it belongs to.
    fn model(&self) -> ModelId;
    /// The round it is about.
    fn round(&self) -> u64;
    /// Field caps and structure, checked on both sign and decode.
    fn check(&self) -> Result<(), Error>;
}

/// Refuses a round number above [`MAX_ROUND`].
fn check_round(round: u64) -> Result<(), Error> {
    if round > MAX_ROUND {
        return Err(Error::RoundTooHigh {
            round,
            max: MAX_ROUND,
        });
    }
    Ok(())
}

impl Payload for Announcement {
    const KIND: MessageKind = MessageKind::Announcement;
    fn signer(&self) -> NodeId {
        self.contributor
    }
    fn model(&self) -> ModelId {
        self.model
    }
    fn round(&self) -> u64 {
        self.round
    }
    fn check(&self) -> Result<(), Error> {
        if self.round == 0 {
            return Err(Error::RoundZero);
        }
        check_round(self.round)?;
        if let Some(u) = &self.user_id {
            if u.len() > MAX_USER_ID_BYTES {
                return Err(Error::UserIdTooLong {
                    len: u.len(),
                    max: MAX_USER_ID_BYTES,
                });
            }
        }
        Ok(())
    }
}

impl Payload for RoundDigest {
    const KIND: MessageKind = MessageKind::RoundDigest;
    fn signer(&self) -> NodeId {
        self.signer
    }
    fn model(&self) -> ModelId {
        self.record.model
    }
    fn round(&self) -> u64 {
        self.record.round
    }
    fn check(&self) -> Result<(), Error> {
        self.record.check()
    }
}

struct SignedInner<T> {
    payload: T,
    bytes: Vec<u8>,
    id: Hash,
}

/// A payload with a verified signature by its signer, plus the exact envelope bytes.
///
/// The only ways to get one are [`Signed::sign`] and [`Signed::decode`], so holding a
/// `Signed<T>` means the signature checked out. Cloning is cheap (shared).
pub struct Signed<T> {
    inner: Arc<SignedInner<T>>,
}

/// A signed [`Announcement`].
pub type SignedAnnouncement = Signed<Announcement>;
/// A signed [`RoundDigest`].
pub type SignedDigest = Signed<RoundDigest>;

impl<T> Clone for Signed<T> {
    fn clone(&self) -> Self {
        Signed {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<T: Payload> Signed<T> {
    /// Signs `payload` with `key`, which must be the payload's signer.
    pub fn sign(payload: T, key: &NodeKey) -> Result<Self, Error> {
        let me = key.node_id();
        if payload.signer() != me {
            return Err(Error::SignerMismatch {
                key: me,
                signer: payload.signer(),
            });
        }
        payload.check()?;
        let body = encode_postcard(&payload)?;
        let len = HEADER_BYTES + body.len();
        if len > MAX_MESSAGE_BYTES {
            return Err(Error::TooLarge {
                len,
                max: MAX_MESSAGE_BYTES,
            });
        }
        let signature = key.sign_raw(&signed_message(T::KIND, &body));
        let mut bytes = Vec::with_capacity(len);
        bytes.push(WIRE_VERSION);
        bytes.push(T::KIND.tag());
        bytes.extend_from_slice(&signature.to_bytes());
        bytes.extend_from_slice(&body);
        let id = Hash::of(&bytes);
        Ok(Signed {
            inner: Arc::new(SignedInner { payload, bytes, id }),
        })
    }

    /// Decodes and verifies envelope bytes from the network or disk. Never panics.
    pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(Error::TooLarge {
                len: bytes.len(),
                max: MAX_MESSAGE_BYTES,
            });
        }
        if bytes.len() < HEADER_BYTES {
            return Err(Error::Truncated {
                len: bytes.len(),
                min: HEADER_BYTES,
            });
        }
        if bytes[0] != WIRE_VERSION {
            return Err(Error::UnknownVersion {
                got: bytes[0],
                supported: WIRE_VERSION,
            });
        }
        if bytes[1] != T::KIND.tag() {
            return Err(Error::WrongDomain {
                expected: T::KIND,
                got: bytes[1],
            });
        }
        let mut sig = [0u8; 64];
        sig.copy_from_slice(&bytes[2..HEADER_BYTES]);
        let body = &bytes[HEADER_BYTES..];
        let payload: T = decode_canonical(body, T::KIND)?;
        payload.check()?;
        let signer = payload.signer();
        let key = signer.verifying_key()?;
        key.verify_strict(&signed_message(T::KIND, body), &Signature::from_bytes(&sig))
            .map_err(|_| Error::BadSignature {
                kind: T::KIND,
                signer,
            })?;
        Ok(Signed {
            inner: Arc::new(SignedInner {
                payload,
                bytes: bytes.to_vec(),
                id: Hash::of(bytes),
            }),
        })
    }

    /// [`Signed::decode`], then rejects a payload for another network with
    /// [`Error::WrongModel`].
    pub fn decode_for(bytes: &[u8], model: &ModelId) -> Result<Self, Error> {
        let msg = Self::decode(bytes)?;
        if msg.payload().model() != *model {
            return Err(Error::WrongModel {
                expected: *model,
                got: msg.payload().model(),
            });
        }
        Ok(msg)
    }

    /// The exact envelope bytes (what was signed and sent), as a new vector.
    pub fn encode(&self) -> Vec<u8> {
        self.inner.bytes.clone()
    }

    /// The exact envelope bytes, borrowed.
    pub fn as_bytes(&self) -> &[u8] {
        &self.inner.bytes
    }

    /// The message id: blake3 of the envelope bytes.
    pub fn id(&self) -> Hash {
        self.inner.id
    }

    /// The verified payload.
    pub fn payload(&self) -> &T {
        &self.inner.payload
    }

    /// The node that signed it.
    pub fn signer(&self) -> NodeId {
        self.inner.payload.signer()
    }
}

impl<T> Deref for Signed<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner.payload
    }
}

impl<T> PartialEq for Signed<T> {
    fn eq(&self, other: &Self) -> bool {
        self.inner.id == other.inner.id
    }
}

impl<T> Eq for Signed<T> {}

impl<T: fmt::Debug> fmt::Debug for Signed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signed")
            .field("id", &self.inner.id)
            .field("payload", &self.inner.payload)
            .finish()
    }
}

fn signed_message(kind: MessageKind, body: &[u8]) -> Vec<u8> {
    let domain = kind.domain();
    let mut m = Vec::with_capacity(domain.len() + body.len());
    m.extend_from_slice(domain);
    m.extend_from_slice(body);
    m
}

fn encode_postcard<T: Serialize>(value: &T) -> Result<Vec<u8>, Error> {
    postcard::to_stdvec(value).map_err(|e| Error::Encode {
        reason: e.to_string(),
    })
}

/// Decodes `body` entirely (no trailing bytes) and insists it is the canonical encoding.
fn decode_canonical<T: Serialize + DeserializeOwned>(
    body: &[u8],
    kind: MessageKind,
) -> Result<T, Error> {
    let (value, rest): (T, &[u8]) =
        postcard::take_from_bytes(body).map_err(|e| Error::Malformed {
            kind,
            reason: e.to_string(),
        })?;
    if !rest.is_empty() {
        return Err(Error::Malformed {
            kind,
            reason: format!("{} trailing bytes", rest.len()),
        });
    }
    if encode_postcard(&value)? != body {
        return Err(Error::NonCanonical { kind });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> NodeKey {
        NodeKey::from_bytes(&[n; 32])
    }

    fn ann(k: &NodeKey) -> Announcement {
        Announcement {
            model: ModelId(Hash::of(b"model")),
            round: 3,
            adapter: Hash::of(b"adapter"),
            byte_len: 1234,
            samples: 50,
            contributor: k.node_id(),
            user_id: Some("alice".into()),
            parent: Some(Hash::of(b"round 2")),
            time_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn sign_decode_round_trip_keeps_bytes_and_id() {
        let k = key(1);
        let s = Signed::sign(ann(&k), &k).expect("sign");
        let d = SignedAnnouncement::decode(s.as_bytes()).expect("decode");
        assert_eq!(d.payload(), s.payload());
        assert_eq!(d.id(), Hash::of(s.as_bytes()));
        assert_eq!(d.encode(), s.encode());
        assert_eq!(s.as_bytes()[0], WIRE_VERSION);
        assert_eq!(s.as_bytes()[1], 1);
    }

    #[test]
    fn signature_covers_domain_prefix_and_exact_payload() {
        // Independent check: verify the envelope by hand with ed25519-dalek.
        let k = key(2);
        let s = Signed::sign(ann(&k), &k).expect("sign");
        let bytes = s.as_bytes();
        let mut msg = ANNOUNCEMENT_DOMAIN.to_vec();
        msg.extend_from_slice(&bytes[HEADER_BYTES..]);
        let sig = Signature::from_bytes(bytes[2..66].try_into().expect("64"));
        let vk = k.node_id().verifying_key().expect("key");
        assert!(vk.verify_strict(&msg, &sig).is_ok());
        // The same signature does not verify under the digest domain.
        let mut other = ROUND_DIGEST_DOMAIN.to_vec();
        other.extend_from_slice(&bytes[HEADER_BYTES..]);
        assert!(vk.verify_strict(&other, &sig).is_err());
    }

    #[test]
    fn typed_errors_for_each_bad_envelope() {
        let k = key(3);
        let s = Signed::sign(ann(&k), &k).expect("sign");
        let good = s.encode();

        let mut v = good.clone();
        v[0] = 2;
        assert_eq!(
            SignedAnnouncement::decode(&v).err(),
            Some(Error::UnknownVersion {
                got: 2,
                supported: 1
            })
        );
        assert_eq!(
            SignedDigest::decode(&good).err(),
            Some(Error::WrongDomain {
                expected: MessageKind::RoundDigest,
                got: 1
            })
        );
        let mut v = good.clone();
        v[10] ^= 1;
        assert!(matches!(
            SignedAnnouncement::decode(&v),
            Err(Error::BadSignature { .. })
        ));
        let mut v = good.clone();
        let last = v.len() - 1;
        v[last] ^= 0x01; // time_ms varint changes: signature no longer matches
        assert!(SignedAnnouncement::decode(&v).is_err());
        let mut v = good.clone();
        v.push(0);
        assert!(matches!(
            SignedAnnouncement::decode(&v),
            Err(Error::Malformed { .. })
        ));
        assert!(matches!(
            SignedAnnouncement::decode(&good[..10]),
            Err(Error::Truncated { .. })
        ));
        let big = vec![1u8; MAX_MESSAGE_BYTES + 1];
        assert_eq!(
            SignedAnnouncement::decode(&big).err(),
            Some(Error::TooLarge {
                len: MAX_MESSAGE_BYTES + 1,
                max: MAX_MESSAGE_BYTES
            })
        );
        // Wrong model, with decode_for.
        let other = ModelId(Hash::of(b"other"));
        assert!(matches!(
            SignedAnnouncement::decode_for(&good, &other),
            Err(Error::WrongModel { .. })
        ));
    }

    #[test]
    fn signing_enforces_signer_and_caps() {
        let k = key(4);
        let mut a = ann(&k);
        assert!(matches!(
            Signed::sign(a.clone(), &key(5)),
            Err(Error::SignerMismatch { .. })
        ));
        a.user_id = Some("x".repeat(MAX_USER_ID_BYTES + 1));
        assert!(matches!(
            Signed::sign(a.clone(), &k),
            Err(Error::UserIdTooLong { .. })
        ));
        a.user_id = None;
        a.round = 0;
        assert_eq!(Signed::sign(a, &k).err(), Some(Error::RoundZero));
    }

    #[test]
    fn non_canonical_varint_is_rejected_even_when_signed() {
        // Build a payload with an overlong varint for `round` (3 as 0x83 0x00), sign
        // it properly, and check the decoder refuses it: one content, one byte string.
        let k = key(6);
        let a = ann(&k);
        let body = postcard::to_stdvec(&a).expect("enc");
        // model (32 bytes) then round varint at offset 32.
        assert_eq!(body[32], 3);
        let mut odd = body[..32].to_vec();
        odd.extend_from_slice(&[0x83, 0x00]);
        odd.extend_from_slice(&body[33..]);
        if let Ok((decoded, rest)) = postcard::take_from_bytes::<Announcement>(&odd) {
            // postcard accepts the overlong form; we must not.
            assert!(rest.is_empty());
            assert_eq!(decoded, a);
        }
        let sig = k.sign_raw(&signed_message(MessageKind::Announcement, &odd));
        let mut bytes = vec![WIRE_VERSION, 1];
        bytes.extend_from_slice(&sig.to_bytes());
        bytes.extend_from_slice(&odd);
        let err = SignedAnnouncement::decode(&bytes).err();
        assert!(
            matches!(
                err,
                Some(Error::NonCanonical { .. }) | Some(Error::Malformed { .. })
            ),
            "{err:?}"
        );
    }

    #[test]
    fn record_checks_and_fork_choice() {
        let m = ModelId(Hash::of(b"m"));
        let inp = |n: u8| RoundInput {
            adapter: Hash([n; 32]),
            announcement: Hash([n; 32]),
        };
        let r = RoundRecord {
            model: m,
            round: 2,
            parent: None,
            inputs: vec![inp(1), inp(2)],
            weight: 5,
            rule: RuleId::FEDAVG,
            result: Hash([9; 32]),
        };
        assert!(r.check().is_ok());
        let mut bad = r.clone();
        bad.inputs = vec![inp(2), inp(1)];
        assert_eq!(bad.check(), Err(Error::UnsortedInputs { index: 1 }));
        bad.inputs = vec![inp(1), inp(1)];
        assert_eq!(bad.check(), Err(Error::UnsortedInputs { index: 1 }));
        bad.inputs.clear();
        assert_eq!(bad.check(), Err(Error::EmptyRound));
        bad.inputs = vec![inp(1), inp(2), inp(3)];
        bad.weight = 0;
        assert!(matches!(bad.check(), Err(Error::WeightTooLow { .. })));
        // Three inputs of one node (a gateway's users) weigh 1.
        bad.weight = 1;
        assert!(bad.check().is_ok());
        // Same parent: more contributors (so more weight) wins over a lower hash.
        let mut more = r.clone();
        more.inputs.push(inp(3));
        more.weight = 6;
        more.result = Hash([255; 32]);
        assert!(more.beats(&r) && !r.beats(&more));
        // Equal weight: the lower result wins.
        let mut lower = r.clone();
        lower.result = Hash([1; 32]);
        assert!(lower.beats(&r) && !r.beats(&lower));
        // A later round of a lighter chain loses to a heavier earlier record.
        let mut later_light = r.clone();
        later_light.round = 3;
        later_light.inputs = vec![inp(7)];
        later_light.weight = 4;
        assert!(r.beats(&later_light));
        assert!(!r.beats(&r));
        let bytes = r.encode().expect("enc");
        assert_eq!(RoundRecord::decode(&bytes).ok(), Some(r.clone()));
        assert_eq!(r.id(), Hash::of(&bytes));
    }

    /// A record with round u64::MAX made `round + 1` overflow where a node adopted it (a
    /// panic in debug builds, a wrap to round 0 in release), and one with weight u64::MAX
    /// could never be beaten: both are refused on sign and on decode, and so are
    /// announcements for such rounds.
    #[test]
    fn rounds_and_weights_no_chain_can_reach_are_refused() {
        let k = key(7);
        let record = |round: u64, weight: u64| RoundRecord {
            model: ModelId(Hash::of(b"m")),
            round,
            parent: Some(Hash([3; 32])),
            inputs: vec![RoundInput {
                adapter: Hash([1; 32]),
                announcement: Hash([2; 32]),
            }],
            weight,
            rule: RuleId::FEDAVG,
            result: Hash([9; 32]),
        };
        let digest = |r: RoundRecord| RoundDigest {
            signer: k.node_id(),
            record: r,
            committed: true,
            time_ms: 1_700_000_000_000,
        };
        assert!(Signed::sign(digest(record(MAX_ROUND, MAX_ROUND * 512)), &k).is_ok());
        assert!(matches!(
            Signed::sign(digest(record(u64::MAX, u64::MAX)), &k),
            Err(Error::RoundTooHigh { .. })
        ));
        assert!(matches!(
            Signed::sign(digest(record(10, u64::MAX)), &k),
            Err(Error::WeightTooHigh {
                round: 10,
                max: 5120,
                ..
            })
        ));
        // The same records as bytes a peer could send: refused on decode too.
        for r in [record(u64::MAX, 1), record(10, 5121)] {
            let bytes = postcard::to_stdvec(&r).expect("encode");
            assert!(RoundRecord::decode(&bytes).is_err(), "{r:?}");
        }
        let mut a = ann(&k);
        a.round = MAX_ROUND + 1;
        assert!(matches!(
            Signed::sign(a, &k),
            Err(Error::RoundTooHigh { .. })
        ));
    }
}

//! What comes out of the machine: [`Action`]s, and the verdicts and misbehaviour they
//! carry.

use super::AggregationJob;
use crate::{Hash, ModelId, NodeId, RoundDigest, RoundRecord, RuleId, SignedAnnouncement};

/// What the driver must do.
///
/// The fetches (`FetchBlob`, `FetchRoundAdapter`, `FetchAnnouncement`) are retried by the
/// machine, which counts every peer an attempt names as asked when it makes the attempt (an
/// announcement's namers asked that did not serve it by the last attempt's deadline are
/// taken for silent). So a driver asks the named peers without delay, side by side rather
/// than one after another: an attempt made while a fetch of the same hash runs asks the
/// named peers that fetch does not ask, and a failure is reported once no fetch of that hash
/// runs, as [`FetchFailure::Busy`] when a named peer was left unasked.
///
/// [`FetchFailure::Busy`]: super::FetchFailure::Busy
#[derive(Clone, Debug)]
pub enum Action {
    /// The outcome for one message event (for gossipsub manual validation: `Accept`
    /// propagates, `Ignore` drops silently, `Reject` drops and scores the source down).
    /// For fetched announcements and local contributions it is informational.
    Verdict {
        /// Message id (blake3 of its envelope).
        id: Hash,
        /// The outcome.
        verdict: Verdict,
    },
    /// Fetch an adapter blob, verify its hash, store it, then report
    /// [`Event::BlobAvailable`] (or [`Event::FetchFailed`] after trying every peer).
    ///
    /// [`Event::BlobAvailable`]: super::Event::BlobAvailable
    /// [`Event::FetchFailed`]: super::Event::FetchFailed
    FetchBlob {
        /// blake3 of the blob.
        hash: Hash,
        /// Peers known to hold it, best first.
        from: Vec<NodeId>,
    },
    /// Fetch a round adapter (the parent of a record whose rule
    /// [builds on its parent](crate::RuleId::builds_on_parent)), verify its hash, store it,
    /// then report [`Event::BlobAvailable`] (or [`Event::FetchFailed`]). Unlike an input
    /// adapter it has the round adapter's shape (another rank).
    ///
    /// [`Event::BlobAvailable`]: super::Event::BlobAvailable
    /// [`Event::FetchFailed`]: super::Event::FetchFailed
    FetchRoundAdapter {
        /// blake3 of the blob.
        hash: Hash,
        /// Peers known to hold it (the record's signers).
        from: Vec<NodeId>,
    },
    /// Fetch an announcement's envelope bytes by id, verify the hash, store them, decode
    /// them with `Signed::decode` and report [`Event::Announcement`] (or
    /// [`Event::FetchFailed`], with [`FetchFailure::Invalid`] when they do not decode).
    ///
    /// [`Event::Announcement`]: super::Event::Announcement
    /// [`Event::FetchFailed`]: super::Event::FetchFailed
    /// [`FetchFailure::Invalid`]: super::FetchFailure::Invalid
    FetchAnnouncement {
        /// The announcement id.
        id: Hash,
        /// Peers that named it.
        from: Vec<NodeId>,
    },
    /// Fetch a committed record of round `round` whose result is `result` (a link of the
    /// history of a record being verified) from these peers, as the signed committed
    /// digest a peer stored with it; check that it decodes and is of this network, and
    /// report [`Event::Record`] with it (with `None` when no peer served one).
    ///
    /// [`Event::Record`]: super::Event::Record
    FetchRecord {
        /// An opaque tag of this request, which the answer carries back.
        tag: Hash,
        /// The round.
        round: u64,
        /// Its result.
        result: Hash,
        /// Peers that vouched for a history through it (the signers of a record built on it).
        from: Vec<NodeId>,
    },
    /// Run the aggregation (off the network task) and report
    /// [`Event::AggregationFinished`](super::Event::AggregationFinished) with the same job.
    Aggregate(AggregationJob),
    /// Gossip this node's announcement (and store its bytes).
    PublishAnnouncement(SignedAnnouncement),
    /// Sign this digest with the node key and gossip it on the digest topic.
    PublishDigest(RoundDigest),
    /// Persist `record` as the committed record of its round, and use its result as the
    /// base for training the next round.
    Commit {
        /// The committed record.
        record: RoundRecord,
        /// When it replaces the record we had committed for that round (a fork-choice
        /// switch or a rewind): that record's result. When `record.round` is below the
        /// previous tip's round, our records of the later rounds are orphaned.
        replaces: Option<Hash>,
    },
    /// Lower this peer's score: it signed something provably wrong.
    Penalise {
        /// The offender.
        peer: NodeId,
        /// What it did.
        reason: Misbehaviour,
    },
}

/// The outcome for one received message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Valid and useful (propagate).
    Accept,
    /// Not useful, not the sender's fault (do not propagate).
    Ignore(Ignored),
    /// The signer misbehaved (do not propagate; a [`Action::Penalise`] follows).
    Reject(Misbehaviour),
}

/// Why a message was ignored.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Ignored {
    /// Seen before (a replay of the same bytes, or gossip duplication).
    Duplicate,
    /// Our own digest coming back.
    Own,
    /// A local contribution not signed by this node.
    NotOurs,
    /// For a round that is already committed here.
    Late {
        /// The message's round.
        round: u64,
        /// Our current round.
        current: u64,
    },
    /// For a round too far ahead to buffer (a lagging node catches up through digests).
    TooFarAhead {
        /// The message's round.
        round: u64,
        /// Our current round.
        current: u64,
    },
    /// Timestamped beyond the allowed clock skew.
    FromTheFuture {
        /// The message's time.
        time_ms: u64,
        /// Our time.
        now_ms: u64,
    },
    /// A digest for another aggregation rule.
    OtherRule {
        /// Its rule.
        rule: RuleId,
    },
    /// A committed record that loses to our tip under fork choice.
    ForkLost {
        /// The round.
        round: u64,
    },
    /// A digest from a peer penalised this round or the last one.
    Banned,
    /// An in-progress digest for a round we committed or have not reached: only
    /// committed records are candidates for fork choice and catch-up.
    NotCommitted,
    /// The round already holds as many announcements as we keep.
    RoundFull {
        /// The round.
        round: u64,
    },
    /// A contribution of this node for a round that closed more than two grace periods ago
    /// and takes no more inputs: offer it in the next round.
    InputsClosed {
        /// The round.
        round: u64,
    },
    /// The round already holds as many announcements of this signer as we keep from one.
    SignerFull {
        /// The round.
        round: u64,
    },
}

/// Provable misbehaviour of a signer.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Misbehaviour {
    /// Signed a message for another network.
    WrongModel {
        /// The model id it named.
        got: ModelId,
    },
    /// Signed with a key that carries less work than the network asks for
    /// ([`crate::RoundConfig::min_key_work`]).
    WeakKey {
        /// The key's work, in bits.
        work: u32,
        /// The network's.
        needed: u32,
    },
    /// Announced two different adapters for one round (the lowest hash is used).
    Equivocation {
        /// The round.
        round: u64,
        /// The adapter we knew.
        first: Hash,
        /// The new one.
        second: Hash,
    },
    /// Announced an adapter whose bytes (which hash right) are not a usable adapter of the
    /// network.
    InvalidAdapter {
        /// The adapter's hash.
        adapter: Hash,
    },
    /// Named an announcement (in a digest) whose bytes are not a valid announcement.
    NamedInvalidAnnouncement {
        /// The announcement id.
        id: Hash,
    },
    /// Named an announcement for another round or adapter than it claimed.
    NamedMismatchedAnnouncement {
        /// The announcement id.
        id: Hash,
    },
    /// Listed two inputs of one contributor in one round record.
    DuplicateContributor {
        /// The round.
        round: u64,
    },
    /// Signed a record whose chain weight does not follow from its parent's.
    WrongWeight {
        /// The round.
        round: u64,
        /// The weight it signed.
        claimed: u64,
        /// The parent's weight plus its contributors.
        expected: u64,
    },
    /// Signed a result that recomputation does not reproduce.
    WrongResult {
        /// The round.
        round: u64,
        /// The result it signed.
        claimed: Hash,
        /// The result we computed from its inputs.
        computed: Hash,
    },
}

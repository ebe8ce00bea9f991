//! What comes into the machine: [`Event`]s, and the aggregation jobs they report on.

use crate::{Hash, NodeId, RuleId, SignedAnnouncement, SignedDigest};

/// Something that happened, told to [`RoundMachine::handle`](super::RoundMachine::handle).
#[derive(Clone, Debug)]
pub enum Event {
    /// An announcement from gossip, or one the machine asked for with
    /// [`Action::FetchAnnouncement`] (decoded by the driver with `Signed::decode`).
    ///
    /// [`Action::FetchAnnouncement`]: super::Action::FetchAnnouncement
    Announcement(SignedAnnouncement),
    /// This node's own new adapter (or a gateway upload), signed by this node. Its blob
    /// must already be in the local store. The machine answers with
    /// [`Action::PublishAnnouncement`] when it is accepted. At most one adapter per
    /// (node, user id) per round: a second one is refused with
    /// `Verdict::Reject(Misbehaviour::Equivocation)` and not published (offer it in the
    /// next round); one for another round than the current is refused as `Late` or
    /// `TooFarAhead`.
    ///
    /// [`Action::PublishAnnouncement`]: super::Action::PublishAnnouncement
    LocalContribution(SignedAnnouncement),
    /// A round digest from gossip.
    Digest(SignedDigest),
    /// An adapter blob is in the local store, its hash verified.
    BlobAvailable {
        /// blake3 of the blob.
        hash: Hash,
    },
    /// A requested blob or announcement could not be had from any listed peer.
    FetchFailed {
        /// The blob hash or announcement id.
        hash: Hash,
        /// Why.
        reason: FetchFailure,
    },
    /// The aggregator finished a job from [`Action::Aggregate`](super::Action::Aggregate).
    AggregationFinished {
        /// The job, as it was asked for.
        job: AggregationJob,
        /// blake3 of the resulting round adapter (already in the local store).
        result: Hash,
    },
    /// The answer to [`Action::FetchRecord`](super::Action::FetchRecord): the digest of
    /// the record a peer served, or `None`, and who was asked without serving it.
    Record {
        /// The tag of the request.
        tag: Hash,
        /// The round asked for.
        round: u64,
        /// The result asked for.
        result: Hash,
        /// The signed committed digest a peer served (its signature checked, signed by
        /// the peer that served it).
        digest: Option<SignedDigest>,
        /// The peers asked (before the one that served, or all of them) that served
        /// nothing, or not that record, or did not answer in time.
        unanswered: Vec<NodeId>,
    },
    /// Close the current round's window now (a gateway's explicit aggregate request).
    CloseNow,
}

/// Why a fetch failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FetchFailure {
    /// No listed peer had it (or none answered in time).
    Unavailable,
    /// A peer served bytes with the right hash that do not decode as a valid signed
    /// announcement. Whoever named it misbehaved.
    Invalid,
    /// This node will not take it in (its disk is below the floor it keeps free, or an
    /// outsider of its closed network signed it): nobody's fault, and its sources are not
    /// held to have failed to serve it. An adapter is retried at the fetch timeout; an
    /// announcement is not asked for again for a fetch timeout (it would be the same bytes).
    Local,
    /// Its sources (some of them, for an announcement) were not asked: this node already
    /// receives as many transfers from each as it allows at once. Retried at the fetch
    /// timeout. If the last attempt of an adapter ends this way, its sources count as not
    /// serving it (they kept our share busy); an announcement's namers that the attempts
    /// since the last failure reported asked first are not counted as asked.
    Busy,
}

/// One adapter of an aggregation job, with its FedAvg weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AggregateInput {
    /// blake3 of the adapter.
    pub adapter: Hash,
    /// Training samples from its announcement.
    pub samples: u64,
}

/// What to aggregate. The aggregator must be deterministic in exactly these fields, and
/// its output must bind `round` and `parent` (the real one writes them into the round
/// adapter's metadata), so a result hash identifies its place in the chain.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AggregationJob {
    /// The round.
    pub round: u64,
    /// The previous round's result (`None`: base model).
    pub parent: Option<Hash>,
    /// The rule.
    pub rule: RuleId,
    /// Inputs, strictly ascending by adapter hash.
    pub inputs: Vec<AggregateInput>,
}

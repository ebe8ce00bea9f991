//! Decoding never panics, whatever the bytes, and a valid message survives no mutation.

use hivemind_protocol::{
    Announcement, Error, Hash, ModelId, NodeKey, RoundDigest, RoundInput, RoundRecord, RuleId,
    Signed, SignedAnnouncement, SignedDigest, MAX_MESSAGE_BYTES,
};
use proptest::prelude::*;

fn key() -> NodeKey {
    NodeKey::from_bytes(&[42; 32])
}

fn announcement(round: u64, user: Option<String>, time_ms: u64) -> SignedAnnouncement {
    let k = key();
    let a = Announcement {
        model: ModelId(Hash::of(b"m")),
        round,
        adapter: Hash::of(&round.to_le_bytes()),
        byte_len: 4096,
        samples: 77,
        contributor: k.node_id(),
        user_id: user,
        parent: (round > 1).then(|| Hash::of(b"parent")),
        time_ms,
    };
    Signed::sign(a, &k).expect("sign")
}

fn digest(n: usize, weight_extra: u64) -> SignedDigest {
    let k = key();
    let mut inputs: Vec<RoundInput> = (0..n as u32)
        .map(|i| RoundInput {
            adapter: Hash::of(&i.to_le_bytes()),
            announcement: Hash::of(&(i + 1_000).to_le_bytes()),
        })
        .collect();
    inputs.sort();
    let d = RoundDigest {
        record: RoundRecord {
            model: ModelId(Hash::of(b"m")),
            round: 9,
            parent: Some(Hash::of(b"8")),
            weight: n as u64 + weight_extra,
            inputs,
            rule: RuleId::FEDAVG,
            result: Hash::of(b"result"),
        },
        signer: k.node_id(),
        committed: weight_extra & 1 == 0,
        time_ms: 1_700_000_000_000 + weight_extra,
    };
    Signed::sign(d, &k).expect("sign")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = SignedAnnouncement::decode(&bytes);
        let _ = SignedDigest::decode(&bytes);
        let _ = RoundRecord::decode(&bytes);
        // With a valid header, so the payload decoder sees the junk too.
        let mut framed = vec![1u8, 1];
        framed.extend_from_slice(&bytes);
        prop_assert!(SignedAnnouncement::decode(&framed).is_err());
        framed[1] = 2;
        prop_assert!(SignedDigest::decode(&framed).is_err());
    }

    #[test]
    fn mutated_announcements_never_verify(
        round in 1u64..1_000_000,
        user in proptest::option::of("[a-z0-9_]{0,40}"),
        time_ms in any::<u64>(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
    ) {
        let good = announcement(round, user, time_ms);
        let back = SignedAnnouncement::decode(good.as_bytes()).expect("valid decodes");
        prop_assert_eq!(back.payload(), good.payload());
        let mut bytes = good.encode();
        for (at, xor) in &edits {
            let i = at.index(bytes.len());
            bytes[i] ^= xor;
        }
        if bytes != good.as_bytes() {
            prop_assert!(SignedAnnouncement::decode(&bytes).is_err());
        }
        // Truncations and extensions fail too.
        let cut = edits[0].0.index(good.as_bytes().len());
        prop_assert!(SignedAnnouncement::decode(&good.as_bytes()[..cut]).is_err());
        let mut longer = good.encode();
        longer.push(edits[0].1);
        prop_assert!(SignedAnnouncement::decode(&longer).is_err());
    }

    #[test]
    fn mutated_digests_never_verify(
        n in 1usize..40,
        extra in 0u64..1_000,
        edits in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
    ) {
        let good = digest(n, extra);
        let back = SignedDigest::decode(good.as_bytes()).expect("valid");
        prop_assert_eq!(back.payload(), good.payload());
        let mut bytes = good.encode();
        for (at, xor) in &edits {
            let i = at.index(bytes.len());
            bytes[i] ^= xor;
        }
        if bytes != good.as_bytes() {
            prop_assert!(SignedDigest::decode(&bytes).is_err());
        }
    }
}

#[test]
fn oversized_input_is_rejected_before_decoding() {
    // A valid header followed by a huge body: refused on length alone.
    let mut big = vec![0u8; MAX_MESSAGE_BYTES + 1];
    big[0] = 1;
    big[1] = 1;
    assert_eq!(
        SignedAnnouncement::decode(&big).err(),
        Some(Error::TooLarge {
            len: MAX_MESSAGE_BYTES + 1,
            max: MAX_MESSAGE_BYTES
        })
    );
    assert!(matches!(
        RoundRecord::decode(&big),
        Err(Error::TooLarge { .. })
    ));
}

#[test]
fn a_digest_with_the_maximum_inputs_fits_the_cap() {
    let d = digest(hivemind_protocol::MAX_ROUND_INPUTS, 0);
    assert!(d.as_bytes().len() <= MAX_MESSAGE_BYTES);
    // One more input is refused at signing time.
    let mut r = d.payload().clone();
    r.record.inputs.push(RoundInput {
        adapter: Hash([0xff; 32]),
        announcement: Hash([0xff; 32]),
    });
    r.record.weight += 1;
    assert!(matches!(
        Signed::sign(r, &key()),
        Err(Error::TooManyInputs { .. })
    ));
}

//! What this node remembers about peers it penalised: a ban that grows with each penalty
//! and ends, and a bounded number of records. Before, every penalised peer was banned and
//! remembered until the process ended, so keys made at will (free in an open network) grew
//! the maps without bound.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;

/// The ban of a first penalty; each further penalty doubles it, up to [`BAN_MAX`].
pub(super) const BAN_FIRST: Duration = Duration::from_secs(10 * 60);
/// The longest ban.
pub(super) const BAN_MAX: Duration = Duration::from_secs(24 * 3600);
/// How long a peer's penalties are remembered after its ban ends (so a repeat offender's
/// next ban is longer).
pub(super) const REMEMBER_AFTER_BAN: Duration = Duration::from_secs(24 * 3600);
/// Most peers remembered at once. Past it, one is forgotten (and let in again if banned):
/// one whose ban is over before a banned one, then the one penalised least often, then the
/// one penalised longest ago. So fresh keys penalised once push out other fresh keys, not a
/// repeat offender.
pub(super) const MAX_REMEMBERED: usize = 4096;

#[derive(Clone, Copy, Debug)]
struct Record {
    count: u32,
    last: Instant,
    banned_until: Instant,
    banned: bool,
}

/// Penalised peers and their bans.
#[derive(Debug, Default)]
pub(super) struct Penalties {
    peers: BTreeMap<PeerId, Record>,
}

impl Penalties {
    /// Records a penalty of `peer` at `now` and bans it. Returns its penalty count and the
    /// peer forgotten (and unbanned) to make room, if one was.
    pub(super) fn penalise(&mut self, peer: PeerId, now: Instant) -> (u32, Option<PeerId>) {
        let mut forgotten = None;
        if !self.peers.contains_key(&peer) && self.peers.len() >= MAX_REMEMBERED {
            let oldest = self
                .peers
                .iter()
                .min_by_key(|(p, r)| (r.banned, r.count, r.last, **p))
                .map(|(p, _)| *p);
            if let Some(p) = oldest {
                self.peers.remove(&p);
                forgotten = Some(p);
            }
        }
        let r = self.peers.entry(peer).or_insert(Record {
            count: 0,
            last: now,
            banned_until: now,
            banned: true,
        });
        r.count = r.count.saturating_add(1);
        r.last = now;
        r.banned_until = now + ban_for(r.count);
        r.banned = true;
        (r.count, forgotten)
    }

    /// Ends the bans that are over at `now` (each reported once) and forgets peers whose
    /// ban ended [`REMEMBER_AFTER_BAN`] ago.
    pub(super) fn expire(&mut self, now: Instant) -> Vec<PeerId> {
        let mut ended = Vec::new();
        self.peers.retain(|p, r| {
            if r.banned && r.banned_until <= now {
                r.banned = false;
                ended.push(*p);
            }
            r.banned_until + REMEMBER_AFTER_BAN > now
        });
        ended
    }

    /// Penalty counts of the peers remembered.
    pub(super) fn counts(&self) -> BTreeMap<PeerId, u32> {
        self.peers.iter().map(|(p, r)| (*p, r.count)).collect()
    }
}

/// The ban of a peer's `count`th penalty.
fn ban_for(count: u32) -> Duration {
    let doublings = count.saturating_sub(1).min(16);
    BAN_FIRST.saturating_mul(1 << doublings).min(BAN_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bans_grow_with_each_penalty_and_end() {
        let t0 = Instant::now();
        let mut p = Penalties::default();
        let peer = PeerId::random();
        assert_eq!(p.penalise(peer, t0), (1, None));
        assert!(p.expire(t0 + BAN_FIRST - Duration::from_secs(1)).is_empty());
        assert_eq!(p.expire(t0 + BAN_FIRST), vec![peer]);
        // Reported once.
        assert!(p.expire(t0 + BAN_FIRST + Duration::from_secs(1)).is_empty());
        // Remembered: the second penalty bans twice as long.
        let t1 = t0 + BAN_FIRST * 2;
        assert_eq!(p.penalise(peer, t1), (2, None));
        assert!(p.expire(t1 + BAN_FIRST).is_empty());
        assert_eq!(p.expire(t1 + BAN_FIRST * 2), vec![peer]);
        // Forgotten a day after the ban ended.
        let end = t1 + BAN_FIRST * 2;
        p.expire(end + REMEMBER_AFTER_BAN - Duration::from_secs(1));
        assert_eq!(p.counts().get(&peer), Some(&2));
        p.expire(end + REMEMBER_AFTER_BAN);
        assert!(p.counts().is_empty());
        // The longest ban is capped.
        assert_eq!(ban_for(1), BAN_FIRST);
        assert_eq!(ban_for(3), BAN_FIRST * 4);
        assert_eq!(ban_for(u32::MAX), BAN_MAX);
    }

    #[test]
    fn fresh_keys_push_out_ended_bans_and_each_other_before_a_repeat_offender() {
        let t0 = Instant::now();
        let mut p = Penalties::default();
        let (repeat, served) = (PeerId::random(), PeerId::random());
        p.penalise(served, t0);
        p.penalise(repeat, t0);
        p.penalise(repeat, t0);
        // `served`'s ban ends; `repeat` is banned for 20 minutes.
        assert_eq!(p.expire(t0 + BAN_FIRST), vec![served]);
        let t1 = t0 + BAN_FIRST;
        let mut forgotten = Vec::new();
        for i in 0..MAX_REMEMBERED as u64 {
            let (_, gone) = p.penalise(PeerId::random(), t1 + Duration::from_millis(i));
            forgotten.extend(gone);
        }
        // The ended ban went first, then the fresh keys one another; the repeat offender stays.
        assert_eq!(forgotten.first(), Some(&served));
        assert_eq!(p.counts().get(&repeat), Some(&2));
    }

    #[test]
    fn fresh_keys_cannot_grow_the_records_past_the_cap() {
        let t0 = Instant::now();
        let mut p = Penalties::default();
        let first = PeerId::random();
        p.penalise(first, t0);
        let mut forgotten = Vec::new();
        for i in 1..=MAX_REMEMBERED as u64 + 10 {
            let (n, gone) = p.penalise(PeerId::random(), t0 + Duration::from_millis(i));
            assert_eq!(n, 1);
            forgotten.extend(gone);
        }
        assert_eq!(p.counts().len(), MAX_REMEMBERED);
        // The one penalised first went first.
        assert_eq!(forgotten.len(), 11);
        assert_eq!(forgotten[0], first);
        assert!(!p.counts().contains_key(&first));
    }
}

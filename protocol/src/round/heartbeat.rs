//! The heartbeat: after commit, a node republishes its tip as a committed digest every
//! `heartbeat_ms`, trickle style (skipped when three identical copies were heard).

use super::{jitter, Action, RoundMachine, HEARTBEAT_REDUNDANCY};
use crate::{Hash, RoundDigest};

/// The current heartbeat period.
#[derive(Clone, Debug)]
pub(super) struct Heartbeat {
    pub(super) period_start: u64,
    pub(super) period: u64,
    pub(super) fire_at: u64,
    pub(super) fired: bool,
    pub(super) consistent: usize,
    pub(super) inconsistent: bool,
}

impl RoundMachine {
    pub(super) fn reset_heartbeat(&mut self, now: u64) {
        self.tip_support.clear();
        self.tip_since = now;
        self.heartbeat = Heartbeat {
            period_start: now,
            period: 0,
            fire_at: now,
            fired: false,
            consistent: 0,
            inconsistent: false,
        };
        self.heartbeat.fire_at = self.fire_time(now, 0);
    }

    /// Trickle-style: each period fires at a node-specific point of its second half.
    fn fire_time(&self, period_start: u64, period: u64) -> u64 {
        let half = (self.config.heartbeat_ms / 2).max(1);
        let round = self.tip.as_ref().map_or(0, |t| t.round);
        period_start + half + jitter(&self.me, round, &Hash(period_to_bytes(period))) % half
    }

    pub(super) fn run_heartbeat(&mut self, now: u64, out: &mut Vec<Action>) {
        let Some(tip) = &self.tip else { return };
        if now
            >= self
                .heartbeat
                .period_start
                .saturating_add(self.config.heartbeat_ms)
        {
            let period = self.heartbeat.period + 1;
            let inconsistent = self.heartbeat.inconsistent;
            self.heartbeat = Heartbeat {
                period_start: now,
                period,
                fire_at: now,
                fired: false,
                consistent: 0,
                inconsistent,
            };
            self.heartbeat.fire_at = self.fire_time(now, period);
        }
        if !self.heartbeat.fired && now >= self.heartbeat.fire_at {
            self.heartbeat.fired = true;
            if self.heartbeat.consistent < HEARTBEAT_REDUNDANCY || self.heartbeat.inconsistent {
                out.push(Action::PublishDigest(RoundDigest {
                    record: tip.clone(),
                    signer: self.me,
                    committed: true,
                    time_ms: now,
                }));
            }
            self.heartbeat.inconsistent = false;
        }
    }
}

fn period_to_bytes(period: u64) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[..8].copy_from_slice(&period.to_le_bytes());
    b
}

//! The properties of the module docs, checked at every commit (1) and at the end of a
//! run (3 to 5); property 2 is checked where penalties and decode failures happen.

use std::collections::{BTreeMap, BTreeSet};

use super::{fake_aggregate, Sim, SimReport};
use crate::{Hash, RoundRecord};

impl Sim<'_> {
    pub(super) fn on_commit(&mut self, i: usize, record: RoundRecord, replaces: Option<Hash>) {
        self.report.commits += 1;
        if replaces.is_some() {
            self.report.switches += 1;
        }
        for input in &record.inputs {
            if self.invalid_anns.contains(&input.announcement)
                || self.invalid_adapters.contains(&input.adapter)
            {
                self.violation(format!(
                    "node {i} committed round {} with invalid input {:?}",
                    record.round, input
                ));
            }
            match self.valid_anns.get(&input.announcement) {
                Some(&(round, adapter)) if round == record.round && adapter == input.adapter => {}
                // A Sybil's: valid as far as anyone can tell (counted in `sybil_inputs`, which
                // a network with key work keeps at 0).
                _ if self.sybil_anns.contains(&input.announcement) => {}
                _ => self.violation(format!(
                    "node {i} committed round {} naming an announcement no honest node made: {:?}",
                    record.round, input
                )),
            }
        }
        if record
            .parent
            .is_some_and(|p| self.forged_parents.contains(&p))
            || self.forged_parents.contains(&record.result)
        {
            self.report.forged_adoptions += 1;
            self.violation(format!(
                "node {i} adopted a forged history: round {} of weight {} on (or as) a \
                 parent no honest node made",
                record.round, record.weight
            ));
        }
        let adapters: Vec<Hash> = record.inputs.iter().map(|x| x.adapter).collect();
        if fake_aggregate(record.parent, &adapters) != record.result {
            self.violation(format!(
                "node {i} committed a wrong result for round {}",
                record.round
            ));
        }
        let entry = (
            self.now,
            record.round,
            record.inputs.len(),
            record.result,
            record.parent,
            replaces.is_some(),
        );
        self.nodes[i].commits.push(entry);
        let opened_new = self.nodes[i]
            .history
            .keys()
            .next_back()
            .is_none_or(|&r| record.round > r);
        // As the node's store does: the committed record is the tip, and the rounds above it
        // (orphaned by a rewind) go, so that a restart resumes from it.
        let _orphaned = self.nodes[i]
            .history
            .split_off(&record.round.saturating_add(1));
        self.nodes[i].history.insert(record.round, record);
        if opened_new {
            self.maybe_train(i);
        }
    }

    /// Which nodes hold which record of round `r`, with the minority's commit logs.
    fn describe_round(&self, checked: &[usize], r: u64) -> String {
        let mut by_record: BTreeMap<Hash, Vec<usize>> = BTreeMap::new();
        for &i in checked.iter().filter(|&&i| r > self.nodes[i].restart_floor) {
            if let Some(rec) = self.nodes[i].history.get(&r) {
                by_record.entry(rec.result).or_default().push(i);
            }
        }
        let mut out = String::new();
        for (result, nodes) in &by_record {
            let shown: Vec<String> = nodes.iter().take(6).map(|n| n.to_string()).collect();
            out += &format!(
                "\n    result {}: {} nodes [{}]",
                result.short(),
                nodes.len(),
                shown.join(",")
            );
            if nodes.len() <= 3 {
                for &n in nodes {
                    for c in &self.nodes[n].commits {
                        if c.1 + 2 >= r && c.1 <= r + 2 {
                            out += &format!(
                                "\n      node {n}: t={} round {} inputs {} result {} parent {} {}",
                                c.0,
                                c.1,
                                c.2,
                                c.3.short(),
                                c.4.map_or("-".into(), |p| p.short()),
                                if c.5 { "(switch)" } else { "" }
                            );
                        }
                    }
                }
            }
        }
        out
    }

    pub(super) fn finish(mut self) -> SimReport {
        let checked: Vec<usize> = (0..self.cfg.nodes)
            .filter(|&i| self.nodes[i].up && self.nodes[i].machine.is_some())
            .collect();
        self.report.checked_nodes = checked.len();
        self.report.sybil_inputs = checked
            .iter()
            .flat_map(|&i| self.nodes[i].history.values())
            .flat_map(|r| &r.inputs)
            .filter(|input| self.sybil_anns.contains(&input.announcement))
            .count() as u64;
        // 3. Same tip everywhere.
        let mut tips: BTreeMap<Option<(u64, Hash)>, Vec<usize>> = BTreeMap::new();
        for &i in &checked {
            let t = self.nodes[i]
                .machine
                .as_ref()
                .and_then(|m| m.tip().map(|t| (t.round, t.result)));
            tips.entry(t).or_default().push(i);
        }
        self.report.final_round = tips
            .keys()
            .map(|t| t.map_or(0, |(r, _)| r))
            .min()
            .unwrap_or(0);
        if tips.len() > 1 {
            // The nodes of each tip, by index, where few hold it (for `--trace-node`).
            let desc: Vec<String> = tips
                .iter()
                .map(|(t, nodes)| {
                    let at = match t {
                        Some((r, h)) => format!("round {r} {}", h.short()),
                        None => "genesis".to_string(),
                    };
                    let n = nodes.len();
                    if n <= 3 {
                        format!("{n} nodes at {at} {nodes:?}")
                    } else {
                        format!("{n} nodes at {at}")
                    }
                })
                .collect();
            self.violation(format!("final tips differ: {}", desc.join(", ")));
        }
        // 4. Forks last at most one round: if nodes disagree on round r, they agree on
        //    round r+1. Inside the partition (from the round committed everywhere when
        //    it started to the first round after the heal) forks may last longer.
        let max_round = self
            .nodes
            .iter()
            .flat_map(|n| n.history.keys().next_back().copied())
            .max()
            .unwrap_or(0);
        let zone: Option<(u64, u64)> = match (&self.cfg.partition, self.partition_round) {
            (Some(_), Some(p)) => Some((p, self.report.heal_round + 1)),
            _ => None,
        };
        let in_zone = |r: u64| zone.is_some_and(|(lo, hi)| lo <= r && r <= hi);
        let mut disagreeing = BTreeSet::new();
        for r in 1..=max_round {
            let records: BTreeSet<Hash> = checked
                .iter()
                .filter(|&&i| r > self.nodes[i].restart_floor)
                .filter_map(|&i| self.nodes[i].history.get(&r).map(|rec| rec.id()))
                .collect();
            if records.len() > 1 {
                disagreeing.insert(r);
            }
        }
        self.report.disagreeing_rounds = disagreeing.len() as u64;
        for &r in &disagreeing {
            if disagreeing.contains(&(r + 1)) && !(in_zone(r) && in_zone(r + 1)) {
                let detail = self.describe_round(&checked, r + 1);
                self.violation(format!(
                    "the fork of round {r} is not resolved in round {}:{detail}",
                    r + 1
                ));
            }
        }
        // 5. Progress after the heal, and Byzantine behaviour caught.
        if self.cfg.partition.is_some() && self.report.final_round < self.report.heal_round + 2 {
            self.violation(format!(
                "no progress after the heal: final round {} < heal round {} + 2",
                self.report.final_round, self.report.heal_round
            ));
        }
        if self.cfg.byzantine > 0 && self.report.byzantine_penalties == 0 {
            self.violation("no Byzantine sender was penalised".into());
        }
        if checked.is_empty() {
            self.violation("no honest node survived".into());
        }
        self.report
    }
}

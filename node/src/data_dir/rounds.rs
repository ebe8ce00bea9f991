//! Committed rounds as the data dir shows them: from the running node's status file, or
//! from the store when no node runs; exported as PEFT dirs after a hash check.

use std::path::{Path, PathBuf};

use hivemind_model::adapter::{AdapterConfig, Limits, LoraAdapter, WEIGHTS_FILE};
use hivemind_protocol::Hash;

use super::{DataDir, RoundView};
use crate::error::{Error, IoContext, Result};

impl DataDir {
    /// Committed rounds, oldest first, and the network's adapter config when a running
    /// node reported it.
    pub fn rounds(&self) -> Result<(Vec<RoundView>, Option<AdapterConfig>)> {
        if let Ok(s) = self.running_status() {
            let cfg = serde_json::from_value(s.adapter_config).ok();
            return Ok((s.rounds, cfg));
        }
        let store = self.open_store()?;
        let rounds = store.list_rounds()?.iter().map(RoundView::of).collect();
        Ok((rounds, None))
    }

    /// Committed round `number` (default: the latest), if any.
    pub fn find_round(&self, number: Option<u64>) -> Result<Option<RoundView>> {
        let (rounds, _) = self.rounds()?;
        Ok(match number {
            Some(n) => rounds.into_iter().find(|r| r.number == n),
            None => rounds.into_iter().last(),
        })
    }

    /// Writes committed round `number` (default: the latest) as a PEFT dir at `output`,
    /// after checking its bytes against the committed hash.
    pub fn export_round(&self, number: Option<u64>, output: &Path) -> Result<RoundView> {
        let (rounds, cfg) = self.rounds()?;
        let round = match number {
            Some(n) => rounds
                .iter()
                .find(|r| r.number == n)
                .ok_or_else(|| Error::NoSuchRound {
                    number: n,
                    dir: self.path().to_path_buf(),
                })?,
            None => rounds.last().ok_or_else(|| Error::NoRounds {
                dir: self.path().to_path_buf(),
            })?,
        };
        let hash: Hash = round
            .hash
            .parse()
            .map_err(|_| hivemind_store::Error::CorruptRecord {
                tree: "rounds",
                key: round.number.to_string(),
                detail: format!("round hash {:?} is not hex blake3", round.hash),
            })?;
        let bytes = self.read_blob(&hash)?;
        let cfg = match cfg {
            Some(c) => c,
            None => self.network_config()?,
        };
        // A merged round adapter has its own rank and scaling 1.
        let adapter = if self.network_rule()?.builds_on_parent() {
            LoraAdapter::from_merged_bytes(&cfg, &bytes, &Limits::DEFAULT)?
        } else {
            LoraAdapter::from_safetensors_bytes(cfg, &bytes, &Limits::DEFAULT)?
        };
        adapter.write_dir(output)?;
        Ok(round.clone())
    }

    /// The latest round adapter as a PEFT dir (exported once under `round-adapters/`),
    /// or `None` before the first commit.
    pub fn latest_round_adapter(&self) -> Result<Option<(RoundView, PathBuf)>> {
        self.round_adapter(None)
    }

    /// Committed round `number` (default: the latest) as a PEFT dir (exported once under
    /// `round-adapters/`), or `None` when there is no such round.
    pub fn round_adapter(&self, number: Option<u64>) -> Result<Option<(RoundView, PathBuf)>> {
        if !self.has_store() {
            return Ok(None);
        }
        let Some(round) = self.find_round(number)? else {
            return Ok(None);
        };
        let dir = self.round_adapter_of(&round)?;
        Ok(Some((round, dir)))
    }

    /// Committed round `round` (as [`DataDir::rounds`] lists it) as a PEFT dir, exported once
    /// under `round-adapters/`.
    pub fn round_adapter_of(&self, round: &RoundView) -> Result<PathBuf> {
        let dir = self.round_adapter_dir(round);
        if !dir.join(WEIGHTS_FILE).exists() {
            // Exported to a temp dir first, so a reader never sees a half-written one.
            let tmp = dir.with_extension(format!("tmp.{}", std::process::id()));
            if let Err(e) = self.export_round(Some(round.number), &tmp) {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
            if let Err(e) = std::fs::rename(&tmp, &dir) {
                let _ = std::fs::remove_dir_all(&tmp);
                if !dir.join(WEIGHTS_FILE).exists() {
                    return Err(e).at("renaming", tmp);
                }
            }
        }
        Ok(dir)
    }

    /// Why the personal adapter at `personal`, applied with `round`'s adapter under it, may
    /// answer less of what it learned; `None` when it fits (or its record cannot be read, or
    /// the network's rounds do not build on their parent). It fits when it was trained on top
    /// of that round: the other users' updates under an adapter trained without them cost it
    /// much of what it learned (`examples/learning_bench.rs`: own facts 0.42-0.58 instead of
    /// 1.00), and a few passes of [`REFIT_COMMAND`] on the same data refit it (4 full-batch
    /// steps: 1.00, keeping part of what the round knew of the others' facts).
    pub fn personal_misfit(&self, personal: &Path, round: &RoundView) -> Option<String> {
        let info = self.personal_record(personal)?;
        if info.fits_round(&round.hash) {
            return None;
        }
        let was = match &info.on_top_of {
            Some(h) => format!(
                "was trained on top of another round adapter ({})",
                h.get(..16).unwrap_or(h)
            ),
            None => "names no round it was trained on (the base model alone, or a training from \
                     before rounds were recorded)"
                .to_string(),
        };
        Some(format!(
            "your personal adapter {was}, not round {}: under this round it may answer less of \
             what it learned",
            round.number
        ))
    }

    /// Why the personal adapter at `personal`, applied without a round adapter under it, may
    /// answer less of what it learned: it was trained on top of one (`train --from-round`, on
    /// a network whose rounds build on their parent), so it is an update of that round, not
    /// of the base model. `None` otherwise.
    pub fn personal_wants_round(&self, personal: &Path) -> Option<String> {
        let h = self.personal_record(personal)?.on_top_of?;
        Some(format!(
            "your personal adapter was trained on top of round adapter {}: without a round \
             adapter under it, it may answer less of what it learned; `round+personal` applies \
             both",
            h.get(..16).unwrap_or(&h)
        ))
    }

    /// The training record of the personal adapter at `personal`, on a network whose rounds
    /// build on their parent (elsewhere a personal adapter does not sit on a round).
    fn personal_record(&self, personal: &Path) -> Option<hivemind_model::train::TrainingInfo> {
        if !self.network_rule().is_ok_and(|r| r.builds_on_parent()) {
            return None;
        }
        hivemind_model::train::TrainingInfo::read(personal)
    }
}

/// The command that refits a personal adapter to the latest round (its data file, data dir
/// and output to be added): a fresh update of 4 full-batch passes on top of the round.
pub const REFIT_COMMAND: &str =
    "hive-node train --data FILE --from-round --epochs 4 --batch-size 16 --grad-accum 1 --lr 1e-3";

//! [`NetSpec`]: what every adapter of a network must be, and the check a fetched adapter
//! passes before it may be aggregated.

use std::path::Path;

use hivemind_model::adapter::{AdapterConfig, AdapterShape, Limits, LoraAdapter, TargetModules};
use hivemind_model::aggregate::{
    AggregationRule, Bounds, ExactMean, FedAvg, GeoMedian, IsoMerge, TsvMerge, WeightedAdapter,
};
use hivemind_model::dp::DpSettings;
use hivemind_protocol::{Hash, RuleId};
use hivemind_store::Store;
use rand::SeedableRng;

use crate::error::{Error, Result};

/// Whether blob `hash` in the store is an adapter of this network ([`NetSpec::parse`]).
/// A fetch removes one it brought that is not (so that it is neither served nor
/// aggregated).
pub fn check_adapter_blob(store: &Store, spec: &NetSpec, hash: &Hash) -> Result<()> {
    check_blob(store, hash, |bytes| spec.parse(bytes, &Limits::DEFAULT))
}

/// [`check_adapter_blob`] for a parent round adapter ([`NetSpec::parse_round`]).
pub fn check_round_adapter_blob(store: &Store, spec: &NetSpec, hash: &Hash) -> Result<()> {
    check_blob(store, hash, |bytes| {
        spec.parse_round(bytes, &Limits::DEFAULT)
    })
}

fn check_blob(
    store: &Store,
    hash: &Hash,
    parse: impl FnOnce(&[u8]) -> Result<LoraAdapter>,
) -> Result<()> {
    let bytes = store.get_blob(hash)?.ok_or_else(|| Error::NotOfNetwork {
        detail: format!("adapter {hash} is not in the store"),
    })?;
    // Whether a blob that fails goes is the fetch's to say: one it fetched for this check
    // goes, one held before (the node's own round adapter, named as an input) stays.
    parse(&bytes).map(|_| ())
}

/// How a network turns a round's adapters into its round adapter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NetRule {
    /// FedAvg of the factors (average A, average B); each round adapter stands alone and
    /// users continue training from it.
    FedAvg,
    /// The exact mean of the users' updates, added to the parent round adapter.
    ExactMean,
    /// Iso-C style merge of the updates (flattened spectrum of their sum), added to the parent.
    /// The default: the one rule in `examples/learning_bench.rs` whose round knows more than
    /// a user alone.
    #[default]
    Iso,
    /// TSV-Merge style merge of the updates (decorrelated), added to the parent.
    Tsv,
    /// The geometric median of the updates (RFA), added to the parent: robust in direction as
    /// well as in size, at the cost of learning like the exact mean.
    GeoMedian,
}

/// A round adapter's rank is at most this many times the network's rank (rules that build
/// on the parent).
pub const ROUND_RANK_FACTOR: usize = 4;
/// The factor Iso scales the flattened spectrum by. `examples/learning_bench.rs` on the default
/// model, one round, 48 facts: x0.5 0.021, x1.0 0.229, x1.25 0.229, x1.5 0.333 (each user alone
/// 0.25).
pub const ISO_SCALE: f64 = 1.5;
/// The factor TSV scales the merged update by.
pub const TSV_SCALE: f64 = 0.5;

impl NetRule {
    /// Every rule, for help texts.
    pub const ALL: [NetRule; 5] = [
        NetRule::FedAvg,
        NetRule::ExactMean,
        NetRule::Iso,
        NetRule::Tsv,
        NetRule::GeoMedian,
    ];

    /// The protocol's id of the rule.
    pub fn id(self) -> RuleId {
        match self {
            NetRule::FedAvg => RuleId::FEDAVG,
            NetRule::ExactMean => RuleId::EXACT_MEAN,
            NetRule::Iso => RuleId::ISO,
            NetRule::Tsv => RuleId::TSV,
            NetRule::GeoMedian => RuleId::GEOMEDIAN,
        }
    }

    /// Its name on the command line and in network.json.
    pub fn name(self) -> &'static str {
        match self {
            NetRule::FedAvg => "fedavg",
            NetRule::ExactMean => "exact-mean",
            NetRule::Iso => "iso",
            NetRule::Tsv => "tsv",
            NetRule::GeoMedian => "geomedian",
        }
    }

    /// Whether round adapters build on their parent (users train updates on top of the round
    /// adapter, frozen, and announce those).
    pub fn builds_on_parent(self) -> bool {
        self.id().builds_on_parent()
    }
}

impl std::fmt::Display for NetRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for NetRule {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        NetRule::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| Error::Config {
                option: "rule",
                detail: format!(
                    "unknown aggregation rule {s:?} (fedavg, exact-mean, iso, tsv, geomedian)"
                ),
            })
    }
}

/// What every adapter of a network must be: its LoRA config (rank, alpha, target modules)
/// and, from the base model's shape, the tensor shapes of every layer; and how its rounds
/// merge them.
#[derive(Clone, Debug)]
pub struct NetSpec {
    /// The LoRA config adapters are read with and exported with.
    pub config: AdapterConfig,
    /// Expected tensors.
    pub shape: AdapterShape,
    /// The aggregation rule.
    pub rule: NetRule,
    /// Differential privacy of what this network's contributors announce ([`NetSpec::release`]).
    pub dp: Option<DpSettings>,
}

impl NetSpec {
    /// The spec of `rank`/`alpha`/`target_modules` adapters on the model at `model_path`
    /// (reads only the GGUF header or config.json).
    pub fn for_model(
        model_path: &Path,
        rank: usize,
        alpha: f64,
        target_modules: &[String],
        rule: NetRule,
    ) -> Result<NetSpec> {
        let config = AdapterConfig::new(
            rank,
            alpha,
            TargetModules::from_names(target_modules.iter().cloned()),
        );
        config.validate()?;
        let names = config.target_modules.names().unwrap_or_default().to_vec();
        let shape = hivemind_model::read_config(model_path)?.adapter_shape(rank, &names)?;
        Ok(NetSpec {
            config,
            shape,
            rule,
            dp: None,
        })
    }

    /// The most a round adapter's rank can be.
    pub fn round_rank(&self) -> usize {
        if self.rule.builds_on_parent() {
            self.config.r.saturating_mul(ROUND_RANK_FACTOR)
        } else {
            self.config.r
        }
    }

    /// The rule that merges a round's inputs.
    pub fn merge_rule(&self) -> Box<dyn AggregationRule + Send> {
        let cap = FedAvg::DEFAULT_MAX_SAMPLES_PER_INPUT;
        let rank_cap = self.round_rank();
        match self.rule {
            NetRule::FedAvg => Box::new(FedAvg::default()),
            NetRule::ExactMean => Box::new(ExactMean {
                max_samples_per_input: cap,
                rank_cap,
                bounds: Bounds::ROBUST,
            }),
            NetRule::Iso => Box::new(IsoMerge {
                max_samples_per_input: cap,
                rank_cap,
                bounds: Bounds::ROBUST,
                scale: ISO_SCALE,
            }),
            NetRule::Tsv => Box::new(TsvMerge {
                max_samples_per_input: cap,
                rank_cap,
                bounds: Bounds::ROBUST,
                scale: TSV_SCALE,
            }),
            NetRule::GeoMedian => Box::new(GeoMedian {
                max_samples_per_input: cap,
                rank_cap,
                bounds: Bounds::ROBUST,
            }),
        }
    }

    /// Parses untrusted safetensors bytes as a round adapter of this network: for FedAvg an
    /// adapter of the network's shape; for rules that build on the parent, the same modules
    /// and tensor shapes with any rank up to [`NetSpec::round_rank`] and scaling 1
    /// (`lora_alpha = r`), as the merge writes it.
    pub fn parse_round(&self, bytes: &[u8], limits: &Limits) -> Result<LoraAdapter> {
        if !self.rule.builds_on_parent() {
            return self.parse(bytes, limits);
        }
        let bad = |detail: String| Error::NotOfNetwork { detail };
        let adapter = LoraAdapter::from_merged_bytes(&self.config, bytes, limits)
            .map_err(|e| bad(e.to_string()))?;
        let rank = adapter.config.r;
        if rank > self.round_rank() {
            return Err(bad(format!(
                "round adapter rank {rank} is above this network's {}",
                self.round_rank()
            )));
        }
        let mut shape = self.shape.clone();
        shape.rank = rank;
        adapter
            .check_shape(&shape)
            .map_err(|e| bad(e.to_string()))?;
        Ok(adapter)
    }

    /// Whether `adapter` (e.g. read from a PEFT dir) fits: same alpha, and rank, modules and
    /// every tensor shape as the network expects.
    pub fn check(&self, adapter: &LoraAdapter) -> Result<()> {
        if adapter.config.lora_alpha != self.config.lora_alpha {
            return Err(Error::NotOfNetwork {
                detail: format!(
                    "lora_alpha is {}, this network uses {}",
                    adapter.config.lora_alpha, self.config.lora_alpha
                ),
            });
        }
        adapter
            .check_shape(&self.shape)
            .map_err(|e| Error::NotOfNetwork {
                detail: e.to_string(),
            })?;
        // What the network's rule cannot merge even alone (values near f32's limit, whose
        // flattened spectrum no f32 holds) would only be left out of the round, and its
        // announcer blamed: refused here, before anyone announces or fetches it.
        let alone = WeightedAdapter {
            hash: Hash([0; 32]),
            samples: 1,
            adapter: adapter.clone(),
        };
        self.merge_rule()
            .aggregate(&[alone])
            .map(|_| ())
            .map_err(|e| Error::NotOfNetwork {
                detail: format!("the network's rule ({}) cannot merge it: {e}", self.rule),
            })
    }

    /// The most bytes an adapter of this network can take as safetensors: every tensor in
    /// F32 (the widest dtype adapters may use) plus the largest header
    /// [`Limits::DEFAULT`] accepts and its 8-byte length prefix.
    pub fn max_adapter_bytes(&self) -> u64 {
        self.max_bytes_of_rank(self.shape.rank)
    }

    /// [`NetSpec::max_adapter_bytes`] for a round adapter ([`NetSpec::round_rank`]).
    pub fn max_round_adapter_bytes(&self) -> u64 {
        self.max_bytes_of_rank(self.round_rank())
    }

    fn max_bytes_of_rank(&self, rank: usize) -> u64 {
        let per_layer: u64 = self
            .shape
            .modules
            .values()
            .map(|d| (rank * (d.in_features + d.out_features)) as u64)
            .sum();
        per_layer * self.shape.num_layers as u64 * 4 + Limits::DEFAULT.max_header_bytes + 8
    }

    /// The bytes a contributor announces for `adapter`: its canonical bytes, or in a network
    /// with differential privacy, the adapter clipped and noised ([`hivemind_model::dp`], with
    /// the OS's random generator) and the settings and per-round ε in its metadata.
    pub fn release(&self, adapter: &LoraAdapter) -> Result<Vec<u8>> {
        let Some(dp) = &self.dp else {
            return Ok(adapter.to_safetensors_bytes()?);
        };
        let mut rng = rand::rngs::StdRng::from_entropy();
        let noised = hivemind_model::dp::privatize(adapter, dp, &mut rng)?;
        // What peers will check of it (a large clip could make it unmergeable).
        self.check(&noised)?;
        let meta = std::collections::BTreeMap::from([
            ("hivemind.dp_clip".to_string(), dp.clip.to_string()),
            (
                "hivemind.dp_noise_multiplier".to_string(),
                dp.noise_multiplier.to_string(),
            ),
            ("hivemind.dp_delta".to_string(), dp.delta.to_string()),
            (
                "hivemind.dp_epsilon_round".to_string(),
                format!("{:.4}", dp.epsilon(1)),
            ),
        ]);
        Ok(noised.to_safetensors_bytes_with_metadata(&meta)?)
    }

    /// Parses untrusted safetensors bytes as an adapter of this network.
    pub fn parse(&self, bytes: &[u8], limits: &Limits) -> Result<LoraAdapter> {
        let adapter = LoraAdapter::from_safetensors_bytes(self.config.clone(), bytes, limits)
            .map_err(|e| Error::NotOfNetwork {
                detail: e.to_string(),
            })?;
        self.check(&adapter)?;
        Ok(adapter)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use hivemind_model::config::Arch;
    use hivemind_model::testing::{random_adapter, TinyModel};

    #[test]
    fn max_adapter_bytes_bounds_real_adapters_tightly() {
        let names = ["q_proj".to_string(), "down_proj".to_string()];
        let shape = TinyModel::new(Arch::Llama, 1)
            .unwrap()
            .cfg
            .adapter_shape(8, &names)
            .unwrap();
        let config = AdapterConfig::new(8, 16.0, TargetModules::from_names(names.clone()));
        let spec = NetSpec {
            config,
            shape: shape.clone(),
            rule: NetRule::FedAvg,
            dp: None,
        };
        let adapter = random_adapter(&shape, 16.0, 3).unwrap();
        let meta = BTreeMap::from([
            ("hivemind.round".to_string(), "7".to_string()),
            (
                "hivemind.parent".to_string(),
                Hash::of(b"parent").to_string(),
            ),
        ]);
        let bytes = adapter.to_safetensors_bytes_with_metadata(&meta).unwrap();
        let bound = spec.max_adapter_bytes();
        assert!(bytes.len() as u64 <= bound, "{} > {bound}", bytes.len());
        // The bound is the F32 payload plus the header allowance, nothing more.
        let payload: usize = adapter.tensors.values().map(|t| t.data.len() * 4).sum();
        assert_eq!(bound, payload as u64 + Limits::DEFAULT.max_header_bytes + 8);
    }

    /// A rank-4 exact-mean network on q_proj and v_proj of a tiny Llama: its model config,
    /// the module names and the spec (round adapters of another rank than inputs).
    fn exact_mean_spec() -> (hivemind_model::config::ModelConfig, [String; 2], NetSpec) {
        let names = ["q_proj".to_string(), "v_proj".to_string()];
        let cfg = TinyModel::new(Arch::Llama, 1).unwrap().cfg;
        let spec = NetSpec {
            config: AdapterConfig::new(4, 8.0, TargetModules::from_names(names.clone())),
            shape: cfg.adapter_shape(4, &names).unwrap(),
            rule: NetRule::ExactMean,
            dp: None,
        };
        (cfg, names, spec)
    }

    /// A round adapter the node holds, named by someone's announcement as an input adapter,
    /// fails the input check but stays in the store. Before, the check removed whatever
    /// failed it, so an announcement naming a node's own round adapter (under a rule whose
    /// round adapters have another rank than inputs) deleted it: chat with it, serving it
    /// and the next round built on it then failed (issue 13).
    #[test]
    fn a_held_round_adapter_checked_as_an_input_stays_in_the_store() {
        let (cfg, names, spec) = exact_mean_spec();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let shape = cfg.adapter_shape(spec.round_rank(), &names).unwrap();
        let bytes = random_adapter(&shape, 1.0, 1)
            .unwrap()
            .to_safetensors_bytes()
            .unwrap();
        let hash = store.put_blob(&bytes).unwrap();
        assert!(check_round_adapter_blob(&store, &spec, &hash).is_ok());
        assert!(check_adapter_blob(&store, &spec, &hash).is_err());
        assert!(
            store.has_blob(&hash).unwrap(),
            "the check removed a held blob"
        );
    }

    /// A parent round adapter comes from peers: one above the network's round rank, or with
    /// a module of the wrong shape, is refused; one the merge could have written is read
    /// with its own rank and scaling 1.
    #[test]
    fn round_adapters_from_peers_are_checked_against_the_round_rank_and_shapes() {
        let (cfg, names, spec) = exact_mean_spec();
        let bytes_of_rank = |rank: usize| {
            let shape = cfg.adapter_shape(rank, &names).unwrap();
            random_adapter(&shape, rank as f64, 1)
                .unwrap()
                .to_safetensors_bytes()
                .unwrap()
        };
        let ok = spec
            .parse_round(&bytes_of_rank(spec.round_rank()), &Limits::DEFAULT)
            .unwrap();
        assert_eq!(ok.config.r, 16);
        assert_eq!(ok.config.scaling(), 1.0);
        let err = spec
            .parse_round(&bytes_of_rank(spec.round_rank() + 1), &Limits::DEFAULT)
            .unwrap_err();
        assert!(err.to_string().contains("above this network's 16"), "{err}");
        // A module of another width.
        let mut wrong = cfg.adapter_shape(8, &names).unwrap();
        if let Some(d) = wrong.modules.values_mut().next() {
            d.in_features += 1;
        }
        let foreign = random_adapter(&wrong, 8.0, 2)
            .unwrap()
            .to_safetensors_bytes()
            .unwrap();
        let err = spec.parse_round(&foreign, &Limits::DEFAULT).unwrap_err();
        assert!(matches!(err, Error::NotOfNetwork { .. }), "{err}");
    }

    #[test]
    fn every_rule_is_named_on_the_command_line_and_merges_as_its_id_says() {
        for rule in NetRule::ALL {
            let parsed: NetRule = rule.name().parse().unwrap();
            assert_eq!(parsed, rule);
            let spec = NetSpec {
                config: AdapterConfig::new(4, 8.0, TargetModules::from_names(["q_proj"])),
                shape: TinyModel::new(Arch::Llama, 1)
                    .unwrap()
                    .cfg
                    .adapter_shape(4, &["q_proj".to_string()])
                    .unwrap(),
                rule,
                dp: None,
            };
            assert_eq!(
                spec.merge_rule().id(),
                super::super::aggregate::rule_name(rule.id()),
                "{rule}"
            );
        }
        let ids: std::collections::BTreeSet<_> = NetRule::ALL.iter().map(|r| r.id()).collect();
        assert_eq!(ids.len(), NetRule::ALL.len(), "two rules share an id");
        let err = "median".parse::<NetRule>().unwrap_err().to_string();
        assert!(err.contains("geomedian"), "{err}");
    }
}

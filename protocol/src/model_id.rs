//! The model id that partitions the network, and the gossip topic names derived from it.
//!
//! Nodes on different base models, or with LoRA adapters of a different shape, can never
//! aggregate each other's adapters. So every message names a [`ModelId`]: a blake3 hash
//! (in key-derivation mode, so it can collide with no other hash in HiveMind) of the base
//! model's identity and the LoRA shape. Topics carry the first 16 hex characters of it;
//! the messages themselves carry all 32 bytes and are checked against the node's own id.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::Hash;

/// blake3 key-derivation context for model ids (fixed forever for version 1).
const MODEL_ID_CONTEXT: &str = "hivemind 2025-01 model id v1";

/// What the base model is: the hash of its weights file, or a canonical name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BaseModel {
    /// The blake3 hash of the base model file (a GGUF, or a canonical weights file).
    File(Hash),
    /// A canonical id string such as `HuggingFaceTB/SmolLM2-135M-Instruct`.
    Name(String),
}

/// The shape of the LoRA adapters a network trains: any difference makes adapters
/// incompatible, so it is part of the [`ModelId`].
#[derive(Clone, Debug, PartialEq)]
pub struct LoraShape {
    /// LoRA rank `r`.
    pub rank: u32,
    /// LoRA `alpha` (scaling is `alpha / r`). Hashed by its IEEE bits; `-0.0` counts as
    /// `0.0`.
    pub alpha: f32,
    /// Names of the adapted modules (`q_proj`, `v_proj`, ...). Order and duplicates do
    /// not matter: the id uses the sorted, de-duplicated set.
    pub target_modules: Vec<String>,
}

/// The id of one federated network: base model identity plus LoRA shape.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ModelId(pub Hash);

impl ModelId {
    /// Derives the id of the network training `shape` adapters on `base`.
    pub fn derive(base: &BaseModel, shape: &LoraShape) -> ModelId {
        let mut h = blake3::Hasher::new_derive_key(MODEL_ID_CONTEXT);
        // Every field is tagged or length-prefixed, so distinct inputs never concatenate
        // to the same byte stream.
        match base {
            BaseModel::File(hash) => {
                h.update(&[1]);
                h.update(hash.as_bytes());
            }
            BaseModel::Name(name) => {
                h.update(&[2]);
                h.update(&(name.len() as u64).to_le_bytes());
                h.update(name.as_bytes());
            }
        }
        h.update(&shape.rank.to_le_bytes());
        let alpha = if shape.alpha == 0.0 {
            0.0f32
        } else {
            shape.alpha
        };
        h.update(&alpha.to_bits().to_le_bytes());
        let mut modules: Vec<&str> = shape.target_modules.iter().map(String::as_str).collect();
        modules.sort_unstable();
        modules.dedup();
        h.update(&(modules.len() as u64).to_le_bytes());
        for m in modules {
            h.update(&(m.len() as u64).to_le_bytes());
            h.update(m.as_bytes());
        }
        ModelId(Hash::from(h.finalize()))
    }

    /// The id of the network that aggregates with `rule`: two networks that differ only in
    /// their rule are different networks (their round adapters mean different things). FedAvg
    /// networks keep the id [`ModelId::derive`] gives, as before rules were a choice. (v2 of
    /// the key: the update-merging rules gained a bound that changes their results, so nodes
    /// from before it, which would commit other bytes, are another network.)
    pub fn with_rule(self, rule: crate::RuleId) -> ModelId {
        if rule == crate::RuleId::FEDAVG {
            return self;
        }
        let mut h = blake3::Hasher::new_derive_key("hivemind 2026 model id with rule v2");
        h.update(self.0.as_bytes());
        h.update(&rule.0.to_le_bytes());
        ModelId(Hash::from(h.finalize()))
    }

    /// The id of the network whose contributors release their adapters with differential
    /// privacy (clip, noise multiplier): a private network is another network.
    pub fn with_dp(self, clip: f64, noise_multiplier: f64) -> ModelId {
        let mut h = blake3::Hasher::new_derive_key("hivemind 2026 model id with dp v1");
        h.update(self.0.as_bytes());
        h.update(&clip.to_le_bytes());
        h.update(&noise_multiplier.to_le_bytes());
        ModelId(Hash::from(h.finalize()))
    }

    /// The id of the network that counts only keys carrying `bits` of work
    /// ([`crate::NodeId::key_work`]); 0 keeps the id (every key counts).
    pub fn with_key_work(self, bits: u32) -> ModelId {
        if bits == 0 {
            return self;
        }
        let mut h = blake3::Hasher::new_derive_key("hivemind 2026 model id with key work v1");
        h.update(self.0.as_bytes());
        h.update(&bits.to_le_bytes());
        ModelId(Hash::from(h.finalize()))
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        self.0.to_hex()
    }

    /// The first 16 hex characters (64 bits), as used in topic names.
    pub fn short16(&self) -> String {
        hex::encode(&self.0.as_bytes()[..8])
    }
}

impl fmt::Display for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModelId({})", self.0.short())
    }
}

/// The gossipsub topic for [`crate::Announcement`]s of `model`:
/// `/hivemind/<16 hex>/announce/1`.
pub fn announce_topic(model: &ModelId) -> String {
    format!("/hivemind/{}/announce/1", model.short16())
}

/// The gossipsub topic for [`crate::RoundDigest`]s of `model`:
/// `/hivemind/<16 hex>/digest/1`.
pub fn digest_topic(model: &ModelId) -> String {
    format!("/hivemind/{}/digest/1", model.short16())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(modules: &[&str]) -> LoraShape {
        LoraShape {
            rank: 8,
            alpha: 16.0,
            target_modules: modules.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn module_order_and_duplicates_do_not_matter() {
        let base = BaseModel::Name("HuggingFaceTB/SmolLM2-135M-Instruct".into());
        let a = ModelId::derive(&base, &shape(&["q_proj", "v_proj"]));
        let b = ModelId::derive(&base, &shape(&["v_proj", "q_proj", "q_proj"]));
        assert_eq!(a, b);
    }

    #[test]
    fn every_field_changes_the_id() {
        let base = BaseModel::Name("m".into());
        let s = shape(&["q_proj", "v_proj"]);
        let id = ModelId::derive(&base, &s);
        let mut r = s.clone();
        r.rank = 16;
        let mut al = s.clone();
        al.alpha = 32.0;
        let other_modules = shape(&["q_proj", "k_proj"]);
        // Length prefixes: ["ab","c"] and ["a","bc"] must differ.
        let split1 = shape(&["ab", "c"]);
        let split2 = shape(&["a", "bc"]);
        let ids = [
            id,
            ModelId::derive(&base, &r),
            ModelId::derive(&base, &al),
            ModelId::derive(&base, &other_modules),
            ModelId::derive(&BaseModel::Name("n".into()), &s),
            ModelId::derive(&BaseModel::File(Hash::of(b"m")), &s),
            ModelId::derive(&base, &split1),
            ModelId::derive(&base, &split2),
        ];
        for i in 0..ids.len() {
            for j in i + 1..ids.len() {
                assert_ne!(ids[i], ids[j], "ids {i} and {j} collide");
            }
        }
        let mut neg0 = s.clone();
        neg0.alpha = -0.0;
        let mut pos0 = s;
        pos0.alpha = 0.0;
        assert_eq!(ModelId::derive(&base, &neg0), ModelId::derive(&base, &pos0));
    }

    #[test]
    fn topics_carry_the_short_id_and_a_version() {
        let id = ModelId(Hash([0xab; 32]));
        assert_eq!(announce_topic(&id), "/hivemind/abababababababab/announce/1");
        assert_eq!(digest_topic(&id), "/hivemind/abababababababab/digest/1");
        // Independent check of the derivation against blake3's own derive_key.
        let base = BaseModel::File(Hash([1; 32]));
        let s = LoraShape {
            rank: 4,
            alpha: 8.0,
            target_modules: vec!["q".into()],
        };
        let mut bytes = vec![1u8];
        bytes.extend_from_slice(&[1; 32]);
        bytes.extend_from_slice(&4u32.to_le_bytes());
        bytes.extend_from_slice(&8.0f32.to_bits().to_le_bytes());
        bytes.extend_from_slice(&1u64.to_le_bytes());
        bytes.extend_from_slice(&1u64.to_le_bytes());
        bytes.extend_from_slice(b"q");
        let want = blake3::derive_key(MODEL_ID_CONTEXT, &bytes);
        assert_eq!(ModelId::derive(&base, &s).0 .0, want);
    }
}

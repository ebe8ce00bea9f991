//! LoRA tensors and their PEFT names: splitting, normalising and checking that every A has its B.

use std::collections::BTreeMap;

use super::error::{AdapterError, Result};
use super::{MAX_NAME_LEN, NAME_PREFIX};

/// One LoRA weight matrix as plain row-major `f32` values.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraTensor {
    /// `[r, in]` for `lora_A`, `[out, r]` for `lora_B`.
    pub shape: Vec<usize>,
    /// Row-major values; `data.len()` is the product of `shape`.
    pub data: Vec<f32>,
}

impl LoraTensor {
    /// Number of values the shape holds (saturating on overflow).
    pub fn numel(&self) -> usize {
        self.shape.iter().fold(1usize, |a, &d| a.saturating_mul(d))
    }
}

/// Which half of a LoRA pair a tensor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LoraSide {
    /// `lora_A`, shape `[r, in]`.
    A,
    /// `lora_B`, shape `[out, r]`.
    B,
}

impl LoraSide {
    pub(super) fn suffix(self) -> &'static str {
        match self {
            LoraSide::A => ".lora_A.weight",
            LoraSide::B => ".lora_B.weight",
        }
    }

    pub(super) fn other(self) -> LoraSide {
        match self {
            LoraSide::A => LoraSide::B,
            LoraSide::B => LoraSide::A,
        }
    }
}

pub(super) fn valid_component(c: &str) -> bool {
    !c.is_empty()
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Splits a canonical name into (module path, side), checking every character.
pub(super) fn split_name(name: &str) -> Option<(&str, LoraSide)> {
    if name.len() > MAX_NAME_LEN {
        return None;
    }
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let (path, side) = if let Some(p) = rest.strip_suffix(LoraSide::A.suffix()) {
        (p, LoraSide::A)
    } else {
        (rest.strip_suffix(LoraSide::B.suffix())?, LoraSide::B)
    };
    path.split('.').all(valid_component).then_some((path, side))
}

/// Maps a name as found in a file to its canonical form: `.lora_A.<adapter>.weight`
/// (PEFT with the adapter name, e.g. `default`) becomes `.lora_A.weight`.
pub(super) fn normalise_name(name: &str) -> Option<String> {
    if name.len() > MAX_NAME_LEN {
        return None;
    }
    if split_name(name).is_some() {
        return Some(name.to_string());
    }
    let stem = name.strip_suffix(".weight")?;
    let (head, adapter) = stem.rsplit_once('.')?;
    if !valid_component(adapter) || !(head.ends_with(".lora_A") || head.ends_with(".lora_B")) {
        return None;
    }
    let canonical = format!("{head}.weight");
    split_name(&canonical).is_some().then_some(canonical)
}

/// (layer index, module kind) of a module path like `model.layers.3.self_attn.q_proj`.
pub(super) fn locate_module(path: &str) -> Option<(usize, &str)> {
    let parts: Vec<&str> = path.split('.').collect();
    let kind = *parts.last()?;
    let layer = parts.windows(2).find_map(|w| {
        let canonical_number = w[1] == "0" || !w[1].starts_with('0');
        (w[0] == "layers" && canonical_number && w[1].bytes().all(|b| b.is_ascii_digit()))
            .then(|| w[1].parse::<usize>().ok())
            .flatten()
    })?;
    Some((layer, kind))
}

/// Checks a set of canonical tensors: names, 2-D shapes, data lengths, finite values,
/// complete A/B pairs of equal rank. Returns the rank of each pair by module path.
pub(super) fn check_tensors(
    tensors: &BTreeMap<String, LoraTensor>,
) -> Result<BTreeMap<&str, usize>> {
    if tensors.is_empty() {
        return Err(AdapterError::NoTensors);
    }
    let mut ranks = BTreeMap::new();
    for (name, t) in tensors {
        let (path, side) = split_name(name).ok_or_else(|| AdapterError::NotLora {
            tensor: name.clone(),
        })?;
        if t.shape.len() != 2 || t.shape.contains(&0) {
            return Err(AdapterError::BadShape {
                tensor: name.clone(),
                shape: t.shape.iter().map(|&d| d as u64).collect(),
            });
        }
        let expected = t.numel();
        if t.data.len() != expected {
            return Err(AdapterError::DataLength {
                tensor: name.clone(),
                shape: t.shape.clone(),
                expected,
                actual: t.data.len(),
            });
        }
        if let Some(index) = t.data.iter().position(|v| !v.is_finite()) {
            return Err(AdapterError::NonFinite {
                tensor: name.clone(),
                index,
            });
        }
        let partner = format!("{NAME_PREFIX}{path}{}", side.other().suffix());
        let Some(p) = tensors.get(&partner) else {
            return Err(AdapterError::MissingPair {
                tensor: name.clone(),
                missing: partner,
            });
        };
        if side == LoraSide::B {
            let rank_a = t_rank(p, LoraSide::A);
            let rank_b = t_rank(t, LoraSide::B);
            if rank_a != rank_b {
                return Err(AdapterError::RankMismatch {
                    tensor: name.clone(),
                    expected: rank_a,
                    actual: rank_b,
                });
            }
            ranks.insert(path, rank_b);
        }
    }
    Ok(ranks)
}

/// The rank dimension of a tensor (shape checked elsewhere; 0 when malformed).
pub(super) fn t_rank(t: &LoraTensor, side: LoraSide) -> usize {
    let i = match side {
        LoraSide::A => 0,
        LoraSide::B => 1,
    };
    t.shape.get(i).copied().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_normalise_and_reject() {
        let a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
        assert_eq!(normalise_name(a).as_deref(), Some(a));
        assert_eq!(
            normalise_name(
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
            )
            .as_deref(),
            Some(a)
        );
        for bad in [
            "lm_head.weight",
            "base_model.model.lm_head.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight",
            "base_model.model..lora_A.weight",
            "base_model.model.model.embed_tokens.lora_embedding_A",
            "base_model.model.model.layers.0.q_proj.lora_A.de\"fault.weight",
            "base_model.model.model.layers.0.q_proj.lora_A.x.y.weight",
            "base_model.model.model.layers.0.q_proj.lora_magnitude_vector.weight",
        ] {
            assert_eq!(normalise_name(bad), None, "{bad}");
        }
        assert_eq!(
            locate_module("model.layers.12.mlp.up_proj"),
            Some((12, "up_proj"))
        );
        assert_eq!(locate_module("model.layers.012.mlp.up_proj"), None);
        assert_eq!(locate_module("model.norm"), None);
    }
}

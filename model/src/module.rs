//! The seven projection modules of a decoder layer, the unit a LoRA adapter targets.
//!
//! The decoder, the trainer and adapter names all speak of modules through [`Module`]; the
//! Hugging Face name ([`Module::as_str`]) appears only where a name is read or written (PEFT
//! tensor names, `adapter_config.json`, the command line).

use std::fmt;
use std::str::FromStr;

use crate::config::ModelConfig;

/// A linear projection of a decoder layer, in the order the forward pass meets them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Module {
    /// Attention query projection, `self_attn.q_proj`.
    QProj,
    /// Attention key projection, `self_attn.k_proj`.
    KProj,
    /// Attention value projection, `self_attn.v_proj`.
    VProj,
    /// Attention output projection, `self_attn.o_proj`.
    OProj,
    /// MLP gate, `mlp.gate_proj`.
    GateProj,
    /// MLP up projection, `mlp.up_proj`.
    UpProj,
    /// MLP down projection, `mlp.down_proj`.
    DownProj,
}

/// A module name that is none of the seven.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown module {0:?} (expected q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj or down_proj)"
)]
pub struct UnknownModule(pub String);

impl Module {
    /// Number of modules; arrays indexed by [`Module::index`] have this length.
    pub const COUNT: usize = 7;

    /// Every module, in forward order (`ALL[m.index()] == m`).
    pub const ALL: [Module; Module::COUNT] = [
        Module::QProj,
        Module::KProj,
        Module::VProj,
        Module::OProj,
        Module::GateProj,
        Module::UpProj,
        Module::DownProj,
    ];

    /// The Hugging Face / PEFT name, e.g. `q_proj`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Module::QProj => "q_proj",
            Module::KProj => "k_proj",
            Module::VProj => "v_proj",
            Module::OProj => "o_proj",
            Module::GateProj => "gate_proj",
            Module::UpProj => "up_proj",
            Module::DownProj => "down_proj",
        }
    }

    /// llama.cpp's name in GGUF tensor names (`blk.N.<name>.weight`), e.g. `attn_q`.
    pub const fn gguf_name(self) -> &'static str {
        match self {
            Module::QProj => "attn_q",
            Module::KProj => "attn_k",
            Module::VProj => "attn_v",
            Module::OProj => "attn_output",
            Module::GateProj => "ffn_gate",
            Module::UpProj => "ffn_up",
            Module::DownProj => "ffn_down",
        }
    }

    /// The block of the layer holding it in Hugging Face paths: `self_attn` or `mlp`.
    pub const fn block(self) -> &'static str {
        match self {
            Module::QProj | Module::KProj | Module::VProj | Module::OProj => "self_attn",
            Module::GateProj | Module::UpProj | Module::DownProj => "mlp",
        }
    }

    /// Position in [`Module::ALL`], for per-module arrays.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The weight's `(out_features, in_features)` on a model with config `cfg`.
    pub fn dims(self, cfg: &ModelConfig) -> (usize, usize) {
        let q = cfg.num_heads * cfg.head_dim;
        let kv = cfg.num_kv_heads * cfg.head_dim;
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        match self {
            Module::QProj => (q, h),
            Module::KProj | Module::VProj => (kv, h),
            Module::OProj => (h, q),
            Module::GateProj | Module::UpProj => (i, h),
            Module::DownProj => (h, i),
        }
    }
}

impl FromStr for Module {
    type Err = UnknownModule;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Module::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| UnknownModule(s.to_string()))
    }
}

impl fmt::Display for Module {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_index_matches_all() {
        for (i, m) in Module::ALL.into_iter().enumerate() {
            assert_eq!(m.index(), i);
            assert_eq!(m.as_str().parse::<Module>(), Ok(m));
            assert_eq!(m.to_string(), m.as_str());
        }
        let err = "x_proj".parse::<Module>().unwrap_err();
        assert_eq!(err, UnknownModule("x_proj".into()));
        assert!(err.to_string().contains("x_proj"));
        assert!("Q_PROJ".parse::<Module>().is_err());
    }
}

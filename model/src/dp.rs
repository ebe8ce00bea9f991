//! Differential privacy for what a contributor announces (opt-in per network): the Gaussian
//! mechanism on the adapter's parameters, and a Rényi-DP accountant.
//!
//! The released vector is every value of the adapter's factors (all `lora_A` and `lora_B`
//! tensors, concatenated). [`privatize`] scales it down to L2 norm at most `clip` and adds
//! independent Gaussian noise of standard deviation `noise_multiplier * clip` to each value.
//! Whatever the user's data, two clipped vectors are at most `2 * clip` apart, so this is the
//! Gaussian mechanism with sensitivity `Δ = 2·clip` and `σ = z·clip`, at the user level (all of
//! a user's data) and local (no peer sees the unnoised adapter; a gateway sees its users' uploads
//! before it releases them for them). The
//! merged update `s·B·A` is computed from the released factors, so it is covered too
//! (post-processing).
//!
//! Accounting: the Gaussian mechanism is (α, α·Δ²/(2σ²))-RDP for every order α > 1, that is
//! `2α/z²` here; one release per round composes additively over rounds; the (ε, δ) figure is
//! the best over a grid of orders of the conversion of Canonne, Kamath and Steinke (2020,
//! Prop. 12): `ε = rdp + ln((α−1)/α) − (ln δ + ln α)/(α−1)`. `model/tests/dp.rs` checks it
//! against the exact privacy curve of the Gaussian mechanism (Balle and Wang, 2018), an
//! independent computation: never below it, and close.

use rand::Rng;

use crate::adapter::{AdapterError, LoraAdapter};

/// A network's differential-privacy settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DpSettings {
    /// L2 norm every released adapter is clipped to.
    pub clip: f64,
    /// Noise standard deviation, in units of `clip`.
    pub noise_multiplier: f64,
    /// The δ that ε is reported for.
    pub delta: f64,
}

/// A [`DpSettings`] that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("differential privacy: {0}")]
pub struct DpError(String);

impl DpSettings {
    /// Checks the settings: clip and noise positive and finite, δ in (0, 1).
    pub fn validate(&self) -> Result<(), DpError> {
        if !(self.clip.is_finite() && self.clip > 0.0) {
            return Err(DpError(format!("clip must be > 0, got {}", self.clip)));
        }
        if !(self.noise_multiplier.is_finite() && self.noise_multiplier > 0.0) {
            return Err(DpError(format!(
                "the noise multiplier must be > 0, got {}",
                self.noise_multiplier
            )));
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return Err(DpError(format!(
                "delta must be in (0, 1), got {}",
                self.delta
            )));
        }
        Ok(())
    }

    /// ε (for [`DpSettings::delta`]) of a user who contributed in `rounds` rounds.
    pub fn epsilon(&self, rounds: u64) -> f64 {
        epsilon(self.noise_multiplier, rounds, self.delta)
    }

    /// The smallest noise multiplier whose ε over `rounds` rounds is at most `target` (for
    /// benchmarks that ask for an ε).
    pub fn noise_for_epsilon(target: f64, rounds: u64, delta: f64) -> f64 {
        let (mut lo, mut hi) = (1e-3f64, 1e4f64);
        for _ in 0..200 {
            let mid = (lo * hi).sqrt();
            if epsilon(mid, rounds, delta) > target {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        hi
    }
}

/// The RDP orders ε is optimised over: 1.01 to 10^5, log-spaced.
fn orders() -> impl Iterator<Item = f64> {
    (0..=1000).map(|i| 1.0 + 0.01 * (1e7f64).powf(f64::from(i) / 1000.0))
}

/// ε at `delta` after `rounds` releases, each the Gaussian mechanism with sensitivity
/// `2·clip` and noise `z·clip` (see the module docs). 0 rounds: 0.
pub fn epsilon(z: f64, rounds: u64, delta: f64) -> f64 {
    if rounds == 0 {
        return 0.0;
    }
    let t = rounds as f64;
    orders()
        .map(|a| {
            let rdp = t * 2.0 * a / (z * z);
            rdp + ((a - 1.0) / a).ln() - (delta.ln() + a.ln()) / (a - 1.0)
        })
        .fold(f64::INFINITY, f64::min)
        .max(0.0)
}

/// The adapter clipped to L2 norm `s.clip` over all its values, with Gaussian noise of
/// standard deviation `s.noise_multiplier * s.clip` added to every value (see the module
/// docs). `rng` must be unpredictable to everyone else (the OS's generator in the node).
pub fn privatize(
    adapter: &LoraAdapter,
    s: &DpSettings,
    rng: &mut impl Rng,
) -> Result<LoraAdapter, AdapterError> {
    let norm = adapter
        .tensors
        .values()
        .flat_map(|t| &t.data)
        .map(|v| f64::from(*v) * f64::from(*v))
        .sum::<f64>()
        .sqrt();
    let scale = if norm > s.clip { s.clip / norm } else { 1.0 };
    let sigma = s.noise_multiplier * s.clip;
    let mut out = adapter.clone();
    for t in out.tensors.values_mut() {
        for v in &mut t.data {
            *v = (f64::from(*v) * scale + sigma * standard_normal(rng)) as f32;
        }
    }
    out.validate()?;
    Ok(out)
}

/// One draw of N(0, 1) (Box–Muller).
fn standard_normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = 1.0 - rng.gen::<f64>(); // (0, 1]
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

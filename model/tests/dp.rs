//! Differential privacy: the accountant against the exact privacy curve of the Gaussian
//! mechanism (an independent computation), and the mechanism's clipping and noise.
#![allow(clippy::unwrap_used)]

use hivemind_model::dp::{epsilon, privatize, DpSettings};
use hivemind_model::testing::{random_adapter, TinyModel};
use rand::SeedableRng;

/// erfc(x), Numerical Recipes' Chebyshev fit (fractional error below 1.2e-7 everywhere).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.26551223
            + t * (1.00002368
                + t * (0.37409196
                    + t * (0.09678418
                        + t * (-0.18628806
                            + t * (0.27886807
                                + t * (-1.13520398
                                    + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))))
            .exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

fn phi(x: f64) -> f64 {
    0.5 * erfc(-x / std::f64::consts::SQRT_2)
}

/// The exact ε at `delta` of the Gaussian mechanism with `mu = Δ/σ` (Balle and Wang 2018,
/// Thm. 8): δ(ε) = Φ(μ/2 − ε/μ) − e^ε Φ(−μ/2 − ε/μ), solved for ε by bisection. T-fold
/// composition of one Gaussian mechanism is the Gaussian mechanism with μ·√T.
fn exact_epsilon(mu: f64, delta: f64) -> f64 {
    let d = |e: f64| phi(mu / 2.0 - e / mu) - e.exp() * phi(-mu / 2.0 - e / mu);
    let (mut lo, mut hi) = (0.0, 500.0);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if d(mid) > delta {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    hi
}

#[test]
fn the_accountant_bounds_the_exact_curve_and_stays_close_to_it() {
    let delta = 1e-5;
    // (z 0.5 over 100 rounds is left out: ε near 1000 overflows e^ε in the exact curve.)
    let cases = [0.5, 1.0, 2.0, 5.0, 20.0]
        .into_iter()
        .flat_map(|z| [1u64, 10, 100].map(|r| (z, r)))
        .filter(|&(z, r)| !(z < 1.0 && r > 10));
    for (z, rounds) in cases {
        {
            // Sensitivity 2·clip, noise z·clip: μ = 2/z per round.
            let exact = exact_epsilon(2.0 / z * (rounds as f64).sqrt(), delta);
            let rdp = epsilon(z, rounds, delta);
            println!("z {z} rounds {rounds}: rdp {rdp:.4}, exact {exact:.4}");
            assert!(
                rdp >= exact * 0.999,
                "z {z}, {rounds} rounds: {rdp} < exact {exact}"
            );
            assert!(
                rdp <= exact * 1.12 + 0.01,
                "z {z}, {rounds} rounds: {rdp} far above exact {exact}"
            );
        }
    }
    assert_eq!(epsilon(1.0, 0, delta), 0.0);
    // More rounds, more ε; more noise, less.
    assert!(epsilon(1.0, 2, delta) > epsilon(1.0, 1, delta));
    assert!(epsilon(2.0, 1, delta) < epsilon(1.0, 1, delta));
    let z = DpSettings::noise_for_epsilon(4.0, 1, delta);
    assert!(
        (epsilon(z, 1, delta) - 4.0).abs() < 1e-3,
        "{}",
        epsilon(z, 1, delta)
    );
}

#[test]
fn privatize_clips_the_whole_adapter_and_adds_noise_of_the_stated_size() {
    let tiny = TinyModel::new(hivemind_model::config::Arch::Llama, 1).unwrap();
    let names = ["q_proj".to_string(), "v_proj".to_string()];
    let shape = tiny.cfg.adapter_shape(4, &names).unwrap();
    let adapter = random_adapter(&shape, 8.0, 1).unwrap();
    let values = |a: &hivemind_model::adapter::LoraAdapter| -> Vec<f64> {
        a.tensors
            .values()
            .flat_map(|t| t.data.iter().map(|v| f64::from(*v)))
            .collect()
    };
    let x = values(&adapter);
    let norm = x.iter().map(|v| v * v).sum::<f64>().sqrt();
    let s = DpSettings {
        clip: norm / 4.0,
        noise_multiplier: 0.01,
        delta: 1e-5,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let out = values(&privatize(&adapter, &s, &mut rng).unwrap());
    // The noise is what is left after the clipped input: mean 0, std z·clip.
    let noise: Vec<f64> = out.iter().zip(&x).map(|(o, v)| o - v / 4.0).collect();
    let n = noise.len() as f64;
    let mean = noise.iter().sum::<f64>() / n;
    let std = (noise.iter().map(|e| (e - mean) * (e - mean)).sum::<f64>() / n).sqrt();
    let want = s.noise_multiplier * s.clip;
    println!(
        "{} values: noise mean {mean:.3e}, std {std:.4e} (want {want:.4e})",
        noise.len()
    );
    assert!(noise.len() > 1000);
    assert!(mean.abs() < 4.0 * want / n.sqrt(), "mean {mean}");
    assert!((std / want - 1.0).abs() < 0.05, "std {std} vs {want}");
    // An adapter inside the clip is not scaled.
    let loose = DpSettings {
        clip: norm * 2.0,
        noise_multiplier: 1e-6,
        ..s
    };
    let kept = values(&privatize(&adapter, &loose, &mut rng).unwrap());
    let moved = kept
        .iter()
        .zip(&x)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(moved < 1e-4, "{moved}");
    // Bad settings are refused by name.
    let bad = DpSettings { clip: 0.0, ..s };
    assert!(bad.validate().unwrap_err().to_string().contains("clip"));
}

//! The math's own checks: the vectorizable exp and the Chebyshev form of cos(mθ).

use super::*;

/// The vectorizable f32 exp against f64's exp over its whole domain, every 1e−4, and the
/// flush below −87.
#[test]
fn fast_exp_f32_is_within_two_ulp() {
    let mut worst = 0.0f64;
    let steps = 870_000;
    for i in 0..=steps {
        let d = -87.0f32 * i as f32 / steps as f32;
        let got = f32::exp_flushed(d) as f64;
        let want = (d as f64).exp();
        worst = worst.max(((got - want) / want).abs());
    }
    // 2 ulp of f32 = 2^−22 relative.
    assert!(
        worst < 2.0 * 2f64.powi(-23),
        "worst relative error {worst:e}"
    );
    assert_eq!(f32::exp_flushed(-87.5), 0.0);
    assert_eq!(f32::exp_flushed(f32::NEG_INFINITY), 0.0);
    assert_eq!(f32::exp_flushed(0.0), 1.0);
    assert!(f32::exp_flushed(f32::NAN).is_nan());
    assert_eq!(f64::exp_flushed(-709.0), 0.0);
}

#[test]
fn chebyshev_matches_cos_m_theta() {
    for m in 1..=SPHEREFACE_MAX_M {
        for i in 0..=200 {
            let theta = std::f64::consts::PI * i as f64 / 200.0;
            let (t, u) = chebyshev(m, theta.cos());
            assert!(
                (t - (m as f64 * theta).cos()).abs() < 1e-9,
                "T_{m}({theta})"
            );
            // U_{m−1}(cos θ) = sin(mθ)/sin θ away from the poles.
            if theta.sin() > 1e-3 {
                let want = (m as f64 * theta).sin() / theta.sin();
                assert!(
                    (u - want).abs() < 1e-6 * want.abs().max(1.0),
                    "U_{m}-1({theta})"
                );
            }
        }
    }
}

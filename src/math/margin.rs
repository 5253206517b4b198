//! The margin on a cosine head's target entry (CosFace, ArcFace, Combined, SphereFace): its
//! value, its derivative by the input, and, for per-row margins, its derivative by the margins.

use super::{Acc, Transform, clamp, inside};
use crate::config::{EXACT_MARGIN_COS_EPS, Head, MarginGrad};

/// The margin on the target entry: u_y = φ(c) and dφ/dx.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Margin<A> {
    /// Softmax and RBF: the target uses the plain transform.
    None,
    /// CosFace: φ(c) = c − m.
    CosFace { m: A },
    /// ArcFace and Combined: φ(c) = cos(m1·θ + m2) − m3, or c − m3 − m2·sin m2 where
    /// m1·θ + m2 > π (the monotone fallback); `easy`: φ(c) = c where c ≤ 0.
    ArcFaceCombined {
        m1: A,
        m2: A,
        m3: A,
        fallback_shift: A,
        easy: bool,
        /// Exact mode: the derivative's denominator is max(sin θ, sin_floor), sin_floor = sin θ_ε
        /// with cos θ_ε = 1 − 1e−5 (≈ 4.47e−3). The value is never clamped.
        sin_floor: A,
        exact: bool,
    },
    /// SphereFace: φ(c) = (λ·c + (−1)^k·T_m(c) − 2k)/(1 + λ), k = #{j < m : c ≤ cos(jπ/m)}.
    SphereFace {
        m: u32,
        lambda: A,
        thresholds: [A; crate::config::SPHEREFACE_MAX_M as usize],
        exact: bool,
    },
}

impl<A: Acc> Margin<A> {
    pub fn new(head: &Head, grad: MarginGrad) -> Self {
        let exact = grad == MarginGrad::Exact;
        let angular = |m1: f64, m2: f64, m3: f64, easy: bool| Margin::ArcFaceCombined {
            m1: A::of(m1),
            m2: A::of(m2),
            m3: A::of(m3),
            fallback_shift: A::of(m3 + m2 * m2.sin()),
            easy,
            sin_floor: A::of(exact_sin_floor()),
            exact,
        };
        match *head {
            Head::Softmax { .. } | Head::Rbf { .. } => Margin::None,
            Head::CosFace { m, .. } => Margin::CosFace { m: A::of(m) },
            Head::ArcFace { m, easy_margin, .. } => angular(1.0, m, 0.0, easy_margin),
            Head::Combined { m1, m2, m3, .. } => angular(m1, m2, m3, false),
            Head::SphereFace { m, lambda, .. } => {
                let m = m as u32;
                let mut thresholds = [A::zero(); crate::config::SPHEREFACE_MAX_M as usize];
                for (j, t) in thresholds.iter_mut().enumerate().take(m as usize).skip(1) {
                    *t = A::of((j as f64 * std::f64::consts::PI / m as f64).cos());
                }
                Margin::SphereFace {
                    m,
                    lambda: A::of(lambda),
                    thresholds,
                    exact,
                }
            }
        }
    }

    /// This head's margin with one row's (m1, m2, m3) (the per-row margins of
    /// `MarginSoftmaxLoss::loss_with_row_margins`): CosFace's m is m3, ArcFace's m2; the head's
    /// other settings (easy margin, gradient mode) stay. Heads without a margin are unchanged.
    #[inline]
    pub fn for_row(&self, [m1, m2, m3]: [A; 3]) -> Self {
        match *self {
            Margin::CosFace { .. } => Margin::CosFace { m: m3 },
            Margin::ArcFaceCombined {
                easy,
                sin_floor,
                exact,
                ..
            } => Margin::ArcFaceCombined {
                m1,
                m2,
                m3,
                fallback_shift: m3 + m2 * m2.sin(),
                easy,
                sin_floor,
                exact,
            },
            other => other,
        }
    }

    /// (∂u_y/∂m1, ∂u_y/∂m2, ∂u_y/∂m3) at the target's input x, for per-row margins that take a
    /// gradient (MagFace's m(‖f‖)). The same in both gradient modes, which differ only in
    /// du_y/dx. On the angular branch u = cos(m1·θ + m2) − m3: (−θ·sin(m1·θ + m2),
    /// −sin(m1·θ + m2), −1); on the fallback u = c − m3 − m2·sin m2 (InsightFace's
    /// `cos − mm`, mm = sin(π − m)·m, differentiated as MagFace does): (0, −(sin m2 +
    /// m2·cos m2), −1); with the easy margin at c ≤ 0, u = c: 0. CosFace u = c − m: (0, 0, −1).
    #[inline]
    pub fn margin_grads(&self, x: A) -> [A; 3] {
        let (zero, one) = (A::zero(), A::one());
        match *self {
            Margin::CosFace { .. } => [zero, zero, -one],
            Margin::ArcFaceCombined { m1, m2, easy, .. } => {
                let c = clamp(x, -one, one);
                if easy && c <= zero {
                    return [zero; 3];
                }
                let theta = c.acos();
                let angle = m1 * theta + m2;
                if !easy && angle > A::of(std::f64::consts::PI) {
                    return [zero, -(m2.sin() + m2 * m2.cos()), -one];
                }
                let sin_angle = angle.sin();
                [-theta * sin_angle, -sin_angle, -one]
            }
            Margin::None | Margin::SphereFace { .. } => [zero; 3],
        }
    }

    /// (u_y, du_y/dx) for the target's input x.
    #[inline]
    pub fn target<H: Transform<A>>(&self, transform: &H, x: A) -> (A, A) {
        let one = A::one();
        match *self {
            Margin::None => {
                let u = transform.u(x);
                (u, transform.du(x, u))
            }
            Margin::CosFace { m } => (clamp(x, -one, one) - m, inside(x, -one, one)),
            Margin::ArcFaceCombined {
                m1,
                m2,
                m3,
                fallback_shift,
                easy,
                sin_floor,
                exact,
            } => {
                // The same value in both gradient modes (a mode never changes the loss).
                let c = clamp(x, -one, one);
                let pass = inside(x, -one, one);
                if easy && c <= A::zero() {
                    return (c, pass);
                }
                let theta = c.acos();
                let angle = m1 * theta + m2;
                // InsightFace applies no fallback with the easy margin.
                if !easy && angle > A::of(std::f64::consts::PI) {
                    return (c - fallback_shift, pass);
                }
                let value = angle.cos() - m3;
                if !exact {
                    return (value, pass);
                }
                // d cos(m1·θ + m2)/dc = m1·sin(m1·θ + m2)/sin θ, with the denominator bounded
                // below by sin θ_ε (only the derivative: the value above is unclamped).
                let sin_theta = ((one - c) * (one + c)).sqrt();
                let denominator = if sin_theta > sin_floor {
                    sin_theta
                } else {
                    sin_floor
                };
                (value, pass * m1 * angle.sin() / denominator)
            }
            Margin::SphereFace {
                m,
                lambda,
                ref thresholds,
                exact,
            } => {
                let c = clamp(x, -one, one);
                let pass = inside(x, -one, one);
                let k = thresholds[1..m as usize]
                    .iter()
                    .filter(|&&t| c <= t)
                    .count();
                let (t_m, u_m_minus_1) = chebyshev(m, c);
                let sign = if k % 2 == 0 { one } else { -one };
                let psi = sign * t_m - A::of(2.0 * k as f64);
                let value = (lambda * c + psi) / (one + lambda);
                if !exact {
                    return (value, pass);
                }
                let slope = (lambda + sign * A::of(m as f64) * u_m_minus_1) / (one + lambda);
                (value, pass * slope)
            }
        }
    }
}

/// sin θ_ε with cos θ_ε = 1 − [`EXACT_MARGIN_COS_EPS`]: the floor of the exact-mode ArcFace /
/// Combined derivative's denominator sin θ.
pub(crate) fn exact_sin_floor() -> f64 {
    let c = 1.0 - EXACT_MARGIN_COS_EPS;
    ((1.0 - c) * (1.0 + c)).sqrt()
}

/// (T_m(c), U_{m−1}(c)): cos(mθ) and its derivative's factor, d T_m/dc = m·U_{m−1}, without
/// acos, finite at c = ±1.
pub(super) fn chebyshev<A: Acc>(m: u32, c: A) -> (A, A) {
    let two_c = c + c;
    let (mut t_prev, mut t) = (A::one(), c);
    let (mut u_prev, mut u) = (A::zero(), A::one()); // U_{−1} = 0, U_0 = 1
    for _ in 1..m {
        (t_prev, t) = (t, two_c * t - t_prev);
        (u_prev, u) = (u, two_c * u - u_prev);
    }
    (t, u)
}

//! What every backend does on the host before its kernels run, in one place so that every
//! device gives the same answers and the same errors: the value check of the targets, the class
//! weights in the accumulation type, and the factor that the fused paths fold into the gradient
//! for the mean.

use candle_core::{Result, bail};

use crate::config::{MarginSoftmaxLoss, OP_NAME};
use crate::math::Acc;

/// The value check of the targets, shared by every device (the CUDA path reads the targets back
/// to the host and calls this too, so the errors are identical): `None` for a row whose target
/// is `ignore_index`, an `Err` for any other value outside [0, C).
pub(crate) fn validate_targets(
    values: &[i64],
    cfg: &MarginSoftmaxLoss,
    classes: usize,
) -> Result<Vec<Option<usize>>> {
    let name = cfg.head.name();
    values
        .iter()
        .enumerate()
        .map(|(row, &t)| {
            if Some(t) == cfg.ignore_index {
                Ok(None)
            } else if t < 0 || t >= classes as i64 {
                bail!(
                    "{OP_NAME}({name}): target {t} at row {row} is out of range for C = {classes} \
                     classes (ignore_index is {:?})",
                    cfg.ignore_index
                )
            } else {
                Ok(Some(t as usize))
            }
        })
        .collect()
}

/// The class weights in the accumulation type, or `None` (all 1), from the host copy taken when
/// they were set (no device read).
pub(crate) fn read_weights<A: Acc>(cfg: &MarginSoftmaxLoss) -> Option<Vec<A>> {
    cfg.class_weights
        .as_ref()
        .map(|w| w.values().iter().map(|&v| A::of(v)).collect())
}

pub(crate) fn weight_of<A: Acc>(weights: &Option<Vec<A>>, target: usize) -> A {
    weights.as_ref().map_or(A::one(), |w| w[target])
}

/// The factor the fused paths fold into the gradient: 1/Σ_{rows not ignored} w_y for the mean
/// (0 when that sum is 0: an all-ignored batch, or every target on a zero-weight class, whose
/// loss is 0 by the spec), else 1. Shared with the CUDA path, which
/// computes it on the host from the same validated targets and weights.
pub(crate) fn upstream_factor<A: Acc>(
    targets: &[Option<usize>],
    weights: &Option<Vec<A>>,
    mean: bool,
) -> A {
    if !mean {
        return A::one();
    }
    let denominator = targets.iter().fold(A::zero(), |acc, &y| {
        acc + y.map_or(A::zero(), |y| weight_of(weights, y))
    });
    if denominator != A::zero() {
        denominator.recip()
    } else {
        A::zero()
    }
}

/// [`upstream_factor`] for the kernels (the CUDA and emulated backends), which take it as an f64
/// in `MsParams`: the same fold over the same validated targets and weights as on the CPU (the
/// weights read back only where the mean needs them); the round trip through f64 is exact.
#[cfg(any(feature = "cuda", feature = "kernel-emu"))]
pub(crate) fn kernel_upstream<A: Acc>(
    cfg: &MarginSoftmaxLoss,
    targets: &[Option<usize>],
    mean: bool,
) -> Result<f64> {
    let weights = if mean { read_weights::<A>(cfg) } else { None };
    // (The weights come from the host copy taken when they were set: no device read.)
    Ok(<A as candle_core::WithDType>::to_f64(upstream_factor(
        targets, &weights, mean,
    )))
}

/// The PolyLoss coefficients as the kernels take them: in the accumulation type, with one unused
/// element when there are none (so the pointer is valid; `MsParams::n_poly` says how many).
#[cfg(any(feature = "cuda", feature = "kernel-emu"))]
pub(crate) fn kernel_poly<A: Acc>(cfg: &MarginSoftmaxLoss) -> Vec<A> {
    let mut coefficients: Vec<A> = cfg.poly.iter().map(|&e| A::of(e)).collect();
    if coefficients.is_empty() {
        coefficients.push(A::zero());
    }
    coefficients
}

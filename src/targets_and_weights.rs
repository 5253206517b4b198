//! What every backend does on the host before its kernels run, in one place so that every
//! device gives the same answers and the same errors: the value check of the targets, the class
//! weights in the accumulation type, and the factor that the fused paths fold into the gradient
//! for the mean.

use candle_core::Result;

use crate::config::{MarginSoftmaxLoss, OP_NAME};
use crate::math::Acc;

/// The value check of the targets, shared by every device (the CUDA path finds the first invalid
/// row on the GPU and forms the same error with [`target_error`]): `None` for a row whose target is
/// `ignore_index`, an `Err` for any other value outside [0, C).
pub(crate) fn validate_targets(
    values: &[i64],
    cfg: &MarginSoftmaxLoss,
    classes: usize,
) -> Result<Vec<Option<usize>>> {
    values
        .iter()
        .enumerate()
        .map(|(row, &t)| {
            if Some(t) == cfg.ignore_index {
                Ok(None)
            } else if t < 0 || t >= classes as i64 {
                Err(target_error(cfg, t, row, classes))
            } else {
                Ok(Some(t as usize))
            }
        })
        .collect()
}

/// The error for target `value` at `row`, outside [0, C) and not `ignore_index` (the same text
/// on every device: the CUDA path finds the row on the GPU and reads its value back).
pub(crate) fn target_error(
    cfg: &MarginSoftmaxLoss,
    value: i64,
    row: usize,
    classes: usize,
) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "{OP_NAME}({}): target {value} at row {row} is out of range for C = {classes} classes \
         (ignore_index is {:?})",
        cfg.head.name(),
        cfg.ignore_index
    ))
    .bt()
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

/// The factor the fused paths fold into the gradient: 1/Σ_{rows not ignored} w_y (summed in f64)
/// for the mean
/// (0 when that sum is 0: an all-ignored batch, or every target on a zero-weight class, whose
/// loss is 0 by the spec), else 1. The kernels form the same factor on the device
/// (kernels/targets.cu).
pub(crate) fn upstream_factor<A: Acc>(
    targets: &[Option<usize>],
    weights: &Option<Vec<A>>,
    mean: bool,
) -> A {
    if !mean {
        return A::one();
    }
    // In f64 whatever A: f32 weights of a class that many rows target overflow an f32 sum.
    let denominator: f64 = targets
        .iter()
        .flatten()
        .map(|&y| candle_core::WithDType::to_f64(weight_of(weights, y)))
        .sum::<f64>();
    if denominator != 0.0 {
        A::of(denominator.recip())
    } else {
        A::zero()
    }
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

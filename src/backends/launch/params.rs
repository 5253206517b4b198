//! `MsParams`, the launch parameters every CUDA kernel takes by value, mirrored from
//! `kernels/params.cuh` field for field, and filled from the loss configuration with the one Rust
//! definition of the margin ([`Margin`]). Shared by the launch planning (`src/backends/launch/mod.rs`), hence
//! the CUDA and emulated backends, and by the host replay of the kernels' math
//! (`src/backends/kernel_check.rs`); compiled only for those.

#![cfg_attr(not(any(feature = "cuda", feature = "kernel-emu")), allow(dead_code))]

use crate::config::{Head, MarginGrad, MarginSoftmaxLoss, SPHEREFACE_MAX_M};
use crate::math::{Margin, smoothing_total_weight, weighted_smoothing};

/// `MS_MAX_SPHERE_M` of kernels/params.cuh.
pub(crate) const MAX_SPHERE_M: usize = 16;
const _: () = assert!(SPHEREFACE_MAX_M as usize == MAX_SPHERE_M);

/// `MS_TRANSFORM_*` of kernels/params.cuh.
pub(crate) const TRANSFORM_IDENTITY: i32 = 0;
pub(crate) const TRANSFORM_COSINE: i32 = 1;
pub(crate) const TRANSFORM_RBF: i32 = 2;
/// `MS_MARGIN_*` of kernels/params.cuh.
pub(crate) const MARGIN_NONE: i32 = 0;
pub(crate) const MARGIN_COSFACE: i32 = 1;
pub(crate) const MARGIN_ARCFACE_COMBINED: i32 = 2;
pub(crate) const MARGIN_SPHEREFACE: i32 = 3;

/// `struct MsParams` of kernels/params.cuh, field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct MsParams {
    pub rows: i64,
    pub classes: i64,
    pub row_stride: i64,
    pub transform: i32,
    pub margin: i32,
    pub exact: i32,
    pub easy: i32,
    pub sphere_m: i32,
    pub n_poly: i32,
    pub has_weights: i32,
    pub splits: i32,
    pub weighted_smoothing: i32,
    pub softcapped: i32,
    pub scale_grad: i32,
    pub reserved: i32,
    pub neg_inv_gamma: f64,
    pub additive_m: f64,
    pub m1: f64,
    pub m2: f64,
    pub m3: f64,
    pub fallback_shift: f64,
    pub sin_floor: f64,
    pub lambda: f64,
    pub thresholds: [f64; MAX_SPHERE_M],
    pub smoothing: f64,
    pub total_weight: f64,
    pub focal_gamma: f64,
    pub z_loss: f64,
    pub softcap: f64,
    pub inv_softcap: f64,
}

// The C struct: 3 long long, 12 int, 8 double, double[16], 6 double, no padding anywhere.
const _: () = assert!(std::mem::size_of::<MsParams>() == 3 * 8 + 12 * 4 + 8 * 8 + 16 * 8 + 6 * 8);
const _: () = assert!(std::mem::align_of::<MsParams>() == 8);

impl MsParams {
    /// The parameters for `cfg` on a [rows, classes] input whose rows start `row_stride`
    /// elements apart, with `splits` blocks per row in the split forward; `scale_grad`: whether
    /// d(loss)/d(row scale) is wanted (else the kernels write 0 for it). `has_weights` is
    /// `cfg.class_weights.is_some()`; `weighted_smoothing` is [`weighted_smoothing`], and then
    /// `total_weight` is Σ_j w_j (else C), as in [`crate::math::Criterion::new`]; `softcapped`,
    /// `softcap` and `inv_softcap` (1/cap in f64, as [`crate::math::SoftCap`] forms it) come
    /// from `cfg.logit_softcap` (all 0 without capping). The caller checks that the counts fit
    /// the i32 fields.
    pub(crate) fn new(
        cfg: &MarginSoftmaxLoss,
        rows: usize,
        classes: usize,
        row_stride: usize,
        splits: usize,
        scale_grad: bool,
    ) -> Self {
        let (transform, neg_inv_gamma) = match cfg.head {
            Head::Softmax { .. } => (TRANSFORM_IDENTITY, 0.0),
            Head::Rbf { gamma, .. } => (TRANSFORM_RBF, -1.0 / gamma),
            _ => (TRANSFORM_COSINE, 0.0),
        };
        let weighted = weighted_smoothing(cfg);
        let total_weight = smoothing_total_weight(cfg, classes);
        let softcap = cfg.logit_softcap.unwrap_or(0.0);
        let mut p = MsParams {
            rows: rows as i64,
            classes: classes as i64,
            row_stride: row_stride as i64,
            transform,
            margin: MARGIN_NONE,
            exact: i32::from(cfg.margin_grad == MarginGrad::Exact),
            easy: 0,
            sphere_m: 1,
            n_poly: cfg.poly.len() as i32,
            has_weights: i32::from(cfg.class_weights.is_some()),
            splits: splits as i32,
            weighted_smoothing: i32::from(weighted),
            softcapped: i32::from(cfg.logit_softcap.is_some()),
            scale_grad: i32::from(scale_grad),
            reserved: 0,
            neg_inv_gamma,
            additive_m: 0.0,
            m1: 1.0,
            m2: 0.0,
            m3: 0.0,
            fallback_shift: 0.0,
            sin_floor: 0.0,
            lambda: 0.0,
            thresholds: [0.0; MAX_SPHERE_M],
            smoothing: cfg.label_smoothing,
            total_weight,
            focal_gamma: cfg.focal_gamma,
            z_loss: cfg.z_loss,
            softcap,
            inv_softcap: cfg.logit_softcap.map_or(0.0, |cap| 1.0 / cap),
        };
        // The one Rust definition of the margin, in f64; the kernels round to their ACC type
        // (as the CPU path's `Margin::<f32>::new` rounds the same f64 values).
        match Margin::<f64>::new(&cfg.head, cfg.margin_grad) {
            Margin::None => {}
            Margin::CosFace { m } => {
                p.margin = MARGIN_COSFACE;
                p.additive_m = m;
            }
            Margin::ArcFaceCombined {
                m1,
                m2,
                m3,
                fallback_shift,
                easy,
                sin_floor,
                exact,
            } => {
                p.margin = MARGIN_ARCFACE_COMBINED;
                (p.m1, p.m2, p.m3) = (m1, m2, m3);
                p.fallback_shift = fallback_shift;
                p.easy = i32::from(easy);
                p.sin_floor = sin_floor;
                p.exact = i32::from(exact);
            }
            Margin::SphereFace {
                m,
                lambda,
                thresholds,
                exact,
            } => {
                p.margin = MARGIN_SPHEREFACE;
                p.sphere_m = m as i32;
                p.lambda = lambda;
                p.thresholds = thresholds;
                p.exact = i32::from(exact);
            }
        }
        p
    }
}

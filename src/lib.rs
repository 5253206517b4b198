//! Fused margin and kernel softmax cross-entropy losses for candle.
//!
//! One op computes, in a single pass over each row of a \[B, C\] input, the head's transform
//! (a margin on the target's cosine, or a distance → RBF score), the softmax cross-entropy and
//! every criterion option (label smoothing, focal, PolyLoss, z-loss, class weights,
//! `ignore_index`), and saves per-row statistics so that the backward pass reads each row once
//! more and writes the gradient once.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use candle_margin_softmax::{Head, MarginSoftmaxLoss};
//!
//! # fn main() -> candle_core::Result<()> {
//! let cosines = Tensor::new(&[[0.9f32, 0.1, -0.3], [0.2, 0.7, 0.05]], &Device::Cpu)?;
//! let targets = Tensor::new(&[0u32, 1], &Device::Cpu)?;
//! let arcface = MarginSoftmaxLoss::new(Head::arcface()).label_smoothing(0.1);
//! let loss = arcface.loss(&cosines, &targets)?; // scalar f32, differentiable
//! let (loss2, grad) = arcface.loss_and_grad(&cosines, &targets)?; // no autograd
//! assert_eq!(grad.dims(), &[2, 3]);
//! # let _ = (loss, loss2);
//! # Ok(()) }
//! ```
//!
//! See [`Head`] for the heads and [`MarginSoftmaxLoss`] for the options; [`reference`](mod@reference) holds the
//! same losses composed from plain candle ops.

mod backends;
mod config;
mod gradient_handover;
mod heads;
mod layout;
mod loss;
mod math;
mod op;
pub mod reference;
mod row_margins;
mod shard;
mod targets_and_weights;

#[cfg(feature = "kernel-emu")]
pub use backends::emu::kernel_emu;

pub use backends::cpu::simd::{SimdLevel, with_simd_level};
pub use heads::{
    DEFAULT_CHUNK_SCORES, DEFAULT_NORM_EPS, ElasticFace, MagFace, MarginHead, PartialFc,
    SubCenterOutliers,
};
pub use op::one_pass_max_classes;
pub use row_margins::RowMarginGrads;
#[cfg(feature = "nccl")]
pub use shard::NcclCommunicator;
pub use shard::{ClassShard, Communicator, InProcessCommunicator, InProcessGroup};

pub use config::{
    ClassWeights, EXACT_MARGIN_COS_EPS, Head, MarginGrad, MarginSoftmaxLoss, Reduction,
    SPHEREFACE_MAX_M, SphereFaceLambda,
};

#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

//! What both CPU benchmark binaries share: the shapes, dtypes and heads, the seeded inputs, and
//! one closure per measured pass (fused op, `reference`, `candle_nn::loss::cross_entropy`).

// Each bench binary includes this module and uses a different part of it.
#![allow(dead_code)]

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_margin_softmax::{Head, MarginSoftmaxLoss, reference};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// (B, C): a small head, an LLM-vocabulary-sized one, and a face-recognition-sized one.
pub const SHAPES: [(usize, usize); 3] = [(256, 1000), (1024, 32000), (64, 100000)];
pub const DTYPES: [DType; 2] = [DType::F32, DType::BF16];
/// The label smoothing of every head's benchmark (`candle_nn`'s comparison runs without it).
pub const LABEL_SMOOTHING: f64 = 0.1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadKind {
    Softmax,
    ArcFace,
    Rbf,
}

pub const HEADS: [HeadKind; 3] = [HeadKind::Softmax, HeadKind::ArcFace, HeadKind::Rbf];

impl HeadKind {
    pub fn name(self) -> &'static str {
        match self {
            HeadKind::Softmax => "softmax",
            HeadKind::ArcFace => "arcface",
            HeadKind::Rbf => "rbf",
        }
    }

    /// The head with its defaults: softmax s = 1, ArcFace s = 64 / m = 0.5, RBF s = 35 / γ = 16.
    pub fn head(self) -> Head {
        match self {
            HeadKind::Softmax => Head::softmax(),
            HeadKind::ArcFace => Head::arcface(),
            HeadKind::Rbf => Head::rbf(),
        }
    }

    /// The benchmarked configuration: the head with label smoothing 0.1, mean reduction.
    pub fn config(self) -> MarginSoftmaxLoss {
        MarginSoftmaxLoss::new(self.head()).label_smoothing(LABEL_SMOOTHING)
    }
}

pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::F64 => "f64",
        _ => "?",
    }
}

pub fn shape_name((b, c): (usize, usize)) -> String {
    format!("{b}x{c}")
}

/// One benchmark problem: the input [B, C] (as a plain tensor and as a `Var` for autograd) in
/// the benchmarked dtype, and u32 targets [B].
pub struct Problem {
    pub input: Tensor,
    pub var: Var,
    pub targets: Tensor,
}

/// Seeded inputs in each head's natural range: logits ~ U(−4, 4) for softmax, cosines
/// ~ U(−0.5, 0.5) for ArcFace, squared distances ~ U(0, 32) for RBF; targets uniform in [0, C).
pub fn problem(kind: HeadKind, (b, c): (usize, usize), dtype: DType) -> Result<Problem> {
    let dev = Device::Cpu;
    let (lo, hi) = match kind {
        HeadKind::Softmax => (-4.0f32, 4.0f32),
        HeadKind::ArcFace => (-0.5, 0.5),
        HeadKind::Rbf => (0.0, 32.0),
    };
    let mut rng = StdRng::seed_from_u64(0x5eed ^ (b * 1_000_003 + c) as u64);
    let values: Vec<f32> = (0..b * c).map(|_| rng.random_range(lo..hi)).collect();
    let targets: Vec<u32> = (0..b).map(|_| rng.random_range(0..c as u32)).collect();
    let input = Tensor::from_vec(values, (b, c), &dev)?.to_dtype(dtype)?;
    let var = Var::from_tensor(&input)?;
    let targets = Tensor::from_vec(targets, b, &dev)?;
    Ok(Problem {
        input,
        var,
        targets,
    })
}

/// What is measured: a loss implementation and how far the step goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// The fused op's `loss` (forward only).
    FusedFwd,
    /// The fused op's `loss` + `backward()` through candle autograd.
    FusedFwdBwd,
    /// The fused `loss_and_grad` (forward and backward in one call, no autograd).
    FusedLossAndGrad,
    /// `reference::loss` (plain candle ops), forward only.
    ReferenceFwd,
    /// `reference::loss` + `backward()`.
    ReferenceFwdBwd,
    /// `candle_nn::loss::cross_entropy` (softmax head, no label smoothing), forward only.
    CandleNnFwd,
    /// `candle_nn::loss::cross_entropy` + `backward()`.
    CandleNnFwdBwd,
}

impl Pass {
    pub fn name(self) -> &'static str {
        match self {
            Pass::FusedFwd => "fused_fwd",
            Pass::FusedFwdBwd => "fused_fwd_bwd",
            Pass::FusedLossAndGrad => "fused_loss_and_grad",
            Pass::ReferenceFwd => "reference_fwd",
            Pass::ReferenceFwdBwd => "reference_fwd_bwd",
            Pass::CandleNnFwd => "candle_nn_fwd",
            Pass::CandleNnFwdBwd => "candle_nn_fwd_bwd",
        }
    }
}

/// Runs one pass once. The results (loss, gradient) are dropped at the end, inside the call,
/// so that a memory measurement sees the gradient while it is alive.
pub fn run(pass: Pass, cfg: &MarginSoftmaxLoss, p: &Problem) -> Result<()> {
    match pass {
        Pass::FusedFwd => {
            std::hint::black_box(cfg.loss(&p.input, &p.targets)?);
        }
        Pass::FusedFwdBwd => {
            let loss = cfg.loss(p.var.as_tensor(), &p.targets)?;
            let grads = loss.backward()?;
            std::hint::black_box(grads.get(p.var.as_tensor()).expect("gradient"));
        }
        Pass::FusedLossAndGrad => {
            std::hint::black_box(cfg.loss_and_grad(&p.input, &p.targets)?);
        }
        Pass::ReferenceFwd => {
            std::hint::black_box(reference::loss(cfg, &p.input, &p.targets)?);
        }
        Pass::ReferenceFwdBwd => {
            let loss = reference::loss(cfg, p.var.as_tensor(), &p.targets)?;
            let grads = loss.backward()?;
            std::hint::black_box(grads.get(p.var.as_tensor()).expect("gradient"));
        }
        Pass::CandleNnFwd => {
            std::hint::black_box(candle_nn::loss::cross_entropy(&p.input, &p.targets)?);
        }
        Pass::CandleNnFwdBwd => {
            let loss = candle_nn::loss::cross_entropy(p.var.as_tensor(), &p.targets)?;
            let grads = loss.backward()?;
            std::hint::black_box(grads.get(p.var.as_tensor()).expect("gradient"));
        }
    }
    Ok(())
}

/// The plain softmax head without label smoothing (s = 1): the same loss as
/// `candle_nn::loss::cross_entropy` on the same logits, for the comparison with it.
pub fn softmax_no_smoothing() -> MarginSoftmaxLoss {
    MarginSoftmaxLoss::new(Head::softmax())
}

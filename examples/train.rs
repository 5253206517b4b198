//! Trains a small MLP embedding once per head of the fused loss (softmax, CosFace, ArcFace,
//! combined margin, SphereFace, RBF-Softmax) on a synthetic data set that a linear classifier
//! does not separate, and prints train / test accuracy and the time per training step.
//!
//! ```text
//! cargo run --release --example train
//! ```
//!
//! The data: 12 classes in 32-d, each class a mixture of 3 Gaussian blobs placed in an 8-d latent
//! space (blobs of different classes interleave and overlap), pushed through a fixed random
//! nonlinear warp (2·tanh of a random projection, plus a small linear part) and 32-d noise;
//! 500 train and 100 test rows per class. A linear softmax classifier on the raw inputs is
//! trained first as a baseline. Everything is generated from fixed seeds (data, initial weights,
//! batch order), so the losses and accuracies printed are the same on every run; only the
//! timings vary.
//!
//! The model: a 32 → 64 → 64 → 16 MLP (GELU) gives an embedding f; a [`MarginHead`] owning the
//! class centres W [K, 16] (a seeded `Var`) forms the head's input from it and computes the loss,
//! back-propagating into f and W:
//! - softmax: logits f·Wᵀ + b, s = 1;
//! - CosFace, ArcFace, Combined: cos θ = f̂·Ŵᵀ (rows L2-normalized) with the papers' defaults
//!   (s = 64; m = 0.35, m = 0.5, (m1, m2, m3) = (1, 0.3, 0.2));
//! - SphereFace: the same cosines, m = 4, with the per-row scale r_i = ‖f_i‖ of the original
//!   A-Softmax (`MarginHead::feature_norm_scale`), and the official λ schedule
//!   λ(it) = max(5, 1000·(1 + γ·it)^−1) run about 4× faster (γ = 0.5 instead of 0.12), so that λ
//!   reaches its floor of 5 at step ~400 of this short run (1410 steps) instead of ~1660;
//! - RBF: squared distances d² = ‖f̂‖² + ‖W_j‖² − 2·f̂·W_jᵀ from the normalized embedding f̂ (the
//!   network's last step here; the head takes whatever embedding it is given),
//!   with s = 16, γ = 1 (the paper's defaults s = 35, γ = 16 are meant for unnormalized
//!   high-dimensional features, whose squared distances are far larger than here);
//! - MagFace: ArcFace (s = 64, the easy margin) with each row's margin m(‖f‖) from 0.45 to 0.8
//!   and the regulariser λ_g = 35, the official hyper-parameters but the norm range
//!   [l_a, u_a] = [1, 11] in place of [10, 110] (this embedding is 16-d, not 512-d);
//! - ElasticFace: ElasticArcFace, margins drawn from N(0.5, 0.05) per row and step.
//!
//! Optimizer: AdamW (lr 3e-3, weight decay 1e-4) with a cosine learning-rate decay to 5%,
//! batches of 128, 30 epochs. Accuracy is that of `MarginHead::predict`: the argmax over classes
//! of the logits without any margin. The time per step covers the forward pass, the loss,
//! the backward pass and the optimizer update.

use std::time::Instant;

use anyhow::Result;
use candle_core::{D, DType, Device, Module, Tensor, Var};
use candle_margin_softmax::{
    ElasticFace, Head, MagFace, MarginHead, MarginSoftmaxLoss, SphereFaceLambda,
};
use candle_nn::{AdamW, Linear, Optimizer, ParamsAdamW};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

const SEED: u64 = 20_240_611;
const CLASSES: usize = 12;
const BLOBS_PER_CLASS: usize = 3;
const LATENT_DIM: usize = 8;
const IN_DIM: usize = 32;
const HIDDEN: usize = 64;
const EMBED_DIM: usize = 16;
const TRAIN_PER_CLASS: usize = 500;
const TEST_PER_CLASS: usize = 100;
const EPOCHS: usize = 30;
const BATCH: usize = 128;
const REPORT_EVERY: usize = 10;

/// A labelled set: inputs [N, IN_DIM] f32, targets [N] u32.
struct Split {
    x: Tensor,
    y: Tensor,
    len: usize,
}

/// The synthetic data set (see the module docs), split into train and test.
fn make_data(rng: &mut StdRng, dev: &Device) -> Result<(Split, Split)> {
    let normal = Normal::new(0.0f32, 1.0)?;
    let gauss = |rng: &mut StdRng, scale: f32| normal.sample(rng) * scale;

    // Blob centres in the latent space: spread wide enough that blobs are distinct, close enough
    // that neighbouring blobs (often of different classes) overlap.
    let centres: Vec<Vec<f32>> = (0..CLASSES * BLOBS_PER_CLASS)
        .map(|_| (0..LATENT_DIM).map(|_| gauss(rng, 1.8)).collect())
        .collect();
    // The warp latent (8) → input (32): x = tanh(A·z + a) ⊙ 2 + B·z / 4 + noise.
    let a: Vec<f32> = (0..IN_DIM * LATENT_DIM)
        .map(|_| gauss(rng, 1.0 / (LATENT_DIM as f32).sqrt() * 1.5))
        .collect();
    let a_bias: Vec<f32> = (0..IN_DIM).map(|_| gauss(rng, 0.5)).collect();
    let b: Vec<f32> = (0..IN_DIM * LATENT_DIM)
        .map(|_| gauss(rng, 1.0 / (LATENT_DIM as f32).sqrt()))
        .collect();

    let sample = |rng: &mut StdRng, per_class: usize| -> Result<Split> {
        let n = CLASSES * per_class;
        let mut xs = Vec::with_capacity(n * IN_DIM);
        let mut ys = Vec::with_capacity(n);
        for class in 0..CLASSES {
            for _ in 0..per_class {
                let blob = class * BLOBS_PER_CLASS + rng.random_range(0..BLOBS_PER_CLASS);
                let z: Vec<f32> = centres[blob].iter().map(|&c| c + gauss(rng, 1.0)).collect();
                for i in 0..IN_DIM {
                    let row = &a[i * LATENT_DIM..(i + 1) * LATENT_DIM];
                    let lin = &b[i * LATENT_DIM..(i + 1) * LATENT_DIM];
                    let pre: f32 = row.iter().zip(&z).map(|(w, z)| w * z).sum::<f32>() + a_bias[i];
                    let linear: f32 = lin.iter().zip(&z).map(|(w, z)| w * z).sum();
                    xs.push(2.0 * pre.tanh() + 0.25 * linear + gauss(rng, 0.3));
                }
                ys.push(class as u32);
            }
        }
        Ok(Split {
            x: Tensor::from_vec(xs, (n, IN_DIM), dev)?,
            y: Tensor::from_vec(ys, n, dev)?,
            len: n,
        })
    };
    let train = sample(rng, TRAIN_PER_CLASS)?;
    let test = sample(rng, TEST_PER_CLASS)?;
    Ok((train, test))
}

/// A `Var` of the given shape, uniform in ±bound, from the seeded generator (candle-nn's own
/// initialisers draw from an unseeded thread RNG).
fn uniform_var(rng: &mut StdRng, shape: (usize, usize), bound: f32, dev: &Device) -> Result<Var> {
    let data: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| rng.random_range(-bound..bound))
        .collect();
    Ok(Var::from_tensor(&Tensor::from_vec(data, shape, dev)?)?)
}

/// A linear layer with PyTorch's default initialisation (uniform ±1/√fan_in), seeded.
fn linear(
    rng: &mut StdRng,
    fan_in: usize,
    fan_out: usize,
    vars: &mut Vec<Var>,
    dev: &Device,
) -> Result<Linear> {
    let bound = 1.0 / (fan_in as f32).sqrt();
    let w = uniform_var(rng, (fan_out, fan_in), bound, dev)?;
    let b = uniform_var(rng, (1, fan_out), bound, dev)?;
    let layer = Linear::new(w.as_tensor().clone(), Some(b.as_tensor().flatten_all()?));
    vars.push(w);
    vars.push(b);
    Ok(layer)
}

/// The embedding network: IN_DIM → HIDDEN → HIDDEN → EMBED_DIM with GELU.
struct Mlp {
    layers: Vec<Linear>,
}

impl Mlp {
    fn new(rng: &mut StdRng, vars: &mut Vec<Var>, dev: &Device) -> Result<Self> {
        let dims = [IN_DIM, HIDDEN, HIDDEN, EMBED_DIM];
        let layers = dims
            .windows(2)
            .map(|w| linear(rng, w[0], w[1], vars, dev))
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h)?;
            if i + 1 < self.layers.len() {
                h = h.gelu_erf()?;
            }
        }
        Ok(h)
    }
}

/// Rows scaled to unit L2 norm: the RBF run's embedding layer (see the module docs).
fn normalize_rows(t: &Tensor) -> Result<Tensor> {
    let norms = (t.sqr()?.sum_keepdim(1)? + 1e-12)?.sqrt()?;
    Ok(t.broadcast_div(&norms)?)
}

/// One training run: a head, its options, and the optimiser settings.
struct Run {
    head: Head,
    /// SphereFace: the per-row scale r_i = ‖f_i‖ of the original A-Softmax.
    feature_norm: bool,
    /// RBF: the embedding is L2-normalized before the head.
    unit_embedding: bool,
    lr: f64,
    /// SphereFace's λ schedule, applied per optimiser step.
    lambda: Option<SphereFaceLambda>,
    /// An adaptive head on top of ArcFace / CosFace.
    adaptive: Adaptive,
}

/// The adaptive heads the example trains besides the fixed-margin ones.
#[derive(Clone, Copy)]
enum Adaptive {
    None,
    MagFace(MagFace),
    Elastic(ElasticFace),
}

impl Run {
    /// The run's name in the log and the table.
    fn name(&self) -> &'static str {
        match self.adaptive {
            Adaptive::None => self.head.name(),
            Adaptive::MagFace(_) => "magface",
            Adaptive::Elastic(_) => "elastic",
        }
    }
}

impl Run {
    /// The hyper-parameters, for the log.
    fn describe(&self) -> String {
        let input = match self.head {
            Head::Softmax { .. } => "on logits f·Wᵀ + b",
            Head::Rbf { .. } => "on d² = ‖f̂ − W_j‖²",
            _ if self.feature_norm => "on cos θ = f̂·Ŵᵀ, per-row scale r_i = ‖f_i‖",
            _ => "on cos θ = f̂·Ŵᵀ",
        };
        let head = match self.head {
            Head::Softmax { s } => format!("s = {s}"),
            Head::CosFace { s, m } => format!("s = {s}, m = {m}"),
            Head::ArcFace { s, m, easy_margin } => {
                format!("s = {s}, m = {m}, easy_margin = {easy_margin}")
            }
            Head::Combined { s, m1, m2, m3 } => {
                format!("s = {s}, (m1, m2, m3) = ({m1}, {m2}, {m3})")
            }
            Head::SphereFace { m, lambda, .. } => match self.lambda {
                Some(l) => format!(
                    "m = {m}, λ(it) = max({}, {}·(1 + {}·it)^−{})",
                    l.lambda_min, l.base, l.gamma, l.power
                ),
                None => format!("m = {m}, λ = {lambda}"),
            },
            Head::Rbf { s, gamma } => format!("s = {s}, γ = {gamma}"),
        };
        format!("{head} {input}")
    }

    fn head_at(&self, step: u64) -> Head {
        match (self.head, self.lambda) {
            (Head::SphereFace { s, m, .. }, Some(schedule)) => Head::SphereFace {
                s,
                m,
                lambda: schedule.at(step),
            },
            (head, _) => head,
        }
    }

    /// The embedding the head reads.
    fn embed(&self, mlp: &Mlp, x: &Tensor) -> Result<Tensor> {
        let f = mlp.forward(x)?;
        if self.unit_embedding {
            normalize_rows(&f)
        } else {
            Ok(f)
        }
    }
}

/// The fraction of rows whose highest-scoring class is the target.
fn accuracy(scores: &Tensor, y: &Tensor) -> Result<f32> {
    let pred = scores.argmax(D::Minus1)?;
    Ok(pred
        .eq(y)?
        .to_dtype(DType::F32)?
        .mean_all()?
        .to_scalar::<f32>()?)
}

struct Outcome {
    train_acc: f32,
    test_acc: f32,
    ms_per_step: f64,
}

/// Accuracy of the head's prediction (the arg-max of its logits without margin).
fn evaluate(mlp: &Mlp, head: &MarginHead, run: &Run, split: &Split) -> Result<f32> {
    let pred = head.predict(&run.embed(mlp, &split.x)?)?;
    Ok(pred
        .eq(&split.y)?
        .to_dtype(DType::F32)?
        .mean_all()?
        .to_scalar::<f32>()?)
}

fn train(run: &Run, train: &Split, test: &Split, seed: u64, dev: &Device) -> Result<Outcome> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut vars = Vec::new();
    let mlp = Mlp::new(&mut rng, &mut vars, dev)?;
    let w = uniform_var(
        &mut rng,
        (CLASSES, EMBED_DIM),
        1.0 / (EMBED_DIM as f32).sqrt(),
        dev,
    )?;
    vars.push(w.clone());
    let b = if matches!(run.head, Head::Softmax { .. }) {
        let b = Var::zeros(CLASSES, DType::F32, dev)?;
        vars.push(b.clone());
        Some(b.as_tensor().clone())
    } else {
        None
    };
    // The head owns W (and the bias) and does the normalization, the d² expansion or the linear
    // layer itself; W is a seeded `Var` here so that every run is reproducible.
    let mut head = MarginHead::from_weight(
        MarginSoftmaxLoss::new(run.head_at(0)),
        w.as_tensor().clone(),
        b,
    )?
    .feature_norm_scale(run.feature_norm)?;
    head = match run.adaptive {
        Adaptive::None => head,
        Adaptive::MagFace(m) => head.magface(m)?,
        Adaptive::Elastic(e) => head.elastic(e)?,
    };
    let params = ParamsAdamW {
        lr: run.lr,
        weight_decay: 1e-4,
        ..Default::default()
    };
    let mut opt = AdamW::new(vars, params)?;

    let name = run.name();
    let mut order: Vec<u32> = (0..train.len as u32).collect();
    let steps_per_epoch = train.len.div_ceil(BATCH);
    let total_steps = (EPOCHS * steps_per_epoch) as u64;
    let mut step = 0u64;
    let mut step_time = 0.0f64;
    for epoch in 1..=EPOCHS {
        order.shuffle(&mut rng);
        let mut epoch_loss = 0.0f64;
        for chunk in order.chunks(BATCH) {
            // Cosine decay of the learning rate to 5% over the run.
            let progress = step as f64 / total_steps as f64;
            opt.set_learning_rate(
                run.lr * (0.05 + 0.95 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())),
            );
            let idx = Tensor::from_slice(chunk, chunk.len(), dev)?;
            let x = train.x.index_select(&idx, 0)?;
            let y = train.y.index_select(&idx, 0)?;

            let start = Instant::now();
            head.set_config(MarginSoftmaxLoss::new(run.head_at(step)))?;
            let loss = head.loss(&run.embed(&mlp, &x)?, &y)?;
            opt.backward_step(&loss)?;
            step_time += start.elapsed().as_secs_f64();

            epoch_loss += loss.to_scalar::<f32>()? as f64;
            step += 1;
        }
        if epoch % REPORT_EVERY == 0 || epoch == 1 {
            let test_acc = evaluate(&mlp, &head, run, test)?;
            let lambda = match run.head_at(step) {
                Head::SphereFace { lambda, .. } => format!("  lambda {lambda:7.2}"),
                _ => String::new(),
            };
            println!(
                "[{name:>10}] epoch {epoch:>3}/{EPOCHS}  loss {:8.4}  test acc {:5.1}%{lambda}",
                epoch_loss / steps_per_epoch as f64,
                100.0 * test_acc
            );
        }
    }
    Ok(Outcome {
        train_acc: evaluate(&mlp, &head, run, train)?,
        test_acc: evaluate(&mlp, &head, run, test)?,
        ms_per_step: 1e3 * step_time / step as f64,
    })
}

/// A linear softmax classifier on the raw inputs, to show the data is not linearly separable.
fn linear_baseline(train: &Split, test: &Split, dev: &Device) -> Result<(f32, f32)> {
    let mut rng = StdRng::seed_from_u64(SEED + 100);
    let mut vars = Vec::new();
    let layer = linear(&mut rng, IN_DIM, CLASSES, &mut vars, dev)?;
    let mut opt = AdamW::new(
        vars,
        ParamsAdamW {
            lr: 1e-2,
            weight_decay: 1e-4,
            ..Default::default()
        },
    )?;
    let cfg = MarginSoftmaxLoss::new(Head::softmax());
    let mut order: Vec<u32> = (0..train.len as u32).collect();
    for _ in 0..EPOCHS {
        order.shuffle(&mut rng);
        for chunk in order.chunks(BATCH) {
            let idx = Tensor::from_slice(chunk, chunk.len(), dev)?;
            let x = train.x.index_select(&idx, 0)?;
            let y = train.y.index_select(&idx, 0)?;
            let loss = cfg.loss(&layer.forward(&x)?, &y)?;
            opt.backward_step(&loss)?;
        }
    }
    Ok((
        accuracy(&layer.forward(&train.x)?, &train.y)?,
        accuracy(&layer.forward(&test.x)?, &test.y)?,
    ))
}

fn main() -> Result<()> {
    let started = Instant::now();
    let dev = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(SEED);
    let (train_set, test_set) = make_data(&mut rng, &dev)?;
    println!(
        "data: {CLASSES} classes x {BLOBS_PER_CLASS} blobs, {IN_DIM}-d; {} train / {} test rows; \
         MLP {IN_DIM}-{HIDDEN}-{HIDDEN}-{EMBED_DIM} (GELU); AdamW, batch {BATCH}, {EPOCHS} epochs, \
         cosine lr decay",
        train_set.len, test_set.len
    );

    let sphereface_lambda = SphereFaceLambda {
        gamma: 0.5,
        ..SphereFaceLambda::default()
    };
    let runs = [
        Run {
            head: Head::softmax(),
            feature_norm: false,
            unit_embedding: false,
            lr: 3e-3,
            lambda: None,
            adaptive: Adaptive::None,
        },
        Run {
            head: Head::cosface(),
            feature_norm: false,
            unit_embedding: false,
            lr: 3e-3,
            lambda: None,
            adaptive: Adaptive::None,
        },
        Run {
            head: Head::arcface(),
            feature_norm: false,
            unit_embedding: false,
            lr: 3e-3,
            lambda: None,
            adaptive: Adaptive::None,
        },
        Run {
            head: Head::combined(),
            feature_norm: false,
            unit_embedding: false,
            lr: 3e-3,
            lambda: None,
            adaptive: Adaptive::None,
        },
        Run {
            // `s` is unused: the per-row scale r_i = ‖f_i‖ replaces it.
            head: Head::sphereface(0.0),
            feature_norm: true,
            unit_embedding: false,
            lr: 3e-3,
            lambda: Some(sphereface_lambda),
            adaptive: Adaptive::None,
        },
        Run {
            head: Head::Rbf {
                s: 16.0,
                gamma: 1.0,
            },
            feature_norm: false,
            unit_embedding: true,
            lr: 3e-3,
            lambda: None,
            adaptive: Adaptive::None,
        },
        Run {
            // MagFace's official head (s = 64, the easy margin) and hyper-parameters, with the
            // norm range scaled to this small embedding (l_a = 1, u_a = 11).
            head: MagFace::head(),
            feature_norm: false,
            unit_embedding: false,
            lr: 3e-3,
            lambda: None,
            adaptive: Adaptive::MagFace(MagFace {
                l_a: 1.0,
                u_a: 11.0,
                ..MagFace::default()
            }),
        },
        Run {
            head: ElasticFace::arcface_head(),
            feature_norm: false,
            unit_embedding: false,
            lr: 3e-3,
            lambda: None,
            adaptive: Adaptive::Elastic(ElasticFace {
                seed: SEED,
                ..ElasticFace::default()
            }),
        },
    ];

    let (lin_train, lin_test) = linear_baseline(&train_set, &test_set, &dev)?;
    println!(
        "baseline: linear softmax classifier on the raw inputs: train {:.1}%, test {:.1}%\n",
        100.0 * lin_train,
        100.0 * lin_test
    );

    let mut rows = Vec::new();
    for (i, run) in runs.iter().enumerate() {
        println!(
            "[{:>10}] {}; AdamW lr {}",
            run.name(),
            run.describe(),
            run.lr
        );
        let outcome = train(run, &train_set, &test_set, SEED + 1 + i as u64, &dev)?;
        rows.push((run.name(), outcome));
    }

    println!("\n| head       | train acc | test acc | ms/step |");
    println!("|------------|-----------|----------|---------|");
    for (name, o) in &rows {
        println!(
            "| {name:<10} | {:>8.1}% | {:>7.1}% | {:>7.3} |",
            100.0 * o.train_acc,
            100.0 * o.test_acc,
            o.ms_per_step
        );
    }
    println!(
        "\nchance: {:.1}%; total wall time {:.1} s",
        100.0 / CLASSES as f64,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

//! Pictures of the feature space each head learns, in the manner of the 2-D / 3-D toy figures of
//! the SphereFace, CosFace, ArcFace and RBF-Softmax papers.
//!
//! ```text
//! cargo run --release --example features
//! ```
//!
//! A small MLP (16 → 64 → 64 → D, GELU) maps a synthetic 8-class data set to D-dimensional
//! embeddings, and a [`MarginHead`] on top of it is trained jointly with the MLP, once per head.
//! Afterwards the test set is embedded and drawn, one dot per test point coloured by its class,
//! with the class centres (the rows of W) as lines from the origin:
//!
//! - `docs/features/<head>.png`, D = 2, every head. The cosine heads get two panels: the raw
//!   embeddings f (left) and the normalized ones f/‖f‖ on the unit circle (right), which is what
//!   the loss actually sees; their W rows are drawn normalized. Softmax and RBF get one panel
//!   (raw f; for RBF the W rows are the centres the distances are measured to, drawn as rings).
//! - `docs/features/<head>_sphere.png`, D = 3, the cosine heads: the normalized embeddings on the
//!   unit sphere in an orthographic projection; points and centres on the far side are drawn
//!   faded.
//!
//! No text is drawn (plotters is built without font support, so that it needs no system
//! library); the class colours are the same in every picture.
//!
//! The data: 8 classes in 16-d, each a Gaussian blob (σ = 1) around a random centre (σ = 1.3 per
//! coordinate), so neighbouring classes overlap a little; 300 train and 100 test rows per class.
//! Everything is seeded (data, initial weights, batch order), so the pictures and accuracies are
//! the same on every run; only the timings vary. Optimizer: AdamW (lr 1e-2, weight decay 1e-4)
//! with a cosine decay of the learning rate to 5%, batches of 128, 40 epochs. The accuracy
//! printed is the arg-max of the head's logits without margin ([`MarginHead::predict`]).
//!
//! The heads' settings are *not* the papers' defaults (s = 64 and m = 0.35–0.5, tuned for 512-d
//! embeddings and thousands of identities): with only 2 or 3 dimensions the classes must share
//! the circle (8 classes leave 45° each), and a large scale with a large margin asks for more
//! angular room than there is, so training stalls with classes collapsed onto each other. The
//! papers' own 2-D figures use a handful of classes and smaller margins; here s = 10 with
//! margins of about a third of the defaults, see `runs()`.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_margin_softmax::{Head, MarginHead, MarginSoftmaxLoss, SphereFaceLambda};
use candle_nn::{AdamW, Linear, Optimizer, ParamsAdamW};
use plotters::coord::types::RangedCoordf32;
use plotters::prelude::*;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

const SEED: u64 = 20_240_612;
const CLASSES: usize = 8;
const IN_DIM: usize = 16;
const HIDDEN: usize = 64;
const TRAIN_PER_CLASS: usize = 300;
const TEST_PER_CLASS: usize = 100;
const EPOCHS: usize = 40;
const BATCH: usize = 128;
const LR: f64 = 1e-2;
/// Side of one panel, in pixels.
const PANEL: u32 = 480;
const OUT_DIR: &str = "docs/features";

/// One colour per class (matplotlib's "tab10", first 8).
const PALETTE: [RGBColor; CLASSES] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

/// A labelled set: inputs [N, IN_DIM] f32, targets [N] u32 (also kept on the host for plotting).
struct Split {
    x: Tensor,
    y: Tensor,
    labels: Vec<u32>,
}

/// The synthetic data set (see the module docs): (train, test).
fn make_data(rng: &mut StdRng, dev: &Device) -> Result<(Split, Split)> {
    let normal = Normal::new(0.0f32, 1.0)?;
    let centres: Vec<Vec<f32>> = (0..CLASSES)
        .map(|_| (0..IN_DIM).map(|_| 1.3 * normal.sample(rng)).collect())
        .collect();
    let mut sample = |per_class: usize| -> Result<Split> {
        let n = CLASSES * per_class;
        let mut xs = Vec::with_capacity(n * IN_DIM);
        let mut labels = Vec::with_capacity(n);
        for (class, centre) in centres.iter().enumerate() {
            for _ in 0..per_class {
                xs.extend(centre.iter().map(|c| c + normal.sample(rng)));
                labels.push(class as u32);
            }
        }
        Ok(Split {
            x: Tensor::from_vec(xs, (n, IN_DIM), dev)?,
            y: Tensor::from_slice(&labels, n, dev)?,
            labels,
        })
    };
    let train = sample(TRAIN_PER_CLASS)?;
    let test = sample(TEST_PER_CLASS)?;
    Ok((train, test))
}

/// A `Var` uniform in ±bound from the seeded generator (candle-nn's initialisers, and so
/// `MarginHead::new` with a `VarBuilder`, draw from an unseeded RNG).
fn uniform_var(rng: &mut StdRng, shape: (usize, usize), bound: f32, dev: &Device) -> Result<Var> {
    let data: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| rng.random_range(-bound..bound))
        .collect();
    Ok(Var::from_tensor(&Tensor::from_vec(data, shape, dev)?)?)
}

/// The embedding network IN_DIM → HIDDEN → HIDDEN → dim (GELU), PyTorch's default init, seeded.
struct Mlp {
    layers: Vec<Linear>,
}

impl Mlp {
    fn new(rng: &mut StdRng, dim: usize, vars: &mut Vec<Var>, dev: &Device) -> Result<Self> {
        let mut layers = Vec::new();
        for w in [IN_DIM, HIDDEN, HIDDEN, dim].windows(2) {
            let bound = 1.0 / (w[0] as f32).sqrt();
            let weight = uniform_var(rng, (w[1], w[0]), bound, dev)?;
            let bias = uniform_var(rng, (1, w[1]), bound, dev)?;
            layers.push(Linear::new(
                weight.as_tensor().clone(),
                Some(bias.as_tensor().flatten_all()?),
            ));
            vars.extend([weight, bias]);
        }
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

/// One head to train and draw.
struct Run {
    name: &'static str,
    head: Head,
    /// SphereFace's λ annealing, applied per optimizer step.
    lambda: Option<SphereFaceLambda>,
    /// The original A-Softmax: the row scale is ‖f_i‖ instead of a fixed s.
    feature_norm: bool,
}

impl Run {
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

    fn is_cosine(&self) -> bool {
        self.head.takes_cosine()
    }
}

/// The heads and their 2-D / 3-D settings (see the module docs for why not the defaults).
fn runs() -> Vec<Run> {
    vec![
        // Plain softmax on f·Wᵀ + b: the classic radial "petals", separable but with no margin.
        Run {
            name: "softmax",
            head: Head::softmax(),
            lambda: None,
            feature_norm: false,
        },
        // s = 10 keeps the cosine logits trainable with 45° per class; m = 0.2 is a cosine gap
        // a 2-D embedding can afford (the default 0.35 nearly fills the space between
        // neighbouring centres, cos 45° ≈ 0.71).
        Run {
            name: "cosface",
            head: Head::CosFace { s: 10.0, m: 0.2 },
            lambda: None,
            feature_norm: false,
        },
        // An angular margin of 0.25 rad (14°) leaves each class an arc of 45° − 2·14° on the
        // circle; the default 0.5 rad (29°) would need more than the 45° each class has.
        Run {
            name: "arcface",
            head: Head::ArcFace {
                s: 10.0,
                m: 0.25,
                easy_margin: false,
            },
            lambda: None,
            feature_norm: false,
        },
        // The three margins at roughly half their InsightFace defaults (0.3, 0.2), for the
        // same reason.
        Run {
            name: "combined",
            head: Head::Combined {
                s: 10.0,
                m1: 1.0,
                m2: 0.15,
                m3: 0.1,
            },
            lambda: None,
            feature_norm: false,
        },
        // A-Softmax as in the paper's figures: m = 4 with the feature norm as the scale (s is
        // unused) and λ annealed from 1000 (plain softmax) to a floor of 5 within the first
        // ~20% of the 2400 steps (the official γ = 0.12 is for much longer runs).
        Run {
            name: "sphereface",
            head: Head::sphereface(0.0),
            lambda: Some(SphereFaceLambda {
                base: 1000.0,
                gamma: 0.5,
                power: 1.0,
                lambda_min: 5.0,
            }),
            feature_norm: true,
        },
        // RBF on the raw 2-D features: γ = 2 (the paper's γ = 16 and s = 35 are for
        // high-dimensional features whose squared distances are far larger than here).
        Run {
            name: "rbf",
            head: Head::Rbf {
                s: 10.0,
                gamma: 2.0,
            },
            lambda: None,
            feature_norm: false,
        },
    ]
}

/// What a training run leaves for plotting.
struct Trained {
    /// Test embeddings, one row per point.
    features: Vec<Vec<f32>>,
    /// W, one row per class.
    centres: Vec<Vec<f32>>,
    accuracy: f32,
    seconds: f64,
}

/// Trains the MLP and the head jointly with `dim`-dimensional embeddings.
fn train(run: &Run, dim: usize, data: &(Split, Split), seed: u64, dev: &Device) -> Result<Trained> {
    let started = Instant::now();
    let (train, test) = data;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut vars = Vec::new();
    let mlp = Mlp::new(&mut rng, dim, &mut vars, dev)?;
    // W [CLASSES, dim], and a bias for softmax, as trainable variables of our own so that the
    // head can be rebuilt around them each step (SphereFace's λ changes every step).
    let w = uniform_var(&mut rng, (CLASSES, dim), 1.0 / (dim as f32).sqrt(), dev)?;
    vars.push(w.clone());
    let bias = if matches!(run.head, Head::Softmax { .. }) {
        let b = Var::zeros(CLASSES, DType::F32, dev)?;
        vars.push(b.clone());
        Some(b)
    } else {
        None
    };
    let head_at = |step: u64| -> Result<MarginHead> {
        let head = MarginHead::from_weight(
            MarginSoftmaxLoss::new(run.head_at(step)),
            w.as_tensor().clone(),
            bias.as_ref().map(|b| b.as_tensor().clone()),
        )?;
        Ok(head.feature_norm_scale(run.feature_norm)?)
    };
    let mut opt = AdamW::new(
        vars,
        ParamsAdamW {
            lr: LR,
            weight_decay: 1e-4,
            ..Default::default()
        },
    )?;

    let mut order: Vec<u32> = (0..train.labels.len() as u32).collect();
    let total_steps = (EPOCHS * order.len().div_ceil(BATCH)) as f64;
    let mut step = 0u64;
    for _ in 0..EPOCHS {
        order.shuffle(&mut rng);
        for chunk in order.chunks(BATCH) {
            let progress = step as f64 / total_steps;
            let decay = 0.05 + 0.95 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
            opt.set_learning_rate(LR * decay);
            let idx = Tensor::from_slice(chunk, chunk.len(), dev)?;
            let x = train.x.index_select(&idx, 0)?;
            let y = train.y.index_select(&idx, 0)?;
            let loss = head_at(step)?.loss(&mlp.forward(&x)?, &y)?;
            opt.backward_step(&loss)?;
            step += 1;
        }
    }

    let head = head_at(step)?;
    let f = mlp.forward(&test.x)?;
    let accuracy = head
        .predict(&f)?
        .eq(&test.y)?
        .to_dtype(DType::F32)?
        .mean_all()?
        .to_scalar::<f32>()?;
    Ok(Trained {
        features: f.to_vec2()?,
        centres: w.as_tensor().to_vec2()?,
        accuracy,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn unit(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter().map(|x| x / norm).collect()
}

/// `c` mixed with white: t = 0 keeps it, t = 1 gives white.
fn faded(c: RGBColor, t: f32) -> RGBColor {
    let mix = |v: u8| (v as f32 + (255.0 - v as f32) * t).round() as u8;
    RGBColor(mix(c.0), mix(c.1), mix(c.2))
}

type Panel<'a> = ChartContext<'a, BitMapBackend<'a>, Cartesian2d<RangedCoordf32, RangedCoordf32>>;

/// A square panel covering [−r, r]² with faint axes (no labels: no fonts).
fn panel<'a>(
    area: &DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>,
    r: f32,
) -> Result<Panel<'a>> {
    let chart = ChartBuilder::on(area)
        .margin(8)
        .build_cartesian_2d(-r..r, -r..r)?;
    let axis = RGBColor(220, 220, 220);
    for line in [[(-r, 0.0), (r, 0.0)], [(0.0, -r), (0.0, r)]] {
        chart.plotting_area().draw(&PathElement::new(line, axis))?;
    }
    Ok(chart)
}

/// Dots for the points (x, y, class) and lines from the origin to the centres (x, y, class).
fn draw_2d(
    chart: &mut Panel,
    points: &[(f32, f32, u32)],
    centres: &[(f32, f32, u32)],
) -> Result<()> {
    for &(x, y, c) in centres {
        let colour = PALETTE[c as usize];
        chart.draw_series(std::iter::once(PathElement::new(
            [(0.0, 0.0), (x, y)],
            BLACK.stroke_width(3),
        )))?;
        chart.draw_series(std::iter::once(PathElement::new(
            [(0.0, 0.0), (x, y)],
            colour.stroke_width(2),
        )))?;
    }
    // Dots over the lines.
    chart.draw_series(
        points
            .iter()
            .map(|&(x, y, c)| Circle::new((x, y), 2, PALETTE[c as usize].filled())),
    )?;
    Ok(())
}

/// `docs/features/<name>.png` for a 2-D run.
fn plot_2d(run: &Run, t: &Trained, labels: &[u32], path: &Path) -> Result<()> {
    let points: Vec<(f32, f32, u32)> = t
        .features
        .iter()
        .zip(labels)
        .map(|(f, &c)| (f[0], f[1], c))
        .collect();
    // The raw panel's radius: the 99th percentile of the norms, so a few outliers don't shrink
    // everything else (points beyond are clipped).
    let mut norms: Vec<f32> = points.iter().map(|p| p.0.hypot(p.1)).collect();
    norms.sort_by(f32::total_cmp);
    let r = 1.1 * norms[norms.len() * 99 / 100];
    let is_rbf = matches!(run.head, Head::Rbf { .. });
    // Centre lines: the centres themselves for RBF (the points they attract), otherwise the
    // directions, scaled to 90% of the panel.
    let centres = |scale: f32| -> Vec<(f32, f32, u32)> {
        t.centres
            .iter()
            .enumerate()
            .map(|(c, w)| {
                let w = if is_rbf { w.clone() } else { unit(w) };
                (scale * w[0], scale * w[1], c as u32)
            })
            .collect()
    };
    let width = if run.is_cosine() { 2 * PANEL } else { PANEL };
    let root = BitMapBackend::new(path, (width, PANEL)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = if run.is_cosine() {
        let (left, right) = root.split_horizontally(PANEL);
        vec![left, right]
    } else {
        vec![root.clone()]
    };
    let mut raw = panel(&areas[0], r)?;
    draw_2d(
        &mut raw,
        &points,
        &centres(if is_rbf { 1.0 } else { 0.9 * r }),
    )?;
    if is_rbf {
        for (x, y, _) in centres(1.0) {
            raw.draw_series(std::iter::once(Circle::new(
                (x, y),
                6,
                BLACK.stroke_width(2),
            )))?;
        }
    }
    if run.is_cosine() {
        // The normalized features f/‖f‖ on the unit circle, with the centre directions as radii.
        let mut ring = panel(&areas[1], 1.25)?;
        let circle: Vec<(f32, f32)> = (0..=360)
            .map(|d| (d as f32).to_radians())
            .map(|a| (a.cos(), a.sin()))
            .collect();
        ring.draw_series(std::iter::once(PathElement::new(
            circle,
            RGBColor(200, 200, 200),
        )))?;
        let on_circle: Vec<(f32, f32, u32)> = points
            .iter()
            .map(|&(x, y, c)| {
                let u = unit(&[x, y]);
                (u[0], u[1], c)
            })
            .collect();
        draw_2d(&mut ring, &on_circle, &centres(1.0))?;
    }
    root.present()?;
    Ok(())
}

/// Rotates a unit vector into the view frame (azimuth 35°, elevation 25°): (x, y) on screen and
/// the depth z (> 0 faces the viewer).
fn view(v: &[f32]) -> (f32, f32, f32) {
    let (az, el) = (35f32.to_radians(), 25f32.to_radians());
    let (x, y, z) = (v[0], v[1], v[2]);
    let (x, z) = (x * az.cos() - z * az.sin(), x * az.sin() + z * az.cos());
    let (y, z) = (y * el.cos() - z * el.sin(), y * el.sin() + z * el.cos());
    (x, y, z)
}

/// `docs/features/<name>_sphere.png` for a 3-D run: orthographic projection of the unit sphere.
fn plot_sphere(t: &Trained, labels: &[u32], path: &Path) -> Result<()> {
    let root = BitMapBackend::new(path, (PANEL, PANEL)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = panel(&root, 1.15)?;
    let mut points: Vec<(f32, f32, f32, u32)> = t
        .features
        .iter()
        .zip(labels)
        .map(|(f, &c)| {
            let (x, y, z) = view(&unit(f));
            (x, y, z, c)
        })
        .collect();
    // Far side first, so the near side is drawn over it.
    points.sort_by(|a, b| a.2.total_cmp(&b.2));
    let centres: Vec<(f32, f32, f32, u32)> = t
        .centres
        .iter()
        .enumerate()
        .map(|(c, w)| {
            let (x, y, z) = view(&unit(w));
            (x, y, z, c as u32)
        })
        .collect();
    let centre_line = |chart: &mut Panel, &(x, y, z, c): &(f32, f32, f32, u32)| -> Result<()> {
        let colour = if z < 0.0 {
            faded(PALETTE[c as usize], 0.6)
        } else {
            PALETTE[c as usize]
        };
        chart.draw_series(std::iter::once(PathElement::new(
            [(0.0, 0.0), (x, y)],
            colour.stroke_width(3),
        )))?;
        Ok(())
    };
    for c in centres.iter().filter(|c| c.2 < 0.0) {
        centre_line(&mut chart, c)?;
    }
    chart.draw_series(points.iter().map(|&(x, y, z, c)| {
        let colour = if z < 0.0 {
            faded(PALETTE[c as usize], 0.7)
        } else {
            PALETTE[c as usize]
        };
        Circle::new((x, y), 2, colour.filled())
    }))?;
    let outline: Vec<(f32, f32)> = (0..=360)
        .map(|d| (d as f32).to_radians())
        .map(|a| (a.cos(), a.sin()))
        .collect();
    chart.draw_series(std::iter::once(PathElement::new(
        outline,
        RGBColor(120, 120, 120),
    )))?;
    for c in centres.iter().filter(|c| c.2 >= 0.0) {
        centre_line(&mut chart, c)?;
    }
    root.present()?;
    Ok(())
}

fn main() -> Result<()> {
    let started = Instant::now();
    let dev = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(SEED);
    let data = make_data(&mut rng, &dev)?;
    let labels = &data.1.labels;
    std::fs::create_dir_all(OUT_DIR)?;
    println!(
        "data: {CLASSES} classes, {IN_DIM}-d; {} train / {} test rows; MLP {IN_DIM}-{HIDDEN}-{HIDDEN}-D; \
         AdamW lr {LR}, batch {BATCH}, {EPOCHS} epochs",
        data.0.labels.len(),
        labels.len()
    );
    for (i, run) in runs().iter().enumerate() {
        let seed = SEED + 1 + i as u64;
        let flat = train(run, 2, &data, seed, &dev)?;
        let path = Path::new(OUT_DIR).join(format!("{}.png", run.name));
        plot_2d(run, &flat, labels, &path)?;
        println!(
            "[{:>10}] 2-D: test acc {:5.1}%  {:5.2} s  -> {}",
            run.name,
            100.0 * flat.accuracy,
            flat.seconds,
            path.display()
        );
        if run.is_cosine() {
            let sphere = train(run, 3, &data, seed + 100, &dev)?;
            let path = Path::new(OUT_DIR).join(format!("{}_sphere.png", run.name));
            plot_sphere(&sphere, labels, &path)?;
            println!(
                "[{:>10}] 3-D: test acc {:5.1}%  {:5.2} s  -> {}",
                run.name,
                100.0 * sphere.accuracy,
                sphere.seconds,
                path.display()
            );
        }
    }
    println!("total {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

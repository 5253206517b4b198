//! Central finite differences in f64: (ℓ(x + h) − ℓ(x − h)) / 2h with h = 1e-6, for every head
//! variant and every criterion option, compared with `loss_and_grad`'s gradient, with the
//! autograd gradient of the fused `loss`, and with the reference's autograd gradient. Also for
//! the per-row scale. Every head × every option runs as one test per head, `fd_every_option_<head>`.
//!
//! Tolerance: 1e-6 norm-wise relative. Truncation error is h²·ℓ'''/6: with logits ≤ 64 and the
//! target cosine kept in [−0.99, 0.99] (so sin θ ≥ 0.14 in the ArcFace / Combined derivative),
//! ℓ''' ≲ 1e6 gives ≲ 2e-7 absolute against gradients of O(1..10); rounding error is
//! ~1e-16·|ℓ| / h ≈ 1e-8 for |ℓ| ≲ 100. Inputs are kept ≥ 1e-3 away from every kink: cos = ±1
//! (and the 1e-5 exact-margin clamp next to it), ArcFace's fallback threshold cos(π − m) and
//! easy margin's c = 0, Combined's m1·θ + m2 = π, SphereFace's cos(jπ/m), and d² = 0.
//!
//! `MarginGrad::Detached` is not the derivative of the forward for ArcFace / Combined /
//! SphereFace (by design), so it is finite-differenced only for the heads where it coincides
//! with the exact gradient (Softmax, CosFace, RBF); the parity tests cover the others.

use std::f64::consts::PI;

use candle_core::{Device, Result, Tensor};
use candle_margin_softmax::{Head, MarginSoftmaxLoss, Reduction};
use rand::Rng;
use rand::rngs::StdRng;

use crate::common::*;

const H: f64 = 1e-6;
const TOL: f64 = 1e-6;
const KINK: f64 = 1e-3;

/// True when a target cosine is within `KINK` of a threshold of the head.
fn near_kink(head: &Head, c: f64) -> bool {
    if c.abs() > 0.99 {
        return true;
    }
    match *head {
        Head::ArcFace { m, easy_margin, .. } => {
            (c - (PI - m).cos()).abs() < KINK || (easy_margin && c.abs() < 1e-2)
        }
        Head::Combined { m1, m2, .. } => {
            let t = (PI - m2) / m1;
            t < PI && (c - t.cos()).abs() < KINK
        }
        Head::SphereFace { m, .. } => {
            let m = m as usize;
            (1..m).any(|j| (c - (j as f64 * PI / m as f64).cos()).abs() < KINK)
        }
        _ => false,
    }
}

/// A kink-free input (see the module docs).
pub fn fd_input(r: &mut StdRng, head: &Head, b: usize, c: usize, targets: &[i64]) -> Vec<f64> {
    match kind(head) {
        Kind::Cosine => {
            let mut x: Vec<f64> = (0..b * c).map(|_| r.random_range(-0.99..0.99)).collect();
            for (i, &t) in targets.iter().enumerate() {
                if t < 0 {
                    continue;
                }
                let hi = r.random_bool(0.5);
                let v = loop {
                    let v = if hi {
                        r.random_range(0.2..0.9)
                    } else {
                        r.random_range(-0.99..0.99)
                    };
                    if !near_kink(head, v) {
                        break v;
                    }
                };
                x[i * c + t as usize] = v;
            }
            x
        }
        Kind::Distance => (0..b * c)
            .map(|_| {
                if r.random_bool(0.15) {
                    10f64.powf(r.random_range(1.0..3.0))
                } else {
                    r.random_range(0.05..4.0)
                }
            })
            .collect(),
        Kind::Logit => gen_input(r, head, b, c, targets),
    }
}

fn eval(
    cfg: &MarginSoftmaxLoss,
    x: &[f64],
    (b, c): (usize, usize),
    t: &Tensor,
    rs: Option<&[f64]>,
    dev: &Device,
) -> Result<f64> {
    let input = Tensor::from_vec(x.to_vec(), (b, c), dev)?;
    let loss = match rs {
        Some(rs) => cfg.loss_with_row_scale(&input, t, &Tensor::from_vec(rs.to_vec(), b, dev)?)?,
        None => cfg.loss(&input, t)?,
    };
    root(&loss)?.to_scalar::<f64>()
}

/// Finite differences for one configuration; checks every input entry (the shapes are small)
/// and, with a row scale, every r_i.
pub fn fd_case(
    dev: &Device,
    name: &str,
    head: Head,
    opts: &Opts,
    (b, c): (usize, usize),
    with_row_scale: bool,
    f: &mut Failures,
) {
    let label = format!(
        "fd {name} {b}x{c}{}",
        if with_row_scale { " row_scale" } else { "" }
    );
    if let Err(e) = fd_inner(dev, &label, head, opts, (b, c), with_row_scale, f) {
        f.err(&label, e);
    }
}

fn fd_inner(
    dev: &Device,
    label: &str,
    head: Head,
    opts: &Opts,
    (b, c): (usize, usize),
    with_row_scale: bool,
    f: &mut Failures,
) -> Result<()> {
    let seed = seed_of(label);
    let mut r = rng(seed);
    let t = gen_targets(&mut r, b, c, opts.ignore);
    let x = fd_input(&mut r, &head, b, c, &t);
    let rs = gen_row_scale(&mut r, b);
    let cfg = opts.cfg(head, c, candle_core::DType::F64, dev, seed)?;
    let targets = targets_i64(&t, dev)?;
    let input = Tensor::from_vec(x.clone(), (b, c), dev)?;
    let rs_opt = with_row_scale.then_some(rs.as_slice());
    let rt = Tensor::from_vec(rs.clone(), b, dev)?;
    let rt_opt = with_row_scale.then_some(&rt);

    let (g, gr) = match rt_opt {
        Some(rt) => {
            let (_, g, gr) = cfg.loss_and_grad_with_row_scale(&input, &targets, rt)?;
            (g, Some(gr))
        }
        None => (cfg.loss_and_grad(&input, &targets)?.1, None),
    };
    let fused = autograd(Side::Fused, &cfg, &input, &targets, rt_opt)?;
    let refr = crate::parity::reference_on_cpu(&cfg, &input, &targets, rt_opt)?;

    let mut fd = vec![0.0; b * c];
    let mut xp = x.clone();
    for k in 0..b * c {
        xp[k] = x[k] + H;
        let lp = eval(&cfg, &xp, (b, c), &targets, rs_opt, dev)?;
        xp[k] = x[k] - H;
        let lm = eval(&cfg, &xp, (b, c), &targets, rs_opt, dev)?;
        xp[k] = x[k];
        fd[k] = (lp - lm) / (2.0 * H);
    }
    // Floor: the natural gradient scale s_eff / B (only matters if the whole gradient is ~0).
    let s_eff = if with_row_scale {
        rs.iter().fold(1.0f64, |m, v| m.max(*v))
    } else {
        head.scale()
    };
    let floor = s_eff / b.max(1) as f64 * 1e-2;
    let fd_t = Tensor::from_vec(fd, (b, c), dev)?;
    f.check(
        label,
        compare("loss_and_grad dinput vs FD", &g, &fd_t, TOL, floor),
    );
    f.check(
        label,
        compare("fused autograd dinput vs FD", &fused.dx, &fd_t, TOL, floor),
    );
    f.check(
        label,
        compare(
            "reference autograd dinput vs FD",
            &refr.dx,
            &fd_t,
            TOL,
            floor,
        ),
    );

    if with_row_scale {
        let mut fdr = vec![0.0; b];
        let mut rp = rs.clone();
        for i in 0..b {
            rp[i] = rs[i] + H;
            let lp = eval(&cfg, &x, (b, c), &targets, Some(&rp), dev)?;
            rp[i] = rs[i] - H;
            let lm = eval(&cfg, &x, (b, c), &targets, Some(&rp), dev)?;
            rp[i] = rs[i];
            fdr[i] = (lp - lm) / (2.0 * H);
        }
        let fdr_t = Tensor::from_vec(fdr, b, dev)?;
        let floor_r = 1e-2 / b.max(1) as f64;
        if let Some(gr) = &gr {
            f.check(
                label,
                compare("loss_and_grad drow_scale vs FD", gr, &fdr_t, TOL, floor_r),
            );
        }
        if let Some(d) = &fused.dr {
            f.check(
                label,
                compare("fused autograd drow_scale vs FD", d, &fdr_t, TOL, floor_r),
            );
        }
        if let Some(d) = &refr.dr {
            f.check(
                label,
                compare(
                    "reference autograd drow_scale vs FD",
                    d,
                    &fdr_t,
                    TOL,
                    floor_r,
                ),
            );
        }
    }
    Ok(())
}

fn fd_option_sets() -> Vec<(String, Opts)> {
    let mut v: Vec<(String, Opts)> = options_alone()
        .into_iter()
        .filter(|(n, _)| *n != "detached")
        .map(|(n, o)| (n.to_string(), o))
        .collect();
    v.push(("combo".into(), Opts::combo()));
    v.push((
        "combo_none".into(),
        Opts::combo().with_reduction(Reduction::None),
    ));
    v.push((
        "combo_sum".into(),
        Opts::combo().with_reduction(Reduction::Sum),
    ));
    v.push(("softcap_combo".into(), Opts::combo().with_softcap()));
    v.push((
        "all_polyN_focal0.5".into(),
        Opts {
            smoothing: 0.2,
            focal: 0.5,
            poly: vec![2.0, -0.45, 0.25],
            z: 1e-2,
            weights: true,
            ignore: true,
            ..Opts::default()
        },
    ));
    v
}

/// Every variant of the head `head` × every option (exact margin gradients).
pub fn every_option(dev: &Device, name: &str) {
    let mut f = Failures::default();
    for (hn, head) in variants_of(name) {
        for (on, opts) in fd_option_sets() {
            fd_case(
                dev,
                &format!("{hn}+{on}"),
                head,
                &opts,
                (5, 7),
                false,
                &mut f,
            );
        }
    }
    f.finish(&format!("finite differences: {name}, every option"));
}

/// Detached margins where they equal the exact derivative.
pub fn detached_where_exact(dev: &Device) {
    let mut f = Failures::default();
    for (hn, head) in [
        ("softmax", Head::softmax()),
        ("cosface", Head::cosface()),
        ("rbf", Head::rbf()),
    ] {
        for (on, opts) in [
            ("detached", Opts::default().with_detached()),
            ("combo_detached", Opts::combo().with_detached()),
        ] {
            fd_case(
                dev,
                &format!("{hn}+{on}"),
                head,
                &opts,
                (5, 7),
                false,
                &mut f,
            );
        }
    }
    f.finish("finite differences: detached (heads where it is exact)");
}

/// The per-row scale (SphereFace with feature norms, and other heads).
pub fn row_scale(dev: &Device) {
    let mut f = Failures::default();
    let heads = [
        ("sphereface_l5", Head::sphereface(5.0)),
        (
            "sphereface_m2_l0",
            Head::SphereFace {
                s: 1.0,
                m: 2.0,
                lambda: 0.0,
            },
        ),
        (
            "sphereface_m3_l1",
            Head::SphereFace {
                s: 1.0,
                m: 3.0,
                lambda: 1.0,
            },
        ),
        ("arcface", Head::arcface()),
        ("combined", Head::combined()),
        ("cosface", Head::cosface()),
        ("softmax", Head::softmax()),
        ("rbf", Head::rbf()),
    ];
    let sets = [
        ("plain", Opts::default()),
        ("combo", Opts::combo()),
        ("combo_none", Opts::combo().with_reduction(Reduction::None)),
        ("softcap", Opts::default().with_softcap()),
        ("softcap_combo", Opts::combo().with_softcap()),
        (
            "focal_polyN_z",
            Opts {
                focal: 2.0,
                poly: vec![1.0, -0.45, 0.25],
                z: 1e-3,
                ..Opts::default()
            },
        ),
    ];
    for (hn, head) in heads {
        for (on, opts) in &sets {
            fd_case(dev, &format!("{hn}+{on}"), head, opts, (4, 6), true, &mut f);
        }
    }
    f.finish("finite differences: row scale");
}

#[test]
fn fd_every_option_softmax() {
    every_option(&device(), "softmax");
}

#[test]
fn fd_every_option_cosface() {
    every_option(&device(), "cosface");
}

#[test]
fn fd_every_option_arcface() {
    every_option(&device(), "arcface");
}

#[test]
fn fd_every_option_combined() {
    every_option(&device(), "combined");
}

#[test]
fn fd_every_option_sphereface() {
    every_option(&device(), "sphereface");
}

#[test]
fn fd_every_option_rbf() {
    every_option(&device(), "rbf");
}

#[test]
fn fd_detached_where_exact() {
    detached_where_exact(&device());
}

#[test]
fn fd_row_scale() {
    row_scale(&device());
}

//! Invalid inputs and hyper-parameters give an `Err` (never a panic) whose message names the op
//! ("margin_softmax_ce") and the problem. Each case goes through every entry point that can see
//! the problem: `loss`, `loss_and_grad`, `loss_with_row_scale`, `loss_and_grad_with_row_scale`.

use candle_core::{DType, Device, Result, Tensor};
use candle_margin_softmax::{Head, MarginSoftmaxLoss};

use crate::common::*;

/// Runs `cfg` on the inputs through every entry point; each must fail with a message holding
/// "margin_softmax_ce" and every one of `keys` (case-insensitive, any one of the alternatives
/// separated by '|').
fn expect_err(
    f: &mut Failures,
    label: &str,
    cfg: &MarginSoftmaxLoss,
    input: &Tensor,
    targets: &Tensor,
    row_scale: Option<&Tensor>,
    keys: &[&str],
) {
    let dev = input.device().clone();
    let b = input.dims().first().copied().unwrap_or(0);
    let default_rs = Tensor::ones(b, acc_dtype_or_f32(input.dtype()), &dev).unwrap();
    let rs = row_scale.unwrap_or(&default_rs);
    let results: Vec<(&str, Result<()>)> = vec![
        ("loss", cfg.loss(input, targets).map(|_| ())),
        (
            "loss_and_grad",
            cfg.loss_and_grad(input, targets).map(|_| ()),
        ),
        (
            "loss_with_row_scale",
            cfg.loss_with_row_scale(input, targets, rs).map(|_| ()),
        ),
        (
            "loss_and_grad_with_row_scale",
            cfg.loss_and_grad_with_row_scale(input, targets, rs)
                .map(|_| ()),
        ),
    ];
    for (entry, r) in results {
        // A row-scale problem is only visible to the row-scale entry points.
        if row_scale.is_some() && !entry.contains("row_scale") {
            continue;
        }
        match r {
            Ok(()) => f.0.push(format!("[{label}] {entry}: Ok, want Err")),
            Err(e) => {
                let msg = e.to_string();
                let low = msg.to_lowercase();
                if !low.contains("margin_softmax_ce") {
                    f.0.push(format!(
                        "[{label}] {entry}: message lacks the op name: {msg}"
                    ));
                }
                for key in keys {
                    if !key.split('|').any(|k| low.contains(&k.to_lowercase())) {
                        f.0.push(format!("[{label}] {entry}: message lacks \"{key}\": {msg}"));
                    }
                }
            }
        }
    }
}

fn acc_dtype_or_f32(d: DType) -> DType {
    if d == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

fn cos_input(dev: &Device, b: usize, c: usize) -> Tensor {
    let mut r = rng(seed_of(&format!("errors {b}x{c}")));
    let x = gen_input(&mut r, &Head::arcface(), b, c, &vec![0; b]);
    input_tensor(&x, b, c, DType::F32, dev).unwrap()
}

pub fn invalid_inputs(dev: &Device) {
    let mut f = Failures::default();
    let (b, c) = (4usize, 6usize);
    let x = cos_input(dev, b, c);
    let t_ok = targets_i64(&[0, 1, 5, 2], dev).unwrap();
    let arc = MarginSoftmaxLoss::new(Head::arcface());

    // Target values.
    for (name, t) in [
        ("target = C (i64)", targets_i64(&[0, 6, 1, 2], dev).unwrap()),
        (
            "target = 1000 (i64)",
            targets_i64(&[0, 1, 1000, 2], dev).unwrap(),
        ),
        (
            "target = C (u32)",
            Tensor::new(&[0u32, 1, 2, 6], dev).unwrap(),
        ),
        (
            "target = u32::MAX without ignore_index",
            Tensor::new(&[0u32, u32::MAX, 2, 3], dev).unwrap(),
        ),
        (
            "negative target -5 (ignore_index -100)",
            targets_i64(&[0, -5, 1, 2], dev).unwrap(),
        ),
        (
            "negative target -1",
            targets_i64(&[-1, 0, 1, 2], dev).unwrap(),
        ),
    ] {
        expect_err(&mut f, name, &arc, &x, &t, None, &["target"]);
    }
    let no_ignore = arc.clone().ignore_index(None);
    expect_err(
        &mut f,
        "target -100 with ignore_index None",
        &no_ignore,
        &x,
        &targets_i64(&[0, -100, 1, 2], dev).unwrap(),
        None,
        &["target"],
    );
    // The same out-of-range target in f64 and with every head (the value check must not be
    // skipped on some path).
    for (hn, head) in head_variants() {
        let cfg = MarginSoftmaxLoss::new(head);
        let x64 = x.to_dtype(DType::F64).unwrap().abs().unwrap();
        expect_err(
            &mut f,
            &format!("target = C, {hn}, f64"),
            &cfg,
            &x64,
            &targets_i64(&[0, 1, 2, 6], dev).unwrap(),
            None,
            &["target"],
        );
    }

    // Target dtype and shape.
    expect_err(
        &mut f,
        "target dtype f32",
        &arc,
        &x,
        &Tensor::new(&[0f32, 1., 2., 3.], dev).unwrap(),
        None,
        &["target"],
    );
    expect_err(
        &mut f,
        "targets shape [B+1]",
        &arc,
        &x,
        &targets_i64(&[0, 1, 2, 3, 4], dev).unwrap(),
        None,
        &["target", "shape"],
    );
    expect_err(
        &mut f,
        "targets shape [B, 1]",
        &arc,
        &x,
        &targets_i64(&[0, 1, 2, 3], dev)
            .unwrap()
            .reshape((4, 1))
            .unwrap(),
        None,
        &["target", "shape"],
    );

    // Input rank and dtype, C = 0.
    expect_err(
        &mut f,
        "input rank 1",
        &arc,
        &x.flatten_all().unwrap(),
        &t_ok,
        None,
        &["rank"],
    );
    expect_err(
        &mut f,
        "input rank 3",
        &arc,
        &x.reshape((4, 2, 3)).unwrap(),
        &t_ok,
        None,
        &["rank"],
    );
    expect_err(
        &mut f,
        "input C = 0",
        &arc,
        &Tensor::zeros((4, 0), DType::F32, dev).unwrap(),
        &t_ok,
        None,
        &["C = 0|class"],
    );
    expect_err(
        &mut f,
        "input dtype u32",
        &arc,
        &Tensor::zeros((4, 6), DType::U32, dev).unwrap(),
        &t_ok,
        None,
        &["dtype"],
    );
    expect_err(
        &mut f,
        "input dtype i64",
        &arc,
        &Tensor::zeros((4, 6), DType::I64, dev).unwrap(),
        &t_ok,
        None,
        &["dtype"],
    );

    // Class weights.
    for (name, w) in [
        (
            "weights shape [C-1]",
            Tensor::ones(c - 1, DType::F32, dev).unwrap(),
        ),
        (
            "weights shape [C+1]",
            Tensor::ones(c + 1, DType::F32, dev).unwrap(),
        ),
    ] {
        let cfg = arc.clone().class_weights(w).unwrap();
        expect_err(
            &mut f,
            name,
            &cfg,
            &x,
            &t_ok,
            None,
            &["class_weights", "shape"],
        );
    }
    // Rank, dtype and values are checked once, when the weights are set.
    let set_err = |f: &mut Failures, label: &str, w: Tensor, keys: &[&str]| match arc
        .clone()
        .class_weights(w)
    {
        Ok(_) => f.0.push(format!("[{label}] class_weights: Ok, want Err")),
        Err(e) => {
            let msg = e.to_string();
            for key in ["margin_softmax_ce"].iter().chain(keys) {
                if !msg.contains(key) {
                    f.0.push(format!("[{label}] message lacks \"{key}\": {msg}"));
                }
            }
        }
    };
    set_err(
        &mut f,
        "weights shape [1, C]",
        Tensor::ones((1, c), DType::F32, dev).unwrap(),
        &["class_weights", "rank"],
    );
    set_err(
        &mut f,
        "weights dtype u32",
        Tensor::ones(c, DType::U32, dev).unwrap(),
        &["class_weights", "f16, bf16, f32 or f64"],
    );
    for (label, bad, shown) in [
        ("weights negative", -0.5f64, "-0.5"),
        ("weights NaN", f64::NAN, "NaN"),
        ("weights +inf", f64::INFINITY, "inf"),
        ("weights -inf", f64::NEG_INFINITY, "-inf"),
    ] {
        for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
            // The first bad entry is named: class 2 (class 4 is bad too).
            let mut w = vec![1.0f64; c];
            w[2] = bad;
            w[4] = -7.0;
            let w = Tensor::from_vec(w, c, dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            set_err(
                &mut f,
                &format!("{label} {}", dtype_name(dtype)),
                w,
                &["class_weights", "finite and >= 0", "class 2", shown],
            );
        }
    }
    // Row scale.
    for (name, r) in [
        (
            "row_scale shape [B-1]",
            Tensor::ones(b - 1, DType::F32, dev).unwrap(),
        ),
        (
            "row_scale shape [B+1]",
            Tensor::ones(b + 1, DType::F32, dev).unwrap(),
        ),
        (
            "row_scale shape [B, 1]",
            Tensor::ones((b, 1), DType::F32, dev).unwrap(),
        ),
        (
            "row_scale dtype u32",
            Tensor::ones(b, DType::U32, dev).unwrap(),
        ),
    ] {
        let cfg = MarginSoftmaxLoss::new(Head::sphereface(5.0));
        let key = if name.contains("dtype") {
            "f16, bf16, f32 or f64"
        } else {
            "shape"
        };
        expect_err(&mut f, name, &cfg, &x, &t_ok, Some(&r), &["row_scale", key]);
    }
    f.finish("errors: invalid inputs");
}

pub fn invalid_hyper_parameters(dev: &Device) {
    let mut f = Failures::default();
    let (b, c) = (3usize, 5usize);
    let x = cos_input(dev, b, c);
    let t = targets_i64(&[0, 4, 2], dev).unwrap();
    let base = |h: Head| MarginSoftmaxLoss::new(h);
    let cases: Vec<(&str, MarginSoftmaxLoss, &[&str])> = vec![
        (
            "s = 0",
            base(Head::ArcFace {
                s: 0.0,
                m: 0.5,
                easy_margin: false,
            }),
            &["scale|s "],
        ),
        (
            "s < 0",
            base(Head::CosFace { s: -1.0, m: 0.35 }),
            &["scale|s "],
        ),
        ("s NaN", base(Head::Softmax { s: f64::NAN }), &["scale|s "]),
        (
            "s inf",
            base(Head::Rbf {
                s: f64::INFINITY,
                gamma: 16.0,
            }),
            &["scale|s "],
        ),
        (
            "s = 0 sphereface",
            base(Head::SphereFace {
                s: 0.0,
                m: 4.0,
                lambda: 5.0,
            }),
            &["scale|s "],
        ),
        (
            "s < 0 combined",
            base(Head::Combined {
                s: -64.0,
                m1: 1.0,
                m2: 0.3,
                m3: 0.2,
            }),
            &["scale|s "],
        ),
        (
            "RBF gamma = 0",
            base(Head::Rbf {
                s: 35.0,
                gamma: 0.0,
            }),
            &["gamma"],
        ),
        (
            "RBF gamma < 0",
            base(Head::Rbf {
                s: 35.0,
                gamma: -1.0,
            }),
            &["gamma"],
        ),
        (
            "RBF gamma NaN",
            base(Head::Rbf {
                s: 35.0,
                gamma: f64::NAN,
            }),
            &["gamma"],
        ),
        (
            "label_smoothing 1.0",
            base(Head::arcface()).label_smoothing(1.0),
            &["label_smoothing"],
        ),
        (
            "label_smoothing -0.1",
            base(Head::arcface()).label_smoothing(-0.1),
            &["label_smoothing"],
        ),
        (
            "label_smoothing NaN",
            base(Head::rbf()).label_smoothing(f64::NAN),
            &["label_smoothing"],
        ),
        (
            "CosFace m = 1.5",
            base(Head::CosFace { s: 64.0, m: 1.5 }),
            &["margin|m"],
        ),
        (
            "CosFace m < 0",
            base(Head::CosFace { s: 64.0, m: -0.1 }),
            &["margin|m"],
        ),
        (
            "ArcFace m = 4.0",
            base(Head::ArcFace {
                s: 64.0,
                m: 4.0,
                easy_margin: false,
            }),
            &["margin|m"],
        ),
        (
            "ArcFace m = pi",
            base(Head::ArcFace {
                s: 64.0,
                m: std::f64::consts::PI,
                easy_margin: true,
            }),
            &["margin|m"],
        ),
        (
            "Combined m1 = 0",
            base(Head::Combined {
                s: 64.0,
                m1: 0.0,
                m2: 0.3,
                m3: 0.2,
            }),
            &["m1"],
        ),
        (
            "Combined m1 = 9",
            base(Head::Combined {
                s: 64.0,
                m1: 9.0,
                m2: 0.3,
                m3: 0.2,
            }),
            &["m1"],
        ),
        (
            "Combined m2 = 4",
            base(Head::Combined {
                s: 64.0,
                m1: 1.0,
                m2: 4.0,
                m3: 0.2,
            }),
            &["m2"],
        ),
        (
            "Combined m3 = 1.5",
            base(Head::Combined {
                s: 64.0,
                m1: 1.0,
                m2: 0.3,
                m3: 1.5,
            }),
            &["m3"],
        ),
        (
            "SphereFace m = 1.5",
            base(Head::SphereFace {
                s: 30.0,
                m: 1.5,
                lambda: 5.0,
            }),
            &["margin|m"],
        ),
        (
            "SphereFace m = 0",
            base(Head::SphereFace {
                s: 30.0,
                m: 0.0,
                lambda: 5.0,
            }),
            &["margin|m"],
        ),
        (
            "SphereFace m = 17",
            base(Head::SphereFace {
                s: 30.0,
                m: 17.0,
                lambda: 5.0,
            }),
            &["margin|m"],
        ),
        (
            "SphereFace lambda < 0",
            base(Head::SphereFace {
                s: 30.0,
                m: 4.0,
                lambda: -1.0,
            }),
            &["lambda"],
        ),
        (
            "focal gamma < 0",
            base(Head::arcface()).focal_gamma(-0.5),
            &["focal"],
        ),
        (
            "focal gamma NaN",
            base(Head::arcface()).focal_gamma(f64::NAN),
            &["focal"],
        ),
        (
            "poly eps_2 = -0.6",
            base(Head::arcface()).poly(&[1.0, -0.6]),
            &["poly"],
        ),
        (
            "poly eps_1 = -1.5",
            base(Head::rbf()).poly(&[-1.5]),
            &["poly"],
        ),
        (
            "poly eps_3 = -0.4",
            base(Head::softmax()).poly(&[0.0, 0.0, -0.4]),
            &["poly"],
        ),
        (
            "z_loss < 0",
            base(Head::arcface()).z_loss(-1e-3),
            &["z_loss"],
        ),
        (
            "z_loss inf",
            base(Head::arcface()).z_loss(f64::INFINITY),
            &["z_loss"],
        ),
        (
            "logit_softcap 0",
            base(Head::arcface()).logit_softcap(0.0),
            &["logit_softcap", "> 0"],
        ),
        (
            "logit_softcap < 0",
            base(Head::softmax()).logit_softcap(-30.0),
            &["logit_softcap", "> 0"],
        ),
        (
            "logit_softcap NaN",
            base(Head::rbf()).logit_softcap(f64::NAN),
            &["logit_softcap"],
        ),
        (
            "logit_softcap inf",
            base(Head::rbf()).logit_softcap(f64::INFINITY),
            &["logit_softcap"],
        ),
    ];
    for (name, cfg, keys) in cases {
        expect_err(&mut f, name, &cfg, &x, &t, None, keys);
        // The config is rejected before the input is looked at: also with an f64 input.
        let x64 = x.to_dtype(DType::F64).unwrap();
        expect_err(&mut f, &format!("{name} (f64)"), &cfg, &x64, &t, None, keys);
    }
    f.finish("errors: invalid hyper-parameters");
}

/// Boundary values that ARE valid (the checks are not off by one).
pub fn valid_boundaries(dev: &Device) {
    let mut f = Failures::default();
    let (b, c) = (3usize, 5usize);
    let x = cos_input(dev, b, c);
    let t = targets_i64(&[0, 4, -100], dev).unwrap();
    let base = |h: Head| MarginSoftmaxLoss::new(h);
    let cases: Vec<(&str, MarginSoftmaxLoss)> = vec![
        ("CosFace m = 1", base(Head::CosFace { s: 64.0, m: 1.0 })),
        ("CosFace m = 0", base(Head::CosFace { s: 64.0, m: 0.0 })),
        (
            "ArcFace m = 0",
            base(Head::ArcFace {
                s: 64.0,
                m: 0.0,
                easy_margin: false,
            }),
        ),
        (
            "ArcFace m = pi - 1e-3",
            base(Head::ArcFace {
                s: 64.0,
                m: std::f64::consts::PI - 1e-3,
                easy_margin: false,
            }),
        ),
        (
            "Combined m1 = 8",
            base(Head::Combined {
                s: 64.0,
                m1: 8.0,
                m2: 0.0,
                m3: 1.0,
            }),
        ),
        (
            "SphereFace m = 1",
            base(Head::SphereFace {
                s: 30.0,
                m: 1.0,
                lambda: 0.0,
            }),
        ),
        (
            "SphereFace m = 16",
            base(Head::SphereFace {
                s: 30.0,
                m: 16.0,
                lambda: 0.0,
            }),
        ),
        (
            "label_smoothing 0.999",
            base(Head::arcface()).label_smoothing(0.999),
        ),
        (
            "poly eps_k = -1/k",
            base(Head::arcface()).poly(&[-1.0, -0.5, -1.0 / 3.0]),
        ),
        ("focal 0", base(Head::arcface()).focal_gamma(0.0)),
    ];
    for (name, cfg) in cases {
        match cfg.loss_and_grad(&x, &t) {
            Ok((l, g)) => {
                if !all_finite(&l).unwrap() || !all_finite(&g).unwrap() {
                    f.0.push(format!("[{name}] non-finite result"));
                }
            }
            Err(e) => f.0.push(format!("[{name}] unexpected Err: {e}")),
        }
    }
    f.finish("errors: valid boundary values accepted");
}

/// Hyper-parameters valid as f64 but not representable in the f32 accumulation of f32 / f16 /
/// bf16 input (overflow to ∞, or a subnormal that a GPU flushes to 0) give an `Err` naming the op
/// and the value for those inputs, on every entry point, and are accepted for f64 input (whose
/// accumulation holds them) with a finite result.
pub fn unrepresentable_hyper_parameters(dev: &Device) {
    let mut f = Failures::default();
    let (b, c) = (3usize, 5usize);
    let t = targets_i64(&[0, 4, -100], dev).unwrap();
    let weights = |v: f64| {
        let mut w = vec![1.0f64; c];
        w[3] = v;
        Tensor::from_vec(w, c, dev).unwrap()
    };
    let base = MarginSoftmaxLoss::new;
    let cases: Vec<(&str, MarginSoftmaxLoss, &str)> = vec![
        ("s = 1e39", base(Head::Softmax { s: 1e39 }), "scale s"),
        ("s = 1e-45", base(Head::Softmax { s: 1e-45 }), "scale s"),
        (
            "arcface s = 1e-40",
            base(Head::ArcFace {
                s: 1e-40,
                m: 0.5,
                easy_margin: false,
            }),
            "scale s",
        ),
        (
            "sphereface lambda = 1e300",
            base(Head::sphereface(1e300)),
            "lambda",
        ),
        (
            "rbf gamma = 1e-40",
            base(Head::Rbf {
                s: 35.0,
                gamma: 1e-40,
            }),
            "gamma",
        ),
        (
            "rbf gamma = 1e39",
            base(Head::Rbf {
                s: 35.0,
                gamma: 1e39,
            }),
            "gamma",
        ),
        (
            "combined m3 = 1e-42",
            base(Head::Combined {
                s: 64.0,
                m1: 1.0,
                m2: 0.3,
                m3: 1e-42,
            }),
            "m3",
        ),
        (
            "focal gamma = 1e-40",
            base(Head::arcface()).focal_gamma(1e-40),
            "focal_gamma",
        ),
        (
            "z_loss = 1e39",
            base(Head::arcface()).z_loss(1e39),
            "z_loss",
        ),
        (
            "z_loss = 1e-39",
            base(Head::arcface()).z_loss(1e-39),
            "z_loss",
        ),
        (
            "poly eps_2 = 1e40",
            base(Head::arcface()).poly(&[1.0, 1e40]),
            "eps_2",
        ),
        (
            "label_smoothing = 1e-40",
            base(Head::arcface()).label_smoothing(1e-40),
            "label_smoothing",
        ),
        (
            "softcap = 1e39",
            base(Head::arcface()).logit_softcap(1e39),
            "logit_softcap",
        ),
        (
            "softcap = 1e-39",
            base(Head::arcface()).logit_softcap(1e-39),
            "logit_softcap",
        ),
        (
            "class weight 1e39",
            base(Head::arcface()).class_weights(weights(1e39)).unwrap(),
            "class weight",
        ),
        (
            "class weight 1e-40",
            base(Head::arcface()).class_weights(weights(1e-40)).unwrap(),
            "class weight",
        ),
        (
            "class weights summing past f32::MAX",
            base(Head::arcface())
                .class_weights(Tensor::from_vec(vec![3e38f64; c], c, dev).unwrap())
                .unwrap(),
            "sum of the class weights",
        ),
    ];
    for (name, cfg, key) in &cases {
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let x = cos_input(dev, b, c).to_dtype(dt).unwrap();
            let label = format!("{name} {}", dtype_name(dt));
            expect_err(
                &mut f,
                &label,
                cfg,
                &x,
                &t,
                None,
                &[key, "not representable", "F32"],
            );
        }
        // f64 holds every one of them (the weights' sum too): accepted for f64 input.
        let x = cos_input(dev, b, c).to_dtype(DType::F64).unwrap();
        match cfg.loss_and_grad(&x, &t) {
            Ok(_) => {}
            Err(e) => f.0.push(format!("[{name} f64] unexpected Err: {e}")),
        }
    }
    // Values f64 itself cannot hold are rejected for f64 input too.
    let x = cos_input(dev, b, c).to_dtype(DType::F64).unwrap();
    for (name, cfg, key) in [
        (
            "f64 s = 1e-320",
            base(Head::Softmax { s: 1e-320 }),
            "scale s",
        ),
        (
            "f64 rbf gamma = 1e-310",
            base(Head::Rbf {
                s: 35.0,
                gamma: 1e-310,
            }),
            "gamma",
        ),
    ] {
        expect_err(
            &mut f,
            name,
            &cfg,
            &x,
            &t,
            None,
            &[key, "not representable", "F64"],
        );
    }
    f.finish("errors: hyper-parameters not representable in the accumulation dtype");
}

#[test]
fn errors_unrepresentable_hyper_parameters() {
    unrepresentable_hyper_parameters(&device());
}

#[test]
fn errors_invalid_inputs() {
    invalid_inputs(&device());
}

#[test]
fn errors_invalid_hyper_parameters() {
    invalid_hyper_parameters(&device());
}

#[test]
fn errors_valid_boundaries() {
    valid_boundaries(&device());
}

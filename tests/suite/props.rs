//! Property tests (f64): a random head with hyper-parameters anywhere in their valid ranges,
//! random criterion options (soft-capping and class weights with smoothing included) and targets
//! (some ignored), small shapes (B in 0..12, C in 1..50).
//! - the fused `loss` (and its autograd gradient) and `loss_and_grad` match `reference` at 1e-9
//!   norm-wise relative, and the loss is finite;
//! - determinism: two calls give bitwise-equal results.

use candle_core::{DType, Tensor};
use candle_margin_softmax::{Head, MarginGrad, MarginSoftmaxLoss, Reduction};
use proptest::prelude::*;

use crate::common::*;

const TOL: f64 = 1e-9;

fn head_strategy() -> impl Strategy<Value = Head> {
    prop_oneof![
        (0.1f64..10.0).prop_map(|s| Head::Softmax { s }),
        (0.1f64..64.0, 0.0f64..=1.0).prop_map(|(s, m)| Head::CosFace { s, m }),
        (0.1f64..64.0, 0.0f64..3.1, any::<bool>())
            .prop_map(|(s, m, easy_margin)| { Head::ArcFace { s, m, easy_margin } }),
        (0.1f64..64.0, 0.05f64..=8.0, 0.0f64..3.1, 0.0f64..=1.0)
            .prop_map(|(s, m1, m2, m3)| Head::Combined { s, m1, m2, m3 }),
        (0.1f64..64.0, 1u32..=16, 0.0f64..1000.0).prop_map(|(s, m, lambda)| {
            Head::SphereFace {
                s,
                m: m as f64,
                lambda,
            }
        }),
        (0.1f64..64.0, 0.1f64..64.0).prop_map(|(s, gamma)| Head::Rbf { s, gamma }),
    ]
}

#[derive(Clone, Debug)]
struct Crit {
    smoothing: f64,
    focal: f64,
    poly: Vec<f64>,
    z: f64,
    weights: bool,
    ignore: bool,
    reduction: Reduction,
    detached: bool,
    row_scale: bool,
    /// Soft-capping relative to the head (see `softcap_of`).
    softcap: Option<f64>,
}

fn crit_strategy() -> impl Strategy<Value = Crit> {
    (
        prop_oneof![Just(0.0), 0.0f64..0.99],
        prop_oneof![Just(0.0), 0.0f64..5.0],
        // ε_k in [−1/k, 3].
        prop::collection::vec(0.0f64..=1.0, 0..=3).prop_map(|u| {
            u.iter()
                .enumerate()
                .map(|(i, &u)| {
                    let lo = -1.0 / (i + 1) as f64;
                    lo + u * (3.0 - lo)
                })
                .collect::<Vec<f64>>()
        }),
        prop_oneof![Just(0.0), 0.0f64..0.1],
        any::<bool>(),
        any::<bool>(),
        prop_oneof![
            Just(Reduction::None),
            Just(Reduction::Sum),
            Just(Reduction::Mean)
        ],
        any::<bool>(),
        any::<bool>(),
        prop_oneof![Just(None), (0.05f64..2.0).prop_map(Some)],
    )
        .prop_map(
            |(
                smoothing,
                focal,
                poly,
                z,
                weights,
                ignore,
                reduction,
                detached,
                row_scale,
                softcap,
            )| Crit {
                smoothing,
                focal,
                poly,
                z,
                weights,
                ignore,
                reduction,
                detached,
                row_scale,
                softcap,
            },
        )
}

fn opts_of(c: &Crit) -> Opts {
    Opts {
        smoothing: c.smoothing,
        focal: c.focal,
        poly: c.poly.clone(),
        z: c.z,
        weights: c.weights,
        ignore: c.ignore,
        reduction: c.reduction,
        detached: c.detached,
        softcap: c.softcap,
    }
}

struct Built {
    cfg: MarginSoftmaxLoss,
    input: Tensor,
    targets: Tensor,
    row_scale: Option<Tensor>,
}

fn build(head: Head, b: usize, c: usize, crit: &Crit, seed: u64) -> candle_core::Result<Built> {
    let dev = device();
    let mut r = rng(seed);
    let t = gen_targets(&mut r, b, c, crit.ignore);
    let x = gen_input(&mut r, &head, b, c, &t);
    let rs = gen_row_scale(&mut r, b);
    let cfg = opts_of(crit).cfg(head, c, DType::F64, &dev, seed)?;
    assert_eq!(
        cfg.margin_grad,
        if crit.detached {
            MarginGrad::Detached
        } else {
            MarginGrad::Exact
        }
    );
    Ok(Built {
        cfg,
        input: input_tensor(&x, b, c, DType::F64, &dev)?,
        targets: targets_i64(&t, &dev)?,
        row_scale: if crit.row_scale {
            Some(Tensor::from_vec(rs, b, &dev)?)
        } else {
            None
        },
    })
}

fn bits(t: &Tensor) -> Vec<u64> {
    vec_f64(t).unwrap().iter().map(|v| v.to_bits()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x6d61_7267_696e),
        ..ProptestConfig::default()
    })]

    #[test]
    fn prop_matches_reference(
        head in head_strategy(),
        b in 0usize..12,
        c in 1usize..50,
        crit in crit_strategy(),
        seed in any::<u64>(),
    ) {
        let d = build(head, b, c, &crit, seed).unwrap();
        let s_eff = match &d.row_scale {
            Some(r) => vec_f64(r).unwrap().iter().fold(1.0f64, |m, v| m.max(*v)),
            None => head.scale(),
        };
        let bn = b.max(1) as f64;
        let rs = d.row_scale.as_ref();
        let fused = autograd(Side::Fused, &d.cfg, &d.input, &d.targets, rs).unwrap();
        let refr = autograd(Side::Reference, &d.cfg, &d.input, &d.targets, rs).unwrap();
        prop_assert!(all_finite(&fused.loss).unwrap(), "loss not finite: {:?}", vec_f64(&fused.loss));
        let ck = |r: std::result::Result<(), String>| r.map_err(TestCaseError::fail);
        // The reference's documented focal 0 < γ < 1 limitation (NaN gradient where p_t rounds
        // to 1): compare gradients where the reference is finite; the fused side must be finite.
        let cmp_grad = if crit.focal > 0.0 && crit.focal < 1.0 {
            compare_where_ref_finite
        } else {
            compare
        };
        ck(compare("loss", &fused.loss, &refr.loss, TOL, s_eff))?;
        ck(cmp_grad("autograd dinput", &fused.dx, &refr.dx, TOL, s_eff / bn))?;
        let (loss, dx, dr) = match rs {
            Some(r) => {
                let (l, g, gr) = d.cfg.loss_and_grad_with_row_scale(&d.input, &d.targets, r).unwrap();
                (l, g, Some(gr))
            }
            None => {
                let (l, g) = d.cfg.loss_and_grad(&d.input, &d.targets).unwrap();
                (l, g, None)
            }
        };
        ck(compare("loss_and_grad loss", &loss, &refr.loss, TOL, s_eff))?;
        ck(cmp_grad("loss_and_grad dinput", &dx, &refr.dx, TOL, s_eff / bn))?;
        if let (Some(a), Some(bb), Some(cc)) = (&dr, &refr.dr, &fused.dr) {
            ck(cmp_grad("loss_and_grad drow_scale", a, bb, TOL, 1.0 / bn))?;
            ck(cmp_grad("autograd drow_scale", cc, bb, TOL, 1.0 / bn))?;
        }
    }

    #[test]
    fn prop_deterministic(
        head in head_strategy(),
        b in 0usize..12,
        c in 1usize..50,
        crit in crit_strategy(),
        seed in any::<u64>(),
    ) {
        let d = build(head, b, c, &crit, seed).unwrap();
        let rs = d.row_scale.as_ref();
        let a1 = autograd(Side::Fused, &d.cfg, &d.input, &d.targets, rs).unwrap();
        let a2 = autograd(Side::Fused, &d.cfg, &d.input, &d.targets, rs).unwrap();
        prop_assert_eq!(bits(&a1.loss), bits(&a2.loss));
        prop_assert_eq!(bits(&a1.dx), bits(&a2.dx));
        if let (Some(p), Some(q)) = (&a1.dr, &a2.dr) {
            prop_assert_eq!(bits(p), bits(q));
        }
        let run = || match rs {
            Some(r) => {
                let (l, g, gr) = d.cfg.loss_and_grad_with_row_scale(&d.input, &d.targets, r).unwrap();
                (bits(&l), bits(&g), bits(&gr))
            }
            None => {
                let (l, g) = d.cfg.loss_and_grad(&d.input, &d.targets).unwrap();
                (bits(&l), bits(&g), Vec::new())
            }
        };
        let (r1, r2) = (run(), run());
        prop_assert_eq!(r1, r2);
    }
}

/// Determinism on a shape big enough for the op to split work across threads.
#[test]
fn deterministic_large() {
    let dev = device();
    let (b, c) = (64usize, 10000usize);
    for (hn, head) in [("arcface", Head::arcface()), ("rbf", Head::rbf())] {
        for dt in [DType::F32, DType::BF16] {
            let mut r = rng(seed_of(&format!("det large {hn}")));
            let t = gen_targets(&mut r, b, c, true);
            let x = gen_input(&mut r, &head, b, c, &t);
            let cfg = Opts::combo().cfg(head, c, dt, &dev, 1).unwrap();
            let input = input_tensor(&x, b, c, dt, &dev).unwrap();
            let targets = targets_i64(&t, &dev).unwrap();
            let rs = Tensor::from_vec(gen_row_scale(&mut r, b), b, &dev)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let run = || {
                let (l, g) = cfg.loss_and_grad(&input, &targets).unwrap();
                let (l2, g2, gr) = cfg
                    .loss_and_grad_with_row_scale(&input, &targets, &rs)
                    .unwrap();
                let a = autograd(Side::Fused, &cfg, &input, &targets, None).unwrap();
                [l, g, l2, g2, gr, a.loss, a.dx].map(|t| bits(&t))
            };
            assert!(run() == run(), "{hn} {dt:?}: two runs differ");
        }
    }
}

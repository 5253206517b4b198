//! Class-sharded heads ([`MarginHead::sharded_loss`]) against the unsharded head: N = 1, 2, 3, 7
//! ranks in one process (the in-process communicator, one thread per rank), uneven slices, a
//! slice of one class, a rank that owns no target; every head and criterion option; the loss and
//! every rank's gradients (its W slice and bias slice, the embeddings' gradient summed over
//! ranks) equal the unsharded head's to 1e-12 in f64, and to the f32 tolerance in f32; every rank
//! gets the same bits, whatever order the ranks start in.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_margin_softmax::{
    ClassShard, Communicator, ElasticFace, Head, InProcessGroup, MagFace, MarginHead,
};

use crate::common::{GridFailures, IGNORE, Opts, compare, main_heads, seed_of, vec_f64};
use crate::heads::{Case, Layout, case, head_options, of_head, root_of};

/// What one rank returns: loss, d/d embeddings, d/dW of its slice, d/d bias of its slice.
type RankResult = (Vec<f64>, Vec<f64>, Tensor, Option<Tensor>);

/// The head's settings beyond its configuration (the feature-norm scale, MagFace, ...), applied
/// to every rank's head and to the unsharded one.
type Adapt<'a> = dyn Fn(MarginHead) -> Result<MarginHead> + Sync + 'a;

/// Runs the ranks of `shards`, one thread each, started in `order` (rank indices).
fn run_sharded(
    cfg: &candle_margin_softmax::MarginSoftmaxLoss,
    c: &Case,
    shards: &[ClassShard],
    chunk: Option<usize>,
    adapt: &Adapt<'_>,
    order: &[usize],
) -> Result<Vec<RankResult>> {
    on_ranks(shards.len(), order, |rank, comm| {
        let shard = shards[rank];
        // This rank's own parameters: its slice of W (and of the bias), and its copy of the
        // embeddings.
        let w = Var::from_tensor(
            &c.w.as_tensor()
                .narrow(0, shard.offset, shard.count)?
                .copy()?,
        )?;
        let b = match &c.b {
            Some(b) => Some(Var::from_tensor(
                &b.as_tensor().narrow(0, shard.offset, shard.count)?.copy()?,
            )?),
            None => None,
        };
        let f = Var::from_tensor(&c.f.as_tensor().copy()?)?;
        let mut head = adapt(MarginHead::from_weight(
            cfg.clone(),
            w.as_tensor().clone(),
            b.as_ref().map(|b| b.as_tensor().clone()),
        )?)?;
        if let Some(n) = chunk {
            head = head.chunk_classes(n)?;
        }
        let loss = head.sharded_loss(f.as_tensor(), &c.targets, shard, comm)?;
        let grads = root_of(&loss, &c.upstream)?.backward()?;
        let get = |v: &Var| {
            grads
                .get(v)
                .cloned()
                .ok_or_else(|| candle_core::Error::Msg("no gradient".into()))
        };
        Ok((
            vec_f64(&loss)?,
            vec_f64(&get(&f)?)?,
            get(&w)?,
            match &b {
                Some(b) => Some(get(b)?),
                None => None,
            },
        ))
    })
}

/// Shard layouts of `classes` classes: one rank; two even; three uneven with a slice of one
/// class; seven (some of one or two classes).
fn shard_layouts(classes: usize) -> Vec<(&'static str, Vec<ClassShard>)> {
    let even = |n: usize| -> Vec<ClassShard> {
        (0..n)
            .map(|r| ClassShard::even(classes, n, r).expect("shard"))
            .collect()
    };
    let uneven = |counts: &[usize]| -> Vec<ClassShard> {
        let mut offset = 0;
        counts
            .iter()
            .map(|&count| {
                let s = ClassShard {
                    offset,
                    count,
                    total: classes,
                };
                offset += count;
                s
            })
            .collect()
    };
    vec![
        ("n1", even(1)),
        ("n2", even(2)),
        ("n3_uneven", uneven(&[1, classes - 8, 7])),
        ("n7", even(7)),
    ]
}

fn check_ranks(
    label: &str,
    got: &[RankResult],
    want: &(Tensor, Tensor, Tensor, Option<Tensor>),
    shards: &[ClassShard],
    tol: (f64, f64),
) -> std::result::Result<(), String> {
    let e = |e: candle_core::Error| format!("{label}: {e}");
    let want_loss = vec_f64(&want.0).map_err(e)?;
    let want_df = vec_f64(&want.1).map_err(e)?;
    for (rank, (r, shard)) in got.iter().zip(shards).enumerate() {
        // Every rank holds the same bits as rank 0.
        if r.0 != got[0].0 || r.1 != got[0].1 {
            return Err(format!(
                "{label}: rank {rank}'s loss or d/df differs from rank 0's"
            ));
        }
        crate::common::compare_vec(&format!("{label} loss"), &r.0, &want_loss, tol.0, 1.0)?;
        crate::common::compare_vec(&format!("{label} d/df"), &r.1, &want_df, tol.1, 1e-6)?;
        let dw = want.2.narrow(0, shard.offset, shard.count).map_err(e)?;
        compare(&format!("{label} rank {rank} d/dW"), &r.2, &dw, tol.1, 1e-6)?;
        if let (Some(got_b), Some(want_b)) = (&r.3, &want.3) {
            let db = want_b.narrow(0, shard.offset, shard.count).map_err(e)?;
            compare(
                &format!("{label} rank {rank} d/db"),
                got_b,
                &db,
                tol.1,
                1e-6,
            )?;
        }
    }
    Ok(())
}

/// Every head × option set × shard layout × chunk size, in `dtype`, against the unsharded head.
fn shard_grid(dtype: DType, tol: (f64, f64), chunks: &[Option<usize>]) {
    let dev = Device::Cpu;
    let mut heads: Vec<(String, Head, bool, bool)> = main_heads()
        .into_iter()
        .map(|(n, h)| (n.to_string(), h, false, false))
        .collect();
    heads.push(("softmax_bias".into(), Head::softmax(), true, false));
    heads.push(("sphereface_norm".into(), Head::sphereface(0.0), false, true));
    let layout = Layout {
        rows: 9,
        dim: 5,
        classes: 23,
        bias: false,
    };
    let mut grid = GridFailures::default();
    for (hname, head, bias, feature_norm) in &heads {
        for (oname, opts) in head_options() {
            for (sname, shards) in shard_layouts(layout.classes) {
                for chunk in chunks {
                    let label = format!("{hname}/{oname}/{sname}/chunk{chunk:?}/{dtype:?}");
                    let run = || -> std::result::Result<(), String> {
                        let e = |e: candle_core::Error| format!("{label}: {e}");
                        let l = Layout {
                            bias: *bias,
                            ..layout
                        };
                        let c = case(&label, l, &opts, dtype, &dev).map_err(e)?;
                        let cfg = opts
                            .cfg(*head, l.classes, DType::F64, &dev, seed_of(&label))
                            .map_err(e)?
                            .ignore_index(Some(IGNORE));
                        let whole = MarginHead::from_weight(
                            cfg.clone(),
                            c.w.as_tensor().clone(),
                            c.b.as_ref().map(|b| b.as_tensor().clone()),
                        )
                        .and_then(|h| h.feature_norm_scale(*feature_norm))
                        .map_err(e)?;
                        let want = of_head(&whole, &c).map_err(e)?;
                        // Ranks started in reverse order: the result must not depend on it.
                        let order: Vec<usize> = (0..shards.len()).rev().collect();
                        let adapt = |h: MarginHead| h.feature_norm_scale(*feature_norm);
                        let got =
                            run_sharded(&cfg, &c, &shards, *chunk, &adapt, &order).map_err(e)?;
                        check_ranks(&label, &got, &want, &shards, tol)
                    };
                    grid.cell(run);
                }
            }
        }
    }
    grid.assert_none();
}

#[test]
fn sharded_heads_match_unsharded_f64() {
    shard_grid(DType::F64, (1e-12, 1e-12), &[Some(2), None]);
}

#[test]
fn sharded_heads_match_unsharded_f32() {
    shard_grid(DType::F32, (2e-6, 1e-5), &[Some(3)]);
}

/// A rank that owns no target of the batch, and the results' independence of the ranks' start
/// order (forward, reverse, interleaved: the same bits).
#[test]
fn rank_without_targets_and_start_order() -> Result<()> {
    let dev = Device::Cpu;
    let layout = Layout {
        rows: 8,
        dim: 4,
        classes: 17,
        bias: false,
    };
    let opts = Opts::combo();
    let c0 = case("no_targets", layout, &opts, DType::F64, &dev)?;
    // Targets only among the first 5 classes (or ignored): ranks 1 and 2 own none.
    let t: Vec<i64> = vec![0, 4, IGNORE, 2, 2, 1, 3, IGNORE];
    let c = Case {
        targets: Tensor::new(t.as_slice(), &dev)?,
        ..c0
    };
    let cfg = opts
        .cfg(Head::arcface(), layout.classes, DType::F64, &dev, 5)?
        .ignore_index(Some(IGNORE));
    let shards = [
        ClassShard {
            offset: 0,
            count: 5,
            total: 17,
        },
        ClassShard {
            offset: 5,
            count: 9,
            total: 17,
        },
        ClassShard {
            offset: 14,
            count: 3,
            total: 17,
        },
    ];
    let whole = MarginHead::from_weight(cfg.clone(), c.w.as_tensor().clone(), None)?;
    let want = of_head(&whole, &c)?;
    let mut first: Option<Vec<RankResult>> = None;
    for order in [[0, 1, 2], [2, 1, 0], [1, 2, 0]] {
        let got = run_sharded(&cfg, &c, &shards, Some(2), &Ok, &order)?;
        check_ranks("no_targets", &got, &want, &shards, (1e-12, 1e-12))
            .map_err(candle_core::Error::Msg)?;
        match &first {
            None => first = Some(got),
            Some(f) => {
                for (a, b) in f.iter().zip(&got) {
                    assert_eq!(a.0, b.0, "loss bits depend on the start order");
                    assert_eq!(a.1, b.1, "d/df bits depend on the start order");
                    assert_eq!(
                        vec_f64(&a.2)?,
                        vec_f64(&b.2)?,
                        "d/dW bits depend on the order"
                    );
                }
            }
        }
    }
    Ok(())
}

/// MagFace (norms inside its range, so that the margin's gradient flows) and ElasticFace
/// sharded over N = 1, 2, 3 and 7 ranks: every rank the unsharded head's loss and gradients.
#[test]
fn sharded_magface_and_elasticface_match_unsharded() -> Result<()> {
    let dev = Device::Cpu;
    let layout = Layout {
        rows: 8,
        dim: 6,
        classes: 17,
        bias: false,
    };
    let opts = Opts::combo();
    let magface = MagFace {
        l_a: 1.0,
        u_a: 5.0,
        ..MagFace::default()
    };
    let elastic = ElasticFace {
        seed: 3,
        ..ElasticFace::default()
    };
    let adaptive: [(&str, Head, &Adapt<'_>); 3] = [
        ("magface", MagFace::head(), &|h: MarginHead| {
            h.magface(magface)
        }),
        (
            "elastic_arcface",
            ElasticFace::arcface_head(),
            &|h: MarginHead| h.elastic(elastic),
        ),
        (
            "elastic_cosface",
            ElasticFace::cosface_head(),
            &|h: MarginHead| h.elastic(elastic),
        ),
    ];
    for (name, head, adapt) in adaptive {
        let c = case(name, layout, &opts, DType::F64, &dev)?;
        let cfg = opts
            .cfg(head, layout.classes, DType::F64, &dev, 9)?
            .ignore_index(Some(IGNORE));
        let whole = adapt(MarginHead::from_weight(
            cfg.clone(),
            c.w.as_tensor().clone(),
            None,
        )?)?;
        let want = of_head(&whole, &c)?;
        for (sname, shards) in shard_layouts(layout.classes) {
            let order: Vec<usize> = (0..shards.len()).collect();
            let got = run_sharded(&cfg, &c, &shards, Some(3), adapt, &order)?;
            check_ranks(
                &format!("{name}/{sname}"),
                &got,
                &want,
                &shards,
                (1e-12, 1e-12),
            )
            .map_err(candle_core::Error::Msg)?;
        }
    }
    Ok(())
}

/// Bad shards: an `Err` naming the op.
#[test]
fn shard_errors() -> Result<()> {
    let dev = Device::Cpu;
    let cfg = candle_margin_softmax::MarginSoftmaxLoss::new(Head::arcface());
    let w = Tensor::ones((4, 3), DType::F32, &dev)?;
    let head = MarginHead::from_weight(cfg, w, None)?;
    let comm: Arc<dyn Communicator> = Arc::new(InProcessGroup::new(1)?.remove(0));
    let f = Tensor::ones((2, 3), DType::F32, &dev)?;
    let t = Tensor::new(&[0u32, 1], &dev)?;
    let bad = [
        ClassShard {
            offset: 0,
            count: 5,
            total: 10,
        },
        ClassShard {
            offset: 8,
            count: 4,
            total: 10,
        },
        ClassShard {
            offset: 0,
            count: 0,
            total: 10,
        },
    ];
    for shard in bad {
        let msg = head
            .sharded_loss(&f, &t, shard, comm.clone())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains("margin_head"), "{shard:?}: {msg:?}");
    }
    assert!(ClassShard::even(10, 0, 0).is_err());
    assert!(ClassShard::even(10, 3, 3).is_err());
    assert!(InProcessGroup::new(0).is_err());
    Ok(())
}

/// Runs `rank_fn(rank, comm)` on one thread per rank, started in `order`; results by rank.
fn on_ranks<R: Send>(
    ranks: usize,
    order: &[usize],
    rank_fn: impl Fn(usize, Arc<dyn Communicator>) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    let comms: Vec<Arc<dyn Communicator>> = InProcessGroup::new(ranks)?
        .into_iter()
        .map(|c| Arc::new(c) as Arc<dyn Communicator>)
        .collect();
    let rank_fn = &rank_fn;
    let results: Vec<(usize, Result<R>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = order
            .iter()
            .map(|&rank| {
                let comm = comms[rank].clone();
                scope.spawn(move || (rank, rank_fn(rank, comm)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    });
    let mut by_rank: Vec<Option<R>> = (0..ranks).map(|_| None).collect();
    for (rank, r) in results {
        by_rank[rank] = Some(r?);
    }
    Ok(by_rank
        .into_iter()
        .map(|r| r.expect("every rank ran"))
        .collect())
}

/// The op-level sharded loss ([`MarginSoftmaxLoss::sharded_loss`]) against the op on the whole
/// input: every head variant and criterion option (each alone, all together, weighted smoothing,
/// soft-capping, every reduction), N = 1, 2, 3, 7; loss and each rank's input gradient (its
/// columns of the whole gradient), f64 to 1e-12 and f32 to 1e-5.
#[test]
fn sharded_op_matches_unsharded() {
    use crate::common::{
        gen_input, gen_targets, head_variants, input_tensor, options_alone, rng, softcap_options,
        weighted_smoothing_options,
    };
    use candle_margin_softmax::Reduction;
    let dev = Device::Cpu;
    let (b, c) = (7, 23);
    let mut options: Vec<(String, Opts)> = options_alone()
        .into_iter()
        .map(|(n, o)| (n.to_string(), o))
        .collect();
    options.push(("combo".into(), Opts::combo()));
    options.push((
        "combo_none".into(),
        Opts::combo().with_reduction(Reduction::None),
    ));
    options.push((
        "combo_sum".into(),
        Opts::combo().with_reduction(Reduction::Sum),
    ));
    options.extend(weighted_smoothing_options());
    options.extend(
        softcap_options()
            .into_iter()
            .map(|(n, o)| (n.to_string(), o)),
    );
    let mut grid = GridFailures::default();
    for dtype in [DType::F64, DType::F32] {
        let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
        for (hname, head) in head_variants() {
            for (oname, opts) in &options {
                for (sname, shards) in shard_layouts(c) {
                    let label = format!("{hname}/{oname}/{sname}/{dtype:?}");
                    let run = || -> std::result::Result<(), String> {
                        let e = |e: candle_core::Error| format!("{label}: {e}");
                        let mut r = rng(seed_of(&label));
                        let t = gen_targets(&mut r, b, c, opts.ignore);
                        let x = gen_input(&mut r, &head, b, c, &t);
                        let up: Vec<f64> = (0..b).map(|i| 0.5 + i as f64 / 3.0).collect();
                        let cfg = opts
                            .cfg(head, c, DType::F64, &dev, seed_of(&label))
                            .map_err(e)?
                            .ignore_index(Some(IGNORE));
                        let targets = crate::common::targets_i64(&t, &dev).map_err(e)?;
                        let upstream = Tensor::from_vec(up, b, &dev).map_err(e)?;
                        let whole =
                            Var::from_tensor(&input_tensor(&x, b, c, dtype, &dev).map_err(e)?)
                                .map_err(e)?;
                        let want = cfg.loss(whole.as_tensor(), &targets).map_err(e)?;
                        let want_grad = root_of(&want, &upstream)
                            .and_then(|r| r.backward())
                            .map_err(e)?
                            .get(&whole)
                            .cloned()
                            .ok_or(format!("{label}: no gradient"))?;
                        let order: Vec<usize> = (0..shards.len()).rev().collect();
                        let got = on_ranks(shards.len(), &order, |rank, comm| {
                            let s = shards[rank];
                            let mine = Var::from_tensor(
                                &whole.as_tensor().narrow(1, s.offset, s.count)?.copy()?,
                            )?;
                            let loss = cfg.sharded_loss(mine.as_tensor(), &targets, s, comm)?;
                            let grads = root_of(&loss, &upstream)?.backward()?;
                            Ok((vec_f64(&loss)?, grads.get(&mine).cloned()))
                        });
                        let got = match got {
                            Ok(g) => g,
                            Err(err) => return Err(format!("{label}: {err}")),
                        };
                        let want_loss = vec_f64(&want).map_err(e)?;
                        for (rank, ((loss, grad), s)) in got.iter().zip(&shards).enumerate() {
                            if *loss != got[0].0 {
                                return Err(format!("{label}: rank {rank}'s loss bits differ"));
                            }
                            crate::common::compare_vec(
                                &format!("{label} loss"),
                                loss,
                                &want_loss,
                                tol,
                                1.0,
                            )?;
                            let grad = grad.as_ref().ok_or(format!("{label}: no gradient"))?;
                            let cols = want_grad.narrow(1, s.offset, s.count).map_err(e)?;
                            compare(&format!("{label} rank {rank} grad"), grad, &cols, tol, 1e-6)?;
                        }
                        Ok(())
                    };
                    grid.cell(run);
                }
            }
        }
    }
    grid.assert_none();
}

//! Sub-center ArcFace (`MarginHead::sub_centers`): the loss and the gradients into the
//! embeddings and W against the composition (normalize, matmul, the max over each class's K
//! sub-centers, `reference::loss`, candle autograd, f64) over chunk sizes, reductions, options
//! and dtypes; the evaluation cosines; the after-training outliers and dominant centres on a
//! layout built by hand; the errors.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_margin_softmax::{
    ClassShard, Communicator, Head, InProcessGroup, MarginHead, MarginSoftmaxLoss, Reduction,
    reference,
};

use crate::common::{GridFailures, Opts, cell_verdict, compare, first_line, required_grad};
use crate::heads::{Layout, case, normalize, root_of};

const K: usize = 3;

#[test]
fn sub_center_matches_the_composition() {
    sub_center_grid(
        &Device::Cpu,
        &[DType::F64, DType::F32],
        &[None, Some(2), Some(1)],
    );
}

/// The sub-center grid on `dev` (the emulated kernels run it too: `kernels::head_modules`).
pub fn sub_center_grid(dev: &Device, dtypes: &[DType], chunks: &[Option<usize>]) {
    let layout = Layout {
        rows: 6,
        dim: 8,
        classes: 5 * K,
        bias: false,
    };
    let option_sets: Vec<(&str, Opts)> = vec![
        ("plain", Opts::default()),
        ("combo", Opts::combo()),
        ("per_row", Opts::combo().with_reduction(Reduction::None)),
    ];
    let mut grid = GridFailures::default();
    for (head_name, head) in [("arcface", Head::arcface()), ("cosface", Head::cosface())] {
        for &dtype in dtypes {
            for (opts_name, opts) in &option_sets {
                for &chunk in chunks {
                    let label =
                        format!("sub_center/{head_name}/{dtype:?}/{opts_name}/chunk{chunk:?}");
                    grid.cell(|| {
                        cell_verdict(&label, || {
                            // The case's targets are drawn among C·K "classes": fold them to C.
                            let c = case(&label, layout, opts, dtype, dev)?;
                            let t: Vec<i64> = c
                                .targets
                                .to_vec1::<i64>()?
                                .iter()
                                .map(|&y| {
                                    if y < 0 {
                                        y
                                    } else {
                                        y % (layout.classes / K) as i64
                                    }
                                })
                                .collect();
                            let y = Tensor::from_vec(t, layout.rows, dev)?;
                            let classes = layout.classes / K;
                            let cfg = opts.cfg(head, classes, dtype, dev, 3)?;
                            let mut module = MarginHead::from_weight(
                                cfg.clone(),
                                c.w.as_tensor().clone(),
                                None,
                            )?
                            .sub_centers(K)?;
                            if let Some(k) = chunk {
                                module = module.chunk_classes(k)?;
                            }
                            let loss = module.loss(c.f.as_tensor(), &y)?;
                            let grads = root_of(&loss, &c.upstream)?.backward()?;
                            // The composition, in f64.
                            let f = Var::from_tensor(&c.f.as_tensor().to_dtype(DType::F64)?)?;
                            let w = Var::from_tensor(&c.w.as_tensor().to_dtype(DType::F64)?)?;
                            let all = normalize(f.as_tensor())?
                                .matmul(&normalize(w.as_tensor())?.t()?)?;
                            let cos = all.reshape((layout.rows, classes, K))?.max(2)?;
                            let want = reference::loss(&cfg.clone().check_targets(true), &cos, &y)?;
                            let want_grads = root_of(&want, &c.upstream)?.backward()?;
                            // Evaluation: each class's largest sub-center cosine.
                            let eval = module.cosines(c.f.as_tensor())?;
                            let tol = if dtype == DType::F64 { 1e-9 } else { 2e-4 };
                            Ok(vec![
                                compare("loss", &loss, &want, tol, 1.0),
                                compare(
                                    "d/d embeddings",
                                    &required_grad(&grads, &c.f)?,
                                    &required_grad(&want_grads, &f)?,
                                    tol,
                                    1e-6,
                                ),
                                compare(
                                    "d/dW",
                                    &required_grad(&grads, &c.w)?,
                                    &required_grad(&want_grads, &w)?,
                                    tol,
                                    1e-6,
                                ),
                                compare("cosines", &eval, &cos, tol, 1.0),
                            ])
                        })
                    });
                }
            }
        }
    }
    grid.assert_none();
}

/// Two classes of three sub-centers on the axes of R⁴; class 0's samples sit near e1 (three) and
/// e0 (one), class 1's near e3 (two, one of them at 80° from it). Dominant: sub-center 1 of
/// class 0 (e1) and sub-center 0 of class 1 (e3); outliers at 75°: the class-0 sample near e0
/// (90° from e1) and the class-1 sample at 80°.
#[test]
fn sub_center_outliers_on_a_layout_built_by_hand() -> Result<()> {
    let dev = Device::Cpu;
    let e = |i: usize| -> Vec<f64> {
        let mut v = vec![0.0; 4];
        v[i] = 1.0;
        v
    };
    // W rows: class 0 = (e0, e1, e2), class 1 = (e3, −e0, −e1), scaled to show the centres are
    // returned as stored.
    let mut w: Vec<f64> = Vec::new();
    for (row, scale) in [(e(0), 2.0), (e(1), 3.0), (e(2), 1.0), (e(3), 0.5)] {
        w.extend(row.iter().map(|v| v * scale));
    }
    w.extend(e(0).iter().map(|v| -v));
    w.extend(e(1).iter().map(|v| -v));
    let w = Tensor::from_vec(w, (6, 4), &dev)?;
    let a80 = 80f64.to_radians();
    let f: Vec<f64> = [
        vec![0.1, 1.0, 0.0, 0.0],
        vec![0.0, 1.0, 0.2, 0.0],
        vec![0.05, 1.0, 0.05, 0.0],
        vec![1.0, 0.0, 0.0, 0.0],
        vec![0.0, 0.0, 0.1, 1.0],
        vec![0.0, 0.0, a80.sin(), a80.cos()],
    ]
    .concat();
    let f = Tensor::from_vec(f, (6, 4), &dev)?;
    let y = Tensor::new(&[0u32, 0, 0, 0, 1, 1], &dev)?;
    let head = MarginHead::from_weight(MarginSoftmaxLoss::new(Head::arcface()), w.clone(), None)?
        .sub_centers(3)?;
    let got = head.sub_center_outliers(&f, &y, 75.0)?;
    assert_eq!(got.dominant, vec![1, 0]);
    assert_eq!(got.outliers, vec![3, 5]);
    let want = Tensor::cat(&[w.get(1)?.unsqueeze(0)?, w.get(3)?.unsqueeze(0)?], 0)?;
    assert_eq!(
        got.dominant_centers.to_vec2::<f64>()?,
        want.to_vec2::<f64>()?
    );
    // At 85° the 80° sample is kept.
    assert_eq!(head.sub_center_outliers(&f, &y, 85.0)?.outliers, vec![3]);
    Ok(())
}

#[test]
fn sub_center_errors_name_the_op() -> Result<()> {
    let dev = Device::Cpu;
    let w = Tensor::ones((6, 4), DType::F32, &dev)?;
    let head = |h: Head| MarginHead::from_weight(MarginSoftmaxLoss::new(h), w.clone(), None);
    let err = |r: Result<MarginHead>| first_line(&r.err().expect("an error"));
    assert_eq!(
        err(head(Head::arcface())?.sub_centers(0)),
        "margin_head(arcface): the number of sub-centers must be at least 1"
    );
    assert_eq!(
        err(head(Head::softmax())?.sub_centers(2)),
        "margin_head(softmax): sub-centers need a cosine head"
    );
    assert_eq!(
        err(head(Head::arcface())?.sub_centers(4)),
        "margin_head(arcface): W's 6 rows are not a multiple of 4 sub-centers"
    );
    assert_eq!(
        err(head(Head::arcface())?.sub_centers(2)?.partial_fc(0.5, 1)),
        "margin_head(arcface): Partial FC is not supported with sub-centers yet"
    );
    assert_eq!(
        err(head(Head::arcface())?.partial_fc(0.5, 1)?.sub_centers(2)),
        "margin_head(arcface): Partial FC is not supported with sub-centers yet"
    );
    let module = head(Head::arcface())?.sub_centers(2)?;
    assert_eq!(module.classes(), 3);
    let comm: Arc<dyn Communicator> = Arc::new(InProcessGroup::new(1)?.pop().expect("one rank"));
    let f = Tensor::ones((2, 4), DType::F32, &dev)?;
    let y = Tensor::new(&[0u32, 1], &dev)?;
    let shard = ClassShard {
        offset: 0,
        count: 3,
        total: 3,
    };
    let e = module.sharded_loss(&f, &y, shard, comm).unwrap_err();
    assert!(
        first_line(&e).contains("sub-centers are not supported with a sharded loss yet"),
        "{e}"
    );
    Ok(())
}

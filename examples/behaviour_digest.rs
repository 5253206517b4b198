//! A fingerprint of the crate's observable behaviour, for refactors that must change nothing:
//! every public entry point over a fixed grid (each head × option set × dtype × shape, seeded
//! inputs), with the bits of every output (loss, gradients of the input, the row scale, W and
//! the embeddings) and the text of every error hashed, one line per case. Run it before and
//! after a change and compare the two files: equal lines mean bitwise-equal results.
//!
//! ```text
//! cargo run --example behaviour_digest > before.txt           # the CPU bodies
//! cargo run --features kernel-emu --example behaviour_digest  # also the emulated CUDA kernels
//! diff before.txt after.txt && echo bitwise equal
//! ```
//!
//! The hash is std's `DefaultHasher::new()` (fixed keys): stable for one Rust toolchain, so
//! compare files made with the same one.

use std::hash::{DefaultHasher, Hasher};
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_margin_softmax::{
    ClassShard, Communicator, Head, InProcessGroup, MarginGrad, MarginHead, MarginSoftmaxLoss,
    Reduction, reference,
};

/// SplitMix64: a seeded stream of uniform values in [lo, hi).
struct Stream(u64);

impl Stream {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn uniform(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f64> {
        (0..n)
            .map(|_| lo + (hi - lo) * (self.next() >> 11) as f64 / (1u64 << 53) as f64)
            .collect()
    }
}

/// The bits of a tensor (any dtype), hashed.
fn hash_tensor(h: &mut DefaultHasher, t: &Tensor) -> Result<()> {
    h.write(format!("{:?}{:?}", t.dtype(), t.dims()).as_bytes());
    let flat = t.flatten_all()?;
    match t.dtype() {
        DType::F64 => flat
            .to_vec1::<f64>()?
            .iter()
            .for_each(|v| h.write_u64(v.to_bits())),
        DType::F32 => flat
            .to_vec1::<f32>()?
            .iter()
            .for_each(|v| h.write_u32(v.to_bits())),
        DType::F16 => flat
            .to_vec1::<half::f16>()?
            .iter()
            .for_each(|v| h.write_u16(v.to_bits())),
        DType::BF16 => flat
            .to_vec1::<half::bf16>()?
            .iter()
            .for_each(|v| h.write_u16(v.to_bits())),
        DType::U32 => flat.to_vec1::<u32>()?.iter().for_each(|v| h.write_u32(*v)),
        other => h.write(format!("{other:?}").as_bytes()),
    }
    Ok(())
}

/// One line: the case's name and the hash of its outputs, or of its error's text.
fn report(case: &str, outputs: Result<Vec<Tensor>>) {
    let mut h = DefaultHasher::new();
    let kind = match outputs {
        Ok(ts) => match ts.iter().try_for_each(|t| hash_tensor(&mut h, t)) {
            Ok(()) => "ok",
            Err(e) => {
                h.write(e.to_string().as_bytes());
                "err"
            }
        },
        Err(e) => {
            h.write(e.to_string().as_bytes());
            "err"
        }
    };
    println!("{case} {kind} {:016x}", h.finish());
}

fn heads() -> Vec<Head> {
    vec![
        Head::softmax(),
        Head::cosface(),
        Head::arcface(),
        Head::ArcFace {
            s: 32.0,
            m: 0.4,
            easy_margin: true,
        },
        Head::combined(),
        Head::sphereface(5.0),
        Head::rbf(),
    ]
}

/// Option sets, each applied to every head.
fn options(
    head: Head,
    classes: usize,
    dev: &Device,
) -> Vec<(&'static str, Result<MarginSoftmaxLoss>)> {
    let weights = Tensor::new(
        (0..classes)
            .map(|j| 0.5 + (j % 5) as f32 * 0.25)
            .collect::<Vec<_>>(),
        dev,
    );
    vec![
        ("plain", Ok(MarginSoftmaxLoss::new(head))),
        (
            "ls_focal_poly_z_none",
            Ok(MarginSoftmaxLoss::new(head)
                .label_smoothing(0.1)
                .focal_gamma(2.0)
                .poly(&[1.0, 0.5])
                .z_loss(1e-4)
                .reduction(Reduction::None)),
        ),
        (
            "weights_ignore_exact_sum",
            weights.and_then(|w| {
                Ok(MarginSoftmaxLoss::new(head)
                    .label_smoothing(0.2)
                    .class_weights(w)?
                    .ignore_index(Some(-100))
                    .margin_grad(MarginGrad::Exact)
                    .reduction(Reduction::Sum))
            }),
        ),
        (
            "softcap",
            Ok(MarginSoftmaxLoss::new(head).logit_softcap(30.0)),
        ),
    ]
}

/// Inputs in the head's domain: cosines for the cosine heads, logits for softmax, squared
/// distances for RBF.
fn input(head: &Head, rows: usize, classes: usize, s: &mut Stream) -> Vec<f64> {
    match head {
        Head::Softmax { .. } => s.uniform(rows * classes, -4.0, 4.0),
        Head::Rbf { .. } => s.uniform(rows * classes, 0.0, 60.0),
        _ => s.uniform(rows * classes, -1.0, 1.0),
    }
}

fn targets(
    rows: usize,
    classes: usize,
    ignore: bool,
    s: &mut Stream,
    dev: &Device,
) -> Result<Tensor> {
    let t: Vec<i64> = (0..rows)
        .map(|i| {
            if ignore && i % 4 == 3 {
                -100
            } else {
                (s.next() % classes as u64) as i64
            }
        })
        .collect();
    Tensor::new(t, dev)
}

/// Every op entry point for one configuration.
fn op_cases(prefix: &str, dev: &Device) {
    let shapes = [(5usize, 7usize), (9, 300), (3, 5000)];
    let dtypes = [DType::F32, DType::F64, DType::F16, DType::BF16];
    for head in heads() {
        for &(rows, classes) in &shapes {
            for (opt_name, cfg) in options(head, classes, dev) {
                for dtype in dtypes {
                    let case = format!(
                        "{prefix} {} {opt_name} {rows}x{classes} {dtype:?}",
                        head_label(&head)
                    );
                    let mut s = Stream(0x5eed ^ (rows * 131 + classes) as u64);
                    let x = input(&head, rows, classes, &mut s);
                    let t = match targets(rows, classes, opt_name.contains("ignore"), &mut s, dev) {
                        Ok(t) => t,
                        Err(e) => return report(&case, Err(e)),
                    };
                    let cfg = match &cfg {
                        Ok(c) => c.clone(),
                        Err(e) => {
                            report(&case, Err(candle_core::Error::Msg(e.to_string())));
                            continue;
                        }
                    };
                    let make =
                        || Tensor::from_vec(x.clone(), (rows, classes), dev)?.to_dtype(dtype);
                    report(
                        &format!("{case} loss+backward"),
                        (|| {
                            let v = Var::from_tensor(&make()?)?;
                            let loss = cfg.loss(v.as_tensor(), &t)?;
                            let grads = loss.sum_all()?.backward()?;
                            let g = grads.get(&v).cloned().unwrap_or(loss.zeros_like()?);
                            Ok(vec![loss, g])
                        })(),
                    );
                    report(
                        &format!("{case} loss_and_grad"),
                        (|| {
                            let (l, g) = cfg.loss_and_grad(&make()?, &t)?;
                            Ok(vec![l, g])
                        })(),
                    );
                    report(
                        &format!("{case} loss_and_grad_into"),
                        (|| {
                            let x = make()?;
                            let g = x.zeros_like()?;
                            let l = cfg.loss_and_grad_into(&x, &t, &g)?;
                            Ok(vec![l, g])
                        })(),
                    );
                    report(
                        &format!("{case} row_scale"),
                        (|| {
                            let acc = if dtype == DType::F64 {
                                DType::F64
                            } else {
                                DType::F32
                            };
                            let norms = Tensor::from_vec(s.uniform(rows, 5.0, 20.0), rows, dev)?
                                .to_dtype(acc)?;
                            let vs = Var::from_tensor(&norms)?;
                            let vx = Var::from_tensor(&make()?)?;
                            let loss =
                                cfg.loss_with_row_scale(vx.as_tensor(), &t, vs.as_tensor())?;
                            let grads = loss.sum_all()?.backward()?;
                            let mut out = vec![loss.clone()];
                            for v in [&vx, &vs] {
                                out.push(grads.get(v).cloned().unwrap_or(loss.zeros_like()?));
                            }
                            let (l2, g2, gs2) =
                                cfg.loss_and_grad_with_row_scale(&make()?, &t, &norms)?;
                            out.extend([l2, g2, gs2]);
                            Ok(out)
                        })(),
                    );
                    if dtype == DType::F64 && rows * classes <= 3000 {
                        report(
                            &format!("{case} reference"),
                            (|| {
                                let v = Var::from_tensor(&make()?)?;
                                let loss = reference::loss(&cfg, v.as_tensor(), &t)?;
                                let grads = loss.sum_all()?.backward()?;
                                let g = grads.get(&v).cloned().unwrap_or(loss.zeros_like()?);
                                Ok(vec![loss, g])
                            })(),
                        );
                    }
                }
            }
        }
    }
}

fn head_label(head: &Head) -> String {
    match head {
        Head::ArcFace {
            easy_margin: true, ..
        } => "arcface_easy".into(),
        h => h.name().to_lowercase(),
    }
}

/// `MarginHead` over raw embeddings: loss and gradients into the embeddings and W, chunked,
/// Partial FC, and the sharded loss over in-process ranks.
fn head_cases(prefix: &str, dev: &Device) {
    let (rows, dim, classes) = (6usize, 5usize, 23usize);
    for head in heads() {
        for dtype in [DType::F32, DType::F64, DType::BF16] {
            let label = format!("{prefix} head {} {dtype:?}", head_label(&head));
            let mut s = Stream(0xfeed);
            let w = s.uniform(classes * dim, -1.0, 1.0);
            let f = s.uniform(rows * dim, -2.0, 2.0);
            let t = match targets(rows, classes, false, &mut s, dev) {
                Ok(t) => t,
                Err(e) => return report(&label, Err(e)),
            };
            let cfg = MarginSoftmaxLoss::new(head).label_smoothing(0.1);
            let run = |chunk: Option<usize>, pfc: bool| -> Result<Vec<Tensor>> {
                let wv = Var::from_tensor(
                    &Tensor::from_vec(w.clone(), (classes, dim), dev)?.to_dtype(dtype)?,
                )?;
                let fv = Var::from_tensor(
                    &Tensor::from_vec(f.clone(), (rows, dim), dev)?.to_dtype(dtype)?,
                )?;
                let mut m = MarginHead::from_weight(cfg.clone(), wv.as_tensor().clone(), None)?;
                if let Some(n) = chunk {
                    m = m.chunk_classes(n)?;
                }
                if pfc {
                    m = m.partial_fc(0.5, 7)?;
                }
                let loss = m.loss(fv.as_tensor(), &t)?;
                let grads = loss.backward()?;
                let mut out = vec![loss.clone()];
                for v in [&fv, &wv] {
                    out.push(grads.get(v).cloned().unwrap_or(loss.zeros_like()?));
                }
                out.push(if head.takes_cosine() {
                    m.cosines(fv.as_tensor())?
                } else {
                    m.logits(fv.as_tensor())?
                });
                out.push(m.predict(fv.as_tensor())?);
                Ok(out)
            };
            report(&format!("{label} whole"), run(None, false));
            report(&format!("{label} chunk5"), run(Some(5), false));
            report(&format!("{label} partial_fc"), run(None, true));
            report(
                &format!("{label} sharded3"),
                (|| {
                    let comms = InProcessGroup::new(3)?;
                    let handles: Vec<_> = comms
                        .into_iter()
                        .enumerate()
                        .map(|(rank, comm)| {
                            let (w, f, t, cfg, dev) =
                                (w.clone(), f.clone(), t.clone(), cfg.clone(), dev.clone());
                            std::thread::spawn(move || -> Result<Vec<Tensor>> {
                                let shard = ClassShard::even(classes, 3, rank)?;
                                let wt = Tensor::from_vec(w, (classes, dim), &dev)?
                                    .to_dtype(dtype)?
                                    .narrow(0, shard.offset, shard.count)?;
                                let wv = Var::from_tensor(&wt)?;
                                let fv = Var::from_tensor(
                                    &Tensor::from_vec(f, (rows, dim), &dev)?.to_dtype(dtype)?,
                                )?;
                                let m = MarginHead::from_weight(cfg, wv.as_tensor().clone(), None)?;
                                let comm: Arc<dyn Communicator> = Arc::new(comm);
                                let loss = m.sharded_loss(fv.as_tensor(), &t, shard, comm)?;
                                let grads = loss.backward()?;
                                let mut out = vec![loss.clone()];
                                for v in [&fv, &wv] {
                                    out.push(grads.get(v).cloned().unwrap_or(loss.zeros_like()?));
                                }
                                Ok(out)
                            })
                        })
                        .collect();
                    let mut all = Vec::new();
                    for h in handles {
                        all.extend(
                            h.join()
                                .map_err(|_| candle_core::Error::Msg("rank panicked".into()))??,
                        );
                    }
                    Ok(all)
                })(),
            );
        }
    }
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    op_cases("cpu", &dev);
    head_cases("cpu", &dev);
    #[cfg(feature = "kernel-emu")]
    {
        use candle_margin_softmax::kernel_emu::{DeviceShape, emulated, emulated_on};
        emulated(4, || op_cases("emu-cap4", &dev));
        emulated_on(65535, DeviceShape::H200, || op_cases("emu-h200", &dev));
        emulated(4, || head_cases("emu-cap4", &dev));
    }
    Ok(())
}

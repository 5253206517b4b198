//! What per-row margins cost over the head's fixed margins, CPU: `loss_and_grad` against
//! `loss_and_grad_with_row_margins` (every row its own margin) on the same input, ArcFace and
//! CosFace with label smoothing 0.1, interleaved call by call; prints the median of the paired
//! ratios (row margins / fixed) and both medians.
//!
//! `cargo bench --bench row_margins` (arguments after `--`: the shapes as `BxC`, default
//! `1024x32000 256x1000`; `PAIRS=n` sets the number of pairs, default 31).

mod common;

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use candle_margin_softmax::{Head, MarginSoftmaxLoss};
use common::{HeadKind, dtype_name, problem, shape_name};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let shapes: Vec<(usize, usize)> = if args.is_empty() {
        vec![(1024, 32000), (256, 1000)]
    } else {
        args.iter()
            .filter_map(|a| a.split_once('x'))
            .map(|(b, c)| (b.parse().unwrap(), c.parse().unwrap()))
            .collect()
    };
    let pairs: usize = std::env::var("PAIRS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(31);
    println!("shape dtype head fixed_ms row_margins_ms median_paired_ratio");
    for &(b, c) in &shapes {
        for head in [Head::arcface(), Head::cosface()] {
            let dtype = DType::F32;
            let p = problem(HeadKind::ArcFace, (b, c), dtype)?;
            let cfg = MarginSoftmaxLoss::new(head).label_smoothing(0.1);
            let mut rng = StdRng::seed_from_u64(0x6d61_7267 ^ b as u64);
            let m: Vec<f32> = (0..b).map(|_| rng.random_range(0.3..0.7)).collect();
            let margins = Tensor::from_vec(m, b, &Device::Cpu)?;
            let fixed = || -> Result<f64> {
                let t = Instant::now();
                std::hint::black_box(cfg.loss_and_grad(&p.input, &p.targets)?);
                Ok(t.elapsed().as_secs_f64() * 1e3)
            };
            let per_row = || -> Result<f64> {
                let t = Instant::now();
                std::hint::black_box(
                    cfg.loss_and_grad_with_row_margins(&p.input, &p.targets, &margins, None)?,
                );
                Ok(t.elapsed().as_secs_f64() * 1e3)
            };
            fixed()?;
            per_row()?;
            let (mut a, mut r, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
            for k in 0..pairs {
                // Alternate which goes first, so that neither always follows the other.
                let (fa, pr) = if k % 2 == 0 {
                    let fa = fixed()?;
                    (fa, per_row()?)
                } else {
                    let pr = per_row()?;
                    (fixed()?, pr)
                };
                a.push(fa);
                r.push(pr);
                ratios.push(pr / fa);
            }
            println!(
                "{} {} {} {:.3} {:.3} {:.3}",
                shape_name((b, c)),
                dtype_name(dtype),
                head.name(),
                median(a),
                median(r),
                median(ratios)
            );
        }
    }
    Ok(())
}

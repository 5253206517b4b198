//! The CPU row kernels at every SIMD level this machine has, interleaved.
//!
//! `cargo bench --bench cpu_levels` times, for every `BxC dtype head` case, the fused op's
//! `loss` (forward), `loss_and_grad` and `loss_and_grad_into` (a reused gradient buffer) with the
//! kernels forced to each level by `with_simd_level`, one call of each level in turn per cycle
//! (so that load changes on this shared machine hit every level alike), and prints the median
//! and the spread (25th–75th percentile) per level, and the ratio scalar / level.
//!
//! Arguments after `--`: words filter the cases as in `cpu_summary` (`1024x32000`, `bf16`,
//! `rbf`); `--cycles N` (default 15); `--pass NAME` runs one pass only (`loss`, `loss_and_grad`,
//! `into_buffer`, `autograd`); `--level NAME` one level only (`Scalar`, `Avx2`, ...; for profiles).

mod common;

use std::time::Instant;

use candle_core::{Result, Tensor};
use candle_margin_softmax::{SimdLevel, with_simd_level};
use common::{DTYPES, HEADS, SHAPES, dtype_name, problem, shape_name};

fn quartiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.25), at(0.5), at(0.75))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut cycles = 15;
    let mut only_pass = None;
    let mut only_level = None;
    let mut words = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--cycles" => cycles = it.next().and_then(|n| n.parse().ok()).unwrap_or(cycles),
            "--pass" => only_pass = it.next().cloned(),
            "--level" => only_level = it.next().cloned(),
            "--bench" => {}
            w if !w.starts_with('-') => words.push(w.to_string()),
            _ => {}
        }
    }
    let levels: Vec<SimdLevel> = SimdLevel::available()
        .into_iter()
        .filter(|l| only_level.as_ref().is_none_or(|o| *o == format!("{l:?}")))
        .collect();
    println!("levels: {levels:?}, {cycles} cycles, medians in ms [25th, 75th percentile]");
    println!(
        "{:<11} {:<5} {:<8} {:<14} {}",
        "shape",
        "dtype",
        "head",
        "pass",
        levels
            .iter()
            .map(|l| format!("{:>26}", format!("{l:?}")))
            .collect::<String>()
    );
    for shape in SHAPES {
        for dtype in DTYPES {
            for kind in HEADS {
                let case = format!(
                    "{} {} {}",
                    shape_name(shape),
                    dtype_name(dtype),
                    kind.name()
                );
                if !words.is_empty() && !words.iter().any(|w| case.contains(w.as_str())) {
                    continue;
                }
                let cfg = kind.config();
                let p = problem(kind, shape, dtype)?;
                let buffer = p.input.zeros_like()?;
                type Step<'a> = Box<dyn Fn() -> Result<()> + 'a>;
                let passes: [(&str, Step); 4] = [
                    (
                        "loss",
                        Box::new(|| {
                            std::hint::black_box(cfg.loss(&p.input, &p.targets)?);
                            Ok(())
                        }),
                    ),
                    (
                        "loss_and_grad",
                        Box::new(|| {
                            std::hint::black_box(cfg.loss_and_grad(&p.input, &p.targets)?);
                            Ok(())
                        }),
                    ),
                    (
                        "autograd",
                        Box::new(|| {
                            let loss = cfg.loss(p.var.as_tensor(), &p.targets)?;
                            std::hint::black_box(loss.backward()?);
                            Ok(())
                        }),
                    ),
                    (
                        "into_buffer",
                        Box::new(|| {
                            let loss: Tensor =
                                cfg.loss_and_grad_into(&p.input, &p.targets, &buffer)?;
                            std::hint::black_box(loss);
                            Ok(())
                        }),
                    ),
                ];
                for (name, step) in &passes {
                    if only_pass.as_ref().is_some_and(|p| p != name) {
                        continue;
                    }
                    let mut times = vec![Vec::new(); levels.len()];
                    for cycle in 0..=cycles {
                        for (l, &level) in levels.iter().enumerate() {
                            let t = Instant::now();
                            with_simd_level(level, step)??;
                            // The first cycle warms up.
                            if cycle > 0 {
                                times[l].push(t.elapsed().as_secs_f64() * 1e3);
                            }
                        }
                    }
                    let stats: Vec<_> = times.into_iter().map(quartiles).collect();
                    // The first level shown (Scalar unless --level) is the ratios' base.
                    let scalar = stats[0].1;
                    let cells: String = stats
                        .iter()
                        .map(|&(lo, med, hi)| {
                            format!(
                                "{:>26}",
                                format!("{med:.2} [{lo:.2},{hi:.2}] {:.2}x", scalar / med)
                            )
                        })
                        .collect();
                    println!("{case:<29}{name:<14} {cells}");
                }
            }
        }
    }
    Ok(())
}

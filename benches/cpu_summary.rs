//! The speed-up table and the peak memory of one training step, CPU.
//!
//! `cargo bench --bench cpu_summary` measures, in one run, the median time of the fused op and of
//! its baseline for every shape, dtype, head and pass, and prints
//! `shape dtype head pass fused_ms baseline baseline_ms ratio` (ratio = baseline / fused). The
//! baseline is `reference` (plain candle ops + autograd), or for `softmax-eps0`
//! `candle_nn::loss::cross_entropy`, which has no label smoothing: that comparison runs the fused
//! softmax head without smoothing too. Every other row uses label smoothing 0.1.
//!
//! Then it measures the peak heap memory of one step (loss + `backward()`, and `loss_and_grad`)
//! at 1024x32000 with a counting global allocator: the peak is reset before the step and the
//! bytes live before it (the input, the targets) are subtracted, so the figure is what the step
//! itself allocates at its peak, the returned gradient included. It is printed in MiB and in
//! units of B·C·sizeof(dtype) (one input-sized buffer).
//!
//! With `--pieces` it also times the pieces of one step at 1024x32000 (the fused passes, candle's
//! gradient accumulation, a fresh gradient-sized buffer's page faults), see benches/RESULTS.md.
//!
//! Arguments after `--`: words without a leading `-` keep only the cases whose
//! `BxC dtype head` contains one of them (e.g. `1024x32000`, `bf16`, `arcface`); `--no-time` and
//! `--no-memory` skip a part, `--pieces` adds one. The thread count is rayon's
//! (`RAYON_NUM_THREADS`). Timing: one warm-up call, then repeats until 2 s have passed
//! (at least 3, at most 21); the median is reported.

mod common;

#[path = "common/counting.rs"]
mod counting;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use candle_core::Result;
use candle_margin_softmax::MarginSoftmaxLoss;
use common::{
    DTYPES, HEADS, HeadKind, Pass, Problem, SHAPES, dtype_name, problem, run, shape_name,
};
use rayon::prelude::*;

use counting::{CURRENT, Counting, PEAK};

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The bytes one step allocates at its peak beyond what was live before it.
fn peak_bytes_of(step: impl FnOnce() -> Result<()>) -> Result<usize> {
    let before = CURRENT.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    step()?;
    Ok(PEAK.load(Ordering::Relaxed) - before)
}

const TIME_BUDGET: Duration = Duration::from_secs(2);
const MIN_REPS: usize = 3;
const MAX_REPS: usize = 21;

/// Median wall time in ms: one warm-up call, then repeats until [`TIME_BUDGET`] has passed.
fn median_ms(mut step: impl FnMut() -> Result<()>) -> Result<f64> {
    step()?;
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < MIN_REPS || (start.elapsed() < TIME_BUDGET && times.len() < MAX_REPS) {
        let t = Instant::now();
        step()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let n = times.len();
    Ok(if n % 2 == 1 {
        times[n / 2]
    } else {
        (times[n / 2 - 1] + times[n / 2]) / 2.0
    })
}

struct Options {
    filters: Vec<String>,
    time: bool,
    memory: bool,
    pieces: bool,
}

impl Options {
    fn parse() -> Self {
        let mut options = Options {
            filters: Vec::new(),
            time: true,
            memory: true,
            pieces: false,
        };
        // `cargo bench` passes `--bench`; other flags are ignored too.
        for arg in std::env::args().skip(1) {
            match arg.as_str() {
                "--no-time" => options.time = false,
                "--no-memory" => options.memory = false,
                "--pieces" => options.pieces = true,
                a if a.starts_with('-') => {}
                a => options.filters.push(a.to_string()),
            }
        }
        options
    }

    fn keeps(&self, case: &str) -> bool {
        self.filters.is_empty() || self.filters.iter().any(|f| case.contains(f.as_str()))
    }
}

/// One row of the speed-up table: the fused op and its baseline on the same input.
struct Comparison {
    head: &'static str,
    pass: &'static str,
    cfg: MarginSoftmaxLoss,
    fused: Pass,
    baseline_name: &'static str,
    baseline: Pass,
}

fn comparisons(kind: HeadKind) -> Vec<Comparison> {
    let mut rows: Vec<Comparison> = [
        ("fwd", Pass::FusedFwd, Pass::ReferenceFwd),
        ("fwd+bwd", Pass::FusedFwdBwd, Pass::ReferenceFwdBwd),
        (
            "loss_and_grad",
            Pass::FusedLossAndGrad,
            Pass::ReferenceFwdBwd,
        ),
    ]
    .into_iter()
    .map(|(pass, fused, baseline)| Comparison {
        head: kind.name(),
        pass,
        cfg: kind.config(),
        fused,
        baseline_name: "reference",
        baseline,
    })
    .collect();
    if kind == HeadKind::Softmax {
        rows.extend(
            [
                ("fwd", Pass::FusedFwd, Pass::CandleNnFwd),
                ("fwd+bwd", Pass::FusedFwdBwd, Pass::CandleNnFwdBwd),
                (
                    "loss_and_grad",
                    Pass::FusedLossAndGrad,
                    Pass::CandleNnFwdBwd,
                ),
            ]
            .into_iter()
            .map(|(pass, fused, baseline)| Comparison {
                head: "softmax-eps0",
                pass,
                cfg: common::softmax_no_smoothing(),
                fused,
                baseline_name: "candle_nn",
                baseline,
            }),
        );
    }
    rows
}

fn timings(options: &Options) -> Result<()> {
    println!(
        "{:<11} {:<5} {:<13} {:<14} {:>10} {:<10} {:>12} {:>7}",
        "shape", "dtype", "head", "pass", "fused_ms", "baseline", "baseline_ms", "ratio"
    );
    for &shape in &SHAPES {
        for &dtype in &DTYPES {
            for &kind in &HEADS {
                let case = format!(
                    "{} {} {}",
                    shape_name(shape),
                    dtype_name(dtype),
                    kind.name()
                );
                if !options.keeps(&case) {
                    continue;
                }
                let p = problem(kind, shape, dtype)?;
                for row in comparisons(kind) {
                    let fused_ms = median_ms(|| run(row.fused, &row.cfg, &p))?;
                    let baseline_ms = median_ms(|| run(row.baseline, &row.cfg, &p))?;
                    println!(
                        "{:<11} {:<5} {:<13} {:<14} {:>10.2} {:<10} {:>12.2} {:>6.1}x",
                        shape_name(shape),
                        dtype_name(dtype),
                        row.head,
                        row.pass,
                        fused_ms,
                        row.baseline_name,
                        baseline_ms,
                        baseline_ms / fused_ms
                    );
                }
            }
        }
    }
    Ok(())
}

fn memory(options: &Options) -> Result<()> {
    let shape = (1024, 32000);
    println!(
        "\nPeak heap memory of one step at {} beyond the live input, in MiB and in units of \
         B·C·sizeof(dtype):",
        shape_name(shape)
    );
    println!(
        "{:<11} {:<5} {:<13} {:<28} {:>10} {:>7}",
        "shape", "dtype", "head", "step", "peak_MiB", "units"
    );
    let steps = |kind: HeadKind| {
        let mut steps = vec![
            (kind.name(), "fused loss+backward", Pass::FusedFwdBwd),
            (kind.name(), "fused loss_and_grad", Pass::FusedLossAndGrad),
            (
                kind.name(),
                "reference loss+backward",
                Pass::ReferenceFwdBwd,
            ),
        ];
        if kind == HeadKind::Softmax {
            steps.push(("softmax-eps0", "fused loss+backward", Pass::FusedFwdBwd));
            steps.push((
                "softmax-eps0",
                "fused loss_and_grad",
                Pass::FusedLossAndGrad,
            ));
            steps.push((
                "softmax-eps0",
                "candle_nn cross_entropy+bwd",
                Pass::CandleNnFwdBwd,
            ));
        }
        steps
    };
    for &dtype in &DTYPES {
        for &kind in &HEADS {
            let case = format!(
                "{} {} {}",
                shape_name(shape),
                dtype_name(dtype),
                kind.name()
            );
            if !options.keeps(&case) {
                continue;
            }
            let p: Problem = problem(kind, shape, dtype)?;
            let unit = (shape.0 * shape.1 * dtype.size_in_bytes()) as f64;
            for (head, step, pass) in steps(kind) {
                let cfg = if head == "softmax-eps0" {
                    common::softmax_no_smoothing()
                } else {
                    kind.config()
                };
                // Once unmeasured, so that lazily built state (the thread pool) is not counted.
                run(pass, &cfg, &p)?;
                let bytes = peak_bytes_of(|| run(pass, &cfg, &p))?;
                println!(
                    "{:<11} {:<5} {:<13} {:<28} {:>10.1} {:>7.2}",
                    shape_name(shape),
                    dtype_name(dtype),
                    head,
                    step,
                    bytes as f64 / (1024.0 * 1024.0),
                    bytes as f64 / unit
                );
            }
        }
    }
    Ok(())
}

/// Where the time of a training step goes at 1024x32000 (softmax head, label smoothing 0.1):
/// the fused passes, and what candle and the allocator add around them.
fn pieces(options: &Options) -> Result<()> {
    let shape = (1024, 32000);
    let elements = shape.0 * shape.1;
    println!(
        "\nPieces of one step at {} (softmax, label smoothing {}), median ms:",
        shape_name(shape),
        common::LABEL_SMOOTHING
    );
    println!("{:<5} {:<58} {:>9}", "dtype", "piece", "ms");
    for &dtype in &DTYPES {
        let case = format!("{} {} softmax", shape_name(shape), dtype_name(dtype));
        if !options.keeps(&case) {
            continue;
        }
        let p = problem(HeadKind::Softmax, shape, dtype)?;
        let cfg = HeadKind::Softmax.config();
        let line =
            |piece: &str, ms: f64| println!("{:<5} {piece:<58} {ms:>9.2}", dtype_name(dtype));
        line(
            "fused loss (forward: 1 read of the input)",
            median_ms(|| run(Pass::FusedFwd, &cfg, &p))?,
        );
        line(
            "fused loss_and_grad (1 read, 1 write)",
            median_ms(|| run(Pass::FusedLossAndGrad, &cfg, &p))?,
        );
        line(
            "fused loss + backward() (autograd)",
            median_ms(|| run(Pass::FusedFwdBwd, &cfg, &p))?,
        );
        line(
            "candle zeros_like + add, [B, C] (GradStore accumulation)",
            median_ms(|| {
                std::hint::black_box(p.input.zeros_like()?.add(&p.input)?);
                Ok(())
            })?,
        );
        let bytes = elements * dtype.size_in_bytes();
        line(
            "fresh [B, C] buffer: allocate + first write (page faults)",
            median_ms(|| {
                let mut fresh = vec![0u8; bytes];
                fresh.par_chunks_mut(1 << 16).for_each(|c| c.fill(1));
                std::hint::black_box(&fresh);
                Ok(())
            })?,
        );
        let mut warm = vec![0u8; bytes];
        line(
            "[B, C] buffer already faulted in: write",
            median_ms(|| {
                warm.par_chunks_mut(1 << 16).for_each(|c| c.fill(2));
                std::hint::black_box(&warm);
                Ok(())
            })?,
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    let options = Options::parse();
    let threads = rayon::current_num_threads();
    println!(
        "candle-margin-softmax CPU summary: {threads} threads, label smoothing {} (softmax-eps0: \
         none, vs candle_nn), ratio = baseline_ms / fused_ms, medians",
        common::LABEL_SMOOTHING
    );
    if options.time {
        timings(&options)?;
    }
    if options.memory {
        memory(&options)?;
    }
    if options.pieces {
        pieces(&options)?;
    }
    Ok(())
}

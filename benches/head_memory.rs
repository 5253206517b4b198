//! Peak memory and time of one training step of an ArcFace head over raw embeddings, CPU, f32.
//!
//! `cargo bench --bench head_memory` runs, for every shape (B, D, C), one step = forward +
//! backward + `candle_nn::SGD::backward_step` (on W \[C, D\] and the embeddings \[B, D\], both
//! `Var`s) along these paths:
//!
//! - `head`: [`MarginHead::from_weight`] over W, `head.loss(&embeddings, &targets)` (chunked, never
//!   holds \[B, C\]); `head/c=N` the same with `.chunk_classes(N)`.
//! - `composed`: normalize embeddings and W's rows with plain candle ops (x / max(‖x‖, 1e-12)),
//!   cosines = f̂·Ŵᵀ \[B, C\], then the fused `MarginSoftmaxLoss::loss` on them.
//! - `reference`: the same cosines into `reference::loss` (plain candle ops for the loss too).
//!
//! Peak memory: a counting global allocator (as in benches/cpu_summary.rs); the peak is reset
//! before each step and the figure is the peak of the bytes allocated beyond what was live before
//! it (W, the embeddings, the targets), the maximum over every run of the path; `fwd+bwd peak`
//! is the same peak up to the end of `loss.backward()` (before the SGD update, whose
//! `W - lr·dW` temporaries are \[C, D\] on every path). Time: one warm-up
//! round, then `reps` rounds, the paths interleaved within each round (head, composed, reference,
//! head, ...); the median is reported.
//!
//! Settings (environment): `HEAD_MEMORY_QUICK=1` small shapes; `HEAD_MEMORY_SHAPES` e.g.
//! `512x512x100000,256x128x1000000` (BxDxC); `HEAD_MEMORY_REPS` (default 3);
//! `HEAD_MEMORY_CHUNKS` explicit chunk sizes for extra head rows (default `4096,16384`, empty for
//! none); `HEAD_MEMORY_PATHS` keeps only the paths whose name contains one of the comma-separated
//! words (e.g. `head,composed`). The thread count is rayon's (`RAYON_NUM_THREADS`).

#[path = "common/counting.rs"]
mod counting;

use std::sync::atomic::Ordering;
use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_margin_softmax::{Head, MarginHead, MarginSoftmaxLoss, reference};
use candle_nn::{Optimizer, SGD};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use counting::{CURRENT, Counting, PEAK};

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `step` and returns (the loss, the bytes it allocated at its peak beyond what was live
/// before it, the same up to the end of the backward, its wall time in ms).
fn measure(
    step: impl FnOnce() -> Result<(f32, usize, usize)>,
) -> Result<(f32, usize, usize, usize, f64)> {
    let before = CURRENT.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let t = Instant::now();
    let (loss, fwd, fwd_bwd) = step()?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(before);
    Ok((
        loss,
        peak,
        fwd.saturating_sub(before),
        fwd_bwd.saturating_sub(before),
        ms,
    ))
}

const MIB: f64 = 1024.0 * 1024.0;
const LR: f64 = 1e-3;

#[derive(Clone, Copy, PartialEq)]
enum Path {
    /// `MarginHead::loss`, with an explicit chunk size or the default.
    Head(Option<usize>),
    Composed,
    Reference,
}

impl Path {
    fn name(self) -> String {
        match self {
            Path::Head(None) => "head".into(),
            Path::Head(Some(n)) => format!("head/c={n}"),
            Path::Composed => "composed".into(),
            Path::Reference => "reference".into(),
        }
    }
}

/// x / max(‖x‖, ε) row-wise, plain candle ops.
fn normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(1)?.sqrt()?.maximum(1e-12)?;
    x.broadcast_div(&norm)
}

struct Problem {
    w: Var,
    emb: Var,
    targets: Tensor,
}

fn problem(b: usize, d: usize, c: usize, seed: u64) -> Result<Problem> {
    let dev = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(seed);
    let w: Vec<f32> = (0..c * d).map(|_| rng.random_range(-1.0..1.0)).collect();
    let e: Vec<f32> = (0..b * d).map(|_| rng.random_range(-1.0..1.0)).collect();
    let t: Vec<u32> = (0..b).map(|_| rng.random_range(0..c as u32)).collect();
    Ok(Problem {
        w: Var::from_tensor(&Tensor::from_vec(w, (c, d), &dev)?)?,
        emb: Var::from_tensor(&Tensor::from_vec(e, (b, d), &dev)?)?,
        targets: Tensor::from_vec(t, b, &dev)?,
    })
}

/// One training step along `path`: loss, backward, SGD update of W and the embeddings.
/// Returns the loss and the allocator's peaks (absolute) at the end of the loss call and at the
/// end of the backward.
fn step(p: &Problem, path: Path) -> Result<(f32, usize, usize)> {
    let cfg = MarginSoftmaxLoss::new(Head::arcface());
    let loss = match path {
        Path::Head(chunk) => {
            let mut head = MarginHead::from_weight(cfg, p.w.as_tensor().clone(), None)?;
            if let Some(n) = chunk {
                head = head.chunk_classes(n)?;
            }
            head.loss(p.emb.as_tensor(), &p.targets)?
        }
        Path::Composed | Path::Reference => {
            let f = normalize(p.emb.as_tensor())?;
            let w = normalize(p.w.as_tensor())?;
            let cos = f.matmul(&w.t()?)?;
            if path == Path::Composed {
                cfg.loss(&cos, &p.targets)?
            } else {
                reference::loss(&cfg, &cos, &p.targets)?
            }
        }
    };
    let loss_peak = PEAK.load(Ordering::Relaxed);
    let mut opt = SGD::new(vec![p.w.clone(), p.emb.clone()], LR)?;
    // `opt.backward_step(&loss)` is `loss.backward()` then `opt.step(&grads)`; split so that the
    // peak up to the end of the backward is seen too.
    let grads = loss.backward()?;
    let fwd_bwd_peak = PEAK.load(Ordering::Relaxed);
    opt.step(&grads)?;
    drop(grads);
    Ok((
        loss.to_dtype(DType::F32)?.to_scalar::<f32>()?,
        loss_peak,
        fwd_bwd_peak,
    ))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

fn parse_shapes(s: &str) -> Vec<(usize, usize, usize)> {
    s.split(',')
        .filter(|w| !w.trim().is_empty())
        .map(|w| {
            let v: Vec<usize> = w
                .trim()
                .split('x')
                .map(|n| n.parse().expect("HEAD_MEMORY_SHAPES: BxDxC,..."))
                .collect();
            assert!(v.len() == 3, "HEAD_MEMORY_SHAPES: BxDxC,...");
            (v[0], v[1], v[2])
        })
        .collect()
}

struct Row {
    path: Path,
    peak: usize,
    /// The peak up to the end of the loss call (the head computes its gradients there).
    loss_peak: usize,
    fwd_bwd_peak: usize,
    times: Vec<f64>,
    loss: f32,
    error: Option<String>,
}

fn main() -> Result<()> {
    let quick = env("HEAD_MEMORY_QUICK").is_some_and(|v| v != "0" && !v.is_empty());
    let shapes = match env("HEAD_MEMORY_SHAPES") {
        Some(s) => parse_shapes(&s),
        None if quick => vec![(64, 32, 5_000), (32, 16, 50_000)],
        None => vec![(512, 512, 100_000), (256, 128, 1_000_000)],
    };
    let reps: usize = env("HEAD_MEMORY_REPS")
        .map(|s| s.parse().expect("HEAD_MEMORY_REPS: a number"))
        .unwrap_or(3);
    let chunks: Vec<usize> = env("HEAD_MEMORY_CHUNKS")
        .unwrap_or_else(|| "4096,16384".into())
        .split(',')
        .filter(|w| !w.trim().is_empty())
        .map(|w| w.trim().parse().expect("HEAD_MEMORY_CHUNKS: numbers"))
        .collect();
    let filters: Vec<String> = env("HEAD_MEMORY_PATHS")
        .map(|s| s.split(',').map(|w| w.trim().to_string()).collect())
        .unwrap_or_default();
    let mut paths = vec![Path::Head(None), Path::Composed, Path::Reference];
    paths.extend(chunks.iter().map(|&n| Path::Head(Some(n))));
    paths.retain(|p| filters.is_empty() || filters.iter().any(|f| p.name().contains(f.as_str())));

    println!(
        "head_memory: ArcFace (s=64, m=0.5), f32, CPU, {} rayon threads, {reps} timed rounds + 1 warm-up, SGD lr={LR}",
        rayon::current_num_threads()
    );
    println!();
    println!(
        "| B×D×C | path | peak MiB | peak / head | loss() peak MiB | fwd+bwd peak MiB | fwd+bwd / head | median step ms | time / head | runs (ms) | loss (warm-up) |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |");
    for &(b, d, c) in &shapes {
        let p = problem(b, d, c, 0x5eed ^ (b * 31 + d * 7 + c) as u64)?;
        let mut rows: Vec<Row> = paths
            .iter()
            .map(|&path| Row {
                path,
                peak: 0,
                loss_peak: 0,
                fwd_bwd_peak: 0,
                times: Vec::new(),
                loss: f32::NAN,
                error: None,
            })
            .collect();
        for round in 0..=reps {
            for row in rows.iter_mut().filter(|r| r.error.is_none()) {
                match measure(|| step(&p, row.path)) {
                    Ok((loss, peak, fwd, fwd_bwd, ms)) => {
                        row.peak = row.peak.max(peak);
                        row.loss_peak = row.loss_peak.max(fwd);
                        row.fwd_bwd_peak = row.fwd_bwd_peak.max(fwd_bwd);
                        if round == 0 {
                            row.loss = loss;
                        } else {
                            row.times.push(ms);
                        }
                        eprintln!(
                            "{b}x{d}x{c} round {round} {}: {ms:.0} ms, peak {:.1} MiB, loss {loss:.4}",
                            row.path.name(),
                            peak as f64 / MIB
                        );
                    }
                    Err(e) => {
                        eprintln!("{b}x{d}x{c} {}: error: {e}", row.path.name());
                        row.error = Some(e.to_string());
                    }
                }
            }
        }
        let head = rows
            .iter()
            .find(|r| r.path == Path::Head(None) && r.error.is_none());
        let (head_peak, head_fb, head_ms) = head.map_or((f64::NAN, f64::NAN, f64::NAN), |h| {
            (
                h.peak as f64,
                h.fwd_bwd_peak as f64,
                median(h.times.clone()),
            )
        });
        for row in &rows {
            if let Some(e) = &row.error {
                println!(
                    "| {b}×{d}×{c} | {} | error: {e} | | | | | | | | |",
                    row.path.name()
                );
                continue;
            }
            let ms = median(row.times.clone());
            let runs: Vec<String> = row.times.iter().map(|t| format!("{t:.0}")).collect();
            println!(
                "| {b}×{d}×{c} | {} | {:.1} | {:.2}× | {:.1} | {:.1} | {:.2}× | {ms:.0} | {:.2}× | {} | {:.4} |",
                row.path.name(),
                row.peak as f64 / MIB,
                row.peak as f64 / head_peak,
                row.loss_peak as f64 / MIB,
                row.fwd_bwd_peak as f64 / MIB,
                row.fwd_bwd_peak as f64 / head_fb,
                ms / head_ms,
                runs.join(", "),
                row.loss
            );
        }
    }
    Ok(())
}

//! The crate's side of `benches/torch_compare.py`, the comparison with PyTorch on the CPU and on
//! CUDA: a process that stays alive and runs one training step per request through the crate's
//! public entry points (so every launch is planned by the crate itself), timing each step
//! itself, so that the driver can alternate single steps of the crate and of PyTorch
//! (interleaved, both processes warm).
//!
//! `peer [cpu | cuda[:N]]` (CUDA needs `--features cuda`). Lines on stdin, one reply line each:
//! - `info`: the device and the build, one line.
//! - `load B C DTYPE HEAD SMOOTHING SEED SETS CHECK_TARGETS`: SETS fresh random [B, C] inputs
//!   (generated on the device from SEED, cast to DTYPE: `f32`, `bf16`, `f16`, `f64`) and
//!   targets. HEAD: `softmax` (logits U(−4, 4)), `arcface` / `arcface-detached` (ArcFace s = 64,
//!   m = 0.5, `MarginGrad::Exact` / `Detached`; cosines U(−0.2, 0.2), the target's U(0.2, 0.9)),
//!   `rbf` (s = 35, γ = 16; squared distances U(0, 64)). CHECK_TARGETS: 1 or 0
//!   (`check_targets`). Reply `ok ONE_PASS`: `one_pass_max_classes(device, dtype)`, the widest
//!   row the crate runs in one pass over the input.
//! - `check MODE [PATH]`: one step of MODE on the first input set; reply the loss and gradient
//!   statistics in f64: `loss Σg Σ|g| ‖g‖ Σ_i g[i, t_i] Σ g·x`. With PATH, writes that set's
//!   input (raw, B·C values of DTYPE) then its targets (B little-endian i64) there.
//! - `step MODE`: one step on the next input set (they rotate); reply its time in ms: CUDA
//!   events on candle's stream around the call (host work inside it counts, as in
//!   examples/bench.rs), wall clock on the CPU. MODE: `lag` (`loss_and_grad`), `into`
//!   (`loss_and_grad_into` a buffer reused across steps), `autograd` (`loss` on a `Var`, then
//!   `backward()`).
//! - `quit`.

use std::io::{BufRead, Write};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor, Var};
use candle_margin_softmax::{Head, MarginGrad, MarginSoftmaxLoss, one_pass_max_classes};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

struct Case {
    cfg: MarginSoftmaxLoss,
    vars: Vec<Var>,
    targets: Vec<Tensor>,
    buffer: Tensor,
    next: usize,
}

fn device(arg: &str) -> Result<Device> {
    if arg == "cpu" {
        return Ok(Device::Cpu);
    }
    let n = arg
        .strip_prefix("cuda")
        .with_context(|| format!("device {arg:?}: cpu or cuda[:N]"))?
        .trim_start_matches(':');
    Ok(Device::new_cuda(if n.is_empty() { 0 } else { n.parse()? })?)
}

/// [B, C] f32 uniform in [lo, hi): candle's seeded generator on CUDA, `StdRng` on the CPU
/// (candle's CPU generator cannot be seeded).
fn uniform(
    dev: &Device,
    rng: &mut StdRng,
    shape: (usize, usize),
    lo: f32,
    hi: f32,
) -> Result<Tensor> {
    if dev.is_cpu() {
        let v: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| rng.random_range(lo..hi))
            .collect();
        Ok(Tensor::from_vec(v, shape, dev)?)
    } else {
        Ok(Tensor::rand(lo, hi, shape, dev)?)
    }
}

fn load(dev: &Device, words: &[&str]) -> Result<(Case, usize)> {
    let [b, c, dtype, head, smoothing, seed, sets, check] = words else {
        bail!("load B C DTYPE HEAD SMOOTHING SEED SETS CHECK_TARGETS")
    };
    let (b, c, sets): (usize, usize, usize) = (b.parse()?, c.parse()?, sets.parse()?);
    let dtype = match *dtype {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        "f64" => DType::F64,
        other => bail!("dtype {other}"),
    };
    let cfg = match *head {
        "softmax" => MarginSoftmaxLoss::new(Head::softmax()),
        "arcface" => MarginSoftmaxLoss::new(Head::arcface()).margin_grad(MarginGrad::Exact),
        "arcface-detached" => {
            MarginSoftmaxLoss::new(Head::arcface()).margin_grad(MarginGrad::Detached)
        }
        "rbf" => MarginSoftmaxLoss::new(Head::rbf()),
        other => bail!("head {other}"),
    }
    .label_smoothing(smoothing.parse()?)
    .check_targets(*check == "1");
    let seed: u64 = seed.parse()?;
    let mut rng = StdRng::seed_from_u64(seed);
    if !dev.is_cpu() {
        dev.set_seed(seed)?;
    }
    let (mut vars, mut targets) = (Vec::new(), Vec::new());
    for _ in 0..sets.max(1) {
        let t: Vec<i64> = (0..b).map(|_| rng.random_range(0..c as i64)).collect();
        let t = Tensor::from_vec(t, b, dev)?;
        let x = match *head {
            "softmax" => uniform(dev, &mut rng, (b, c), -4.0, 4.0)?,
            "rbf" => uniform(dev, &mut rng, (b, c), 0.0, 64.0)?,
            _ => {
                let others = uniform(dev, &mut rng, (b, c), -0.2, 0.2)?;
                let target = uniform(dev, &mut rng, (b, 1), 0.2, 0.9)?.broadcast_as((b, c))?;
                let columns = Tensor::arange(0i64, c as i64, dev)?.unsqueeze(0)?;
                let is_target = columns.broadcast_eq(&t.unsqueeze(1)?)?;
                is_target.where_cond(&target, &others)?
            }
        };
        vars.push(Var::from_tensor(&x.to_dtype(dtype)?)?);
        targets.push(t);
    }
    let buffer = vars[0].as_tensor().zeros_like()?;
    let one_pass = one_pass_max_classes(dev, dtype)?;
    let case = Case {
        cfg,
        vars,
        targets,
        buffer,
        next: 0,
    };
    Ok((case, one_pass))
}

/// One step of `mode` on input set `i`: (loss, gradient).
fn run(case: &Case, mode: &str, i: usize) -> Result<(Tensor, Tensor)> {
    let (var, t) = (&case.vars[i], &case.targets[i]);
    let x = var.as_tensor().detach();
    Ok(match mode {
        "lag" => case.cfg.loss_and_grad(&x, t)?,
        "into" => {
            let loss = case.cfg.loss_and_grad_into(&x, t, &case.buffer)?;
            (loss, case.buffer.clone())
        }
        "autograd" => {
            let loss = case.cfg.loss(var.as_tensor(), t)?;
            let grads = loss.backward()?;
            let grad = grads.get(var.as_tensor()).context("no gradient")?.clone();
            (loss.detach(), grad)
        }
        other => bail!("mode {other}"),
    })
}

fn check(case: &Case, mode: &str, path: Option<&str>) -> Result<String> {
    let (loss, grad) = run(case, mode, 0)?;
    let (x, t) = (case.vars[0].as_tensor().detach(), &case.targets[0]);
    let g = grad.to_dtype(DType::F64)?;
    let scalar = |v: Tensor| -> Result<f64> { Ok(v.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
    let stats = [
        scalar(loss)?,
        scalar(g.sum_all()?)?,
        scalar(g.abs()?.sum_all()?)?,
        scalar(g.sqr()?.sum_all()?)?.sqrt(),
        scalar(g.gather(&t.unsqueeze(1)?, 1)?.sum_all()?)?,
        scalar((&g * &x.to_dtype(DType::F64)?)?.sum_all()?)?,
    ];
    if let Some(path) = path {
        let flat = x.flatten_all()?;
        let mut bytes: Vec<u8> = match x.dtype() {
            DType::F32 => bytemuck::cast_slice(&flat.to_vec1::<f32>()?).to_vec(),
            DType::F64 => bytemuck::cast_slice(&flat.to_vec1::<f64>()?).to_vec(),
            DType::BF16 => bytemuck::cast_slice(&flat.to_vec1::<half::bf16>()?).to_vec(),
            DType::F16 => bytemuck::cast_slice(&flat.to_vec1::<half::f16>()?).to_vec(),
            other => bail!("dtype {other:?}"),
        };
        for v in t.to_vec1::<i64>()? {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        std::fs::write(path, bytes).with_context(|| format!("writing {path}"))?;
    }
    Ok(stats.map(|v| format!("{v:e}")).join(" "))
}

/// Times one call: CUDA events on candle's stream, or the wall clock on the CPU.
enum Timer {
    Wall,
    #[cfg(feature = "cuda")]
    Events(cuda_events::Events),
}

impl Timer {
    fn new(dev: &Device) -> Result<Self> {
        match dev {
            #[cfg(feature = "cuda")]
            Device::Cuda(cuda) => Ok(Timer::Events(cuda_events::Events::new(cuda)?)),
            _ => Ok(Timer::Wall),
        }
    }

    fn time_ms(&self, f: impl FnOnce() -> Result<()>) -> Result<f64> {
        match self {
            Timer::Wall => {
                let start = Instant::now();
                f()?;
                Ok(start.elapsed().as_secs_f64() * 1e3)
            }
            #[cfg(feature = "cuda")]
            Timer::Events(events) => events.time_ms(f),
        }
    }
}

#[cfg(feature = "cuda")]
#[path = "common/cuda_events.rs"]
mod cuda_events;

fn main() -> Result<()> {
    let arg = std::env::args().nth(1).unwrap_or_else(|| "cpu".to_string());
    let dev = device(&arg)?;
    let timer = Timer::new(&dev)?;
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    let mut case: Option<Case> = None;
    for line in stdin.lock().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let reply = match words.as_slice() {
            ["info"] => format!(
                "{arg} ({}; {} build; cuda feature {})",
                if dev.is_cpu() {
                    format!("{} rayon threads", rayon::current_num_threads())
                } else {
                    "CUDA events on candle's stream".to_string()
                },
                if cfg!(debug_assertions) {
                    "debug-assertions"
                } else {
                    "release"
                },
                if cfg!(feature = "cuda") { "on" } else { "off" },
            ),
            ["load", rest @ ..] => {
                drop(case.take()); // frees the previous case's device memory first
                let (c, one_pass) = load(&dev, rest)?;
                case = Some(c);
                format!("ok {one_pass}")
            }
            ["check", mode, rest @ ..] => check(
                case.as_ref().context("no case loaded")?,
                mode,
                rest.first().copied(),
            )?,
            ["step", mode] => {
                let c = case.as_mut().context("no case loaded")?;
                let i = c.next;
                c.next = (i + 1) % c.vars.len();
                let c = &*c;
                let ms = timer.time_ms(|| {
                    std::hint::black_box(run(c, mode, i)?);
                    Ok(())
                })?;
                format!("{ms:.6}")
            }
            ["quit"] => break,
            _ => bail!("unknown request {line:?}"),
        };
        writeln!(out, "{reply}")?;
        out.flush()?;
    }
    Ok(())
}

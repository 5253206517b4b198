//! The crate's side of `benches/torch_cpu.py`, the CPU comparison with PyTorch: a process that
//! stays alive and runs one training step per request, so that the driver can alternate single
//! steps of the crate and of PyTorch (interleaved, both processes warm).
//!
//! Lines on stdin, one reply line each on stdout:
//! - `load X T B C DTYPE HEAD`: X holds B·C little-endian f32 (the input), T holds B i64
//!   targets; the input is converted to DTYPE (`f32`, `bf16`, `f16`, `f64`); HEAD is `softmax`,
//!   `arcface`, `arcface-detached` or `rbf` (defaults, label smoothing 0.1, mean). Reply `ok`.
//! - `check OUT`: writes the loss (f64) then the gradient of `loss_and_grad` (B·C f32) to OUT.
//! - `step MODE`: one step, reply its wall time in ns. MODE: `lag` (`loss_and_grad`), `into`
//!   (`loss_and_grad_into` a buffer reused across steps), `autograd` (`loss` on a `Var`, then
//!   `backward()`).
//! - `quit`.
//!
//! `cargo build --release --example cpu_peer` (the driver builds and starts it).

use std::io::{BufRead, Write};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor, Var};
use candle_margin_softmax::{Head, MarginGrad, MarginSoftmaxLoss};

struct Case {
    cfg: MarginSoftmaxLoss,
    input: Tensor,
    var: Var,
    targets: Tensor,
    buffer: Tensor,
}

fn read_f32(path: &str, n: usize) -> Result<Vec<f32>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {path}"))?;
    if bytes.len() != 4 * n {
        bail!("{path}: {} bytes, expected {}", bytes.len(), 4 * n)
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

fn load(words: &[&str]) -> Result<Case> {
    let [x, t, b, c, dtype, head] = words else {
        bail!("load X T B C DTYPE HEAD")
    };
    let (b, c): (usize, usize) = (b.parse()?, c.parse()?);
    let dtype = match *dtype {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        "f64" => DType::F64,
        other => bail!("dtype {other}"),
    };
    let cfg = match *head {
        "softmax" => MarginSoftmaxLoss::new(Head::softmax()),
        "arcface" => MarginSoftmaxLoss::new(Head::arcface()),
        "arcface-detached" => {
            MarginSoftmaxLoss::new(Head::arcface()).margin_grad(MarginGrad::Detached)
        }
        "rbf" => MarginSoftmaxLoss::new(Head::rbf()),
        other => bail!("head {other}"),
    }
    .label_smoothing(0.1);
    let dev = Device::Cpu;
    let input = Tensor::from_vec(read_f32(x, b * c)?, (b, c), &dev)?.to_dtype(dtype)?;
    let bytes = std::fs::read(t)?;
    let targets: Vec<i64> = bytes
        .chunks_exact(8)
        .map(|v| i64::from_le_bytes(v.try_into().expect("8 bytes")))
        .collect();
    if targets.len() != b {
        bail!("{t}: {} targets, expected {b}", targets.len())
    }
    let targets = Tensor::from_vec(targets, b, &dev)?;
    let var = Var::from_tensor(&input)?;
    let buffer = input.zeros_like()?;
    Ok(Case {
        cfg,
        input,
        var,
        targets,
        buffer,
    })
}

fn step(case: &Case, mode: &str) -> Result<()> {
    match mode {
        "lag" => {
            std::hint::black_box(case.cfg.loss_and_grad(&case.input, &case.targets)?);
        }
        "into" => {
            std::hint::black_box(case.cfg.loss_and_grad_into(
                &case.input,
                &case.targets,
                &case.buffer,
            )?);
        }
        "autograd" => {
            let loss = case.cfg.loss(case.var.as_tensor(), &case.targets)?;
            let grads = loss.backward()?;
            std::hint::black_box(grads.get(case.var.as_tensor()).context("no gradient")?);
        }
        other => bail!("mode {other}"),
    }
    Ok(())
}

fn main() -> Result<()> {
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    let mut case: Option<Case> = None;
    for line in stdin.lock().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let reply = match words.as_slice() {
            ["load", rest @ ..] => {
                case = Some(load(rest)?);
                "ok".to_string()
            }
            ["check", path] => {
                let c = case.as_ref().context("no case loaded")?;
                let (loss, grad) = c.cfg.loss_and_grad(&c.input, &c.targets)?;
                let mut bytes = loss
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?
                    .to_le_bytes()
                    .to_vec();
                for v in grad.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()? {
                    bytes.extend_from_slice(&v.to_le_bytes());
                }
                std::fs::write(path, bytes)?;
                "ok".to_string()
            }
            ["step", mode] => {
                let c = case.as_ref().context("no case loaded")?;
                let t = Instant::now();
                step(c, mode)?;
                t.elapsed().as_nanos().to_string()
            }
            ["quit"] => break,
            _ => bail!("unknown request {line:?}"),
        };
        writeln!(out, "{reply}")?;
        out.flush()?;
    }
    Ok(())
}

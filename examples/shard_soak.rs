//! Soak test of the sharded loss on the in-process group: N = 4 long-lived rank threads run
//! many steps of `MarginSoftmaxLoss::sharded_loss` / `MarginHead::sharded_loss` on random valid
//! shapes, with a random fault about every 100 steps (a rank that fails its own checks, passes
//! other targets, or arrives after the deadline). After a fault every rank must have returned an
//! `Err` and the ranks go on with a new group. Checks: no hang (each step must end within its
//! deadline and a margin), every successful step gives every rank the same bits and the
//! unsharded loss to 1e-12 (f64; the sharded merge adds in another order, so bitwise equality
//! with the unsharded loss is not expected), and the resident memory at the end within 5 % of
//! that after the warm-up.
//!
//! ```text
//! cargo run --release --example shard_soak            # 10 000 steps
//! cargo run --release --example shard_soak -- 2000    # fewer
//! ```

use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use candle_core::{Device, Tensor};
use candle_margin_softmax::{
    ClassShard, Communicator, Head, InProcessCommunicator, InProcessGroup, MarginHead,
    MarginSoftmaxLoss,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const RANKS: usize = 4;
const DEADLINE: Duration = Duration::from_millis(300);
const DIM: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    OwnCheck,
    OtherTargets,
    Late,
}

/// One step, the same for every rank but the faulty one.
#[derive(Clone)]
struct Step {
    head: bool,
    rows: usize,
    classes: usize,
    x: Arc<Vec<f64>>,
    w: Arc<Vec<f64>>,
    targets: Arc<Vec<i64>>,
    fault: Option<(usize, Fault)>,
}

fn config() -> MarginSoftmaxLoss {
    MarginSoftmaxLoss::new(Head::arcface()).label_smoothing(0.1)
}

/// One rank's step: its loss (f64 bits) or its error.
fn rank_step(rank: usize, comm: &Arc<dyn Communicator>, s: &Step) -> Result<f64> {
    let dev = Device::Cpu;
    let fault = s.fault.filter(|(k, _)| *k == rank).map(|(_, f)| f);
    let shard = ClassShard::even(s.classes, RANKS, rank)?;
    let mut targets = s.targets.to_vec();
    if fault == Some(Fault::OtherTargets) && !targets.is_empty() {
        targets[0] = (targets[0] + 1) % s.classes as i64;
    }
    if fault == Some(Fault::Late) {
        std::thread::sleep(DEADLINE + Duration::from_millis(100));
    }
    let width = shard.count + usize::from(fault == Some(Fault::OwnCheck));
    let t = Tensor::from_vec(targets, s.rows, &dev)?;
    let loss = if s.head {
        let w: Vec<f64> = (shard.offset..shard.offset + width)
            .flat_map(|c| s.w[(c % s.classes) * DIM..][..DIM].to_vec())
            .collect();
        let w = Tensor::from_vec(w, (width, DIM), &dev)?;
        let f = Tensor::from_vec(s.x[..s.rows * DIM].to_vec(), (s.rows, DIM), &dev)?;
        MarginHead::from_weight(config(), w, None)?.sharded_loss(&f, &t, shard, comm.clone())?
    } else {
        let x: Vec<f64> = (0..s.rows)
            .flat_map(|i| (0..width).map(move |j| (i, (shard.offset + j) % s.classes)))
            .map(|(i, j)| s.x[i * s.classes + j])
            .collect();
        let x = Tensor::from_vec(x, (s.rows, width), &dev)?;
        config().sharded_loss(&x, &t, shard, comm.clone())?
    };
    Ok(loss.to_scalar::<f64>()?)
}

fn unsharded(s: &Step) -> Result<f64> {
    let dev = Device::Cpu;
    let t = Tensor::from_vec(s.targets.to_vec(), s.rows, &dev)?;
    let loss = if s.head {
        let w = Tensor::from_vec(s.w[..s.classes * DIM].to_vec(), (s.classes, DIM), &dev)?;
        let f = Tensor::from_vec(s.x[..s.rows * DIM].to_vec(), (s.rows, DIM), &dev)?;
        MarginHead::from_weight(config(), w, None)?.loss(&f, &t)?
    } else {
        let x = Tensor::from_vec(
            s.x[..s.rows * s.classes].to_vec(),
            (s.rows, s.classes),
            &dev,
        )?;
        config().loss(&x, &t)?
    };
    Ok(loss.to_scalar::<f64>()?)
}

/// What the main thread sends a rank: a new communicator, or a step.
enum Order {
    Group(InProcessCommunicator),
    Step(Step),
    Stop,
}

fn rank_thread(
    rank: usize,
    orders: Receiver<Order>,
    results: Sender<(usize, Result<f64, String>)>,
) {
    let mut comm: Option<Arc<dyn Communicator>> = None;
    while let Ok(order) = orders.recv() {
        match order {
            Order::Group(c) => comm = Some(Arc::new(c)),
            Order::Step(s) => {
                let c = comm.as_ref().expect("a group before a step");
                let r = rank_step(rank, c, &s).map_err(|e| e.to_string());
                let _ = results.send((rank, r));
            }
            Order::Stop => return,
        }
    }
}

fn resident_kib() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * 4)
}

fn main() -> Result<()> {
    let steps: usize = std::env::args().nth(1).map_or(Ok(10_000), |a| a.parse())?;
    let mut r = StdRng::seed_from_u64(21);
    let (results_tx, results) = channel();
    let mut orders = Vec::new();
    let mut threads = Vec::new();
    for rank in 0..RANKS {
        let (tx, rx) = channel();
        let results_tx = results_tx.clone();
        threads.push(std::thread::spawn(move || {
            rank_thread(rank, rx, results_tx)
        }));
        orders.push(tx);
    }
    let new_group = |orders: &[Sender<Order>]| -> Result<()> {
        for (tx, c) in orders
            .iter()
            .zip(InProcessGroup::with_timeout(RANKS, DEADLINE)?)
        {
            tx.send(Order::Group(c))?;
        }
        Ok(())
    };
    new_group(&orders)?;
    let (mut ok, mut faults, mut groups) = (0usize, 0usize, 1usize);
    let (mut worst_diff, mut baseline_kib) = (0.0f64, 0u64);
    let start = Instant::now();
    for step in 0..steps {
        if step == steps / 10 {
            baseline_kib = resident_kib();
        }
        let rows = r.random_range(0..24);
        let classes = r.random_range(RANKS..80);
        let fault = r.random_bool(0.01).then(|| {
            let kind = [Fault::OwnCheck, Fault::OtherTargets, Fault::Late][r.random_range(0..3)];
            (r.random_range(0..RANKS), kind)
        });
        // A fault needs a row to change (OtherTargets) or it would pass unseen.
        let rows = if fault.is_some() { rows.max(1) } else { rows };
        let s = Step {
            head: r.random_bool(0.5),
            rows,
            classes,
            x: Arc::new(
                (0..rows * classes.max(DIM))
                    .map(|_| r.random_range(-0.9..0.9))
                    .collect(),
            ),
            w: Arc::new(
                (0..classes * DIM)
                    .map(|_| r.random_range(-1.0..1.0))
                    .collect(),
            ),
            targets: Arc::new(
                (0..rows)
                    .map(|_| r.random_range(0..classes as i64))
                    .collect(),
            ),
            fault,
        };
        for tx in &orders {
            tx.send(Order::Step(s.clone()))?;
        }
        let mut got: Vec<Option<Result<f64, String>>> = vec![None; RANKS];
        let limit = Instant::now() + DEADLINE * 2 + Duration::from_secs(30);
        for _ in 0..RANKS {
            let left = limit.saturating_duration_since(Instant::now());
            let Ok((rank, res)) = results.recv_timeout(left) else {
                bail!("step {step}: a rank hung ({fault:?})")
            };
            got[rank] = Some(res);
        }
        let got: Vec<Result<f64, String>> =
            got.into_iter().map(|g| g.expect("every rank")).collect();
        match fault {
            Some(f) => {
                if let Some(k) = got.iter().position(Result::is_ok) {
                    bail!("step {step}: fault {f:?}, yet rank {k} returned a loss")
                }
                faults += 1;
                new_group(&orders)?;
                groups += 1;
            }
            None => {
                let want = unsharded(&s)?;
                let first = match &got[0] {
                    Ok(v) => *v,
                    Err(e) => bail!("step {step}: rank 0 failed: {e}"),
                };
                for (k, g) in got.iter().enumerate() {
                    if g.as_ref().map(|v| v.to_bits()) != Ok(first.to_bits()) {
                        bail!("step {step}: rank {k} returned {g:?}, rank 0 {first}")
                    }
                }
                let diff = (first - want).abs() / want.abs().max(1e-300);
                worst_diff = worst_diff.max(diff);
                if diff > 1e-12 {
                    bail!("step {step}: loss {first} vs unsharded {want}")
                }
                ok += 1;
            }
        }
    }
    for tx in &orders {
        tx.send(Order::Stop)?;
    }
    for t in threads {
        t.join().expect("rank thread");
    }
    let end_kib = resident_kib();
    let growth = end_kib as f64 / baseline_kib.max(1) as f64 - 1.0;
    println!(
        "{steps} steps in {:.1} s on {RANKS} ranks: {ok} correct (worst relative difference from \
         the unsharded loss {worst_diff:.1e}, every rank the same bits), {faults} faults (each an \
         Err on every rank), {groups} groups; resident memory {baseline_kib} KiB after the \
         warm-up, {end_kib} KiB at the end ({:+.1} %)",
        start.elapsed().as_secs_f64(),
        growth * 100.0
    );
    if growth > 0.05 {
        bail!("resident memory grew by {:.1} %", growth * 100.0)
    }
    Ok(())
}

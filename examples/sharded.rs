//! Class sharding (model parallelism) of an ArcFace head: the class centres W [C, D] are split
//! by class over N ranks, each rank holds its slice, and `MarginHead::sharded_loss` exchanges a
//! few values per row between the ranks instead of the [B, C] logits. Every rank prints the
//! same loss as the unsharded head over all classes, and its W gradient equals its rows of the
//! unsharded gradient.
//!
//! ```text
//! cargo run --release --example sharded             # 4 ranks, one thread each, on the CPU
//! cargo run --release --example sharded -- 7        # 7 ranks
//! cargo run --release --features nccl --example sharded -- --nccl 2   # 2 GPUs over NCCL
//! ```
//!
//! On the CPU the ranks are threads of this process talking through the in-process
//! communicator. With `--nccl N` (feature `nccl`, N GPUs) rank r runs on GPU r, and the ranks
//! talk through NCCL (`Comm::from_devices`, one thread per GPU in this process; a multi-process
//! job builds each rank's `Comm` with `Comm::from_rank` instead). The unsharded reference runs
//! on the CPU in both cases.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use candle_margin_softmax::{
    ClassShard, Communicator, Head, InProcessGroup, MarginHead, MarginSoftmaxLoss,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

const ROWS: usize = 64;
const DIM: usize = 32;
const CLASSES: usize = 10_001;

/// One rank's results: loss, and max |dW_rank − the unsharded dW's rows| / max |those rows|.
struct RankResult {
    loss: f32,
    dw_diff: f32,
}

/// The seeded problem: embeddings [B, D], W [C, D], targets [B].
struct Problem {
    embeddings: Vec<f32>,
    weight: Vec<f32>,
    targets: Vec<u32>,
}

fn problem() -> Problem {
    let mut rng = StdRng::seed_from_u64(20_261_202);
    let normal = Normal::new(0.0f32, 1.0).expect("normal");
    Problem {
        embeddings: (0..ROWS * DIM).map(|_| normal.sample(&mut rng)).collect(),
        weight: (0..CLASSES * DIM)
            .map(|_| normal.sample(&mut rng) * 0.01)
            .collect(),
        targets: (0..ROWS)
            .map(|_| rng.random_range(0..CLASSES as u32))
            .collect(),
    }
}

fn config() -> MarginSoftmaxLoss {
    MarginSoftmaxLoss::new(Head::arcface()).label_smoothing(0.1)
}

/// The unsharded head on the CPU: the loss and W's gradient.
fn unsharded(p: &Problem) -> Result<(f32, Tensor)> {
    let dev = Device::Cpu;
    let w = Var::from_tensor(&Tensor::from_slice(&p.weight, (CLASSES, DIM), &dev)?)?;
    let head = MarginHead::from_weight(config(), w.as_tensor().clone(), None)?;
    let f = Tensor::from_slice(&p.embeddings, (ROWS, DIM), &dev)?;
    let t = Tensor::from_slice(&p.targets, ROWS, &dev)?;
    let loss = head.loss(&f, &t)?;
    let grads = loss.backward()?;
    let dw = grads
        .get(&w)
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no gradient for W"))?;
    Ok((loss.to_scalar::<f32>()?, dw))
}

/// One rank: its slice of W on `dev`, the sharded loss and backward.
fn rank(
    p: &Problem,
    shard: ClassShard,
    comm: Arc<dyn Communicator>,
    dev: &Device,
    whole_dw: &Tensor,
) -> Result<RankResult> {
    let rows = &p.weight[shard.offset * DIM..(shard.offset + shard.count) * DIM];
    let w = Var::from_tensor(&Tensor::from_slice(rows, (shard.count, DIM), dev)?)?;
    let head = MarginHead::from_weight(config(), w.as_tensor().clone(), None)?;
    let f = Tensor::from_slice(&p.embeddings, (ROWS, DIM), dev)?;
    let t = Tensor::from_slice(&p.targets, ROWS, dev)?;
    let loss = head.sharded_loss(&f, &t, shard, comm)?;
    let grads = loss.backward()?;
    let dw = grads
        .get(&w)
        .ok_or_else(|| anyhow::anyhow!("no gradient for W"))?
        .to_device(&Device::Cpu)?;
    let want = whole_dw.narrow(0, shard.offset, shard.count)?;
    let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
    let dw_diff = (dw - &want)?.abs()?.max_all()?.to_scalar::<f32>()? / scale;
    Ok(RankResult {
        loss: loss.to_dtype(DType::F32)?.to_scalar::<f32>()?,
        dw_diff,
    })
}

/// Runs one thread per rank, rank r with communicator `comms[r]` on `devices[r]`.
fn run_ranks(
    p: &Problem,
    comms: Vec<Arc<dyn Communicator>>,
    devices: &[Device],
    whole_dw: &Tensor,
) -> Result<Vec<RankResult>> {
    let n = comms.len();
    std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(r, comm)| {
                let dev = devices[r].clone();
                scope.spawn(move || -> Result<RankResult> {
                    rank(p, ClassShard::even(CLASSES, n, r)?, comm, &dev, whole_dw)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("a rank panicked"))?)
            .collect()
    })
}

fn print(results: &[RankResult], whole: f32) {
    for (r, res) in results.iter().enumerate() {
        let s = ClassShard::even(CLASSES, results.len(), r).expect("shard");
        println!(
            "rank {r}: classes {:>5}..{:<5} loss {:.6}  (unsharded {whole:.6}, Δ {:.1e})  max|ΔdW|/max|dW| {:.1e}",
            s.offset,
            s.offset + s.count,
            res.loss,
            (res.loss - whole).abs(),
            res.dw_diff
        );
    }
}

#[cfg(feature = "nccl")]
fn nccl_ranks(p: &Problem, gpus: usize, whole_dw: &Tensor) -> Result<Vec<RankResult>> {
    use candle_core::cuda_backend::cudarc::nccl::safe::Id;
    use candle_margin_softmax::NcclCommunicator;
    let devices: Vec<Device> = (0..gpus)
        .map(Device::new_cuda)
        .collect::<candle_core::Result<_>>()?;
    // One process here, so every rank reads rank 0's id directly; across processes rank 0
    // sends `id.internal()` to the others, which rebuild it with `Id::uninit`.
    let id = Id::new().map_err(|e| anyhow::anyhow!("NCCL: ncclGetUniqueId: {e:?}"))?;
    // Every rank's set-up waits for all the others, so each joins from its own thread.
    let comms = std::thread::scope(|scope| {
        let joining: Vec<_> = devices
            .iter()
            .enumerate()
            .map(|(rank, device)| {
                let id = &id;
                scope.spawn(move || -> candle_core::Result<Arc<dyn Communicator>> {
                    let stream = device.as_cuda_device()?.cuda_stream();
                    Ok(Arc::new(NcclCommunicator::new(stream, rank, gpus, id)?))
                })
            })
            .collect();
        joining
            .into_iter()
            .map(|j| j.join().expect("a rank's set-up thread panicked"))
            .collect::<candle_core::Result<Vec<_>>>()
    })?;
    run_ranks(p, comms, &devices, whole_dw)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let p = problem();
    let started = Instant::now();
    let (whole, whole_dw) = unsharded(&p)?;
    println!(
        "ArcFace (s = 64, m = 0.5, label smoothing 0.1), B = {ROWS}, D = {DIM}, C = {CLASSES}; \
         unsharded loss {whole:.6} ({:.0} ms)",
        started.elapsed().as_secs_f64() * 1e3
    );
    if args.first().map(String::as_str) == Some("--nccl") {
        let gpus: usize = args.get(1).map_or(Ok(2), |s| s.parse())?;
        #[cfg(feature = "nccl")]
        {
            let results = nccl_ranks(&p, gpus, &whole_dw)?;
            println!("{gpus} ranks over NCCL, one GPU each:");
            print(&results, whole);
            return Ok(());
        }
        #[cfg(not(feature = "nccl"))]
        anyhow::bail!("--nccl {gpus}: build with `--features nccl`");
    }
    let ranks: usize = args.first().map_or(Ok(4), |s| s.parse())?;
    let comms: Vec<Arc<dyn Communicator>> = InProcessGroup::new(ranks)?
        .into_iter()
        .map(|c| Arc::new(c) as Arc<dyn Communicator>)
        .collect();
    let started = Instant::now();
    let results = run_ranks(&p, comms, &vec![Device::Cpu; ranks], &whole_dw)?;
    println!(
        "{ranks} ranks in this process (threads, the in-process communicator), {:.0} ms:",
        started.elapsed().as_secs_f64() * 1e3
    );
    print(&results, whole);
    Ok(())
}

//! The NCCL communicator's deadline and poisoning on real GPUs (feature `nccl`, two GPUs):
//! `cargo test --features nccl --test suite nccl_faults -- --ignored`. They are ignored because
//! they need two GPUs, which CI has not; the deadline policy itself is tested on the CPU in
//! `shard::watchdog`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::cuda_backend::cudarc::nccl::safe::Id;
use candle_core::{Device, Result, Tensor};
use candle_margin_softmax::{Communicator, NcclCommunicator};

use crate::common::first_line;

const DEADLINE: Duration = Duration::from_secs(3);
const SLACK: Duration = Duration::from_secs(5);

/// Rank `rank` of `world_size` on GPU `rank`, joining `id` with the test deadline.
fn join(rank: usize, world_size: usize, id: &Id) -> Result<(Device, NcclCommunicator)> {
    let device = Device::new_cuda(rank)?;
    let stream = device.as_cuda_device()?.cuda_stream();
    let comm = NcclCommunicator::with_timeout(stream, rank, world_size, id, DEADLINE)?;
    Ok((device, comm))
}

#[test]
#[ignore = "needs two GPUs and NCCL"]
fn nccl_gather_works_then_a_stalled_rank_poisons_the_other_within_the_deadline() -> Result<()> {
    let id = Id::new().map_err(|e| candle_core::Error::Msg(format!("{e:?}")))?;
    let id = Arc::new(id);
    let peer = {
        let id = id.clone();
        std::thread::spawn(move || -> Result<()> {
            let (device, comm) = join(1, 2, &id)?;
            let t = Tensor::new(&[3f32, 4.], &device)?;
            comm.all_gather(&t)?;
            // Never joins round 1; keeps the communicator alive past the other's deadline.
            std::thread::sleep(DEADLINE + SLACK);
            Ok(())
        })
    };
    let (device, comm) = join(0, 2, &id)?;
    let t = Tensor::new(&[1f32, 2.], &device)?;
    let gathered = comm.all_gather(&t)?.to_vec2::<f32>()?;
    assert_eq!(gathered, vec![vec![1., 2.], vec![3., 4.]]);
    let started = Instant::now();
    let err = comm.all_gather(&t).unwrap_err();
    let waited = started.elapsed();
    assert!(
        waited >= DEADLINE && waited < DEADLINE + SLACK,
        "{waited:?}"
    );
    let cause = first_line(&err);
    assert!(
        cause.starts_with("nccl_communicator: round 1 (ncclAllGather): did not complete within 3s"),
        "{cause}"
    );
    assert_eq!(first_line(&comm.all_gather(&t).unwrap_err()), cause);
    peer.join().expect("the peer rank panicked")?;
    Ok(())
}

#[test]
#[ignore = "needs two GPUs and NCCL"]
fn nccl_set_up_without_the_other_rank_fails_at_the_deadline() -> Result<()> {
    let id = Id::new().map_err(|e| candle_core::Error::Msg(format!("{e:?}")))?;
    let started = Instant::now();
    let err = match join(0, 2, &id) {
        Ok(_) => panic!("a group of two set up with one rank"),
        Err(e) => e,
    };
    let waited = started.elapsed();
    assert!(waited < DEADLINE + SLACK, "{waited:?}");
    assert!(
        first_line(&err).starts_with("nccl_communicator: ncclCommInitRankConfig of rank 0 of 2:"),
        "{err}"
    );
    Ok(())
}

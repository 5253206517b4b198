//! [`NcclCommunicator`] (feature `nccl`): one rank's NCCL communicator, through cudarc.
//!
//! What it does not do yet: a deadline. cudarc's safe `Comm` is created blocking and does not
//! expose its raw handle, so neither `ncclCommGetAsyncError` polling nor `ncclCommAbort` (what
//! PyTorch's watchdog does with `NCCL_ASYNC_ERROR_HANDLING`) can be applied to it: a rank that
//! never reaches a collective blocks the others in it. The agreement exchange of a sharded loss
//! still turns every misconfiguration and every rank's own error into the same `Err` on every
//! rank; only a rank that stops or stalls outside the crate's calls is not caught.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::safe::Comm;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, bail};

use super::Communicator;

/// The prefix of this communicator's errors (a sharded loss adds its own name before it).
const NCCL: &str = "nccl_communicator";

/// The NCCL communicator of one rank (one GPU, usually one process), through cudarc:
/// [`Communicator::all_gather`] is `ncclAllGather` on the communicator's stream. Build the
/// `Comm` on the stream of the candle device the tensors live on (e.g.
/// `Comm::from_rank(device.cuda_stream(), rank, world_size, id)` with an `Id` made by rank
/// 0 and sent to the others), so that NCCL and candle's kernels are ordered on one stream.
pub struct NcclCommunicator {
    comm: Mutex<CommHandle>,
    rank: usize,
    world_size: usize,
}

/// The cudarc communicator, which holds a raw NCCL handle (neither `Send` nor `Sync`).
struct CommHandle(Comm);

// SAFETY: an NCCL communicator may be used from any host thread as long as no two threads use
// it at once (NCCL's thread-safety rules); every use goes through the `Mutex` above.
unsafe impl Send for CommHandle {}

impl NcclCommunicator {
    /// Wraps a cudarc NCCL communicator.
    pub fn new(comm: Comm) -> Self {
        let (rank, world_size) = (comm.rank(), comm.world_size());
        Self {
            comm: Mutex::new(CommHandle(comm)),
            rank,
            world_size,
        }
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        let comm = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        t.contiguous()?.apply_op1_no_bwd(&AllGather {
            comm: &comm.0,
            world_size: self.world_size,
        })
    }
}

/// `ncclAllGather` of a contiguous f32 / f64 tensor into [world_size, ..shape].
struct AllGather<'c> {
    comm: &'c Comm,
    world_size: usize,
}

impl CustomOp1 for AllGather<'_> {
    fn name(&self) -> &'static str {
        "margin_head_nccl_all_gather"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("{NCCL}: the NCCL communicator needs tensors on a CUDA device")
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("{NCCL}: all_gather needs a contiguous tensor")
        };
        let dev = storage.device().clone();
        let n = end - start;
        let nccl_err = |e| candle_core::Error::Msg(format!("{NCCL}: ncclAllGather: {e:?}"));
        let out = match storage.dtype() {
            DType::F32 => {
                let src = storage.as_cuda_slice::<f32>()?.slice(start..end);
                // SAFETY: ncclAllGather writes all world_size·n elements before any read.
                let mut dst = unsafe { dev.alloc::<f32>(n * self.world_size) }?;
                self.comm.all_gather(&src, &mut dst).map_err(nccl_err)?;
                CudaStorage::wrap_cuda_slice(dst, dev)
            }
            DType::F64 => {
                let src = storage.as_cuda_slice::<f64>()?.slice(start..end);
                // SAFETY: as above.
                let mut dst = unsafe { dev.alloc::<f64>(n * self.world_size) }?;
                self.comm.all_gather(&src, &mut dst).map_err(nccl_err)?;
                CudaStorage::wrap_cuda_slice(dst, dev)
            }
            other => bail!("{NCCL}: all_gather of {other:?} tensors is not supported"),
        };
        let mut dims = vec![self.world_size];
        dims.extend_from_slice(layout.dims());
        Ok((out, Shape::from(dims)))
    }
}

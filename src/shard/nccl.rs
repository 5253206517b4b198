//! [`NcclCommunicator`] (feature `nccl`): one rank's NCCL communicator with a deadline on every
//! collective, as PyTorch's NCCL watchdog keeps one (`TORCH_NCCL_ASYNC_ERROR_HANDLING`,
//! `TORCH_NCCL_BLOCKING_WAIT`).
//!
//! cudarc's safe `Comm` is created blocking and hides its handle, so this module drives NCCL
//! through cudarc's raw bindings: a non-blocking communicator (`ncclCommInitRankConfig` with
//! `blocking = 0`), each collective watched by polling `ncclCommGetAsyncError` and a CUDA event
//! behind it, and `ncclCommAbort` on a failure or at the deadline (the policy, in
//! `shard::watchdog`, is tested on the CPU). Every raw NCCL call of the crate is in this file.

use std::cell::Cell;
use std::ffi::CStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaEvent, CudaStream, DevicePtr, DevicePtrMut};
use candle_core::cuda_backend::cudarc::nccl::safe::Id;
use candle_core::cuda_backend::cudarc::nccl::sys;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, bail};

use super::Communicator;
use super::watchdog::{Progress, Watchdog};

/// The prefix of this communicator's errors (a sharded loss adds its own name before it).
const NCCL: &str = "nccl_communicator";

/// The NCCL communicator of one rank (one GPU, usually one process): [`Communicator::all_gather`]
/// is `ncclAllGather` on the stream of the candle device the tensors live on.
///
/// **Deadline.** Every collective waits at most the communicator's timeout
/// ([`NcclCommunicator::DEFAULT_TIMEOUT`], 10 minutes as in `torch.distributed`, or the one given
/// to [`NcclCommunicator::with_timeout`]); so does the set-up, which waits for every rank to
/// join. The calling thread polls the collective until it completes (one host synchronisation
/// per exchange, as `TORCH_NCCL_BLOCKING_WAIT` does).
///
/// **Faults.** An asynchronous NCCL error (a peer that failed, a network error) or the deadline
/// aborts the communicator (`ncclCommAbort`, which also ends its kernels in flight) and poisons
/// it: the call and every later one return an `Err` naming the round and the cause. A poisoned
/// communicator cannot recover: every rank makes a new one from a new [`Id`].
///
/// **What NCCL cannot do here.** It does not say which ranks did not arrive (the error says the
/// round stalled; `torch.distributed.monitored_barrier` needs a separate store for that, which
/// NCCL has not). A rank that never calls at all is seen by the others only at their deadline.
/// After an abort, the CUDA context may hold a sticky error if a kernel was killed mid-flight;
/// like PyTorch, the crate then expects the process to be restarted.
pub struct NcclCommunicator {
    live: Mutex<Live>,
    stream: Arc<CudaStream>,
    rank: usize,
    world_size: usize,
}

/// The raw communicator (null once aborted) and its watchdog, used by one thread at a time.
struct Live {
    comm: sys::ncclComm_t,
    watchdog: Watchdog,
}

// SAFETY: an NCCL communicator may be used from any host thread as long as no two threads use
// it at once (NCCL's thread-safety rules); every use goes through the `Mutex` holding it.
unsafe impl Send for Live {}

impl NcclCommunicator {
    /// How long a collective (and the set-up) waits unless told otherwise: 10 minutes, the
    /// default timeout of `torch.distributed.init_process_group`.
    pub const DEFAULT_TIMEOUT: Duration = super::DEFAULT_TIMEOUT;

    /// Joins the group `id` as `rank` of `world_size`, on `stream` (the stream of the candle
    /// device the tensors will live on: `device.as_cuda_device()?.cuda_stream()`), with the
    /// default timeout. Rank 0 makes the `Id` (`Id::new()`) and sends its bytes
    /// (`Id::internal`) to the others, which rebuild it with `Id::uninit`.
    ///
    /// # Errors
    /// As [`NcclCommunicator::with_timeout`].
    pub fn new(stream: Arc<CudaStream>, rank: usize, world_size: usize, id: &Id) -> Result<Self> {
        Self::with_timeout(stream, rank, world_size, id, Self::DEFAULT_TIMEOUT)
    }

    /// As [`NcclCommunicator::new`], with every collective (and the set-up) waiting at most
    /// `timeout`.
    ///
    /// # Errors
    /// `world_size` = 0 or above `i32::MAX`, `rank` ≥ `world_size`, a zero `timeout`; NCCL's
    /// error if the set-up fails; and the deadline if not every rank joins within `timeout`
    /// (the communicator is then aborted).
    pub fn with_timeout(
        stream: Arc<CudaStream>,
        rank: usize,
        world_size: usize,
        id: &Id,
        timeout: Duration,
    ) -> Result<Self> {
        let Ok(ranks) = i32::try_from(world_size) else {
            bail!("{NCCL}: a group of {world_size} ranks is more than NCCL counts (i32)")
        };
        if ranks == 0 || rank >= world_size {
            bail!("{NCCL}: rank {rank} of a group of {world_size} ranks")
        }
        if timeout.is_zero() {
            bail!("{NCCL}: the timeout must be positive")
        }
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| candle_core::Error::Msg(format!("{NCCL}: binding the context: {e:?}")))?;
        let mut watchdog = Watchdog::new(NCCL, timeout);
        let comm = Cell::new(std::ptr::null_mut());
        let mut config = non_blocking_config();
        let unique_id = sys::ncclUniqueId {
            internal: *id.internal(),
        };
        watchdog.setup(
            &format!("ncclCommInitRankConfig of rank {rank} of {world_size}"),
            || {
                let mut handle = std::ptr::null_mut();
                // SAFETY: `handle` and `config` outlive the call; NCCL writes the handle
                // before returning (even when the initialisation goes on in the background).
                let status = unsafe {
                    sys::ncclCommInitRankConfig(
                        &mut handle,
                        ranks,
                        unique_id,
                        rank as i32,
                        &mut config,
                    )
                };
                comm.set(handle);
                started(handle, status)
            },
            || async_progress(comm.get()),
            || abort(comm.get()),
        )?;
        Ok(Self {
            live: Mutex::new(Live {
                comm: comm.get(),
                watchdog,
            }),
            stream,
            rank,
            world_size,
        })
    }

    /// How long each collective waits.
    pub fn timeout(&self) -> Duration {
        self.lock().watchdog.timeout()
    }

    fn lock(&self) -> MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    /// # Errors
    /// A poisoned communicator (the first cause), an NCCL error or the deadline (the
    /// communicator is then aborted and poisoned), a tensor not on this communicator's stream, a
    /// CPU tensor, or a dtype other than f32 and f64. Two threads calling at once are
    /// serialised.
    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        self.lock().watchdog.check()?;
        t.contiguous()?.apply_op1_no_bwd(&AllGather { comm: self })
    }
}

impl Drop for NcclCommunicator {
    fn drop(&mut self) {
        let live = self.live.get_mut().unwrap_or_else(|e| e.into_inner());
        if live.comm.is_null() {
            return;
        }
        let comm = live.comm;
        // A healthy communicator is finalised (waiting, at most the deadline, for its
        // operations) and destroyed; one that cannot be finalised is aborted by the watchdog.
        let finalised = live.watchdog.setup(
            "ncclCommFinalize",
            // SAFETY: `comm` is a live communicator that no other thread can use (`&mut self`).
            || started(comm, unsafe { sys::ncclCommFinalize(comm) }),
            || async_progress(comm),
            || abort(comm),
        );
        if finalised.is_ok() {
            // SAFETY: as above; it is not used after this.
            unsafe { sys::ncclCommDestroy(comm) };
        }
        live.comm = std::ptr::null_mut();
    }
}

/// `ncclAllGather` of a contiguous f32 / f64 tensor into [world_size, ..shape], watched.
struct AllGather<'c> {
    comm: &'c NcclCommunicator,
}

impl CustomOp1 for AllGather<'_> {
    fn name(&self) -> &'static str {
        "nccl_communicator_all_gather"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("{NCCL}: the NCCL communicator needs tensors on a CUDA device")
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("{NCCL}: all_gather needs a contiguous tensor")
        };
        let dev = storage.device().clone();
        let stream = &self.comm.stream;
        if dev.cuda_stream().cu_stream() != stream.cu_stream() {
            bail!(
                "{NCCL}: the tensor is on another stream than the communicator's (build the \
                 communicator on the stream of the tensors' device)"
            )
        }
        let world_size = self.comm.world_size;
        let mut live = self.comm.lock();
        let out = match storage.dtype() {
            DType::F32 => {
                let src = storage.as_cuda_slice::<f32>()?.slice(start..end);
                // SAFETY: a completed ncclAllGather writes all world_size·n elements; on any
                // failure the buffer is dropped unread.
                let mut dst = unsafe { dev.alloc::<f32>(src.len() * world_size) }?;
                watched_all_gather(
                    &mut live,
                    stream,
                    &src,
                    &mut dst,
                    sys::ncclDataType_t::ncclFloat32,
                )?;
                CudaStorage::wrap_cuda_slice(dst, dev)
            }
            DType::F64 => {
                let src = storage.as_cuda_slice::<f64>()?.slice(start..end);
                // SAFETY: as above.
                let mut dst = unsafe { dev.alloc::<f64>(src.len() * world_size) }?;
                watched_all_gather(
                    &mut live,
                    stream,
                    &src,
                    &mut dst,
                    sys::ncclDataType_t::ncclFloat64,
                )?;
                CudaStorage::wrap_cuda_slice(dst, dev)
            }
            other => bail!("{NCCL}: all_gather of {other:?} tensors is not supported"),
        };
        let mut dims = vec![world_size];
        dims.extend_from_slice(layout.dims());
        Ok((out, Shape::from(dims)))
    }
}

/// One watched `ncclAllGather` round from `src` into `dst` (world_size × `src`'s length).
fn watched_all_gather<T>(
    live: &mut Live,
    stream: &Arc<CudaStream>,
    src: &impl DevicePtr<T>,
    dst: &mut impl DevicePtrMut<T>,
    dtype: sys::ncclDataType_t,
) -> Result<()> {
    let comm = live.comm;
    let count = src.len();
    let (src_ptr, _src_guard) = src.device_ptr(stream);
    let (dst_ptr, _dst_guard) = dst.device_ptr_mut(stream);
    let event: Cell<Option<CudaEvent>> = Cell::new(None);
    let watched = live.watchdog.round(
        "ncclAllGather",
        || {
            stream
                .context()
                .bind_to_thread()
                .map_err(|e| format!("binding the context: {e:?}"))?;
            // SAFETY: `src_ptr` holds `count` elements and `dst_ptr` world_size·count, both
            // on `stream`'s device and kept alive by the guards until the round has ended;
            // `comm` is live (the watchdog starts nothing on a poisoned communicator).
            let status = unsafe {
                sys::ncclAllGather(
                    src_ptr as *const _,
                    dst_ptr as *mut _,
                    count,
                    dtype,
                    comm,
                    stream.cu_stream() as sys::cudaStream_t,
                )
            };
            started(comm, status)
        },
        || {
            // First the enqueueing (a non-blocking communicator may still be at it), then the
            // collective itself, through an event recorded behind it on the stream.
            match async_progress(comm) {
                Progress::Done => {}
                other => return other,
            }
            let recorded = match event.take() {
                Some(e) => e,
                None => match stream.record_event(None) {
                    Ok(e) => e,
                    Err(e) => return Progress::Failed(format!("recording an event: {e:?}")),
                },
            };
            let progress = match recorded.try_is_complete() {
                Ok(true) => Progress::Done,
                Ok(false) => Progress::Pending,
                Err(e) => Progress::Failed(format!("the stream failed: {e:?}")),
            };
            event.set(Some(recorded));
            progress
        },
        || abort(comm),
    );
    if watched.is_err() {
        // Aborted (now or before): the handle must not be used, nor destroyed on drop.
        live.comm = std::ptr::null_mut();
    }
    watched
}

/// What an NCCL call's status means for a watched operation: `ncclSuccess` and
/// `ncclInProgress` (a non-blocking communicator goes on in the background) start it.
fn started(comm: sys::ncclComm_t, status: sys::ncclResult_t) -> std::result::Result<(), String> {
    match status {
        sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress => Ok(()),
        failed => Err(describe(comm, failed)),
    }
}

/// The communicator's asynchronous state: in progress, done, or failed.
fn async_progress(comm: sys::ncclComm_t) -> Progress {
    let mut state = sys::ncclResult_t::ncclSuccess;
    // SAFETY: `comm` is a handle NCCL returned and nobody has aborted or destroyed; `state`
    // outlives the call.
    let status = unsafe { sys::ncclCommGetAsyncError(comm, &mut state) };
    if status != sys::ncclResult_t::ncclSuccess {
        return Progress::Failed(format!("ncclCommGetAsyncError: {}", describe(comm, status)));
    }
    match state {
        sys::ncclResult_t::ncclSuccess => Progress::Done,
        sys::ncclResult_t::ncclInProgress => Progress::Pending,
        failed => Progress::Failed(describe(comm, failed)),
    }
}

/// `ncclCommAbort` (nothing for a handle NCCL never returned).
fn abort(comm: sys::ncclComm_t) -> std::result::Result<(), String> {
    if comm.is_null() {
        return Ok(());
    }
    // SAFETY: `comm` is a handle NCCL returned; the caller poisons the communicator, so it is
    // never used again.
    match unsafe { sys::ncclCommAbort(comm) } {
        sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress => Ok(()),
        failed => Err(describe(std::ptr::null_mut(), failed)),
    }
}

/// An NCCL result with NCCL's own text for it and, when there is one, its last error message.
fn describe(comm: sys::ncclComm_t, status: sys::ncclResult_t) -> String {
    // SAFETY: both return NCCL-owned, NUL-terminated static strings (or null).
    let text = |p: *const std::ffi::c_char| {
        (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    };
    let what = text(unsafe { sys::ncclGetErrorString(status) }).unwrap_or_default();
    // SAFETY: as above; ncclGetLastError accepts a null communicator.
    let last = text(unsafe { sys::ncclGetLastError(comm) }).filter(|s| !s.is_empty());
    match last {
        Some(last) => format!("{status:?} ({what}): {last}"),
        None => format!("{status:?} ({what})"),
    }
}

/// NCCL's `NCCL_CONFIG_INITIALIZER` with `blocking = 0`, for the config layout of the NCCL
/// version cudarc binds (2.30): every field NCCL_CONFIG_UNDEF_INT / null (NCCL's defaults)
/// except the header. NCCL reads a config by its `size` and `version`, so an older NCCL at run
/// time reads the fields it knows.
fn non_blocking_config() -> sys::ncclConfig_t {
    const UNDEF: i32 = i32::MIN;
    const MAGIC: u32 = 0xcafe_beef;
    const VERSION_2_30_0: u32 = 2 * 10_000 + 30 * 100;
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: MAGIC,
        version: VERSION_2_30_0,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    }
}

//! The CUDA backend's buffers and raw launches: the targets' conversion and check on the device
//! (`ms_targets`), device views of candle storage, and each kernel launch of a plan with its
//! arguments (every `unsafe` launch of the crate, each with its `// SAFETY:` line).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::CudaDType;
use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Storage, bail};
use half::{bf16, f16};

use crate::backends::launch::params::MsParams;
use crate::backends::launch::{
    DEFAULT_SHARED, FUSED_STATIC_RESERVE, ForwardPlan, L2Work, Launch, RowShape, TARGETS_LAUNCH,
};
use crate::config::{MarginSoftmaxLoss, OP_NAME};
use crate::layout::STAT_COLUMNS;
use crate::math::{Acc, Element};
use crate::targets_and_weights::{kernel_poly, target_error};

use super::module::{self, BACKWARD, FORWARD, FUSED, Kernel, TARGETS};

/// An accumulation type on the device (f32 or f64).
pub(super) trait CudaAcc: Acc + CudaDType + DeviceRepr + ValidAsZeroBits {
    const SUFFIX: &'static str;
}
impl CudaAcc for f32 {
    const SUFFIX: &'static str = "f32";
}
impl CudaAcc for f64 {
    const SUFFIX: &'static str = "f64";
}

/// An input element type on the device, and its kernels' name suffix.
pub(super) trait CudaElement:
    Element<Acc: CudaAcc> + CudaDType + DeviceRepr + ValidAsZeroBits
{
    const SUFFIX: &'static str;
}
impl CudaElement for f32 {
    const SUFFIX: &'static str = "f32";
}
impl CudaElement for f64 {
    const SUFFIX: &'static str = "f64";
}
impl CudaElement for f16 {
    const SUFFIX: &'static str = "f16";
}
impl CudaElement for bf16 {
    const SUFFIX: &'static str = "bf16";
}

/// The kernel `{root}_{variant}_{suffix}` (or `{root}_{suffix}` without a variant) of `module`,
/// loaded once per device.
pub(super) fn kernel<T: CudaElement>(
    dev: &CudaDevice,
    module: &module::Module,
    root: &str,
    variant: Option<&str>,
) -> Result<Kernel> {
    let name = match variant {
        Some(v) => format!("{root}_{v}_{}", T::SUFFIX),
        None => format!("{root}_{}", T::SUFFIX),
    };
    module::kernel(dev, module, &name)
}

/// The targets on the device as the loss kernels take them, and the gradient factor.
pub(super) struct DeviceTargets<A> {
    /// i32 classes, −1 for an ignored row, −2 for an invalid target.
    pub(super) targets: CudaSlice<i32>,
    /// 1, or 1/Σ w for the mean (one element).
    pub(super) upstream: CudaSlice<A>,
}

/// Target `at` of a u8 / u32 / i64 storage, read back (for an error message).
pub(super) fn target_value(
    dev: &CudaDevice,
    storage: &CudaStorage,
    at: usize,
    name: &str,
) -> Result<i64> {
    fn one<T: CudaDType + DeviceRepr + Into<i64>>(
        dev: &CudaDevice,
        storage: &CudaStorage,
        at: usize,
        name: &str,
    ) -> Result<i64> {
        let slice = view(storage.as_cuda_slice::<T>()?, at..at + 1, "targets", name)?;
        let mut host = dev.clone_dtoh(&slice)?;
        match host.pop() {
            Some(v) => Ok(v.into()),
            None => bail!("{OP_NAME}({name}): internal error: no target at {at}"),
        }
    }
    match storage.dtype() {
        DType::U8 => one::<u8>(dev, storage, at, name),
        DType::U32 => one::<u32>(dev, storage, at, name),
        _ => one::<i64>(dev, storage, at, name),
    }
}

/// `ms_targets`: the targets converted (and the mean's factor formed) on the device. With
/// `check`, the first invalid row is read back (the one host synchronization of a forward)
/// and turned into the CPU path's `Err`; without, nothing is read.
pub(super) fn device_targets<A: CudaAcc>(
    cfg: &MarginSoftmaxLoss,
    dev: &CudaDevice,
    classes: usize,
    targets: (&CudaStorage, &Layout),
    weights: &CudaView<'_, A>,
    mean: bool,
    check: bool,
) -> Result<DeviceTargets<A>> {
    let name = cfg.head.name();
    let (storage, layout) = targets;
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("{OP_NAME}({name}): internal error: targets must be contiguous")
    };
    let rows = end - start;
    let suffix = match storage.dtype() {
        DType::U8 => "u8",
        DType::U32 => "u32",
        DType::I64 => "i64",
        other => bail!("{OP_NAME}({name}): targets must be u8, u32 or i64, got {other:?}"),
    };
    let func = module::kernel(dev, &TARGETS, &format!("ms_targets_{suffix}_{}", A::SUFFIX))?;
    // SAFETY: ms_targets writes all `rows` outputs, first_invalid and upstream.
    let (mut out, mut first_invalid, mut upstream) = unsafe {
        (
            dev.alloc::<i32>(rows.max(1))?,
            dev.alloc::<i64>(1)?,
            dev.alloc::<A>(1)?,
        )
    };
    let (ignore_index, has_ignore) = cfg.ignore_index.map_or((0i64, 0i32), |i| (i, 1));
    let (rows_i64, classes_i64) = (rows as i64, classes as i64);
    let has_weights = i32::from(cfg.class_weights.is_some());
    let mean_flag = i32::from(mean);
    {
        // The raw targets as a view that outlives the builder (one of the three is set).
        let (raw_u8, raw_u32, raw_i64);
        let mut b = func.builder();
        match storage.dtype() {
            DType::U8 => {
                raw_u8 = view(storage.as_cuda_slice::<u8>()?, start..end, "targets", name)?;
                b.arg(&raw_u8);
            }
            DType::U32 => {
                raw_u32 = view(storage.as_cuda_slice::<u32>()?, start..end, "targets", name)?;
                b.arg(&raw_u32);
            }
            _ => {
                raw_i64 = view(storage.as_cuda_slice::<i64>()?, start..end, "targets", name)?;
                b.arg(&raw_i64);
            }
        }
        b.arg(&rows_i64);
        b.arg(&classes_i64);
        b.arg(&ignore_index);
        b.arg(&has_ignore);
        b.arg(weights);
        b.arg(&has_weights);
        b.arg(&mean_flag);
        b.arg(&mut out);
        b.arg(&mut first_invalid);
        b.arg(&mut upstream);
        // SAFETY: the arguments match `ms_targets_I_A(const I* raw, long long rows, long long
        // classes, long long ignore_index, int has_ignore, const A* weights, int has_weights,
        // int mean, int* out, long long* first_invalid, A* upstream)` in kernels/targets.cu;
        // raw and out hold `rows` elements, weights C when has_weights (else one, never read),
        // first_invalid and upstream one each; one block of MS_TARGETS_BLOCK threads.
        unsafe { b.launch(config(&TARGETS_LAUNCH)) }.w()?;
    }
    if check && rows > 0 {
        let first = dev.clone_dtoh(&first_invalid)?.pop().unwrap_or(-1);
        if first >= 0 && (first as usize) < rows {
            let row = first as usize;
            let value = target_value(dev, storage, start + row, name)?;
            return Err(target_error(cfg, value, row, classes));
        }
    }
    Ok(DeviceTargets {
        targets: out,
        upstream,
    })
}

/// `slice[range]` as a view, an `Err` (not a panic) if the layout does not fit the storage.
pub(super) fn view<'a, T>(
    slice: &'a CudaSlice<T>,
    range: std::ops::Range<usize>,
    what: &str,
    name: &str,
) -> Result<CudaView<'a, T>> {
    match slice.try_slice(range.clone()) {
        Some(v) => Ok(v),
        None => bail!(
            "{OP_NAME}({name}): internal error: {what} range {range:?} outside its storage of {} \
             elements",
            slice.len()
        ),
    }
}

/// A contiguous 1-D or 2-D tensor's elements, as a view.
pub(super) fn contiguous<'a, A: CudaDType>(
    storage: &'a CudaStorage,
    layout: &Layout,
    what: &str,
    name: &str,
) -> Result<CudaView<'a, A>> {
    match layout.contiguous_offsets() {
        Some((start, end)) => view(storage.as_cuda_slice::<A>()?, start..end, what, name),
        None => bail!("{OP_NAME}({name}): internal error: {what} must be contiguous"),
    }
}

/// The input's elements from its first one (layout offset applied), rows `row_stride` apart.
pub(super) fn input_view<'a, T: CudaElement>(
    storage: &'a CudaStorage,
    layout: &Layout,
    name: &str,
) -> Result<CudaView<'a, T>> {
    let slice = storage.as_cuda_slice::<T>()?;
    view(slice, layout.start_offset()..slice.len(), "input", name)
}

/// The PolyLoss coefficients on the device (one unused element when there are none, so the
/// pointer is valid).
pub(super) fn poly_buffer<A: CudaAcc>(
    cfg: &MarginSoftmaxLoss,
    dev: &CudaDevice,
) -> Result<CudaSlice<A>> {
    dev.clone_htod(&kernel_poly::<A>(cfg))
}

/// Calls `f` with the class weights as a contiguous device view in the accumulation type, or
/// with a one-element dummy buffer when there are none (`MsParams::has_weights` is set from the
/// same `cfg.class_weights.is_some()`).
pub(super) fn with_weights<A: CudaAcc, R>(
    cfg: &MarginSoftmaxLoss,
    dev: &CudaDevice,
    f: impl FnOnce(&CudaView<'_, A>) -> Result<R>,
) -> Result<R> {
    let name = cfg.head.name();
    let Some(weights) = cfg.class_weights.as_ref().map(|w| w.tensor()) else {
        let dummy = dev.alloc_zeros::<A>(1)?;
        return f(&dummy.slice(..));
    };
    let weights = weights.to_dtype(A::DTYPE)?.contiguous()?;
    let (storage, layout) = weights.storage_and_layout();
    let Storage::Cuda(storage) = &*storage else {
        bail!(
            "{OP_NAME}({name}): class_weights must be on the input's CUDA device, got {:?}",
            weights.device().location()
        )
    };
    let w = contiguous::<A>(storage, layout, "class_weights", name)?;
    f(&w)
}

/// The buffers the split path's finalize also fills for the backward kernel: row info
/// [rows, 6] and d(loss)/d(scale) [rows].
pub(super) struct ForBackward<'b, A> {
    pub(super) row_info: &'b mut CudaSlice<A>,
    pub(super) grad_scale: &'b mut CudaSlice<A>,
}

/// What `loss_and_grad` returns, on the device: statistics [rows, 8], gradient [rows, C],
/// d(loss)/d(scale) [rows].
pub(super) struct LossAndGrad<T: CudaElement> {
    pub(super) stats: CudaSlice<T::Acc>,
    pub(super) grad: CudaSlice<T>,
    pub(super) grad_scale: CudaSlice<T::Acc>,
}

/// What every forward launch reads, prepared once per call.
pub(super) struct Inputs<'a, T: CudaElement> {
    pub(super) dev: &'a CudaDevice,
    pub(super) shape: RowShape,
    pub(super) x: CudaView<'a, T>,
    pub(super) targets: DeviceTargets<T::Acc>,
    pub(super) scale: CudaView<'a, T::Acc>,
    pub(super) poly: CudaSlice<T::Acc>,
}

impl<'a, T: CudaElement> Inputs<'a, T> {
    pub(super) fn new(
        cfg: &MarginSoftmaxLoss,
        shape: RowShape,
        x: (&'a CudaStorage, &Layout),
        targets: DeviceTargets<T::Acc>,
        scale: (&'a CudaStorage, &Layout),
    ) -> Result<Self> {
        let name = cfg.head.name();
        let dev = x.0.device();
        Ok(Self {
            dev,
            shape,
            x: input_view::<T>(x.0, x.1, name)?,
            targets,
            scale: contiguous::<T::Acc>(scale.0, scale.1, "row scale", name)?,
            poly: poly_buffer::<T::Acc>(cfg, dev)?,
        })
    }

    /// `ms_forward_partial_{variant}`: the online state of each (row, split) [rows, splits, 5].
    pub(super) fn partial(
        &self,
        plan: &ForwardPlan,
        weights: &CudaView<'_, T::Acc>,
    ) -> Result<CudaSlice<T::Acc>> {
        let func = kernel::<T>(self.dev, &FORWARD, "ms_forward_partial", Some(plan.variant))?;
        // SAFETY: ms_forward_partial writes all rows·splits·5 entries (each block its own 5)
        // before anything reads them; the buffer is only ever passed to ms_forward_finalize.
        let mut partials = unsafe { self.dev.alloc::<T::Acc>(plan.partials_len) }?;
        {
            let mut b = func.builder();
            b.arg(&self.x);
            b.arg(&self.targets.targets);
            b.arg(&self.scale);
            b.arg(weights);
            b.arg(&plan.params);
            b.arg(&mut partials);
            // SAFETY: the arguments match `ms_forward_partial_{variant}_T(const T* x, const int*
            // targets, const ACC* scale, const ACC* weights, MsParams p, ACC* partials)` in
            // kernels/forward.cu; x holds rows·row_stride elements from its first (the layout's
            // row stride and offset, checked by candle against the storage), targets and scale
            // B each, weights C elements when p.has_weights (else one, never read:
            // p.weighted_smoothing needs class weights), partials rows·splits·5, and p
            // describes exactly these shapes.
            unsafe { b.launch(config(&plan.partial)) }.w()?;
        }
        Ok(partials)
    }

    /// `ms_forward_finalize`: the statistics [rows, 8] from the partials, and with `backward`
    /// also the backward's row info [rows, 6] and d(loss)/d(scale) [rows], with the gradient
    /// factor (`ms_targets`'s upstream) folded in.
    pub(super) fn finalize(
        &self,
        plan: &ForwardPlan,
        weights: &CudaView<'_, T::Acc>,
        partials: &CudaSlice<T::Acc>,
        backward: Option<ForBackward<'_, T::Acc>>,
    ) -> Result<CudaSlice<T::Acc>> {
        let rows = self.shape.rows;
        let func = kernel::<T>(self.dev, &FORWARD, "ms_forward_finalize", None)?;
        // SAFETY: ms_forward_finalize writes all 8 columns of every row (ignored rows too).
        let mut stats = unsafe { self.dev.alloc::<T::Acc>(rows * STAT_COLUMNS) }?;
        let null = 0u64;
        {
            let mut b = func.builder();
            b.arg(&self.x);
            b.arg(&self.targets.targets);
            b.arg(&self.scale);
            b.arg(weights);
            b.arg(&self.poly);
            b.arg(&plan.params);
            b.arg(partials);
            b.arg(&mut stats);
            match backward {
                Some(ForBackward {
                    row_info,
                    grad_scale,
                }) => {
                    b.arg(row_info);
                    b.arg(grad_scale);
                }
                None => {
                    b.arg(&null);
                    b.arg(&null);
                }
            }
            b.arg(&self.targets.upstream);
            // SAFETY: the arguments match `ms_forward_finalize_T(const T* x, const int*
            // targets, const ACC* scale, const ACC* weights, const ACC* poly, MsParams p,
            // const ACC* partials, ACC* stats, ACC* row_info, ACC* grad_scale, const ACC*
            // upstream)` in kernels/forward.cu; weights holds C elements when p.has_weights
            // (else one), poly max(n_poly, 1), partials the rows·splits·5 written by
            // ms_forward_partial with the same p, stats rows·8, row_info / grad_scale are
            // rows·6 / rows buffers or null (0), which the kernel then does not write, upstream
            // one element.
            unsafe { b.launch(config(&plan.finalize)) }.w()?;
        }
        Ok(stats)
    }

    /// `{root}_{variant}` (`ms_fused`, `ms_fused_warp`, `ms_fused_cluster`, or with `l2`
    /// `ms_fused_l2`, cooperative: the same arguments, and the L2 kernel's two more): the
    /// statistics, the gradient and d(loss)/d(scale) in one launch.
    pub(super) fn fused(
        &self,
        root: &str,
        (p, variant, launch): (&MsParams, &str, &Launch),
        weights: &CudaView<'_, T::Acc>,
        l2: Option<L2Work>,
    ) -> Result<LossAndGrad<T>> {
        let RowShape { rows, classes, .. } = self.shape;
        let func = kernel::<T>(self.dev, &FUSED, root, Some(variant))?;
        let static_smem = func.static_shared_bytes()?;
        if static_smem > FUSED_STATIC_RESERVE {
            bail!(
                "{OP_NAME}: internal error: {root}_{variant}_{} uses {static_smem} bytes of \
                 static shared memory, more than the {FUSED_STATIC_RESERVE} reserved for it",
                T::SUFFIX
            )
        }
        let dynamic = launch.shared_mem_bytes as usize;
        if dynamic + static_smem > DEFAULT_SHARED {
            // Above 48 KiB a block's shared memory needs the opt-in (the planner kept it within
            // the device's limit).
            func.allow_dynamic_shared(dynamic)?;
        }
        let cooperative = l2.is_some();
        let mut l2 = match l2 {
            // SAFETY: ms_fused_l2 writes every (row, slice)'s partial state before the grid
            // barrier after which it reads it.
            Some(work) => Some((
                unsafe { self.dev.alloc::<T::Acc>(work.partials_len) }?,
                work.group_rows as i64,
            )),
            None => None,
        };
        // SAFETY: ms_fused writes all 8 statistics, all C gradient elements and the scale
        // gradient of every row (ignored rows too: zeros).
        let (mut stats, mut grad, mut grad_scale) = unsafe {
            (
                self.dev.alloc::<T::Acc>(rows * STAT_COLUMNS)?,
                self.dev.alloc::<T>(rows * classes)?,
                self.dev.alloc::<T::Acc>(rows)?,
            )
        };
        {
            let mut b = func.builder();
            b.arg(&self.x);
            b.arg(&self.targets.targets);
            b.arg(&self.scale);
            b.arg(weights);
            b.arg(&self.poly);
            b.arg(p);
            b.arg(&mut stats);
            b.arg(&mut grad);
            b.arg(&mut grad_scale);
            b.arg(&self.targets.upstream);
            if let Some((partials, group_rows)) = &mut l2 {
                b.arg(partials);
                b.arg(&*group_rows);
            }
            // SAFETY: the arguments match `ms_fused{|_warp|_cluster}_{variant}_T(const T* x,
            // const int* targets, const ACC* scale, const ACC* weights, const ACC* poly, MsParams
            // p, ACC* stats, T* grad, ACC* grad_scale, const ACC* upstream)` in kernels/fused.cu;
            // the buffers hold rows·8, rows·C and rows elements, upstream one; the dynamic shared
            // memory holds the row, the warps' rows or the cluster block's slice (fused_shared_bytes,
            // planned by src/backends/launch/mod.rs), and with the kernel's static shared memory (checked
            // above) stays within the device's opt-in limit, which the function was opted into
            // above; ms_fused_cluster's grid is a multiple of its compile-time cluster size
            // (planned), and it is planned only on devices with cluster launch. ms_fused_l2
            // (`l2`) takes `ACC* partials, long long group_rows` more: partials holds the
            // plan's rows·splits·5; its grid is l2_blocks_per_sm blocks per SM at most, the
            // residency its __launch_bounds__ guarantee with no dynamic shared memory, so the
            // cooperative launch's blocks are co-resident (the driver refuses it otherwise), and
            // it is planned only on devices with cooperative launch.
            unsafe {
                if cooperative {
                    b.launch_cooperative(config(launch))
                } else {
                    b.launch(config(launch))
                }
            }
            .w()?;
        }
        Ok(LossAndGrad {
            stats,
            grad,
            grad_scale,
        })
    }
}

/// The buffers `ms_backward` reads.
pub(super) struct BackwardArgs<'v, 'a, T: CudaElement> {
    pub(super) x: &'v CudaView<'a, T>,
    pub(super) targets: &'v CudaSlice<i32>,
    pub(super) row_info: &'v CudaView<'a, T::Acc>,
    pub(super) weights: &'v CudaView<'a, T::Acc>,
}

pub(super) fn backward_launch<T: CudaElement>(
    dev: &CudaDevice,
    shape: RowShape,
    args: BackwardArgs<'_, '_, T>,
    (p, variant, launch): (&MsParams, &str, &Launch),
) -> Result<CudaSlice<T>> {
    let RowShape { rows, classes, .. } = shape;
    let BackwardArgs {
        x,
        targets,
        row_info,
        weights,
    } = args;
    let func = kernel::<T>(dev, &BACKWARD, "ms_backward", Some(variant))?;
    // SAFETY: ms_backward is grid-stride in both dimensions and writes all C elements of every
    // row (ignored rows: zeros).
    let mut grad = unsafe { dev.alloc::<T>(rows * classes) }?;
    {
        let mut b = func.builder();
        b.arg(x);
        b.arg(targets);
        b.arg(row_info);
        b.arg(weights);
        b.arg(p);
        b.arg(&mut grad);
        // SAFETY: the arguments match `ms_backward_{variant}_T(const T* x, const int* targets,
        // const ACC* row_info, const ACC* weights, MsParams p, T* grad)` in kernels/backward.cu;
        // x holds rows·row_stride elements from its first, targets rows, row_info rows·6,
        // weights C when p.has_weights (else one, never read: p.weighted_smoothing needs class
        // weights), grad rows·C.
        unsafe { b.launch(config(launch)) }.w()?;
    }
    Ok(grad)
}

/// A planned launch as cudarc takes it.
pub(super) fn config(launch: &Launch) -> LaunchConfig {
    let [gx, gy, gz] = launch.grid;
    let [bx, by, bz] = launch.block;
    LaunchConfig {
        grid_dim: (gx, gy, gz),
        block_dim: (bx, by, bz),
        shared_mem_bytes: launch.shared_mem_bytes,
    }
}

pub(super) fn empty<A: CudaDType + DeviceRepr + ValidAsZeroBits>(
    dev: &CudaDevice,
) -> Result<CudaStorage> {
    Ok(CudaStorage::wrap_cuda_slice(
        dev.alloc_zeros::<A>(0)?,
        dev.clone(),
    ))
}

//! The CUDA bodies of the op (feature `cuda`): the Rust side of `kernels/*.cu`. Every raw
//! launch of the crate is here; `src/op.rs` calls [`forward`], [`backward`] and
//! [`forward_backward`] from its `cuda_fwd` and from its storage dispatch.
//!
//! - forward: `ms_forward_partial` (each row cut into `splits` column ranges, one block each,
//!   writing the online max / sum-exp state of its range) then `ms_forward_finalize` (one
//!   thread per row merges its partials in a fixed order and forms the statistics).
//! - backward: `ms_backward`, one more read of each row and one write of the gradient.
//! - forward_backward: `ms_fused` (one block per row, the row held in shared memory: one read,
//!   one write) when the row fits, else partial → finalize (with the backward's row info and
//!   d(loss)/d(scale), upstream factor folded in) → backward.
//!
//! Which path, and every grid, block and dynamic shared memory size, come from
//! [`crate::launch::Planner::DEVICE`], the same plans that the emulated backend (`src/emu.rs`)
//! runs on the CPU in CI. The targets are read back to the host once per call and checked by the
//! same code as the CPU path ([`crate::prepare::validate_targets`]), so the errors are identical
//! on every device; they go to the device as i32, −1 for an ignored row.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::CudaDType;
use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Storage, bail};
use half::{bf16, f16};

use crate::config::{MarginSoftmaxLoss, OP_NAME};
use crate::kernel_params::MsParams;
use crate::launch::{
    FUSED_STATIC_RESERVE, ForwardPlan, Launch, LossAndGradPlan, Planner, RowShape, kernel_targets,
};
use crate::math::{Acc, Element};
use crate::op::{ROWINFO_COLUMNS, STAT_COLUMNS};
use crate::prepare::{kernel_poly, kernel_upstream, validate_targets};

/// The PTX of each kernel module, compiled from `kernels/*.cu` by `build.rs`.
const FORWARD_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/forward.ptx"));
const BACKWARD_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/backward.ptx"));
const FUSED_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));

/// A PTX module: the name candle caches it under, and its text.
#[derive(Clone, Copy)]
struct Module {
    name: &'static str,
    ptx: &'static str,
}

const FORWARD: Module = Module {
    name: "margin_softmax_forward",
    ptx: FORWARD_PTX,
};
const BACKWARD: Module = Module {
    name: "margin_softmax_backward",
    ptx: BACKWARD_PTX,
};
const FUSED: Module = Module {
    name: "margin_softmax_fused",
    ptx: FUSED_PTX,
};

// SAFETY: MsParams is #[repr(C)], Copy, holds only plain integers and floats, and mirrors the
// layout of `struct MsParams` in kernels/params.cuh field for field (its size is checked at
// compile time in src/kernel_params.rs), so its bytes are a valid kernel argument of that type.
unsafe impl DeviceRepr for MsParams {}

/// An accumulation type on the device (f32 or f64).
trait CudaAcc: Acc + CudaDType + DeviceRepr + ValidAsZeroBits {}
impl CudaAcc for f32 {}
impl CudaAcc for f64 {}

/// An input element type on the device, and its kernels' name suffix.
trait CudaElement: Element<Acc: CudaAcc> + CudaDType + DeviceRepr + ValidAsZeroBits {
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

/// Calls `$body::<T>` for the input's element type.
macro_rules! with_element {
    ($storage:expr, $name:expr, $body:ident ( $($arg:expr),* )) => {
        match $storage.dtype() {
            DType::F32 => $body::<f32>($($arg),*),
            DType::F64 => $body::<f64>($($arg),*),
            DType::F16 => $body::<f16>($($arg),*),
            DType::BF16 => $body::<bf16>($($arg),*),
            other => bail!(
                "{OP_NAME}({}): input dtype must be f32, f64, f16 or bf16, got {other:?}",
                $name
            ),
        }
    };
}

/// Loads (once per device) the module and returns the kernel `{root}_{suffix}`; a macro because
/// candle does not export the type of the handle.
macro_rules! kernel {
    ($dev:expr, $t:ty, $module:expr, $root:literal) => {{
        let module: Module = $module;
        $dev.get_or_load_custom_func(
            &format!("{}_{}", $root, <$t as CudaElement>::SUFFIX),
            module.name,
            module.ptx,
        )
    }};
}

/// The validated targets (read back to the host, checked as on the CPU).
fn read_targets(
    storage: &CudaStorage,
    layout: &Layout,
    cfg: &MarginSoftmaxLoss,
    classes: usize,
) -> Result<Vec<Option<usize>>> {
    let name = cfg.head.name();
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("{OP_NAME}({name}): internal error: targets must be contiguous")
    };
    if start == end {
        return Ok(Vec::new());
    }
    // The targets' values, copied to the host and widened to i64.
    fn widened<T: CudaDType + DeviceRepr + Into<i64>>(
        storage: &CudaStorage,
        range: std::ops::Range<usize>,
        name: &str,
    ) -> Result<Vec<i64>> {
        let slice = view(storage.as_cuda_slice::<T>()?, range, "targets", name)?;
        let host = storage.device().clone_dtoh(&slice)?;
        Ok(host.into_iter().map(Into::into).collect())
    }
    let values = match storage.dtype() {
        DType::U8 => widened::<u8>(storage, start..end, name)?,
        DType::U32 => widened::<u32>(storage, start..end, name)?,
        DType::I64 => widened::<i64>(storage, start..end, name)?,
        other => bail!("{OP_NAME}({name}): targets must be u8, u32 or i64, got {other:?}"),
    };
    validate_targets(&values, cfg, classes)
}

/// The validated targets on the device: i32 class indices, −1 for an ignored row.
fn upload_targets(dev: &CudaDevice, targets: &[Option<usize>]) -> Result<CudaSlice<i32>> {
    dev.clone_htod(&kernel_targets(targets))
}

/// `slice[range]` as a view, an `Err` (not a panic) if the layout does not fit the storage.
fn view<'a, T>(
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
fn contiguous<'a, A: CudaDType>(
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
fn input_view<'a, T: CudaElement>(
    storage: &'a CudaStorage,
    layout: &Layout,
    name: &str,
) -> Result<CudaView<'a, T>> {
    let slice = storage.as_cuda_slice::<T>()?;
    view(slice, layout.start_offset()..slice.len(), "input", name)
}

/// The PolyLoss coefficients on the device (one unused element when there are none, so the
/// pointer is valid).
fn poly_buffer<A: CudaAcc>(cfg: &MarginSoftmaxLoss, dev: &CudaDevice) -> Result<CudaSlice<A>> {
    dev.clone_htod(&kernel_poly::<A>(cfg))
}

/// Calls `f` with the class weights as a contiguous device view in the accumulation type, or
/// with a one-element dummy buffer when there are none (`MsParams::has_weights` is set from the
/// same `cfg.class_weights.is_some()`).
fn with_weights<A: CudaAcc, R>(
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
struct ForBackward<'b, A> {
    row_info: &'b mut CudaSlice<A>,
    grad_scale: &'b mut CudaSlice<A>,
}

/// What `loss_and_grad` returns, on the device: statistics [rows, 8], gradient [rows, C],
/// d(loss)/d(scale) [rows].
struct LossAndGrad<T: CudaElement> {
    stats: CudaSlice<T::Acc>,
    grad: CudaSlice<T>,
    grad_scale: CudaSlice<T::Acc>,
}

/// What every forward launch reads, prepared once per call.
struct Inputs<'a, T: CudaElement> {
    dev: &'a CudaDevice,
    shape: RowShape,
    x: CudaView<'a, T>,
    targets: CudaSlice<i32>,
    scale: CudaView<'a, T::Acc>,
    poly: CudaSlice<T::Acc>,
}

impl<'a, T: CudaElement> Inputs<'a, T> {
    fn new(
        cfg: &MarginSoftmaxLoss,
        shape: RowShape,
        x: (&'a CudaStorage, &Layout),
        targets: &[Option<usize>],
        scale: (&'a CudaStorage, &Layout),
    ) -> Result<Self> {
        let name = cfg.head.name();
        let dev = x.0.device();
        Ok(Self {
            dev,
            shape,
            x: input_view::<T>(x.0, x.1, name)?,
            targets: upload_targets(dev, targets)?,
            scale: contiguous::<T::Acc>(scale.0, scale.1, "row scale", name)?,
            poly: poly_buffer::<T::Acc>(cfg, dev)?,
        })
    }

    /// `ms_forward_partial`: the online state of each (row, split) [rows, splits, 5].
    fn partial(
        &self,
        plan: &ForwardPlan,
        weights: &CudaView<'_, T::Acc>,
    ) -> Result<CudaSlice<T::Acc>> {
        let func = kernel!(self.dev, T, FORWARD, "ms_forward_partial")?;
        // SAFETY: ms_forward_partial writes all rows·splits·5 entries (each block its own 5)
        // before anything reads them; the buffer is only ever passed to ms_forward_finalize.
        let mut partials = unsafe { self.dev.alloc::<T::Acc>(plan.partials_len) }?;
        {
            let mut b = func.builder();
            b.arg(&self.x);
            b.arg(&self.targets);
            b.arg(&self.scale);
            b.arg(weights);
            b.arg(&plan.params);
            b.arg(&mut partials);
            // SAFETY: the arguments match `ms_forward_partial_T(const T* x, const int*
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
    /// also the backward's row info [rows, 6] and d(loss)/d(scale) [rows], with `p.upstream`
    /// folded in.
    fn finalize(
        &self,
        plan: &ForwardPlan,
        weights: &CudaView<'_, T::Acc>,
        partials: &CudaSlice<T::Acc>,
        backward: Option<ForBackward<'_, T::Acc>>,
    ) -> Result<CudaSlice<T::Acc>> {
        let rows = self.shape.rows;
        let func = kernel!(self.dev, T, FORWARD, "ms_forward_finalize")?;
        // SAFETY: ms_forward_finalize writes all 8 columns of every row (ignored rows too).
        let mut stats = unsafe { self.dev.alloc::<T::Acc>(rows * STAT_COLUMNS) }?;
        let null = 0u64;
        {
            let mut b = func.builder();
            b.arg(&self.x);
            b.arg(&self.targets);
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
            // SAFETY: the arguments match `ms_forward_finalize_T(const T* x, const int*
            // targets, const ACC* scale, const ACC* weights, const ACC* poly, MsParams p,
            // const ACC* partials, ACC* stats, ACC* row_info, ACC* grad_scale)` in
            // kernels/forward.cu; weights holds C elements when p.has_weights (else one), poly
            // max(n_poly, 1), partials the rows·splits·5 written by ms_forward_partial with
            // the same p, stats rows·8, and row_info / grad_scale are rows·6 / rows buffers or
            // null (0), which the kernel then does not write.
            unsafe { b.launch(config(&plan.finalize)) }.w()?;
        }
        Ok(stats)
    }

    /// `ms_backward`: d(loss)/d(input) [rows, C] from the row info [rows, 6].
    fn backward(
        &self,
        p: &MsParams,
        launch: &Launch,
        row_info: &CudaView<'_, T::Acc>,
        weights: &CudaView<'_, T::Acc>,
    ) -> Result<CudaSlice<T>> {
        backward_launch(
            self.dev,
            self.shape,
            BackwardArgs {
                x: &self.x,
                targets: &self.targets,
                row_info,
                weights,
            },
            p,
            launch,
        )
    }

    /// `ms_fused`: the statistics, the gradient and d(loss)/d(scale) in one launch.
    fn fused(
        &self,
        p: &MsParams,
        launch: &Launch,
        weights: &CudaView<'_, T::Acc>,
    ) -> Result<LossAndGrad<T>> {
        let RowShape { rows, classes, .. } = self.shape;
        let func = kernel!(self.dev, T, FUSED, "ms_fused")?;
        let static_smem = func.shared_size_bytes().w()?;
        if static_smem < 0 || static_smem as usize > FUSED_STATIC_RESERVE {
            bail!(
                "{OP_NAME}: internal error: ms_fused_{} uses {static_smem} bytes of static shared \
                 memory, more than the {FUSED_STATIC_RESERVE} reserved for it",
                T::SUFFIX
            )
        }
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
            b.arg(&self.targets);
            b.arg(&self.scale);
            b.arg(weights);
            b.arg(&self.poly);
            b.arg(p);
            b.arg(&mut stats);
            b.arg(&mut grad);
            b.arg(&mut grad_scale);
            // SAFETY: the arguments match `ms_fused_T(const T* x, const int* targets, const
            // ACC* scale, const ACC* weights, const ACC* poly, MsParams p, ACC* stats, T* grad,
            // ACC* grad_scale)` in kernels/fused.cu; the buffers hold rows·8, rows·C and rows
            // elements; the dynamic shared memory holds the row (round_up(C·sizeof(T), 16) bytes)
            // (round_up(C·sizeof(T), 16) bytes, planned by src/launch.rs), and with the kernel's
            // static shared memory (checked above) stays within the 48 KiB that need no opt-in.
            unsafe { b.launch(config(launch)) }.w()?;
        }
        Ok(LossAndGrad {
            stats,
            grad,
            grad_scale,
        })
    }
}

/// The buffers `ms_backward` reads.
struct BackwardArgs<'v, 'a, T: CudaElement> {
    x: &'v CudaView<'a, T>,
    targets: &'v CudaSlice<i32>,
    row_info: &'v CudaView<'a, T::Acc>,
    weights: &'v CudaView<'a, T::Acc>,
}

fn backward_launch<T: CudaElement>(
    dev: &CudaDevice,
    shape: RowShape,
    args: BackwardArgs<'_, '_, T>,
    p: &MsParams,
    launch: &Launch,
) -> Result<CudaSlice<T>> {
    let RowShape { rows, classes, .. } = shape;
    let BackwardArgs {
        x,
        targets,
        row_info,
        weights,
    } = args;
    let func = kernel!(dev, T, BACKWARD, "ms_backward")?;
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
        // SAFETY: the arguments match `ms_backward_T(const T* x, const int* targets, const ACC*
        // row_info, const ACC* weights, MsParams p, T* grad)` in kernels/backward.cu; x holds
        // rows·row_stride elements from its first, targets rows, row_info rows·6, weights C
        // when p.has_weights (else one, never read: p.weighted_smoothing needs class weights),
        // grad rows·C.
        unsafe { b.launch(config(launch)) }.w()?;
    }
    Ok(grad)
}

/// A planned launch as cudarc takes it.
fn config(launch: &Launch) -> LaunchConfig {
    let [gx, gy, gz] = launch.grid;
    let [bx, by, bz] = launch.block;
    LaunchConfig {
        grid_dim: (gx, gy, gz),
        block_dim: (bx, by, bz),
        shared_mem_bytes: launch.shared_mem_bytes,
    }
}

fn empty<A: CudaDType + DeviceRepr + ValidAsZeroBits>(dev: &CudaDevice) -> Result<CudaStorage> {
    Ok(CudaStorage::wrap_cuda_slice(
        dev.alloc_zeros::<A>(0)?,
        dev.clone(),
    ))
}

/// The forward op: per-row statistics [B, STAT_COLUMNS] in the accumulation dtype.
pub(crate) fn forward(
    cfg: &MarginSoftmaxLoss,
    x: (&CudaStorage, &Layout),
    targets: (&CudaStorage, &Layout),
    scale: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    with_element!(x.0, cfg.head.name(), forward_typed(cfg, x, targets, scale))
}

fn forward_typed<T: CudaElement>(
    cfg: &MarginSoftmaxLoss,
    x: (&CudaStorage, &Layout),
    targets: (&CudaStorage, &Layout),
    scale: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let shape = RowShape::new(x.1, cfg.head.name())?;
    let targets = read_targets(targets.0, targets.1, cfg, shape.classes)?;
    let dev = x.0.device();
    if shape.rows == 0 {
        return empty::<T::Acc>(dev);
    }
    let inputs = Inputs::<T>::new(cfg, shape, x, &targets, scale)?;
    let plan = Planner::DEVICE.forward(cfg, shape, 1.0)?;
    let stats = with_weights::<T::Acc, _>(cfg, dev, |weights| {
        let partials = inputs.partial(&plan, weights)?;
        inputs.finalize(&plan, weights, &partials, None)
    })?;
    Ok(CudaStorage::wrap_cuda_slice(stats, dev.clone()))
}

/// The backward op: d(loss)/d(input) [B, C] in the input dtype, from the input, the targets and
/// the per-row [M, ln Σ, a, k, g_y, r] (upstream gradient folded in).
pub(crate) fn backward(
    cfg: &MarginSoftmaxLoss,
    x: (&CudaStorage, &Layout),
    targets: (&CudaStorage, &Layout),
    row_info: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    with_element!(
        x.0,
        cfg.head.name(),
        backward_typed(cfg, x, targets, row_info)
    )
}

fn backward_typed<T: CudaElement>(
    cfg: &MarginSoftmaxLoss,
    x: (&CudaStorage, &Layout),
    targets: (&CudaStorage, &Layout),
    row_info: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let name = cfg.head.name();
    let shape = RowShape::new(x.1, name)?;
    let targets = read_targets(targets.0, targets.1, cfg, shape.classes)?;
    let dev = x.0.device();
    if shape.rows == 0 {
        return empty::<T>(dev);
    }
    let info = contiguous::<T::Acc>(row_info.0, row_info.1, "row info", name)?;
    if info.len() != shape.rows * ROWINFO_COLUMNS {
        bail!(
            "{OP_NAME}({name}): internal error: row info has {} elements, want {}",
            info.len(),
            shape.rows * ROWINFO_COLUMNS
        )
    }
    let x_view = input_view::<T>(x.0, x.1, name)?;
    let targets = upload_targets(dev, &targets)?;
    let plan = Planner::DEVICE.backward(cfg, shape, std::mem::size_of::<T>())?;
    let grad = with_weights::<T::Acc, _>(cfg, dev, |weights| {
        backward_launch::<T>(
            dev,
            shape,
            BackwardArgs {
                x: &x_view,
                targets: &targets,
                row_info: &info,
                weights,
            },
            &plan.params,
            &plan.backward,
        )
    })?;
    Ok(CudaStorage::wrap_cuda_slice(grad, dev.clone()))
}

/// Forward and backward together: (stats [B, STAT_COLUMNS], d(loss)/d(input) [B, C],
/// d(loss)/d(row scale) [B]), for the reduced loss when `mean` (Σ_i ℓ_i / Σ_i w_{y_i}), else for
/// Σ_i ℓ_i. `ms_fused` when the row fits in shared memory ([`fused_max_classes`]), else
/// partial → finalize → backward.
pub(crate) fn forward_backward(
    cfg: &MarginSoftmaxLoss,
    x: (&CudaStorage, &Layout),
    targets: (&CudaStorage, &Layout),
    scale: (&CudaStorage, &Layout),
    mean: bool,
) -> Result<(CudaStorage, CudaStorage, CudaStorage)> {
    with_element!(
        x.0,
        cfg.head.name(),
        forward_backward_typed(cfg, x, targets, scale, mean)
    )
}

fn forward_backward_typed<T: CudaElement>(
    cfg: &MarginSoftmaxLoss,
    x: (&CudaStorage, &Layout),
    targets: (&CudaStorage, &Layout),
    scale: (&CudaStorage, &Layout),
    mean: bool,
) -> Result<(CudaStorage, CudaStorage, CudaStorage)> {
    let shape = RowShape::new(x.1, cfg.head.name())?;
    let targets = read_targets(targets.0, targets.1, cfg, shape.classes)?;
    let dev = x.0.device();
    let wrap = |out: LossAndGrad<T>| {
        (
            CudaStorage::wrap_cuda_slice(out.stats, dev.clone()),
            CudaStorage::wrap_cuda_slice(out.grad, dev.clone()),
            CudaStorage::wrap_cuda_slice(out.grad_scale, dev.clone()),
        )
    };
    if shape.rows == 0 {
        return Ok(wrap(LossAndGrad {
            stats: dev.alloc_zeros(0)?,
            grad: dev.alloc_zeros(0)?,
            grad_scale: dev.alloc_zeros(0)?,
        }));
    }
    let upstream = kernel_upstream::<T::Acc>(cfg, &targets, mean)?;
    let inputs = Inputs::<T>::new(cfg, shape, x, &targets, scale)?;
    let plan = Planner::DEVICE.loss_and_grad(cfg, shape, std::mem::size_of::<T>(), upstream)?;
    let out = with_weights::<T::Acc, _>(cfg, dev, |weights| match &plan {
        LossAndGradPlan::Fused { params, fused } => inputs.fused(params, fused, weights),
        LossAndGradPlan::Split { forward, backward } => {
            let partials = inputs.partial(forward, weights)?;
            // SAFETY: ms_forward_finalize writes all rows·6 row-info entries and all rows
            // scale-gradient entries when given these buffers.
            let (mut row_info, mut grad_scale) = unsafe {
                (
                    dev.alloc::<T::Acc>(shape.rows * ROWINFO_COLUMNS)?,
                    dev.alloc::<T::Acc>(shape.rows)?,
                )
            };
            let for_backward = ForBackward {
                row_info: &mut row_info,
                grad_scale: &mut grad_scale,
            };
            let stats = inputs.finalize(forward, weights, &partials, Some(for_backward))?;
            let grad = inputs.backward(&forward.params, backward, &row_info.slice(..), weights)?;
            Ok(LossAndGrad {
                stats,
                grad,
                grad_scale,
            })
        }
    })?;
    Ok(wrap(out))
}

//! The CUDA bodies of the op (feature `cuda`): the Rust side of `kernels/*.cu`. Every raw
//! launch of the crate is here; `src/op.rs` calls [`forward`], [`backward`] and
//! [`forward_backward`] from its `cuda_fwd` and from its storage dispatch.
//!
//! - forward: `ms_forward_partial` (each row cut into `splits` column ranges, one block each,
//!   writing the online max / sum-exp state of its range) then `ms_forward_finalize` (one
//!   thread per row merges its partials in a fixed order and forms the statistics).
//! - backward: `ms_backward`, one more read of each row and one write of the gradient.
//! - forward_backward: `ms_fused` (one block per row, the row held in shared memory: one read,
//!   one write) when the row fits ([`fused_max_classes`]), else partial → finalize (with the
//!   backward's row info and d(loss)/d(scale), upstream factor folded in) → backward.
//!
//! The targets are read back to the host once per call and checked by the same code as the CPU
//! path ([`crate::cpu::validate_targets`]), so the errors are identical on every device; they go
//! to the device as i32, −1 for an ignored row. Every launch shape depends on the tensor shapes
//! only, so results are bitwise reproducible run to run.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::CudaDType;
use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Storage, WithDType, bail};
use half::{bf16, f16};

use crate::config::{MarginSoftmaxLoss, OP_NAME};
use crate::cpu::{read_weights, upstream_factor, validate_targets};
use crate::kernel_params::{MsParams, split_count};
use crate::math::{Acc, Element};
use crate::op::{ROWINFO_COLUMNS, STAT_COLUMNS};

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

/// Threads per block of `ms_forward_partial`, `ms_backward` and `ms_fused`.
const BLOCK: u32 = 256;
/// Threads per block of `ms_forward_finalize` (one thread per row).
const FINALIZE_BLOCK: u32 = 128;
/// The largest grid y / z dimension (and the cap used for the grid-stride launches).
const MAX_GRID: usize = 65_535;
/// Columns of one row's partial state (`MS_PARTIAL_COLUMNS`): max, Σ exp, Σ exp·u, Σ u.
const PARTIAL_COLUMNS: usize = 4;

/// The shared memory one block of `ms_fused` may use in all (static + dynamic): the default
/// per-block limit of every CUDA GPU, so no opt-in attribute is needed.
const FUSED_SMEM_LIMIT: usize = 48 * 1024;
/// Dynamic shared memory `ms_fused` gets past the row (round_up(C·sizeof(T), 16) bytes), as the
/// kernel ABI specifies.
const FUSED_SMEM_EXTRA: usize = 1024;
/// Room kept for the static shared memory of `ms_fused` (today the block reduction's 32 warp
/// states and the 6 row-info values: 536 bytes for f32 / f16 / bf16, 1072 for f64), checked at
/// run time against the loaded kernel.
const FUSED_STATIC_RESERVE: usize = 2048;

/// The widest row `loss_and_grad` runs through `ms_fused` for elements of `size` bytes: the row
/// must fit in round_up(C·size, 16) ≤ 48 KiB − 1024 − 2048 = 46080 bytes (a multiple of 16, so
/// this is C·size ≤ 46080).
const fn fused_max_classes(size: usize) -> usize {
    (FUSED_SMEM_LIMIT - FUSED_SMEM_EXTRA - FUSED_STATIC_RESERVE) / size
}
// The numbers documented on `MarginSoftmaxLoss::loss_and_grad`.
const _: () = assert!(
    fused_max_classes(4) == 11_520
        && fused_max_classes(2) == 23_040
        && fused_max_classes(8) == 5_760
);

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

/// The shape of a [B, C] input whose rows are each contiguous, as the kernels index it.
#[derive(Clone, Copy, Debug)]
struct RowShape {
    rows: usize,
    classes: usize,
    row_stride: usize,
}

impl RowShape {
    fn new(layout: &Layout, name: &str) -> Result<Self> {
        let (rows, classes) = layout.shape().dims2()?;
        let stride = layout.stride();
        if classes > 1 && stride[1] != 1 {
            bail!("{OP_NAME}({name}): internal error: input rows must be contiguous")
        }
        // Targets travel as i32, and the grids count rows × splits blocks in a u32.
        if classes > i32::MAX as usize || rows > i32::MAX as usize {
            bail!(
                "{OP_NAME}({name}): input shape {:?} is too large for the CUDA kernels (B and C \
                 must be below 2^31)",
                layout.dims()
            )
        }
        Ok(Self {
            rows,
            classes,
            row_stride: stride[0],
        })
    }

    fn splits(&self) -> usize {
        split_count(self.rows, self.classes)
    }
}

/// The kernels' parameters for this configuration and shape, after the checks that the launch
/// grids and the i32 fields need.
fn params(cfg: &MarginSoftmaxLoss, shape: RowShape, upstream: f64) -> Result<MsParams> {
    let name = cfg.head.name();
    let splits = shape.splits();
    if shape
        .rows
        .checked_mul(splits)
        .is_none_or(|n| n > i32::MAX as usize)
    {
        bail!("{OP_NAME}({name}): too many rows for the CUDA forward grid")
    }
    if i32::try_from(cfg.poly.len()).is_err() {
        bail!("{OP_NAME}({name}): too many PolyLoss coefficients")
    }
    Ok(MsParams::new(
        cfg,
        shape.rows,
        shape.classes,
        shape.row_stride,
        splits,
        upstream,
    ))
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
    let dev = storage.device();
    let values: Vec<i64> = match storage.dtype() {
        DType::U32 => dev
            .clone_dtoh(&view(
                storage.as_cuda_slice::<u32>()?,
                start..end,
                "targets",
                name,
            )?)?
            .into_iter()
            .map(i64::from)
            .collect(),
        DType::I64 => dev.clone_dtoh(&view(
            storage.as_cuda_slice::<i64>()?,
            start..end,
            "targets",
            name,
        )?)?,
        other => bail!("{OP_NAME}({name}): targets must be u32 or i64, got {other:?}"),
    };
    validate_targets(&values, cfg, classes)
}

/// The validated targets on the device: i32 class indices, −1 for an ignored row.
fn upload_targets(dev: &CudaDevice, targets: &[Option<usize>]) -> Result<CudaSlice<i32>> {
    // Each target is < C < 2^31 (checked by RowShape::new).
    let host: Vec<i32> = targets.iter().map(|t| t.map_or(-1, |y| y as i32)).collect();
    dev.clone_htod(&host)
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
    let mut coefficients: Vec<A> = cfg.poly.iter().map(|&e| A::of(e)).collect();
    if coefficients.is_empty() {
        coefficients.push(A::zero());
    }
    dev.clone_htod(&coefficients)
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
    let Some(weights) = &cfg.class_weights else {
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

    /// `ms_forward_partial`: the online state of each (row, split) [rows, splits, 4].
    fn partial(&self, p: &MsParams) -> Result<CudaSlice<T::Acc>> {
        let func = kernel!(self.dev, T, FORWARD, "ms_forward_partial")?;
        let blocks = self.shape.rows * p.splits as usize;
        // SAFETY: ms_forward_partial writes all rows·splits·4 entries (each block its own 4)
        // before anything reads them; the buffer is only ever passed to ms_forward_finalize.
        let mut partials = unsafe { self.dev.alloc::<T::Acc>(blocks * PARTIAL_COLUMNS) }?;
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        {
            let mut b = func.builder();
            b.arg(&self.x);
            b.arg(&self.targets);
            b.arg(&self.scale);
            b.arg(p);
            b.arg(&mut partials);
            // SAFETY: the arguments match `ms_forward_partial_T(const T* x, const int*
            // targets, const ACC* scale, MsParams p, ACC* partials)` in kernels/forward.cu;
            // x holds rows·row_stride elements from its first (the layout's row stride and
            // offset, checked by candle against the storage), targets and scale B each,
            // partials rows·splits·4, and p describes exactly these shapes.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(partials)
    }

    /// `ms_forward_finalize`: the statistics [rows, 8] from the partials, and with `backward`
    /// also the backward's row info [rows, 6] and d(loss)/d(scale) [rows], with `p.upstream`
    /// folded in.
    fn finalize(
        &self,
        p: &MsParams,
        weights: &CudaView<'_, T::Acc>,
        partials: &CudaSlice<T::Acc>,
        backward: Option<ForBackward<'_, T::Acc>>,
    ) -> Result<CudaSlice<T::Acc>> {
        let rows = self.shape.rows;
        let func = kernel!(self.dev, T, FORWARD, "ms_forward_finalize")?;
        // SAFETY: ms_forward_finalize writes all 8 columns of every row (ignored rows too).
        let mut stats = unsafe { self.dev.alloc::<T::Acc>(rows * STAT_COLUMNS) }?;
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(FINALIZE_BLOCK as usize) as u32, 1, 1),
            block_dim: (FINALIZE_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let null = 0u64;
        {
            let mut b = func.builder();
            b.arg(&self.x);
            b.arg(&self.targets);
            b.arg(&self.scale);
            b.arg(weights);
            b.arg(&self.poly);
            b.arg(p);
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
            // max(n_poly, 1), partials the rows·splits·4 written by ms_forward_partial with
            // the same p, stats rows·8, and row_info / grad_scale are rows·6 / rows buffers or
            // null (0), which the kernel then does not write.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(stats)
    }

    /// `ms_backward`: d(loss)/d(input) [rows, C] from the row info [rows, 6].
    fn backward(&self, p: &MsParams, row_info: &CudaView<'_, T::Acc>) -> Result<CudaSlice<T>> {
        backward_launch(self.dev, self.shape, &self.x, &self.targets, row_info, p)
    }

    /// `ms_fused`: the statistics, the gradient and d(loss)/d(scale) in one launch.
    fn fused(
        &self,
        p: &MsParams,
        weights: &CudaView<'_, T::Acc>,
        shared_mem_bytes: usize,
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
        let cfg = LaunchConfig {
            grid_dim: (rows.min(MAX_GRID) as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: shared_mem_bytes as u32,
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
            // plus 1024, and with the kernel's static shared memory (checked above) stays within
            // the 48 KiB that need no opt-in.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(LossAndGrad {
            stats,
            grad,
            grad_scale,
        })
    }
}

fn backward_launch<T: CudaElement>(
    dev: &CudaDevice,
    shape: RowShape,
    x: &CudaView<'_, T>,
    targets: &CudaSlice<i32>,
    row_info: &CudaView<'_, T::Acc>,
    p: &MsParams,
) -> Result<CudaSlice<T>> {
    let RowShape { rows, classes, .. } = shape;
    let func = kernel!(dev, T, BACKWARD, "ms_backward")?;
    // SAFETY: ms_backward is grid-stride in both dimensions and writes all C elements of every
    // row (ignored rows: zeros).
    let mut grad = unsafe { dev.alloc::<T>(rows * classes) }?;
    let per_block = BLOCK as usize * (16 / std::mem::size_of::<T>());
    let cfg = LaunchConfig {
        grid_dim: (
            classes.div_ceil(per_block).min(MAX_GRID) as u32,
            rows.min(MAX_GRID) as u32,
            1,
        ),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    {
        let mut b = func.builder();
        b.arg(x);
        b.arg(targets);
        b.arg(row_info);
        b.arg(p);
        b.arg(&mut grad);
        // SAFETY: the arguments match `ms_backward_T(const T* x, const int* targets, const ACC*
        // row_info, MsParams p, T* grad)` in kernels/backward.cu; x holds rows·row_stride
        // elements from its first, targets rows, row_info rows·6, grad rows·C.
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok(grad)
}

/// The dynamic shared memory `ms_fused` is launched with for rows of `classes` elements of
/// `T` (the row, 16-byte aligned, plus [`FUSED_SMEM_EXTRA`]) when the row fits
/// ([`fused_max_classes`]); `None`: the three-kernel path. From the shape and dtype only.
fn fused_shared_mem<T>(classes: usize) -> Option<usize> {
    let size = std::mem::size_of::<T>();
    (classes <= fused_max_classes(size))
        .then(|| (classes * size).next_multiple_of(16) + FUSED_SMEM_EXTRA)
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
    let stats = with_weights::<T::Acc, _>(cfg, dev, |weights| {
        let p = params(cfg, shape, 1.0)?;
        let partials = inputs.partial(&p)?;
        inputs.finalize(&p, weights, &partials, None)
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
    let p = params(cfg, shape, 1.0)?;
    let grad = backward_launch::<T>(dev, shape, &x_view, &targets, &info, &p)?;
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
    // As on the CPU: the same fold over the same validated targets and weights (read back only
    // where the mean needs them). The f64 round trip to the kernels is exact.
    let host_weights = if mean {
        read_weights::<T::Acc>(cfg)?
    } else {
        None
    };
    let upstream = upstream_factor::<T::Acc>(&targets, &host_weights, mean);
    let upstream = <T::Acc as WithDType>::to_f64(upstream);
    let inputs = Inputs::<T>::new(cfg, shape, x, &targets, scale)?;
    let out = with_weights::<T::Acc, _>(cfg, dev, |weights| {
        let p = params(cfg, shape, upstream)?;
        if let Some(smem) = fused_shared_mem::<T>(shape.classes) {
            return inputs.fused(&p, weights, smem);
        }
        let partials = inputs.partial(&p)?;
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
        let stats = inputs.finalize(&p, weights, &partials, Some(for_backward))?;
        let grad = inputs.backward(&p, &row_info.slice(..))?;
        Ok(LossAndGrad {
            stats,
            grad,
            grad_scale,
        })
    })?;
    Ok(wrap(out))
}

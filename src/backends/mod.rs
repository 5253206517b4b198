//! Where the op's bodies run. Each backend takes the op's entry points (forward, backward, the
//! fused forward + backward, and the statistics of a slice of the classes) for one kind of
//! storage:
//!
//! - [`cpu`]: the CPU bodies (rayon over rows, SIMD level picked at run time);
//! - `emu` (feature `kernel-emu`): the CUDA kernels themselves on CPU storage, through the SIMT
//!   emulator of `kernels/emu/`, planned as for a GPU;
//! - `cuda` (feature `cuda`): the CUDA kernels on a GPU.
//!
//! [`cpu_storage`] reads candle CPU storage for the two backends that take it; `launch` is the
//! one launch planner of the two that launch the kernels (it describes the launch paths).

pub(crate) mod cpu;
pub(crate) mod cpu_storage;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(feature = "kernel-emu")]
pub(crate) mod emu;
#[cfg(all(test, feature = "kernel-host-check"))]
mod kernel_check;
#[cfg(any(feature = "cuda", feature = "kernel-emu", test))]
pub(crate) mod launch;

use candle_core::backend::BackendStorage;
use candle_core::{Layout, Result, bail};

use crate::config::MarginSoftmaxLoss;
use crate::layout::ROWINFO_COLUMNS_ROW_MARGINS;

/// A tensor's storage and layout, as candle hands them to a `CustomOp`.
pub(crate) type Arg<'a, S> = (&'a S, &'a Layout);

/// One backend's bodies of the op's entry points for inputs of element type `T`, on storage `S`.
/// The rows of `x` are each contiguous (checked by the public entry points); every other tensor
/// is contiguous. Statistics and states are in the accumulation type (f64 for f64 input, else
/// f32), the gradient in `T`.
pub(crate) trait Bodies<T, S> {
    /// Whether these bodies take per-row margins: row parameters [B, `ROW_PARAMS`] in place of
    /// the row scale \[B\] and row info [B, `ROWINFO_COLUMNS_ROW_MARGINS`] (the CPU bodies; the
    /// CUDA kernels take the head's margins).
    fn takes_row_margins(&self) -> bool {
        false
    }

    /// The forward op: per-row statistics [B, `STAT_COLUMNS`]; dℓ/dr (the last column) only
    /// with `scale_grad`, else 0.
    fn forward(
        &self,
        cfg: &MarginSoftmaxLoss,
        x: Arg<S>,
        targets: Arg<S>,
        scale: Arg<S>,
        scale_grad: bool,
    ) -> Result<S>;

    /// The backward op: d(loss)/d(x) [B, C] from the input, the targets and the per-row
    /// [M, ln Σ, a, k, g_y, r] (`ROWINFO_COLUMNS`, upstream gradient folded in).
    fn backward(
        &self,
        cfg: &MarginSoftmaxLoss,
        x: Arg<S>,
        targets: Arg<S>,
        row_info: Arg<S>,
    ) -> Result<S>;

    /// Forward and backward together: (stats [B, `STAT_COLUMNS`], d(loss)/d(x) [B, C],
    /// d(loss)/d(row scale) \[B\]), for the reduced loss when `mean` (Σ_i ℓ_i / Σ_i w_{y_i}),
    /// else for Σ_i ℓ_i. d(loss)/d(row scale) only with `scale_grad`, else 0.
    fn forward_backward(
        &self,
        cfg: &MarginSoftmaxLoss,
        x: Arg<S>,
        targets: Arg<S>,
        scale: Arg<S>,
        mean: bool,
        scale_grad: bool,
    ) -> Result<(S, S, S)>;

    /// The online state of the non-target entries of a slice of the classes (see
    /// `op::slice_partials`): [B, splits, `PARTIAL_COLUMNS`] and the split count.
    /// `local_targets[i]` is row i's target as a column of the slice, −1 for an ignored row, and
    /// any value ≥ the slice's width for a target in another slice; the slice's class weights
    /// are the configuration's (already cut to the slice).
    fn slice_partials(
        &self,
        cfg: &MarginSoftmaxLoss,
        x: Arg<S>,
        local_targets: &[i64],
        scale: Arg<S>,
        scale_grad: bool,
    ) -> Result<(S, usize)>;
}

/// A backend: its bodies for every input element type the op takes.
pub(crate) trait Backend<S>:
    Bodies<f32, S> + Bodies<f64, S> + Bodies<half::f16, S> + Bodies<half::bf16, S>
{
}

impl<S, B> Backend<S> for B where
    B: Bodies<f32, S> + Bodies<f64, S> + Bodies<half::f16, S> + Bodies<half::bf16, S>
{
}

/// `$body` with `$t` the element type of `$dtype` (f32, f64, f16, bf16), else the op's dtype
/// error: the one dtype dispatch of the op.
macro_rules! by_dtype {
    ($dtype:expr, $cfg:expr, $t:ident => $body:expr) => {
        match $dtype {
            ::candle_core::DType::F32 => {
                type $t = f32;
                $body
            }
            ::candle_core::DType::F64 => {
                type $t = f64;
                $body
            }
            ::candle_core::DType::F16 => {
                type $t = ::half::f16;
                $body
            }
            ::candle_core::DType::BF16 => {
                type $t = ::half::bf16;
                $body
            }
            other => ::candle_core::bail!(
                "{}({}): input dtype must be f32, f64, f16 or bf16, got {:?}",
                $crate::config::OP_NAME,
                $cfg.head.name(),
                other
            ),
        }
    };
}
pub(crate) use by_dtype;

/// Refuses per-row margins (row parameters of rank 2, or row info of
/// `ROWINFO_COLUMNS_ROW_MARGINS` columns) on bodies that do not take them.
fn check_row_margins<S, B: Bodies<f32, S>>(
    backend: &B,
    cfg: &MarginSoftmaxLoss,
    per_row: &Layout,
    row_margins: bool,
) -> Result<()> {
    if row_margins && !backend.takes_row_margins() {
        bail!(
            "{}({}): per-row margins run on the CPU only so far (this device's kernels take the \
             head's margins); got row parameters of shape {:?}",
            crate::config::OP_NAME,
            cfg.head.name(),
            per_row.dims()
        )
    }
    Ok(())
}

/// [`Bodies::forward`] for `x`'s element type.
pub(crate) fn forward<S: BackendStorage, B: Backend<S>>(
    backend: &B,
    cfg: &MarginSoftmaxLoss,
    x: Arg<S>,
    targets: Arg<S>,
    scale: Arg<S>,
    scale_grad: bool,
) -> Result<S> {
    check_row_margins(backend, cfg, scale.1, scale.1.dims().len() == 2)?;
    by_dtype!(x.0.dtype(), cfg, T => Bodies::<T, S>::forward(backend, cfg, x, targets, scale, scale_grad))
}

/// [`Bodies::backward`] for `x`'s element type.
pub(crate) fn backward<S: BackendStorage, B: Backend<S>>(
    backend: &B,
    cfg: &MarginSoftmaxLoss,
    x: Arg<S>,
    targets: Arg<S>,
    row_info: Arg<S>,
) -> Result<S> {
    let width = row_info.1.dims().get(1).copied();
    check_row_margins(
        backend,
        cfg,
        row_info.1,
        width == Some(ROWINFO_COLUMNS_ROW_MARGINS),
    )?;
    by_dtype!(x.0.dtype(), cfg, T => Bodies::<T, S>::backward(backend, cfg, x, targets, row_info))
}

/// [`Bodies::forward_backward`] for `x`'s element type.
pub(crate) fn forward_backward<S: BackendStorage, B: Backend<S>>(
    backend: &B,
    cfg: &MarginSoftmaxLoss,
    x: Arg<S>,
    targets: Arg<S>,
    scale: Arg<S>,
    mean: bool,
    scale_grad: bool,
) -> Result<(S, S, S)> {
    check_row_margins(backend, cfg, scale.1, scale.1.dims().len() == 2)?;
    by_dtype!(x.0.dtype(), cfg, T => Bodies::<T, S>::forward_backward(backend, cfg, x, targets, scale, mean, scale_grad))
}

/// [`Bodies::slice_partials`] for `x`'s element type.
pub(crate) fn slice_partials<S: BackendStorage, B: Backend<S>>(
    backend: &B,
    cfg: &MarginSoftmaxLoss,
    x: Arg<S>,
    local_targets: &[i64],
    scale: Arg<S>,
    scale_grad: bool,
) -> Result<(S, usize)> {
    if scale.1.dims().len() == 2 {
        bail!(
            "{}({}): per-row margins are not taken by the slice path (MarginHead, sharding) yet",
            crate::config::OP_NAME,
            cfg.head.name()
        )
    }
    by_dtype!(x.0.dtype(), cfg, T => Bodies::<T, S>::slice_partials(backend, cfg, x, local_targets, scale, scale_grad))
}

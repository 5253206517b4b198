//! Reading candle CPU storage as the op's backends need it: the rows of a \[B, C\] input whose rows
//! are each contiguous, contiguous 1-D / 2-D tensors, and the validated targets. Shared by the CPU
//! bodies (`src/backends/cpu/`) and the emulated kernels (`src/backends/emu/`), which both take CPU storage.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, WithDType, bail};

use crate::config::{MarginSoftmaxLoss, OP_NAME};
use crate::targets_and_weights::validate_targets;

/// Read access to the rows of a \[B, C\] input whose rows are each contiguous.
pub(crate) struct Rows<'a, T> {
    data: &'a [T],
    offset: usize,
    row_stride: usize,
    pub rows: usize,
    pub classes: usize,
}

impl<'a, T: WithDType> Rows<'a, T> {
    pub(crate) fn new(storage: &'a CpuStorage, layout: &Layout, name: &str) -> Result<Self> {
        let (rows, classes) = layout.shape().dims2()?;
        let stride = layout.stride();
        if classes > 1 && stride[1] != 1 {
            bail!("{OP_NAME}({name}): internal error: input rows must be contiguous")
        }
        Ok(Self {
            data: storage.as_slice::<T>()?,
            offset: layout.start_offset(),
            row_stride: stride[0],
            rows,
            classes,
        })
    }

    pub(crate) fn row(&self, i: usize) -> &'a [T] {
        let start = self.offset + i * self.row_stride;
        &self.data[start..start + self.classes]
    }
}

/// Mutable access to CPU storage of a known element type.
pub(crate) trait HostElement: WithDType {
    fn slice_mut(storage: &mut CpuStorage) -> Option<&mut [Self]>;
}

macro_rules! host_element {
    ($t:ty, $variant:ident) => {
        impl HostElement for $t {
            fn slice_mut(storage: &mut CpuStorage) -> Option<&mut [Self]> {
                match storage {
                    CpuStorage::$variant(v) => Some(&mut v[..]),
                    _ => None,
                }
            }
        }
    };
}
host_element!(f32, F32);
host_element!(f64, F64);
host_element!(half::f16, F16);
host_element!(half::bf16, BF16);

/// The elements of a contiguous tensor's storage, writable.
pub(crate) fn contiguous_mut<'a, T: HostElement>(
    storage: &'a mut CpuStorage,
    layout: &Layout,
    what: &str,
    name: &str,
) -> Result<&'a mut [T]> {
    let dtype = storage.dtype();
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("{OP_NAME}({name}): {what} must be contiguous")
    };
    match T::slice_mut(storage) {
        Some(v) => Ok(&mut v[start..end]),
        None => bail!(
            "{OP_NAME}({name}): {what} has dtype {dtype:?}, expected {:?}",
            T::DTYPE
        ),
    }
}

/// A contiguous 1-D or 2-D tensor's elements.
pub(crate) fn contiguous<'a, T: WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
    name: &str,
) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&storage.as_slice::<T>()?[start..end]),
        None => bail!("{OP_NAME}({name}): internal error: {what} must be contiguous"),
    }
}

/// The validated target of each row: `None` for an ignored row.
pub(crate) fn read_targets(
    storage: &CpuStorage,
    layout: &Layout,
    cfg: &MarginSoftmaxLoss,
    classes: usize,
) -> Result<Vec<Option<usize>>> {
    let name = cfg.head.name();
    let values: Vec<i64> = match storage {
        CpuStorage::U8(_) => contiguous::<u8>(storage, layout, "targets", name)?
            .iter()
            .map(|&t| t as i64)
            .collect(),
        CpuStorage::U32(_) => contiguous::<u32>(storage, layout, "targets", name)?
            .iter()
            .map(|&t| t as i64)
            .collect(),
        CpuStorage::I64(_) => contiguous::<i64>(storage, layout, "targets", name)?.to_vec(),
        other => bail!(
            "{OP_NAME}({name}): targets must be u8, u32 or i64, got {:?}",
            other.dtype()
        ),
    };
    validate_targets(&values, cfg, classes)
}

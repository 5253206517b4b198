//! Losses computed outside candle's autograd (the head modules, the sharded loss) hand their
//! gradients to it through pass-through nodes: the loss value gets one node per parameter that
//! tracks a gradient; each node's forward copies the value and its backward passes the upstream
//! gradient on to the value and hands the parameter its gradient, from a [`GradientSource`]
//! shared by the nodes of one loss.

use std::sync::Arc;

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, bail};

/// Where the nodes of one loss get their parameters' gradients.
pub(crate) trait GradientSource: Send + Sync {
    /// The gradient of parameter `slot` for the upstream gradient `upstream` (the loss's shape),
    /// or `None` for none. Called once per node and backward pass; a slot asked for again is a
    /// second backward, which a source may refuse with an `Err`.
    fn take(&self, slot: usize, upstream: &Tensor) -> Result<Option<Tensor>>;
}

/// `value` (a fresh copy, detached from whatever computed it) with a pass-through node for each
/// `(slot, parameter)` whose parameter tracks a gradient. `name` names the op in errors.
pub(crate) fn hand_over(
    name: &'static str,
    value: &Tensor,
    params: &[(usize, Option<&Tensor>)],
    source: Arc<dyn GradientSource>,
) -> Result<Tensor> {
    let mut out = value.detach().affine(1.0, 0.0)?;
    for &(slot, param) in params {
        if let Some(p) = param
            && p.track_op()
        {
            out = out.apply_op2(
                p,
                HandOver {
                    name,
                    slot,
                    source: source.clone(),
                },
            )?;
        }
    }
    Ok(out)
}

struct HandOver {
    name: &'static str,
    slot: usize,
    source: Arc<dyn GradientSource>,
}

impl HandOver {
    fn check(&self, layout: &Layout) -> Result<()> {
        if !layout.is_contiguous() || layout.start_offset() != 0 {
            bail!(
                "{}: the loss value must be a fresh contiguous tensor",
                self.name
            )
        }
        Ok(())
    }
}

impl CustomOp2 for HandOver {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        value: &CpuStorage,
        layout: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.check(layout)?;
        Ok((value.try_clone(layout)?, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        value: &CudaStorage,
        layout: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.check(layout)?;
        Ok((value.try_clone(layout)?, layout.shape().clone()))
    }

    fn bwd(
        &self,
        _value: &Tensor,
        _param: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let mine = self.source.take(self.slot, grad_res)?;
        Ok((Some(grad_res.clone()), mine))
    }
}

//! The hand-over of a head's gradients to candle's autograd ([`HeadGradients`], one per loss):
//! computed in the forward call for a reduced loss, or deferred to `backward()` for per-row
//! losses, and handed over once.

use std::sync::Mutex;

use candle_core::{DType, Result, Tensor, bail};

use super::batch::{Gradients, HeadBatch};
use crate::config::HEAD_OP;
use crate::gradient_handover::GradientSource;

pub(super) enum Pending {
    /// Computed in the forward call, for an upstream gradient of 1.
    Ready(Gradients),
    /// Per-row losses: the gradient pass runs in `backward()` with the per-row upstream.
    Deferred {
        batch: Box<HeadBatch>,
        stats: Tensor,
    },
    /// Handed over to a `backward()` already.
    Spent,
}

/// Shared by the pass-through nodes of one loss. Each parameter's gradient is handed over once
/// and then released (as PyTorch frees a graph after `backward()`), so the head holds no copy of
/// W's gradient beside candle's gradient store.
pub(super) struct HeadGradients {
    pub(super) state: Mutex<SourceState>,
}

pub(super) struct SourceState {
    pub(super) pending: Pending,
    /// The gradients not handed over yet (embeddings, W, bias, per-row margins).
    pub(super) handed: Option<[Option<Tensor>; 4]>,
}

impl GradientSource for HeadGradients {
    /// `slot`'s gradient for this backward. The first node to ask computes every gradient with
    /// its upstream gradient (each node passes the same values on: candle hands them over as
    /// separate tensors); a slot asked for twice means a second backward.
    fn take(&self, slot: usize, upstream: &Tensor) -> Result<Option<Tensor>> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.handed.is_none() {
            let grads = match std::mem::replace(&mut state.pending, Pending::Spent) {
                Pending::Ready(g) => {
                    let factor = upstream.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                    if factor == 1.0 {
                        g
                    } else {
                        Gradients {
                            embeddings: (&g.embeddings * factor)?,
                            weight: (&g.weight * factor)?,
                            bias: match &g.bias {
                                Some(b) => Some((b * factor)?),
                                None => None,
                            },
                            margins: match &g.margins {
                                Some(m) => Some((m * factor)?),
                                None => None,
                            },
                        }
                    }
                }
                Pending::Deferred { batch, stats } => {
                    let up = batch.row_upstream(Some(upstream))?;
                    batch.second_pass(&stats, &up)?
                }
                // A backward whose gradient pass failed spent the pending state.
                Pending::Spent => bail!(
                    "{HEAD_OP}: this loss's backward already ran and failed; compute the loss \
                     again for another backward"
                ),
            };
            state.handed = Some([
                Some(grads.embeddings),
                Some(grads.weight),
                grads.bias,
                grads.margins,
            ]);
        }
        let slots = state.handed.as_mut().expect("set above");
        match slots.get_mut(slot).and_then(Option::take) {
            Some(g) => Ok(Some(g)),
            None => bail!(
                "{HEAD_OP}: this loss was already back-propagated; a head's loss hands its \
                 gradients over once (compute the loss again for another backward)"
            ),
        }
    }
}

#[derive(Clone, Copy)]
pub(super) enum Slot {
    Embeddings = 0,
    Weight = 1,
    Bias = 2,
    /// Per-row margins (m1, m2, m3) [B, 3].
    Margins = 3,
}

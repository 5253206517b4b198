//! Timing on the GPU for the examples that measure (`bench`, `peer`): two events on the stream
//! candle launches on.

use std::sync::Arc;

use anyhow::Result;
use candle_core::CudaDevice;
use candle_core::cuda_backend::cudarc::driver::{CudaEvent, CudaStream, sys};

/// Two timing events on the stream candle launches on.
pub struct Events {
    stream: Arc<CudaStream>,
    start: CudaEvent,
    end: CudaEvent,
}

impl Events {
    pub fn new(dev: &CudaDevice) -> Result<Self> {
        let stream = dev.cuda_stream();
        // `None` would create events with timing disabled.
        let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = stream.context().new_event(flags)?;
        let end = stream.context().new_event(flags)?;
        Ok(Self { stream, start, end })
    }

    /// The device time between an event recorded before `f` and one after it (ms). Host work
    /// inside `f` that keeps the stream waiting is included.
    pub fn time_ms(&self, f: impl FnOnce() -> Result<()>) -> Result<f64> {
        self.start.record(&self.stream)?;
        f()?;
        self.end.record(&self.stream)?;
        // Synchronises on both events.
        Ok(f64::from(self.start.elapsed_ms(&self.end)?))
    }
}

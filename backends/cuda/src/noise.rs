//! Launcher of kernels/philox.cu: noise drawn on the device with the cpu's counter layout.

use crate::device::{derr, CudaBackend, Param, T};
use crate::launch;
use cudarc::driver::PushKernelArg;
use moe_engine::ops::NoiseOp;
use moe_engine::Result;

impl CudaBackend {
    pub(crate) fn noise(&self, op: &NoiseOp) -> Result<T> {
        let mut out = self.zeros::<f32>(op.n)?;
        if op.n > 0 {
            let f = self.function("philox.cu", "noise")?;
            let p = Param(op.params);
            // SAFETY: matches kernels/philox.cu noise(out, NoiseParams); out holds n values.
            unsafe { self.stream.launch_builder(&f).arg(&mut out).arg(&p).launch(launch::per_element(op.n).config()) }
                .map_err(derr)?;
        }
        Self::out(&op.shape, out)
    }
}

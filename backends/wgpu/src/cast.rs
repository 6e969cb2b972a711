//! Launcher of `shaders/cast.wgsl`: `cast_weight` on the device, in the layout
//! `run_upload_weight` makes (one buffer; halves packed two per u32 word, padded to whole
//! words and at least one).

use crate::elementwise::count;
use crate::kernels::CAST;
use crate::{halves, WgpuBackend, T};
use moe_engine::device::{Device, WeightUploadOp};
use moe_engine::kernel_abi::{grid_1d, WG_ELEMENTWISE};
use moe_engine::ops::CastWeightOp;
use moe_engine::{DType, Result};

pub(crate) fn cast_weight(b: &WgpuBackend, op: &CastWeightOp<'_, WgpuBackend>) -> Result<T> {
    let (g, n, k) = op.dims;
    let parts = halves::split(g, n, k, op.dtype.size() as u64, b.max_binding())?;
    if parts.len() > 1 || !op.x.buffer().parts.is_empty() {
        // A stack that upload_weight splits into parts (or an input split into parts): the
        // host round trip, which is the definition.
        let host = b.download(op.x)?;
        return b.run_upload_weight(&WeightUploadOp::check(b, &host, op.dtype)?);
    }
    let elems = count(op.params.n)?;
    // What `halves::encode` gives: whole u32 words, at least one.
    let bytes = (elems as u64 * op.dtype.size() as u64).max(4).next_multiple_of(4);
    let out = b.alloc(bytes, "cast weight")?;
    let src = &op.x.buffer().buf;
    match op.dtype {
        DType::F32 => b.copy(src, 0, &out.buf, 0, elems as u64 * 4),
        _ if elems > 0 => {
            let words = elems.div_ceil(2);
            b.dispatch(&CAST, "cast_weight", &op.params, &[src, &out.buf], grid_1d(words, WG_ELEMENTWISE))?;
        }
        _ => {}
    }
    T::from_parts(out, op.x.shape().to_vec(), op.dtype)
}

//! Launchers of `shaders/elementwise.wgsl` and `shaders/permute.wgsl`.

use crate::kernels::{ELEMENTWISE, PERMUTE};
use crate::{WgpuBackend, T};
use moe_engine::kernel_abi::{grid_1d, WG_ELEMENTWISE};
use moe_engine::ops::{CombineOp, ElementwiseOp, PassRowsOp, PermuteOp, PermuteScaledOp};
use moe_engine::{DType, Error, Result};

pub(crate) fn f32buf<'a>(t: &'a T, name: &str) -> Result<&'a wgpu::Buffer> {
    WgpuBackend::buf(t, name, DType::F32)
}

/// The shaders count in u32: wgpu's bindings hold fewer than 2³² elements, so the ABI's
/// u64 count always fits; an error (not a wrapped count) if it did not.
pub(crate) fn count(n: u64) -> Result<usize> {
    u32::try_from(n)
        .map(|n| n as usize)
        .map_err(|_| Error::unsupported("wgpu", format!("{n} elements in one dispatch (at most 2^32 - 1)")))
}

/// An elementwise op: one invocation per output element.
pub(crate) fn run(b: &WgpuBackend, op: &ElementwiseOp<'_, WgpuBackend>) -> Result<T> {
    let out = b.tensor(&op.out_shape, DType::F32, op.kind.entry())?;
    let n = count(op.params.n)?;
    if n == 0 {
        return Ok(out);
    }
    let b_buf = op.b.map_or(Ok(&b.dummy), |t| f32buf(t, "b"))?;
    let c_buf = op.c.map_or(Ok(&b.dummy), |t| f32buf(t, "c"))?;
    let bufs = [f32buf(op.a, "a")?, b_buf, c_buf, &out.buffer().buf];
    b.dispatch(&ELEMENTWISE, op.kind.entry(), &op.params, &bufs, grid_1d(n, WG_ELEMENTWISE))?;
    Ok(out)
}

pub(crate) fn permute(b: &WgpuBackend, op: &PermuteOp<'_, WgpuBackend>) -> Result<T> {
    let out = b.tensor(&op.out_shape, DType::F32, "permuted rows")?;
    let n = count(op.params.n)?;
    if n > 0 {
        let rows = WgpuBackend::buf(op.rows.tensor(), "route rows", DType::I32)?;
        let bufs = [f32buf(op.x, "x")?, rows, &b.dummy, &out.buffer().buf];
        b.dispatch(&PERMUTE, "permute", &op.params, &bufs, grid_1d(n, WG_ELEMENTWISE))?;
    }
    Ok(out)
}

pub(crate) fn permute_scaled(b: &WgpuBackend, op: &PermuteScaledOp<'_, WgpuBackend>) -> Result<T> {
    let out = b.tensor(&op.out_shape, DType::F32, "permuted rows")?;
    let n = count(op.params.n)?;
    if n > 0 {
        let rows = WgpuBackend::buf(op.rows.tensor(), "route rows", DType::I32)?;
        let bufs = [f32buf(op.x, "x")?, rows, f32buf(op.weights, "route weights")?, &out.buffer().buf];
        b.dispatch(&PERMUTE, "permute_scaled", &op.params, &bufs, grid_1d(n, WG_ELEMENTWISE))?;
    }
    Ok(out)
}

/// pass_rows on the permute family's bindings: x as the source rows, the group offsets
/// as the route rows, y as the weights (shaders/permute.wgsl says so).
pub(crate) fn pass_rows(b: &WgpuBackend, op: &PassRowsOp<'_, WgpuBackend>) -> Result<T> {
    let out = b.tensor(&op.out_shape, DType::F32, "pass_rows output")?;
    let n = count(op.params.n)?;
    if n > 0 {
        let offsets = WgpuBackend::buf(op.offsets.tensor(), "offsets", DType::I32)?;
        let bufs = [f32buf(op.x, "pass_rows x")?, offsets, f32buf(op.y, "pass_rows y")?, &out.buffer().buf];
        b.dispatch(&PERMUTE, "pass_rows", &op.params, &bufs, grid_1d(n, WG_ELEMENTWISE))?;
    }
    Ok(out)
}

pub(crate) fn combine(b: &WgpuBackend, op: &CombineOp<'_, WgpuBackend>) -> Result<T> {
    let out = b.tensor(&op.out_shape, DType::F32, "combined output")?;
    let n = count(op.params.n)?;
    if n > 0 {
        let bufs = [
            f32buf(op.yp, "expert output")?,
            WgpuBackend::buf(op.rows.tensor(), "route rows", DType::I32)?,
            f32buf(op.weights, "combine weights")?,
            &out.buffer().buf,
        ];
        b.dispatch(&PERMUTE, "combine", &op.params, &bufs, grid_1d(n, WG_ELEMENTWISE))?;
    }
    Ok(out)
}

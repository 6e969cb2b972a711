//! Launchers of `shaders/matmul.wgsl`: plain and expert-grouped matrix products. The
//! parameter block comes from the op front door; what is wgpu's own is the split of large
//! weight stacks into parts (one dispatch per part, each with its range in `g0..g1`,
//! `c0..c1`) and the tile list buffer.

use crate::kernels::MATMUL;
use crate::{WeightPart, WgpuBackend, T};
use moe_engine::kernel_abi::{tile_grid, tile_list_words, MatmulParams, TILE};
use moe_engine::ops::{GroupedLinearOp, GroupedMlpOp, LinearOp};
use moe_engine::{DType, Result};

fn bias_buf<'a>(b: &'a WgpuBackend, bias: Option<&'a T>, name: &str) -> Result<&'a wgpu::Buffer> {
    bias.map_or(Ok(&b.dummy), |t| WgpuBackend::buf(t, name, DType::F32))
}

/// The parameter block of one weight part.
fn part_params(p: &MatmulParams, part: &WeightPart) -> MatmulParams {
    MatmulParams { g0: part.g0 as u32, g1: part.g1 as u32, c0: part.c0 as u32, c1: part.c1 as u32, ..*p }
}

pub(crate) fn linear(b: &WgpuBackend, op: &LinearOp<'_, WgpuBackend>) -> Result<T> {
    let out = b.tensor(&op.out_shape(), DType::F32, "linear output")?;
    let xb = WgpuBackend::buf(op.x, "linear input", DType::F32)?;
    let bb = bias_buf(b, op.bias, "linear bias")?;
    for part in b.weight_parts(op.w)? {
        let (grid, _) = tile_grid((part.c1 - part.c0).div_ceil(TILE), op.params.max_tiles as usize);
        b.dispatch(
            &MATMUL,
            "linear",
            &part_params(&op.params, &part),
            &[xb, &part.buf, bb, &b.dummy, &b.dummy_rw, &out.buffer().buf, &b.dummy_rw2],
            grid,
        )?;
    }
    Ok(out)
}

pub(crate) fn grouped(b: &WgpuBackend, op: &GroupedLinearOp<'_, WgpuBackend>) -> Result<T> {
    let out = b.tensor(&op.out_shape(), DType::F32, "grouped output")?;
    let tiles = b.alloc(4 * tile_list_words(op.params.max_tiles as usize) as u64, "tile map")?;
    let xb = WgpuBackend::buf(op.x, "grouped input", DType::F32)?;
    let ob = WgpuBackend::buf(op.offsets.tensor(), "offsets", DType::I32)?;
    let bb = bias_buf(b, op.bias, "expert biases")?;
    for (i, part) in b.weight_parts(op.w)?.iter().enumerate() {
        let params = part_params(&op.params, part);
        let (grid, _) = tile_grid((part.c1 - part.c0).div_ceil(TILE), op.params.max_tiles as usize);
        let bufs = [xb, &part.buf, bb, ob, &tiles.buf, &out.buffer().buf, &b.dummy_rw];
        if i == 0 {
            b.dispatch(&MATMUL, "tile_map", &params, &bufs, [1, 1, 1])?;
        }
        b.dispatch(&MATMUL, "grouped", &params, &bufs, grid)?;
    }
    Ok(out)
}

/// The first product of GLU experts with the activation fused in (`matmul.wgsl`
/// `grouped_glu`): `h [R, F]` and, with `keep_pre`, the pre-activation `[R, 2F]`. `None`
/// when the weights are split by columns (gate and up rows may then sit in different
/// parts), for the caller to compose the unfused ops instead.
pub(crate) fn grouped_glu(b: &WgpuBackend, op: &GroupedMlpOp<'_, WgpuBackend>) -> Result<Option<(T, Option<T>)>> {
    let w = op.weights;
    let parts = b.weight_parts(w.w_in)?;
    let n = op.first.n;
    if parts.iter().any(|p| p.c0 != 0 || p.c1 != n) {
        return Ok(None);
    }
    let rows = op.first.rows;
    let h = b.tensor(&[rows, op.inner], DType::F32, "GLU output")?;
    let pre = if op.keep_pre { Some(b.tensor(&[rows, n], DType::F32, "pre-activation")?) } else { None };
    let max_tiles = op.params.max_tiles as usize;
    let tiles = b.alloc(4 * tile_list_words(max_tiles) as u64, "tile map")?;
    let xb = WgpuBackend::buf(op.xp, "grouped input", DType::F32)?;
    let ob = WgpuBackend::buf(op.offsets.tensor(), "offsets", DType::I32)?;
    let bb = bias_buf(b, w.b_in, "expert biases")?;
    let pre_buf = pre.as_ref().map_or(&b.dummy_rw, |p| &p.buffer().buf);
    for (i, part) in parts.iter().enumerate() {
        let params = part_params(&op.params, part);
        let (grid, _) = tile_grid(op.inner.div_ceil(TILE), max_tiles);
        let bufs = [xb, &part.buf, bb, ob, &tiles.buf, &h.buffer().buf, pre_buf];
        if i == 0 {
            b.dispatch(&MATMUL, "tile_map", &params, &bufs, [1, 1, 1])?;
        }
        b.dispatch(&MATMUL, "grouped_glu", &params, &bufs, grid)?;
    }
    Ok(Some((h, pre)))
}

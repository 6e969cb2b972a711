//! Launchers of `shaders/matmul.wgsl`: plain and expert-grouped matrix products.

use crate::kernels::MATMUL;
use crate::{WgpuBackend, T};
use moe_engine::{DType, Error, Result};

/// Rows and columns of one output tile (BM, BN in the shader).
const TILE: usize = 64;

/// `[x, y, z]` grid for `cols` column blocks by `rows` row blocks, folding rows into z past
/// the per-dimension limit; returns the grid and the y stride the shader unfolds with.
fn grid(cols: usize, rows: usize) -> ([u32; 3], u32) {
    let y = rows.clamp(1, 65535);
    ([cols.max(1) as u32, y as u32, rows.div_ceil(y).max(1) as u32], y as u32)
}

fn bias_of<'a>(
    b: &'a WgpuBackend,
    bias: Option<&'a T>,
    shape: &[usize],
    name: &str,
) -> Result<(&'a wgpu::Buffer, u32)> {
    match bias {
        Some(t) => {
            if t.shape() != shape {
                return Err(Error::shape(name, format!("{shape:?}"), t.shape()));
            }
            Ok((WgpuBackend::buf(t, name, DType::F32)?, 1))
        }
        None => Ok((&b.dummy, 0)),
    }
}

pub(crate) fn linear(b: &WgpuBackend, x: &T, w: &T, bias: Option<&T>) -> Result<T> {
    let (r, k) = x.dims2("linear input")?;
    let (n, wk) = w.dims2("linear weight")?;
    if wk != k {
        return Err(Error::shape("linear weight", format!("[out, {k}]"), w.shape()));
    }
    let (bb, has_bias) = bias_of(b, bias, &[n], "linear bias")?;
    let out = b.tensor(&[r, n], DType::F32, "linear output")?;
    let (g, y_stride) = grid(n.div_ceil(TILE), r.div_ceil(TILE));
    b.dispatch(
        &MATMUL,
        "linear",
        &[r as u32, n as u32, k as u32, 1, has_bias, 0, y_stride],
        &[
            WgpuBackend::buf(x, "linear input", DType::F32)?,
            WgpuBackend::buf(w, "linear weight", DType::F32)?,
            bb,
            &b.dummy,
            &b.dummy_rw,
            &out.buffer().buf,
        ],
        g,
    )?;
    Ok(out)
}

pub(crate) fn grouped(b: &WgpuBackend, x: &T, offsets: &T, w: &T, bias: Option<&T>) -> Result<T> {
    let (r, k) = x.dims2("grouped input")?;
    let (groups, n, wk) = w.dims3("expert weights")?;
    if wk != k {
        return Err(Error::shape("expert weights", format!("[experts, out, {k}]"), w.shape()));
    }
    if offsets.shape() != [groups + 1] {
        return Err(Error::shape("offsets", format!("[{}]", groups + 1), offsets.shape()));
    }
    let (bb, has_bias) = bias_of(b, bias, &[groups, n], "expert biases")?;
    let out = b.tensor(&[r, n], DType::F32, "grouped output")?;
    // A tile never spans two groups, so each group adds at most one partial tile.
    let max_tiles = r.div_ceil(TILE) + groups;
    let tiles = b.alloc(4 * (1 + 3 * max_tiles) as u64, "tile map")?;
    let (g, y_stride) = grid(n.div_ceil(TILE), max_tiles);
    let params = [r as u32, n as u32, k as u32, groups as u32, has_bias, max_tiles as u32, y_stride];
    let bufs = [
        WgpuBackend::buf(x, "grouped input", DType::F32)?,
        WgpuBackend::buf(w, "expert weights", DType::F32)?,
        bb,
        WgpuBackend::buf(offsets, "offsets", DType::I32)?,
        &tiles.buf,
        &out.buffer().buf,
    ];
    b.dispatch(&MATMUL, "tile_map", &params, &bufs, [1, 1, 1])?;
    b.dispatch(&MATMUL, "grouped", &params, &bufs, g)?;
    Ok(out)
}

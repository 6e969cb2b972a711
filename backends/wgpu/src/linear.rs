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

/// Storage code of a weight tensor for the shader (0 f32, 1 f16, 2 bf16).
fn wdtype(w: &T) -> Result<u32> {
    match w.dtype() {
        DType::F32 => Ok(0),
        DType::F16 => Ok(1),
        DType::BF16 => Ok(2),
        d => Err(Error::Invalid(format!("weights stored as {d}"))),
    }
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
    let xb = WgpuBackend::buf(x, "linear input", DType::F32)?;
    let wd = wdtype(w)?;
    for part in b.weight_parts(w)? {
        let (g, y_stride) = grid((part.c1 - part.c0).div_ceil(TILE), r.div_ceil(TILE));
        let params = [r, n, k, 1, has_bias as usize, 0, y_stride as usize, wd as usize, 0, 1, part.c0, part.c1, 0, 0];
        b.dispatch(
            &MATMUL,
            "linear",
            &params.map(|v| v as u32),
            &[xb, &part.buf, bb, &b.dummy, &b.dummy_rw, &out.buffer().buf, &b.dummy_rw2],
            g,
        )?;
    }
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
    let xb = WgpuBackend::buf(x, "grouped input", DType::F32)?;
    let ob = WgpuBackend::buf(offsets, "offsets", DType::I32)?;
    let wd = wdtype(w)?;
    let parts = b.weight_parts(w)?;
    for (i, part) in parts.iter().enumerate() {
        let (g, y_stride) = grid((part.c1 - part.c0).div_ceil(TILE), max_tiles);
        let params = [
            r,
            n,
            k,
            groups,
            has_bias as usize,
            max_tiles,
            y_stride as usize,
            wd as usize,
            part.g0,
            part.g1,
            part.c0,
            part.c1,
            0,
            0,
        ]
        .map(|v| v as u32);
        let bufs = [xb, &part.buf, bb, ob, &tiles.buf, &out.buffer().buf, &b.dummy_rw];
        if i == 0 {
            b.dispatch(&MATMUL, "tile_map", &params, &bufs, [1, 1, 1])?;
        }
        b.dispatch(&MATMUL, "grouped", &params, &bufs, g)?;
    }
    Ok(out)
}

/// The first product of GLU experts with the activation fused in (`matmul.wgsl`
/// `grouped_glu`): `h [R, F]` and, with `keep_pre`, the pre-activation `[R, 2F]`. `None`
/// when the weights are split by columns (gate and up rows may then sit in different
/// parts), for the caller to compose the unfused ops instead.
pub(crate) fn grouped_glu(
    b: &WgpuBackend,
    x: &T,
    offsets: &T,
    w: &T,
    bias: Option<&T>,
    act: u32,
    keep_pre: bool,
) -> Result<Option<(T, Option<T>)>> {
    let (r, k) = x.dims2("grouped input")?;
    let (groups, n, wk) = w.dims3("expert weights")?;
    if wk != k {
        return Err(Error::shape("expert weights", format!("[experts, out, {k}]"), w.shape()));
    }
    if n % 2 != 0 {
        return Err(Error::shape("GLU expert weights", "[experts, 2·ffn, hidden] (gate rows, then up)", w.shape()));
    }
    if offsets.shape() != [groups + 1] {
        return Err(Error::shape("offsets", format!("[{}]", groups + 1), offsets.shape()));
    }
    let parts = b.weight_parts(w)?;
    if parts.iter().any(|p| p.c0 != 0 || p.c1 != n) {
        return Ok(None);
    }
    let f = n / 2;
    let (bb, has_bias) = bias_of(b, bias, &[groups, n], "expert biases")?;
    let h = b.tensor(&[r, f], DType::F32, "GLU output")?;
    let pre = if keep_pre { Some(b.tensor(&[r, n], DType::F32, "pre-activation")?) } else { None };
    let max_tiles = r.div_ceil(TILE) + groups;
    let tiles = b.alloc(4 * (1 + 3 * max_tiles) as u64, "tile map")?;
    let xb = WgpuBackend::buf(x, "grouped input", DType::F32)?;
    let ob = WgpuBackend::buf(offsets, "offsets", DType::I32)?;
    let wd = wdtype(w)?;
    let pre_buf = pre.as_ref().map_or(&b.dummy_rw, |p| &p.buffer().buf);
    for (i, part) in parts.iter().enumerate() {
        let (g, y_stride) = grid(f.div_ceil(TILE), max_tiles);
        let params = [
            r,
            n,
            k,
            groups,
            has_bias as usize,
            max_tiles,
            y_stride as usize,
            wd as usize,
            part.g0,
            part.g1,
            0,
            n,
            act as usize,
            keep_pre as usize,
        ]
        .map(|v| v as u32);
        let bufs = [xb, &part.buf, bb, ob, &tiles.buf, &h.buffer().buf, pre_buf];
        if i == 0 {
            b.dispatch(&MATMUL, "tile_map", &params, &bufs, [1, 1, 1])?;
        }
        b.dispatch(&MATMUL, "grouped_glu", &params, &bufs, g)?;
    }
    Ok(Some((h, pre)))
}

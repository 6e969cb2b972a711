//! The fused GLU expert product: each tile of the first projection (the gate columns and
//! the matching up columns) goes through the activation while it is still in cache, so
//! the `[R, 2I]` intermediate never makes a round trip through memory unless the caller
//! keeps it for a backward pass.

use crate::elementwise::glu_row;
use crate::matmul::{fill_tile, offsets, tiles, SharedOut, Tile, SERIAL_WORK};
use crate::par::share;
use crate::weights::{weight_data, TileOp};
use crate::{f32s, tf32, CpuBackend, T};
use moe_engine::ops::{GroupedMlpOp, MatDims};
use moe_engine::{Activation, GluClamp, Result};

/// GLU columns per tile: the tile's product covers twice as many weight columns (gate
/// and up), so this matches the plain products' 256-column tiles.
const GLU_BLOCK: usize = 128;

/// `act(x · w_gateᵀ + b_gate) · (x · w_upᵀ + b_up)` over expert groups: `w [G, 2I, K]`
/// holds the gate rows first, then the up rows. Returns `h [R, I]` and, with `keep_pre`,
/// the pre-activation `[R, 2I]` as the unfused first product would have produced it. With
/// a clamp, `h` is the clamped GLU of each tile (the pre-activation stays unclamped).
pub(crate) fn grouped_glu(
    op: &GroupedMlpOp<'_, CpuBackend>,
    a: Activation,
    clamp: Option<GluClamp>,
    threads: usize,
) -> Result<(T, Option<T>)> {
    let MatDims { rows: r, n, k: kk } = op.first;
    let keep_pre = op.keep_pre;
    // A tail of weightless groups (Offsets::with_tail) is left alone: its rows stay zero.
    let g = op.offsets.groups() - op.offsets.tail();
    let off = &offsets(op.offsets, r)?[..=g];
    let b = op.weights.b_in.map(|b| f32s(b, "expert biases")).transpose()?;
    let i = op.inner;
    let w = weight_data(op.weights.w_in, "expert weights", n, kk)?;
    let inputs = w.inputs(&f32s(op.xp, "grouped input")?[..off[g] as usize * kk], kk);
    let xs = inputs.f32();
    let mut h = vec![0f32; r * i];
    let mut pre = if keep_pre { vec![0f32; r * n] } else { Vec::new() };
    let (hp, pp) = (SharedOut(h.as_mut_ptr()), SharedOut(pre.as_mut_ptr()));
    let widths = crate::matmul::col_widths(off, i, GLU_BLOCK, threads);
    let tiles = tiles(off, i, |rows| widths.of(rows));
    let run = |(scratch, widened): &mut (Vec<f32>, Vec<f32>), t: &Tile| {
        let (rows, cols) = (t.r1 - t.r0, t.c1 - t.c0);
        // Where the gate and up tiles go: into `pre` when it is kept, else a scratch
        // tile [rows, 2·cols] that stays in this thread's cache. (`widened`: the half
        // weights the product widens, a block at a time.)
        let (gate, up, rs) = if keep_pre {
            // SAFETY: rows r0..r1 and columns c0..c1 (gate) and i + c0..i + c1 (up) of
            // `pre` [r, 2i] belong to this tile alone.
            unsafe {
                let row = pp.get().add(t.r0 * n);
                (row.add(t.c0), row.add(i + t.c0), n)
            }
        } else {
            scratch.resize(rows * 2 * cols, 0.0);
            let p = scratch.as_mut_ptr();
            // SAFETY: both halves of each scratch row are inside the scratch buffer.
            (p, unsafe { p.add(cols) }, 2 * cols)
        };
        let x = xs[t.r0 * kk..].as_ptr();
        // SAFETY: the gate and up tiles are disjoint, owned by this task and inside their
        // buffers; the operands stay inside `xs` (rows r0..r1) and expert e's weights.
        unsafe {
            // A tile of every GLU column is one product over the whole [gate | up] row
            // (its gate and up halves lie side by side in `pre` and in the scratch): the
            // weights then stream as one contiguous run per input row.
            let whole = [(gate, 0, 2 * cols)];
            let halves = [(gate, t.c0, cols), (up, i + t.c0, cols)];
            let parts: &[(*mut f32, usize, usize)] = if cols == i { &whole } else { &halves };
            for &(dst, c0, cols) in parts {
                let be = b.map(|b| &b[t.e * n + c0..t.e * n + c0 + cols]);
                if let Some(be) = be {
                    fill_tile(dst, rs, rows, be);
                }
                let op = TileOp {
                    dst,
                    dst_rs: rs,
                    x,
                    x_rs: kk,
                    e: t.e,
                    c0,
                    rows,
                    cols,
                    n,
                    kk,
                    accumulate: be.is_some(),
                    xh: inputs.bf16_row(t.r0, kk),
                };
                w.tile_product(op, widened);
            }
            for row in 0..rows {
                let gr = std::slice::from_raw_parts(gate.add(row * rs), cols);
                let ur = std::slice::from_raw_parts(up.add(row * rs), cols);
                let o = std::slice::from_raw_parts_mut(hp.get().add((t.r0 + row) * i + t.c0), cols);
                glu_row(o, gr, ur, a, clamp);
            }
        }
    };
    let work = off[g] as usize * n * kk;
    if threads > 1 && work >= SERIAL_WORK && tiles.len() > 1 {
        share(&tiles, Default::default, run);
    } else {
        let mut scratch = Default::default();
        tiles.iter().for_each(|t| run(&mut scratch, t));
    }
    Ok((tf32(&[r, i], h)?, if keep_pre { Some(tf32(&[r, n], pre)?) } else { None }))
}

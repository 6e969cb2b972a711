//! Matrix products on the cpu through the `gemm` crate: plain and grouped by expert
//! offsets over compact rows (no padding to capacity).

use crate::matvec::MATVEC_ROWS;
use crate::par::share;
use crate::weights::{weight_data, Stored, TileOp};
use crate::{f32s, i32s, tf32, CpuBackend, T};
use gemm::Parallelism;
use moe_engine::ops::{GroupedLinearOp, LinearOp, MatDims, Offsets};
use moe_engine::{Error, Result};

/// Work (multiply-adds) below which one product runs on one thread: splitting smaller
/// products costs more in synchronisation than it saves.
pub(crate) const SERIAL_WORK: usize = 1 << 20;

pub(crate) fn linear(op: &LinearOp<'_, CpuBackend>, threads: usize) -> Result<T> {
    let MatDims { rows: r, n, k: kk } = op.dims;
    let b = op.bias.map(|b| f32s(b, "linear bias")).transpose()?;
    let out = tiled_product(
        f32s(op.x, "linear input")?,
        &[0, r as i32],
        weight_data(op.w, "linear weight", n, kk)?,
        b,
        (r, n, kk),
        threads,
    );
    tf32(&[r, n], out)
}

/// The group offsets' values, which the products index rows by. They were checked when
/// the [`moe_engine::ops::Offsets`] was made; the cpu, which reads them on the host,
/// checks them again (O(G)) because a wrong value would send gemm past the buffer.
pub(crate) fn offsets(o: &Offsets<CpuBackend>, rows: usize) -> Result<&[i32]> {
    let off = i32s(o.tensor(), "offsets")?;
    Offsets::<CpuBackend>::check_values(off, Some(rows))
        .map_err(|e| Error::Internal(format!("group offsets reached the cpu unchecked: {e}")))?;
    Ok(off)
}

/// Fills the rows of a tile (`rows` rows of `cols`, row stride `rs`) with a bias row.
///
/// # Safety
/// The tile must be inside its allocation and owned by the caller.
pub(crate) unsafe fn fill_tile(d: *mut f32, rs: usize, rows: usize, b: &[f32]) {
    for i in 0..rows {
        std::ptr::copy_nonoverlapping(b.as_ptr(), d.add(i * rs), b.len());
    }
}

pub(crate) fn grouped_linear(op: &GroupedLinearOp<'_, CpuBackend>, threads: usize) -> Result<T> {
    let MatDims { rows: r, n, k: kk } = op.dims;
    // The expert groups only: a tail of weightless groups (Offsets::with_tail) stays zero.
    let off = &offsets(op.offsets, r)?[..=op.groups];
    let b = op.bias.map(|b| f32s(b, "expert biases")).transpose()?;
    let out = tiled_product(
        f32s(op.x, "grouped input")?,
        off,
        weight_data(op.w, "expert weights", n, kk)?,
        b,
        (r, n, kk),
        threads,
    );
    tf32(&[r, n], out)
}

/// The grouped product on checked operands: `xs [R, K]`, group offsets `off`, weights
/// `[G, N, K]` as stored, bias `[G, N]`. Output `[R, N]`, zero past the last group.
/// Tiles are spread over the pool's threads, one single-threaded product each.
fn tiled_product(
    xs: &[f32],
    off: &[i32],
    w: Stored<'_>,
    b: Option<&[f32]>,
    (r, n, kk): (usize, usize, usize),
    threads: usize,
) -> Vec<f32> {
    let g = off.len() - 1;
    let mut out = vec![0f32; r * n];
    let dst = SharedOut(out.as_mut_ptr());
    let widths = col_widths(off, n, COL_BLOCK, threads);
    let tiles = tiles(off, n, |rows| widths.of(rows));
    let inputs = w.inputs(&xs[..off[g] as usize * kk], kk);
    let xs = inputs.f32();
    let run = |scratch: &mut Vec<f32>, t: &Tile| {
        let (rows, cols) = (t.r1 - t.r0, t.c1 - t.c0);
        let be = b.map(|b| &b[t.e * n + t.c0..t.e * n + t.c1]);
        // SAFETY: tiles are disjoint and inside `out` ([r, n]); the input rows r0..r1 are
        // inside `xs` and expert e's columns c0..c1 inside its weights.
        unsafe {
            let d = dst.get().add(t.r0 * n + t.c0);
            if let Some(be) = be {
                fill_tile(d, n, rows, be);
            }
            let x = xs[t.r0 * kk..].as_ptr();
            let op = TileOp {
                dst: d,
                dst_rs: n,
                x,
                x_rs: kk,
                e: t.e,
                c0: t.c0,
                rows,
                cols,
                n,
                kk,
                accumulate: be.is_some(),
                xh: inputs.bf16_row(t.r0, kk),
            };
            w.tile_product(op, scratch);
        }
    };
    let work = off[g] as usize * n * kk;
    if threads > 1 && work >= SERIAL_WORK && tiles.len() > 1 {
        share(&tiles, Vec::new, run);
    } else {
        let mut scratch = Vec::new();
        tiles.iter().for_each(|t| run(&mut scratch, t));
    }
    out
}

/// Output columns per tile. Tiles are how the threads share a grouped product: each tile
/// is one single-threaded gemm, with no synchronisation inside it, and expert groups of a
/// few dozen rows give gemm too little to split well by itself. Cutting a product into
/// 256-column tiles costs nothing single-threaded (examples/gemm_shapes.rs: within
/// noise of one product for 48-128 rows), and 256 columns of K = 1024 weights (1 MiB)
/// stay in a core's L2 while the tile's rows pass.
pub(crate) const COL_BLOCK: usize = 256;

/// Output columns per tile, by group size: the groups the matrix-vector kernels take
/// (at most [`MATVEC_ROWS`] rows) get `small`, the others `base`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Widths {
    pub(crate) small: usize,
    pub(crate) base: usize,
}

impl Widths {
    /// The tile width of a group of `rows` rows.
    pub(crate) fn of(self, rows: usize) -> usize {
        if rows <= MATVEC_ROWS {
            self.small
        } else {
            self.base
        }
    }
}

/// Tile widths for groups `off` of an `n`-column output: `base` for gemm's groups, and
/// for matrix-vector groups as wide as gives every thread the same number of them (whole
/// experts where those groups divide evenly over the threads), so that each weight row a
/// tile reads is a long contiguous run (a 128-column tile of a K-major weight reads 512
/// bytes per row, a new prefetch stream every row) and a whole expert is one sequential
/// read.
pub(crate) fn col_widths(off: &[i32], n: usize, base: usize, threads: usize) -> Widths {
    let small = off.windows(2).filter(|w| (1..=MATVEC_ROWS as i32).contains(&(w[1] - w[0]))).count();
    if small == 0 {
        return Widths { small: base, base };
    }
    // Tiles per group so that groups x tiles is a multiple of the threads: the tiles of a
    // matrix-vector product cost about the same (their weights' bytes), so the threads
    // finish together.
    let threads = threads.max(1);
    let per_group = threads / gcd(small, threads);
    Widths { small: n.div_ceil(per_group).div_ceil(16).saturating_mul(16).max(base), base }
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Rows per tile: bounds a tile's share of the input and of any scratch beside it.
pub(crate) const ROW_BLOCK: usize = 256;

/// Output pointer shared by tasks that write disjoint tiles of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub(crate) *mut f32);
// SAFETY: only used to write disjoint tiles from different threads.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The pointer. A method rather than field access so closures capture the whole
    /// `Sync` wrapper, not the bare pointer.
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// One output tile of a grouped product: rows `r0..r1` (all in group `e`) by columns
/// `c0..c1`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tile {
    pub(crate) e: usize,
    pub(crate) r0: usize,
    pub(crate) r1: usize,
    pub(crate) c0: usize,
    pub(crate) c1: usize,
}

/// Cuts every non-empty group into tiles of at most [`ROW_BLOCK`] rows by `width(rows)`
/// columns (`rows`: the group's) of an `n`-column output. Each tile is one single-threaded gemm: the threads
/// share the tiles rather than splitting every small product, which for the small row
/// counts of expert groups costs more in synchronisation and repacking than it saves.
pub(crate) fn tiles(off: &[i32], n: usize, width: impl Fn(usize) -> usize) -> Vec<Tile> {
    let mut v = Vec::new();
    for e in 0..off.len().saturating_sub(1) {
        let (s, end) = (off[e] as usize, off[e + 1] as usize);
        let col_block = width(end.saturating_sub(s)).max(1);
        let mut r0 = s;
        while r0 < end {
            let r1 = (r0 + ROW_BLOCK).min(end);
            let mut c0 = 0;
            while c0 < n {
                let c1 = (c0 + col_block).min(n);
                v.push(Tile { e, r0, r1, c0, c1 });
                c0 = c1;
            }
            r0 = r1;
        }
    }
    v
}

/// Single-threaded `dst [m, n] (+)= lhs [m, k] · rhs [k, n]` on raw strided operands:
/// `dst` and `lhs` are row-major with the given row strides; `rhs` has the given column
/// and row strides.
///
/// # Safety
/// Every element the shapes and strides address must be inside its allocation, and `dst`
/// must not overlap the inputs or another thread's tile.
pub(crate) unsafe fn gemm_raw(
    (dst, dst_rs): (*mut f32, isize),
    (lhs, lhs_rs): (*const f32, isize),
    (rhs, rhs_cs, rhs_rs): (*const f32, isize, isize),
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                std::ptr::write_bytes(dst.offset(i as isize * dst_rs), 0, n);
            }
        }
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs,
        accumulate,
        lhs,
        1,
        lhs_rs,
        rhs,
        rhs_cs,
        rhs_rs,
        1.0,
        1.0,
        false,
        false,
        false,
        Parallelism::None,
    );
}

#[cfg(test)]
mod tests {
    use super::{col_widths, tiles, COL_BLOCK, MATVEC_ROWS};

    #[test]
    fn matrix_vector_groups_get_wide_tiles_that_still_cover_every_column_once() {
        let small = |off: &[i32], n| col_widths(off, n, COL_BLOCK, 2).small;
        // Two experts of one row each (T = 1, k = 2) on two threads: one whole expert each;
        // one expert on two threads: two halves; three on two: halves, three per thread.
        let off = [0, 0, 1, 1, 2];
        assert_eq!(small(&off, 5632), 5632);
        assert_eq!(small(&[0, 0, 1], 5632), 2816);
        assert_eq!(small(&[0, 1, 2, 3], 5632), 2816);
        // Groups past the kernels' rows keep the base width, beside wide small ones.
        let mixed = col_widths(&[0, 5, 40], 5632, COL_BLOCK, 2);
        assert_eq!((mixed.of(5), mixed.of(MATVEC_ROWS + 1)), (2816, COL_BLOCK));
        assert_eq!(small(&[0, 0, 0], 5632), COL_BLOCK);
        // Groups that divide over the threads: one whole-width tile each (rounded up to 16).
        assert_eq!(small(&[0, 1, 2, 3, 4, 5, 6, 7, 8], 1000), 1008);
        // Never narrower than the base.
        assert_eq!(small(&[0, 1], 300), COL_BLOCK);
        for (off, n) in [(&off[..], 5632usize), (&[0, 1][..], 1000), (&[0, 3, 4][..], 777), (&[0, 30, 31][..], 777)] {
            let w = col_widths(off, n, COL_BLOCK, 2);
            let t = tiles(off, n, |rows| w.of(rows));
            for e in 0..off.len() - 1 {
                let mut cols: Vec<(usize, usize)> = t.iter().filter(|t| t.e == e).map(|t| (t.c0, t.c1)).collect();
                cols.sort();
                cols.dedup();
                let rows = (off[e + 1] - off[e]) as usize;
                if rows == 0 {
                    assert!(cols.is_empty());
                    continue;
                }
                assert_eq!(cols.first().map(|c| c.0), Some(0));
                assert_eq!(cols.last().map(|c| c.1), Some(n));
                assert!(cols.windows(2).all(|w| w[0].1 == w[1].0), "{cols:?}");
            }
        }
    }
}

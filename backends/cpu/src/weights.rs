//! A product's weight operand as the cpu stores it (row-major f32, K-major f32, K-major
//! f16/bf16), and the one tile product every forward product goes through: matrix-vector
//! kernels for decode-sized groups ([`crate::matvec`]), gemm above that, with half weights
//! widened a block at a time into the thread's scratch (never the whole stack up front).

use crate::buffer::{CpuBuffer, Half};
use crate::matmul::gemm_raw;
use crate::matvec::{matvec, Operands, MATVEC_ROWS};
use crate::T;
use half::{bf16, f16};
use moe_engine::{Error, Result};

/// The stored data of a weight operand of logical matrices `[n, k]`.
#[derive(Clone, Copy)]
pub(crate) enum Stored<'a> {
    /// Row-major `[G, N, K]` f32: a plain tensor passed as a weight.
    Rows(&'a [f32]),
    /// `[G, K, N]` f32, as `upload_weight` stores it.
    F32T(&'a [f32]),
    /// `[G, K, N]` in a 16-bit format.
    HalfT(&'a [u16], Half),
}

/// The stored data of matrix-product weight `t`, which must hold logical matrices `[n, k]`.
pub(crate) fn weight_data<'a>(t: &'a T, name: &str, n: usize, k: usize) -> Result<Stored<'a>> {
    let reshaped = |(wn, wk): (usize, usize)| {
        Error::Misuse(format!(
            "`{name}` holds [{wn}, {wk}] weight matrices, reshaped to take [{n}, {k}]: reshape weights on the host"
        ))
    };
    match t.buffer() {
        CpuBuffer::F32(v) => Ok(Stored::Rows(v)),
        CpuBuffer::WeightT { data, n: wn, k: wk } if (*wn, *wk) == (n, k) => Ok(Stored::F32T(data)),
        CpuBuffer::WeightHalf { data, half, n: wn, k: wk } if (*wn, *wk) == (n, k) => Ok(Stored::HalfT(data, *half)),
        CpuBuffer::WeightT { n: wn, k: wk, .. } | CpuBuffer::WeightHalf { n: wn, k: wk, .. } => {
            Err(reshaped((*wn, *wk)))
        }
        CpuBuffer::I32(_) => Err(Error::dtype(name, "f32", "i32")),
    }
}

/// Weight rows widened per gemm call when half weights meet more rows than the
/// matrix-vector kernels take: 256 rows of a 256-column tile is 256 KiB of f32 scratch,
/// which stays in L2 while gemm reads it.
const WIDEN_ROWS: usize = 256;

/// One tile of a grouped forward product: `dst [rows, cols] (+)= x [rows, kk] · w[e]ᵀ`
/// restricted to output columns `c0..c0 + cols`, where `w[e]` is logical `[n, kk]`.
#[derive(Clone, Copy)]
pub(crate) struct TileOp {
    pub(crate) dst: *mut f32,
    pub(crate) dst_rs: usize,
    pub(crate) x: *const f32,
    pub(crate) x_rs: usize,
    pub(crate) e: usize,
    pub(crate) c0: usize,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) n: usize,
    pub(crate) kk: usize,
    /// Add to `dst` (a bias already there) rather than overwrite it.
    pub(crate) accumulate: bool,
}

impl Stored<'_> {
    /// Runs one tile product (see [`TileOp`]), with `scratch` the calling thread's buffer.
    ///
    /// # Safety
    /// The tile must be inside `dst`'s allocation and owned by the caller; `x` rows must be
    /// inside their buffer; `e`, `c0 + cols <= n` and `kk` must describe this weight.
    pub(crate) unsafe fn tile_product(self, t: TileOp, scratch: &mut Vec<f32>) {
        let TileOp { dst, dst_rs, x, x_rs, e, c0, rows, cols, n, kk, accumulate } = t;
        if rows == 0 || cols == 0 {
            return;
        }
        let base = e * n * kk + c0;
        match self {
            Stored::F32T(ws) if rows <= MATVEC_ROWS => matvec(t.operands(ws[base..].as_ptr())),
            Stored::HalfT(ws, Half::Bf16) if rows <= MATVEC_ROWS => {
                matvec(t.operands(bytemuck::cast_slice::<u16, bf16>(&ws[base..]).as_ptr()))
            }
            Stored::HalfT(ws, Half::F16) if rows <= MATVEC_ROWS => {
                matvec(t.operands(bytemuck::cast_slice::<u16, f16>(&ws[base..]).as_ptr()))
            }
            Stored::F32T(ws) => gemm_raw(
                (dst, dst_rs as isize),
                (x, x_rs as isize),
                (ws[base..].as_ptr(), 1, n as isize),
                (rows, cols, kk),
                accumulate,
            ),
            Stored::Rows(ws) => gemm_raw(
                (dst, dst_rs as isize),
                (x, x_rs as isize),
                (ws[e * n * kk + c0 * kk..].as_ptr(), kk as isize, 1),
                (rows, cols, kk),
                accumulate,
            ),
            Stored::HalfT(ws, half) => {
                // Widen WIDEN_ROWS weight rows of the tile at a time and let gemm add
                // their share: the conversion is paid once per weight per tile, over
                // every row of the group.
                let mut k0 = 0;
                while k0 < kk {
                    let kb = (kk - k0).min(WIDEN_ROWS);
                    widen_block(ws, half, base + k0 * n, n, (kb, cols), scratch);
                    gemm_raw(
                        (dst, dst_rs as isize),
                        (x.add(k0), x_rs as isize),
                        (scratch.as_ptr(), 1, cols as isize),
                        (rows, cols, kb),
                        accumulate || k0 > 0,
                    );
                    k0 += kb;
                }
            }
        }
    }
}

impl TileOp {
    /// The matrix-vector kernel's operands for this tile, its K-major weights at `w`.
    fn operands<E>(&self, w: *const E) -> Operands<E> {
        let TileOp { dst, dst_rs, x, x_rs, rows, cols, n, kk, accumulate, .. } = *self;
        Operands { dst, dst_rs, x, x_rs, w, w_rs: n, rows, cols, kk, accumulate }
    }
}

/// Widens `rows` stored rows of `cols` halves, starting at element `start` with row
/// stride `rs`, into `scratch` as a dense `[rows, cols]` f32 block.
pub(crate) fn widen_block(
    ws: &[u16],
    half: Half,
    start: usize,
    rs: usize,
    (rows, cols): (usize, usize),
    scratch: &mut Vec<f32>,
) {
    scratch.resize(rows * cols, 0.0);
    for (r, out) in scratch.chunks_exact_mut(cols.max(1)).take(rows).enumerate() {
        let s = start + r * rs;
        half.decode_into(&ws[s..s + cols], out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Half weights give the f32 path's result on the same rounded values, for groups the
    /// matrix-vector kernels take and for larger ones (gemm over weights widened in
    /// blocks, K past one block), with and without a bias already in the tile.
    #[test]
    fn half_tiles_match_f32_tiles_of_the_rounded_values() {
        let (g, n, kk) = (2, 40, WIDEN_ROWS + 44);
        let v: Vec<f32> = (0..g * n * kk).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
        for half in [Half::Bf16, Half::F16] {
            let bits = half.dtype().half_bits(&v).unwrap();
            let mut rounded = vec![0f32; v.len()];
            half.decode_into(&bits, &mut rounded);
            for rows in [1, MATVEC_ROWS, MATVEC_ROWS + 1, 33] {
                let x: Vec<f32> = (0..rows * kk).map(|i| ((i * 31) % 97) as f32 / 97.0 - 0.5).collect();
                for accumulate in [false, true] {
                    let (c0, cols) = (8, 24);
                    let run = |w: Stored<'_>| {
                        let mut dst = vec![0.25f32; rows * n];
                        let op = TileOp {
                            dst: dst[c0..].as_mut_ptr(),
                            dst_rs: n,
                            x: x.as_ptr(),
                            x_rs: kk,
                            e: 1,
                            c0,
                            rows,
                            cols,
                            n,
                            kk,
                            accumulate,
                        };
                        // SAFETY: rows x (c0..c0 + cols) of dst, rows x kk of x and
                        // expert 1's [kk, n] weights are inside their vectors.
                        unsafe { w.tile_product(op, &mut Vec::new()) };
                        dst
                    };
                    let (h, f) = (run(Stored::HalfT(&bits, half)), run(Stored::F32T(&rounded)));
                    for (i, (a, b)) in h.iter().zip(&f).enumerate() {
                        assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{half:?} rows {rows} [{i}]: {a} vs {b}");
                    }
                    // Outside the tile nothing changed.
                    assert!(h.iter().enumerate().all(|(i, &a)| (c0..c0 + cols).contains(&(i % n)) || a == 0.25));
                }
            }
        }
    }
}

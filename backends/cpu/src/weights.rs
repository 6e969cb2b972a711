//! A product's weight operand as the cpu stores it (row-major f32, K-major f32, K-major
//! f16/bf16), and the one tile product every forward product goes through: matrix-vector
//! kernels for decode-sized groups ([`crate::matvec`]); above that gemm, with half weights
//! widened a block at a time into the thread's scratch (never the whole stack up front),
//! or, for bf16 weights on a cpu with AVX-512 BF16, its pair dot products
//! ([`crate::bf16dot`]). bf16 weights take the activations as [`Inputs`] rounds them.

use crate::amx;
use crate::bf16dot;
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
    /// bf16 in the AMX tile layout.
    Tiles(&'a [u16], amx::Layout),
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
        CpuBuffer::WeightTiles { data, n: wn, k: wk } if (*wn, *wk) == (n, k) => {
            Ok(Stored::Tiles(data, amx::Layout { n, k }))
        }
        CpuBuffer::WeightT { n: wn, k: wk, .. }
        | CpuBuffer::WeightHalf { n: wn, k: wk, .. }
        | CpuBuffer::WeightTiles { n: wn, k: wk, .. } => Err(reshaped((*wn, *wk))),
        CpuBuffer::I32(_) => Err(Error::dtype(name, "f32", "i32")),
    }
}

/// A product's activations as its weights' kernels take them. Products with bf16 weights
/// multiply bf16 activations, as PyTorch's bf16 models and tensor cores do
/// ([`moe_engine::device::Capabilities::half_inputs`]): rounded once per product, then
/// either taken in bf16 pairs by AVX-512 BF16 ([`bf16dot`]) or, on cpus without it, held
/// in f32 for the widening kernels, so every cpu multiplies the same values. f32 and f16
/// weights take the f32 activations as they are.
pub(crate) enum Inputs<'a> {
    /// The f32 activations as given.
    F32(&'a [f32]),
    /// Rounded to bf16, held in f32.
    Rounded(Vec<f32>),
    /// Rounded to bf16: held in f32 (for the matrix-vector kernels) and as bf16 bits,
    /// rows padded to [`bf16dot::pair_stride`] (for the pair-dot kernels).
    Bf16 { x: Vec<f32>, bits: Vec<u16> },
    /// Rounded to bf16 as the AMX tile kernels take them over tile-stored weights
    /// ([`amx::step_rows`]): 32 inputs of every row per K step, the steps one after the
    /// other, so that 16 rows from any row are one contiguous activation tile. `x` is the
    /// f32 input as given, which no kernel of these weights reads.
    Steps { x: &'a [f32], bits: Vec<u16>, rows: usize },
}

impl<'a> Inputs<'a> {
    /// The f32 activations the f32-input kernels read.
    pub(crate) fn f32(&self) -> &[f32] {
        match self {
            Inputs::F32(x) | Inputs::Steps { x, .. } => x,
            Inputs::Rounded(x) | Inputs::Bf16 { x, .. } => x,
        }
    }

    /// Row `r` of the bf16 bits and the stride the kernels step by: the row stride for
    /// [`Inputs::Bf16`], the K-step stride for [`Inputs::Steps`].
    pub(crate) fn bf16_row(&self, r: usize, kk: usize) -> Option<(*const u16, usize)> {
        match self {
            Inputs::Bf16 { bits, .. } => {
                let rs = bf16dot::pair_stride(kk);
                Some((bits[r * rs..].as_ptr(), rs))
            }
            Inputs::Steps { bits, rows, .. } => Some((bits[r * 32..].as_ptr(), rows * 32)),
            _ => None,
        }
    }
}

impl Stored<'_> {
    /// The activations `xs` (rows of `kk`) as this weight's products take them.
    pub(crate) fn inputs(self, xs: &[f32], kk: usize) -> Inputs<'_> {
        match self {
            Stored::Tiles(..) if kk > 0 => {
                let rows = xs.len() / kk;
                Inputs::Steps { x: xs, bits: amx::step_rows(xs, rows, kk), rows }
            }
            Stored::HalfT(_, Half::Bf16) if kk > 0 => {
                if bf16dot::available() {
                    let rows = xs.len() / kk;
                    let bits = bf16dot::round_rows(xs, rows, kk);
                    let rs = bf16dot::pair_stride(kk);
                    let mut x = Vec::with_capacity(rows * kk);
                    for row in bits.chunks_exact(rs) {
                        x.extend(row[..kk].iter().map(|&b| bf16::from_bits(b).to_f32()));
                    }
                    Inputs::Bf16 { x, bits }
                } else {
                    Inputs::Rounded(xs.iter().map(|&v| bf16::from_f32(v).to_f32()).collect())
                }
            }
            _ => Inputs::F32(xs),
        }
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
    /// The same rows of `x` rounded to bf16 and their stride ([`Inputs::bf16_row`]),
    /// which bf16 weights take where the cpu has AVX-512 BF16.
    pub(crate) xh: Option<(*const u16, usize)>,
}

impl Stored<'_> {
    /// Runs one tile product (see [`TileOp`]), with `scratch` the calling thread's buffer.
    ///
    /// # Safety
    /// The tile must be inside `dst`'s allocation and owned by the caller; `x` rows must be
    /// inside their buffer; `e`, `c0 + cols <= n` and `kk` must describe this weight.
    pub(crate) unsafe fn tile_product(self, t: TileOp, scratch: &mut Vec<f32>) {
        let TileOp { dst, dst_rs, x, x_rs, e, c0, rows, cols, n, kk, accumulate, xh } = t;
        if rows == 0 || cols == 0 {
            return;
        }
        let base = e * n * kk + c0;
        match self {
            Stored::Tiles(ws, layout) => {
                // Tiles are stored only where the AMX kernels run, which take every row
                // count: the activations are rounded to bf16 (`Stored::inputs`).
                let Some((x, x_rs)) = xh else {
                    // No inputs (K = 0): the product is zero.
                    if !accumulate {
                        (0..rows).for_each(|r| std::ptr::write_bytes(dst.add(r * dst_rs), 0, cols));
                    }
                    return;
                };
                let w = ws[e * layout.matrix()..].as_ptr();
                let op = bf16dot::Operands { dst, dst_rs, x, x_rs, w, w_rs: n, rows, cols, kk, accumulate };
                if rows <= amx::VECTOR_ROWS {
                    amx::vector_tiles(op, c0, layout)
                } else {
                    amx::product_tiles(op, c0, layout)
                }
            }
            Stored::HalfT(ws, Half::Bf16) if xh.is_some() && rows >= bf16dot::min_rows() => {
                let (x, x_rs) = xh.expect("matched Some");
                let w = ws[base..].as_ptr();
                bf16dot::product(
                    bf16dot::Operands { dst, dst_rs, x, x_rs, w, w_rs: n, rows, cols, kk, accumulate },
                    scratch,
                )
            }
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

    /// Half weights give the f32 path's result on the same rounded values (bf16 weights
    /// on bf16-rounded activations, f16 weights on the f32 ones), for groups the
    /// matrix-vector kernels take and for larger ones (gemm over weights widened in
    /// blocks, K past one block; the pair-dot kernels where the cpu has them), with and
    /// without a bias already in the tile.
    #[test]
    fn half_tiles_match_f32_tiles_of_the_rounded_values() {
        let (g, n, kk) = (2, 40, WIDEN_ROWS + 45);
        let v: Vec<f32> = (0..g * n * kk).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
        for half in [Half::Bf16, Half::F16] {
            let bits = half.dtype().half_bits(&v).unwrap();
            let mut rounded = vec![0f32; v.len()];
            half.decode_into(&bits, &mut rounded);
            for rows in [1, 5, MATVEC_ROWS, MATVEC_ROWS + 1, 33] {
                let x: Vec<f32> = (0..rows * kk).map(|i| ((i * 31) % 97) as f32 / 97.0 - 0.5).collect();
                let xr: Vec<f32> = match half {
                    Half::Bf16 => x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
                    Half::F16 => x.clone(),
                };
                for accumulate in [false, true] {
                    let (c0, cols) = (8, 24);
                    let run = |w: Stored<'_>, x: &[f32]| {
                        let inputs = w.inputs(x, kk);
                        let mut dst = vec![0.25f32; rows * n];
                        let op = TileOp {
                            dst: dst[c0..].as_mut_ptr(),
                            dst_rs: n,
                            x: inputs.f32().as_ptr(),
                            x_rs: kk,
                            e: 1,
                            c0,
                            rows,
                            cols,
                            n,
                            kk,
                            accumulate,
                            xh: inputs.bf16_row(0, kk),
                        };
                        // SAFETY: rows x (c0..c0 + cols) of dst, rows x kk of x and
                        // expert 1's [kk, n] weights are inside their vectors.
                        unsafe { w.tile_product(op, &mut Vec::new()) };
                        dst
                    };
                    let f = run(Stored::F32T(&rounded), &xr);
                    let mut stored = vec![("K-major", run(Stored::HalfT(&bits, half), &x))];
                    // bf16 in the AMX tile layout, where the cpu runs those kernels.
                    let layout = amx::Layout { n, k: kk };
                    if half == Half::Bf16 && amx::available() {
                        stored.push(("tiles", run(Stored::Tiles(&layout.tiled(&bits), layout), &x)));
                    }
                    for (name, h) in stored {
                        for (i, (a, b)) in h.iter().zip(&f).enumerate() {
                            assert!(
                                (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                                "{half:?} {name} rows {rows} [{i}]: {a} vs {b}"
                            );
                        }
                        // Outside the tile nothing changed.
                        assert!(h.iter().enumerate().all(|(i, &a)| (c0..c0 + cols).contains(&(i % n)) || a == 0.25));
                    }
                }
            }
        }
    }
}

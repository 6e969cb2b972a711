//! Launch geometry of every kernel, as plain functions of the checked op's parameters:
//! the backend launches with these, and the emulated-kernel tests replay the same grids
//! and kernel choices on the host.

use moe_engine::kernel_abi::bucket::BucketPass;
use moe_engine::kernel_abi::plan::PlanPass;
use moe_engine::kernel_abi::{
    grid_1d, tile_grid, GradMatmulParams, GradParams, MatmulParams, TILE, WG_ELEMENTWISE, WG_PLAN,
};

/// A grid of blocks and the threads per block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    /// Blocks in x, y, z.
    pub grid: [u32; 3],
    /// Threads per block in x, y, z.
    pub block: [u32; 3],
}

impl Launch {
    /// cudarc's launch configuration.
    pub fn config(self) -> cudarc::driver::LaunchConfig {
        cudarc::driver::LaunchConfig {
            grid_dim: (self.grid[0], self.grid[1], self.grid[2]),
            block_dim: (self.block[0], self.block[1], self.block[2]),
            shared_mem_bytes: 0,
        }
    }
}

/// One thread per element of `n` (elementwise, permute, combine, noise, casts): the ABI's
/// folded grid, which kernels/common.cuh `global_id()` unfolds.
pub fn per_element(n: usize) -> Launch {
    Launch { grid: grid_1d(n, WG_ELEMENTWISE), block: [WG_ELEMENTWISE, 1, 1] }
}

/// A plan pass: [`WG_PLAN`] threads per block over its invocations.
pub fn plan_pass(pass: &PlanPass) -> Launch {
    Launch { grid: pass.grid(), block: [WG_PLAN, 1, 1] }
}

/// A bucketing pass: [`WG_PLAN`] threads per block over its invocations.
pub fn bucket_pass(pass: &BucketPass) -> Launch {
    Launch { grid: pass.grid(), block: [WG_PLAN, 1, 1] }
}

/// The route kernel: one warp per token, eight tokens per 256-thread block.
pub fn route(tokens: usize) -> Launch {
    Launch { grid: [tokens.div_ceil(8).max(1) as u32, 1, 1], block: [256, 1, 1] }
}

/// The router reductions: one thread per output (E + 1 of them).
pub fn router_stats(experts: usize) -> Launch {
    Launch { grid: grid_1d(experts + 1, 64), block: [64, 1, 1] }
}

/// `tile_map`: one thread builds the tile list.
pub fn tile_map() -> Launch {
    Launch { grid: [1, 1, 1], block: [1, 1, 1] }
}

/// The grouped-product kernel for weights stored as `wdtype` (0 f32, 1 f16, 2 bf16) on a
/// device with or without tensor cores, and its launch over the tile grid: f16/bf16 on
/// tensor cores run `matmul_tc.cu` (128 threads), everything else the SIMT kernel of
/// `matmul.cu` (256 threads).
pub fn grouped(p: &MatmulParams, tensor_cores: bool) -> (&'static str, &'static str, Launch) {
    let cols = if p.glu == 1 { p.n / 2 } else { p.n } as usize;
    let (grid, _) = tile_grid(cols.div_ceil(TILE), p.max_tiles as usize);
    match (tensor_cores, p.wdtype) {
        (true, 1) => ("matmul_tc.cu", "grouped_tc_f16", Launch { grid, block: [128, 1, 1] }),
        (true, 2) => ("matmul_tc.cu", "grouped_tc_bf16", Launch { grid, block: [128, 1, 1] }),
        _ => ("matmul.cu", "grouped", Launch { grid, block: [256, 1, 1] }),
    }
}

/// Threads per block of the backward's products (kernels/grad_matmul.cu: 16 × 16 threads
/// of 4 × 4 outputs each over a [`TILE`]² tile).
const WG_GRAD_MATMUL: u32 = 256;

/// `linear_dx`: [`TILE`]-column blocks of K in x; in y (folded into z past the grid
/// limit) the groups' [`TILE`]-row tiles, ceil(R / 64) + G of them at most (each group
/// ends at most one partial tile), or ceil(R / 64) for a dense product. The kernel finds
/// its tile from the offsets on the device; spare tiles exit.
pub fn linear_dx(p: &GradMatmulParams) -> Launch {
    let row_tiles = (p.rows as usize).div_ceil(TILE) + if p.grouped == 1 { p.groups as usize } else { 0 };
    let (grid, _) = tile_grid((p.k as usize).div_ceil(TILE), row_tiles);
    Launch { grid, block: [WG_GRAD_MATMUL, 1, 1] }
}

/// `weight_grad`: [`TILE`]-column blocks of K in x; in y (folded into z) every group's
/// [`TILE`]-row tiles of its `[N, K]` matrix, group-major.
pub fn weight_grad(p: &GradMatmulParams) -> Launch {
    let tiles = p.groups as usize * (p.n as usize).div_ceil(TILE);
    let (grid, _) = tile_grid((p.k as usize).div_ceil(TILE), tiles);
    Launch { grid, block: [WG_GRAD_MATMUL, 1, 1] }
}

/// `bias_grad`: one thread per element of db `[G, N]`.
pub fn bias_grad(p: &GradMatmulParams) -> Launch {
    per_element(p.groups as usize * p.n as usize)
}

/// `act_grad`: one thread per element of the pre-activation gradient (2·I columns for GLU).
pub fn act_grad(p: &GradParams) -> Launch {
    per_element(p.rows as usize * p.cols as usize * (1 + p.glu as usize))
}

/// `combine_grad_rows`: one thread per (route of a combined token, column).
pub fn combine_grad_rows(p: &GradParams) -> Launch {
    per_element((p.t1 - p.t0) as usize * p.k as usize * p.cols as usize)
}

/// `combine_grad_weights`: one thread per route of every token (the whole `[S, k]`).
pub fn combine_grad_weights(p: &GradParams) -> Launch {
    per_element(p.rows as usize * p.k as usize)
}

/// Threads per block of the row reductions (kernels/grad.cu `ROW_WG`).
pub const WG_GRAD_ROWS: u32 = 256;

/// `mix_grad`, `gated_add_grad`: one block per row, folded into y past the grid limit.
pub fn grad_rows(rows: usize) -> Launch {
    Launch { grid: grid_1d(rows, 1), block: [WG_GRAD_ROWS, 1, 1] }
}

/// `route_grad`: one warp per token, as the forward's route kernel.
pub fn route_grad(tokens: usize) -> Launch {
    route(tokens)
}

/// `optim_step`: one thread per element.
pub fn optim_step(n: usize) -> Launch {
    per_element(n)
}

/// Partial sums between the two `sum_squares` passes (kernels/optim.cu `SS_PARTIALS`):
/// the size of the scratch buffer and the most blocks the first pass runs.
pub const SUM_SQUARES_PARTIALS: usize = 1024;
/// Threads per block of both `sum_squares` passes (kernels/optim.cu `SS_WG`).
const WG_SUM_SQUARES: u32 = 256;
/// Elements per thread before `sum_squares_partial` adds another block.
const SUM_SQUARES_PER_THREAD: usize = 16;

/// `sum_squares_partial` over `n` elements: enough blocks for 16 elements a thread, at
/// most [`SUM_SQUARES_PARTIALS`]. A function of `n` only (not of the device), so the sum's
/// order, hence its rounding, is the same on every GPU.
pub fn sum_squares_partial(n: usize) -> Launch {
    let blocks = n.div_ceil(WG_SUM_SQUARES as usize * SUM_SQUARES_PER_THREAD).clamp(1, SUM_SQUARES_PARTIALS);
    Launch { grid: [blocks as u32, 1, 1], block: [WG_SUM_SQUARES, 1, 1] }
}

/// `sum_squares_final`: one block adds up the partials.
pub fn sum_squares_final() -> Launch {
    Launch { grid: [1, 1, 1], block: [WG_SUM_SQUARES, 1, 1] }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grad_matmul(rows: u32, n: u32, k: u32, groups: u32, grouped: u32) -> GradMatmulParams {
        GradMatmulParams { rows, n, k, groups, grouped, ..Default::default() }
    }

    #[test]
    fn backward_product_grids_cover_every_tile() {
        // 130 rows over 3 groups: at most ceil(130 / 64) + 3 = 6 row tiles; 70 columns of K
        // in 2 blocks.
        assert_eq!(linear_dx(&grad_matmul(130, 9, 70, 3, 1)).grid, [2, 6, 1]);
        // Dense: the rows' tiles only.
        assert_eq!(linear_dx(&grad_matmul(130, 9, 70, 1, 0)).grid, [2, 3, 1]);
        // dw: every group's ceil(N / 64) row tiles, folded into z past the grid limit.
        assert_eq!(weight_grad(&grad_matmul(10, 65, 64, 3, 1)).grid, [1, 6, 1]);
        assert_eq!(weight_grad(&grad_matmul(10, 64 * 40_000, 1, 2, 1)).grid, [1, 65535, 2]);
        // Nothing to do still launches one (spare) block.
        assert_eq!(linear_dx(&grad_matmul(0, 0, 0, 1, 0)).grid, [1, 1, 1]);
    }

    #[test]
    fn row_reductions_fold_rows_past_the_grid_limit() {
        assert_eq!(grad_rows(13).grid, [13, 1, 1]);
        assert_eq!(grad_rows(70_000).grid, [65535, 2, 1]);
        assert_eq!(grad_rows(0).grid, [1, 1, 1]);
    }

    #[test]
    fn sum_squares_runs_at_most_the_partials_it_has_room_for() {
        assert_eq!(sum_squares_partial(0).grid, [1, 1, 1]);
        assert_eq!(sum_squares_partial(4096).grid, [1, 1, 1]);
        assert_eq!(sum_squares_partial(4097).grid, [2, 1, 1]);
        assert_eq!(sum_squares_partial(usize::MAX / 2).grid, [SUM_SQUARES_PARTIALS as u32, 1, 1]);
        assert_eq!(sum_squares_final().grid, [1, 1, 1]);
    }
}

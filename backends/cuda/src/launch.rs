//! Launch geometry of every kernel, as plain functions of the checked op's parameters:
//! the backend launches with these, and the emulated-kernel tests replay the same grids
//! and kernel choices on the host.

use moe_engine::kernel_abi::bucket::BucketPass;
use moe_engine::kernel_abi::plan::PlanPass;
use moe_engine::kernel_abi::{grid_1d, tile_grid, MatmulParams, TILE, WG_ELEMENTWISE, WG_PLAN};

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

//! The kernel ABI shared by the GPU backends: the parameter block of every kernel family
//! as a named `#[repr(C)]` struct (the WGSL uniform of `shaders/<family>.wgsl` and the
//! by-value argument of `kernels/<family>.cu` declare the same fields in the same order),
//! the launch geometry both backends use, the kernels' size limits, and the multi-pass
//! plan schedule ([`plan`]).
//!
//! The op front doors (`crate::ops`) fill these structs once from checked operands; a
//! backend only binds buffers and launches. `tests/kernel_abi.rs` reads the shader and
//! kernel sources and checks that every struct there lists [`Abi::FIELDS`] in order.
//!
//! Conventions: every field is 4 bytes except element counts that may pass 2³² on CUDA
//! (`n: u64`, the first field, declared `vec2<u32>` in WGSL, whose buffers are smaller
//! than 4 GiB so the high word is 0); structs are padded with `_pad*` fields to a
//! multiple of 16 bytes, as WGSL uniform blocks require.

pub mod bucket;
pub mod plan;

use bytemuck::{Pod, Zeroable};

/// A kernel parameter block: plain old data with its field names, for the layout test.
pub trait Abi: Pod {
    /// The struct's name in the shaders and kernels.
    const NAME: &'static str;
    /// Field names in declaration order, padding included.
    const FIELDS: &'static [&'static str];
}

macro_rules! abi_struct {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $field:ident : $ty:ty),* $(,)? }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Pod, Zeroable)]
        pub struct $name {
            $($(#[$fm])* pub $field: $ty),*
        }
        impl Abi for $name {
            const NAME: &'static str = stringify!($name);
            const FIELDS: &'static [&'static str] = &[$(stringify!($field)),*];
        }
    };
}

abi_struct! {
    /// `route` (shaders/route.wgsl, kernels/route.cu): scores, choice and weights.
    RouteParams {
        /// Tokens S.
        s: u32,
        /// Experts E.
        e: u32,
        /// Routes per token.
        k: u32,
        /// 0 softmax, 1 sigmoid, 2 sqrt(softplus).
        score_fn: u32,
        /// 0 top-k, 1 DeepSpeed top-2, 2 group-limited, 3 sparsemixer.
        choice: u32,
        /// 1 when a correction bias is bound.
        has_bias: u32,
        /// 1 when choice noise is bound.
        has_noise: u32,
        /// 0 none, 1 sum, 2 sum + eps, 3 max(sum, eps), 4 p-norm.
        normalize: u32,
        /// The eps of `normalize = 2`, the floor of `normalize = 3`.
        eps: f32,
        /// Route scale.
        scale: f32,
        /// Expert groups (group-limited).
        n_group: u32,
        /// Groups kept per token.
        topk_group: u32,
        /// 0 max (masked groups read 0), 1 sum of the top 2 (masked read −inf).
        group_score: u32,
        /// The p of `normalize = 4`.
        p_norm: f32,
        /// Sparsemixer's jitter eps (`choice = 3`).
        jitter_eps: f32,
        /// Padding.
        _pad0: u32,
    }
}

abi_struct! {
    /// Every pass of the dispatch plan (shaders/plan.wgsl, kernels/plan.cu).
    PlanParams {
        /// Tokens S.
        s: u32,
        /// Routes per token.
        k: u32,
        /// Experts E.
        e: u32,
        /// Tokens per capacity group.
        group: u32,
        /// Capacity groups, S / group.
        n_groups: u32,
        /// 0 unlimited, 1 static (`cap_value`), 2 dropless (largest count).
        cap_rule: u32,
        /// Static capacity for the kernels (at most S·k: more keeps every route anyway).
        cap_value: u32,
        /// Dropless: clamp the capacity to S.
        clamp: u32,
        /// 0 token order, 1 rank-major, 2 priority.
        keep: u32,
        /// 1 when a `used_token` mask is bound.
        has_used: u32,
        /// 1: renormalise the kept weights of each token.
        renorm: u32,
        /// Padding.
        _pad0: u32,
    }
}

abi_struct! {
    /// Matrix products (shaders/matmul.wgsl, kernels/matmul.cu, kernels/matmul_tc.cu):
    /// `out [rows, n] = x [rows, k] · w[g] [n, k]ᵀ (+ bias[g])`, grouped by offsets.
    MatmulParams {
        /// Rows R of x and of the output.
        rows: u32,
        /// Output columns N of the product (2·F for GLU experts).
        n: u32,
        /// Inner size K.
        k: u32,
        /// Weight groups G (1 for a dense product).
        groups: u32,
        /// 1 when a bias is bound.
        has_bias: u32,
        /// Tiles the grid is sized for: ceil(R / 64) + G (row blocks for a dense product).
        max_tiles: u32,
        /// Workgroups per grid row in y (tiles fold into z past 65535).
        y_stride: u32,
        /// Weight storage: 0 f32, 1 f16, 2 bf16.
        wdtype: u32,
        /// This weight part (wgpu splits large stacks): experts [g0, g1) ...
        g0: u32,
        /// ... end expert ...
        g1: u32,
        /// ... output columns [c0, c1).
        c0: u32,
        /// End column.
        c1: u32,
        /// 1: GLU experts (w rows [gate F | up F]), writing act(gate) · up [R, F].
        glu: u32,
        /// Activation code of the GLU epilogue.
        act: u32,
        /// 1: also write the pre-activation [R, 2F].
        keep_pre: u32,
        /// 1: a clamped GLU epilogue (`crate::GluClamp`): act_α(min(gate, limit)) ·
        /// (clamp(up, −limit, limit) + up_offset).
        clamp: u32,
        /// The clamp's limit.
        limit: f32,
        /// The clamp's silu scale α.
        alpha: f32,
        /// The clamp's offset added to up.
        up_offset: f32,
        /// Padding.
        _pad0: u32,
    }
}

abi_struct! {
    /// Elementwise ops (shaders/elementwise.wgsl, kernels/elementwise.cu), one
    /// invocation per output element.
    ElementwiseParams {
        /// Output elements.
        n: u64,
        /// Row length of the output.
        cols: u32,
        /// Activation code.
        act: u32,
        /// add_gated: 1 when a gate column is bound.
        gated: u32,
        /// scale: the factor.
        alpha: f32,
        /// glu: 1 for a clamped GLU (`crate::GluClamp`).
        clamp: u32,
        /// Clamped glu: the limit.
        limit: f32,
        /// Clamped glu: the silu scale α.
        glu_alpha: f32,
        /// Clamped glu: the offset added to up.
        up_offset: f32,
        /// Padding.
        _pad0: u32,
        /// Padding.
        _pad1: u32,
    }
}

abi_struct! {
    /// Permute, permute_scaled, combine and pass_rows (shaders/permute.wgsl,
    /// kernels/permute.cu).
    PermuteParams {
        /// Invocations: routes × M (permute, permute_scaled), combined tokens × M
        /// (combine), rows × M (pass_rows).
        n: u64,
        /// Row length M.
        cols: u32,
        /// Routes per token.
        k: u32,
        /// combine: the first token of the range combined (output row 0).
        t0: u32,
        /// pass_rows: the first group whose rows are passed through.
        from_group: u32,
        /// pass_rows: groups G of the offsets (rows up to offsets[G] are passed).
        groups: u32,
        /// Padding.
        _pad0: u32,
    }
}

abi_struct! {
    /// The expert-parallel bucketing passes (shaders/bucket.wgsl, kernels/bucket.cu):
    /// the send row and destination slot of every kept route of this rank's tokens.
    BucketParams {
        /// Tokens S.
        s: u32,
        /// Routes per token.
        k: u32,
        /// Logical experts E.
        e: u32,
        /// Physical expert slots P over all ranks (slot p on rank p / slots_per_rank).
        slots: u32,
        /// First token this rank sends.
        t0: u32,
        /// End of the tokens this rank sends.
        t1: u32,
        /// The placement's fingerprint, written after the counts (see `ops::Bucket`).
        fingerprint: u32,
        /// Padding.
        _pad1: u32,
    }
}

abi_struct! {
    /// Block regrouping of rows (shaders/regroup.wgsl, kernels/regroup.cu):
    /// output rows `out_start[j]..out_start[j + 1]` are input rows from `in_start[j]`.
    RegroupParams {
        /// Output elements (rows × M).
        n: u64,
        /// Row length M.
        cols: u32,
        /// Blocks of the table.
        blocks: u32,
    }
}

abi_struct! {
    /// Philox noise (shaders/philox.wgsl, kernels/philox.cu).
    NoiseParams {
        /// Values to draw.
        n: u64,
        /// Low word of the seed.
        seed_lo: u32,
        /// High word of the seed.
        seed_hi: u32,
        /// Stream number.
        stream: u32,
        /// 0 uniform, 1 jitter, 2 Gumbel.
        kind: u32,
        /// Jitter half-width.
        eps: f32,
        /// Padding.
        _pad0: u32,
    }
}

abi_struct! {
    /// Router reductions (shaders/stats.wgsl, kernels/stats.cu).
    StatsParams {
        /// Tokens S.
        s: u32,
        /// Experts E.
        e: u32,
        /// Padding.
        _pad0: u32,
        /// Padding.
        _pad1: u32,
    }
}

abi_struct! {
    /// The casts: in front of cuBLAS (kernels/matmul_tc.cu `to_half`, `fill_rows`), and
    /// `cast_weight`'s rounding to f16/bf16 storage (shaders/cast.wgsl, kernels/matmul_tc.cu
    /// `cast_weight`).
    CastParams {
        /// Elements.
        n: u64,
        /// Row length (`fill_rows`).
        cols: u32,
        /// `to_half`, `cast_weight`: 1 for bf16, 0 for f16.
        bf16: u32,
    }
}

abi_struct! {
    /// The backward's products (shaders/grad_matmul.wgsl, kernels/grad_matmul.cu):
    /// `linear_dx` (`dx [rows, k] = dy [rows, n] · w[g] [n, k]`) and `weight_grad`
    /// (`dw[g] [n, k] = Σ_{r ∈ g} dy[r]ᵀ x[r]`, `db[g] = Σ_{r ∈ g} dy[r]`).
    GradMatmulParams {
        /// Rows R of dy (and x, dx).
        rows: u32,
        /// Columns N of dy.
        n: u32,
        /// Columns K of x and dx.
        k: u32,
        /// Weight groups G (1 when dense).
        groups: u32,
        /// 1 when group offsets are bound (grouped), 0 for one dense product.
        grouped: u32,
        /// Storage code of the forward's weight (linear_dx): 0 f32, 1 f16, 2 bf16.
        wdtype: u32,
        /// weight_grad: 1 when the bias gradient is written.
        bias: u32,
        /// linear_dx over a weight split into parts (wgpu): 1 to add this part's sum to
        /// the output the earlier parts wrote.
        accumulate: u32,
        /// linear_dx, this weight part: groups [g0, g1) ...
        g0: u32,
        /// ... end of the part's groups ...
        g1: u32,
        /// ... and rows [c0, c1) of each matrix (the product's inner range).
        c0: u32,
        /// End of the part's rows.
        c1: u32,
        /// Padding.
        _pad0: u32,
        /// Padding.
        _pad1: u32,
        /// Padding.
        _pad2: u32,
        /// Padding.
        _pad3: u32,
    }
}

abi_struct! {
    /// The backward's row ops (shaders/grad.wgsl, kernels/grad.cu): `act_grad` (with a
    /// GLU's clamp),
    /// `combine_grad_rows`, `combine_grad_weights`, `mix_grad`, `gated_add_grad`.
    GradParams {
        /// Rows: of the pre-activation (act_grad), tokens S (combine_grad), R (mix, add).
        rows: u32,
        /// Row length: I (act_grad), M (the others).
        cols: u32,
        /// Routes per token (combine_grad).
        k: u32,
        /// First token of the combined range.
        t0: u32,
        /// End of the combined range.
        t1: u32,
        /// Activation code (act_grad).
        act: u32,
        /// act_grad: 1 for GLU.
        glu: u32,
        /// Rows of the grouped layout (combine_grad).
        bound: u32,
        /// act_grad of a GLU: 1 for a clamped one (`crate::GluClamp`).
        clamp: u32,
        /// Clamped GLU: the limit.
        limit: f32,
        /// Clamped GLU: the silu scale α.
        alpha: f32,
        /// Clamped GLU: the offset added to up.
        up_offset: f32,
    }
}

abi_struct! {
    /// The router's backward (shaders/route_grad.wgsl, kernels/route_grad.cu), one
    /// invocation per token.
    RouteGradParams {
        /// Tokens S.
        s: u32,
        /// Experts E.
        e: u32,
        /// Routes per token.
        k: u32,
        /// 0 softmax, 1 sigmoid, 2 sqrt(softplus).
        score_fn: u32,
        /// Route normalisation: 0 none, 1 sum, 2 sum + eps, 3 max(sum, eps), 4 p-norm.
        normalize: u32,
        /// 1 when the plan renormalised the kept weights by max(Σ, f32 eps).
        renorm_kept: u32,
        /// 1 when a router loss's counts are bound.
        has_aux: u32,
        /// The forward's choice code (`RouteParams::choice`); 3 (sparsemixer) makes the
        /// weights masked softmaxes of the logits.
        choice: u32,
        /// The eps of `normalize` = 2, the floor of `normalize` = 3.
        eps: f32,
        /// Route scale.
        scale: f32,
        /// d scores[s, e] += aux_scale · counts[e].
        aux_scale: f32,
        /// Switch z-loss coefficient.
        z_coef: f32,
        /// The p of `normalize` = 4.
        p_norm: f32,
        /// Sparsemixer's jitter eps (`choice` = 3).
        jitter_eps: f32,
        /// Padding.
        _pad0: u32,
        /// Padding.
        _pad1: u32,
    }
}

abi_struct! {
    /// Optimizer steps and the sum of squares (shaders/optim.wgsl, kernels/optim.cu),
    /// one invocation per element. The scalars are [`crate::ops::StepRule::scalars`].
    OptimParams {
        /// Elements.
        n: u32,
        /// 0 SGD, 1 Adam, 2 AdamW.
        kind: u32,
        /// 1 when a first moment / momentum buffer is read (0: SGD's first step).
        has_m: u32,
        /// SGD Nesterov.
        nesterov: u32,
        /// Learning rate.
        lr: f32,
        /// Weight decay.
        wd: f32,
        /// SGD momentum.
        mu: f32,
        /// SGD 1 − dampening.
        one_minus_damp: f32,
        /// Adam's lerp weight 1 − β₁.
        w1: f32,
        /// β₂.
        beta2: f32,
        /// 1 − β₂.
        one_minus_b2: f32,
        /// ε.
        eps: f32,
        /// lr / (1 − β₁ᵗ).
        step_size: f32,
        /// √(1 − β₂ᵗ).
        bc2_sqrt: f32,
        /// AdamW's 1 − lr·wd.
        decay: f32,
        /// Gradient multiplier.
        grad_scale: f32,
    }
}

/// Experts the route kernels' bit sets hold.
pub const ROUTE_MAX_EXPERTS: usize = 1024;
/// Expert groups the route kernels' group table holds.
pub const ROUTE_MAX_GROUPS: usize = 64;
/// Routes per token the route kernels hold (one bit set word per 32 experts; k ≤ E).
pub const ROUTE_MAX_K: usize = ROUTE_MAX_EXPERTS;

/// Words of the route kernels' status buffer: for the logits, the correction bias and the
/// choice noise, `u32::MAX − i` with `i` the flat index of the first non-finite value (0
/// where none), and a spare word. `crate::ops::route_status` reads them.
pub const ROUTE_STATUS_WORDS: usize = 4;

/// Rows and columns of one matrix-product output tile (BM = BN in the kernels).
pub const TILE: usize = 64;
/// Threads per workgroup of the elementwise, permute and noise kernels.
pub const WG_ELEMENTWISE: u32 = 256;
/// Threads per workgroup of the plan passes.
pub const WG_PLAN: u32 = 64;
/// Largest workgroup count in one grid dimension that every API takes.
pub const MAX_GRID_DIM: usize = 65535;

/// Grid for `n` invocations of `wg` each: 1-D while it fits [`MAX_GRID_DIM`], then 2-D
/// (kernels compute the index as `x + y · grid_x · wg`). At least one workgroup.
pub fn grid_1d(n: usize, wg: u32) -> [u32; 3] {
    let groups = n.div_ceil(wg as usize).max(1);
    if groups <= MAX_GRID_DIM {
        [groups as u32, 1, 1]
    } else {
        [MAX_GRID_DIM as u32, groups.div_ceil(MAX_GRID_DIM) as u32, 1]
    }
}

/// Grid of matrix-product tiles: `col_blocks` in x, `tiles` folded into y and z past
/// [`MAX_GRID_DIM`]; returns the grid and the y stride kernels unfold the tile index with
/// (`tile = y + z · y_stride`).
pub fn tile_grid(col_blocks: usize, tiles: usize) -> ([u32; 3], u32) {
    let y = tiles.clamp(1, MAX_GRID_DIM);
    ([col_blocks.max(1) as u32, y as u32, tiles.div_ceil(y).max(1) as u32], y as u32)
}

/// Words of the tile list a grouped product builds (`tile_map`): a count, then
/// (group, first row, end row) per tile.
pub fn tile_list_words(max_tiles: usize) -> usize {
    1 + 3 * max_tiles
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_blocks_are_whole_uniform_rows() {
        fn check<T: Abi>() {
            assert_eq!(std::mem::size_of::<T>() % 16, 0, "{} is {} bytes", T::NAME, std::mem::size_of::<T>());
        }
        check::<RouteParams>();
        check::<PlanParams>();
        check::<MatmulParams>();
        check::<ElementwiseParams>();
        check::<PermuteParams>();
        check::<BucketParams>();
        check::<RegroupParams>();
        check::<NoiseParams>();
        check::<StatsParams>();
        check::<CastParams>();
        check::<GradMatmulParams>();
        check::<GradParams>();
        check::<RouteGradParams>();
        check::<OptimParams>();
        assert_eq!(RouteParams::FIELDS.len() * 4, std::mem::size_of::<RouteParams>());
        assert_eq!(RouteGradParams::FIELDS.len() * 4, std::mem::size_of::<RouteGradParams>());
    }

    #[test]
    fn grids_fold_past_the_dimension_limit() {
        assert_eq!(grid_1d(0, 64), [1, 1, 1]);
        assert_eq!(grid_1d(65535 * 64, 64), [65535, 1, 1]);
        assert_eq!(grid_1d(65536 * 64, 64), [65535, 2, 1]);
        assert_eq!(tile_grid(3, 70_000), ([3, 65535, 2], 65535));
        assert_eq!(tile_grid(0, 0), ([1, 1, 1], 1));
    }
}

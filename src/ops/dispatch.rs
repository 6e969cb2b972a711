//! Row movement between token order and a grouped layout: `permute` gathers the token
//! row of every route into the row its [`RouteRows`] name, `combine` sums weighted rows
//! back to token order. The plan's compact expert-major layout is one such layout (the
//! local dispatcher); the expert-parallel send buffer, ordered by destination rank, is
//! another (`crate::ops::BucketOp`).

use super::{f32_matrix, f32_shaped, fits_i32, i32_shaped, output, to_u32, Offsets, Plan};
use crate::device::{Device, Tensor};
use crate::error::{Error, Result};
use crate::kernel_abi::PermuteParams;
use crate::tensor::{mul_size, DType};
use std::ops::Range;

/// The row of every route `[S, k]` i32 in a grouped layout of `bound` rows: −1 (the route
/// is not moved: dropped, or not this rank's) or a row in `0..bound`, each row named by
/// at most one route. Made only by the ops that compute such rows (the plan, the
/// expert-parallel bucketing), so the permute and combine kernels that trust them stay
/// inside their buffers and write each row once.
pub struct RouteRows<B: Device> {
    tensor: Tensor<B>,
    bound: usize,
}

impl<B: Device> Clone for RouteRows<B> {
    fn clone(&self) -> Self {
        RouteRows { tensor: self.tensor.clone(), bound: self.bound }
    }
}

impl<B: Device> RouteRows<B> {
    /// Rows an op computed: `tensor` `[S, k]` i32, every value −1 or below `bound`, no
    /// value twice.
    pub(crate) fn from_op(tensor: Tensor<B>, bound: usize) -> Self {
        RouteRows { tensor, bound }
    }

    /// The same rows over a layout of `bound` rows. Only for a bound the caller knows
    /// every row is below (the row count the op that made them reported).
    pub(crate) fn with_bound(&self, bound: usize) -> Self {
        RouteRows { tensor: self.tensor.clone(), bound }
    }

    /// The device tensor `[S, k]`.
    pub fn tensor(&self) -> &Tensor<B> {
        &self.tensor
    }

    /// Rows of the layout the values index.
    pub fn bound(&self) -> usize {
        self.bound
    }

    /// Tokens S.
    pub fn tokens(&self) -> usize {
        self.tensor.shape()[0]
    }

    /// Routes per token k.
    pub fn k(&self) -> usize {
        self.tensor.shape()[1]
    }
}

/// `[S, k]` ones: the combine weights of the permute's backward (each token sums its
/// routes' rows), for the local and the expert-parallel dispatcher alike.
pub(crate) fn unit_weights<B: Device>(b: &B, s: usize, k: usize) -> Result<Tensor<B>> {
    b.upload(&crate::tensor::HostTensor::f32(&[s, k], vec![1.0; mul_size("routes", s, k)?])?)
}

impl<B: Device> Plan<B> {
    /// The compact expert-major row of every route (`rows`), as the permute and combine
    /// ops take them.
    pub fn route_rows(&self) -> RouteRows<B> {
        RouteRows::from_op(self.rows.clone(), self.tokens() * self.k())
    }
}

/// Gather token rows into a grouped layout: row `rows[s, j]` of the output
/// `[rows.bound, M]` is `x[s]`; rows no route names are zero. Checked.
#[non_exhaustive]
pub struct PermuteOp<'a, B: Device> {
    /// Token rows `[S, M]`, f32.
    pub x: &'a Tensor<B>,
    /// The row of every route.
    pub rows: &'a RouteRows<B>,
    /// Output shape `[rows.bound, M]`.
    pub out_shape: [usize; 2],
    /// Kernel parameters (`n` = S·k·M: one invocation per route and column).
    pub params: PermuteParams,
}

impl<'a, B: Device> PermuteOp<'a, B> {
    /// Checks `x` against the rows: one token row per row of `rows`.
    pub fn check(b: &B, x: &'a Tensor<B>, rows: &'a RouteRows<B>) -> Result<Self> {
        let (s, m) = f32_matrix("x", x)?;
        if s != rows.tokens() {
            return Err(Error::shape("x", format!("[{}, hidden] (the routes' tokens)", rows.tokens()), x.shape()));
        }
        let k = rows.k();
        output(b, "permuted rows", &[rows.bound, m], DType::F32)?;
        let n = mul_size("routes × hidden", mul_size("routes", s, k)?, m)?;
        let params =
            PermuteParams { n: n as u64, cols: to_u32("hidden size", m)?, k: to_u32("k", k)?, ..Default::default() };
        Ok(PermuteOp { x, rows, out_shape: [rows.bound, m], params })
    }
}

/// [`PermuteOp`] with every route's row scaled by its weight (Llama 4 multiplies the
/// expert input, not the output, by the route weight): row `rows[t, j]` of the output
/// `[rows.bound, M]` is `weights[t, j] · x[t]`; rows no route names are zero. Checked.
///
/// Its backward needs no kernel of its own: `dx = combine(dxp, rows, weights, 0..S)` and
/// `d_weights[t, j] = x[t] · dxp[rows[t, j]]`, which `combine_grad(x, dxp, rows, weights,
/// 0..S).d_weights` computes (its `dy` is `x`, its `yp` is `dxp`).
#[non_exhaustive]
pub struct PermuteScaledOp<'a, B: Device> {
    /// Token rows `[S, M]`, f32.
    pub x: &'a Tensor<B>,
    /// The row of every route.
    pub rows: &'a RouteRows<B>,
    /// The weight of every route `[S, k]`, f32.
    pub weights: &'a Tensor<B>,
    /// Output shape `[rows.bound, M]`.
    pub out_shape: [usize; 2],
    /// Kernel parameters (as [`PermuteOp`]'s: one invocation per route and column).
    pub params: PermuteParams,
}

impl<'a, B: Device> PermuteScaledOp<'a, B> {
    /// Checks `x` as [`PermuteOp`] does, and the weights `[S, k]`.
    pub fn check(b: &B, x: &'a Tensor<B>, rows: &'a RouteRows<B>, weights: &'a Tensor<B>) -> Result<Self> {
        let plain = PermuteOp::check(b, x, rows)?;
        f32_shaped("route weights", weights, &[rows.tokens(), rows.k()])?;
        Ok(PermuteScaledOp { x, rows, weights, out_shape: plain.out_shape, params: plain.params })
    }
}

/// Rows `[offsets[from_group], offsets[G])` of `y [R, M]` replaced by those of `x [R, M]`:
/// the rows of LongCat-Flash's zero-compute experts, grouped last ([`Offsets::with_tail`]),
/// return their input. Checked.
///
/// Its backward is itself: for the gradient `d` of the output, `d_x = pass_rows(0, d,
/// offsets, from_group)` (`d`'s rows in the range, zero elsewhere) and `d_y =
/// pass_rows(d, 0, offsets, from_group)` (`d` with zeros in the range).
#[non_exhaustive]
pub struct PassRowsOp<'a, B: Device> {
    /// The rows kept outside the range `[R, M]`, f32.
    pub y: &'a Tensor<B>,
    /// The rows passed through in the range `[R, M]`, f32.
    pub x: &'a Tensor<B>,
    /// The group offsets `[G + 1]` whose groups `from_group..G` are the range.
    pub offsets: &'a Offsets<B>,
    /// The first group of the range.
    pub from_group: usize,
    /// Output shape `[R, M]`.
    pub out_shape: [usize; 2],
    /// Kernel parameters (`n` = R·M, `cols` M, `from_group`, `groups` G).
    pub params: PermuteParams,
}

impl<'a, B: Device> PassRowsOp<'a, B> {
    /// Checks `y` and `x` (the same `[R, M]`), the offsets (within the R rows) and
    /// `from_group` (at most G).
    pub fn check(
        b: &B,
        y: &'a Tensor<B>,
        x: &'a Tensor<B>,
        offsets: &'a Offsets<B>,
        from_group: usize,
    ) -> Result<Self> {
        let (r, m) = f32_matrix("pass_rows y", y)?;
        f32_shaped("pass_rows x", x, &[r, m])?;
        let groups = offsets.groups();
        i32_shaped("offsets", offsets.tensor(), &[groups + 1])?;
        if offsets.bound() > r {
            return Err(Error::shape(
                "pass_rows y",
                format!("at least the {} rows the groups cover", offsets.bound()),
                y.shape(),
            ));
        }
        if from_group > groups {
            return Err(Error::config("from_group", format!("{from_group} is past the offsets' {groups} groups")));
        }
        fits_i32("pass_rows rows", r)?;
        let n = output(b, "pass_rows output", &[r, m], DType::F32)?;
        let params = PermuteParams {
            n: n as u64,
            // The kernels divide by it; with M = 0 there is nothing to launch anyway.
            cols: to_u32("hidden size", m.max(1))?,
            from_group: to_u32("from_group", from_group)?,
            groups: to_u32("groups", groups)?,
            ..Default::default()
        };
        Ok(PassRowsOp { y, x, offsets, from_group, out_shape: [r, m], params })
    }
}

/// Weighted sum back to token order over a range of tokens: `y[t − t0] = Σⱼ weights[t, j]
/// · yp[rows[t, j]]` for `t` in `tokens`, f32 accumulation in route order; routes with
/// row −1 contribute nothing. Checked.
#[non_exhaustive]
pub struct CombineOp<'a, B: Device> {
    /// Expert outputs in the grouped layout `[rows.bound, M]`, f32.
    pub yp: &'a Tensor<B>,
    /// The row of every route.
    pub rows: &'a RouteRows<B>,
    /// The combine weight of every route `[S, k]`, f32.
    pub weights: &'a Tensor<B>,
    /// The tokens combined (all of them, or a tensor-parallel rank's share).
    pub tokens: Range<usize>,
    /// Output shape `[tokens.len(), M]`.
    pub out_shape: [usize; 2],
    /// Kernel parameters (`n` = len·M, `t0` the first token).
    pub params: PermuteParams,
}

impl<'a, B: Device> CombineOp<'a, B> {
    /// Checks `yp` (one row per row of the layout), the weights and the token range.
    pub fn check(
        b: &B,
        yp: &'a Tensor<B>,
        rows: &'a RouteRows<B>,
        weights: &'a Tensor<B>,
        tokens: Range<usize>,
    ) -> Result<Self> {
        let (r, m) = f32_matrix("expert output", yp)?;
        let (s, k) = (rows.tokens(), rows.k());
        if r != rows.bound {
            return Err(Error::shape(
                "expert output",
                format!("[{}, hidden] (one row per row of the layout)", rows.bound),
                yp.shape(),
            ));
        }
        f32_shaped("combine weights", weights, &[s, k])?;
        if tokens.start > tokens.end || tokens.end > s {
            return Err(Error::Precondition(format!("combine of tokens {tokens:?} of {s}")));
        }
        let len = tokens.end - tokens.start;
        let n = output(b, "combined output", &[len, m], DType::F32)?;
        let params = PermuteParams {
            n: n as u64,
            cols: to_u32("hidden size", m)?,
            k: to_u32("k", k)?,
            t0: to_u32("first token", tokens.start)?,
            ..Default::default()
        };
        Ok(CombineOp { yp, rows, weights, tokens, out_shape: [len, m], params })
    }
}

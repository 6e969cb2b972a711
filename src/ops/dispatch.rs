//! Row movement between token order and a grouped layout: `permute` gathers the token
//! row of every route into the row its [`RouteRows`] name, `combine` sums weighted rows
//! back to token order. The plan's compact expert-major layout is one such layout (the
//! local dispatcher); the expert-parallel send buffer, ordered by destination rank, is
//! another (`crate::ops::BucketOp`).

use super::{f32_matrix, f32_shaped, output, to_u32, Plan};
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

//! The `Backend` trait: a [`Device`] (memory, a queue, uploads) and the MoE primitives at
//! the granularity where fusion pays. Everything above it (gating policies, capacity rules, the layer, the
//! importers) is shared by every backend.
//!
//! Every op has one front door, a provided method (`linear`, `route`, `plan`, ...): it
//! checks the operands once for every backend (`crate::ops`), encodes the kernel
//! parameters once (`crate::kernel_abi`), calls the backend's `run_*` method with the
//! checked op, and verifies the shapes of what came back. A backend implements only the
//! `run_*` methods, which receive operands that are already valid. Callers use the front
//! doors; backends do not override them.
//!
//! Conventions every implementation follows:
//! - Ops are enqueued and return new tensors; only [`Backend::download`] (and
//!   [`Backend::synchronize`]) wait for the device. Operand errors surface at the call
//!   that caused them; errors found on the device (non-finite router logits) at the next
//!   download.
//! - Matrices are row-major; weights are `[out_features, in_features]` as in PyTorch, so a
//!   linear layer is `x · Wᵀ`.
//! - Float accumulation is f32 whatever the storage dtype. Results are deterministic: the
//!   same inputs on the same backend give bitwise the same outputs (no float atomics whose
//!   order varies; slots follow token order).
//! - Index tensors are i32. A dropped route has row and slot −1.

use crate::device::{returned, Device, Tensor};
use crate::error::{Error, Result};
use crate::expert::{Activation, ExpertKind};
use crate::ops::{
    BlockTable, Bucket, BucketOp, BucketParts, CombineOp, DevicePlacement, ElementwiseKind, ElementwiseOp,
    GroupedLinearOp, GroupedMlpOp, LinearOp, MlpOutput, MlpWeights, NoiseOp, Offsets, PermuteOp, Plan, PlanOp,
    PlanParts, PlanSpec, RegroupOp, RouteOp, RouteRows, RouteSpec, RouterStatsOp, Routes, RoutesParts,
};
use crate::philox::{self, NoiseKind};
use crate::tensor::{DType, HostTensor};
use std::ops::Range;

/// A compute backend: a [`Device`] and the MoE ops on it. See the module docs for the
/// conventions.
pub trait Backend: Device {
    // ------------------------------------------------------------ the backend's work
    /// `x · wᵀ (+ bias)`.
    fn run_linear(&self, op: &LinearOp<'_, Self>) -> Result<Tensor<Self>>;
    /// The grouped product over variable-size groups whose offsets stay on the device.
    fn run_grouped_linear(&self, op: &GroupedLinearOp<'_, Self>) -> Result<Tensor<Self>>;
    /// The whole expert MLP over grouped rows. The default composes the primitives
    /// ([`Backend::grouped_mlp_unfused`]); backends override it to keep each tile of the first
    /// product in cache through the activation, which saves a round trip of the `[R, N]`
    /// intermediate through memory.
    fn run_grouped_mlp(&self, op: &GroupedMlpOp<'_, Self>) -> Result<MlpOutput<Self>> {
        self.grouped_mlp_unfused(op)
    }
    /// `grouped_mlp` composed from the primitives' front doors: first product, activation
    /// or GLU, second product. The default of [`Backend::run_grouped_mlp`], the fallback of
    /// backends that fuse only some expert kinds, and what the parity harness compares the
    /// fused paths with.
    fn grouped_mlp_unfused(&self, op: &GroupedMlpOp<'_, Self>) -> Result<MlpOutput<Self>> {
        let w = op.weights;
        let h = self.grouped_linear(op.xp, op.offsets, w.w_in, w.b_in)?;
        let a = match w.kind {
            ExpertKind::Linear => return Ok(MlpOutput { pre: None, y: h }),
            ExpertKind::Mlp { activation } => self.activation(&h, activation)?,
            ExpertKind::Glu { activation } => self.glu(&h, activation)?,
        };
        let w_out = w.w_out.ok_or_else(|| Error::Internal("checked MLP without w_out".into()))?;
        let y = self.grouped_linear(&a, op.offsets, w_out, w.b_out)?;
        Ok(MlpOutput { pre: op.keep_pre.then_some(h), y })
    }
    /// An elementwise op.
    fn run_elementwise(&self, op: &ElementwiseOp<'_, Self>) -> Result<Tensor<Self>>;
    /// Scores, choice and weights of every token; flags non-finite inputs (an error now,
    /// or at the next download on devices that find it there).
    fn run_route(&self, op: &RouteOp<'_, Self>) -> Result<RoutesParts<Self>>;
    /// Counts, capacity, slots, compact rows and combine weights of every route.
    fn run_plan(&self, op: &PlanOp<'_, Self>) -> Result<PlanParts<Self>>;
    /// Gathers token rows into a grouped layout (compact expert-major, or a send buffer).
    fn run_permute(&self, op: &PermuteOp<'_, Self>) -> Result<Tensor<Self>>;
    /// Weighted sum of expert outputs back to token order.
    fn run_combine(&self, op: &CombineOp<'_, Self>) -> Result<Tensor<Self>>;
    /// Destination slot and send row of every kept route (expert parallelism).
    fn run_bucket(&self, op: &BucketOp<'_, Self>) -> Result<BucketParts<Self>>;
    /// Gathers blocks of rows by a block table.
    fn run_regroup(&self, op: &RegroupOp<'_, Self>) -> Result<Tensor<Self>>;
    /// Router reductions for the losses.
    fn run_router_stats(&self, op: &RouterStatsOp<'_, Self>) -> Result<Tensor<Self>>;
    /// Philox noise. The default draws on the host and uploads; GPU backends generate on
    /// the device with the same counter layout, so one seed gives the same numbers
    /// everywhere.
    fn run_noise(&self, op: &NoiseOp) -> Result<Tensor<Self>> {
        self.upload(&HostTensor::f32(&op.shape, philox::noise(op.kind, op.seed, op.stream, op.n))?)
    }

    // ------------------------------------------------------------ front doors
    /// `x [R, K] · w [N, K]ᵀ (+ bias [N])` → `[R, N]`.
    fn linear(&self, x: &Tensor<Self>, w: &Tensor<Self>, bias: Option<&Tensor<Self>>) -> Result<Tensor<Self>> {
        let op = LinearOp::check(self, x, w, bias)?;
        returned(self, "linear", self.run_linear(&op)?, &op.out_shape(), DType::F32)
    }

    /// Grouped product over variable-size row groups read from the device: rows
    /// `offsets[g]..offsets[g + 1]` of `x [R, K]` are multiplied by `w[g] [N, K]ᵀ`
    /// (+ `bias[g]`). Rows past the last group are zero in the output.
    fn grouped_linear(
        &self,
        x: &Tensor<Self>,
        offsets: &Offsets<Self>,
        w: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
    ) -> Result<Tensor<Self>> {
        let op = GroupedLinearOp::check(self, x, offsets, w, bias)?;
        returned(self, "grouped_linear", self.run_grouped_linear(&op)?, &op.out_shape(), DType::F32)
    }

    /// The whole expert MLP over compact expert-major rows grouped by `offsets`:
    /// `w_out · act(w_in · x)` (GLU: `w_out · (act(gate) · up)`), with biases. `keep_pre`
    /// asks for the first product's output in the result (for a backward pass).
    fn grouped_mlp(
        &self,
        xp: &Tensor<Self>,
        offsets: &Offsets<Self>,
        w: &MlpWeights<'_, Self>,
        keep_pre: bool,
    ) -> Result<MlpOutput<Self>> {
        let op = GroupedMlpOp::check(self, xp, offsets, w, keep_pre)?;
        let out = self.run_grouped_mlp(&op)?;
        let rows = op.first.rows;
        let y = returned(self, "grouped_mlp", out.y, &[rows, op.out_cols], DType::F32)?;
        let pre = match (out.pre, keep_pre && !matches!(w.kind, ExpertKind::Linear)) {
            (Some(p), true) => Some(returned(self, "grouped_mlp", p, &[rows, op.first.n], DType::F32)?),
            (None, false) => None,
            (got, _) => {
                return Err(Error::Internal(format!(
                    "backend {} {} the pre-activation from `grouped_mlp` (asked: {keep_pre})",
                    self.name(),
                    if got.is_some() { "returned" } else { "did not return" }
                )))
            }
        };
        Ok(MlpOutput { pre, y })
    }

    /// Applies an activation elementwise.
    fn activation(&self, x: &Tensor<Self>, act: Activation) -> Result<Tensor<Self>> {
        self.elementwise(ElementwiseKind::Activation(act), x, None, None)
    }
    /// Gated linear unit: `x [R, 2I]` (gate columns first) → `act(gate) · up`, `[R, I]`.
    fn glu(&self, x: &Tensor<Self>, act: Activation) -> Result<Tensor<Self>> {
        self.elementwise(ElementwiseKind::Glu(act), x, None, None)
    }
    /// Elementwise product of equal-shape tensors (multiplicative jitter).
    fn mul(&self, a: &Tensor<Self>, b: &Tensor<Self>) -> Result<Tensor<Self>> {
        self.elementwise(ElementwiseKind::Mul, a, Some(b), None)
    }
    /// `a + sigmoid(gate) · b` with `gate [R, 1]`, or `a + b` without a gate.
    fn add_gated(&self, a: &Tensor<Self>, b: &Tensor<Self>, gate: Option<&Tensor<Self>>) -> Result<Tensor<Self>> {
        self.elementwise(ElementwiseKind::AddGated, a, Some(b), gate)
    }
    /// DeepSpeed residual MoE: `c = softmax(coef [R, 2])`, `moe · c₀ + mlp · c₁`.
    fn residual_mix(&self, moe: &Tensor<Self>, mlp: &Tensor<Self>, coef: &Tensor<Self>) -> Result<Tensor<Self>> {
        self.elementwise(ElementwiseKind::ResidualMix, moe, Some(mlp), Some(coef))
    }
    /// The front door every elementwise op goes through.
    fn elementwise(
        &self,
        kind: ElementwiseKind,
        a: &Tensor<Self>,
        b: Option<&Tensor<Self>>,
        c: Option<&Tensor<Self>>,
    ) -> Result<Tensor<Self>> {
        let op = ElementwiseOp::check(self, kind, a, b, c)?;
        returned(self, kind.entry(), self.run_elementwise(&op)?, &op.out_shape, DType::F32)
    }

    /// Scores, choice and weights of every token. Non-finite logits, correction bias or
    /// choice noise are an error naming the first bad token or element (now on the cpu, at
    /// the next download on GPU backends).
    fn route(&self, logits: &Tensor<Self>, spec: &RouteSpec<'_, Self>) -> Result<Routes<Self>> {
        let op = RouteOp::check(self, logits, spec)?;
        Routes::seal(self, self.run_route(&op)?, op.tokens, spec.k, op.experts)
    }
    /// Counts, capacity, slots, compact rows and combine weights of every route.
    fn plan(&self, routes: &Routes<Self>, spec: &PlanSpec<'_, Self>) -> Result<Plan<Self>> {
        let op = PlanOp::check(self, routes, spec)?;
        Plan::seal(self, &op, self.run_plan(&op)?)
    }
    /// Gathers token rows into a grouped layout: row `rows[s, j]` of the output
    /// `[rows.bound(), M]` is `x[s]`; rows no route names are zero. With
    /// [`Plan::route_rows`], the compact expert-major layout the experts run on.
    fn permute(&self, x: &Tensor<Self>, rows: &RouteRows<Self>) -> Result<Tensor<Self>> {
        let op = PermuteOp::check(self, x, rows)?;
        returned(self, "permute", self.run_permute(&op)?, &op.out_shape, DType::F32)
    }
    /// Weighted sum back to token order for the tokens in `tokens`: `y[t − t0] = Σⱼ
    /// weights[t, j] · yp[rows[t, j]]`, f32 accumulation in route order; routes with row −1
    /// (dropped) contribute nothing.
    fn combine(
        &self,
        yp: &Tensor<Self>,
        rows: &RouteRows<Self>,
        weights: &Tensor<Self>,
        tokens: Range<usize>,
    ) -> Result<Tensor<Self>> {
        let op = CombineOp::check(self, yp, rows, weights, tokens)?;
        returned(self, "combine", self.run_combine(&op)?, &op.out_shape, DType::F32)
    }
    /// Expert parallelism's bucketing by destination: for every kept route of the tokens
    /// in `tokens`, its physical slot (replica `token % replicas` of its expert) and its row
    /// in a send buffer ordered by slot, so by destination rank and local expert; and the
    /// routes per slot.
    fn bucket(
        &self,
        plan: &Plan<Self>,
        placement: &DevicePlacement<Self>,
        tokens: Range<usize>,
    ) -> Result<Bucket<Self>> {
        let op = BucketOp::check(self, plan, placement, tokens)?;
        Bucket::seal(self, &op, self.run_bucket(&op)?)
    }
    /// Gathers row blocks: output block j is the table's input rows `in_start[j]..`.
    fn regroup(&self, x: &Tensor<Self>, table: &BlockTable<Self>) -> Result<Tensor<Self>> {
        let op = RegroupOp::check(self, x, table)?;
        returned(self, "regroup", self.run_regroup(&op)?, &op.out_shape, DType::F32)
    }
    /// Reductions for the losses: `[E + 1]` f32 holding the mean score of each expert over
    /// tokens, then the mean of `logsumexp(logits)²` (Switch z-loss).
    fn router_stats(&self, logits: &Tensor<Self>, scores: &Tensor<Self>) -> Result<Tensor<Self>> {
        let op = RouterStatsOp::check(self, logits, scores)?;
        returned(self, "router_stats", self.run_router_stats(&op)?, &[op.experts + 1], DType::F32)
    }
    /// Philox 4x32-10 noise of `kind` for `shape`, stream `stream` of `seed`.
    fn noise(&self, kind: NoiseKind, seed: u64, stream: u32, shape: &[usize]) -> Result<Tensor<Self>> {
        let op = NoiseOp::check(self, kind, seed, stream, shape)?;
        returned(self, "noise", self.run_noise(&op)?, shape, DType::F32)
    }
}

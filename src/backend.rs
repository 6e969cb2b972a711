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

use crate::device::{returned, Device, Tensor, WeightUploadOp};
use crate::error::{Error, Result};
use crate::expert::{Activation, ExpertKind, GluClamp};
use crate::ops::{
    ActGradKind, ActGradOp, AuxGrad, BlockTable, Bucket, BucketOp, BucketParts, CastWeightOp, CombineGrad,
    CombineGradOp, CombineOp, DevicePlacement, ElementwiseKind, ElementwiseOp, GatedAddGrad, GatedAddGradOp,
    GroupedLinearOp, GroupedMlpOp, LinearDxOp, LinearOp, MixGrad, MixGradOp, MlpOutput, MlpWeights, NoiseOp, Offsets,
    OptimStepOp, PassRowsOp, PermuteOp, PermuteScaledOp, Plan, PlanOp, PlanParts, PlanSpec, RegroupOp, RouteGradOp,
    RouteGradSpec, RouteOp, RouteRows, RouteSpec, RouterStatsOp, Routes, RoutesParts, StepOut, StepRule, SumRowsOp,
    SumSquaresOp, WeightGrad, WeightGradOp,
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
            ExpertKind::Glu { activation, clamp } => self.glu_clamped(&h, activation, clamp)?,
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
    /// Gathers token rows into a grouped layout, each scaled by its route's weight.
    fn run_permute_scaled(&self, op: &PermuteScaledOp<'_, Self>) -> Result<Tensor<Self>>;
    /// Replaces a range of grouped rows (the offsets' last groups) by another tensor's.
    fn run_pass_rows(&self, op: &PassRowsOp<'_, Self>) -> Result<Tensor<Self>>;
    /// Weighted sum of expert outputs back to token order.
    fn run_combine(&self, op: &CombineOp<'_, Self>) -> Result<Tensor<Self>>;
    /// Destination slot and send row of every kept route (expert parallelism).
    fn run_bucket(&self, op: &BucketOp<'_, Self>) -> Result<BucketParts<Self>>;
    /// Gathers blocks of rows by a block table.
    fn run_regroup(&self, op: &RegroupOp<'_, Self>) -> Result<Tensor<Self>>;
    /// Router reductions for the losses.
    fn run_router_stats(&self, op: &RouterStatsOp<'_, Self>) -> Result<Tensor<Self>>;
    /// An f32 tensor stored as a weight in `op.dtype`, exactly as `upload_weight` of its
    /// downloaded values stores it. The default is that round trip through the host;
    /// backends override it to round and lay out the weight on the device.
    fn run_cast_weight(&self, op: &CastWeightOp<'_, Self>) -> Result<Tensor<Self>> {
        let host = self.download(op.x)?;
        self.run_upload_weight(&WeightUploadOp::check(self, &host, op.dtype)?)
    }
    /// Philox noise. The default draws on the host and uploads; GPU backends generate on
    /// the device with the same counter layout, so one seed gives the same numbers
    /// everywhere.
    fn run_noise(&self, op: &NoiseOp) -> Result<Tensor<Self>> {
        self.upload(&HostTensor::f32(&op.shape, philox::noise(op.kind, op.seed, op.stream, op.n))?)
    }

    // ------------------------------------------------------------ backward and optimizer work
    // A backend that has not implemented a backward op says so (`Error::Unsupported`,
    // which the parity harness lists as unsupported) rather than computing it elsewhere.
    /// `dy · w[g]`: the input gradient of a (grouped) product.
    fn run_linear_dx(&self, op: &LinearDxOp<'_, Self>) -> Result<Tensor<Self>> {
        let _ = op;
        Err(Error::unsupported(self.name(), "linear_dx (backward)"))
    }
    /// `Σ dyᵀ · x` per group, and the bias gradient.
    fn run_weight_grad(&self, op: &WeightGradOp<'_, Self>) -> Result<WeightGrad<Self>> {
        let _ = op;
        Err(Error::unsupported(self.name(), "weight_grad (backward)"))
    }
    /// The gradient through an activation or GLU.
    fn run_act_grad(&self, op: &ActGradOp<'_, Self>) -> Result<Tensor<Self>> {
        let _ = op;
        Err(Error::unsupported(self.name(), "act_grad (backward)"))
    }
    /// The column sum of a matrix (the gradient of an output bias).
    fn run_sum_rows(&self, op: &SumRowsOp<'_, Self>) -> Result<Tensor<Self>> {
        let _ = op;
        Err(Error::unsupported(self.name(), "sum_rows (backward)"))
    }
    /// The gradient of `combine`.
    fn run_combine_grad(&self, op: &CombineGradOp<'_, Self>) -> Result<CombineGrad<Self>> {
        let _ = op;
        Err(Error::unsupported(self.name(), "combine_grad (backward)"))
    }
    /// The router's backward.
    fn run_route_grad(&self, op: &RouteGradOp<'_, Self>) -> Result<Tensor<Self>> {
        let _ = op;
        Err(Error::unsupported(self.name(), "route_grad (backward)"))
    }
    /// The gradient of the residual mix.
    fn run_mix_grad(&self, op: &MixGradOp<'_, Self>) -> Result<MixGrad<Self>> {
        let _ = op;
        Err(Error::unsupported(self.name(), "mix_grad (backward)"))
    }
    /// The gradient of the gated shared-expert add.
    fn run_gated_add_grad(&self, op: &GatedAddGradOp<'_, Self>) -> Result<GatedAddGrad<Self>> {
        let _ = op;
        Err(Error::unsupported(self.name(), "gated_add_grad (backward)"))
    }
    /// One optimizer step of one tensor.
    fn run_optim_step(&self, op: &OptimStepOp<'_, Self>) -> Result<StepOut<Self>> {
        let _ = op;
        Err(Error::unsupported(self.name(), "optim_step"))
    }
    /// One optimizer step written into the parameter and state buffers themselves, for a
    /// step the front door checked (`params`, `rule`): returns false (the default) to have
    /// the front door run [`Backend::run_optim_step`] and replace the tensors instead, as
    /// a backend must when a buffer is shared with another handle.
    fn run_optim_step_in_place(
        &self,
        params: &crate::kernel_abi::OptimParams,
        rule: StepRule,
        param: &mut Tensor<Self>,
        grad: &Tensor<Self>,
        m: Option<&mut Tensor<Self>>,
        v: Option<&mut Tensor<Self>>,
    ) -> Result<bool> {
        let _ = (params, rule, param, grad, m, v);
        Ok(false)
    }
    /// Σ x².
    fn run_sum_squares(&self, op: &SumSquaresOp<'_, Self>) -> Result<Tensor<Self>> {
        let _ = op;
        Err(Error::unsupported(self.name(), "sum_squares"))
    }

    // ------------------------------------------------------------ front doors
    /// `x [R, K] · w [N, K]ᵀ (+ bias [N])` → `[R, N]`.
    fn linear(&self, x: &Tensor<Self>, w: &Tensor<Self>, bias: Option<&Tensor<Self>>) -> Result<Tensor<Self>> {
        let op = LinearOp::check(self, x, w, bias)?;
        returned(self, "linear", crate::profile::time("linear", || self.run_linear(&op))?, &op.out_shape(), DType::F32)
    }

    /// Stores an f32 matrix `[N, K]` or stack `[G, N, K]` as a weight in `dtype` (f32,
    /// f16 or bf16) on the device: bit for bit what [`Device::upload_weight`] of its
    /// downloaded values gives (the same storage layout, rounding to nearest even,
    /// infinities and NaN kept as the `half` crate keeps them), without the round trip
    /// through the host where the backend can. What mixed-precision training refreshes
    /// its half-precision compute copies with after each step.
    fn cast_weight(&self, x: &Tensor<Self>, dtype: DType) -> Result<Tensor<Self>> {
        let op = CastWeightOp::check(self, x, dtype)?;
        returned(
            self,
            "cast_weight",
            crate::profile::time("cast_weight", || self.run_cast_weight(&op))?,
            x.shape(),
            dtype,
        )
    }

    /// Grouped product over variable-size row groups read from the device: rows
    /// `offsets[g]..offsets[g + 1]` of `x [R, K]` are multiplied by `w[g] [N, K]ᵀ`
    /// (+ `bias[g]`). Rows past the last group are zero in the output, as are the rows of
    /// a tail of weightless groups ([`Offsets::with_tail`]: `w` has G experts, the offsets
    /// G + tail groups).
    fn grouped_linear(
        &self,
        x: &Tensor<Self>,
        offsets: &Offsets<Self>,
        w: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
    ) -> Result<Tensor<Self>> {
        let op = GroupedLinearOp::check(self, x, offsets, w, bias)?;
        returned(
            self,
            "grouped_linear",
            crate::profile::time("grouped_linear", || self.run_grouped_linear(&op))?,
            &op.out_shape(),
            DType::F32,
        )
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
        let out = crate::profile::time("grouped_mlp", || self.run_grouped_mlp(&op))?;
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
    /// [`Backend::glu`] with an optional clamp ([`GluClamp`], `ExpertKind::Glu`'s
    /// fields): `act_α(min(gate, limit)) · (clamp(up, −limit, limit) + up_offset)`. A bad
    /// clamp is an error naming its field.
    fn glu_clamped(&self, x: &Tensor<Self>, act: Activation, clamp: Option<GluClamp>) -> Result<Tensor<Self>> {
        let kind = match clamp {
            Some(c) => ElementwiseKind::GluClamped(act, c),
            None => ElementwiseKind::Glu(act),
        };
        self.elementwise(kind, x, None, None)
    }
    /// `y [R, M] + bias [M]` on every row (JetMoE's per-block output bias). Its backward:
    /// `dy` passes to `y` unchanged, and the bias gradient is [`Backend::sum_rows`]`(dy)`.
    fn add_bias(&self, y: &Tensor<Self>, bias: &Tensor<Self>) -> Result<Tensor<Self>> {
        self.elementwise(ElementwiseKind::AddBias, y, Some(bias), None)
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
    /// `alpha · a`, elementwise (loss and gradient scaling).
    fn scale(&self, a: &Tensor<Self>, alpha: f32) -> Result<Tensor<Self>> {
        self.elementwise(ElementwiseKind::Scale(alpha), a, None, None)
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
        returned(
            self,
            kind.entry(),
            crate::profile::time(kind.entry(), || self.run_elementwise(&op))?,
            &op.out_shape,
            DType::F32,
        )
    }

    /// Scores, choice and weights of every token. Non-finite logits, correction bias or
    /// choice noise are an error naming the first bad token or element (now on the cpu, at
    /// the next download on GPU backends).
    fn route(&self, logits: &Tensor<Self>, spec: &RouteSpec<'_, Self>) -> Result<Routes<Self>> {
        let op = RouteOp::check(self, logits, spec)?;
        Routes::seal(self, crate::profile::time("route", || self.run_route(&op))?, op.tokens, spec.k, op.experts)
    }
    /// Counts, capacity, slots, compact rows and combine weights of every route.
    fn plan(&self, routes: &Routes<Self>, spec: &PlanSpec<'_, Self>) -> Result<Plan<Self>> {
        let op = PlanOp::check(self, routes, spec)?;
        Plan::seal(self, &op, crate::profile::time("plan", || self.run_plan(&op))?)
    }
    /// Gathers token rows into a grouped layout: row `rows[s, j]` of the output
    /// `[rows.bound(), M]` is `x[s]`; rows no route names are zero. With
    /// [`Plan::route_rows`], the compact expert-major layout the experts run on.
    fn permute(&self, x: &Tensor<Self>, rows: &RouteRows<Self>) -> Result<Tensor<Self>> {
        let op = PermuteOp::check(self, x, rows)?;
        returned(self, "permute", crate::profile::time("permute", || self.run_permute(&op))?, &op.out_shape, DType::F32)
    }
    /// [`Backend::permute`] with every route's row scaled by its weight (Llama 4 weights
    /// the expert input): row `rows[t, j]` of the output `[rows.bound(), M]` is
    /// `weights[t, j] · x[t]` (weights `[S, k]` f32); rows no route names are zero. Its
    /// backward is two existing ops: `dx = combine(dxp, rows, weights, 0..S)`, and
    /// `d_weights = combine_grad(x, dxp, rows, weights, 0..S).d_weights` (`d_weights[t, j]
    /// = x[t] · dxp[rows[t, j]]`).
    fn permute_scaled(&self, x: &Tensor<Self>, rows: &RouteRows<Self>, weights: &Tensor<Self>) -> Result<Tensor<Self>> {
        let op = PermuteScaledOp::check(self, x, rows, weights)?;
        returned(
            self,
            "permute_scaled",
            crate::profile::time("permute_scaled", || self.run_permute_scaled(&op))?,
            &op.out_shape,
            DType::F32,
        )
    }
    /// `y` (`[R, M]` f32) with rows `offsets[from_group]..offsets[G]` replaced by those of
    /// `x` (`[R, M]` f32): the rows of identity experts grouped last (LongCat-Flash's
    /// zero-compute experts return their input; see [`Offsets::with_tail`]). Its backward
    /// is itself: for the output's gradient `d`, `d_x = pass_rows(0, d, ..)` and `d_y =
    /// pass_rows(d, 0, ..)` with the same offsets and `from_group`.
    fn pass_rows(
        &self,
        y: &Tensor<Self>,
        x: &Tensor<Self>,
        offsets: &Offsets<Self>,
        from_group: usize,
    ) -> Result<Tensor<Self>> {
        let op = PassRowsOp::check(self, y, x, offsets, from_group)?;
        returned(
            self,
            "pass_rows",
            crate::profile::time("pass_rows", || self.run_pass_rows(&op))?,
            &op.out_shape,
            DType::F32,
        )
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
        returned(self, "combine", crate::profile::time("combine", || self.run_combine(&op))?, &op.out_shape, DType::F32)
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
        Bucket::seal(self, &op, crate::profile::time("bucket", || self.run_bucket(&op))?)
    }
    /// Gathers row blocks: output block j is the table's input rows `in_start[j]..`.
    fn regroup(&self, x: &Tensor<Self>, table: &BlockTable<Self>) -> Result<Tensor<Self>> {
        let op = RegroupOp::check(self, x, table)?;
        returned(self, "regroup", crate::profile::time("regroup", || self.run_regroup(&op))?, &op.out_shape, DType::F32)
    }
    /// Reductions for the losses: `[E + 1]` f32 holding the mean score of each expert over
    /// tokens, then the mean of `logsumexp(logits)²` (Switch z-loss).
    fn router_stats(&self, logits: &Tensor<Self>, scores: &Tensor<Self>) -> Result<Tensor<Self>> {
        let op = RouterStatsOp::check(self, logits, scores)?;
        returned(
            self,
            "router_stats",
            crate::profile::time("router_stats", || self.run_router_stats(&op))?,
            &[op.experts + 1],
            DType::F32,
        )
    }
    /// Philox 4x32-10 noise of `kind` for `shape`, stream `stream` of `seed`.
    fn noise(&self, kind: NoiseKind, seed: u64, stream: u32, shape: &[usize]) -> Result<Tensor<Self>> {
        let op = NoiseOp::check(self, kind, seed, stream, shape)?;
        returned(self, "noise", crate::profile::time("noise", || self.run_noise(&op))?, shape, DType::F32)
    }

    // ------------------------------------------------------------ backward front doors
    /// The input gradient of `linear` (no offsets, w `[N, K]`) or `grouped_linear` (w
    /// `[G, N, K]`): `dy [R, N] · w[g]` → `[R, K]`, zero past the last group.
    fn linear_dx(&self, dy: &Tensor<Self>, w: &Tensor<Self>, offsets: Option<&Offsets<Self>>) -> Result<Tensor<Self>> {
        let op = LinearDxOp::check(self, dy, w, offsets)?;
        returned(
            self,
            "linear_dx",
            crate::profile::time("linear_dx", || self.run_linear_dx(&op))?,
            &[op.rows, op.k],
            DType::F32,
        )
    }
    /// The weight (and with `bias`, bias) gradient of a (grouped) product: `Σ_{r ∈ g}
    /// dy[r]ᵀ x[r]` per group (`[G, N, K]`, or `[N, K]` without offsets).
    fn weight_grad(
        &self,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        offsets: Option<&Offsets<Self>>,
        bias: bool,
    ) -> Result<WeightGrad<Self>> {
        let op = WeightGradOp::check(self, dy, x, offsets, bias)?;
        let out = crate::profile::time("weight_grad", || self.run_weight_grad(&op))?;
        let dw = returned(self, "weight_grad", out.dw, &op.w_shape, DType::F32)?;
        let db = match (out.db, bias) {
            (Some(db), true) => Some(returned(self, "weight_grad", db, &op.b_shape, DType::F32)?),
            (None, false) => None,
            _ => return Err(Error::Internal(format!("backend {} returned the bias gradient wrongly", self.name()))),
        };
        Ok(WeightGrad { dw, db })
    }
    /// The gradient of an activation (or GLU) output back to its kept pre-activation.
    fn act_grad(&self, kind: ActGradKind, dy: &Tensor<Self>, pre: &Tensor<Self>) -> Result<Tensor<Self>> {
        let op = ActGradOp::check(self, kind, dy, pre)?;
        returned(
            self,
            "act_grad",
            crate::profile::time("act_grad", || self.run_act_grad(&op))?,
            &op.out_shape,
            DType::F32,
        )
    }
    /// The column sum `dy [S, M]` → `[M]`, in row order: the bias gradient of
    /// [`Backend::add_bias`].
    fn sum_rows(&self, dy: &Tensor<Self>) -> Result<Tensor<Self>> {
        let op = SumRowsOp::check(self, dy)?;
        returned(self, "sum_rows", crate::profile::time("sum_rows", || self.run_sum_rows(&op))?, &[op.cols], DType::F32)
    }
    /// The gradient of [`Backend::combine`]: of the expert outputs and of the weights.
    fn combine_grad(
        &self,
        dy: &Tensor<Self>,
        yp: &Tensor<Self>,
        rows: &RouteRows<Self>,
        weights: &Tensor<Self>,
        tokens: Range<usize>,
    ) -> Result<CombineGrad<Self>> {
        let op = CombineGradOp::check(self, dy, yp, rows, weights, tokens)?;
        let out = crate::profile::time("combine_grad", || self.run_combine_grad(&op))?;
        Ok(CombineGrad {
            d_yp: returned(self, "combine_grad", out.d_yp, yp.shape(), DType::F32)?,
            d_weights: returned(self, "combine_grad", out.d_weights, weights.shape(), DType::F32)?,
        })
    }
    /// The router's backward: the gradient of the logits `[S, E]` from that of the plan's
    /// combine weights, plus a router loss on the scores and the Switch z-loss.
    #[allow(clippy::too_many_arguments)]
    fn route_grad(
        &self,
        d_weights: &Tensor<Self>,
        routes: &Routes<Self>,
        plan: &Plan<Self>,
        logits: &Tensor<Self>,
        spec: RouteGradSpec,
        aux: Option<AuxGrad<'_, Self>>,
        z_coef: f32,
    ) -> Result<Tensor<Self>> {
        let op = RouteGradOp::check(self, d_weights, routes, plan, logits, spec, aux, z_coef)?;
        returned(
            self,
            "route_grad",
            crate::profile::time("route_grad", || self.run_route_grad(&op))?,
            &[op.tokens, op.experts],
            DType::F32,
        )
    }
    /// The gradient of [`Backend::residual_mix`].
    fn mix_grad(
        &self,
        dy: &Tensor<Self>,
        moe: &Tensor<Self>,
        mlp: &Tensor<Self>,
        coef: &Tensor<Self>,
    ) -> Result<MixGrad<Self>> {
        let op = MixGradOp::check(self, dy, moe, mlp, coef)?;
        let out = crate::profile::time("mix_grad", || self.run_mix_grad(&op))?;
        Ok(MixGrad {
            d_moe: returned(self, "mix_grad", out.d_moe, dy.shape(), DType::F32)?,
            d_mlp: returned(self, "mix_grad", out.d_mlp, dy.shape(), DType::F32)?,
            d_coef: returned(self, "mix_grad", out.d_coef, coef.shape(), DType::F32)?,
        })
    }
    /// The gradient of [`Backend::add_gated`] with a gate: of the shared output and the gate.
    fn gated_add_grad(
        &self,
        dy: &Tensor<Self>,
        shared: &Tensor<Self>,
        gate: &Tensor<Self>,
    ) -> Result<GatedAddGrad<Self>> {
        let op = GatedAddGradOp::check(self, dy, shared, gate)?;
        let out = crate::profile::time("gated_add_grad", || self.run_gated_add_grad(&op))?;
        Ok(GatedAddGrad {
            d_shared: returned(self, "gated_add_grad", out.d_shared, dy.shape(), DType::F32)?,
            d_gate: returned(self, "gated_add_grad", out.d_gate, gate.shape(), DType::F32)?,
        })
    }
    /// One optimizer step of `param` with `grad`, returning the new parameter and state.
    fn optim_step(
        &self,
        param: &Tensor<Self>,
        grad: &Tensor<Self>,
        m: Option<&Tensor<Self>>,
        v: Option<&Tensor<Self>>,
        rule: StepRule,
    ) -> Result<StepOut<Self>> {
        let op = OptimStepOp::check(self, param, grad, m, v, rule)?;
        let out = crate::profile::time("optim_step", || self.run_optim_step(&op))?;
        let shape = param.shape();
        let state = |t: Option<Tensor<Self>>, want: bool, what: &str| match (t, want) {
            (Some(t), true) => returned(self, "optim_step", t, shape, DType::F32).map(Some),
            (None, false) => Ok(None),
            _ => Err(Error::Internal(format!("backend {} returned the {what} wrongly", self.name()))),
        };
        Ok(StepOut {
            param: returned(self, "optim_step", out.param, shape, DType::F32)?,
            m: state(out.m, rule.has_m(), "first moment")?,
            v: state(out.v, rule.has_v(), "second moment")?,
        })
    }
    /// [`Backend::optim_step`] on the optimizer's own tensors: `param`, `m` and `v` are
    /// replaced by their updated values (written in place where the backend can).
    fn optim_step_in_place(
        &self,
        param: &mut Tensor<Self>,
        grad: &Tensor<Self>,
        m: &mut Option<Tensor<Self>>,
        v: &mut Option<Tensor<Self>>,
        rule: StepRule,
    ) -> Result<()> {
        let params = OptimStepOp::check(self, param, grad, m.as_ref(), v.as_ref(), rule)?.params;
        // In place needs every state the rule keeps to exist already (SGD's first step
        // makes its momentum buffer).
        let whole = m.is_some() == rule.has_m() && v.is_some() == rule.has_v();
        if whole && self.run_optim_step_in_place(&params, rule, param, grad, m.as_mut(), v.as_mut())? {
            return Ok(());
        }
        let out = self.optim_step(param, grad, m.as_ref(), v.as_ref(), rule)?;
        *param = out.param;
        *m = out.m;
        *v = out.v;
        Ok(())
    }
    /// Σ x² over an f32 tensor, `[1]` (gradient clipping by global norm).
    fn sum_squares(&self, x: &Tensor<Self>) -> Result<Tensor<Self>> {
        let op = SumSquaresOp::check(x)?;
        returned(
            self,
            "sum_squares",
            crate::profile::time("sum_squares", || self.run_sum_squares(&op))?,
            &[1],
            DType::F32,
        )
    }
}

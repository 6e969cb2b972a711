//! Backward ops: the gradients of the forward ops, checked once for every backend like
//! the forward ones. The layer's backward (`crate::backward`) composes them in reverse
//! order of the forward; each takes what the forward kept (routes, plan rows, weights,
//! pre-activations) rather than recomputing it.
//!
//! All gradients are f32 whatever the weights' storage dtype, and every reduction runs in
//! a fixed order (no float atomics), so a backward is bitwise repeatable.

use super::{f32_matrix, f32_shaped, i32_shaped, output, to_u32, Offsets, Plan, RouteRows, Routes};
use crate::device::{Device, Tensor};
use crate::error::{Error, Result};
use crate::expert::{Activation, GluClamp};
use crate::kernel_abi::{GradMatmulParams, GradParams, RouteGradParams};
use crate::ops::{Choice, Normalize, ScoreFn};
use crate::tensor::DType;
use std::ops::Range;

/// Matrices `(groups, n, k)` of a weight `[N, K]` (dense) or `[G, N, K]` (grouped).
fn weight_dims<Buf: crate::device_tensor::DeviceBuffer>(
    name: &str,
    w: &crate::device_tensor::DeviceTensor<Buf>,
    grouped: bool,
) -> Result<(usize, usize, usize)> {
    if grouped {
        w.dims3(name)
    } else {
        let (n, k) = w.dims2(name)?;
        Ok((1, n, k))
    }
}

/// Checks optional group offsets against `rows` and the weight's groups (the offsets may
/// add a tail, [`Offsets::with_tail`]).
fn check_offsets<B: Device>(offsets: Option<&Offsets<B>>, groups: usize, rows: usize, what: &str) -> Result<()> {
    if let Some(o) = offsets {
        o.check_experts(groups)?;
        if o.bound() > rows {
            return Err(Error::shape(what, format!("at least the {} rows the groups cover", o.bound()), &[rows]));
        }
    }
    Ok(())
}

/// The input gradient of a (grouped) linear product `y = x · w[g]ᵀ`: `dx = dy · w[g]`
/// for the rows of group g, `[R, K]`; rows past the last expert group (a tail's too) are
/// zero. Dense without offsets (w `[N, K]`), grouped with them (w `[G, N, K]`). Checked.
#[non_exhaustive]
pub struct LinearDxOp<'a, B: Device> {
    /// Upstream gradient `[R, N]`, f32.
    pub dy: &'a Tensor<B>,
    /// The forward's weight (any storage dtype).
    pub w: &'a Tensor<B>,
    /// Group boundaries (None: one dense product).
    pub offsets: Option<&'a Offsets<B>>,
    /// Rows R.
    pub rows: usize,
    /// Columns N of dy (the forward's output columns).
    pub n: usize,
    /// Columns K of dx (the forward's inner size).
    pub k: usize,
    /// Kernel parameters.
    pub params: GradMatmulParams,
}

/// The parameter block of the backward's products.
fn grad_matmul(rows: usize, n: usize, k: usize, groups: usize, grouped: bool) -> Result<GradMatmulParams> {
    Ok(GradMatmulParams {
        rows: to_u32("gradient rows", rows)?,
        n: to_u32("gradient columns", n)?,
        k: to_u32("gradient inner size", k)?,
        groups: to_u32("expert groups", groups)?,
        grouped: grouped as u32,
        g1: groups as u32,
        c1: n as u32,
        ..Default::default()
    })
}

impl<'a, B: Device> LinearDxOp<'a, B> {
    /// Checks dy against the weight and the offsets.
    pub fn check(b: &B, dy: &'a Tensor<B>, w: &'a Tensor<B>, offsets: Option<&'a Offsets<B>>) -> Result<Self> {
        let (rows, n) = f32_matrix("output gradient", dy)?;
        let (g, wn, k) = weight_dims("weight", w, offsets.is_some())?;
        if wn != n {
            return Err(Error::shape("weight", format!("[.., {n}, in] (dy has {n} columns)"), w.shape()));
        }
        let wdtype = super::matmul::weight_code("weight", w.dtype())?;
        check_offsets(offsets, g, rows, "output gradient rows")?;
        super::fits_i32("gradient rows", rows)?;
        output(b, "input gradient", &[rows, k], DType::F32)?;
        let params = GradMatmulParams { wdtype, ..grad_matmul(rows, n, k, g, offsets.is_some())? };
        Ok(LinearDxOp { dy, w, offsets, rows, n, k, params })
    }
}

/// The weight gradient of a (grouped) linear product: `dw[g] = Σ_{r ∈ g} dy[r]ᵀ · x[r]`
/// (`[G, N, K]`, or `[N, K]` dense), and with `bias` the bias gradient `db[g] = Σ_{r ∈ g}
/// dy[r]` (`[G, N]` or `[N]`). A group with no row gets zeros. Rows sum in row order.
/// Offsets with a tail ([`Offsets::with_tail`]) give the G expert groups' gradients only
/// (the tail has no weights).
#[non_exhaustive]
pub struct WeightGradOp<'a, B: Device> {
    /// Upstream gradient `[R, N]`, f32.
    pub dy: &'a Tensor<B>,
    /// The forward's input `[R, K]`, f32.
    pub x: &'a Tensor<B>,
    /// Group boundaries (None: all rows, one dense weight).
    pub offsets: Option<&'a Offsets<B>>,
    /// Groups G (1 when dense).
    pub groups: usize,
    /// Rows R, N, K.
    pub rows: usize,
    /// Output rows of each matrix.
    pub n: usize,
    /// Columns of each matrix.
    pub k: usize,
    /// Whether the bias gradient is asked for.
    pub bias: bool,
    /// Shape of dw.
    pub w_shape: Vec<usize>,
    /// Shape of db.
    pub b_shape: Vec<usize>,
    /// Kernel parameters.
    pub params: GradMatmulParams,
}

/// What [`WeightGradOp`] returns.
pub struct WeightGrad<B: Device> {
    /// `[G, N, K]` or `[N, K]`.
    pub dw: Tensor<B>,
    /// `[G, N]` or `[N]`, when asked for.
    pub db: Option<Tensor<B>>,
}

impl<'a, B: Device> WeightGradOp<'a, B> {
    /// Checks dy and x (same rows) and the offsets; `groups` is the weight stack's G.
    pub fn check(
        b: &B,
        dy: &'a Tensor<B>,
        x: &'a Tensor<B>,
        offsets: Option<&'a Offsets<B>>,
        bias: bool,
    ) -> Result<Self> {
        let (rows, n) = f32_matrix("output gradient", dy)?;
        let (xr, k) = f32_matrix("forward input", x)?;
        if xr != rows {
            return Err(Error::shape("forward input", format!("[{rows}, in] (the rows of dy)"), x.shape()));
        }
        let groups = offsets.map_or(1, |o| o.groups().saturating_sub(o.tail()));
        check_offsets(offsets, groups, rows, "output gradient rows")?;
        let (w_shape, b_shape) =
            if offsets.is_some() { (vec![groups, n, k], vec![groups, n]) } else { (vec![n, k], vec![n]) };
        output(b, "weight gradient", &w_shape, DType::F32)?;
        let params = GradMatmulParams { bias: bias as u32, ..grad_matmul(rows, n, k, groups, offsets.is_some())? };
        Ok(WeightGradOp { dy, x, offsets, groups, rows, n, k, bias, w_shape, b_shape, params })
    }
}

/// Which activation a gradient goes through.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ActGradKind {
    /// `y = act(pre)`: `d_pre = dy · act'(pre)`.
    Activation(Activation),
    /// `y = act(gate) · up` with `pre = [gate | up]`: `d_gate = dy · up · act'(gate)`,
    /// `d_up = dy · act(gate)`.
    Glu(Activation),
    /// The clamped GLU `y = act_α(g) · (u + up_offset)`, `g = min(gate, limit)`, `u =
    /// clamp(up, −limit, limit)` ([`GluClamp`]): `d_gate = dy · (u + up_offset) ·
    /// act_α'(g)` where `gate < limit`, `d_up = dy · act_α(g)` where `−limit < up < limit`,
    /// 0 elsewhere (torch's clamp passes no gradient at or past its bounds).
    GluClamped(Activation, GluClamp),
}

impl ActGradKind {
    /// The gradient kind of a GLU with an optional clamp (`ExpertKind::Glu`'s fields).
    pub fn glu(activation: Activation, clamp: Option<GluClamp>) -> Self {
        match clamp {
            Some(c) => ActGradKind::GluClamped(activation, c),
            None => ActGradKind::Glu(activation),
        }
    }
}

/// The gradient through an activation or GLU, from the kept pre-activation. Checked.
#[non_exhaustive]
pub struct ActGradOp<'a, B: Device> {
    /// Which activation.
    pub kind: ActGradKind,
    /// Gradient of the activation's output `[R, I]`.
    pub dy: &'a Tensor<B>,
    /// The pre-activation `[R, N]` (N = I, or 2I for GLU).
    pub pre: &'a Tensor<B>,
    /// Output shape `[R, N]`.
    pub out_shape: [usize; 2],
    /// Kernel parameters (`rows` R, `cols` I, `act`, `glu`, and a GLU's clamp).
    pub params: GradParams,
}

impl<'a, B: Device> ActGradOp<'a, B> {
    /// Checks the shapes.
    pub fn check(b: &B, kind: ActGradKind, dy: &'a Tensor<B>, pre: &'a Tensor<B>) -> Result<Self> {
        let (r, n) = f32_matrix("pre-activation", pre)?;
        let (i, act, glu, clamp) = match kind {
            ActGradKind::Activation(a) => (n, a, 0, None),
            ActGradKind::Glu(_) | ActGradKind::GluClamped(..) if n % 2 != 0 => {
                return Err(Error::shape("pre-activation", "[rows, 2·ffn] (gate, then up)", pre.shape()));
            }
            ActGradKind::Glu(a) => (n / 2, a, 1, None),
            ActGradKind::GluClamped(a, c) => {
                c.check(a)?;
                (n / 2, a, 1, Some(c))
            }
        };
        f32_shaped("activation output gradient", dy, &[r, i])?;
        output(b, "pre-activation gradient", &[r, n], DType::F32)?;
        super::matmul::elements_u32("pre-activation gradient", r, n)?;
        let params = GradParams {
            rows: to_u32("rows", r)?,
            cols: to_u32("activation width", i)?,
            act: act.kernel_code(),
            glu,
            clamp: clamp.is_some() as u32,
            limit: clamp.map_or(0.0, |c| c.limit),
            alpha: clamp.map_or(0.0, |c| c.alpha),
            up_offset: clamp.map_or(0.0, |c| c.up_offset),
            ..Default::default()
        };
        Ok(ActGradOp { kind, dy, pre, out_shape: [r, n], params })
    }
}

/// The column sum `dy [S, M]` → `[M]`, `Σ_s dy[s]` in row order: the gradient of
/// `add_bias`'s bias. No other op computes it alone: `weight_grad` with `bias` of a dense
/// product computes this same sum (its `db`) but beside a weight gradient that needs the
/// forward's input, so this op runs only that sum, on the same kernels (`bias_grad` of
/// shaders/grad_matmul.wgsl and kernels/grad_matmul.cu, one dense group). Checked.
#[non_exhaustive]
pub struct SumRowsOp<'a, B: Device> {
    /// The rows to sum `[S, M]`, f32.
    pub dy: &'a Tensor<B>,
    /// Rows S.
    pub rows: usize,
    /// Columns M (the output's length).
    pub cols: usize,
    /// Kernel parameters of `bias_grad` (dense: one group of all rows, `n` = M).
    pub params: GradMatmulParams,
}

impl<'a, B: Device> SumRowsOp<'a, B> {
    /// Checks that `dy` is an f32 matrix whose sum fits the device.
    pub fn check(b: &B, dy: &'a Tensor<B>) -> Result<Self> {
        let (rows, cols) = f32_matrix("row sum input", dy)?;
        output(b, "row sum", &[cols], DType::F32)?;
        super::fits_i32("row sum rows", rows)?;
        let params = GradMatmulParams { bias: 1, ..grad_matmul(rows, cols, 0, 1, false)? };
        Ok(SumRowsOp { dy, rows, cols, params })
    }
}

/// The gradient of `combine` for the tokens in `tokens`: `d_yp[rows[t, j]] = weights[t, j]
/// · dy[t − t0]` (rows no route of the range names are zero) and `d_weights[t, j] =
/// dy[t − t0] · yp[rows[t, j]]` (0 for dropped routes and tokens outside the range).
#[non_exhaustive]
pub struct CombineGradOp<'a, B: Device> {
    /// Gradient of the combined output `[tokens.len(), M]`.
    pub dy: &'a Tensor<B>,
    /// The expert outputs the forward combined `[rows.bound, M]`.
    pub yp: &'a Tensor<B>,
    /// The row of every route.
    pub rows: &'a RouteRows<B>,
    /// The combine weights `[S, k]`.
    pub weights: &'a Tensor<B>,
    /// The tokens combined.
    pub tokens: Range<usize>,
    /// Kernel parameters (`rows` S, `cols` M, `k`, `t0`..`t1`, `bound`).
    pub params: GradParams,
}

/// What [`CombineGradOp`] returns.
pub struct CombineGrad<B: Device> {
    /// Gradient of the expert outputs, `[rows.bound, M]`.
    pub d_yp: Tensor<B>,
    /// Gradient of the combine weights, `[S, k]`.
    pub d_weights: Tensor<B>,
}

impl<'a, B: Device> CombineGradOp<'a, B> {
    /// Checks the operands as [`crate::ops::CombineOp`] does, and dy against the range.
    pub fn check(
        b: &B,
        dy: &'a Tensor<B>,
        yp: &'a Tensor<B>,
        rows: &'a RouteRows<B>,
        weights: &'a Tensor<B>,
        tokens: Range<usize>,
    ) -> Result<Self> {
        let fwd = super::CombineOp::check(b, yp, rows, weights, tokens.clone())?;
        f32_shaped("combined output gradient", dy, &fwd.out_shape)?;
        output(b, "expert output gradient", yp.shape(), DType::F32)?;
        let m = yp.shape()[1];
        super::matmul::elements_u32("expert output gradient", rows.bound(), m)?;
        let params = GradParams {
            rows: to_u32("tokens", rows.tokens())?,
            cols: to_u32("hidden size", m)?,
            k: to_u32("k", rows.k())?,
            t0: to_u32("first token", tokens.start)?,
            t1: to_u32("end token", tokens.end)?,
            bound: to_u32("grouped rows", rows.bound())?,
            ..Default::default()
        };
        Ok(CombineGradOp { dy, yp, rows, weights, tokens, params })
    }
}

/// The per-expert part of a router loss's gradient: the losses the engine knows
/// (DeepSpeed's `l_aux`, the HF load-balancing loss, DeepSeek's expert balance) are all
/// `Σₑ cₑ · mean_s(scores)ₑ` with constant cₑ, so `d scores[s, e] = scale · counts[e]`.
pub struct AuxGrad<'a, B: Device> {
    /// Counts `[E]` i32 (all routes, or first choices for DeepSpeed top-2).
    pub counts: &'a Tensor<B>,
    /// The factor, `coef · c / (S · S)` with the loss's own constant c.
    pub scale: f32,
}

/// What the route's backward needs to know of the forward's weights.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RouteGradSpec {
    /// Score function.
    pub score: ScoreFn,
    /// The forward's choice rule: sparsemixer weights are masked softmaxes of the logits,
    /// differentiated as such; the other rules only choose.
    pub choice: Choice,
    /// Normalisation of the chosen weights (route op).
    pub normalize: Normalize,
    /// Route scale.
    pub scale: f32,
    /// Whether the plan renormalised the kept weights (DeepSpeed top-2 / top-k).
    pub renormalize_kept: bool,
}

/// The router's backward, in f32: from the gradient of the plan's combine weights (and
/// a router loss) to the gradient of the logits `[S, E]`. Through DeepSpeed's kept-route
/// renormalisation (`/ max(Σ, eps)`), the route scale, the route normalisation
/// (`/ Σ`, `/ (Σ + eps)`, `/ max(Σ, floor)`, `/ ‖w‖ₚ`), the top-k gather and the softmax,
/// sigmoid or sqrt-softplus; for sparsemixer, through each weight's masked softmax of the
/// logits (the masks are piecewise constant: a masked logit takes no gradient from it).
/// Routes the plan dropped, and masked routes (weight 0), take no gradient; the
/// correction bias and the choice noise are not differentiated (they only choose).
#[non_exhaustive]
pub struct RouteGradOp<'a, B: Device> {
    /// Gradient of the plan's combine weights `[S, k]`.
    pub d_weights: &'a Tensor<B>,
    /// The forward's routes.
    pub routes: &'a Routes<B>,
    /// The forward's plan (kept flags, final weights).
    pub plan: &'a Plan<B>,
    /// The router logits `[S, E]` (for the z-loss).
    pub logits: &'a Tensor<B>,
    /// The forward's weight rules.
    pub spec: RouteGradSpec,
    /// A router loss on the scores.
    pub aux: Option<AuxGrad<'a, B>>,
    /// Coefficient of the Switch z-loss (0: none).
    pub z_coef: f32,
    /// Tokens S.
    pub tokens: usize,
    /// Routes k.
    pub k: usize,
    /// Experts E.
    pub experts: usize,
    /// Kernel parameters.
    pub params: RouteGradParams,
}

impl<'a, B: Device> RouteGradOp<'a, B> {
    /// Checks the shapes and the spec (as the forward checks it: the normalisation's
    /// constant, what sparsemixer takes); a router loss on other scores than the softmax
    /// is refused (the losses are defined on the softmax).
    #[allow(clippy::too_many_arguments)]
    pub fn check(
        b: &B,
        d_weights: &'a Tensor<B>,
        routes: &'a Routes<B>,
        plan: &'a Plan<B>,
        logits: &'a Tensor<B>,
        spec: RouteGradSpec,
        aux: Option<AuxGrad<'a, B>>,
        z_coef: f32,
    ) -> Result<Self> {
        let (s, k, e) = (routes.tokens(), routes.k(), routes.num_experts());
        f32_shaped("combine weight gradient", d_weights, &[s, k])?;
        f32_shaped("router logits", logits, &[s, e])?;
        if plan.tokens() != s || plan.k() != k {
            return Err(Error::Misuse("route backward with the plan of another batch".into()));
        }
        if let Some(a) = &aux {
            i32_shaped("router loss counts", a.counts, &[e])?;
            if !a.scale.is_finite() {
                return Err(Error::config("aux_coef", format!("must be finite, got {}", a.scale)));
            }
            if spec.score != ScoreFn::Softmax {
                return Err(Error::unsupported(
                    b.name(),
                    format!(
                        "a router loss on {:?} scores (the load-balancing losses are defined on the softmax)",
                        spec.score
                    ),
                ));
            }
        }
        if !z_coef.is_finite() {
            return Err(Error::config("z_loss_coef", format!("must be finite, got {z_coef}")));
        }
        if !spec.scale.is_finite() {
            return Err(Error::config("routed_scaling_factor", format!("must be finite, got {}", spec.scale)));
        }
        output(b, "logit gradient", &[s, e], DType::F32)?;
        // The backward kernels hold a token's scores as the forward's route kernels do.
        if let Some(max) = b.capabilities().max_route_experts {
            if e > max {
                return Err(Error::unsupported(b.name(), format!("{e} experts (its route kernel takes up to {max})")));
            }
        }
        spec.normalize.check()?;
        super::route::check_sparse_mixer(spec.choice, k, spec.score, spec.normalize)?;
        let (normalize, eps, p_norm) = spec.normalize.codes();
        let params = RouteGradParams {
            s: to_u32("tokens", s)?,
            e: to_u32("experts", e)?,
            k: to_u32("k", k)?,
            score_fn: spec.score.code(),
            normalize,
            choice: spec.choice.code(),
            p_norm,
            jitter_eps: spec.choice.jitter_eps(),
            renorm_kept: spec.renormalize_kept as u32,
            has_aux: aux.is_some() as u32,
            eps,
            scale: spec.scale,
            aux_scale: aux.as_ref().map_or(0.0, |a| a.scale),
            z_coef,
            ..Default::default()
        };
        Ok(RouteGradOp { d_weights, routes, plan, logits, spec, aux, z_coef, tokens: s, k, experts: e, params })
    }
}

/// The gradient of DeepSpeed's residual mix `y = moe · c₀ + mlp · c₁`, `c = softmax(coef)`:
/// `d_moe = dy · c₀`, `d_mlp = dy · c₁` and `d_coef [R, 2]`. Checked.
#[non_exhaustive]
pub struct MixGradOp<'a, B: Device> {
    /// Gradient of the mix `[R, M]`.
    pub dy: &'a Tensor<B>,
    /// The routed output `[R, M]`.
    pub moe: &'a Tensor<B>,
    /// The residual MLP's output `[R, M]`.
    pub mlp: &'a Tensor<B>,
    /// The coefficient logits `[R, 2]`.
    pub coef: &'a Tensor<B>,
    /// Kernel parameters (`rows` R, `cols` M).
    pub params: GradParams,
}

/// The parameter block of a row op over `[r, m]`.
fn rows_params(r: usize, m: usize) -> Result<GradParams> {
    super::matmul::elements_u32("row op", r, m)?;
    Ok(GradParams { rows: to_u32("rows", r)?, cols: to_u32("hidden size", m)?, ..Default::default() })
}

/// What [`MixGradOp`] returns.
pub struct MixGrad<B: Device> {
    /// `[R, M]`.
    pub d_moe: Tensor<B>,
    /// `[R, M]`.
    pub d_mlp: Tensor<B>,
    /// `[R, 2]`.
    pub d_coef: Tensor<B>,
}

impl<'a, B: Device> MixGradOp<'a, B> {
    /// Checks the shapes.
    pub fn check(
        b: &B,
        dy: &'a Tensor<B>,
        moe: &'a Tensor<B>,
        mlp: &'a Tensor<B>,
        coef: &'a Tensor<B>,
    ) -> Result<Self> {
        let (r, m) = f32_matrix("mix output gradient", dy)?;
        f32_shaped("moe output", moe, &[r, m])?;
        f32_shaped("residual mlp output", mlp, &[r, m])?;
        f32_shaped("coefficient logits", coef, &[r, 2])?;
        output(b, "mix gradient", &[r, m], DType::F32)?;
        Ok(MixGradOp { dy, moe, mlp, coef, params: rows_params(r, m)? })
    }
}

/// The gradient of the gated shared-expert add `y = a + sigmoid(g) · s`: `d_s = dy ·
/// sigmoid(g)` and `d_g [R, 1] = sigmoid'(g) · Σ_m dy · s`. (`d_a` is `dy` itself.)
#[non_exhaustive]
pub struct GatedAddGradOp<'a, B: Device> {
    /// Gradient of the sum `[R, M]`.
    pub dy: &'a Tensor<B>,
    /// The shared experts' output `[R, M]`.
    pub shared: &'a Tensor<B>,
    /// The gate logits `[R, 1]`.
    pub gate: &'a Tensor<B>,
    /// Kernel parameters (`rows` R, `cols` M).
    pub params: GradParams,
}

/// What [`GatedAddGradOp`] returns.
pub struct GatedAddGrad<B: Device> {
    /// `[R, M]`.
    pub d_shared: Tensor<B>,
    /// `[R, 1]`.
    pub d_gate: Tensor<B>,
}

impl<'a, B: Device> GatedAddGradOp<'a, B> {
    /// Checks the shapes.
    pub fn check(b: &B, dy: &'a Tensor<B>, shared: &'a Tensor<B>, gate: &'a Tensor<B>) -> Result<Self> {
        let (r, m) = f32_matrix("sum gradient", dy)?;
        f32_shaped("shared expert output", shared, &[r, m])?;
        f32_shaped("shared_expert_gate logits", gate, &[r, 1])?;
        output(b, "shared expert gradient", &[r, m], DType::F32)?;
        Ok(GatedAddGradOp { dy, shared, gate, params: rows_params(r, m)? })
    }
}

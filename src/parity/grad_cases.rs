//! The parity cases of the backward and optimizer ops, one struct per op, compared with
//! the cpu reference like the forward cases in [`super::cases`].

use super::cases::{
    offsets_of, plan_inputs, product_tolerance, rand, weight, Outputs, PlanInputs, ELEMENTWISE_TOL, PRODUCT_TOL,
};
use super::{OpCase, Runner};
use crate::backend::Backend;
use crate::device::Capabilities;
use crate::error::Result;
use crate::expert::{Activation, GluClamp};
use crate::ops::{
    ActGradKind, AuxGrad, CapacityRule, Choice, GroupScore, KeepPolicy, Normalize, Offsets, PlanSpec, RouteGradSpec,
    RouteSpec, ScoreFn, StepKind, StepRule,
};
use crate::tensor::{DType, HostTensor};

/// Rows, then the group offsets (None: a dense product) of a product case.
fn groups_of(counts: &Option<Vec<usize>>, rows_past: usize) -> (usize, Option<Vec<i32>>) {
    match counts {
        Some(c) => (c.iter().sum::<usize>() + rows_past, Some(offsets_of(c))),
        None => (rows_past, None),
    }
}

/// A `[rows, cols]` random matrix, or an empty one.
fn matrix(rows: usize, cols: usize, stream: u32, scale: f32) -> Result<HostTensor> {
    if rows * cols == 0 {
        return HostTensor::f32(&[rows, cols], vec![]);
    }
    Ok(rand(&[rows, cols], stream, scale))
}

/// `linear_dx`: `dy · w[g]`, dense or grouped (with empty groups, rows past the last and a
/// tail of weightless groups).
pub struct LinearDxCase {
    /// What the groups exercise.
    pub what: &'static str,
    /// Rows per group (None: dense, `rows_past` rows).
    pub counts: Option<Vec<usize>>,
    /// Rows past the last group (dense: all rows).
    pub rows_past: usize,
    /// The last groups without weights ([`Offsets::with_tail`]): their rows get zeros.
    pub tail: usize,
    /// Weight storage.
    pub dtype: DType,
}

impl OpCase for LinearDxCase {
    const OP: &'static str = "linear_dx";
    fn name(&self) -> String {
        self.what.into()
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn tolerance(&self, caps: &Capabilities) -> f64 {
        product_tolerance(self.dtype, caps)
    }
    fn run<B: Backend>(&self, b: &B) -> Result<Outputs<B>> {
        let (n, k) = (29, 41);
        let (rows, off) = groups_of(&self.counts, self.rows_past);
        let dy = b.upload(&matrix(rows, n, 40, 1.0)?)?;
        let y = match off {
            Some(off) => {
                let w = rand(&[off.len() - 1 - self.tail, n, k], 41, 0.3);
                let off = Offsets::from_host(b, &off)?.with_tail(self.tail);
                b.linear_dx(&dy, &weight(b, &w, self.dtype)?, Some(&off))?
            }
            None => b.linear_dx(&dy, &weight(b, &rand(&[n, k], 41, 0.3), self.dtype)?, None)?,
        };
        Ok(vec![("dx", y)])
    }
}

/// `weight_grad`: `Σ dyᵀ x` per group, with the bias gradient.
pub struct WeightGradCase {
    /// What the groups exercise.
    pub what: &'static str,
    /// Rows per group (None: dense).
    pub counts: Option<Vec<usize>>,
    /// Rows past the last group (dense: all rows).
    pub rows_past: usize,
    /// The last groups without weights: no gradient of theirs, their rows unread.
    pub tail: usize,
}

impl OpCase for WeightGradCase {
    const OP: &'static str = "weight_grad";
    fn name(&self) -> String {
        format!("{} (+ bias)", self.what)
    }
    fn tolerance(&self, _: &Capabilities) -> f64 {
        PRODUCT_TOL
    }
    fn run<B: Backend>(&self, b: &B) -> Result<Outputs<B>> {
        let (n, k) = (19, 37);
        let (rows, off) = groups_of(&self.counts, self.rows_past);
        let dy = b.upload(&matrix(rows, n, 42, 1.0)?)?;
        let x = b.upload(&matrix(rows, k, 43, 1.0)?)?;
        let off = off.map(|o| Offsets::from_host(b, &o).map(|o| o.with_tail(self.tail))).transpose()?;
        let g = b.weight_grad(&dy, &x, off.as_ref(), true)?;
        let db = g.db.ok_or_else(|| crate::Error::Internal("no bias gradient".into()))?;
        Ok(vec![("dw", g.dw), ("db", db)])
    }
}

/// `act_grad` through one activation or GLU.
pub struct ActGradCase(pub ActGradKind);

impl OpCase for ActGradCase {
    const OP: &'static str = "act_grad";
    fn name(&self) -> String {
        match self.0 {
            ActGradKind::Activation(a) => a.name().into(),
            ActGradKind::Glu(a) => format!("{} GLU", a.name()),
            ActGradKind::GluClamped(a, c) => {
                format!("{} GLU clamped to {} (α {}, up + {})", a.name(), c.limit, c.alpha, c.up_offset)
            }
        }
    }
    fn tolerance(&self, _: &Capabilities) -> f64 {
        ELEMENTWISE_TOL
    }
    fn run<B: Backend>(&self, b: &B) -> Result<Outputs<B>> {
        let (r, i) = (23, 35);
        let n = if matches!(self.0, ActGradKind::Activation(_)) { i } else { 2 * i };
        let pre = b.upload(&rand(&[r, n], 44, 4.0))?;
        let dy = b.upload(&rand(&[r, i], 45, 1.0))?;
        Ok(vec![("d_pre", b.act_grad(self.0, &dy, &pre)?)])
    }
}

/// `sum_rows`: the column sum of `[rows, cols]` (the gradient of `add_bias`'s bias).
pub struct SumRowsCase(pub usize, pub usize);

impl OpCase for SumRowsCase {
    const OP: &'static str = "sum_rows";
    fn name(&self) -> String {
        format!("[{}, {}]", self.0, self.1)
    }
    fn tolerance(&self, _: &Capabilities) -> f64 {
        PRODUCT_TOL
    }
    fn run<B: Backend>(&self, b: &B) -> Result<Outputs<B>> {
        Ok(vec![("sum", b.sum_rows(&b.upload(&matrix(self.0, self.1, 63, 1.0)?)?)?)])
    }
}

/// The backward of `permute_scaled` from the existing ops: `dx = combine(dxp, rows, w)`
/// and `d_weights = combine_grad(x, dxp, rows, w).d_weights` (x[t] · dxp[rows[t, j]]).
pub struct PermuteScaledGradCase(pub PlanInputs);

impl OpCase for PermuteScaledGradCase {
    const OP: &'static str = "permute_scaled (backward)";
    fn name(&self) -> String {
        self.0.what.into()
    }
    fn tolerance(&self, _: &Capabilities) -> f64 {
        PRODUCT_TOL
    }
    fn run<B: Backend>(&self, b: &B) -> Result<Outputs<B>> {
        let (s, m) = (self.0.s, 10);
        let x = b.upload(&rand(&[s, m], 64, 1.0))?;
        let dxp = b.upload(&rand(&[s * self.0.k, m], 65, 1.0))?;
        self.0.with_plan(b, |p| {
            let rows = p.route_rows();
            let dx = b.combine(&dxp, &rows, &p.weights, 0..s)?;
            let d_w = b.combine_grad(&x, &dxp, &rows, &p.weights, 0..s)?.d_weights;
            Ok(vec![("dx", dx), ("d_weights", d_w)])
        })
    }
}

/// The backward of `pass_rows` is itself: `d_x = pass_rows(0, d)` (the range's rows of the
/// output gradient) and `d_y = pass_rows(d, 0)` (the others).
pub struct PassRowsGradCase;

impl OpCase for PassRowsGradCase {
    const OP: &'static str = "pass_rows (backward)";
    fn name(&self) -> String {
        "4 experts and 2 identity groups, rows past the last".into()
    }
    fn tolerance(&self, _: &Capabilities) -> f64 {
        0.0
    }
    fn run<B: Backend>(&self, b: &B) -> Result<Outputs<B>> {
        let (counts, m) = ([3usize, 0, 5, 2, 4, 1], 9);
        let rows = counts.iter().sum::<usize>() + 2;
        let d = b.upload(&rand(&[rows, m], 66, 1.0))?;
        let zero = b.upload(&HostTensor::f32(&[rows, m], vec![0.0; rows * m])?)?;
        let off = Offsets::from_host(b, &offsets_of(&counts))?;
        Ok(vec![("d_x", b.pass_rows(&zero, &d, &off, 4)?), ("d_y", b.pass_rows(&d, &zero, &off, 4)?)])
    }
}

/// `combine_grad` of a plan's rows and weights, every token or the middle third.
pub struct CombineGradCase {
    /// The plan.
    pub plan: PlanInputs,
    /// Tokens `s / 3 .. 2 s / 3` only.
    pub share: bool,
}

impl OpCase for CombineGradCase {
    const OP: &'static str = "combine_grad";
    fn name(&self) -> String {
        format!("{}{}", self.plan.what, if self.share { ", middle third of the tokens" } else { "" })
    }
    fn tolerance(&self, _: &Capabilities) -> f64 {
        PRODUCT_TOL
    }
    fn run<B: Backend>(&self, b: &B) -> Result<Outputs<B>> {
        let (s, m) = (self.plan.s, 10);
        let yp = b.upload(&rand(&[s * self.plan.k, m], 46, 1.0))?;
        let tokens = if self.share { s / 3..2 * s / 3 } else { 0..s };
        let dy = b.upload(&matrix(tokens.len(), m, 47, 1.0)?)?;
        self.plan.with_plan(b, |p| {
            let g = b.combine_grad(&dy, &yp, &p.route_rows(), &p.weights, tokens)?;
            Ok(vec![("d_yp", g.d_yp), ("d_weights", g.d_weights)])
        })
    }
}

/// `route_grad`: the router's backward through a route and a plan.
pub struct RouteGradCase {
    /// What the case exercises.
    pub what: &'static str,
    /// Tokens, experts, routes per token.
    pub shape: (usize, usize, usize),
    /// Score function.
    pub score: ScoreFn,
    /// Choice rule.
    pub choice: Choice,
    /// With a correction bias in the choice.
    pub bias: bool,
    /// Route normalisation.
    pub normalize: Normalize,
    /// Route scale.
    pub scale: f32,
    /// The logits are uniform in [-logit_scale, logit_scale).
    pub logit_scale: f32,
    /// Capacity (drops routes when limited).
    pub capacity: CapacityRule,
    /// DeepSpeed's kept-route renormalisation.
    pub renorm: bool,
    /// With a router loss on the scores and a z-loss.
    pub losses: bool,
}

impl OpCase for RouteGradCase {
    const OP: &'static str = "route_grad";
    fn name(&self) -> String {
        format!("{}{}", self.what, if self.losses { ", with router losses" } else { "" })
    }
    fn tolerance(&self, _: &Capabilities) -> f64 {
        ELEMENTWISE_TOL * 2.0
    }
    fn run<B: Backend>(&self, b: &B) -> Result<Outputs<B>> {
        let (s, e, k) = self.shape;
        let logits = b.upload(&rand(&[s, e], 48, self.logit_scale))?;
        let bias = b.upload(&rand(&[e], 49, 0.5))?;
        let spec = RouteSpec {
            k,
            score: self.score,
            choice: self.choice,
            bias: self.bias.then_some(&bias),
            choice_noise: None,
            normalize: self.normalize,
            scale: self.scale,
        };
        let routes = b.route(&logits, &spec)?;
        let keep = if self.choice == Choice::DeepSpeedTop2 { KeepPolicy::RankMajor } else { KeepPolicy::TokenOrder };
        let plan_spec = PlanSpec {
            num_experts: e,
            capacity: self.capacity,
            keep,
            used_token: None,
            group_size: None,
            renormalize_kept: self.renorm,
        };
        let plan = b.plan(&routes, &plan_spec)?;
        let d_w = b.upload(&rand(&[s, k], 50, 1.0))?;
        let grad_spec = RouteGradSpec {
            score: self.score,
            choice: self.choice,
            normalize: self.normalize,
            scale: self.scale,
            renormalize_kept: self.renorm,
        };
        // The router losses are defined on the softmax (the backward refuses others).
        let aux =
            (self.losses && self.score == ScoreFn::Softmax).then_some(AuxGrad { counts: &plan.counts, scale: 0.01 });
        let z = if self.losses { 0.001 } else { 0.0 };
        Ok(vec![("d_logits", b.route_grad(&d_w, &routes, &plan, &logits, grad_spec, aux, z)?)])
    }
}

/// `mix_grad`: DeepSpeed's residual mix backward.
pub struct MixGradCase;

impl OpCase for MixGradCase {
    const OP: &'static str = "mix_grad";
    fn name(&self) -> String {
        "residual coefficient mix".into()
    }
    fn tolerance(&self, _: &Capabilities) -> f64 {
        ELEMENTWISE_TOL
    }
    fn run<B: Backend>(&self, b: &B) -> Result<Outputs<B>> {
        let (r, m) = (21, 33);
        let up = |stream, cols| b.upload(&rand(&[r, cols], stream, 1.0));
        let g = b.mix_grad(&up(51, m)?, &up(52, m)?, &up(53, m)?, &up(54, 2)?)?;
        Ok(vec![("d_moe", g.d_moe), ("d_mlp", g.d_mlp), ("d_coef", g.d_coef)])
    }
}

/// `gated_add_grad`: the sigmoid-gated shared experts' backward.
pub struct GatedAddGradCase;

impl OpCase for GatedAddGradCase {
    const OP: &'static str = "gated_add_grad";
    fn name(&self) -> String {
        "sigmoid-gated shared experts".into()
    }
    fn tolerance(&self, _: &Capabilities) -> f64 {
        ELEMENTWISE_TOL
    }
    fn run<B: Backend>(&self, b: &B) -> Result<Outputs<B>> {
        let (r, m) = (21, 33);
        let up = |stream, cols| b.upload(&rand(&[r, cols], stream, 1.0));
        let g = b.gated_add_grad(&up(55, m)?, &up(56, m)?, &up(57, 1)?)?;
        Ok(vec![("d_shared", g.d_shared), ("d_gate", g.d_gate)])
    }
}

/// `optim_step`: one step of one rule at step `step` (moments from earlier steps given).
pub struct OptimStepCase {
    /// What the case exercises.
    pub what: &'static str,
    /// The rule (its `step` says whether state is given).
    pub rule: StepRule,
}

impl OpCase for OptimStepCase {
    const OP: &'static str = "optim_step";
    fn name(&self) -> String {
        self.what.into()
    }
    fn tolerance(&self, _: &Capabilities) -> f64 {
        ELEMENTWISE_TOL
    }
    fn run<B: Backend>(&self, b: &B) -> Result<Outputs<B>> {
        let shape = [7, 45];
        let p = b.upload(&rand(&shape, 58, 1.0))?;
        let g = b.upload(&rand(&shape, 59, 0.1))?;
        let m = b.upload(&rand(&shape, 60, 0.01))?;
        let v = rand(&shape, 61, 1e-3);
        let v = b.upload(&HostTensor::f32(&shape, v.as_f32("v")?.iter().map(|x| x.abs()).collect())?)?;
        let r = self.rule;
        let m_in = (r.has_m() && !(r.kind == StepKind::Sgd && r.step == 1)).then_some(&m);
        let out = b.optim_step(&p, &g, m_in, r.has_v().then_some(&v), r)?;
        let mut outs = vec![("param", out.param)];
        outs.extend(out.m.map(|t| ("m", t)));
        outs.extend(out.v.map(|t| ("v", t)));
        Ok(outs)
    }
}

/// `sum_squares` of a tensor.
pub struct SumSquaresCase(pub usize);

impl OpCase for SumSquaresCase {
    const OP: &'static str = "sum_squares";
    fn name(&self) -> String {
        format!("{} elements", self.0)
    }
    fn tolerance(&self, _: &Capabilities) -> f64 {
        PRODUCT_TOL
    }
    fn run<B: Backend>(&self, b: &B) -> Result<Outputs<B>> {
        let x = if self.0 == 0 { HostTensor::f32(&[0], vec![])? } else { rand(&[self.0], 62, 1.0) };
        Ok(vec![("sum", b.sum_squares(&b.upload(&x)?)?)])
    }
}

fn rule(kind: StepKind, step: u64) -> StepRule {
    StepRule {
        kind,
        lr: 0.01,
        weight_decay: 0.0,
        momentum: 0.0,
        dampening: 0.0,
        nesterov: false,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        step,
        grad_scale: 1.0,
    }
}

/// Runs every backward and optimizer case.
pub fn run_all<R: Backend, C: Backend>(t: &mut Runner<'_, R, C>) {
    let products: [(&str, Option<Vec<usize>>, usize, usize); 5] = [
        ("dense", None, 37, 0),
        ("odd groups, two empty", Some(vec![0, 37, 1, 0, 70]), 0, 0),
        ("rows past the last group", Some(vec![5, 9]), 6, 0),
        ("no rows", Some(vec![0, 0, 0]), 0, 0),
        ("3 experts, then 2 identity groups in the tail", Some(vec![6, 0, 40, 11, 3]), 4, 2),
    ];
    for (what, counts, rows_past, tail) in &products {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            t.check(&LinearDxCase { what, counts: counts.clone(), rows_past: *rows_past, tail: *tail, dtype });
        }
        t.check(&WeightGradCase { what, counts: counts.clone(), rows_past: *rows_past, tail: *tail });
    }
    t.all(&Activation::ALL.map(|a| ActGradCase(ActGradKind::Activation(a))));
    t.all(&Activation::ALL.map(|a| ActGradCase(ActGradKind::Glu(a))));
    // Pre-activations in [-4, 4): the clamps bite on both sides.
    t.all(&[
        ActGradCase(ActGradKind::GluClamped(Activation::Silu, GluClamp::gpt_oss(2.5, 1.702))),
        ActGradCase(ActGradKind::GluClamped(Activation::Silu, GluClamp::deepseek_v4(3.0))),
        ActGradCase(ActGradKind::GluClamped(Activation::Gelu, GluClamp::deepseek_v4(2.0))),
        ActGradCase(ActGradKind::GluClamped(Activation::GeluTanh, GluClamp { limit: 1.5, alpha: 1.0, up_offset: 0.5 })),
        ActGradCase(ActGradKind::GluClamped(Activation::Relu, GluClamp { limit: 3.5, alpha: 1.0, up_offset: -1.0 })),
    ]);
    t.all(&[SumRowsCase(0, 7), SumRowsCase(1, 33), SumRowsCase(37, 70), SumRowsCase(300, 5)]);
    t.all(&plan_inputs().into_iter().map(PermuteScaledGradCase).collect::<Vec<_>>());
    t.check(&PassRowsGradCase);
    for share in [false, true] {
        t.all(&plan_inputs().into_iter().map(|plan| CombineGradCase { plan, share }).collect::<Vec<_>>());
    }
    let ds = |k_prime| CapacityRule::DeepSpeed { factor: 1.0, k_prime, min_capacity: 1 };
    let base = RouteGradCase {
        what: "softmax top-2 renormalised (Mixtral)",
        shape: (19, 8, 2),
        score: ScoreFn::Softmax,
        choice: Choice::TopK,
        bias: false,
        normalize: Normalize::Sum,
        scale: 1.0,
        logit_scale: 3.0,
        capacity: CapacityRule::Unlimited,
        renorm: false,
        losses: false,
    };
    let cases = [
        RouteGradCase { ..base },
        RouteGradCase { losses: true, ..base },
        RouteGradCase {
            what: "DeepSpeed top-1 with capacity drops",
            shape: (19, 4, 1),
            normalize: Normalize::None,
            capacity: ds(1),
            losses: true,
            ..base
        },
        RouteGradCase {
            what: "DeepSpeed top-2, drops, kept renormalised",
            shape: (19, 4, 2),
            choice: Choice::DeepSpeedTop2,
            normalize: Normalize::None,
            capacity: ds(2),
            renorm: true,
            ..base
        },
        RouteGradCase {
            what: "DeepSpeed top-3, drops, kept renormalised",
            shape: (17, 6, 3),
            normalize: Normalize::None,
            capacity: ds(3),
            renorm: true,
            losses: true,
            ..base
        },
        RouteGradCase {
            what: "DeepSeek-V3: sigmoid, groups, Σ + 1e-20, scale 2.5",
            shape: (9, 16, 4),
            score: ScoreFn::Sigmoid,
            choice: Choice::GroupLimited { n_group: 4, topk_group: 2, group_score: GroupScore::SumTop2 },
            bias: true,
            normalize: Normalize::SumPlus(1e-20),
            scale: 2.5,
            ..base
        },
        RouteGradCase {
            what: "DeepSeek-V2: max groups, masked routes, scale 16",
            shape: (9, 8, 5),
            choice: Choice::GroupLimited { n_group: 4, topk_group: 2, group_score: GroupScore::Max },
            normalize: Normalize::None,
            scale: 16.0,
            ..base
        },
        RouteGradCase {
            what: "softmax with a correction bias, top-3, Σ",
            shape: (19, 8, 3),
            bias: true,
            losses: true,
            ..base
        },
        RouteGradCase {
            what: "DeepSeek-V4: sqrt-softplus, bias, Σ + 1e-20, scale 1.5",
            shape: (19, 16, 6),
            score: ScoreFn::SqrtSoftplus,
            bias: true,
            normalize: Normalize::SumPlus(1e-20),
            scale: 1.5,
            ..base
        },
        RouteGradCase {
            what: "sqrt-softplus, logits in ±30 (both thresholds), drops, kept renormalised",
            shape: (19, 8, 3),
            score: ScoreFn::SqrtSoftplus,
            logit_scale: 30.0,
            capacity: ds(3),
            renorm: true,
            ..base
        },
        RouteGradCase {
            what: "ERNIE-4.5: softmax, bias, Σ floored at 1e-12",
            shape: (19, 8, 2),
            bias: true,
            normalize: Normalize::SumFloor(1e-12),
            losses: true,
            ..base
        },
        // Top-2 sums of these softmaxes fall on both sides of the floor.
        RouteGradCase {
            what: "a floor that binds for some tokens (0.6)",
            shape: (19, 8, 2),
            normalize: Normalize::SumFloor(0.6),
            ..base
        },
        // All-zero logits: softmax scores of exactly 1/8, top-2 sums exactly the floor,
        // where the floor is a constant divisor (torch's clamp); the bias breaks the ties.
        RouteGradCase {
            what: "a floor equal to every sum (all-zero logits)",
            shape: (7, 8, 2),
            bias: true,
            normalize: Normalize::SumFloor(0.25),
            logit_scale: 0.0,
            ..base
        },
        RouteGradCase {
            what: "DBRX: p-norm, p = 1 (as Σ)",
            shape: (19, 16, 4),
            normalize: Normalize::PNorm(1.0),
            ..base
        },
        RouteGradCase { what: "p-norm, p = 2", shape: (19, 16, 4), normalize: Normalize::PNorm(2.0), ..base },
        RouteGradCase {
            what: "p-norm, p = 1.5, drops",
            shape: (19, 16, 4),
            normalize: Normalize::PNorm(1.5),
            capacity: ds(4),
            ..base
        },
        RouteGradCase {
            what: "PhiMoE sparsemixer, jitter 0.01",
            shape: (19, 16, 2),
            choice: Choice::SparseMixer { jitter_eps: 0.01 },
            normalize: Normalize::None,
            ..base
        },
        RouteGradCase {
            what: "sparsemixer, jitter 0.4, drops, kept renormalised, scale 0.5",
            shape: (19, 8, 2),
            choice: Choice::SparseMixer { jitter_eps: 0.4 },
            normalize: Normalize::None,
            scale: 0.5,
            capacity: ds(2),
            renorm: true,
            losses: true,
            ..base
        },
    ];
    t.all(&cases);
    t.check(&MixGradCase);
    t.check(&GatedAddGradCase);
    let sgd = |step, momentum, nesterov, weight_decay, dampening| StepRule {
        momentum,
        nesterov,
        weight_decay,
        dampening,
        ..rule(StepKind::Sgd, step)
    };
    t.all(&[
        OptimStepCase { what: "SGD", rule: sgd(1, 0.0, false, 0.0, 0.0) },
        OptimStepCase { what: "SGD momentum, first step", rule: sgd(1, 0.9, false, 0.01, 0.0) },
        OptimStepCase { what: "SGD momentum, dampening, weight decay", rule: sgd(3, 0.9, false, 0.01, 0.1) },
        OptimStepCase { what: "SGD Nesterov", rule: sgd(3, 0.9, true, 0.0, 0.0) },
        OptimStepCase { what: "Adam, step 1", rule: rule(StepKind::Adam, 1) },
        OptimStepCase {
            what: "Adam, L2 weight decay, step 5",
            rule: StepRule { weight_decay: 0.1, ..rule(StepKind::Adam, 5) },
        },
        OptimStepCase {
            what: "AdamW, clipped gradient, step 7",
            rule: StepRule { weight_decay: 0.1, grad_scale: 0.5, ..rule(StepKind::AdamW, 7) },
        },
    ]);
    t.all(&[SumSquaresCase(0), SumSquaresCase(1), SumSquaresCase(1000), SumSquaresCase(70_001)]);
}

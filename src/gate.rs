//! The gate: router weights plus a [`GateSpec`], turned into the route and plan ops of the
//! backend. Like DeepSpeed's `TopKGate`, it runs on its own (gate-only golden cases) or
//! inside [`crate::layer::MoeLayer`].

use crate::backend::Backend;
use crate::config::{DeepSeekV2Method, DropPolicy, GateSpec, Mode, NoisyGatePolicy, RouterNorm, RouterScore};
use crate::device::Tensor;
use crate::error::{Error, Result};
use crate::losses::{self, CountsOf, LossCoefs};
use crate::ops::{
    AuxGrad, CapacityRule, Choice, GroupScore, KeepPolicy, Normalize, Plan, PlanSpec, RouteGradSpec, RouteSpec, Routes,
    ScoreFn,
};
use crate::options::GateOptions;
use crate::philox::{streams, NoiseKind};
use crate::report::Report;
use crate::tensor::{DType, HostTensor};

/// Router weights on the device and the policy that uses them.
pub struct Gate<B: Backend> {
    spec: GateSpec,
    num_experts: usize,
    hidden: usize,
    weight: Tensor<B>,
    /// The selection bias (choice only).
    bias: Option<Tensor<B>>,
    /// The router's logit bias (gpt-oss).
    logit_bias: Option<Tensor<B>>,
}

/// The gate's share of a backward pass.
pub struct GateGrads<B: Backend> {
    /// The router weight's gradient `[E, M]`.
    pub weight: Tensor<B>,
    /// The logit bias's gradient `[E]` (gpt-oss routers).
    pub logit_bias: Option<Tensor<B>>,
    /// The gate's share of the input gradient `[S, M]`.
    pub x: Tensor<B>,
}

/// What the gate produced for a batch. Tensors stay on the device.
pub struct GateOutput<B: Backend> {
    /// Router logits `[S, E]` (f32).
    pub logits: Tensor<B>,
    /// Chosen experts, weights and scores.
    pub routes: Routes<B>,
    /// The dispatch plan.
    pub plan: Plan<B>,
    /// `[E + 1]` router reductions (mean scores, z-loss).
    pub router_stats: Tensor<B>,
    /// The multiplicative jitter the gate input took (DeepSpeed Jitter in training): the
    /// backward differentiates through it.
    pub jitter: Option<Tensor<B>>,
    /// How the weights were made from the scores, for the router's backward.
    pub grad_spec: RouteGradSpec,
    gate: GateSpec,
    tokens: usize,
}

impl<B: Backend> GateOutput<B> {
    /// Downloads the per-expert counts and router reductions and computes the losses.
    pub fn report(&self, b: &B) -> Result<Report> {
        let counts = to_i64(b.download(&self.plan.counts)?, "counts")?;
        let first = to_i64(b.download(&self.plan.first_counts)?, "first_counts")?;
        let kept = to_i64(b.download(&self.plan.kept_counts)?, "kept_counts")?;
        let stats = b.download(&self.plan.stats)?;
        let stats = stats.as_i32("plan.stats")?;
        let rs = b.download(&self.router_stats)?;
        let rs = rs.as_f32("router_stats")?;
        let e = counts.len();
        let losses = losses::compute(&self.gate, &counts, &first, &rs[..e], rs[e], self.tokens);
        let capacity = match self.plan.static_capacity() {
            Some(c) => i64::try_from(c).map_err(|_| Error::Internal(format!("capacity {c} past i64")))?,
            None => stats[0] as i64,
        };
        Ok(Report {
            exp_counts: counts,
            kept_counts: kept,
            capacity,
            dropped_routes: stats[1] as i64,
            dropped_tokens: stats[3] as i64,
            masked_routes: stats[2] as i64,
            tokens: self.tokens,
            losses,
        })
    }

    /// DeepSpeed's sparse route form, `[k, S]` each: expert index (−1 where dropped or
    /// masked), slot (0 where dropped), combine weight (0 where dropped).
    pub fn sparse_routes(&self, b: &B) -> Result<(HostTensor, HostTensor, HostTensor)> {
        let (s, k) = (self.routes.tokens(), self.routes.k());
        let ex = b.download(&self.routes.experts)?;
        let ex = ex.as_i32("routes.experts")?;
        let slots = b.download(&self.plan.slots)?;
        let slots = slots.as_i32("plan.slots")?;
        let w = b.download(&self.plan.weights)?;
        let w = w.as_f32("plan.weights")?;
        let mut idx = vec![0i32; k * s];
        let mut loc = vec![0i32; k * s];
        let mut gates = vec![0f32; k * s];
        for t in 0..s {
            for j in 0..k {
                let kept = slots[t * k + j] >= 0;
                idx[j * s + t] = if kept { ex[t * k + j] } else { -1 };
                loc[j * s + t] = if kept { slots[t * k + j] } else { 0 };
                gates[j * s + t] = w[t * k + j];
            }
        }
        Ok((HostTensor::i32(&[k, s], idx)?, HostTensor::i32(&[k, s], loc)?, HostTensor::f32(&[k, s], gates)?))
    }
}

fn to_i64(t: HostTensor, name: &str) -> Result<Vec<i64>> {
    Ok(t.as_i32(name)?.iter().map(|&v| v as i64).collect())
}

impl<B: Backend> Gate<B> {
    /// Uploads the router weight `[E, M]` (and the DeepSeek-V3 correction bias `[E]`);
    /// both must be finite.
    pub fn new(b: &B, spec: GateSpec, weight: &HostTensor, bias: Option<&HostTensor>) -> Result<Self> {
        Self::build(b, spec, weight, bias, None, false)
    }

    /// As [`Gate::new`]; `trainable` uploads the router weight as a plain f32 tensor (the
    /// layout its gradient and optimizer state share) rather than in the backend's
    /// product layout.
    pub(crate) fn build(
        b: &B,
        spec: GateSpec,
        weight: &HostTensor,
        bias: Option<&HostTensor>,
        logit_bias: Option<&HostTensor>,
        trainable: bool,
    ) -> Result<Self> {
        let (num_experts, hidden) = match weight.shape()[..] {
            [e, m] => (e, m),
            _ => return Err(Error::shape("gate.weight", "[experts, hidden]", weight.shape())),
        };
        if num_experts == 0 || hidden == 0 {
            return Err(Error::shape("gate.weight", "[experts > 0, hidden > 0]", weight.shape()));
        }
        spec.validate(num_experts)?;
        weight.as_f32("gate.weight")?;
        weight.check_finite("gate.weight")?;
        if let Some(bias) = bias {
            bias.expect_shape("gate.e_score_correction_bias", &[num_experts])?;
            bias.as_f32("gate.e_score_correction_bias")?;
            bias.check_finite("gate.e_score_correction_bias")?;
        }
        let wants_logit_bias = matches!(&spec, GateSpec::Router(r) if r.logit_bias);
        match (logit_bias, wants_logit_bias) {
            (Some(t), true) => {
                t.expect_shape("router.bias", &[num_experts])?;
                t.as_f32("router.bias")?;
                t.check_finite("router.bias")?;
            }
            (None, false) => {}
            (None, true) => return Err(Error::MissingTensor("router.bias (the router has a logit bias)".into())),
            (Some(_), false) => {
                return Err(Error::UnexpectedTensors(vec!["router.bias (this router has no logit bias)".into()]))
            }
        }
        if let GateSpec::DeepSpeed(g) = &spec {
            if g.k >= 2 && g.noisy_gate_policy == Some(crate::config::NoisyGatePolicy::RSample) {
                tracing::warn!(
                    k = g.k,
                    "noisy_gate_policy RSample has no effect for k >= 2 (DeepSpeed applies it to top-1 only)"
                );
            }
        }
        Ok(Gate {
            spec,
            num_experts,
            hidden,
            weight: if trainable { b.upload(weight)? } else { b.upload_weight(weight, DType::F32)? },
            bias: bias.map(|t| b.upload(t)).transpose()?,
            logit_bias: logit_bias.map(|t| b.upload(t)).transpose()?,
        })
    }

    /// The policy.
    pub fn spec(&self) -> &GateSpec {
        &self.spec
    }

    /// The router weight `[E, M]`, the correction bias and the logit bias, for an
    /// optimizer (or the bias update) to replace.
    #[allow(clippy::type_complexity)]
    pub(crate) fn params_mut(&mut self) -> (&mut Tensor<B>, Option<&mut Tensor<B>>, Option<&mut Tensor<B>>) {
        (&mut self.weight, self.bias.as_mut(), self.logit_bias.as_mut())
    }

    /// The router weight `[E, M]` and the correction bias.
    pub(crate) fn params(&self) -> (&Tensor<B>, Option<&Tensor<B>>) {
        (&self.weight, self.bias.as_ref())
    }

    /// The router's logit bias `[E]` (gpt-oss), a trainable parameter.
    pub(crate) fn logit_bias(&self) -> Option<&Tensor<B>> {
        self.logit_bias.as_ref()
    }

    /// The gate's backward from the gradient of the plan's combine weights `[S, k]` and
    /// the weighted router losses: the router weight's gradient `[E, M]` and the gate's
    /// share of the input gradient `[S, M]`. `x` is the forward's `[S, M]` input; a
    /// jittered forward differentiates through the jitter it kept (the jittered input
    /// feeds the gate only).
    pub fn backward(
        &self,
        b: &B,
        x: &Tensor<B>,
        out: &GateOutput<B>,
        d_weights: &Tensor<B>,
        coefs: &LossCoefs,
    ) -> Result<GateGrads<B>> {
        let aux = losses::score_grad(&self.spec, coefs, out.tokens, self.num_experts)?.map(|(which, scale)| AuxGrad {
            counts: match which {
                CountsOf::All => &out.plan.counts,
                CountsOf::First => &out.plan.first_counts,
            },
            scale: scale as f32,
        });
        let d_logits =
            b.route_grad(d_weights, &out.routes, &out.plan, &out.logits, out.grad_spec, aux, coefs.z_loss as f32)?;
        let gate_in = match &out.jitter {
            Some(j) => b.mul(x, j)?,
            None => x.clone(),
        };
        let wg = b.weight_grad(&d_logits, &gate_in, None, self.logit_bias.is_some())?;
        let dx = b.linear_dx(&d_logits, &self.weight, None)?;
        let dx = match &out.jitter {
            Some(j) => b.mul(&dx, j)?,
            None => dx,
        };
        Ok(GateGrads { weight: wg.dw, logit_bias: wg.db, x: dx })
    }

    /// Routes `x [S, M]`; `seq` is the sequence length (Switch capacity groups).
    pub fn forward(&self, b: &B, x: &Tensor<B>, seq: usize, opts: &GateOptions) -> Result<GateOutput<B>> {
        let (s, m) = x.dims2("x")?;
        if m != self.hidden {
            return Err(Error::shape("x", format!("[tokens, {}]", self.hidden), x.shape()));
        }
        let e = self.num_experts;
        let train = opts.mode == Mode::Train;
        let noise =
            |kind: NoiseKind, stream: u32, given: &Option<HostTensor>, name: &str, cols: usize| -> Result<Tensor<B>> {
                match given {
                    Some(t) => {
                        t.expect_shape(name, &[s, cols])?;
                        t.as_f32(name)?;
                        t.check_finite(name)?;
                        b.upload(t)
                    }
                    None => b.noise(kind, opts.seed, stream, &[s, cols]),
                }
            };
        let ds = match &self.spec {
            GateSpec::DeepSpeed(g) => Some(g),
            _ => None,
        };

        // Logits in f32; DeepSpeed Jitter multiplies the gate input (training only).
        let jitter = if ds.is_some_and(|g| train && g.noisy_gate_policy == Some(NoisyGatePolicy::Jitter)) {
            Some(noise(NoiseKind::Jitter(0.01), streams::JITTER, &opts.noise.jitter, "noise.jitter", m)?)
        } else {
            None
        };
        let logits = match &jitter {
            Some(j) => b.linear(&b.mul(x, j)?, &self.weight, self.logit_bias.as_ref())?,
            None => b.linear(x, &self.weight, self.logit_bias.as_ref())?,
        };

        // Gumbel: top-1 RSample in training; top-2 second-expert sampling in both modes,
        // as DeepSpeed applies it.
        let gumbel = match ds {
            Some(g)
                if (g.k == 1 && train && g.noisy_gate_policy == Some(NoisyGatePolicy::RSample))
                    || (g.k == 2 && g.top2_2nd_expert_sampling) =>
            {
                Some(noise(NoiseKind::Gumbel, streams::GUMBEL, &opts.noise.gumbel, "noise.gumbel", e)?)
            }
            _ => None,
        };
        let route_spec = self.route_spec(gumbel.as_ref());
        let routes = b.route(&logits, &route_spec)?;

        let used = match (&opts.used_token, ds) {
            (None, _) => None,
            (Some(u), Some(g)) if g.k == 1 => {
                u.expect_shape("used_token", &[s])?;
                u.as_f32("used_token")?;
                u.check_finite("used_token")?;
                Some(b.upload(u)?)
            }
            (Some(_), Some(_)) => {
                // DeepSpeed's TopKGate passes used_token to top-1 only; match it, visibly.
                tracing::warn!("used_token is ignored for k >= 2, as DeepSpeed's TopKGate ignores it");
                None
            }
            (Some(_), None) => {
                return Err(Error::config("used_token", "only DeepSpeed gating takes a used_token mask"));
            }
        };
        let rts = match ds {
            Some(g) if g.k == 1 && g.use_rts => {
                Some(noise(NoiseKind::Uniform, streams::RTS, &opts.noise.rts, "noise.rts_uniform", e)?)
            }
            _ => None,
        };
        let plan_spec = self.plan_spec(s, seq, opts.mode, rts.as_ref(), &routes, used.as_ref())?;
        let grad_spec = RouteGradSpec {
            score: route_spec.score,
            choice: route_spec.choice,
            normalize: route_spec.normalize,
            scale: route_spec.scale,
            renormalize_kept: plan_spec.renormalize_kept,
        };
        let plan = b.plan(&routes, &plan_spec)?;
        let router_stats = b.router_stats(&logits, &routes.scores)?;
        Ok(GateOutput { logits, routes, plan, router_stats, jitter, grad_spec, gate: self.spec.clone(), tokens: s })
    }

    fn route_spec<'a>(&'a self, gumbel: Option<&'a Tensor<B>>) -> RouteSpec<'a, B> {
        let base = RouteSpec {
            k: self.spec.k(),
            score: ScoreFn::Softmax,
            choice: Choice::TopK,
            bias: None,
            choice_noise: gumbel,
            normalize: Normalize::None,
            scale: 1.0,
        };
        let norm = |n: bool| if n { Normalize::SumPlus(1e-20) } else { Normalize::None };
        match &self.spec {
            GateSpec::DeepSpeed(g) if g.k == 2 => RouteSpec { choice: Choice::DeepSpeedTop2, ..base },
            GateSpec::DeepSpeed(_) | GateSpec::Switch { .. } => base,
            GateSpec::SoftmaxTopK { normalize, .. } => {
                RouteSpec { normalize: if *normalize { Normalize::Sum } else { Normalize::None }, ..base }
            }
            GateSpec::DeepSeekV2 { n_group, topk_group, method, normalize, routed_scaling_factor, .. } => RouteSpec {
                choice: match method {
                    DeepSeekV2Method::Greedy => Choice::TopK,
                    DeepSeekV2Method::GroupLimitedGreedy => Choice::GroupLimited {
                        n_group: *n_group,
                        topk_group: *topk_group,
                        group_score: GroupScore::Max,
                    },
                },
                normalize: norm(*normalize),
                scale: *routed_scaling_factor,
                ..base
            },
            GateSpec::Router(r) => RouteSpec {
                score: match r.score {
                    RouterScore::Softmax => ScoreFn::Softmax,
                    RouterScore::Sigmoid => ScoreFn::Sigmoid,
                    RouterScore::SqrtSoftplus => ScoreFn::SqrtSoftplus,
                },
                choice: match (r.sparse_mixer, r.groups) {
                    (Some(jitter_eps), _) => Choice::SparseMixer { jitter_eps },
                    (None, Some(g)) => Choice::GroupLimited {
                        n_group: g.n_group,
                        topk_group: g.topk_group,
                        group_score: if g.sum_top2 { GroupScore::SumTop2 } else { GroupScore::Max },
                    },
                    (None, None) => Choice::TopK,
                },
                bias: if r.selection_bias { self.bias.as_ref() } else { None },
                normalize: match r.normalize {
                    RouterNorm::None => Normalize::None,
                    RouterNorm::Sum => Normalize::Sum,
                    RouterNorm::SumPlus(eps) => Normalize::SumPlus(eps),
                    RouterNorm::SumFloor(floor) => Normalize::SumFloor(floor),
                    RouterNorm::PNorm(p) => Normalize::PNorm(p),
                },
                scale: r.scale,
                ..base
            },
            GateSpec::DeepSeekV3 { n_group, topk_group, normalize, routed_scaling_factor, .. } => RouteSpec {
                score: ScoreFn::Sigmoid,
                choice: Choice::GroupLimited {
                    n_group: *n_group,
                    topk_group: *topk_group,
                    group_score: GroupScore::SumTop2,
                },
                bias: self.bias.as_ref(),
                normalize: norm(*normalize),
                scale: *routed_scaling_factor,
                ..base
            },
        }
    }

    fn plan_spec<'a>(
        &self,
        s: usize,
        seq: usize,
        mode: Mode,
        rts: Option<&'a Tensor<B>>,
        routes: &'a Routes<B>,
        used: Option<&'a Tensor<B>>,
    ) -> Result<PlanSpec<'a, B>> {
        let base = PlanSpec {
            num_experts: self.num_experts,
            capacity: CapacityRule::Unlimited,
            keep: KeepPolicy::TokenOrder,
            used_token: used,
            group_size: None,
            renormalize_kept: false,
        };
        Ok(match &self.spec {
            GateSpec::DeepSpeed(g) => {
                let factor = if mode == Mode::Train { g.capacity_factor } else { g.eval_capacity_factor };
                if g.k == 1 && s < g.min_capacity {
                    // DeepSpeed asserts this in top1gating.
                    return Err(Error::Precondition(format!(
                        "{s} tokens is fewer than min_capacity = {}: DeepSpeed top-1 gating needs tokens >= min_capacity (set min_capacity to 0 or use a larger batch)",
                        g.min_capacity
                    )));
                }
                let capacity = if g.drop_tokens {
                    CapacityRule::DeepSpeed { factor, k_prime: g.k, min_capacity: g.min_capacity }
                } else {
                    CapacityRule::Dropless { clamp_to_tokens: g.k == 1 }
                };
                let keep = match g.k {
                    1 => rts.map_or(KeepPolicy::TokenOrder, KeepPolicy::Priority),
                    2 => KeepPolicy::RankMajor,
                    _ if g.drop_tokens && g.drop_policy == DropPolicy::Probs => KeepPolicy::Priority(&routes.scores),
                    _ => KeepPolicy::TokenOrder,
                };
                PlanSpec { capacity, keep, renormalize_kept: g.k >= 2, ..base }
            }
            GateSpec::Switch { expert_capacity } => {
                PlanSpec { capacity: CapacityRule::Fixed(*expert_capacity), group_size: Some(seq), ..base }
            }
            _ => base,
        })
    }
}

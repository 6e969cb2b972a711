//! Routing: scores, choice and weights of every token.

use super::{f32_matrix, f32_shaped, output, to_u32};
use crate::device::{Device, Tensor};
use crate::error::{Error, Result};
use crate::kernel_abi::RouteParams;
use crate::tensor::{DType, HostTensor};

/// How router scores are computed from logits (always in f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScoreFn {
    /// softmax over experts.
    Softmax,
    /// elementwise sigmoid (DeepSeek-V3).
    Sigmoid,
    /// elementwise `sqrt(softplus(x))` (DeepSeek-V4 `scoring_func = "sqrtsoftplus"`, torch's
    /// `F.softplus(x).sqrt()`): softplus keeps torch's threshold, `softplus(x) = x` for
    /// x > 20. Below −20, where `softplus(x) = eˣ` to f32 precision, the score is computed
    /// as `e^(x/2)`, which stays a normal number where eˣ would be subnormal or 0.
    SqrtSoftplus,
}

impl ScoreFn {
    /// The kernels' `score_fn` code.
    pub(crate) fn code(self) -> u32 {
        match self {
            ScoreFn::Softmax => 0,
            ScoreFn::Sigmoid => 1,
            ScoreFn::SqrtSoftplus => 2,
        }
    }
}

/// How a group of experts is scored for group-limited routing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupScore {
    /// The group's largest score (DeepSeek-V2 `group_limited_greedy`). As in HF, the other
    /// groups' scores are set to 0 (not −inf): when k exceeds the kept groups' experts, the
    /// extra routes fall on masked experts with weight 0.
    Max,
    /// The sum of the group's two largest (biased) scores (DeepSeek-V3).
    SumTop2,
}

/// How experts are chosen from scores. Ties always go to the lower expert index.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Choice {
    /// The k largest of `scores + bias`; with choice noise, of `logits + noise` instead
    /// (DeepSpeed top-1 RSample).
    TopK,
    /// DeepSpeed top-2: first = argmax(scores); second = argmax(logits [+ noise]) with the
    /// first masked out.
    DeepSpeedTop2,
    /// Experts split into `n_group` equal groups; keep the `topk_group` best groups; the k
    /// largest `scores + bias` inside them (others are −inf, or 0 for [`GroupScore::Max`]).
    GroupLimited {
        /// Number of expert groups.
        n_group: usize,
        /// Groups kept per token.
        topk_group: usize,
        /// How a group is scored.
        group_score: GroupScore,
    },
    /// PhiMoE's `sparsemixer` in eval mode, k = 2, on the logits x (the scores stay the
    /// softmax over all experts, for losses and reports). Expert 1 is argmax x, with m its
    /// logit; every expert with `(m − xᵢ) / max(|xᵢ|, m) > 2 · jitter_eps` is masked, and
    /// weight 1 is the softmax of the unmasked logits at expert 1. Expert 2 is the argmax
    /// of the others, and its weight the same masked softmax with expert 1 excluded and m
    /// its logit (the masks still read the logits of every expert). The weights take no
    /// normalisation (the spec's must be [`Normalize::None`]); the route scale applies.
    SparseMixer {
        /// PhiMoE `router_jitter_noise`: the relative distance from the max past which an
        /// expert is masked is twice this.
        jitter_eps: f32,
    },
}

impl Choice {
    /// The kernels' `choice` code.
    pub(crate) fn code(self) -> u32 {
        match self {
            Choice::TopK => 0,
            Choice::DeepSpeedTop2 => 1,
            Choice::GroupLimited { .. } => 2,
            Choice::SparseMixer { .. } => 3,
        }
    }

    /// Sparsemixer's jitter eps (0 for the other rules), for the kernels' `jitter_eps`.
    pub(crate) fn jitter_eps(self) -> f32 {
        match self {
            Choice::SparseMixer { jitter_eps } => jitter_eps,
            _ => 0.0,
        }
    }
}

/// How the chosen routes' weights are normalised before capacity is applied.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Normalize {
    /// Raw scores.
    None,
    /// Divided by their sum (HF `norm_topk_prob`, Mixtral).
    Sum,
    /// Divided by (sum + eps) (DeepSeek-V3 uses 1e-20).
    SumPlus(f32),
    /// Divided by max(sum, floor) (ERNIE-4.5 `moe_norm_min`, torch's `clamp(min=...)` of
    /// the sum). Backward as torch's clamp: where the sum does not pass the floor (equal
    /// included), the floor is a constant divisor.
    SumFloor(f32),
    /// Divided by the p-norm `(Σ wⱼᵖ)^(1/p)` of the k chosen weights (DBRX
    /// `moe_normalize_expert_weights`, `torch.norm(w, p)`); p = 1 is [`Normalize::Sum`].
    PNorm(f32),
}

impl Normalize {
    /// Checks the normalisation's constant: an eps or floor finite and ≥ 0, a p finite
    /// and > 0. The error names the constant.
    pub(crate) fn check(self) -> Result<()> {
        match self {
            Normalize::SumPlus(eps) if !(eps.is_finite() && eps >= 0.0) => {
                Err(Error::config("normalize eps", format!("must be finite and >= 0, got {eps}")))
            }
            Normalize::SumFloor(floor) if !(floor.is_finite() && floor >= 0.0) => {
                Err(Error::config("normalize floor", format!("must be finite and >= 0, got {floor}")))
            }
            Normalize::PNorm(p) if !(p.is_finite() && p > 0.0) => {
                Err(Error::config("normalize p", format!("must be finite and > 0, got {p}")))
            }
            _ => Ok(()),
        }
    }

    /// The kernels' `normalize` code, its `eps` (the eps or the floor) and `p_norm`.
    pub(crate) fn codes(self) -> (u32, f32, f32) {
        match self {
            Normalize::None => (0, 0.0, 0.0),
            Normalize::Sum => (1, 0.0, 0.0),
            Normalize::SumPlus(eps) => (2, eps, 0.0),
            Normalize::SumFloor(floor) => (3, floor, 0.0),
            Normalize::PNorm(p) => (4, 0.0, p),
        }
    }
}

/// Checks what sparsemixer routing takes, the same for the route op and its backward: k =
/// 2, softmax scores, no normalisation, a jitter eps finite and ≥ 0. Other choices pass.
pub(crate) fn check_sparse_mixer(choice: Choice, k: usize, score: ScoreFn, normalize: Normalize) -> Result<()> {
    let Choice::SparseMixer { jitter_eps } = choice else { return Ok(()) };
    if k != 2 {
        return Err(Error::config("k", format!("sparsemixer routing takes k = 2, got {k}")));
    }
    if !(jitter_eps.is_finite() && jitter_eps >= 0.0) {
        return Err(Error::config("jitter_eps", format!("must be finite and >= 0, got {jitter_eps}")));
    }
    if score != ScoreFn::Softmax {
        return Err(Error::config("score", format!("sparsemixer scores are the softmax, got {score:?}")));
    }
    if normalize != Normalize::None {
        return Err(Error::config("normalize", format!("sparsemixer weights are not normalised, got {normalize:?}")));
    }
    Ok(())
}

/// Everything the route op needs. Tensors are on the same backend.
pub struct RouteSpec<'a, B: Device> {
    /// Routes per token.
    pub k: usize,
    /// Score function.
    pub score: ScoreFn,
    /// Choice rule.
    pub choice: Choice,
    /// Per-expert bias `[E]` added to scores for the choice only (DeepSeek-V3
    /// `e_score_correction_bias`).
    pub bias: Option<&'a Tensor<B>>,
    /// Noise `[S, E]` added to the logits for the choice (Gumbel: DeepSpeed RSample and
    /// top-2 second-expert sampling).
    pub choice_noise: Option<&'a Tensor<B>>,
    /// Normalisation of the chosen weights.
    pub normalize: Normalize,
    /// Multiplier applied to the weights last (`routed_scaling_factor`).
    pub scale: f32,
}

impl<B: Device> RouteSpec<'_, B> {
    /// Softmax scores, plain top-`k`, no bias or noise, weights unnormalised and unscaled:
    /// the GShard / Switch / DeepSpeed top-k gate at its simplest.
    pub fn softmax_top_k(k: usize) -> Self {
        RouteSpec {
            k,
            score: ScoreFn::Softmax,
            choice: Choice::TopK,
            bias: None,
            choice_noise: None,
            normalize: Normalize::None,
            scale: 1.0,
        }
    }

    /// Checks the spec against `e` experts, the same way on every backend: k in 1..=E,
    /// DeepSpeed top-2 takes k = 2, group-limited routing needs groups that divide E, a
    /// kept-group count within them, and (sum-of-top-2 scoring) two experts per group and
    /// k reachable inside the kept groups; sparsemixer takes k = 2, softmax scores, no
    /// normalisation, bias or noise; the scale and the normalisation's constant are finite
    /// (eps and floor ≥ 0, p > 0).
    pub fn validate(&self, e: usize) -> Result<()> {
        let k = self.k;
        if k == 0 || k > e {
            return Err(Error::config("k", format!("{k} routes per token with {e} experts")));
        }
        if self.choice == Choice::DeepSpeedTop2 && k != 2 {
            return Err(Error::config("k", format!("DeepSpeed top-2 routing takes k = 2, got {k}")));
        }
        if let Choice::GroupLimited { n_group, topk_group, group_score } = self.choice {
            // V2 (Max) may route past the kept groups onto zero-masked experts; V3 may not,
            // and its sum-of-top-2 group score needs two experts per group.
            let v3 = group_score == GroupScore::SumTop2;
            let shape_ok = n_group > 0 && e.is_multiple_of(n_group) && topk_group > 0 && topk_group <= n_group;
            if !shape_ok || (v3 && (k > topk_group * (e / n_group) || e / n_group < 2)) {
                return Err(Error::config(
                    "n_group",
                    format!("{n_group} groups / {topk_group} kept cannot route {k} of {e} experts"),
                ));
            }
        }
        if !self.scale.is_finite() {
            return Err(Error::config("routed_scaling_factor", format!("must be finite, got {}", self.scale)));
        }
        self.normalize.check()?;
        check_sparse_mixer(self.choice, k, self.score, self.normalize)?;
        if matches!(self.choice, Choice::SparseMixer { .. }) {
            // PhiMoE's eval-mode sparsemixer reads neither: a bias would change nothing it
            // computes, and its noise (Gumbel sampling) is the training branch, not this one.
            if self.bias.is_some() {
                return Err(Error::config("e_score_correction_bias", "sparsemixer routing takes no correction bias"));
            }
            if self.choice_noise.is_some() {
                return Err(Error::config("choice noise", "sparsemixer routing takes no choice noise"));
            }
        }
        Ok(())
    }
}

/// Output of the route op: which experts each token chose, with what weight. Only the
/// route op and [`Routes::from_host`] make these, so every expert id is below
/// [`Routes::num_experts`] and the plan's kernels may index by it.
#[non_exhaustive]
pub struct Routes<B: Device> {
    /// Chosen expert per route, `[S, k]` i32, in choice order.
    pub experts: Tensor<B>,
    /// Weight per route, `[S, k]` f32 (before capacity).
    pub weights: Tensor<B>,
    /// Scores (the score function of the logits; the softmax for sparsemixer), `[S, E]`
    /// f32: for losses and backward.
    pub scores: Tensor<B>,
}

/// What a backend's route op returns; the front door checks the shapes and seals it.
pub struct RoutesParts<B: Device> {
    /// `[S, k]` i32.
    pub experts: Tensor<B>,
    /// `[S, k]` f32.
    pub weights: Tensor<B>,
    /// `[S, E]` f32.
    pub scores: Tensor<B>,
}

impl<B: Device> Routes<B> {
    /// Routes from host values, checked: experts `[S, k]` i32 in `0..E`, weights `[S, k]`
    /// f32 finite, scores `[S, E]` f32 finite (E from the scores). For tests and callers
    /// that choose experts themselves.
    pub fn from_host(b: &B, experts: &HostTensor, weights: &HostTensor, scores: &HostTensor) -> Result<Self> {
        let (s, k) = match experts.shape()[..] {
            [s, k] => (s, k),
            _ => return Err(Error::shape("routes.experts", "[tokens, k]", experts.shape())),
        };
        let e = match scores.shape()[..] {
            [ss, e] if ss == s => e,
            _ => return Err(Error::shape("routes.scores", format!("[{s}, experts]"), scores.shape())),
        };
        weights.expect_shape("routes.weights", &[s, k])?;
        let ids = experts.as_i32("routes.experts")?;
        if let Some(i) = ids.iter().position(|&x| x < 0 || x as usize >= e) {
            return Err(Error::OutOfRange {
                tensor: "routes.experts".into(),
                index: i,
                value: ids[i] as i64,
                range: format!("0..{e}"),
            });
        }
        weights.check_finite("routes.weights")?;
        scores.check_finite("routes.scores")?;
        let parts = RoutesParts { experts: b.upload(experts)?, weights: b.upload(weights)?, scores: b.upload(scores)? };
        Self::seal(b, parts, s, k, e)
    }

    /// Checks what a backend returned for `s` tokens, `k` routes and `e` experts.
    pub(crate) fn seal(b: &B, p: RoutesParts<B>, s: usize, k: usize, e: usize) -> Result<Self> {
        let experts = super::returned(b, "route", p.experts, &[s, k], DType::I32)?;
        let weights = super::returned(b, "route", p.weights, &[s, k], DType::F32)?;
        let scores = super::returned(b, "route", p.scores, &[s, e], DType::F32)?;
        Ok(Routes { experts, weights, scores })
    }

    /// Tokens S.
    pub fn tokens(&self) -> usize {
        self.experts.shape()[0]
    }

    /// Routes per token k.
    pub fn k(&self) -> usize {
        self.experts.shape()[1]
    }

    /// Experts E the ids index.
    pub fn num_experts(&self) -> usize {
        self.scores.shape()[1]
    }
}

/// The route op with checked operands and its kernel parameters.
#[non_exhaustive]
pub struct RouteOp<'a, B: Device> {
    /// Router logits `[S, E]`, f32.
    pub logits: &'a Tensor<B>,
    /// The spec (validated against E).
    pub spec: &'a RouteSpec<'a, B>,
    /// Tokens S.
    pub tokens: usize,
    /// Experts E.
    pub experts: usize,
    /// Kernel parameters.
    pub params: RouteParams,
}

impl<'a, B: Device> RouteOp<'a, B> {
    /// Checks logits, spec, bias and noise, and the backend's routing limits.
    pub fn check(b: &B, logits: &'a Tensor<B>, spec: &'a RouteSpec<'a, B>) -> Result<Self> {
        let (s, e) = f32_matrix("logits", logits)?;
        spec.validate(e)?;
        let caps = b.capabilities();
        if let Some(max) = caps.max_route_experts {
            if e > max {
                return Err(Error::unsupported(b.name(), format!("{e} experts (its route kernel takes up to {max})")));
            }
        }
        if let Some(bias) = spec.bias {
            f32_shaped("e_score_correction_bias", bias, &[e])?;
        }
        if let Some(noise) = spec.choice_noise {
            f32_shaped("choice noise (gumbel)", noise, &[s, e])?;
        }
        let (n_group, topk_group, group_score) = match spec.choice {
            Choice::TopK | Choice::DeepSpeedTop2 | Choice::SparseMixer { .. } => (0, 0, 0),
            Choice::GroupLimited { n_group, topk_group, group_score } => {
                if let Some(max) = caps.max_route_groups {
                    if n_group > max {
                        return Err(Error::unsupported(
                            b.name(),
                            format!("{n_group} expert groups (its route kernel takes up to {max})"),
                        ));
                    }
                }
                (n_group as u32, topk_group as u32, (group_score == GroupScore::SumTop2) as u32)
            }
        };
        let (normalize, eps, p_norm) = spec.normalize.codes();
        output(b, "scores", &[s, e], DType::F32)?;
        super::fits_i32("routes (tokens × k)", crate::tensor::mul_size("routes", s, spec.k)?)?;
        // The status words hold a flat logit index below u32::MAX (route_check).
        let se = crate::tensor::mul_size("logits", s, e)?;
        if se >= u32::MAX as usize {
            return Err(Error::too_large("router logits (tokens × experts)", se.to_string(), "4294967294 elements"));
        }
        let params = RouteParams {
            s: to_u32("tokens", s)?,
            e: to_u32("experts", e)?,
            k: spec.k as u32,
            score_fn: spec.score.code(),
            choice: spec.choice.code(),
            has_bias: spec.bias.is_some() as u32,
            has_noise: spec.choice_noise.is_some() as u32,
            normalize,
            eps,
            scale: spec.scale,
            n_group,
            topk_group,
            group_score,
            p_norm,
            jitter_eps: spec.choice.jitter_eps(),
            ..Default::default()
        };
        Ok(RouteOp { logits, spec, tokens: s, experts: e, params })
    }
}

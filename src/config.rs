//! Layer configuration: which gating policy, which experts, residual or shared experts.
//! Importers (`crate::import`) build these from DeepSpeed keyword arguments and HF
//! `config.json` files; `validate` checks every field before any weight is touched.

use crate::error::{Error, Result};
use crate::expert::ExpertKind;
use serde::{Deserialize, Serialize};

/// Training or evaluation: selects the capacity factor and whether noise applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Evaluation: `eval_capacity_factor`, no noise.
    #[default]
    Eval,
    /// Training: `capacity_factor`, noise policies apply.
    Train,
}

/// DeepSpeed `noisy_gate_policy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NoisyGatePolicy {
    /// Multiply the gate input by U(0.99, 1.01) in training.
    Jitter,
    /// Add Gumbel noise to the logits for the top-1 choice in training.
    RSample,
}

/// DeepSpeed `drop_policy` for k ≥ 3.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DropPolicy {
    /// Keep the C routes with the highest probability.
    #[default]
    Probs,
    /// Keep the first C routes in token order.
    Position,
}

/// DeepSpeed `TopKGate` settings (the keyword arguments of `deepspeed.moe.layer.MoE`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeepSpeedGate {
    /// Routes per token.
    pub k: usize,
    /// Capacity factor in training (f64: DeepSpeed multiplies it by k in Python floats).
    pub capacity_factor: f64,
    /// Capacity factor in evaluation.
    pub eval_capacity_factor: f64,
    /// Lower bound of the capacity.
    pub min_capacity: usize,
    /// Noise policy (training only). DeepSpeed applies RSample to top-1 only and accepts
    /// it without effect for k ≥ 2; so does the engine.
    pub noisy_gate_policy: Option<NoisyGatePolicy>,
    /// Drop routes beyond capacity; false = dropless.
    pub drop_tokens: bool,
    /// Random token selection (top-1).
    pub use_rts: bool,
    /// Gumbel-sampled second expert (top-2).
    pub top2_2nd_expert_sampling: bool,
    /// Drop policy for k ≥ 3.
    pub drop_policy: DropPolicy,
}

impl Default for DeepSpeedGate {
    /// DeepSpeed's own defaults for `deepspeed.moe.layer.MoE`.
    fn default() -> Self {
        DeepSpeedGate {
            k: 1,
            capacity_factor: 1.0,
            eval_capacity_factor: 1.0,
            min_capacity: 4,
            noisy_gate_policy: None,
            drop_tokens: true,
            use_rts: true,
            top2_2nd_expert_sampling: true,
            drop_policy: DropPolicy::Probs,
        }
    }
}

/// DeepSeek-V2 `topk_method`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeepSeekV2Method {
    /// Plain top-k of the softmax scores.
    Greedy,
    /// Group score = max; keep `topk_group` groups; top-k inside.
    GroupLimitedGreedy,
}

/// The gating policy of a layer, each matching its reference.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GateSpec {
    /// DeepSpeed `TopKGate`: `top1gating`, `top2gating`, `topkgating`.
    DeepSpeed(DeepSpeedGate),
    /// Softmax top-k (Mixtral: `normalize` always; Qwen2/3-MoE, OLMoE: `norm_topk_prob`).
    SoftmaxTopK {
        /// Routes per token.
        k: usize,
        /// Renormalise the k weights to sum to 1.
        normalize: bool,
    },
    /// DeepSeek-V2: softmax scores, greedy or group-limited greedy, × `routed_scaling_factor`.
    DeepSeekV2 {
        /// Routes per token.
        k: usize,
        /// Expert groups.
        n_group: usize,
        /// Groups kept per token.
        topk_group: usize,
        /// Selection method.
        method: DeepSeekV2Method,
        /// Whether the k weights are renormalised (HF `norm_topk_prob`).
        normalize: bool,
        /// Route scale.
        routed_scaling_factor: f32,
    },
    /// DeepSeek-V3: sigmoid scores, correction bias for the choice, sum-of-top-2 group score.
    DeepSeekV3 {
        /// Routes per token.
        k: usize,
        /// Expert groups.
        n_group: usize,
        /// Groups kept per token.
        topk_group: usize,
        /// Renormalise the k weights (with +1e-20).
        normalize: bool,
        /// Route scale.
        routed_scaling_factor: f32,
    },
    /// Switch Transformers top-1 with a fixed per-sequence `expert_capacity`.
    Switch {
        /// Slots per expert per sequence.
        expert_capacity: usize,
    },
    /// A router assembled from options, as the HF model families combine them (gpt-oss,
    /// Llama 4, GLM-4.5, ERNIE 4.5, LongCat-Flash, DBRX, PhiMoE, ...): no capacity, every
    /// route kept.
    Router(RouterSpec),
}

/// How router scores come from the logits (in f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouterScore {
    /// Softmax over the experts. Top-k of the logits followed by a softmax over the k
    /// (gpt-oss, Granite-MoE, JetMoE) is this with [`RouterNorm::Sum`]: softmax is
    /// monotone, so it chooses the same experts, and the chosen probabilities divided by
    /// their sum are the softmax of the chosen logits.
    Softmax,
    /// Elementwise sigmoid. Top-k of the logits followed by a sigmoid of the chosen ones
    /// (Llama 4, Cohere2-MoE) is this: sigmoid is monotone.
    Sigmoid,
    /// `sqrt(softplus(logit))` (DeepSeek-V4 `scoring_func: sqrtsoftplus`).
    SqrtSoftplus,
}

/// How the k chosen weights are normalised.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum RouterNorm {
    /// The chosen scores as they are.
    None,
    /// Divided by their sum.
    Sum,
    /// Divided by (sum + eps) (DeepSeek-V3 family: 1e-20; LFM2: 1e-6).
    SumPlus(f32),
    /// Divided by max(sum, floor) (ERNIE 4.5 `moe_norm_min`).
    SumFloor(f32),
    /// Divided by their p-norm (DBRX `moe_normalize_expert_weights`).
    PNorm(f32),
}

/// Group-limited routing: experts in `n_group` equal groups, the `topk_group` best kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterGroups {
    /// Expert groups.
    pub n_group: usize,
    /// Groups kept per token.
    pub topk_group: usize,
    /// true: a group scores the sum of its two largest biased scores (DeepSeek-V3);
    /// false: its largest score (DeepSeek-V2).
    pub sum_top2: bool,
}

/// The options of [`GateSpec::Router`]. Every option is one of the route op's (or the
/// layer's) and runs on every backend.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouterSpec {
    /// Routes per token.
    pub k: usize,
    /// Score function.
    pub score: RouterScore,
    /// Group-limited choice.
    pub groups: Option<RouterGroups>,
    /// A per-expert selection bias `[E + Z]` added to the scores for the choice only
    /// (`e_score_correction_bias`, `expert_bias`, `moe_statics`).
    pub selection_bias: bool,
    /// Normalisation of the chosen weights.
    pub normalize: RouterNorm,
    /// Multiplier of the weights (`routed_scaling_factor`, `route_scale`).
    pub scale: f32,
    /// PhiMoE's sparsemixer (eval form) with its `router_jitter_noise`: k = 2, each
    /// weight from a softmax masked around its own maximum.
    pub sparse_mixer: Option<f32>,
    /// The router's linear layer has a bias (gpt-oss): logits = x Wᵀ + b.
    pub logit_bias: bool,
    /// The expert input is the token times its route weight, and the outputs are summed
    /// unweighted (Llama 4): `Σ expert(w · x)` instead of `Σ w · expert(x)`.
    pub scale_input: bool,
    /// Zero-compute experts after the E real ones (LongCat-Flash `zero_expert_num`): the
    /// router scores E + Z experts, and a route to one of these returns the token itself
    /// times its weight.
    pub identity_experts: usize,
}

impl GateSpec {
    /// Routes per token.
    pub fn k(&self) -> usize {
        match self {
            GateSpec::DeepSpeed(g) => g.k,
            GateSpec::SoftmaxTopK { k, .. } | GateSpec::DeepSeekV2 { k, .. } | GateSpec::DeepSeekV3 { k, .. } => *k,
            GateSpec::Switch { .. } => 1,
            GateSpec::Router(r) => r.k,
        }
    }

    /// Zero-compute (identity) experts the router scores after the real ones.
    pub fn identity_experts(&self) -> usize {
        match self {
            GateSpec::Router(r) => r.identity_experts,
            _ => 0,
        }
    }

    /// Whether the expert input is the token times its route weight (Llama 4).
    pub fn scales_input(&self) -> bool {
        matches!(self, GateSpec::Router(r) if r.scale_input)
    }

    /// Checks the gate's fields against `e` experts; errors name the field.
    pub fn validate(&self, e: usize) -> Result<()> {
        if e == 0 {
            return Err(Error::config("num_experts", "must be > 0"));
        }
        let k = self.k();
        if k == 0 {
            return Err(Error::config("k", "must be >= 1"));
        }
        if k > e {
            return Err(Error::config("k", format!("{k} routes per token but only {e} experts")));
        }
        match self {
            GateSpec::DeepSpeed(g) => {
                for (name, v) in
                    [("capacity_factor", g.capacity_factor), ("eval_capacity_factor", g.eval_capacity_factor)]
                {
                    if !(v.is_finite() && v > 0.0) {
                        return Err(Error::config(name, format!("must be a positive number, got {v}")));
                    }
                }
            }
            GateSpec::DeepSeekV2 { n_group, topk_group, method, routed_scaling_factor, .. } => {
                if *method == DeepSeekV2Method::GroupLimitedGreedy {
                    // V2 masks other groups with 0, so k may exceed the kept groups' experts:
                    // the extra routes land on masked experts with weight 0, as in HF.
                    check_groups(e, 0, *n_group, *topk_group)?;
                }
                check_scale(*routed_scaling_factor)?;
            }
            GateSpec::DeepSeekV3 { n_group, topk_group, routed_scaling_factor, .. } => {
                check_groups(e, k, *n_group, *topk_group)?;
                if e / n_group < 2 {
                    return Err(Error::config("n_group", "DeepSeek-V3 group scores need at least 2 experts per group"));
                }
                check_scale(*routed_scaling_factor)?;
            }
            GateSpec::Switch { expert_capacity } => {
                if *expert_capacity == 0 {
                    return Err(Error::config("expert_capacity", "must be > 0"));
                }
            }
            GateSpec::SoftmaxTopK { .. } => {}
            GateSpec::Router(r) => r.validate(e)?,
        }
        Ok(())
    }
}

impl RouterSpec {
    /// Checks the options against the `e` experts the router scores (real and identity).
    fn validate(&self, e: usize) -> Result<()> {
        if let Some(g) = &self.groups {
            check_groups(e, if g.sum_top2 { self.k } else { 0 }, g.n_group, g.topk_group)?;
            if g.sum_top2 && e / g.n_group < 2 {
                return Err(Error::config("n_group", "sum-of-top-2 group scores need at least 2 experts per group"));
            }
        }
        check_scale(self.scale)?;
        match self.normalize {
            RouterNorm::SumPlus(v) | RouterNorm::SumFloor(v) if !(v.is_finite() && v >= 0.0) => {
                return Err(Error::config("normalize", format!("eps / floor must be finite and >= 0, got {v}")));
            }
            RouterNorm::PNorm(p) if !(p.is_finite() && p > 0.0) => {
                return Err(Error::config("moe_normalize_expert_weights", format!("must be finite and > 0, got {p}")));
            }
            _ => {}
        }
        if let Some(eps) = self.sparse_mixer {
            if self.k != 2 {
                return Err(Error::config(
                    "num_experts_per_tok",
                    format!("sparsemixer routes 2 experts, got {}", self.k),
                ));
            }
            if !(eps.is_finite() && eps >= 0.0) {
                return Err(Error::config("router_jitter_noise", format!("must be finite and >= 0, got {eps}")));
            }
            if self.groups.is_some() {
                return Err(Error::config("n_group", "sparsemixer routing has no groups"));
            }
        }
        if self.identity_experts >= e {
            return Err(Error::config(
                "zero_expert_num",
                format!("{} of {e} scored experts leaves no real one", self.identity_experts),
            ));
        }
        Ok(())
    }
}

/// The routing in words, one line (`moe info --model` prints it beside the top-k): how
/// scores come from the logits, how the k experts are chosen, how their weights are
/// normalised and scaled, and, for DeepSpeed and Switch, the capacity rules.
impl std::fmt::Display for GateSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let renorm = |n: bool| if n { "weights renormalised" } else { "weights as scored (not renormalised)" };
        match self {
            GateSpec::DeepSpeed(g) => {
                let which = match g.k {
                    1 => "top1gating",
                    2 => "top2gating",
                    _ => "topkgating",
                };
                write!(
                    f,
                    "softmax scores (DeepSpeed {which}); capacity factor {} (eval {}), min capacity {}; ",
                    g.capacity_factor, g.eval_capacity_factor, g.min_capacity
                )?;
                if g.drop_tokens {
                    f.write_str("routes past capacity dropped")?;
                    if g.k >= 3 {
                        let keep = match g.drop_policy {
                            DropPolicy::Probs => "highest probability",
                            DropPolicy::Position => "first in token order",
                        };
                        write!(f, " (kept: {keep})")?;
                    }
                } else {
                    f.write_str("dropless")?;
                }
                if g.k == 1 && g.use_rts {
                    f.write_str("; random token selection")?;
                }
                if g.k == 2 && g.top2_2nd_expert_sampling {
                    f.write_str("; second expert sampled with Gumbel noise in training")?;
                }
                match g.noisy_gate_policy {
                    Some(NoisyGatePolicy::Jitter) => f.write_str("; input jitter in training")?,
                    Some(NoisyGatePolicy::RSample) if g.k == 1 => f.write_str("; Gumbel-noised choice in training")?,
                    _ => {}
                }
                Ok(())
            }
            GateSpec::SoftmaxTopK { normalize, .. } => {
                write!(f, "softmax scores; top-k choice; {}", renorm(*normalize))
            }
            GateSpec::DeepSeekV2 { n_group, topk_group, method, normalize, routed_scaling_factor, .. } => {
                f.write_str("softmax scores; ")?;
                match method {
                    DeepSeekV2Method::Greedy => f.write_str("greedy top-k choice")?,
                    DeepSeekV2Method::GroupLimitedGreedy => write!(
                        f,
                        "choice within the {topk_group} best of {n_group} groups (a group scores its best expert)"
                    )?,
                }
                write!(f, "; {}", renorm(*normalize))?;
                scale(f, *routed_scaling_factor)
            }
            GateSpec::DeepSeekV3 { n_group, topk_group, normalize, routed_scaling_factor, .. } => {
                write!(
                    f,
                    "sigmoid scores; choice on score + selection bias within the {topk_group} best of {n_group} groups \
                     (a group scores the sum of its top 2); "
                )?;
                f.write_str(if *normalize { "weights renormalised (+1e-20)" } else { renorm(false) })?;
                scale(f, *routed_scaling_factor)
            }
            GateSpec::Switch { expert_capacity } => write!(
                f,
                "softmax scores; top-1 choice; at most {expert_capacity} tokens per expert per sequence, \
                 the rest dropped (their output 0)"
            ),
            GateSpec::Router(r) => r.fmt(f),
        }
    }
}

/// The router's options in words, in the order the route applies them (see
/// [`GateSpec`]'s `Display`).
impl std::fmt::Display for RouterSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.logit_bias {
            f.write_str("logits with a bias; ")?;
        }
        f.write_str(match self.score {
            RouterScore::Softmax => "softmax scores",
            RouterScore::Sigmoid => "sigmoid scores",
            RouterScore::SqrtSoftplus => "sqrt(softplus) scores",
        })?;
        if let Some(eps) = self.sparse_mixer {
            // The sparse mixer makes its own weights: the norm and groups do not apply.
            write!(
                f,
                "; sparsemixer choice of 2, each weight a softmax masked around its maximum (jitter eps {})",
                Num(eps)
            )?;
        } else {
            f.write_str(if self.selection_bias { "; choice on score + selection bias" } else { "; top-k choice" })?;
            if let Some(g) = &self.groups {
                let score = if g.sum_top2 { "the sum of its top 2" } else { "its best expert" };
                write!(f, " within the {} best of {} groups (a group scores {score})", g.topk_group, g.n_group)?;
            }
            match self.normalize {
                RouterNorm::None => f.write_str("; weights as scored (not renormalised)")?,
                RouterNorm::Sum => f.write_str("; weights renormalised")?,
                RouterNorm::SumPlus(eps) => write!(f, "; weights renormalised (+{})", Num(eps))?,
                RouterNorm::SumFloor(m) => write!(f, "; weights divided by max(sum, {})", Num(m))?,
                RouterNorm::PNorm(p) => write!(f, "; weights divided by their {}-norm", Num(p))?,
            }
        }
        scale(f, self.scale)?;
        if self.identity_experts > 0 {
            write!(
                f,
                "; {} zero-compute experts after the real ones (a route there returns the token × its weight)",
                self.identity_experts
            )?;
        }
        if self.scale_input {
            f.write_str("; experts see the token × its weight, outputs summed unweighted")?;
        }
        Ok(())
    }
}

/// ` × s` where the route scale is not 1.
fn scale(f: &mut std::fmt::Formatter<'_>, s: f32) -> std::fmt::Result {
    if s != 1.0 {
        write!(f, " × {}", Num(s))?;
    }
    Ok(())
}

/// A config number as people write it: `2.5`, `1e-12` (not `0.000000000001`).
struct Num(f32);

impl std::fmt::Display for Num {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = self.0;
        if v == 0.0 || (1e-4..1e6).contains(&v.abs()) {
            write!(f, "{v}")
        } else {
            write!(f, "{v:e}")
        }
    }
}

/// Shape of every expert of a layer (experts are identical in form).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExpertSpec {
    /// The form.
    pub kind: ExpertKind,
    /// Intermediate size (ignored for linear experts).
    pub ffn: usize,
    /// Whether the linear layers have biases.
    pub bias: bool,
}

/// Shared experts added to the routed output (DeepSeek, Qwen2-MoE).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SharedSpec {
    /// The shared MLP (one expert-shaped block; n shared experts are one block of n·ffn).
    pub expert: ExpertSpec,
    /// Qwen2-MoE: scale by sigmoid(`shared_expert_gate`(x)).
    pub gated: bool,
    /// How the shared output joins the routed one.
    #[serde(default)]
    pub combine: SharedCombine,
}

/// How shared experts join the routed output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SharedCombine {
    /// routed + shared.
    #[default]
    Add,
    /// (routed + shared) / 2 (Cohere2-MoE `shared_expert_combination_strategy: average`).
    Average,
}

/// A complete MoE layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerSpec {
    /// Model (hidden) size M.
    pub hidden: usize,
    /// Number of routed experts E.
    pub num_experts: usize,
    /// Gating policy.
    pub gate: GateSpec,
    /// Routed expert shape.
    pub expert: ExpertSpec,
    /// DeepSpeed residual MoE: a dense MLP of the expert's shape mixed by a learned
    /// coefficient (`use_residual`).
    pub residual: bool,
    /// Shared experts.
    pub shared: Option<SharedSpec>,
    /// A bias `[M]` added to every token's output (JetMoE's block `bias`).
    #[serde(default)]
    pub output_bias: bool,
}

impl LayerSpec {
    /// Checks every field; errors name the field.
    pub fn validate(&self) -> Result<()> {
        if self.hidden == 0 {
            return Err(Error::config("hidden_size", "must be > 0"));
        }
        let e = self.num_experts;
        if e == 0 {
            return Err(Error::config("num_experts", "must be > 0"));
        }
        self.gate.validate(e + self.gate.identity_experts())?;
        validate_expert("expert", &self.expert)?;
        if let Some(s) = &self.shared {
            validate_expert("shared_expert", &s.expert)?;
            if self.residual {
                return Err(Error::config("use_residual", "residual MoE and shared experts are exclusive"));
            }
        }
        self.weight_count()?;
        Ok(())
    }

    /// Weight elements of the layer: router, routed experts, and the residual MLP or
    /// shared experts with their gates. An error naming the sizes when the count does not
    /// fit 64 bits (a config with absurd sizes is refused before anything is allocated).
    pub fn weight_count(&self) -> Result<u64> {
        let (m, e) = (self.hidden as u64, self.num_experts as u64);
        let overflow = || {
            Error::too_large(
                format!("the weights of a layer with hidden_size {}, {} experts", self.hidden, self.num_experts),
                "more elements",
                "a 64-bit count",
            )
        };
        let mlp = |s: &ExpertSpec| -> Option<u64> {
            let n_in = s.kind.first_rows(s.ffn, self.hidden)? as u64;
            let mut c = n_in.checked_mul(m)?;
            if s.bias {
                c = c.checked_add(n_in)?;
            }
            if !matches!(s.kind, ExpertKind::Linear) {
                c = c.checked_add(m.checked_mul(s.ffn as u64)?)?;
                if s.bias {
                    c = c.checked_add(m)?;
                }
            }
            Some(c)
        };
        // The router scores the real and the identity experts; gpt-oss adds a logit bias.
        let scored = e + self.gate.identity_experts() as u64;
        let logit_bias = matches!(&self.gate, GateSpec::Router(r) if r.logit_bias);
        let mut total = scored.checked_mul(m).ok_or_else(overflow)?;
        if logit_bias {
            total = total.checked_add(scored).ok_or_else(overflow)?;
        }
        if self.output_bias {
            total = total.checked_add(m).ok_or_else(overflow)?;
        }
        total = total
            .checked_add(mlp(&self.expert).and_then(|c| c.checked_mul(e)).ok_or_else(overflow)?)
            .ok_or_else(overflow)?;
        if self.residual {
            total = total
                .checked_add(mlp(&self.expert).ok_or_else(overflow)?)
                .and_then(|t| t.checked_add(2 * m + 2))
                .ok_or_else(overflow)?;
        }
        if let Some(s) = &self.shared {
            // The sigmoid gate `[1, M]` only where the shared experts are gated.
            let gate = if s.gated { m } else { 0 };
            total = total
                .checked_add(mlp(&s.expert).ok_or_else(overflow)?)
                .and_then(|t| t.checked_add(gate))
                .ok_or_else(overflow)?;
        }
        Ok(total)
    }
}

fn validate_expert(field: &str, s: &ExpertSpec) -> Result<()> {
    s.kind.check()?;
    if !matches!(s.kind, ExpertKind::Linear) && s.ffn == 0 {
        return Err(Error::config(format!("{field}.ffn_hidden"), "must be > 0"));
    }
    Ok(())
}

fn check_groups(e: usize, k: usize, n_group: usize, topk_group: usize) -> Result<()> {
    if n_group == 0 || !e.is_multiple_of(n_group) {
        return Err(Error::config("n_group", format!("{n_group} groups must divide {e} experts")));
    }
    if topk_group == 0 || topk_group > n_group {
        return Err(Error::config("topk_group", format!("must be in 1..={n_group}, got {topk_group}")));
    }
    let reachable = topk_group * (e / n_group);
    if k > reachable {
        return Err(Error::config(
            "num_experts_per_tok",
            format!("{k} routes but the {topk_group} kept groups hold only {reachable} experts"),
        ));
    }
    Ok(())
}

fn check_scale(s: f32) -> Result<()> {
    if !s.is_finite() {
        return Err(Error::config("routed_scaling_factor", format!("must be finite, got {s}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_reads_as_one_line_of_words() {
        let v3 = GateSpec::DeepSeekV3 { k: 8, n_group: 8, topk_group: 4, normalize: true, routed_scaling_factor: 2.5 };
        assert_eq!(
            v3.to_string(),
            "sigmoid scores; choice on score + selection bias within the 4 best of 8 groups \
             (a group scores the sum of its top 2); weights renormalised (+1e-20) × 2.5"
        );
        let mixtral = GateSpec::SoftmaxTopK { k: 2, normalize: true };
        assert_eq!(mixtral.to_string(), "softmax scores; top-k choice; weights renormalised");
        let ernie = GateSpec::Router(RouterSpec {
            k: 2,
            score: RouterScore::Softmax,
            groups: None,
            selection_bias: true,
            normalize: RouterNorm::SumFloor(1e-12),
            scale: 1.0,
            sparse_mixer: None,
            logit_bias: false,
            scale_input: false,
            identity_experts: 0,
        });
        assert_eq!(
            ernie.to_string(),
            "softmax scores; choice on score + selection bias; weights divided by max(sum, 1e-12)"
        );
        let ds = GateSpec::DeepSpeed(DeepSpeedGate { k: 2, drop_tokens: false, ..Default::default() });
        assert!(ds.to_string().starts_with("softmax scores (DeepSpeed top2gating)"), "{ds}");
        assert!(ds.to_string().contains("dropless"), "{ds}");
        let longcat = GateSpec::Router(RouterSpec {
            k: 2,
            score: RouterScore::Softmax,
            groups: None,
            selection_bias: true,
            normalize: RouterNorm::None,
            scale: 6.0,
            sparse_mixer: None,
            logit_bias: false,
            scale_input: false,
            identity_experts: 2,
        });
        assert_eq!(
            longcat.to_string(),
            "softmax scores; choice on score + selection bias; weights as scored (not renormalised) × 6; \
             2 zero-compute experts after the real ones (a route there returns the token × its weight)"
        );
    }
}

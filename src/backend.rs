//! The `Backend` trait: device memory, a queue, and the MoE primitives at the granularity
//! where fusion pays. Everything above it (gating policies, capacity rules, the layer, the
//! importers) is shared by every backend.
//!
//! Conventions every implementation follows:
//! - Ops are enqueued and return new tensors; only [`Backend::download`] (and
//!   [`Backend::synchronize`]) wait for the device. Shapes are checked when an op is
//!   enqueued, so shape errors surface at the call that caused them.
//! - Matrices are row-major; weights are `[out_features, in_features]` as in PyTorch, so a
//!   linear layer is `x · Wᵀ`.
//! - Float accumulation is f32 whatever the storage dtype. Results are deterministic: the
//!   same inputs on the same backend give bitwise the same outputs (no float atomics whose
//!   order varies; slots follow token order).
//! - Index tensors are i32. A dropped route has row and slot −1.

use crate::config::ExpertKind;
use crate::error::{Error, Result};
use crate::philox::{self, NoiseKind};
use crate::tensor::{DType, HostTensor};

/// A tensor living on a backend's device: a buffer handle plus shape and dtype.
pub struct Tensor<B: Backend> {
    buf: std::sync::Arc<B::Buffer>,
    shape: Vec<usize>,
    dtype: DType,
}

impl<B: Backend> Tensor<B> {
    /// Wraps a backend buffer. Backends call this; users get tensors from ops and uploads.
    pub fn from_parts(buf: B::Buffer, shape: Vec<usize>, dtype: DType) -> Self {
        Tensor { buf: std::sync::Arc::new(buf), shape, dtype }
    }
    /// A view of the same buffer under another shape with the same element count.
    pub fn reshape(&self, shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != self.numel() {
            return Err(Error::shape("reshape", format!("{shape:?} ({n} elements)"), &self.shape));
        }
        Ok(Tensor { buf: self.buf.clone(), shape: shape.to_vec(), dtype: self.dtype })
    }
    /// The backend buffer.
    pub fn buffer(&self) -> &B::Buffer {
        &self.buf
    }
    /// Dimensions, outermost first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Element type as stored on the device.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// The two dimensions of a matrix, or an error naming the tensor.
    pub fn dims2(&self, name: &str) -> Result<(usize, usize)> {
        match self.shape[..] {
            [r, c] => Ok((r, c)),
            _ => Err(Error::shape(name, "a matrix [rows, cols]", &self.shape)),
        }
    }
    /// The three dimensions of a stacked tensor, or an error naming the tensor.
    pub fn dims3(&self, name: &str) -> Result<(usize, usize, usize)> {
        match self.shape[..] {
            [a, b, c] => Ok((a, b, c)),
            _ => Err(Error::shape(name, "a stack [groups, rows, cols]", &self.shape)),
        }
    }
    /// Errors unless the tensor holds `dtype`.
    pub fn expect_dtype(&self, name: &str, dtype: DType) -> Result<()> {
        if self.dtype != dtype {
            return Err(Error::DType { tensor: name.into(), expected: dtype.to_string(), got: self.dtype.to_string() });
        }
        Ok(())
    }
}

impl<B: Backend> std::fmt::Debug for Tensor<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {})", self.shape, self.dtype)
    }
}

/// What a backend and its device can do, reported up front instead of failing late.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Capabilities {
    /// Backend name (`cpu`, `wgpu`, `cuda`).
    pub backend: String,
    /// Human-readable device name.
    pub device: String,
    /// Storage dtypes for weights and activations (f32 is always present).
    pub storage_dtypes: Vec<DType>,
    /// Largest single buffer in bytes.
    pub max_buffer_bytes: u64,
    /// Whether subgroup (warp) operations are used.
    pub subgroups: bool,
    /// Worker threads (cpu) or 0 where not meaningful.
    pub threads: usize,
    /// Products with f16/bf16 weights round their f32 inputs to the weights' type first
    /// (tensor cores take both operands in one type, as in PyTorch's bf16 models), so they
    /// agree with f32-input products to that type's precision rather than to f32's.
    pub half_inputs: bool,
}

/// Activation functions of expert and dense MLPs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Gaussian error linear unit, exact (erf) form: PyTorch `GELU()`.
    Gelu,
    /// GELU with the tanh approximation: PyTorch `GELU(approximate="tanh")`.
    GeluTanh,
    /// max(x, 0).
    Relu,
    /// x · sigmoid(x), also called swish.
    Silu,
    /// Identity: for linear experts.
    Identity,
}

impl std::str::FromStr for Activation {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "gelu" | "gelu_new_exact" => Ok(Activation::Gelu),
            "gelu_tanh" | "gelu_new" | "gelu_pytorch_tanh" => Ok(Activation::GeluTanh),
            "relu" => Ok(Activation::Relu),
            "silu" | "swish" => Ok(Activation::Silu),
            "identity" | "linear" => Ok(Activation::Identity),
            _ => Err(Error::config("activation", format!("unknown activation `{s}` (gelu, gelu_tanh, relu, silu)"))),
        }
    }
}

impl Activation {
    /// The code the GPU kernels switch on (shaders/activation.wgsl, kernels/common.cuh):
    /// 0 gelu, 1 gelu_tanh, 2 relu, 3 silu, 4 identity.
    pub fn kernel_code(self) -> u32 {
        match self {
            Activation::Gelu => 0,
            Activation::GeluTanh => 1,
            Activation::Relu => 2,
            Activation::Silu => 3,
            Activation::Identity => 4,
        }
    }
}

/// How router scores are computed from logits (always in f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScoreFn {
    /// softmax over experts.
    Softmax,
    /// elementwise sigmoid (DeepSeek-V3).
    Sigmoid,
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
}

/// Everything the route op needs. Tensors are on the same backend.
pub struct RouteSpec<'a, B: Backend> {
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

impl<B: Backend> RouteSpec<'_, B> {
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
    /// DeepSpeed top-2 takes k = 2, and group-limited routing needs groups that divide E,
    /// a kept-group count within them, and (sum-of-top-2 scoring) two experts per group
    /// and k reachable inside the kept groups.
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
        Ok(())
    }
}

/// Output of the route op.
pub struct Routes<B: Backend> {
    /// Chosen expert per route, `[S, k]` i32, in choice order.
    pub experts: Tensor<B>,
    /// Weight per route, `[S, k]` f32 (before capacity).
    pub weights: Tensor<B>,
    /// Scores (softmax or sigmoid of the logits), `[S, E]` f32: for losses and backward.
    pub scores: Tensor<B>,
}

/// How the capacity C of each expert buffer is set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CapacityRule {
    /// No limit: every route is kept; the reported capacity is the largest count.
    Unlimited,
    /// A fixed number of slots per expert in each token group (Switch `expert_capacity`).
    Fixed(usize),
    /// DeepSpeed with `drop_tokens`: C = max(ceil(S / E · factor · k'), min_capacity).
    DeepSpeed {
        /// The capacity factor in force (training or eval).
        factor: f64,
        /// k' of the formula (1 for top-1, 2 for top-2, k for top-k).
        k_prime: usize,
        /// Lower bound.
        min_capacity: usize,
    },
    /// DeepSpeed without `drop_tokens`: C = largest count, clamped to S when asked (top-1).
    Dropless {
        /// Clamp C to the number of tokens (DeepSpeed top-1 does).
        clamp_to_tokens: bool,
    },
}

impl CapacityRule {
    /// The capacity when it follows from the shapes alone (`Fixed`, `DeepSpeed`); `None`
    /// when it depends on the counts (`Unlimited`, `Dropless`). Every backend uses this,
    /// so the f32 rounding of DeepSpeed's formula is written once.
    pub fn static_capacity(&self, tokens: usize, experts: usize) -> Option<usize> {
        match *self {
            CapacityRule::Fixed(c) => Some(c),
            CapacityRule::DeepSpeed { factor, k_prime, min_capacity } => {
                Some(deepspeed_capacity(tokens, experts, factor, k_prime, min_capacity))
            }
            CapacityRule::Unlimited | CapacityRule::Dropless { .. } => None,
        }
    }
}

/// DeepSpeed `_capacity`: `ceil((S / E) * torch.tensor(factor * k'))`, at least
/// `min_capacity`. `factor * k'` is a Python float turned into an f32 tensor, and S / E a
/// Python float that torch rounds to f32 for the product, so the arithmetic is f32 on
/// those two roundings.
pub fn deepspeed_capacity(tokens: usize, experts: usize, factor: f64, k_prime: usize, min_capacity: usize) -> usize {
    let c = ((tokens as f64 / experts as f64) as f32 * (factor * k_prime as f64) as f32).ceil();
    (c.max(0.0) as usize).max(min_capacity)
}

/// Which routes an over-full expert keeps, and the order of slots.
pub enum KeepPolicy<'a, B: Backend> {
    /// Slots in token order; keep the first C.
    TokenOrder,
    /// Slots ordered by route rank, then token (DeepSpeed top-2: every first choice before
    /// any second choice of the same expert); keep slots below C.
    RankMajor,
    /// Keep the C routes with the highest priority `[S, E]` (DeepSpeed RTS uniforms, or the
    /// probabilities for `drop_policy = probs`); kept routes take slots in token order.
    Priority(&'a Tensor<B>),
}

/// Everything the plan op needs.
pub struct PlanSpec<'a, B: Backend> {
    /// Number of experts E.
    pub num_experts: usize,
    /// Capacity rule.
    pub capacity: CapacityRule,
    /// Keep policy.
    pub keep: KeepPolicy<'a, B>,
    /// Optional `[S]` f32 mask: tokens with 0 are not routed (DeepSpeed `used_token`).
    pub used_token: Option<&'a Tensor<B>>,
    /// Tokens form consecutive groups of this size, each with its own capacity (Switch
    /// counts per sequence). `None`: one group.
    pub group_size: Option<usize>,
    /// Renormalise kept weights per token by max(sum, f32 eps) (DeepSpeed top-2 / top-k).
    pub renormalize_kept: bool,
}

impl<B: Backend> PlanSpec<'_, B> {
    /// Checks the plan's inputs for `s` tokens with `k` routes each (route weights,
    /// `used_token`, token groups, priorities) and returns the parameter block the GPU
    /// plan kernels take (shaders/plan.wgsl and kernels/plan.cu `Params`), in order:
    /// `[s, k, e, group, n_groups, cap_rule, cap_value, clamp, keep, has_used, renorm]`
    /// with cap_rule 0 unlimited / 1 static / 2 dropless and keep 0 token order /
    /// 1 rank-major / 2 priority.
    pub fn kernel_params(&self, s: usize, k: usize, route_weights: &[usize]) -> Result<[u32; 11]> {
        let e = self.num_experts;
        if route_weights != [s, k] {
            return Err(Error::shape("routes.weights", format!("[{s}, {k}]"), route_weights));
        }
        if let Some(u) = self.used_token {
            if u.shape() != [s] {
                return Err(Error::shape("used_token", format!("[{s}]"), u.shape()));
            }
        }
        let group = self.group_size.unwrap_or(s).max(1);
        if !s.is_multiple_of(group) {
            return Err(Error::shape("x", format!("tokens divisible into groups of {group}"), &[s]));
        }
        let (cap_rule, cap_value, clamp) = match self.capacity {
            CapacityRule::Unlimited => (0, 0, 0),
            CapacityRule::Fixed(_) | CapacityRule::DeepSpeed { .. } => {
                (1, self.capacity.static_capacity(s, e).unwrap_or(0).min(i32::MAX as usize) as u32, 0)
            }
            CapacityRule::Dropless { clamp_to_tokens } => (2, 0, clamp_to_tokens as u32),
        };
        let keep = match &self.keep {
            KeepPolicy::TokenOrder => 0,
            KeepPolicy::RankMajor => 1,
            KeepPolicy::Priority(p) => {
                if p.shape() != [s, e] {
                    return Err(Error::shape("priority (rts_uniform / probs)", format!("[{s}, {e}]"), p.shape()));
                }
                2
            }
        };
        let w = |v: usize| v.min(u32::MAX as usize) as u32;
        Ok([
            w(s),
            w(k),
            w(e),
            w(group),
            w(s / group),
            cap_rule,
            cap_value,
            clamp,
            keep,
            self.used_token.is_some() as u32,
            self.renormalize_kept as u32,
        ])
    }
}

/// The dispatch plan: counts, capacity and the slot and compact row of every route. No
/// dense `[S, E, C]` tensor exists anywhere.
pub struct Plan<B: Backend> {
    /// Routes per expert before dropping (after `used_token`), `[E]` i32.
    pub counts: Tensor<B>,
    /// First-choice routes per expert before dropping, `[E]` i32 (DeepSpeed top-2 l_aux).
    pub first_counts: Tensor<B>,
    /// Routes per expert after dropping, `[E]` i32.
    pub kept_counts: Tensor<B>,
    /// Exclusive prefix sum of `kept_counts`, `[E + 1]` i32: expert e's rows in the compact
    /// expert-major layout are `offsets[e]..offsets[e + 1]`.
    pub offsets: Tensor<B>,
    /// Slot of each route inside its expert's capacity buffer, `[S, k]` i32, −1 if dropped.
    pub slots: Tensor<B>,
    /// Row of each route in the compact layout, `[S, k]` i32, −1 if dropped.
    pub rows: Tensor<B>,
    /// Combine weight of each route, `[S, k]` f32, 0 if dropped.
    pub weights: Tensor<B>,
    /// `[capacity, dropped routes, masked routes, dropped tokens]` i32: a dropped token had
    /// every route dropped, so its routed output is 0.
    pub stats: Tensor<B>,
}

/// An expert stack's weights as [`Backend::grouped_mlp`] takes them: `w_in [G, N, K]`
/// (for GLU experts `N = 2I`, gate rows first, then up), `w_out [G, K', I]`.
pub struct MlpWeights<'a, B: Backend> {
    /// Linear, MLP or GLU, with its activation.
    pub kind: ExpertKind,
    /// First projection.
    pub w_in: &'a Tensor<B>,
    /// Bias of the first projection, `[G, N]`.
    pub b_in: Option<&'a Tensor<B>>,
    /// Second projection (absent for linear experts).
    pub w_out: Option<&'a Tensor<B>>,
    /// Bias of the second projection, `[G, K']`.
    pub b_out: Option<&'a Tensor<B>>,
}

/// Output of [`Backend::grouped_mlp`].
pub struct MlpOutput<B: Backend> {
    /// Output of the first projection before the activation (`[R, N]`), when asked for:
    /// what a backward pass of the activation needs. Never present for linear experts.
    pub pre: Option<Tensor<B>>,
    /// The expert outputs `[R, K']`.
    pub y: Tensor<B>,
}

/// [`Backend::grouped_mlp`] composed from the primitives: first product, activation or
/// GLU, second product. The trait's default, and the fallback of backends that fuse only
/// some expert kinds.
pub fn grouped_mlp_unfused<B: Backend>(
    b: &B,
    xp: &Tensor<B>,
    offsets: &Tensor<B>,
    w: &MlpWeights<'_, B>,
    keep_pre: bool,
) -> Result<MlpOutput<B>> {
    let h = b.grouped_linear(xp, offsets, w.w_in, w.b_in)?;
    let a = match w.kind {
        ExpertKind::Linear => return Ok(MlpOutput { pre: None, y: h }),
        ExpertKind::Mlp { activation } => b.activation(&h, activation)?,
        ExpertKind::Glu { activation } => b.glu(&h, activation)?,
    };
    let w_out = w.w_out.ok_or_else(|| Error::MissingTensor("w_out (output projection)".into()))?;
    let y = b.grouped_linear(&a, offsets, w_out, w.b_out)?;
    Ok(MlpOutput { pre: keep_pre.then_some(h), y })
}

/// A compute backend. See the module docs for the conventions.
pub trait Backend: Send + Sync + Sized + 'static {
    /// A device buffer handle.
    type Buffer: Send + Sync;

    /// Short backend name (`cpu`, `wgpu`, `cuda`).
    fn name(&self) -> &'static str;
    /// What this backend and device can do.
    fn capabilities(&self) -> Capabilities;

    // ---------------------------------------------------------------- memory and queue
    /// Copies a host tensor to the device, stored as `dtype` (f32 data may be stored as
    /// f16/bf16 where the capabilities list them; i32 data stays i32).
    fn upload_as(&self, t: &HostTensor, dtype: DType) -> Result<Tensor<Self>>;
    /// Copies a device tensor to the host (f16/bf16 come back as f32); waits for the queue.
    fn download(&self, t: &Tensor<Self>) -> Result<HostTensor>;
    /// Waits until every enqueued op has finished.
    fn synchronize(&self) -> Result<()>;

    /// Uploads a weight matrix `[out, in]` or stack `[G, out, in]` (the right operand of
    /// [`Backend::linear`] / [`Backend::grouped_linear`]) in whatever layout this backend's
    /// matrix products run fastest on. The logical shape is unchanged and
    /// [`Backend::download`] returns the original layout.
    fn upload_weight(&self, t: &HostTensor, dtype: DType) -> Result<Tensor<Self>> {
        self.upload_as(t, dtype)
    }

    /// Copies a host tensor to the device in its own dtype.
    fn upload(&self, t: &HostTensor) -> Result<Tensor<Self>> {
        let dt = t.dtype();
        self.upload_as(t, dt)
    }

    // ---------------------------------------------------------------- matrix products
    /// `x [R, K] · w [N, K]ᵀ (+ bias [N])` → `[R, N]`.
    fn linear(&self, x: &Tensor<Self>, w: &Tensor<Self>, bias: Option<&Tensor<Self>>) -> Result<Tensor<Self>>;
    /// Grouped product over variable-size row groups read from the device: rows
    /// `offsets[g]..offsets[g + 1]` of `x [R, K]` are multiplied by `w[g] [N, K]ᵀ`
    /// (+ `bias[g]`). Rows past `offsets[G]` are zero in the output.
    fn grouped_linear(
        &self,
        x: &Tensor<Self>,
        offsets: &Tensor<Self>,
        w: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
    ) -> Result<Tensor<Self>>;

    /// The whole expert MLP over compact expert-major rows grouped by `offsets`:
    /// `w_out · act(w_in · x)` (GLU: `w_out · (act(gate) · up)`), with biases. The default
    /// composes the primitives ([`grouped_mlp_unfused`]); backends override it to keep
    /// each tile of the first product in cache through the activation, which saves a
    /// round trip of the `[R, N]` intermediate through memory. `keep_pre` asks for that
    /// intermediate in the output (for a backward pass).
    fn grouped_mlp(
        &self,
        xp: &Tensor<Self>,
        offsets: &Tensor<Self>,
        w: &MlpWeights<'_, Self>,
        keep_pre: bool,
    ) -> Result<MlpOutput<Self>> {
        grouped_mlp_unfused(self, xp, offsets, w, keep_pre)
    }

    // ---------------------------------------------------------------- elementwise
    /// Applies an activation elementwise.
    fn activation(&self, x: &Tensor<Self>, act: Activation) -> Result<Tensor<Self>>;
    /// Gated linear unit: `x [R, 2I]` (gate columns first) → `act(gate) · up`, `[R, I]`.
    fn glu(&self, x: &Tensor<Self>, act: Activation) -> Result<Tensor<Self>>;
    /// Elementwise product of equal-shape tensors (multiplicative jitter).
    fn mul(&self, a: &Tensor<Self>, b: &Tensor<Self>) -> Result<Tensor<Self>>;
    /// `a + sigmoid(gate) · b` with `gate [R, 1]`, or `a + b` without a gate.
    fn add_gated(&self, a: &Tensor<Self>, b: &Tensor<Self>, gate: Option<&Tensor<Self>>) -> Result<Tensor<Self>>;
    /// DeepSpeed residual MoE: `c = softmax(coef [R, 2])`, `moe · c₀ + mlp · c₁`.
    fn residual_mix(&self, moe: &Tensor<Self>, mlp: &Tensor<Self>, coef: &Tensor<Self>) -> Result<Tensor<Self>>;

    // ---------------------------------------------------------------- routing
    /// Scores, choice and weights of every token. Errors on non-finite logits, naming the
    /// first bad token.
    fn route(&self, logits: &Tensor<Self>, spec: &RouteSpec<'_, Self>) -> Result<Routes<Self>>;
    /// Counts, capacity, slots, compact rows and combine weights of every route.
    fn plan(&self, routes: &Routes<Self>, spec: &PlanSpec<'_, Self>) -> Result<Plan<Self>>;
    /// Gathers token rows into the compact expert-major layout: row `rows[s, j]` of the
    /// output `[S·k, M]` is `x[s]`; rows past `offsets[E]` are zero.
    fn permute(&self, x: &Tensor<Self>, plan: &Plan<Self>) -> Result<Tensor<Self>>;
    /// Weighted sum back to token order: `y[s] = Σⱼ weights[s, j] · yp[rows[s, j]]`, f32
    /// accumulation in route order, dropped routes contribute nothing.
    fn combine(&self, yp: &Tensor<Self>, plan: &Plan<Self>) -> Result<Tensor<Self>>;
    /// Reductions for the losses: `[E + 1]` f32 holding the mean score of each expert over
    /// tokens, then the mean of `logsumexp(logits)²` (Switch z-loss).
    fn router_stats(&self, logits: &Tensor<Self>, scores: &Tensor<Self>) -> Result<Tensor<Self>>;

    // ---------------------------------------------------------------- randomness
    /// Philox 4x32-10 noise of `kind` for `shape`, stream `stream` of `seed`. The default
    /// draws on the host and uploads; GPU backends generate on the device with the same
    /// counter layout, so one seed gives the same numbers everywhere.
    fn noise(&self, kind: NoiseKind, seed: u64, stream: u32, shape: &[usize]) -> Result<Tensor<Self>> {
        let n: usize = shape.iter().product();
        let host = HostTensor::f32(shape, philox::noise(kind, seed, stream, n))?;
        self.upload(&host)
    }
}

//! The dispatch plan: counts, capacity, the slot and compact row of every route, and the
//! combine weights. No dense `[S, E, C]` tensor exists anywhere.

use super::{f32_shaped, fits_i32, output, to_u32, Offsets, Routes};
use crate::device::{Device, Tensor};
use crate::error::{Error, Result};
use crate::kernel_abi::plan::{PlanSchedule, PlanSlice};
use crate::kernel_abi::PlanParams;
use crate::tensor::{mul_size, DType};

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
    /// The capacity when it follows from the shapes alone (`Fixed`, `DeepSpeed`), as the
    /// exact integer the reference computes; `None` when it depends on the counts
    /// (`Unlimited`, `Dropless`). Every backend uses this, so the f32 rounding of
    /// DeepSpeed's formula is written once.
    pub fn static_capacity(&self, tokens: usize, experts: usize) -> Result<Option<u64>> {
        match *self {
            CapacityRule::Fixed(c) if c as u64 > i64::MAX as u64 => {
                Err(Error::config("expert_capacity", format!("{c} is past the 64-bit counts reports use")))
            }
            CapacityRule::Fixed(c) => Ok(Some(c as u64)),
            CapacityRule::DeepSpeed { factor, k_prime, min_capacity } => {
                deepspeed_capacity(tokens, experts, factor, k_prime, min_capacity).map(Some)
            }
            CapacityRule::Unlimited | CapacityRule::Dropless { .. } => Ok(None),
        }
    }
}

/// DeepSpeed `_capacity`: `ceil((S / E) * torch.tensor(factor * k'))`, at least
/// `min_capacity`. `factor * k'` is a Python float turned into an f32 tensor, and S / E a
/// Python float that torch rounds to f32 for the product, so the arithmetic is f32 on
/// those two roundings. A factor so large that the product is not a finite integer below
/// 2⁶³ is an error naming `capacity_factor`.
pub fn deepspeed_capacity(
    tokens: usize,
    experts: usize,
    factor: f64,
    k_prime: usize,
    min_capacity: usize,
) -> Result<u64> {
    if experts == 0 {
        return Err(Error::config("num_experts", "must be > 0"));
    }
    let c = ((tokens as f64 / experts as f64) as f32 * (factor * k_prime as f64) as f32).ceil();
    if !(c.is_finite() && (c as f64) < 9.2e18) {
        return Err(Error::config(
            "capacity_factor",
            format!(
                "{factor} gives capacity ceil({tokens} / {experts} · {factor} · {k_prime}) = {c}, not a 64-bit count"
            ),
        ));
    }
    if min_capacity as u64 > i64::MAX as u64 {
        return Err(Error::config("min_capacity", format!("{min_capacity} is past the 64-bit counts reports use")));
    }
    Ok((c.max(0.0) as u64).max(min_capacity as u64))
}

/// Which routes an over-full expert keeps, and the order of slots.
pub enum KeepPolicy<'a, B: Device> {
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
pub struct PlanSpec<'a, B: Device> {
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

/// A capacity that follows from the shapes: the reference's exact value (reported) and
/// the value the kernels use, at most S·k (any capacity from S·k up keeps every route, so
/// the two give the same plan).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StaticCapacity {
    /// The capacity as the reference computes it.
    pub exact: u64,
    /// `min(exact, S·k)`: what the plan kernels take.
    pub kernel: u32,
}

/// The plan op with checked operands, its parameters and its multi-pass schedule.
#[non_exhaustive]
pub struct PlanOp<'a, B: Device> {
    /// The routes.
    pub routes: &'a Routes<B>,
    /// The spec (checked against the routes).
    pub spec: &'a PlanSpec<'a, B>,
    /// Tokens S, routes per token k, experts E.
    pub dims: (usize, usize, usize),
    /// Tokens per capacity group (S when there is one group; at least 1).
    pub group: usize,
    /// Capacity groups.
    pub n_groups: usize,
    /// The static capacity, where the rule gives one.
    pub capacity: Option<StaticCapacity>,
    /// Kernel parameters and passes.
    pub schedule: PlanSchedule,
}

impl<'a, B: Device> PlanOp<'a, B> {
    /// Checks the routes against the spec and every size the plan's i32 tensors hold.
    pub fn check(b: &B, routes: &'a Routes<B>, spec: &'a PlanSpec<'a, B>) -> Result<Self> {
        let (s, k, e) = (routes.tokens(), routes.k(), routes.num_experts());
        if spec.num_experts != e {
            return Err(Error::shape(
                "routes.scores",
                format!("[tokens, {}] (the plan's num_experts)", spec.num_experts),
                routes.scores.shape(),
            ));
        }
        if let Some(u) = spec.used_token {
            f32_shaped("used_token", u, &[s])?;
        }
        let group = match spec.group_size {
            Some(0) => return Err(Error::config("group_size", "token groups must hold at least one token")),
            Some(g) => g,
            None => s.max(1),
        };
        if !s.is_multiple_of(group) {
            return Err(Error::shape("x", format!("tokens divisible into groups of {group}"), &[s]));
        }
        let n_groups = s / group;
        let sk = mul_size("routes (tokens × k)", s, k)?;
        fits_i32("routes (tokens × k)", sk)?;
        let ge = mul_size("token groups × experts", n_groups, e)?;
        fits_i32("token groups × experts", ge)?;
        let capacity = spec
            .capacity
            .static_capacity(s, e)?
            .map(|exact| StaticCapacity { exact, kernel: exact.min(sk as u64) as u32 });
        let (cap_rule, clamp) = match spec.capacity {
            CapacityRule::Unlimited => (0, 0),
            CapacityRule::Fixed(_) | CapacityRule::DeepSpeed { .. } => (1, 0),
            CapacityRule::Dropless { clamp_to_tokens } => (2, clamp_to_tokens as u32),
        };
        let keep = match &spec.keep {
            KeepPolicy::TokenOrder => 0,
            KeepPolicy::RankMajor => 1,
            KeepPolicy::Priority(p) => {
                f32_shaped("priority (rts_uniform / probs)", p, &[s, e])?;
                2
            }
        };
        let params = PlanParams {
            s: to_u32("tokens", s)?,
            k: to_u32("k", k)?,
            e: to_u32("experts", e)?,
            group: to_u32("token group", group)?,
            n_groups: to_u32("token groups", n_groups)?,
            cap_rule,
            cap_value: capacity.map_or(0, |c| c.kernel),
            clamp,
            keep,
            has_used: spec.used_token.is_some() as u32,
            renorm: spec.renormalize_kept as u32,
            _pad0: 0,
        };
        let schedule = PlanSchedule::new(params);
        // The kernels index every buffer in 32 bits.
        fits_i32("plan scratch words", schedule.scratch_words)?;
        output(b, "plan scratch", &[schedule.scratch_words], DType::I32)?;
        output(b, "plan slots and rows", &[schedule.slots_rows_words], DType::I32)?;
        Ok(PlanOp { routes, spec, dims: (s, k, e), group, n_groups, capacity, schedule })
    }
}

/// What a backend's plan op returns; the front door checks the shapes and seals it.
pub struct PlanParts<B: Device> {
    /// `[E]` i32.
    pub counts: Tensor<B>,
    /// `[E]` i32.
    pub first_counts: Tensor<B>,
    /// `[E]` i32.
    pub kept_counts: Tensor<B>,
    /// `[E + 1]` i32.
    pub offsets: Tensor<B>,
    /// `[S, k]` i32.
    pub slots: Tensor<B>,
    /// `[S, k]` i32.
    pub rows: Tensor<B>,
    /// `[S, k]` f32.
    pub weights: Tensor<B>,
    /// `[4]` i32.
    pub stats: Tensor<B>,
}

impl<B: Device> PlanParts<B> {
    /// The parts of a plan run by `schedule`: each i32 output cut from the scratch buffer
    /// it sits in by `take` (which copies a [`PlanSlice`] into a tensor of its shape), the
    /// combine weights as written. How the GPU backends unpack the plan.
    pub fn from_schedule(
        schedule: &PlanSchedule,
        weights: Tensor<B>,
        mut take: impl FnMut(&PlanSlice) -> Result<Tensor<B>>,
    ) -> Result<Self> {
        Ok(PlanParts {
            counts: take(&schedule.counts())?,
            first_counts: take(&schedule.first_counts())?,
            kept_counts: take(&schedule.kept_counts())?,
            offsets: take(&schedule.offsets())?,
            slots: take(&schedule.slots())?,
            rows: take(&schedule.rows())?,
            weights,
            stats: take(&schedule.stats())?,
        })
    }
}

/// The dispatch plan: counts, capacity and the slot and compact row of every route. Only
/// the plan op makes one, so every row indexes the `[S·k, M]` compact layout.
pub struct Plan<B: Device> {
    /// Routes per expert before dropping (after `used_token`), `[E]` i32.
    pub counts: Tensor<B>,
    /// First-choice routes per expert before dropping, `[E]` i32 (DeepSpeed top-2 l_aux).
    pub first_counts: Tensor<B>,
    /// Routes per expert after dropping, `[E]` i32.
    pub kept_counts: Tensor<B>,
    /// Exclusive prefix sum of `kept_counts`, `[E + 1]`: expert e's rows in the compact
    /// expert-major layout are `offsets[e]..offsets[e + 1]`.
    pub offsets: Offsets<B>,
    /// Slot of each route inside its expert's capacity buffer, `[S, k]` i32, −1 if dropped.
    pub slots: Tensor<B>,
    /// Row of each route in the compact layout, `[S, k]` i32, −1 if dropped.
    pub rows: Tensor<B>,
    /// Combine weight of each route, `[S, k]` f32, 0 if dropped.
    pub weights: Tensor<B>,
    /// `[capacity (for the kernels), dropped routes, masked routes, dropped tokens]` i32: a
    /// dropped token had every route dropped, so its routed output is 0.
    pub stats: Tensor<B>,
    capacity: Option<StaticCapacity>,
    dims: (usize, usize, usize),
}

impl<B: Device> Plan<B> {
    /// Checks what a backend returned for `op`.
    pub(crate) fn seal(b: &B, op: &PlanOp<'_, B>, p: PlanParts<B>) -> Result<Self> {
        let (s, k, e) = op.dims;
        let i = |t, shape: &[usize]| super::returned(b, "plan", t, shape, DType::I32);
        Ok(Plan {
            counts: i(p.counts, &[e])?,
            first_counts: i(p.first_counts, &[e])?,
            kept_counts: i(p.kept_counts, &[e])?,
            offsets: Offsets::from_plan(i(p.offsets, &[e + 1])?, s * k),
            slots: i(p.slots, &[s, k])?,
            rows: i(p.rows, &[s, k])?,
            weights: super::returned(b, "plan", p.weights, &[s, k], DType::F32)?,
            stats: i(p.stats, &[4])?,
            capacity: op.capacity,
            dims: op.dims,
        })
    }

    /// Tokens S.
    pub fn tokens(&self) -> usize {
        self.dims.0
    }

    /// Routes per token k.
    pub fn k(&self) -> usize {
        self.dims.1
    }

    /// Experts E.
    pub fn num_experts(&self) -> usize {
        self.dims.2
    }

    /// The capacity as the reference computes it, when the rule fixes it from the shapes
    /// (what reports show; the `stats` tensor holds the kernels' value, at most S·k).
    pub fn static_capacity(&self) -> Option<u64> {
        self.capacity.map(|c| c.exact)
    }
}

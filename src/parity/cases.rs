//! The parity cases: one struct per op, each declaring its inputs, the op it runs and its
//! tolerance. [`run_all`] lists every case the support matrix covers.

use super::{OpCase, Runner};
use crate::backend::Backend;
use crate::device::Capabilities;
use crate::device::Tensor;
use crate::error::{Error, Result};
use crate::expert::{Activation, ExpertKind, GluClamp};
use crate::ops::{
    BlockTable, CapacityRule, Choice, DevicePlacement, GroupScore, GroupedMlpOp, KeepPolicy, MlpWeights, Normalize,
    Offsets, PlanSpec, RouteSpec, Routes, ScoreFn,
};
use crate::philox::{self, NoiseKind};
use crate::tensor::{DType, HostTensor};

/// Named outputs of a case.
pub(super) type Outputs<B> = Vec<(&'static str, Tensor<B>)>;

/// Tolerance of f32 products: the backends accumulate over K in different orders.
pub(super) const PRODUCT_TOL: f64 = 1e-5;
/// Tolerance of elementwise and routing math: the last ulp of the transcendentals.
pub(super) const ELEMENTWISE_TOL: f64 = 2e-6;

/// Products with `dtype` weights on a candidate that rounds product inputs to that type
/// ([`Capabilities::half_inputs`]) are held to [`super::half_tolerance`]; otherwise
/// (f32 inputs, whatever the weights' storage) to the f32 bound.
pub(super) fn product_tolerance(dtype: DType, caps: &Capabilities) -> f64 {
    match (caps.half_inputs, super::half_tolerance(dtype)) {
        (true, Some(tol)) => tol,
        _ => PRODUCT_TOL,
    }
}

/// Philox uniforms in [-scale, scale) (the same on every run).
pub(super) fn rand(shape: &[usize], stream: u32, scale: f32) -> HostTensor {
    let n = shape.iter().product();
    let v =
        philox::words(0x5eed, stream, n).into_iter().map(|w| (philox::to_open_unit(w) * 2.0 - 1.0) * scale).collect();
    HostTensor::f32(shape, v).expect("the shape's product is the length drawn")
}

/// A weight in `dtype` storage where the backend has it; otherwise (the f32 reference)
/// the same values rounded to `dtype` and stored in f32, so both sides multiply the same
/// numbers and the comparison isolates the backend's half-precision path.
pub(super) fn weight<B: Backend>(b: &B, w: &HostTensor, dtype: DType) -> Result<Tensor<B>> {
    if dtype == DType::F32 || b.capabilities().storage_dtypes.contains(&dtype) {
        return b.upload_weight(w, dtype);
    }
    b.upload_weight(&w.rounded(dtype)?, DType::F32)
}

pub(super) fn offsets_of(counts: &[usize]) -> Vec<i32> {
    let mut off = vec![0i32];
    for c in counts {
        off.push(off.last().copied().unwrap_or(0) + *c as i32);
    }
    off
}

fn missing_pre() -> Error {
    Error::Internal("the pre-activation was asked for and not returned".into())
}

// ------------------------------------------------------------------ products

/// `linear`: `x [r, k] · w [n, k]ᵀ (+ bias)`.
pub struct LinearCase {
    /// Rows, inner size, output columns.
    pub r: usize,
    /// Inner size.
    pub k: usize,
    /// Output columns.
    pub n: usize,
    /// With a bias.
    pub bias: bool,
    /// Weight storage.
    pub dtype: DType,
}

impl OpCase for LinearCase {
    const OP: &'static str = "linear";
    fn name(&self) -> String {
        let (r, k, n) = (self.r, self.k, self.n);
        format!("{r}x{k} · {n}x{k}ᵀ{}", if self.bias { " + bias" } else { "" })
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn tolerance(&self, caps: &Capabilities) -> f64 {
        product_tolerance(self.dtype, caps)
    }
    fn run<B: Backend>(&self, b: &B) -> Result<Outputs<B>> {
        let (x, w, bb) = (rand(&[self.r, self.k], 1, 1.0), rand(&[self.n, self.k], 2, 0.3), rand(&[self.n], 3, 1.0));
        let bias = if self.bias { Some(b.upload(&bb)?) } else { None };
        Ok(vec![("y", b.linear(&b.upload(&x)?, &weight(b, &w, self.dtype)?, bias.as_ref())?)])
    }
}

/// `grouped_linear` over groups of the given row counts (with biases).
pub struct GroupedLinearCase {
    /// What the groups exercise.
    pub what: &'static str,
    /// Rows per group.
    pub counts: Vec<usize>,
    /// Extra rows past the last group (their output is zero).
    pub rows_past: usize,
    /// The last `tail` groups are weightless ([`Offsets::with_tail`]): the weight stack
    /// has `counts.len() − tail` experts and the tail's rows come out zero.
    pub tail: usize,
    /// Weight storage.
    pub dtype: DType,
}

impl OpCase for GroupedLinearCase {
    const OP: &'static str = "grouped_linear";
    fn name(&self) -> String {
        format!("{} (+ bias)", self.what)
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn tolerance(&self, caps: &Capabilities) -> f64 {
        product_tolerance(self.dtype, caps)
    }
    fn run<B: Backend>(&self, b: &B) -> Result<Outputs<B>> {
        let (g, k, n) = (self.counts.len() - self.tail, 23, 67);
        let rows = self.counts.iter().sum::<usize>() + self.rows_past;
        let x = if rows == 0 { HostTensor::f32(&[0, k], vec![])? } else { rand(&[rows, k], 4, 1.0) };
        let (w, bb) = (rand(&[g, n, k], 5, 0.3), rand(&[g, n], 6, 1.0));
        let off = Offsets::from_host(b, &offsets_of(&self.counts))?.with_tail(self.tail);
        let y = b.grouped_linear(&b.upload(&x)?, &off, &weight(b, &w, self.dtype)?, Some(&b.upload(&bb)?))?;
        Ok(vec![("y", y)])
    }
}

/// `grouped_mlp` on GLU experts over groups of rows 3, 0, 40, 1 (and with `tail`, two
/// groups of identity experts after them, whose rows come out zero); outputs the result,
/// the pre-activation and, where asked, the unfused composition for comparison.
pub struct GroupedMlpCase {
    /// What the case exercises.
    pub what: &'static str,
    /// The GLU activation.
    pub act: Activation,
    /// The GLU's clamp (gpt-oss, DeepSeek-V4).
    pub clamp: Option<GluClamp>,
    /// Two weightless tail groups of 5 and 2 rows ([`Offsets::with_tail`]).
    pub tail: bool,
    /// With biases on both projections.
    pub biases: bool,
    /// Also return the unfused composition of the same weights.
    pub unfused: bool,
    /// Weight storage.
    pub dtype: DType,
}

impl OpCase for GroupedMlpCase {
    const OP: &'static str = "grouped_mlp";
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
        let counts: &[usize] = if self.tail { &[3, 0, 40, 1, 5, 2] } else { &[3, 0, 40, 1] };
        let (g, h, f) = (4, 24, 36);
        let rows: usize = counts.iter().sum();
        let (x, w_in, w_out) = (rand(&[rows, h], 7, 1.0), rand(&[g, 2 * f, h], 8, 0.3), rand(&[g, h, f], 9, 0.3));
        let (wi, wo) = (weight(b, &w_in, self.dtype)?, weight(b, &w_out, self.dtype)?);
        let (bi, bo) = if self.biases {
            (Some(b.upload(&rand(&[g, 2 * f], 16, 0.5))?), Some(b.upload(&rand(&[g, h], 17, 0.5))?))
        } else {
            (None, None)
        };
        let w = MlpWeights {
            kind: ExpertKind::Glu { activation: self.act, clamp: self.clamp },
            w_in: &wi,
            b_in: bi.as_ref(),
            w_out: Some(&wo),
            b_out: bo.as_ref(),
        };
        let off = Offsets::from_host(b, &offsets_of(counts))?.with_tail(counts.len() - g);
        let xt = b.upload(&x)?;
        let out = b.grouped_mlp(&xt, &off, &w, true)?;
        let mut outs = vec![("y", out.y), ("pre", out.pre.ok_or_else(missing_pre)?)];
        if self.unfused {
            let op = GroupedMlpOp::check(b, &xt, &off, &w, false)?;
            outs.push(("y unfused", b.grouped_mlp_unfused(&op)?.y));
        }
        Ok(outs)
    }
}

// ------------------------------------------------------------------ weight storage

/// `cast_weight` against `upload_weight`, bitwise: an f32 tensor on the device stored in
/// `dtype` must download to exactly what `upload_weight` of the same values downloads to.
/// The values hit every edge of the rounding: ties to even (normal and subnormal), the
/// largest half and the values that round past it, f32 subnormals, signed zeros, ±inf,
/// quiet, signalling and negative NaNs with payloads, random bit patterns (every exponent)
/// and random values in the half range. Both outputs are the downloaded values' f32 bit
/// patterns (i32), so NaN compares by its bits; a backend that does not store `dtype`
/// (the cpu reference, for halves) gives the values rounded on the host, which is what
/// `upload_weight` stores ([`DType::half_bits`]).
pub struct CastWeightCase {
    /// `[N, K]` or `[G, N, K]` (an odd count leaves half a packed word).
    pub shape: Vec<usize>,
    /// Storage dtype.
    pub dtype: DType,
}

impl CastWeightCase {
    /// The edge values of `dtype`'s rounding (f32 bit patterns).
    fn edges(dtype: DType) -> Vec<u32> {
        let f = |x: f32| x.to_bits();
        let mut v = vec![
            f(0.0),
            f(-0.0),
            f(1.0),
            f(f32::INFINITY),
            f(f32::NEG_INFINITY),
            0x7fc0_0000, // quiet NaN
            0xffc0_0001, // negative quiet NaN with a payload
            0x7f80_0001, // signalling NaN, payload in the low bits only
            0x7fa1_2345, // signalling NaN with a payload in the top bits
            0x0000_0001, // the smallest f32 subnormal
            0x8000_8000, // a negative f32 subnormal on a bf16 tie (to even: zero)
            0x0001_8000, // an f32 subnormal on a bf16 tie (to even: up)
            0x007f_ffff, // the largest f32 subnormal
            f(f32::MAX),
            f(f32::MIN),
            f(f32::MIN_POSITIVE),
        ];
        v.extend(match dtype {
            DType::F16 => vec![
                f(1.0 + 2f32.powi(-11)),                     // tie, retained even: down
                f(1.0 + 3.0 * 2f32.powi(-11)),               // tie, retained odd: up
                f(-(1.0 + 2f32.powi(-11) + 2f32.powi(-20))), // above the tie: up
                f(65504.0),                                  // the largest f16
                f(65519.0),                                  // rounds down to it
                f(65520.0),                                  // tie past it: to even, infinity
                f(-1e5),
                f(2f32.powi(-24)),                  // the smallest f16 subnormal
                f(2f32.powi(-25)),                  // half of it: tie to even, zero
                f(3.0 * 2f32.powi(-25)),            // tie between subnormals 1 and 2: up
                f(2f32.powi(-25) * 1.0001),         // just above half: up
                f(2f32.powi(-14) - 2f32.powi(-25)), // rounds up to the smallest normal
                f(2f32.powi(-26)),                  // below half the smallest: zero
                f(-5.96e-8),
            ],
            _ => vec![
                f(1.0 + 2f32.powi(-8)),
                f(1.0 + 3.0 * 2f32.powi(-8)),
                f(-(1.0 + 2f32.powi(-8) + 2f32.powi(-20))),
                0x7f7f_8000, // tie between the largest bf16 and infinity: to even, infinity
                0x7f7f_7fff, // just below it: the largest bf16
                f(3.0e38),
                f(-1e-39),
            ],
        });
        v
    }

    /// The case's input: the edge values of its dtype, then random bit patterns and random
    /// values of every exponent the half type has (the emulated CUDA test casts these too).
    pub fn values(&self) -> Result<HostTensor> {
        let n: usize = self.shape.iter().product();
        let mut bits = Self::edges(self.dtype);
        let words = philox::words(0xca57, 31, n);
        // Random bit patterns (every exponent, NaNs included), then random values of every
        // exponent the half type has.
        for (i, w) in words.iter().enumerate() {
            let v = if i % 2 == 0 {
                *w
            } else {
                let max_exp = if self.dtype == DType::F16 { 16 } else { 60 };
                let e = (w >> 24) as i32 % (2 * max_exp) - max_exp;
                let m = philox::to_open_unit(w.rotate_left(7)) * 2.0 - 1.0;
                (m * 2f32.powi(e)).to_bits()
            };
            bits.push(v);
        }
        bits.truncate(n);
        HostTensor::f32(&self.shape, bits.into_iter().map(f32::from_bits).collect())
    }

    /// The downloaded values' bit patterns, as i32 (NaN compared by its bits).
    fn bits<B: Backend>(b: &B, h: &HostTensor) -> Result<Tensor<B>> {
        let v = h.as_f32("stored weight")?;
        b.upload(&HostTensor::i32(h.shape(), v.iter().map(|x| x.to_bits() as i32).collect())?)
    }
}

impl OpCase for CastWeightCase {
    const OP: &'static str = "cast_weight";
    fn name(&self) -> String {
        format!("{:?}: ties to even, subnormals, overflow, ±inf, NaN payloads, random bits", self.shape)
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn tolerance(&self, _: &Capabilities) -> f64 {
        0.0
    }
    fn run<B: Backend>(&self, b: &B) -> Result<Outputs<B>> {
        let x = self.values()?;
        if !b.capabilities().storage_dtypes.contains(&self.dtype) {
            // The reference without the type: what upload_weight stores, rounded here.
            let r =
                HostTensor::f32(x.shape(), self.dtype.from_half_bits(&self.dtype.half_bits(x.as_f32("weight")?)?)?)?;
            return Ok(vec![("cast_weight", Self::bits(b, &r)?), ("upload_weight", Self::bits(b, &r)?)]);
        }
        let cast = b.download(&b.cast_weight(&b.upload(&x)?, self.dtype)?)?;
        let uploaded = b.download(&b.upload_weight(&x, self.dtype)?)?;
        Ok(vec![("cast_weight", Self::bits(b, &cast)?), ("upload_weight", Self::bits(b, &uploaded)?)])
    }
}

// ------------------------------------------------------------------ elementwise

/// The elementwise ops on random inputs.
pub enum ElementwiseCase {
    /// `activation` on `[7, 143]`.
    Activation(Activation),
    /// `glu` on `[7, 142]`.
    Glu(Activation),
    /// The clamped `glu` on `[7, 142]` (values in [-6, 6), so the clamps bite).
    GluClamped(Activation, GluClamp),
    /// `add_bias` of a `[33]` bias to a `[9, 33]`.
    AddBias,
    /// `mul` of two `[9, 33]`.
    Mul,
    /// `add_gated`, with a sigmoid gate or plain.
    AddGated {
        /// With the gate.
        gated: bool,
    },
    /// `residual_mix` with softmax coefficients.
    ResidualMix,
    /// `scale` of a `[9, 33]` by a factor.
    Scale(f32),
}

impl ElementwiseCase {
    fn name(&self) -> String {
        match self {
            ElementwiseCase::Activation(a) | ElementwiseCase::Glu(a) => a.name().into(),
            ElementwiseCase::GluClamped(a, c) => {
                format!("{} clamped to {} (α {}, up + {})", a.name(), c.limit, c.alpha, c.up_offset)
            }
            ElementwiseCase::AddBias => "[9, 33] + [33]".into(),
            ElementwiseCase::Mul => "9x33".into(),
            ElementwiseCase::AddGated { gated } => if *gated { "sigmoid gate" } else { "plain" }.into(),
            ElementwiseCase::ResidualMix => "softmax coefficient".into(),
            ElementwiseCase::Scale(alpha) => format!("by {alpha}"),
        }
    }

    fn run<B: Backend>(&self, b: &B) -> Result<Outputs<B>> {
        let (ya, yb) = (rand(&[9, 33], 12, 1.0), rand(&[9, 33], 13, 1.0));
        let up = |t: &HostTensor| b.upload(t);
        let y = match self {
            ElementwiseCase::Activation(a) => b.activation(&up(&rand(&[7, 143], 10, 6.0))?, *a)?,
            ElementwiseCase::Glu(a) => b.glu(&up(&rand(&[7, 2 * 71], 11, 6.0))?, *a)?,
            ElementwiseCase::GluClamped(a, c) => b.glu_clamped(&up(&rand(&[7, 2 * 71], 11, 6.0))?, *a, Some(*c))?,
            ElementwiseCase::AddBias => b.add_bias(&up(&ya)?, &up(&rand(&[33], 18, 1.0))?)?,
            ElementwiseCase::Mul => b.mul(&up(&ya)?, &up(&yb)?)?,
            ElementwiseCase::AddGated { gated } => {
                let g = if *gated { Some(up(&rand(&[9, 1], 14, 3.0))?) } else { None };
                b.add_gated(&up(&ya)?, &up(&yb)?, g.as_ref())?
            }
            ElementwiseCase::ResidualMix => b.residual_mix(&up(&ya)?, &up(&yb)?, &up(&rand(&[9, 2], 15, 3.0))?)?,
            ElementwiseCase::Scale(alpha) => b.scale(&up(&ya)?, *alpha)?,
        };
        Ok(vec![("y", y)])
    }
}

macro_rules! elementwise_op {
    ($ty:ident, $op:literal) => {
        #[doc = concat!("`", $op, "` cases.")]
        pub struct $ty(pub ElementwiseCase);
        impl OpCase for $ty {
            const OP: &'static str = $op;
            fn name(&self) -> String {
                self.0.name()
            }
            fn tolerance(&self, _: &Capabilities) -> f64 {
                ELEMENTWISE_TOL
            }
            fn run<B: Backend>(&self, b: &B) -> Result<Outputs<B>> {
                self.0.run(b)
            }
        }
    };
}
elementwise_op!(ActivationCase, "activation");
elementwise_op!(GluCase, "glu");
elementwise_op!(MulCase, "mul");
elementwise_op!(AddGatedCase, "add_gated");
elementwise_op!(ResidualMixCase, "residual_mix");
elementwise_op!(ScaleCase, "scale");
elementwise_op!(AddBiasCase, "add_bias");

// ------------------------------------------------------------------ noise

/// `noise`: 1001 values of a distribution (uniforms must match bit for bit; the
/// transforms to the last ulp).
pub struct NoiseCase {
    /// The distribution.
    pub kind: NoiseKind,
    /// Its name.
    pub what: &'static str,
}

impl OpCase for NoiseCase {
    const OP: &'static str = "noise";
    fn name(&self) -> String {
        format!("{}, 1001 values", self.what)
    }
    fn tolerance(&self, _: &Capabilities) -> f64 {
        ELEMENTWISE_TOL
    }
    fn run<B: Backend>(&self, b: &B) -> Result<Outputs<B>> {
        Ok(vec![("noise", b.noise(self.kind, 0x1234_5678_9abc, 3, &[7, 143])?)])
    }
}

// ------------------------------------------------------------------ routing

/// Where a route case's logits come from.
pub enum Logits {
    /// Philox uniforms in [-3, 3).
    Random,
    /// Given values with exact ties.
    Given(Vec<f32>),
}

/// `route` with a spec of every kind.
pub struct RouteCase {
    /// What the case exercises.
    pub what: &'static str,
    /// Tokens.
    pub s: usize,
    /// Experts.
    pub e: usize,
    /// Routes per token.
    pub k: usize,
    /// Score function.
    pub score: ScoreFn,
    /// Choice rule.
    pub choice: Choice,
    /// Weight normalisation.
    pub normalize: Normalize,
    /// With a correction bias.
    pub bias: bool,
    /// With choice noise.
    pub noise: bool,
    /// Route scale.
    pub scale: f32,
    /// The logits.
    pub logits: Logits,
}

impl OpCase for RouteCase {
    const OP: &'static str = "route";
    fn name(&self) -> String {
        self.what.into()
    }
    fn tolerance(&self, _: &Capabilities) -> f64 {
        ELEMENTWISE_TOL
    }
    fn run<B: Backend>(&self, b: &B) -> Result<Outputs<B>> {
        let (s, e) = (self.s, self.e);
        let logits = match &self.logits {
            Logits::Random => rand(&[s, e], 20, 3.0),
            Logits::Given(v) => HostTensor::f32(&[s, e], v.clone())?,
        };
        let (bt, nt) = (b.upload(&rand(&[e], 21, 0.5))?, b.upload(&rand(&[s, e], 22, 2.0))?);
        let spec = RouteSpec {
            k: self.k,
            score: self.score,
            choice: self.choice,
            bias: self.bias.then_some(&bt),
            choice_noise: self.noise.then_some(&nt),
            normalize: self.normalize,
            scale: self.scale,
        };
        let r = b.route(&b.upload(&logits)?, &spec)?;
        Ok(vec![("experts", r.experts), ("weights", r.weights), ("scores", r.scores)])
    }
}

/// `router_stats` of routed random logits.
pub struct RouterStatsCase;

impl OpCase for RouterStatsCase {
    const OP: &'static str = "router_stats";
    fn name(&self) -> String {
        "mean scores and z-loss".into()
    }
    fn tolerance(&self, _: &Capabilities) -> f64 {
        ELEMENTWISE_TOL
    }
    fn run<B: Backend>(&self, b: &B) -> Result<Outputs<B>> {
        let l = b.upload(&rand(&[17, 6], 23, 3.0))?;
        let r = b.route(&l, &RouteSpec::softmax_top_k(1))?;
        Ok(vec![("stats", b.router_stats(&l, &r.scores)?)])
    }
}

// ------------------------------------------------------------------ plan, permute, combine

/// How a plan case's routes pick experts.
#[derive(Clone, Copy)]
pub enum Assign {
    /// Distinct experts per token, spread over all of them.
    Spread,
    /// Every route on expert 3.
    Hot,
}

/// The keep policy of a plan case.
#[derive(Clone, Copy)]
pub enum Keep {
    /// Token order.
    TokenOrder,
    /// Rank-major (DeepSpeed top-2).
    RankMajor,
    /// By random priorities (RTS).
    Priority,
}

/// Routes and a plan spec, shared by the plan, permute and combine cases.
pub struct PlanInputs {
    /// What the case exercises.
    pub what: &'static str,
    /// Tokens.
    pub s: usize,
    /// Experts.
    pub e: usize,
    /// Routes per token.
    pub k: usize,
    /// Capacity rule.
    pub capacity: CapacityRule,
    /// Keep policy.
    pub keep: Keep,
    /// With a `used_token` mask (every fourth token from the second masked).
    pub used: bool,
    /// Token group size.
    pub group: Option<usize>,
    /// Renormalise kept weights.
    pub renorm: bool,
    /// Expert assignment.
    pub assign: Assign,
}

impl PlanInputs {
    fn experts(&self) -> Vec<i32> {
        let (s, e, k) = (self.s, self.e, self.k);
        (0..s)
            .flat_map(|t| {
                (0..k).map(move |j| match self.assign {
                    Assign::Hot => 3,
                    // k = E: every expert once per token, rotated.
                    Assign::Spread if k == e => ((t + j) % e) as i32,
                    Assign::Spread if k > 1 => ((t * 3 + j * 2) % e) as i32,
                    Assign::Spread => ((t * 10) % e) as i32,
                })
            })
            .collect()
    }

    /// Runs the plan on `b` and hands it to `then`.
    pub(super) fn with_plan<B: Backend, T>(
        &self,
        b: &B,
        then: impl FnOnce(&crate::ops::Plan<B>) -> Result<T>,
    ) -> Result<T> {
        let (s, e, k) = (self.s, self.e, self.k);
        let rw = rand(&[s, k], 30, 1.0);
        let rw = HostTensor::f32(&[s, k], rw.as_f32("w")?.iter().map(|v| v.abs()).collect())?;
        let pri = rand(&[s, e], 31, 1.0);
        let routes = Routes::from_host(b, &HostTensor::i32(&[s, k], self.experts())?, &rw, &pri)?;
        let used = HostTensor::f32(&[s], (0..s).map(|i| if i % 4 == 1 { 0.0 } else { 1.0 }).collect())?;
        let (pt, ut) = (b.upload(&pri)?, b.upload(&used)?);
        let spec = PlanSpec {
            num_experts: e,
            capacity: self.capacity,
            keep: match self.keep {
                Keep::TokenOrder => KeepPolicy::TokenOrder,
                Keep::RankMajor => KeepPolicy::RankMajor,
                Keep::Priority => KeepPolicy::Priority(&pt),
            },
            used_token: self.used.then_some(&ut),
            group_size: self.group,
            renormalize_kept: self.renorm,
        };
        then(&b.plan(&routes, &spec)?)
    }
}

/// `plan`: every tensor of the plan.
pub struct PlanCase(pub PlanInputs);

impl OpCase for PlanCase {
    const OP: &'static str = "plan";
    fn name(&self) -> String {
        self.0.what.into()
    }
    fn tolerance(&self, _: &Capabilities) -> f64 {
        ELEMENTWISE_TOL
    }
    fn run<B: Backend>(&self, b: &B) -> Result<Outputs<B>> {
        self.0.with_plan(b, |p| {
            Ok(vec![
                ("counts", p.counts.clone()),
                ("first_counts", p.first_counts.clone()),
                ("kept_counts", p.kept_counts.clone()),
                ("offsets", p.offsets.tensor().clone()),
                ("slots", p.slots.clone()),
                ("rows", p.rows.clone()),
                ("weights", p.weights.clone()),
                ("stats", p.stats.clone()),
            ])
        })
    }
}

/// `permute` of random rows by the plan: a copy, so exact.
pub struct PermuteCase(pub PlanInputs);

impl OpCase for PermuteCase {
    const OP: &'static str = "permute";
    fn name(&self) -> String {
        self.0.what.into()
    }
    fn tolerance(&self, _: &Capabilities) -> f64 {
        0.0
    }
    fn run<B: Backend>(&self, b: &B) -> Result<Outputs<B>> {
        let x = b.upload(&rand(&[self.0.s, 10], 32, 1.0))?;
        self.0.with_plan(b, |p| Ok(vec![("permute", b.permute(&x, &p.route_rows())?)]))
    }
}

/// `permute_scaled` of random rows by the plan and its weights (Llama 4's weighted expert
/// input): one product per element, so exact.
pub struct PermuteScaledCase(pub PlanInputs);

impl OpCase for PermuteScaledCase {
    const OP: &'static str = "permute_scaled";
    fn name(&self) -> String {
        self.0.what.into()
    }
    fn tolerance(&self, _: &Capabilities) -> f64 {
        0.0
    }
    fn run<B: Backend>(&self, b: &B) -> Result<Outputs<B>> {
        let x = b.upload(&rand(&[self.0.s, 10], 32, 1.0))?;
        self.0.with_plan(b, |p| Ok(vec![("permute_scaled", b.permute_scaled(&x, &p.route_rows(), &p.weights)?)]))
    }
}

/// `pass_rows`: grouped rows `[R, 9]` whose groups `from_group..` take another tensor's
/// rows (LongCat-Flash's identity experts, grouped last). A copy, so exact.
pub struct PassRowsCase {
    /// What the case exercises.
    pub what: &'static str,
    /// Rows per group.
    pub counts: Vec<usize>,
    /// Rows past the last group (kept from y).
    pub rows_past: usize,
    /// The first group passed through.
    pub from_group: usize,
}

impl OpCase for PassRowsCase {
    const OP: &'static str = "pass_rows";
    fn name(&self) -> String {
        self.what.into()
    }
    fn tolerance(&self, _: &Capabilities) -> f64 {
        0.0
    }
    fn run<B: Backend>(&self, b: &B) -> Result<Outputs<B>> {
        let rows = self.counts.iter().sum::<usize>() + self.rows_past;
        let (y, x) = (rand(&[rows, 9], 36, 1.0), rand(&[rows, 9], 37, 1.0));
        let off = Offsets::from_host(b, &offsets_of(&self.counts))?;
        Ok(vec![("y", b.pass_rows(&b.upload(&y)?, &b.upload(&x)?, &off, self.from_group)?)])
    }
}

/// `combine` of random expert outputs by the plan, over every token or a middle range
/// (a tensor-parallel rank's share).
pub struct CombineCase {
    /// The plan.
    pub plan: PlanInputs,
    /// Combine tokens `s / 3 .. 2 s / 3` only.
    pub share: bool,
}

impl OpCase for CombineCase {
    const OP: &'static str = "combine";
    fn name(&self) -> String {
        format!("{}{}", self.plan.what, if self.share { ", middle third of the tokens" } else { "" })
    }
    fn tolerance(&self, _: &Capabilities) -> f64 {
        PRODUCT_TOL
    }
    fn run<B: Backend>(&self, b: &B) -> Result<Outputs<B>> {
        let s = self.plan.s;
        let yp = b.upload(&rand(&[s * self.plan.k, 10], 33, 1.0))?;
        let tokens = if self.share { s / 3..2 * s / 3 } else { 0..s };
        self.plan.with_plan(b, |p| Ok(vec![("combine", b.combine(&yp, &p.route_rows(), &p.weights, tokens)?)]))
    }
}

/// `bucket` of the plan's kept routes over expert slots: DeepSpeed's contiguous placement
/// or EPLB replicas, every token or a rank's share. Integers, so exact; the permute of the
/// send buffer rides along.
pub struct BucketCase {
    /// The plan.
    pub plan: PlanInputs,
    /// Ranks the slots are spread over.
    pub ranks: usize,
    /// Half as many replica slots again as experts, given to the first experts.
    pub replicas: bool,
    /// Bucket tokens `s / 4 .. 3 s / 4` only.
    pub share: bool,
}

impl BucketCase {
    /// The slots of every expert: expert e in slot e, then the extra replica slots.
    fn replicas(&self) -> (Vec<Vec<usize>>, usize) {
        let e = self.plan.e;
        let slots = if self.replicas { (e + e.div_ceil(2)).div_ceil(self.ranks) * self.ranks } else { e };
        let mut reps: Vec<Vec<usize>> = (0..e).map(|i| vec![i]).collect();
        for p in e..slots {
            reps[(p - e) % e].push(p);
        }
        (reps, slots / self.ranks)
    }
}

impl OpCase for BucketCase {
    const OP: &'static str = "bucket";
    fn name(&self) -> String {
        format!(
            "{}, {} ranks{}{}",
            self.plan.what,
            self.ranks,
            if self.replicas { ", replicas" } else { "" },
            if self.share { ", middle half of the tokens" } else { "" }
        )
    }
    fn tolerance(&self, _: &Capabilities) -> f64 {
        0.0
    }
    fn run<B: Backend>(&self, b: &B) -> Result<Outputs<B>> {
        let s = self.plan.s;
        let (reps, per_rank) = self.replicas();
        let placement = DevicePlacement::new(b, &reps, per_rank, self.ranks)?;
        let tokens = if self.share { s / 4..3 * s / 4 } else { 0..s };
        let x = b.upload(&rand(&[s, 10], 34, 1.0))?;
        self.plan.with_plan(b, |p| {
            let bucket = b.bucket(p, &placement, tokens)?;
            let send = b.permute(&x, &bucket.rows)?;
            Ok(vec![("counts", bucket.counts), ("rows", bucket.rows.tensor().clone()), ("send buffer", send)])
        })
    }
}

/// `regroup` of random rows by a block table: received rows by (source, slot) to the
/// experts' (slot, source) order, as the expert-parallel dispatch builds it.
pub struct RegroupCase {
    /// What the case exercises.
    pub what: &'static str,
    /// Rows per (source, slot), sources outermost.
    pub counts: Vec<Vec<usize>>,
}

impl OpCase for RegroupCase {
    const OP: &'static str = "regroup";
    fn name(&self) -> String {
        self.what.into()
    }
    fn tolerance(&self, _: &Capabilities) -> f64 {
        0.0
    }
    fn run<B: Backend>(&self, b: &B) -> Result<Outputs<B>> {
        let slots = self.counts.first().map_or(0, Vec::len);
        let mut start = vec![vec![0usize; slots]; self.counts.len()];
        let mut at = 0;
        for (src, row) in self.counts.iter().enumerate() {
            for (l, &c) in row.iter().enumerate() {
                start[src][l] = at;
                at += c;
            }
        }
        let blocks: Vec<(usize, usize)> = (0..slots)
            .flat_map(|l| self.counts.iter().enumerate().map(move |(src, row)| (src, l, row[l])))
            .map(|(src, l, c)| (start[src][l], c))
            .collect();
        let table = BlockTable::new(b, &blocks, at)?;
        let x = b.upload(&rand(&[at, 10], 35, 1.0))?;
        Ok(vec![("regrouped", b.regroup(&x, &table)?)])
    }
}

// ------------------------------------------------------------------ the list

pub(super) fn plan_inputs() -> Vec<PlanInputs> {
    let ds = |k_prime, min_capacity| CapacityRule::DeepSpeed { factor: 1.0, k_prime, min_capacity };
    let base = |what, s, e, k, capacity, keep| PlanInputs {
        what,
        s,
        e,
        k,
        capacity,
        keep,
        used: false,
        group: None,
        renorm: false,
        assign: Assign::Spread,
    };
    vec![
        base("unlimited, token order", 19, 5, 2, CapacityRule::Unlimited, Keep::TokenOrder),
        base("DeepSpeed capacity drops, token order", 19, 5, 1, ds(1, 2), Keep::TokenOrder),
        PlanInputs { renorm: true, ..base("rank-major top-2, renormalise kept", 19, 5, 2, ds(2, 1), Keep::RankMajor) },
        base("priority keep (RTS)", 19, 5, 1, ds(1, 1), Keep::Priority),
        PlanInputs {
            used: true,
            ..base(
                "dropless clamp, used_token mask",
                19,
                5,
                1,
                CapacityRule::Dropless { clamp_to_tokens: true },
                Keep::TokenOrder,
            )
        },
        PlanInputs {
            group: Some(5),
            ..base("fixed capacity per token group", 20, 4, 1, CapacityRule::Fixed(2), Keep::TokenOrder)
        },
        PlanInputs { assign: Assign::Hot, ..base("all on one expert", 12, 6, 1, ds(1, 1), Keep::TokenOrder) },
        PlanInputs {
            assign: Assign::Hot,
            ..base(
                "150 routes on one expert: past a 64-row chunk",
                150,
                4,
                1,
                CapacityRule::Unlimited,
                Keep::TokenOrder,
            )
        },
        PlanInputs {
            renorm: true,
            ..base("fewer tokens than k·E: S = 2, k = E = 3", 2, 3, 3, CapacityRule::Unlimited, Keep::TokenOrder)
        },
        base(
            "capacity past every count: factor 1e9",
            8,
            4,
            2,
            CapacityRule::DeepSpeed { factor: 1e9, k_prime: 2, min_capacity: 0 },
            Keep::TokenOrder,
        ),
    ]
}

fn route_cases() -> Vec<RouteCase> {
    let topk = |what, s, e, k, normalize| RouteCase {
        what,
        s,
        e,
        k,
        score: ScoreFn::Softmax,
        choice: Choice::TopK,
        normalize,
        bias: false,
        noise: false,
        scale: 1.0,
        logits: Logits::Random,
    };
    vec![
        topk("softmax top-1", 13, 8, 1, Normalize::None),
        topk("softmax top-2 renormalised", 13, 8, 2, Normalize::Sum),
        topk("k = E", 5, 4, 4, Normalize::Sum),
        RouteCase { noise: true, ..topk("gumbel choice noise", 11, 6, 1, Normalize::None) },
        RouteCase {
            noise: true,
            choice: Choice::DeepSpeedTop2,
            ..topk("DeepSpeed top-2 with noise", 11, 6, 2, Normalize::None)
        },
        RouteCase {
            score: ScoreFn::Sigmoid,
            choice: Choice::GroupLimited { n_group: 4, topk_group: 2, group_score: GroupScore::SumTop2 },
            bias: true,
            scale: 2.5,
            ..topk("DeepSeek-V3: sigmoid, bias, sum-of-top-2 groups", 9, 16, 4, Normalize::SumPlus(1e-20))
        },
        RouteCase {
            choice: Choice::GroupLimited { n_group: 4, topk_group: 2, group_score: GroupScore::Max },
            scale: 16.0,
            ..topk("DeepSeek-V2: max groups, k past the kept groups", 9, 8, 5, Normalize::None)
        },
        RouteCase {
            logits: Logits::Given(vec![0.0, 0.0, 5.0, 5.0, 1.0, 1.0, 1.0, 1.0, 2.0, 7.0, 7.0, 2.0]),
            ..topk("exact ties go to the lower index", 3, 4, 2, Normalize::Sum)
        },
        RouteCase { bias: true, ..topk("softmax, correction bias in the choice only", 13, 8, 3, Normalize::None) },
        RouteCase {
            score: ScoreFn::SqrtSoftplus,
            bias: true,
            scale: 1.5,
            ..topk("DeepSeek-V4: sqrt-softplus, bias, Σ + 1e-20, scale 1.5", 13, 16, 6, Normalize::SumPlus(1e-20))
        },
        RouteCase {
            score: ScoreFn::SqrtSoftplus,
            // Rows: both sides of ±20 (torch's softplus threshold, and where the score
            // switches to e^(x/2)); logits down to −170, the top 3 near −90 (eˣ subnormal
            // from −87, the score still normal) so their normalised weights are of order
            // 1; exact ties at the k-th place.
            logits: Logits::Given(vec![
                -25.0, -20.5, -20.0, -19.5, 19.5, 20.0, 20.5, 30.0, //
                -170.0, -150.0, -120.0, -100.0, -95.0, -90.0, -91.0, -92.0, //
                0.0, 0.0, 2.0, 2.0, -1.0, -1.0, 100.0, 1e6,
            ]),
            ..topk("sqrt-softplus past ±20, very negative logits, ties", 3, 8, 3, Normalize::Sum)
        },
        RouteCase {
            score: ScoreFn::SqrtSoftplus,
            choice: Choice::GroupLimited { n_group: 4, topk_group: 2, group_score: GroupScore::SumTop2 },
            bias: true,
            ..topk("sqrt-softplus with sum-of-top-2 groups", 9, 16, 4, Normalize::Sum)
        },
        RouteCase {
            bias: true,
            ..topk("ERNIE-4.5: softmax, bias, Σ floored at 1e-12", 13, 8, 2, Normalize::SumFloor(1e-12))
        },
        // Top-2 sums of these softmaxes fall on both sides of 0.6.
        topk("a floor that binds for some tokens (0.6)", 17, 8, 2, Normalize::SumFloor(0.6)),
        topk("DBRX: p-norm, p = 1 (as Σ)", 13, 16, 4, Normalize::PNorm(1.0)),
        topk("p-norm, p = 2", 13, 16, 4, Normalize::PNorm(2.0)),
        topk("p-norm, p = 1.5", 13, 16, 4, Normalize::PNorm(1.5)),
        topk("p-norm, p = 0.5, k = 1", 13, 16, 1, Normalize::PNorm(0.5)),
        RouteCase {
            choice: Choice::SparseMixer { jitter_eps: 0.01 },
            ..topk("PhiMoE sparsemixer, jitter 0.01 (most masks keep one expert)", 17, 16, 2, Normalize::None)
        },
        RouteCase {
            choice: Choice::SparseMixer { jitter_eps: 0.4 },
            scale: 0.5,
            ..topk("sparsemixer, jitter 0.4 (several kept), scale 0.5", 17, 16, 2, Normalize::None)
        },
        RouteCase {
            choice: Choice::SparseMixer { jitter_eps: 0.01 },
            // Rows: a tie at the max (expert 2 is the tied one); a negative max; all zeros
            // (0/0 factors keep every expert, as torch's NaN compares false); one far max.
            logits: Logits::Given(vec![
                2.0, 2.0, 1.99, 0.5, 0.0, //
                -3.0, -2.0, -2.01, -10.0, -2.03, //
                0.0, 0.0, 0.0, 0.0, 0.0, //
                9.0, 1.0, 0.99, 1.0, -4.0,
            ]),
            ..topk("sparsemixer: ties, negative max, zero logits", 4, 5, 2, Normalize::None)
        },
    ]
}

/// Runs every case of every op.
pub fn run_all<R: Backend, C: Backend>(t: &mut Runner<'_, R, C>) {
    const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];
    for dtype in DTYPES {
        t.all(&[(37, 19, 70, true), (1, 64, 5, false), (130, 200, 129, true)].map(|(r, k, n, bias)| LinearCase {
            r,
            k,
            n,
            bias,
            dtype,
        }));
    }
    for dtype in DTYPES {
        t.all(&[vec![5, 21], vec![3, 7, 9], vec![1, 1]].map(|shape| CastWeightCase { shape, dtype }));
    }
    let groups: [(&str, Vec<usize>, usize); 4] = [
        ("odd groups, two empty", vec![0, 37, 1, 0, 70], 0),
        ("one hot expert", vec![0, 0, 111, 0], 0),
        ("rows past the last group", vec![5, 9], 6),
        ("no rows", vec![0, 0, 0], 0),
    ];
    for (what, counts, rows_past) in groups {
        for dtype in DTYPES {
            t.check(&GroupedLinearCase { what, counts: counts.clone(), rows_past, tail: 0, dtype });
        }
    }
    for dtype in DTYPES {
        let counts = vec![4, 0, 66, 7, 0, 9];
        let what = "3 experts, then 3 identity groups (one empty) in the tail";
        t.check(&GroupedLinearCase { what, counts, rows_past: 3, tail: 3, dtype });
    }
    let mlp = |what, act, biases, unfused, dtype| GroupedMlpCase {
        what,
        act,
        clamp: None,
        tail: false,
        biases,
        unfused,
        dtype,
    };
    let gpt_oss = GluClamp::gpt_oss(0.9, 1.702);
    t.all(&[
        mlp("gelu_tanh GLU experts with biases", Activation::GeluTanh, true, false, DType::F32),
        mlp("swiglu experts, fused where the backend fuses", Activation::Silu, false, true, DType::F32),
        mlp("geglu experts, fused where the backend fuses", Activation::Gelu, false, true, DType::F32),
        mlp("swiglu experts, fused where the backend fuses", Activation::Silu, false, true, DType::F16),
        mlp("swiglu experts, fused where the backend fuses", Activation::Silu, false, true, DType::BF16),
        GroupedMlpCase {
            clamp: Some(gpt_oss),
            ..mlp(
                "gpt-oss clamped swiglu (limit 0.9, α 1.702, up + 1) with biases, fused",
                Activation::Silu,
                true,
                true,
                DType::F32,
            )
        },
        GroupedMlpCase {
            clamp: Some(GluClamp::deepseek_v4(0.6)),
            ..mlp("DeepSeek-V4 clamped swiglu (limit 0.6), fused", Activation::Silu, false, true, DType::F32)
        },
        GroupedMlpCase {
            clamp: Some(GluClamp::deepseek_v4(0.5)),
            ..mlp("clamped geglu (limit 0.5), fused", Activation::Gelu, false, true, DType::F32)
        },
        GroupedMlpCase {
            clamp: Some(gpt_oss),
            ..mlp("gpt-oss clamped swiglu, fused", Activation::Silu, true, true, DType::F16)
        },
        GroupedMlpCase {
            clamp: Some(gpt_oss),
            ..mlp("gpt-oss clamped swiglu, fused", Activation::Silu, true, true, DType::BF16)
        },
        GroupedMlpCase {
            tail: true,
            ..mlp("swiglu experts and 2 identity groups in the tail", Activation::Silu, true, true, DType::F32)
        },
    ]);
    t.all(&Activation::ALL.map(|a| ActivationCase(ElementwiseCase::Activation(a))));
    t.all(&Activation::ALL.map(|a| GluCase(ElementwiseCase::Glu(a))));
    t.all(&[
        GluCase(ElementwiseCase::GluClamped(Activation::Silu, GluClamp::gpt_oss(3.5, 1.702))),
        GluCase(ElementwiseCase::GluClamped(Activation::Silu, GluClamp::deepseek_v4(3.0))),
        GluCase(ElementwiseCase::GluClamped(Activation::Gelu, GluClamp::deepseek_v4(2.5))),
        GluCase(ElementwiseCase::GluClamped(
            Activation::GeluTanh,
            GluClamp { limit: 4.0, alpha: 1.0, up_offset: -0.5 },
        )),
        GluCase(ElementwiseCase::GluClamped(Activation::Relu, GluClamp { limit: 1.5, alpha: 1.0, up_offset: 2.0 })),
    ]);
    t.check(&AddBiasCase(ElementwiseCase::AddBias));
    t.check(&MulCase(ElementwiseCase::Mul));
    t.all(&[false, true].map(|gated| AddGatedCase(ElementwiseCase::AddGated { gated })));
    t.check(&ResidualMixCase(ElementwiseCase::ResidualMix));
    t.all(&[ScaleCase(ElementwiseCase::Scale(65536.0)), ScaleCase(ElementwiseCase::Scale(-0.25))]);
    t.all(&[
        NoiseCase { kind: NoiseKind::Uniform, what: "uniform" },
        NoiseCase { kind: NoiseKind::Jitter(0.01), what: "jitter" },
        NoiseCase { kind: NoiseKind::Gumbel, what: "gumbel" },
    ]);
    t.all(&route_cases());
    t.check(&RouterStatsCase);
    t.all(&plan_inputs().into_iter().map(PlanCase).collect::<Vec<_>>());
    t.all(&plan_inputs().into_iter().map(PermuteCase).collect::<Vec<_>>());
    t.all(&plan_inputs().into_iter().map(PermuteScaledCase).collect::<Vec<_>>());
    let pass = |what, counts: &[usize], rows_past, from_group| PassRowsCase {
        what,
        counts: counts.to_vec(),
        rows_past,
        from_group,
    };
    t.all(&[
        pass("2 identity groups of 4 experts, rows past the last group", &[3, 0, 5, 2], 4, 2),
        pass("every group, one empty", &[0, 6, 1], 0, 0),
        pass("no group (from G)", &[4, 4], 2, 2),
        pass("an empty tail", &[7, 3, 0, 0], 1, 2),
        pass("no rows", &[0, 0], 0, 1),
    ]);
    for share in [false, true] {
        t.all(&plan_inputs().into_iter().map(|plan| CombineCase { plan, share }).collect::<Vec<_>>());
    }
    for (ranks, replicas, share) in [(1, false, false), (2, true, false), (3, true, true)] {
        let cases: Vec<BucketCase> =
            plan_inputs().into_iter().map(|plan| BucketCase { plan, ranks, replicas, share }).collect();
        t.all(&cases);
    }
    t.all(&[
        RegroupCase {
            what: "3 sources x 4 slots, some empty",
            counts: vec![vec![2, 0, 5, 1], vec![0, 0, 3, 7], vec![4, 1, 0, 2]],
        },
        RegroupCase { what: "one source, one slot", counts: vec![vec![9]] },
        RegroupCase { what: "no rows", counts: vec![vec![0, 0], vec![0, 0]] },
    ]);
    super::grad_cases::run_all(t);
}

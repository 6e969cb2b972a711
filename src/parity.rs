//! The op-level parity harness (DESIGN.md, Testing), in the spirit of ggml's
//! test-backend-ops: every primitive of the [`Backend`] trait runs on a reference backend
//! (the cpu) and on a candidate over small cases built to hit the edges (odd sizes,
//! experts with no token, all tokens on one expert, k = E, fewer tokens than k), and the
//! outputs are compared: floats by relative L2 against a per-op tolerance, integers
//! exactly. NaN never passes. [`markdown`] turns the results into the support matrix that
//! `docs/ops.md` carries.

use crate::backend::{
    grouped_mlp_unfused, Activation, Backend, CapacityRule, Choice, GroupScore, KeepPolicy, MlpWeights, Normalize,
    PlanSpec, RouteSpec, ScoreFn, Tensor,
};
use crate::config::ExpertKind;
use crate::error::Result;
use crate::golden::rel_l2;
use crate::philox;
use crate::tensor::{DType, HostData, HostTensor};

/// The outcome of one case on the candidate.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Within tolerance: the worst relative L2 over the case's float outputs (0 for
    /// integer-only outputs).
    Pass(f64),
    /// Outside tolerance, mismatched integers, or an error on a backend.
    Fail(String),
    /// The candidate says it cannot do this (its `Unsupported` error).
    Unsupported(String),
}

/// One case of one op.
#[derive(Clone, Debug)]
pub struct CaseResult {
    /// Trait op under test.
    pub op: &'static str,
    /// What the case exercises.
    pub case: String,
    /// Storage dtype of the case.
    pub dtype: DType,
    /// Result on the candidate.
    pub outcome: Outcome,
}

/// Tolerance (relative L2) of f32 outputs per op family: the products accumulate over K
/// in a different order on each backend; elementwise ops differ by the last ulp of the
/// transcendental functions. A candidate that rounds product inputs to f16/bf16
/// ([`crate::backend::Capabilities::half_inputs`]) is held to that type's precision on
/// products with such weights: unit roundoff 2⁻¹¹ (f16) or 2⁻⁸ (bf16) on every input gives
/// a relative L2 near u/√3 per product, two products for an MLP, with room to spare.
fn tolerance(op: &str, dtype: DType, half_inputs: bool) -> f64 {
    let product = matches!(op, "linear" | "grouped_linear" | "grouped_mlp");
    match (product, half_inputs, dtype) {
        (true, true, DType::BF16) => 1e-2,
        (true, true, DType::F16) => 2e-3,
        (true, _, _) => 1e-5,
        _ if op == "combine" => 1e-5,
        _ => 2e-6,
    }
}

fn rand(shape: &[usize], stream: u32, scale: f32) -> HostTensor {
    let n = shape.iter().product();
    let v =
        philox::words(0x5eed, stream, n).into_iter().map(|w| (philox::to_open_unit(w) * 2.0 - 1.0) * scale).collect();
    HostTensor::f32(shape, v).expect("shape matches")
}

fn ints(shape: &[usize], v: Vec<i32>) -> HostTensor {
    HostTensor::i32(shape, v).expect("shape matches")
}

/// Compares a candidate's output `c` with the reference `r`: exact for integers, relative
/// L2 within `tol` for floats (NaN or infinity anywhere never passes). `Ok(error)` or
/// `Err(what differs)`.
pub fn compare(name: &str, r: &HostTensor, c: &HostTensor, tol: f64) -> std::result::Result<f64, String> {
    if r.shape != c.shape {
        return Err(format!("{name}: shape {:?} against reference {:?}", c.shape, r.shape));
    }
    match (&r.data, &c.data) {
        (HostData::I32(a), HostData::I32(b)) => {
            let bad = a.iter().zip(b).filter(|(x, y)| x != y).count();
            if bad == 0 {
                Ok(0.0)
            } else {
                Err(format!("{name}: {bad} of {} integers differ", a.len()))
            }
        }
        (HostData::F32(_), HostData::F32(_)) => {
            let e = rel_l2(&c.to_f64(), &r.to_f64());
            if e <= tol {
                Ok(e)
            } else {
                Err(format!("{name}: relative L2 {e:.2e} above {tol:.0e}"))
            }
        }
        _ => Err(format!("{name}: dtype {} against reference {}", c.dtype(), r.dtype())),
    }
}

/// A case: builds its inputs on a backend and returns named outputs.
type Build<'a, B> = dyn Fn(&B) -> Result<Vec<(&'static str, Tensor<B>)>> + 'a;

struct Runner<'a, R: Backend, C: Backend> {
    reference: &'a R,
    candidate: &'a C,
    results: Vec<CaseResult>,
}

impl<R: Backend, C: Backend> Runner<'_, R, C> {
    fn case(
        &mut self,
        op: &'static str,
        case: impl Into<String>,
        dtype: DType,
        on_r: &Build<'_, R>,
        on_c: &Build<'_, C>,
    ) {
        let case = case.into();
        if !self.candidate.capabilities().storage_dtypes.contains(&dtype) {
            let what = format!("{dtype} storage");
            self.results.push(CaseResult { op, case, dtype, outcome: Outcome::Unsupported(what) });
            return;
        }
        let outcome = match (self.outputs(self.reference, on_r), self.outputs(self.candidate, on_c)) {
            (Err(e), _) => Outcome::Fail(format!("reference failed: {e}")),
            (_, Err(crate::Error::Unsupported { what, .. })) => Outcome::Unsupported(what),
            (_, Err(e)) => Outcome::Fail(e.to_string()),
            (Ok(r), Ok(c)) => {
                let tol = tolerance(op, dtype, self.candidate.capabilities().half_inputs);
                let mut worst = 0f64;
                let mut fail = None;
                for ((name, rt), (_, ct)) in r.iter().zip(&c) {
                    match compare(name, rt, ct, tol) {
                        Ok(e) => worst = worst.max(e),
                        Err(msg) => {
                            fail = Some(msg);
                            break;
                        }
                    }
                }
                match fail {
                    Some(msg) => Outcome::Fail(msg),
                    None => Outcome::Pass(worst),
                }
            }
        };
        self.results.push(CaseResult { op, case, dtype, outcome });
    }

    fn outputs<B: Backend>(&self, b: &B, build: &Build<'_, B>) -> Result<Vec<(&'static str, HostTensor)>> {
        let outs = build(b)?;
        outs.into_iter().map(|(n, t)| Ok((n, b.download(&t)?))).collect()
    }
}

/// Expands to the same case body for the reference and the candidate backend types.
macro_rules! case {
    ($runner:expr, $op:expr, $name:expr, |$b:ident| $body:expr) => {{
        case!($runner, $op, $name, DType::F32, |$b| $body)
    }};
    ($runner:expr, $op:expr, $name:expr, $dtype:expr, |$b:ident| $body:expr) => {{
        let on_r = |$b: &R| -> Result<Vec<(&'static str, Tensor<R>)>> { $body };
        let on_c = |$b: &C| -> Result<Vec<(&'static str, Tensor<C>)>> { $body };
        $runner.case($op, $name, $dtype, &on_r, &on_c);
    }};
}

/// A weight in `dtype` storage where the backend has it; otherwise (the f32 reference)
/// the same values rounded to `dtype` and stored in f32, so both sides multiply the same
/// numbers and the comparison isolates the backend's half-precision path.
fn weight<B: Backend>(b: &B, w: &HostTensor, dtype: DType) -> Result<Tensor<B>> {
    if dtype == DType::F32 || b.capabilities().storage_dtypes.contains(&dtype) {
        return b.upload_weight(w, dtype);
    }
    let v = w.as_f32("weight")?;
    let r = v
        .iter()
        .map(|&x| match dtype {
            DType::F16 => half::f16::from_f32(x).to_f32(),
            _ => half::bf16::from_f32(x).to_f32(),
        })
        .collect();
    b.upload_weight(&HostTensor::f32(&w.shape, r)?, DType::F32)
}

fn offsets_of(counts: &[usize]) -> Vec<i32> {
    let mut off = vec![0i32];
    for c in counts {
        off.push(off.last().copied().unwrap_or(0) + *c as i32);
    }
    off
}

const ACTS: [(Activation, &str); 5] = [
    (Activation::Gelu, "gelu"),
    (Activation::GeluTanh, "gelu_tanh"),
    (Activation::Relu, "relu"),
    (Activation::Silu, "silu"),
    (Activation::Identity, "identity"),
];

/// A routing case: name, S, E, (k, score, choice, normalisation), correction bias, choice
/// noise, route scale.
type RouteRow = (&'static str, usize, usize, (usize, ScoreFn, Choice, Normalize), bool, bool, f32);

/// A plan case: name, S, E, k, capacity, keep (0 token order, 1 rank-major, 2 priority),
/// used_token mask, token group size, renormalise kept weights.
type PlanRow = (&'static str, usize, usize, usize, CapacityRule, u8, bool, Option<usize>, bool);

/// Runs every case on both backends.
pub fn run<R: Backend, C: Backend>(reference: &R, candidate: &C) -> Vec<CaseResult> {
    let mut t = Runner { reference, candidate, results: Vec::new() };

    // ---- matrix products
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for (r, k, n, bias) in [(37usize, 19usize, 70usize, true), (1, 64, 5, false), (130, 200, 129, true)] {
            let (x, w, bb) = (rand(&[r, k], 1, 1.0), rand(&[n, k], 2, 0.3), rand(&[n], 3, 1.0));
            case!(t, "linear", format!("{r}x{k} · {n}x{k}ᵀ{}", if bias { " + bias" } else { "" }), dtype, |b| {
                let bt = if bias { Some(b.upload(&bb)?) } else { None };
                Ok(vec![("y", b.linear(&b.upload(&x)?, &weight(b, &w, dtype)?, bt.as_ref())?)])
            });
        }
    }
    let grouped: [(&str, Vec<usize>); 4] = [
        ("odd groups, two empty", vec![0, 37, 1, 0, 70]),
        ("one hot expert", vec![0, 0, 111, 0]),
        ("rows past the last group", vec![5, 9]),
        ("no rows", vec![0, 0, 0]),
    ];
    for (dtype, (what, counts)) in
        grouped.into_iter().flat_map(|c| [DType::F32, DType::F16, DType::BF16].map(move |d| (d, c.clone())))
    {
        let g = counts.len();
        let rows = counts.iter().sum::<usize>() + if what.starts_with("rows past") { 6 } else { 0 };
        let (k, n) = (23, 67);
        let (x, w, bb) = (rand(&[rows.max(1), k], 4, 1.0), rand(&[g, n, k], 5, 0.3), rand(&[g, n], 6, 1.0));
        let off = ints(&[g + 1], offsets_of(&counts));
        let x = if rows == 0 { HostTensor::f32(&[0, k], vec![]).expect("empty") } else { x };
        case!(t, "grouped_linear", format!("{what} (+ bias)"), dtype, |b| {
            let y =
                b.grouped_linear(&b.upload(&x)?, &b.upload(&off)?, &weight(b, &w, dtype)?, Some(&b.upload(&bb)?))?;
            Ok(vec![("y", y)])
        });
    }
    {
        let counts = vec![3usize, 0, 40, 1];
        let (g, h, f) = (counts.len(), 24, 36);
        let rows: usize = counts.iter().sum();
        let (x, w_in, w_out) = (rand(&[rows, h], 7, 1.0), rand(&[g, 2 * f, h], 8, 0.3), rand(&[g, h, f], 9, 0.3));
        let off = ints(&[g + 1], offsets_of(&counts));
        let (b_in, b_out) = (rand(&[g, 2 * f], 16, 0.5), rand(&[g, h], 17, 0.5));
        case!(t, "grouped_mlp", "gelu_tanh GLU experts with biases", |b| {
            let (wi, wo, bi, bo) =
                (weight(b, &w_in, DType::F32)?, weight(b, &w_out, DType::F32)?, b.upload(&b_in)?, b.upload(&b_out)?);
            let w = MlpWeights {
                kind: ExpertKind::Glu { activation: Activation::GeluTanh },
                w_in: &wi,
                b_in: Some(&bi),
                w_out: Some(&wo),
                b_out: Some(&bo),
            };
            let out = b.grouped_mlp(&b.upload(&x)?, &b.upload(&off)?, &w, true)?;
            Ok(vec![("y", out.y), ("pre", out.pre.ok_or(crate::Error::Invalid("pre-activation not kept".into()))?)])
        });
        for (dtype, act, name) in [
            (DType::F32, Activation::Silu, "swiglu"),
            (DType::F32, Activation::Gelu, "geglu"),
            (DType::F16, Activation::Silu, "swiglu"),
            (DType::BF16, Activation::Silu, "swiglu"),
        ] {
            case!(t, "grouped_mlp", format!("{name} experts, fused where the backend fuses"), dtype, |b| {
                let (wi, wo) = (weight(b, &w_in, dtype)?, weight(b, &w_out, dtype)?);
                let w = MlpWeights {
                    kind: ExpertKind::Glu { activation: act },
                    w_in: &wi,
                    b_in: None,
                    w_out: Some(&wo),
                    b_out: None,
                };
                let out = b.grouped_mlp(&b.upload(&x)?, &b.upload(&off)?, &w, true)?;
                let unfused = grouped_mlp_unfused(b, &b.upload(&x)?, &b.upload(&off)?, &w, false)?;
                Ok(vec![
                    ("y", out.y),
                    ("pre", out.pre.ok_or(crate::Error::Invalid("pre-activation not kept".into()))?),
                    ("y unfused", unfused.y),
                ])
            });
        }
    }

    // ---- elementwise
    let xs = rand(&[7, 143], 10, 6.0);
    for (act, name) in ACTS {
        case!(t, "activation", name, |b| Ok(vec![("y", b.activation(&b.upload(&xs)?, act)?)]));
        case!(t, "glu", name, |b| Ok(vec![("y", b.glu(&b.upload(&rand(&[7, 2 * 71], 11, 6.0))?, act)?)]));
    }
    let (ya, yb, gate, coef) =
        (rand(&[9, 33], 12, 1.0), rand(&[9, 33], 13, 1.0), rand(&[9, 1], 14, 3.0), rand(&[9, 2], 15, 3.0));
    case!(t, "mul", "9x33", |b| Ok(vec![("y", b.mul(&b.upload(&ya)?, &b.upload(&yb)?)?)]));
    case!(t, "add_gated", "plain", |b| Ok(vec![("y", b.add_gated(&b.upload(&ya)?, &b.upload(&yb)?, None)?)]));
    case!(t, "add_gated", "sigmoid gate", |b| {
        Ok(vec![("y", b.add_gated(&b.upload(&ya)?, &b.upload(&yb)?, Some(&b.upload(&gate)?))?)])
    });
    case!(t, "residual_mix", "softmax coefficient", |b| {
        Ok(vec![("y", b.residual_mix(&b.upload(&ya)?, &b.upload(&yb)?, &b.upload(&coef)?)?)])
    });

    // ---- noise (uniform draws must match bit for bit; the transforms to the last ulp)
    for (kind, name) in [
        (philox::NoiseKind::Uniform, "uniform"),
        (philox::NoiseKind::Jitter(0.01), "jitter"),
        (philox::NoiseKind::Gumbel, "gumbel"),
    ] {
        case!(t, "noise", format!("{name}, 1001 values"), |b| Ok(vec![(
            "noise",
            b.noise(kind, 0x1234_5678_9abc, 3, &[7, 143])?
        )]));
    }

    // ---- routing
    let topk = |k, normalize| (k, ScoreFn::Softmax, Choice::TopK, normalize);
    let route_cases: Vec<RouteRow> = vec![
        ("softmax top-1", 13, 8, topk(1, Normalize::None), false, false, 1.0),
        ("softmax top-2 renormalised", 13, 8, topk(2, Normalize::Sum), false, false, 1.0),
        ("k = E", 5, 4, topk(4, Normalize::Sum), false, false, 1.0),
        ("gumbel choice noise", 11, 6, topk(1, Normalize::None), false, true, 1.0),
        (
            "DeepSpeed top-2 with noise",
            11,
            6,
            (2, ScoreFn::Softmax, Choice::DeepSpeedTop2, Normalize::None),
            false,
            true,
            1.0,
        ),
        (
            "DeepSeek-V3: sigmoid, bias, sum-of-top-2 groups",
            9,
            16,
            (
                4,
                ScoreFn::Sigmoid,
                Choice::GroupLimited { n_group: 4, topk_group: 2, group_score: GroupScore::SumTop2 },
                Normalize::SumPlus(1e-20),
            ),
            true,
            false,
            2.5,
        ),
        (
            "DeepSeek-V2: max groups, k past the kept groups",
            9,
            8,
            (
                5,
                ScoreFn::Softmax,
                Choice::GroupLimited { n_group: 4, topk_group: 2, group_score: GroupScore::Max },
                Normalize::None,
            ),
            false,
            false,
            16.0,
        ),
    ];
    for (name, s, e, (k, score, choice, normalize), with_bias, with_noise, scale) in route_cases {
        let logits = rand(&[s, e], 20, 3.0);
        let bias = rand(&[e], 21, 0.5);
        let noise = rand(&[s, e], 22, 2.0);
        case!(t, "route", name, |b| {
            let (bt, nt) = (b.upload(&bias)?, b.upload(&noise)?);
            let spec = RouteSpec {
                k,
                score,
                choice,
                bias: with_bias.then_some(&bt),
                choice_noise: with_noise.then_some(&nt),
                normalize,
                scale,
            };
            let r = b.route(&b.upload(&logits)?, &spec)?;
            Ok(vec![("experts", r.experts), ("weights", r.weights), ("scores", r.scores)])
        });
    }
    {
        // Exact ties: equal logits must pick the lower expert index on every backend.
        let logits =
            HostTensor::f32(&[3, 4], vec![0.0, 0.0, 5.0, 5.0, 1.0, 1.0, 1.0, 1.0, 2.0, 7.0, 7.0, 2.0]).expect("3x4");
        case!(t, "route", "exact ties go to the lower index", |b| {
            let spec = RouteSpec { normalize: Normalize::Sum, ..RouteSpec::softmax_top_k(2) };
            let r = b.route(&b.upload(&logits)?, &spec)?;
            Ok(vec![("experts", r.experts), ("weights", r.weights)])
        });
        let ls = rand(&[17, 6], 23, 3.0);
        case!(t, "router_stats", "mean scores and z-loss", |b| {
            let l = b.upload(&ls)?;
            let spec = RouteSpec::softmax_top_k(1);
            let r = b.route(&l, &spec)?;
            Ok(vec![("stats", b.router_stats(&l, &r.scores)?)])
        });
    }

    // ---- plan, permute, combine
    let plan_cases: Vec<PlanRow> = vec![
        // (name, S, E, k, capacity, keep: 0 token / 1 rank-major / 2 priority, used_token, group, renormalise)
        ("unlimited, token order", 19, 5, 2, CapacityRule::Unlimited, 0, false, None, false),
        (
            "DeepSpeed capacity drops, token order",
            19,
            5,
            1,
            CapacityRule::DeepSpeed { factor: 1.0, k_prime: 1, min_capacity: 2 },
            0,
            false,
            None,
            false,
        ),
        (
            "rank-major top-2, renormalise kept",
            19,
            5,
            2,
            CapacityRule::DeepSpeed { factor: 1.0, k_prime: 2, min_capacity: 1 },
            1,
            false,
            None,
            true,
        ),
        (
            "priority keep (RTS)",
            19,
            5,
            1,
            CapacityRule::DeepSpeed { factor: 1.0, k_prime: 1, min_capacity: 1 },
            2,
            false,
            None,
            false,
        ),
        (
            "dropless clamp, used_token mask",
            19,
            5,
            1,
            CapacityRule::Dropless { clamp_to_tokens: true },
            0,
            true,
            None,
            false,
        ),
        ("fixed capacity per token group", 20, 4, 1, CapacityRule::Fixed(2), 0, false, Some(5), false),
        (
            "all on one expert",
            12,
            6,
            1,
            CapacityRule::DeepSpeed { factor: 1.0, k_prime: 1, min_capacity: 1 },
            0,
            false,
            None,
            false,
        ),
        ("fewer tokens than k·E: S = 2, k = E = 3", 2, 3, 3, CapacityRule::Unlimited, 0, false, None, true),
    ];
    for (name, s, e, k, capacity, keep, with_used, group, renorm) in plan_cases {
        let hot = name.starts_with("all on one");
        let experts: Vec<i32> = (0..s * k)
            .map(|i| {
                if hot {
                    3
                } else if k == e {
                    (i % k) as i32
                } else {
                    ((i * 7 + i / k * 3) % e) as i32
                }
            })
            .collect();
        let experts = if k > 1 && k < e {
            // Distinct experts per token.
            (0..s).flat_map(|tk| (0..k).map(move |j| ((tk * 3 + j * 2) % e) as i32)).collect()
        } else {
            experts
        };
        let ex = ints(&[s, k], experts);
        let rw = rand(&[s, k], 30, 1.0);
        let rw = HostTensor::f32(&[s, k], rw.to_f64().iter().map(|v| v.abs() as f32).collect()).expect("s x k");
        let pri = rand(&[s, e], 31, 1.0);
        let used = HostTensor::f32(&[s], (0..s).map(|i| if i % 4 == 1 { 0.0 } else { 1.0 }).collect()).expect("s");
        let x = rand(&[s, 10], 32, 1.0);
        let yp = rand(&[s * k, 10], 33, 1.0);
        case!(t, "plan", name, |b| {
            let routes =
                crate::backend::Routes { experts: b.upload(&ex)?, weights: b.upload(&rw)?, scores: b.upload(&pri)? };
            let (pt, ut) = (b.upload(&pri)?, b.upload(&used)?);
            let keep = match keep {
                0 => KeepPolicy::TokenOrder,
                1 => KeepPolicy::RankMajor,
                _ => KeepPolicy::Priority(&pt),
            };
            let spec = PlanSpec {
                num_experts: e,
                capacity,
                keep,
                used_token: with_used.then_some(&ut),
                group_size: group,
                renormalize_kept: renorm,
            };
            let p = b.plan(&routes, &spec)?;
            let xp = b.permute(&b.upload(&x)?, &p)?;
            let y = b.combine(&b.upload(&yp)?, &p)?;
            Ok(vec![
                ("counts", p.counts),
                ("first_counts", p.first_counts),
                ("kept_counts", p.kept_counts),
                ("offsets", p.offsets),
                ("slots", p.slots),
                ("rows", p.rows),
                ("weights", p.weights),
                ("stats", p.stats),
                ("permute", xp),
                ("combine", y),
            ])
        });
    }
    t.results
}

/// The support matrix: one row per op, one column per (backend, dtype), each cell
/// "pass (cases; worst error)", "FAIL (n of m)", "unsupported" or "—" (no case), followed
/// by a list of the failing and unsupported cases.
pub fn markdown(backends: &[(String, Vec<CaseResult>)]) -> String {
    let mut ops: Vec<&'static str> = Vec::new();
    let mut columns: Vec<(&str, DType, Vec<&CaseResult>)> = Vec::new();
    for (b, rs) in backends {
        for d in [DType::F32, DType::F16, DType::BF16] {
            let cases: Vec<&CaseResult> = rs.iter().filter(|r| r.dtype == d).collect();
            if !cases.is_empty() {
                columns.push((b, d, cases));
            }
        }
        for r in rs {
            if !ops.contains(&r.op) {
                ops.push(r.op);
            }
        }
    }
    let mut s = String::from("| op |");
    for (b, d, _) in &columns {
        s.push_str(&format!(" {b} {d} |"));
    }
    s.push_str("\n| --- |");
    s.push_str(&" --- |".repeat(columns.len()));
    s.push('\n');
    let mut failures = Vec::new();
    for op in &ops {
        s.push_str(&format!("| `{op}` |"));
        for (b, d, rs) in &columns {
            let cases: Vec<&&CaseResult> = rs.iter().filter(|r| r.op == *op).collect();
            let pass = cases.iter().filter(|r| matches!(r.outcome, Outcome::Pass(_))).count();
            let unsupported = cases.iter().filter(|r| matches!(r.outcome, Outcome::Unsupported(_))).count();
            let worst = cases
                .iter()
                .filter_map(|r| if let Outcome::Pass(e) = r.outcome { Some(e) } else { None })
                .fold(0f64, f64::max);
            let cell = if cases.is_empty() {
                "—".to_string()
            } else if unsupported == cases.len() {
                "unsupported".to_string()
            } else if pass == cases.len() {
                format!("pass ({pass}; worst rel L2 {worst:.1e})")
            } else {
                format!("FAIL ({} of {})", cases.len() - pass, cases.len())
            };
            s.push_str(&format!(" {cell} |"));
            for r in cases {
                match &r.outcome {
                    Outcome::Fail(m) => failures.push(format!("- {b} {d} `{op}` {}: {m}", r.case)),
                    Outcome::Unsupported(m) => failures.push(format!("- {b} {d} `{op}` {}: unsupported ({m})", r.case)),
                    Outcome::Pass(_) => {}
                }
            }
        }
        s.push('\n');
    }
    if !failures.is_empty() {
        s.push('\n');
        s.push_str(&failures.join("\n"));
        s.push('\n');
    }
    s
}

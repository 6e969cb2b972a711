//! The cpu route op and its backward against transformers' own routers: DeepSeek-V4
//! (sqrt-softplus scores, correction bias), ERNIE-4.5 (softmax, bias, Σ floored at
//! `moe_norm_min`), DBRX (p-norm of the top weights) and PhiMoE (eval-mode sparsemixer).
//! The expected routes, weights and logit gradients are constants printed by
//! `route_reference.py` (beside this file; its docstring says how each was computed),
//! run with torch 2.15.0 and transformers 5.23.0. A few identities the new options must
//! keep (p = 1 is Σ, a zero floor is Σ) are checked bit for bit.

use moe_cpu::CpuBackend;
use moe_engine::ops::{CapacityRule, Choice, KeepPolicy, Normalize, PlanSpec, RouteGradSpec, RouteSpec, ScoreFn};
use moe_engine::{philox, Backend, Device, HostTensor};

/// One router on fixed logits, with the d weights its backward is fed.
struct Case<'a> {
    s: usize,
    e: usize,
    k: usize,
    score: ScoreFn,
    choice: Choice,
    normalize: Normalize,
    scale: f32,
    bias: Option<&'a [f32]>,
    logits: &'a [f32],
    d_w: &'a [f32],
}

/// What the cpu computes for a case: experts, weights, scores and d logits.
struct Got {
    experts: Vec<i32>,
    weights: Vec<f32>,
    scores: Vec<f32>,
    d_logits: Vec<f32>,
}

fn f32s(b: &CpuBackend, t: &moe_engine::Tensor<CpuBackend>) -> Vec<f32> {
    b.download(t).unwrap().into_f32("f32").unwrap()
}

fn run(c: &Case) -> Got {
    let b = CpuBackend::new(Some(1)).unwrap();
    let logits = b.upload(&HostTensor::f32(&[c.s, c.e], c.logits.to_vec()).unwrap()).unwrap();
    let bias = c.bias.map(|v| b.upload(&HostTensor::f32(&[c.e], v.to_vec()).unwrap()).unwrap());
    let spec = RouteSpec {
        k: c.k,
        score: c.score,
        choice: c.choice,
        bias: bias.as_ref(),
        choice_noise: None,
        normalize: c.normalize,
        scale: c.scale,
    };
    let routes = b.route(&logits, &spec).unwrap();
    // Unlimited capacity, no renormalisation: the plan's weights are the routes'.
    let plan_spec = PlanSpec {
        num_experts: c.e,
        capacity: CapacityRule::Unlimited,
        keep: KeepPolicy::TokenOrder,
        used_token: None,
        group_size: None,
        renormalize_kept: false,
    };
    let plan = b.plan(&routes, &plan_spec).unwrap();
    let d_w = b.upload(&HostTensor::f32(&[c.s, c.k], c.d_w.to_vec()).unwrap()).unwrap();
    let grad_spec = RouteGradSpec {
        score: c.score,
        choice: c.choice,
        normalize: c.normalize,
        scale: c.scale,
        renormalize_kept: false,
    };
    let d_logits = b.route_grad(&d_w, &routes, &plan, &logits, grad_spec, None, 0.0).unwrap();
    Got {
        experts: b.download(&routes.experts).unwrap().into_i32("i32").unwrap(),
        weights: f32s(&b, &routes.weights),
        scores: f32s(&b, &routes.scores),
        d_logits: f32s(&b, &d_logits),
    }
}

/// Every element within `rel` of its expected value, plus `abs` times the largest
/// expected magnitude: f32 arithmetic against torch (f64 or f32) leaves rounding noise of
/// that order where a value is a difference of much larger terms.
fn close(what: &str, got: &[f32], want: &[f32], rel: f32, abs: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = rel * w.abs() + abs * scale;
        assert!((g - w).abs() <= tol, "{what}[{i}]: got {g:e}, torch {w:e} (tolerance {tol:e})");
    }
}

/// A router's constant (p, jitter eps) and torch's experts, weights and d logits with it.
type Expected = (f32, &'static [i32], &'static [f32], &'static [f32]);

/// Experts exact, weights and d logits close, as torch computed them.
fn check(what: &str, c: &Case, experts: &[i32], weights: &[f32], d_logits: &[f32]) -> Got {
    let got = run(c);
    assert_eq!(got.experts, experts, "{what}: experts");
    close(&format!("{what}: weights"), &got.weights, weights, 1e-5, 1e-7);
    close(&format!("{what}: d_logits"), &got.d_logits, d_logits, 1e-5, 2e-6);
    got
}

// DeepSeek-V4
const V4_SCORES: [f32; 24] = [
    3.7266532e-06,
    3.53575e-05,
    4.41588,
    4.527693,
    0.92431337,
    0.5131106,
    1.4583992,
    5.477226,
    1.9287499e-22,
    1.3887944e-11,
    3.0590232e-07,
    2.753645e-05,
    7.485183e-05,
    9.357623e-14,
    2.8625186e-20,
    2.0611537e-09,
    1.0503266,
    0.71625084,
    1.428071,
    1.7731508,
    0.32416555,
    0.84762,
    1.2729561,
    0.5840838,
];
const V4_EXPERTS: [i32; 9] = [7, 3, 2, 4, 6, 0, 3, 2, 6];
const V4_WEIGHTS: [f32; 9] =
    [0.56972146, 0.47095442, 0.45932412, 1.5, 5.7363697e-16, 3.865136e-18, 0.59446144, 0.47877097, 0.42676762];
const V4_D_LOGITS: [f32; 24] = [
    0.0,
    0.0,
    0.003503918,
    -0.010940978,
    0.0,
    0.0,
    0.0,
    0.0051987884,
    -3.865136e-18,
    0.0,
    0.0,
    0.0,
    2.7230937e-16,
    0.0,
    -2.1511388e-16,
    0.0,
    0.0,
    0.0,
    0.035797812,
    -0.0677935,
    0.0,
    0.0,
    0.06872464,
    0.0,
];
// ERNIE-4.5, moe_norm_min 0.6; top-2 sums [0.557206928730011, 0.7885409593582153, 0.3131471276283264, 0.7856329679489136]
const ERNIE_FLOOR_06_EXPERTS: [i32; 8] = [2, 5, 0, 1, 4, 2, 3, 6];
const ERNIE_FLOOR_06_WEIGHTS: [f32; 8] =
    [0.5559882, 0.37269002, 0.59868765, 0.40131232, 0.3124622, 0.20944966, 0.6899745, 0.3100255];
const ERNIE_FLOOR_06_D_LOGITS: [f32; 32] = [
    0.010515362,
    0.003167166,
    0.309584,
    0.012843491,
    0.0047248565,
    -0.3515147,
    0.0011651352,
    0.009514693,
    0.18019556,
    -0.18019556,
    -2.566678e-09,
    -3.464653e-09,
    -7.730685e-10,
    -6.313009e-09,
    -4.2317367e-09,
    -1.5567689e-09,
    -0.0068726293,
    -0.011912006,
    0.15828265,
    -0.00416846,
    -0.10757844,
    -0.008824631,
    -0.0075954297,
    -0.011331051,
    2.1863207e-09,
    4.878341e-10,
    1.0327448e-09,
    0.32086453,
    2.9588634e-10,
    1.790008e-09,
    -0.32086456,
    5.9584193e-10,
];
// ERNIE-4.5, moe_norm_min 1e-12; top-2 sums [0.557206928730011, 0.7885409593582153, 0.3131471276283264, 0.7856329679489136]
const ERNIE_FLOOR_1E12_EXPERTS: [i32; 8] = [2, 5, 0, 1, 4, 2, 3, 6];
const ERNIE_FLOOR_1E12_WEIGHTS: [f32; 8] =
    [0.59868765, 0.40131235, 0.59868765, 0.40131232, 0.5986877, 0.40131235, 0.6899745, 0.3100255];
const ERNIE_FLOOR_1E12_D_LOGITS: [f32; 32] = [
    3.3093526e-09,
    9.967578e-10,
    0.3603911,
    4.042052e-09,
    1.4869879e-09,
    -0.36039114,
    3.6668668e-10,
    2.9944263e-09,
    0.18019556,
    -0.18019556,
    -2.566678e-09,
    -3.464653e-09,
    -7.730685e-10,
    -6.313009e-09,
    -4.2317367e-09,
    -1.5567689e-09,
    -2.7745513e-09,
    -4.8089994e-09,
    0.26428685,
    -1.6828503e-09,
    -0.26428682,
    -3.5625942e-09,
    -3.0663532e-09,
    -4.5744617e-09,
    2.1863207e-09,
    4.878341e-10,
    1.0327448e-09,
    0.32086453,
    2.9588634e-10,
    1.790008e-09,
    -0.32086456,
    5.9584193e-10,
];
// ERNIE-4.5, moe_norm_min 0.25; top-2 sums [0.25, 0.557206928730011]
const ERNIE_FLOOR_EQ_EXPERTS: [i32; 4] = [6, 2, 2, 5];
const ERNIE_FLOOR_EQ_WEIGHTS: [f32; 4] = [0.5, 0.5, 0.59868765, 0.40131235];
const ERNIE_FLOOR_EQ_D_LOGITS: [f32; 16] = [
    0.03125,
    0.03125,
    -0.46875,
    0.03125,
    0.03125,
    0.03125,
    0.28125,
    0.03125,
    6.618705e-09,
    1.9935156e-09,
    0.18019554,
    8.084104e-09,
    2.9739757e-09,
    -0.18019557,
    7.3337336e-10,
    5.9888525e-09,
];
// DBRX, moe_normalize_expert_weights 1.0
const DBRX_P1_EXPERTS: [i32; 9] = [2, 5, 3, 0, 1, 5, 4, 1, 2];
const DBRX_P1_WEIGHTS: [f32; 9] =
    [0.4814892, 0.32275188, 0.19575891, 0.5494842, 0.36833024, 0.08218559, 0.3950964, 0.3400626, 0.26484102];
const DBRX_P1_D_LOGITS: [f32; 18] = [
    6.947713e-18,
    2.092611e-18,
    0.26137906,
    0.047541127,
    3.1218088e-18,
    -0.30892017,
    0.23759712,
    -0.11698157,
    -8.519605e-18,
    -1.1500263e-17,
    -2.5660557e-18,
    -0.12061555,
    0.0,
    0.16580576,
    0.07616145,
    0.0,
    -0.24196722,
    0.0,
];
// DBRX, moe_normalize_expert_weights 2.0
const DBRX_P2_EXPERTS: [i32; 9] = [2, 5, 3, 0, 1, 5, 4, 1, 2];
const DBRX_P2_WEIGHTS: [f32; 9] =
    [0.78698015, 0.5275286, 0.31996226, 0.8243097, 0.55255127, 0.12329087, 0.6757147, 0.581593, 0.45294508];
const DBRX_P2_D_LOGITS: [f32; 18] = [
    1.3895427e-17,
    4.185222e-18,
    0.43687224,
    0.071163476,
    6.2436176e-18,
    -0.5080357,
    0.14822508,
    -0.07456397,
    8.5196046e-19,
    1.1500263e-18,
    2.5660557e-19,
    -0.073661104,
    -6.949822e-18,
    0.28453806,
    0.16214493,
    -4.21528e-18,
    -0.446683,
    -8.923748e-18,
];
// DBRX, moe_normalize_expert_weights 1.5
const DBRX_P15_EXPERTS: [i32; 9] = [2, 5, 3, 0, 1, 5, 4, 1, 2];
const DBRX_P15_WEIGHTS: [f32; 9] =
    [0.67379236, 0.45165652, 0.27394354, 0.7289842, 0.48865265, 0.10903315, 0.56617516, 0.48731148, 0.37951857];
const DBRX_P15_D_LOGITS: [f32; 18] = [
    -6.947713e-18,
    -2.092611e-18,
    0.37006536,
    0.0633875,
    -3.1218088e-18,
    -0.43345287,
    0.21192314,
    -0.117317036,
    -1.1075486e-17,
    -1.4950342e-17,
    -3.3358724e-18,
    -0.0946061,
    -6.949822e-18,
    0.23754755,
    0.123035856,
    -4.21528e-18,
    -0.3605834,
    -8.923748e-18,
];
// DBRX, moe_normalize_expert_weights 0.5
const DBRX_P05_EXPERTS: [i32; 9] = [2, 5, 3, 0, 1, 5, 4, 1, 2];
const DBRX_P05_WEIGHTS: [f32; 9] =
    [0.16573581, 0.11109604, 0.067383155, 0.20558764, 0.1378095, 0.03074946, 0.13257113, 0.11410502, 0.08886508];
const DBRX_P05_D_LOGITS: [f32; 18] = [
    -1.7369283e-18,
    -5.2315276e-19,
    0.088873334,
    0.017305864,
    -7.804522e-19,
    -0.1061792,
    0.12726882,
    -0.04492535,
    0.0,
    0.0,
    0.0,
    -0.082343474,
    -1.7374554e-18,
    0.05587245,
    0.022068454,
    -1.05382e-18,
    -0.0779409,
    -2.230937e-18,
];
// PhiMoE sparsemixer, jitter_eps 0.009999999776482582
const PHI_EPS001_EXPERTS: [i32; 10] = [0, 1, 1, 2, 0, 1, 0, 1, 1, 3];
const PHI_EPS001_WEIGHTS: [f32; 10] = [0.3344426, 0.5025, 0.3377813, 0.5049998, 0.2, 0.25, 1.0, 0.3344426, 1.0, 1.0];
const PHI_EPS001_D_LOGITS: [f32; 25] = [
    0.11129537,
    -0.30591968,
    0.1946243,
    0.0,
    0.0,
    0.0,
    0.33552763,
    0.018039849,
    0.0,
    -0.35356748,
    -0.048,
    0.162,
    -0.038,
    -0.038,
    -0.038,
    0.0,
    -0.13355444,
    0.06644334,
    0.067111105,
    0.0,
    0.0,
    0.0,
    0.0,
    0.0,
    0.0,
];
// PhiMoE sparsemixer, jitter_eps 0.30000001192092896
const PHI_EPS03_EXPERTS: [i32; 10] = [0, 1, 1, 2, 0, 1, 0, 1, 1, 3];
const PHI_EPS03_WEIGHTS: [f32; 10] =
    [0.3344426, 0.5025, 0.30044693, 0.42521068, 0.2, 0.25, 1.0, 0.3344426, 0.37797815, 0.549834];
const PHI_EPS03_D_LOGITS: [f32; 25] = [
    0.11129537,
    -0.30591968,
    0.1946243,
    0.0,
    0.0,
    -0.10019875,
    0.31526786,
    0.04924966,
    0.0,
    -0.26431876,
    -0.048,
    0.162,
    -0.038,
    -0.038,
    -0.038,
    0.0,
    -0.13355444,
    0.06644334,
    0.067111105,
    0.0,
    0.0,
    0.2821328,
    0.0,
    -0.056119587,
    -0.22601323,
];

// Inputs, as route_reference.py gives them to torch.
const V4_LOGITS: [f32; 24] = [
    -25.0, -20.5, 19.5, 20.5, 0.3, -1.2, 2.0, 30.0, //
    -100.0, -50.0, -30.0, -21.0, -19.0, -60.0, -90.0, -40.0, //
    0.7, -0.4, 1.9, 3.1, -2.2, 0.05, 1.4, -0.9,
];
const V4_BIAS: [f32; 8] = [0.1, -0.2, 0.05, 0.0, 0.3, -0.1, 0.2, -0.05];
const V4_DW: [f32; 9] = [0.5, -1.0, 0.25, 1.5, 0.75, -0.5, -0.3, 0.8, 1.1];
const ERNIE_LOGITS: [f32; 32] = [
    0.2, -1.0, 1.3, 0.4, -0.6, 0.9, -2.0, 0.1, //
    2.5, 2.1, -0.3, 0.0, -1.5, 0.6, 0.2, -0.8, //
    -0.2, 0.35, 0.1, -0.7, 0.5, 0.05, -0.1, 0.3, //
    1.0, -0.5, 0.25, 3.0, -1.0, 0.8, 2.2, -0.3,
];
const ERNIE_BIAS: [f32; 8] = [0.02, -0.01, 0.03, 0.0, -0.02, 0.01, 0.04, -0.03];
const ERNIE_DW: [f32; 8] = [0.5, -1.0, 1.5, 0.75, -0.3, 0.8, 0.9, -0.6];
const ERNIE_EQ_LOGITS: [f32; 16] = [
    0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, //
    0.2, -1.0, 1.3, 0.4, -0.6, 0.9, -2.0, 0.1,
];
const ERNIE_EQ_DW: [f32; 4] = [0.5, -1.0, 1.5, 0.75];
const DBRX_LOGITS: [f32; 18] = [
    0.2, -1.0, 1.3, 0.4, -0.6, 0.9, //
    2.5, 2.1, -0.3, 0.0, -1.5, 0.6, //
    -0.2, 0.35, 0.1, -0.7, 0.5, 0.05,
];
const DBRX_DW: [f32; 9] = [0.5, -1.0, 0.2, 1.5, 0.75, -0.4, -0.3, 0.8, 0.6];
const PHI_LOGITS: [f32; 25] = [
    2.0, 2.0, 1.99, 0.5, 0.0, //
    -3.0, -2.0, -2.01, -10.0, -2.03, //
    0.0, 0.0, 0.0, 0.0, 0.0, //
    9.0, 1.0, 0.99, 1.0, -4.0, //
    0.3, 1.2, -0.5, 1.1, 0.9,
];
const PHI_DW: [f32; 10] = [0.5, -1.0, 1.5, 0.75, -0.3, 0.8, 0.9, -0.6, 1.2, 0.4];

#[test]
fn deepseek_v4_sqrt_softplus_router_matches_transformers() {
    let c = Case {
        s: 3,
        e: 8,
        k: 3,
        score: ScoreFn::SqrtSoftplus,
        choice: Choice::TopK,
        normalize: Normalize::SumPlus(1e-20),
        scale: 1.5,
        bias: Some(&V4_BIAS),
        logits: &V4_LOGITS,
        d_w: &V4_DW,
    };
    let got = check("DeepSeek-V4", &c, &V4_EXPERTS, &V4_WEIGHTS, &V4_D_LOGITS);
    // Relative only: the scores near e^-50 (x = -100) are exact to f32, not merely small.
    close("DeepSeek-V4: scores", &got.scores, &V4_SCORES, 2e-6, 0.0);
}

#[test]
fn ernie_softmax_router_with_a_floored_sum_matches_transformers() {
    let case = |floor| Case {
        s: 4,
        e: 8,
        k: 2,
        score: ScoreFn::Softmax,
        choice: Choice::TopK,
        normalize: Normalize::SumFloor(floor),
        scale: 1.0,
        bias: Some(&ERNIE_BIAS),
        logits: &ERNIE_LOGITS,
        d_w: &ERNIE_DW,
    };
    // 0.6 binds for tokens 0 and 2 (top-2 sums 0.557 and 0.313), not for 1 and 3.
    check("ERNIE, floor 0.6", &case(0.6), &ERNIE_FLOOR_06_EXPERTS, &ERNIE_FLOOR_06_WEIGHTS, &ERNIE_FLOOR_06_D_LOGITS);
    check(
        "ERNIE, floor 1e-12",
        &case(1e-12),
        &ERNIE_FLOOR_1E12_EXPERTS,
        &ERNIE_FLOOR_1E12_WEIGHTS,
        &ERNIE_FLOOR_1E12_D_LOGITS,
    );
}

#[test]
fn at_the_floor_the_sum_takes_no_gradient_as_torch_clamp() {
    // Token 0's top-2 softmax scores are exactly 1/8 each, their sum exactly the floor
    // 0.25: torch's clamp(min=) passes nothing to the sum there, so the weights' gradient
    // is d_w / 0.25 (not the sum's quotient rule).
    let c = Case {
        s: 2,
        e: 8,
        k: 2,
        score: ScoreFn::Softmax,
        choice: Choice::TopK,
        normalize: Normalize::SumFloor(0.25),
        scale: 1.0,
        bias: Some(&ERNIE_BIAS),
        logits: &ERNIE_EQ_LOGITS,
        d_w: &ERNIE_EQ_DW,
    };
    check("ERNIE, floor 0.25", &c, &ERNIE_FLOOR_EQ_EXPERTS, &ERNIE_FLOOR_EQ_WEIGHTS, &ERNIE_FLOOR_EQ_D_LOGITS);
}

#[test]
fn dbrx_p_norm_router_matches_transformers() {
    let cases: [Expected; 4] = [
        (1.0, &DBRX_P1_EXPERTS, &DBRX_P1_WEIGHTS, &DBRX_P1_D_LOGITS),
        (2.0, &DBRX_P2_EXPERTS, &DBRX_P2_WEIGHTS, &DBRX_P2_D_LOGITS),
        (1.5, &DBRX_P15_EXPERTS, &DBRX_P15_WEIGHTS, &DBRX_P15_D_LOGITS),
        (0.5, &DBRX_P05_EXPERTS, &DBRX_P05_WEIGHTS, &DBRX_P05_D_LOGITS),
    ];
    for (p, experts, weights, d_logits) in cases {
        let c = Case {
            s: 3,
            e: 6,
            k: 3,
            score: ScoreFn::Softmax,
            choice: Choice::TopK,
            normalize: Normalize::PNorm(p),
            scale: 1.0,
            bias: None,
            logits: &DBRX_LOGITS,
            d_w: &DBRX_DW,
        };
        check(&format!("DBRX, p = {p}"), &c, experts, weights, d_logits);
    }
}

#[test]
fn phimoe_sparsemixer_matches_transformers() {
    let cases: [Expected; 2] = [
        (0.01, &PHI_EPS001_EXPERTS, &PHI_EPS001_WEIGHTS, &PHI_EPS001_D_LOGITS),
        (0.3, &PHI_EPS03_EXPERTS, &PHI_EPS03_WEIGHTS, &PHI_EPS03_D_LOGITS),
    ];
    for (jitter_eps, experts, weights, d_logits) in cases {
        let c = Case {
            s: 5,
            e: 5,
            k: 2,
            score: ScoreFn::Softmax,
            choice: Choice::SparseMixer { jitter_eps },
            normalize: Normalize::None,
            scale: 1.0,
            bias: None,
            logits: &PHI_LOGITS,
            d_w: &PHI_DW,
        };
        let got = check(&format!("PhiMoE, jitter_eps {jitter_eps}"), &c, experts, weights, d_logits);
        // The scores stay the plain softmax over every expert.
        for (t, row) in got.scores.chunks(5).enumerate() {
            let l = &PHI_LOGITS[t * 5..(t + 1) * 5];
            let mx = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let z: f32 = l.iter().map(|&x| (x - mx).exp()).sum();
            let want: Vec<f32> = l.iter().map(|&x| (x - mx).exp() / z).collect();
            close(&format!("PhiMoE scores, token {t}"), row, &want, 1e-6, 0.0);
        }
    }
}

fn random_logits(s: usize, e: usize, stream: u32) -> Vec<f32> {
    philox::words(0x7e57, stream, s * e).into_iter().map(|w| (philox::to_open_unit(w) * 2.0 - 1.0) * 3.0).collect()
}

#[test]
fn p_norm_one_and_a_zero_floor_are_the_plain_sum_bit_for_bit() {
    let (s, e, k) = (23, 12, 4);
    let logits = random_logits(s, e, 1);
    let d_w = random_logits(s, k, 2);
    let case = |normalize| Case {
        s,
        e,
        k,
        score: ScoreFn::Softmax,
        choice: Choice::TopK,
        normalize,
        scale: 2.0,
        bias: None,
        logits: &logits,
        d_w: &d_w,
    };
    let sum = run(&case(Normalize::Sum));
    for other in [Normalize::PNorm(1.0), Normalize::SumFloor(0.0)] {
        let got = run(&case(other));
        assert_eq!(got.experts, sum.experts, "{other:?}: experts");
        assert_eq!(got.weights, sum.weights, "{other:?}: weights");
        assert_eq!(got.d_logits, sum.d_logits, "{other:?}: d_logits");
    }
}

#[test]
fn a_floor_above_every_sum_divides_by_the_floor_alone() {
    // Floor 2 exceeds any sum of softmax scores: weights are scores / 2 and the gradient
    // of the floor-divided weight is the score's own, halved.
    let (s, e, k) = (9, 6, 2);
    let logits = random_logits(s, e, 3);
    let d_w = random_logits(s, k, 4);
    let case = |normalize, scale| Case {
        s,
        e,
        k,
        score: ScoreFn::Softmax,
        choice: Choice::TopK,
        normalize,
        scale,
        bias: None,
        logits: &logits,
        d_w: &d_w,
    };
    let floored = run(&case(Normalize::SumFloor(2.0), 1.0));
    let halved = run(&case(Normalize::None, 0.5));
    assert_eq!(floored.experts, halved.experts);
    close("floored weights", &floored.weights, &halved.weights, 1e-6, 0.0);
    close("floored d_logits", &floored.d_logits, &halved.d_logits, 1e-6, 1e-7);
}

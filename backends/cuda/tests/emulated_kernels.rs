//! The CUDA kernels run on the host under kernels/emulate.h (threads for lanes, barriers
//! for `__syncthreads`/`__syncwarp`, shuffles and `mma.sync` exchanged through the warp),
//! launched as the cuda backend launches them, and are compared with the cpu backend:
//! routing (every choice rule, ties, >256 experts, non-finite inputs), the dispatch plan
//! (capacity rules, keep policies, masks, groups), permute/combine and the weighted
//! permute, the expert-parallel bucketing, regrouping and ranged combine, Philox noise,
//! router statistics, the elementwise ops (clamped GLUs and the output bias among them),
//! and the grouped products (tiles that span group ends, empty groups, K and N off the
//! tile size, GLU experts with and without a clamp, identity-expert tails, f32/f16/bf16
//! weights, the tensor-core kernels); and the backward and optimizer kernels: input,
//! weight and bias gradients of grouped (identity tails included) and dense products,
//! pass_rows and sum_rows, every activation's and (clamped) GLU's gradient, combine's
//! gradient over a dropped route and a token range, the router's backward (both score
//! functions, every normalisation, kept-route renormalisation, masked routes, router loss
//! and z-loss), the residual mix and gated add, every optimizer rule (bit for bit) and the
//! sum of squares.
//! Outputs the backend does not zero-fill start as NaN, so an element a kernel leaves
//! unwritten fails the comparison.
//!
//! Nothing here restates the backend's launch sequence: every parameter block comes from
//! the op's front door (`moe_engine::ops::*Op::check`), every grid and kernel choice from
//! `moe_cuda::launch`, and the plan runs the passes, buffer sizes and output slices of its
//! `kernel_abi::plan::PlanSchedule`, the same data the backend runs. This checks what the
//! kernels compute without a GPU; speed, and the PTX itself, are checked on a GPU and by
//! NVRTC.
//!
//! Needs g++ with C++20 (`<barrier>`); without it the test says so and returns, and with
//! `CI=true` a missing compiler is a failure.

mod emulate;

use emulate::{param, Arg, Script};
use moe_cpu::CpuBackend;
use moe_cuda::launch;
use moe_engine::kernel_abi::plan::{PlanBuffer, PlanSlice};
use moe_engine::kernel_abi::{tile_list_words, CastParams, ROUTE_STATUS_WORDS};
use moe_engine::ops::{
    ActGradKind, ActGradOp, AuxGrad, BlockTable, BucketOp, CapacityRule, Choice, CombineGradOp, CombineOp,
    DevicePlacement, ElementwiseKind, ElementwiseOp, GatedAddGradOp, GroupScore, GroupedLinearOp, GroupedMlpOp,
    KeepPolicy, LinearDxOp, MixGradOp, MlpWeights, NoiseOp, Normalize, Offsets, OptimStepOp, PassRowsOp,
    PermuteScaledOp, PlanOp, PlanSpec, RegroupOp, RouteGradOp, RouteGradSpec, RouteOp, RouteSpec, RouterStatsOp,
    ScoreFn, StepKind, StepRule, SumRowsOp, SumSquaresOp, WeightGradOp,
};
use moe_engine::philox::NoiseKind;
use moe_engine::{parity, philox, Activation, Backend, DType, Device, ExpertKind, GluClamp, HostTensor, Tensor};

type Cpu = Tensor<CpuBackend>;

fn rand(n: usize, stream: u32) -> Vec<f32> {
    philox::words(0xe4a1, stream, n).into_iter().map(|w| philox::to_open_unit(w) * 2.0 - 1.0).collect()
}

fn round(v: &[f32], dtype: DType) -> Vec<f32> {
    v.iter().map(|&x| dtype.round(x)).collect()
}

fn cpu() -> CpuBackend {
    CpuBackend::new(Some(1)).expect("cpu backend")
}

fn up(cpu: &CpuBackend, shape: &[usize], v: Vec<f32>) -> Cpu {
    cpu.upload(&HostTensor::f32(shape, v).expect("shape")).expect("upload")
}

fn host(cpu: &CpuBackend, t: &Cpu) -> HostTensor {
    cpu.download(t).expect("download")
}

fn same_i32(what: &str, want: &HostTensor, got: Vec<i32>) {
    let want = want.as_i32(what).expect("i32");
    assert_eq!(want, &got[..want.len()], "{what}");
}

fn close_f32(what: &str, want: &HostTensor, got: Vec<f32>, tol: f64) {
    let got = HostTensor::f32(want.shape(), got[..want.numel()].to_vec()).expect("shape");
    if let Err(msg) = parity::compare(what, want, &got, tol) {
        panic!("{msg}");
    }
}

fn offsets_of(counts: &[usize]) -> Vec<i32> {
    let mut off = vec![0i32];
    for &n in counts {
        off.push(off.last().copied().unwrap_or(0) + n as i32);
    }
    off
}

// ------------------------------------------------------------------ grouped products

struct MatmulCase {
    name: &'static str,
    counts: &'static [usize],
    k: usize,
    /// Output columns of the first product (2·F for GLU experts).
    n: usize,
    glu: Option<Activation>,
    /// The GLU's clamp (gpt-oss, DeepSeek-V4), applied in the kernels' epilogue.
    clamp: Option<GluClamp>,
    /// The last `tail` groups are weightless identity experts (`Offsets::with_tail`).
    tail: usize,
    dtype: DType,
    tensor_cores: bool,
    bias: bool,
}

#[test]
fn matrix_kernels_match_the_cpu_backend_under_emulation() {
    let Some(exe) = emulate::driver() else { return };
    let cases = [
        MatmulCase {
            name: "tc_bf16_plain",
            counts: &[70, 0, 5, 130],
            k: 40,
            n: 72,
            glu: None,
            clamp: None,
            tail: 0,
            dtype: DType::BF16,
            tensor_cores: true,
            bias: true,
        },
        MatmulCase {
            name: "tc_f16_swiglu",
            counts: &[1, 64, 65],
            k: 64,
            n: 80,
            glu: Some(Activation::Silu),
            clamp: None,
            tail: 0,
            dtype: DType::F16,
            tensor_cores: true,
            bias: false,
        },
        MatmulCase {
            name: "tc_bf16_geglu_two_column_blocks",
            counts: &[150],
            k: 96,
            n: 192,
            glu: Some(Activation::Gelu),
            clamp: None,
            tail: 0,
            dtype: DType::BF16,
            tensor_cores: true,
            bias: true,
        },
        MatmulCase {
            name: "simt_f32_swiglu",
            counts: &[3, 70, 0],
            k: 24,
            n: 40,
            glu: Some(Activation::Silu),
            clamp: None,
            tail: 0,
            dtype: DType::F32,
            tensor_cores: false,
            bias: true,
        },
        MatmulCase {
            name: "simt_bf16_plain",
            counts: &[33, 31],
            k: 17,
            n: 65,
            glu: None,
            clamp: None,
            tail: 0,
            dtype: DType::BF16,
            tensor_cores: false,
            bias: false,
        },
        MatmulCase {
            name: "tc_bf16_gpt_oss_clamped",
            counts: &[70, 0, 5, 130],
            k: 40,
            n: 72,
            glu: Some(Activation::Silu),
            clamp: Some(GluClamp::gpt_oss(0.5, 1.702)),
            tail: 0,
            dtype: DType::BF16,
            tensor_cores: true,
            bias: true,
        },
        MatmulCase {
            name: "simt_f32_deepseek_v4_clamped_identity_tail",
            counts: &[3, 70, 0, 9, 4],
            k: 24,
            n: 40,
            glu: Some(Activation::Silu),
            clamp: Some(GluClamp::deepseek_v4(0.4)),
            tail: 2,
            dtype: DType::F32,
            tensor_cores: false,
            bias: true,
        },
        MatmulCase {
            name: "tc_f16_plain_identity_tail",
            counts: &[33, 31, 12],
            k: 17,
            n: 65,
            glu: None,
            clamp: None,
            tail: 1,
            dtype: DType::F16,
            tensor_cores: true,
            bias: true,
        },
    ];
    let cpu = cpu();
    for (i, c) in cases.iter().enumerate() {
        // g: the weighted experts; the offsets carry the tail's groups after them.
        let (r, g) = (c.counts.iter().sum::<usize>(), c.counts.len() - c.tail);
        let s = 10 * i as u32;
        let (x, w, bias) = (rand(r * c.k, s), rand(g * c.n * c.k, s + 1), rand(g * c.n, s + 2));
        // The reference: the cpu backend on the values the kernel multiplies (weights in
        // their storage type; on tensor cores, activations rounded to it as well).
        let xr = if c.tensor_cores { round(&x, c.dtype) } else { x.clone() };
        let xt = up(&cpu, &[r, c.k], xr);
        let ot = Offsets::from_host(&cpu, &offsets_of(c.counts)).expect("offsets").with_tail(c.tail);
        let wt = cpu.upload_weight(&HostTensor::f32(&[g, c.n, c.k], round(&w, c.dtype)).expect("w"), DType::F32);
        let wt = wt.expect("weights");
        let bt = c.bias.then(|| up(&cpu, &[g, c.n], bias.clone()));
        // The parameter block the backend launches with, from the op's front door. The
        // front door checks on the cpu's f32 tensors; the weights' storage code is the
        // case's, as the cuda backend's tensors would carry it.
        let f = c.n / 2;
        let w_out = up(&cpu, &[g, c.k, f.max(1)], vec![0.0; g * c.k * f.max(1)]);
        let mlp = MlpWeights {
            kind: ExpertKind::Glu { activation: c.glu.unwrap_or(Activation::Silu), clamp: c.clamp },
            w_in: &wt,
            b_in: bt.as_ref(),
            w_out: Some(&w_out),
            b_out: None,
        };
        let mut params = match c.glu {
            Some(_) => GroupedMlpOp::check(&cpu, &xt, &ot, &mlp, true).expect("checked").params,
            None => GroupedLinearOp::check(&cpu, &xt, &ot, &wt, bt.as_ref()).expect("checked").params,
        };
        params.wdtype = match c.dtype {
            DType::F32 => 0,
            DType::F16 => 1,
            _ => 2,
        };
        let (_, kernel, geometry) = launch::grouped(&params, c.tensor_cores);

        let mut sc = Script::default();
        let off = sc.i32s(&offsets_of(c.counts));
        let tiles = sc.zeros(tile_list_words(params.max_tiles as usize));
        sc.launch("tile_map", launch::tile_map(), &[Arg::Buf(off), Arg::Buf(tiles), param(&params)]);
        let xb = sc.f32s(&x);
        let wb = if c.dtype == DType::F32 { sc.f32s(&w) } else { sc.u16s(&c.dtype.half_bits(&w).expect("halves")) };
        let bb = if c.bias { Arg::Buf(sc.f32s(&bias)) } else { Arg::Null };
        let cols = if c.glu.is_some() { f } else { c.n };
        let (out, pre) = (sc.zeros(r * cols), sc.zeros(if c.glu.is_some() { r * c.n } else { 0 }));
        let pre_arg = if c.glu.is_some() { Arg::Buf(pre) } else { Arg::Null };
        sc.launch(
            kernel,
            geometry,
            &[Arg::Buf(xb), Arg::Buf(wb), bb, Arg::Buf(tiles), Arg::Buf(out), pre_arg, param(&params)],
        );
        let got = sc.run(exe, c.name);

        let full = cpu.grouped_linear(&xt, &ot, &wt, bt.as_ref()).expect("cpu product");
        let (out_ref, pre_ref) = match c.glu {
            Some(a) => (cpu.glu_clamped(&full, a, c.clamp).expect("cpu glu"), Some(full)),
            None => (full, None),
        };
        close_f32(&format!("{}: out", c.name), &host(&cpu, &out_ref), got.f32s(out), 1e-5);
        if let Some(p) = pre_ref {
            close_f32(&format!("{}: pre", c.name), &host(&cpu, &p), got.f32s(pre), 1e-5);
        }
    }
}

#[test]
fn tile_map_keeps_tiles_inside_the_rows_whatever_the_offsets() {
    let Some(exe) = emulate::driver() else { return };
    // Offsets that overshoot the 100 rows and go backwards: the device's own guard clamps
    // every group into [previous end, rows] (the host refuses such offsets before).
    let cpu = cpu();
    let xt = up(&cpu, &[100, 8], vec![0.0; 800]);
    let ot = Offsets::from_host(&cpu, &[0, 60, 100, 100]).expect("offsets");
    let wt = up(&cpu, &[3, 4, 8], vec![0.0; 96]);
    let params = GroupedLinearOp::check(&cpu, &xt, &ot, &wt, None).expect("checked").params;
    let mut sc = Script::default();
    let off = sc.i32s(&[0, 90, 40, 500]);
    let tiles = sc.zeros(tile_list_words(params.max_tiles as usize));
    sc.launch("tile_map", launch::tile_map(), &[Arg::Buf(off), Arg::Buf(tiles), param(&params)]);
    let t = sc.run(exe, "tile_map_clamped").i32s(tiles);
    let list: Vec<(i32, i32, i32)> = (0..t[0] as usize).map(|i| (t[1 + 3 * i], t[2 + 3 * i], t[3 + 3 * i])).collect();
    assert_eq!(list, vec![(0, 0, 64), (0, 64, 90), (2, 90, 100)]);
}

// ------------------------------------------------------------------ routing

/// A route spec with its inputs.
struct RouteCase {
    name: &'static str,
    s: usize,
    e: usize,
    k: usize,
    score: ScoreFn,
    choice: Choice,
    bias: bool,
    noise: bool,
    normalize: Normalize,
    scale: f32,
    /// Logits rounded to 1/4 so that equal values (ties) are common.
    coarse: bool,
    /// Logits are uniform in [-spread, spread).
    spread: f32,
}

#[test]
fn route_kernel_matches_the_cpu_backend_under_emulation() {
    let Some(exe) = emulate::driver() else { return };
    let cpu = cpu();
    let group_max = Choice::GroupLimited { n_group: 4, topk_group: 2, group_score: GroupScore::Max };
    let group_top2 = Choice::GroupLimited { n_group: 8, topk_group: 3, group_score: GroupScore::SumTop2 };
    let base = RouteCase {
        name: "softmax_top2",
        s: 37,
        e: 8,
        k: 2,
        score: ScoreFn::Softmax,
        choice: Choice::TopK,
        bias: false,
        noise: false,
        normalize: Normalize::Sum,
        scale: 1.0,
        coarse: false,
        spread: 3.0,
    };
    let cases = [
        RouteCase { ..base },
        RouteCase { name: "softmax_top6_ties", s: 19, e: 40, k: 6, normalize: Normalize::None, coarse: true, ..base },
        RouteCase {
            name: "sigmoid_group_max_bias",
            s: 21,
            e: 64,
            k: 4,
            score: ScoreFn::Sigmoid,
            choice: group_max,
            bias: true,
            normalize: Normalize::SumPlus(1e-20),
            scale: 2.5,
            ..base
        },
        RouteCase {
            name: "sigmoid_group_top2_256",
            s: 9,
            e: 256,
            k: 8,
            score: ScoreFn::Sigmoid,
            choice: group_top2,
            bias: true,
            normalize: Normalize::SumPlus(1e-20),
            scale: 2.5,
            coarse: true,
            ..base
        },
        RouteCase {
            name: "deepspeed_top2_gumbel",
            s: 33,
            e: 16,
            choice: Choice::DeepSpeedTop2,
            noise: true,
            normalize: Normalize::None,
            ..base
        },
        RouteCase { name: "noisy_topk_300", s: 10, e: 300, k: 3, noise: true, ..base },
        // ±30: both sides of softplus' threshold 20 and of the e^(x/2) branch below -20.
        RouteCase {
            name: "sqrt_softplus_bias_sum_eps_wide",
            s: 21,
            e: 64,
            k: 6,
            score: ScoreFn::SqrtSoftplus,
            bias: true,
            normalize: Normalize::SumPlus(1e-20),
            scale: 1.5,
            spread: 30.0,
            ..base
        },
        RouteCase {
            name: "sqrt_softplus_group_top2_256",
            s: 9,
            e: 256,
            k: 8,
            score: ScoreFn::SqrtSoftplus,
            choice: group_top2,
            bias: true,
            coarse: true,
            ..base
        },
        RouteCase {
            name: "softmax_bias_floor_ties",
            s: 19,
            e: 40,
            k: 4,
            bias: true,
            normalize: Normalize::SumFloor(0.3),
            coarse: true,
            ..base
        },
        RouteCase { name: "p_norm_2", s: 37, e: 16, k: 3, normalize: Normalize::PNorm(2.0), ..base },
        RouteCase { name: "p_norm_1_5_300", s: 10, e: 300, k: 5, normalize: Normalize::PNorm(1.5), ..base },
        RouteCase {
            name: "sparsemixer_0_01",
            s: 33,
            e: 16,
            choice: Choice::SparseMixer { jitter_eps: 0.01 },
            normalize: Normalize::None,
            ..base
        },
        RouteCase {
            name: "sparsemixer_0_5_ties_70",
            s: 19,
            e: 70,
            choice: Choice::SparseMixer { jitter_eps: 0.5 },
            normalize: Normalize::None,
            scale: 0.5,
            coarse: true,
            ..base
        },
    ];
    for (i, c) in cases.iter().enumerate() {
        let st = 100 + 10 * i as u32;
        let mut logits: Vec<f32> = rand(c.s * c.e, st).into_iter().map(|v| c.spread * v).collect();
        if c.coarse {
            logits.iter_mut().for_each(|v| *v = (*v * 4.0).round() / 4.0);
        }
        let bias: Vec<f32> = rand(c.e, st + 1).into_iter().map(|v| 0.1 * v).collect();
        let noise = rand(c.s * c.e, st + 2);
        let lt = up(&cpu, &[c.s, c.e], logits.clone());
        let bt = up(&cpu, &[c.e], bias.clone());
        let nt = up(&cpu, &[c.s, c.e], noise.clone());
        let spec = RouteSpec {
            k: c.k,
            score: c.score,
            choice: c.choice,
            bias: c.bias.then_some(&bt),
            choice_noise: c.noise.then_some(&nt),
            normalize: c.normalize,
            scale: c.scale,
        };
        let want = cpu.route(&lt, &spec).expect("cpu route");
        let params = RouteOp::check(&cpu, &lt, &spec).expect("checked").params;

        let mut s = Script::default();
        let (l, dummy) = (s.f32s(&logits), s.zeros(4));
        let b = if c.bias { s.f32s(&bias) } else { dummy };
        let n = if c.noise { s.f32s(&noise) } else { dummy };
        let (scores, experts, weights) = (s.zeros(c.s * c.e), s.zeros(c.s * c.k), s.zeros(c.s * c.k));
        let status = s.zeros(ROUTE_STATUS_WORDS);
        let mut args = Vec::from([l, b, n, scores, experts, weights, status].map(Arg::Buf));
        args.push(param(&params));
        s.launch("route", launch::route(c.s), &args);
        let got = s.run(exe, c.name);
        same_i32(&format!("{}: experts", c.name), &host(&cpu, &want.experts), got.i32s(experts));
        close_f32(&format!("{}: weights", c.name), &host(&cpu, &want.weights), got.f32s(weights), 2e-6);
        close_f32(&format!("{}: scores", c.name), &host(&cpu, &want.scores), got.f32s(scores), 2e-6);
        assert!(got.i32s(status)[..3].iter().all(|&w| w == 0), "{}: finite inputs flagged", c.name);
    }
}

#[test]
fn route_kernel_flags_the_first_non_finite_logit_bias_and_noise() {
    let Some(exe) = emulate::driver() else { return };
    let cpu = cpu();
    let (s_, e) = (5usize, 40usize);
    let mut logits = rand(s_ * e, 7);
    logits[3 * e + 33] = f32::NAN;
    logits[3 * e + 35] = f32::INFINITY;
    logits[4 * e + 1] = f32::NEG_INFINITY;
    let mut bias = rand(e, 8);
    bias[29] = f32::NAN;
    let mut noise = rand(s_ * e, 9);
    noise[2 * e + 3] = f32::INFINITY;
    // The parameters of a spec that reads all three (checked on finite stand-ins: the
    // front door checks shapes, the kernel the values).
    let (lt, bt, nt) =
        (up(&cpu, &[s_, e], vec![0.0; s_ * e]), up(&cpu, &[e], vec![0.0; e]), up(&cpu, &[s_, e], vec![0.0; s_ * e]));
    let spec = RouteSpec { bias: Some(&bt), choice_noise: Some(&nt), ..RouteSpec::softmax_top_k(2) };
    let params = RouteOp::check(&cpu, &lt, &spec).expect("checked").params;
    let mut s = Script::default();
    let (l, b, n) = (s.f32s(&logits), s.f32s(&bias), s.f32s(&noise));
    let (scores, experts, weights) = (s.zeros(s_ * e), s.zeros(s_ * 2), s.zeros(s_ * 2));
    let status = s.zeros(ROUTE_STATUS_WORDS);
    let mut args = Vec::from([l, b, n, scores, experts, weights, status].map(Arg::Buf));
    args.push(param(&params));
    s.launch("route", launch::route(s_), &args);
    let got = s.run(exe, "route_non_finite").i32s(status);
    // Each word holds `u32::MAX − i` for the first flagged flat index `i`.
    let first = |w: i32| (u32::MAX - w as u32) as usize;
    assert_eq!(first(got[0]), 3 * e + 33, "the lowest flat index of a non-finite logit");
    assert_eq!(first(got[1]), 29, "the non-finite bias value");
    assert_eq!(first(got[2]), 2 * e + 3, "the non-finite noise value");
    // The cpu backend reports the same words the same way.
    let (lt, bt, nt) = (up(&cpu, &[s_, e], logits), up(&cpu, &[e], bias), up(&cpu, &[s_, e], noise));
    let spec = RouteSpec { bias: Some(&bt), choice_noise: Some(&nt), ..RouteSpec::softmax_top_k(2) };
    match cpu.route(&lt, &spec).err() {
        Some(moe_engine::Error::NonFiniteLogits { token: 3, expert: 33, .. }) => {}
        other => panic!("expected token 3, expert 33: {other:?}"),
    }
}

// ------------------------------------------------------------------ plan, permute, combine

/// A plan spec for [`plan_permute_and_combine_kernels_match_the_cpu_backend_under_emulation`].
struct PlanCase {
    name: &'static str,
    capacity: CapacityRule,
    keep: u8,
    used: bool,
    groups: usize,
    renormalize: bool,
}

#[test]
fn plan_permute_and_combine_kernels_match_the_cpu_backend_under_emulation() {
    let Some(exe) = emulate::driver() else { return };
    let cpu = cpu();
    let (s_, e, k, m) = (48usize, 8usize, 2usize, 12usize);
    let ds = CapacityRule::DeepSpeed { factor: 1.0, k_prime: 2, min_capacity: 4 };
    let base =
        PlanCase { name: "deepspeed_token_order", capacity: ds, keep: 0, used: false, groups: 1, renormalize: false };
    let cases = [
        PlanCase { ..base },
        PlanCase {
            name: "fixed_rank_major_renorm",
            capacity: CapacityRule::Fixed(7),
            keep: 1,
            renormalize: true,
            ..base
        },
        PlanCase { name: "deepspeed_priority_used", keep: 2, used: true, ..base },
        PlanCase {
            name: "dropless_clamped_two_groups",
            capacity: CapacityRule::Dropless { clamp_to_tokens: true },
            used: true,
            groups: 2,
            ..base
        },
        PlanCase { name: "unlimited", capacity: CapacityRule::Unlimited, ..base },
        PlanCase {
            name: "capacity_past_every_count",
            capacity: CapacityRule::DeepSpeed { factor: 1e12, k_prime: 2, min_capacity: 0 },
            keep: 2,
            ..base
        },
    ];
    for (i, c) in cases.iter().enumerate() {
        let st = 300 + 10 * i as u32;
        // Skewed logits so that some experts overflow their capacity.
        let logits: Vec<f32> = rand(s_ * e, st)
            .into_iter()
            .enumerate()
            .map(|(j, v)| 2.0 * v + if j % e < 2 { 1.5 } else { 0.0 })
            .collect();
        let lt = up(&cpu, &[s_, e], logits);
        let spec = RouteSpec::softmax_top_k(k);
        let routes = cpu.route(&lt, &spec).expect("cpu route");
        let used: Vec<f32> = (0..s_).map(|t| if t % 7 == 3 { 0.0 } else { 1.0 }).collect();
        let mut priority = rand(s_ * e, st + 1);
        // A NaN priority ranks lowest on every backend.
        priority[5 * e + 1] = f32::NAN;
        let (ut, pt) = (up(&cpu, &[s_], used.clone()), up(&cpu, &[s_, e], priority.clone()));
        let plan_spec = PlanSpec {
            num_experts: e,
            capacity: c.capacity,
            keep: match c.keep {
                0 => KeepPolicy::TokenOrder,
                1 => KeepPolicy::RankMajor,
                _ => KeepPolicy::Priority(&pt),
            },
            used_token: c.used.then_some(&ut),
            group_size: (c.groups > 1).then_some(s_ / c.groups),
            renormalize_kept: c.renormalize,
        };
        let want = cpu.plan(&routes, &plan_spec).expect("cpu plan");
        let x = rand(s_ * m, st + 2);
        let xt = up(&cpu, &[s_, m], x.clone());
        let route_rows = want.route_rows();
        let xp = cpu.permute(&xt, &route_rows).expect("cpu permute");
        let yp_host = host(&cpu, &xp);
        let yp: Vec<f32> = yp_host.as_f32("yp").expect("f32").iter().map(|v| v * 0.5 + 0.25).collect();
        let ypt = up(&cpu, yp_host.shape(), yp.clone());
        let y = cpu.combine(&ypt, &route_rows, &want.weights, 0..s_).expect("cpu combine");

        // The backend's schedule: passes, buffer sizes, output slices.
        let op = PlanOp::check(&cpu, &routes, &plan_spec).expect("checked");
        let sched = &op.schedule;
        let ex = host(&cpu, &routes.experts).into_i32("experts").expect("i32");
        let rw = host(&cpu, &routes.weights).into_f32("weights").expect("f32");
        let mut s = Script::default();
        let (exb, rwb, dummy) = (s.i32s(&ex), s.f32s(&rw), s.zeros(4));
        let usedb = if c.used { s.f32s(&used) } else { dummy };
        let prib = if c.keep == 2 { s.f32s(&priority) } else { dummy };
        let (scratch, info) = (s.zeros(sched.scratch_words), s.zeros(sched.info_words));
        let (sr, pw) = (s.zeros(sched.slots_rows_words), s.zeros(sched.weights_len));
        let mut args = Vec::from([exb, rwb, usedb, prib, scratch, info, sr, pw].map(Arg::Buf));
        args.push(param(&sched.params));
        for pass in &sched.passes {
            s.launch(pass.entry, launch::plan_pass(pass), &args);
        }
        // permute and combine run on the reference plan's rows and weights, so that a plan
        // mismatch is reported as one (below) rather than as a permute or combine error.
        let (xb, ypb) = (s.f32s(&x), s.f32s(&yp));
        let rows = host(&cpu, &want.rows).into_i32("rows").expect("i32");
        let (rowsb, pwb) = (s.i32s(&rows), s.f32s(host(&cpu, &want.weights).as_f32("w").expect("f32")));
        let (xpb, yb) = (s.zeros(s_ * k * m), s.zeros(s_ * m));
        let permute = moe_engine::ops::PermuteOp::check(&cpu, &xt, &route_rows).expect("checked").params;
        let combine =
            moe_engine::ops::CombineOp::check(&cpu, &ypt, &route_rows, &want.weights, 0..s_).expect("checked").params;
        let b = Arg::Buf;
        s.launch("permute", launch::per_element(s_ * k * m), &[b(xb), b(rowsb), b(pwb), b(xpb), param(&permute)]);
        s.launch("combine", launch::per_element(s_ * m), &[b(ypb), b(rowsb), b(pwb), b(yb), param(&combine)]);
        // The weighted permute (Llama 4) by the plan's combine weights.
        let scaled = PermuteScaledOp::check(&cpu, &xt, &route_rows, &want.weights).expect("checked").params;
        let xsb = s.zeros(s_ * k * m);
        s.launch("permute_scaled", launch::per_element(s_ * k * m), &[b(xb), b(rowsb), b(pwb), b(xsb), param(&scaled)]);
        let got = s.run(exe, c.name);

        let (info_v, sr_v) = (got.i32s(info), got.i32s(sr));
        let slice = |sl: &PlanSlice| -> Vec<i32> {
            let from = if sl.buffer == PlanBuffer::Info { &info_v } else { &sr_v };
            from[sl.offset..sl.offset + sl.len()].to_vec()
        };
        let name = |what: &str| format!("{}: {what}", c.name);
        same_i32(&name("counts"), &host(&cpu, &want.counts), slice(&sched.counts()));
        same_i32(&name("first_counts"), &host(&cpu, &want.first_counts), slice(&sched.first_counts()));
        same_i32(&name("kept_counts"), &host(&cpu, &want.kept_counts), slice(&sched.kept_counts()));
        same_i32(&name("offsets"), &host(&cpu, want.offsets.tensor()), slice(&sched.offsets()));
        same_i32(&name("stats"), &host(&cpu, &want.stats), slice(&sched.stats()));
        same_i32(&name("slots"), &host(&cpu, &want.slots), slice(&sched.slots()));
        same_i32(&name("rows"), &host(&cpu, &want.rows), slice(&sched.rows()));
        close_f32(&name("weights"), &host(&cpu, &want.weights), got.f32s(pw), 1e-6);
        close_f32(&name("permute"), &host(&cpu, &xp), got.f32s(xpb), 0.0);
        close_f32(&name("combine"), &host(&cpu, &y), got.f32s(yb), 1e-6);
        let xs = cpu.permute_scaled(&xt, &route_rows, &want.weights).expect("cpu permute_scaled");
        close_f32(&name("permute_scaled"), &host(&cpu, &xs), got.f32s(xsb), 0.0);
        let dropped = host(&cpu, &want.stats).as_i32("stats").expect("i32")[1];
        if c.name == "deepspeed_token_order" {
            assert!(dropped > 0, "the skewed case should drop routes, dropped {dropped}");
        }
    }
}

// ------------------------------------------------------------------ the expert-parallel exchange

#[test]
fn bucket_regroup_and_ranged_combine_kernels_match_the_cpu_backend_under_emulation() {
    let Some(exe) = emulate::driver() else { return };
    let cpu = cpu();
    // 400 routes over 6 experts: capacity 67, so an expert's rows span two chunks of 64.
    let (s_, e, k, m) = (200usize, 6usize, 2usize, 5usize);
    let logits = up(&cpu, &[s_, e], rand(s_ * e, 700).into_iter().map(|v| 3.0 * v).collect());
    let routes = cpu.route(&logits, &RouteSpec::softmax_top_k(k)).expect("cpu route");
    // DeepSpeed top-2 capacity, rank-major: some routes dropped, slots not in token order.
    let plan_spec = PlanSpec {
        num_experts: e,
        capacity: CapacityRule::DeepSpeed { factor: 1.0, k_prime: 2, min_capacity: 2 },
        keep: KeepPolicy::RankMajor,
        used_token: None,
        group_size: None,
        renormalize_kept: true,
    };
    let plan = cpu.plan(&routes, &plan_spec).expect("cpu plan");
    // 9 slots over 3 ranks: experts 0..3 get a second replica.
    let replicas: Vec<Vec<usize>> = (0..e).map(|x| if x < 3 { vec![x, e + x] } else { vec![x] }).collect();
    let placement = DevicePlacement::new(&cpu, &replicas, 3, 3).expect("placement");
    let ints = |t: &Cpu| host(&cpu, t).into_i32("i32").expect("i32");
    for (case, tokens) in [("every token", 0..s_), ("a rank's share", 67..133)] {
        let want = cpu.bucket(&plan, &placement, tokens.clone()).expect("cpu bucket");
        let op = BucketOp::check(&cpu, &plan, &placement, tokens.clone()).expect("checked");
        let sched = &op.schedule;
        let mut sc = Script::default();
        let bufs = [
            sc.i32s(&ints(&plan.rows)),
            sc.i32s(&ints(plan.offsets.tensor())),
            sc.i32s(&ints(&placement.replica_offsets)),
            sc.i32s(&ints(&placement.replica_slots)),
            sc.zeros(sched.scratch_words),
            sc.zeros(placement.slots() + 2),
            sc.zeros(s_ * k),
        ];
        let mut args = Vec::from(bufs.map(Arg::Buf));
        args.push(param(&sched.params));
        for pass in &sched.passes {
            sc.launch(pass.entry, launch::bucket_pass(pass), &args);
        }
        // The combine of this rank's tokens over rows returned in send order (a buffer of
        // the bucketing's S·k bound; the first `sent` rows are the ones returned).
        let sent: usize = ints(&want.counts)[..placement.slots()].iter().map(|&c| c as usize).sum();
        let returned = rand(s_ * k * m, 701);
        let rt = up(&cpu, &[s_ * k, m], returned.clone());
        let y = cpu.combine(&rt, &want.rows, &plan.weights, tokens.clone()).expect("cpu combine");
        let combine = CombineOp::check(&cpu, &rt, &want.rows, &plan.weights, tokens.clone()).expect("checked").params;
        let weights = host(&cpu, &plan.weights).into_f32("w").expect("f32");
        let (rb, wb, yb) = (sc.f32s(&returned), sc.f32s(&weights), sc.zeros(tokens.len() * m));
        let b = Arg::Buf;
        let combine_args = [b(rb), b(bufs[6]), b(wb), b(yb), param(&combine)];
        sc.launch("combine", launch::per_element(tokens.len() * m), &combine_args);
        let got = sc.run(exe, "bucket");
        same_i32(&format!("{case}: counts"), &host(&cpu, &want.counts), got.i32s(bufs[5]));
        same_i32(&format!("{case}: send rows"), &host(&cpu, want.rows.tensor()), got.i32s(bufs[6]));
        close_f32(&format!("{case}: ranged combine"), &host(&cpu, &y), got.f32s(yb), 1e-6);
        assert!(sent > 0 && ints(want.rows.tensor()).contains(&-1), "{case}: some routes sent, some not");
        if case == "every token" {
            let kept = ints(&plan.kept_counts);
            assert!(kept.iter().any(|&c| c > 64), "{case}: an expert's rows span two chunks, kept {kept:?}");
        }
    }
    // Regroup: 3 sources x 3 slots, some blocks empty, to the experts' order.
    let counts = [[3usize, 0, 2], [1, 4, 0], [0, 2, 5]];
    let mut at = 0;
    let mut start = [[0usize; 3]; 3];
    for (src, row) in counts.iter().enumerate() {
        for (l, &c) in row.iter().enumerate() {
            start[src][l] = at;
            at += c;
        }
    }
    let blocks: Vec<(usize, usize)> =
        (0..3).flat_map(|l| (0..3).map(move |src| (l, src))).map(|(l, src)| (start[src][l], counts[src][l])).collect();
    let table = BlockTable::new(&cpu, &blocks, at).expect("table");
    let x = rand(at * m, 702);
    let xt = up(&cpu, &[at, m], x.clone());
    let want = cpu.regroup(&xt, &table).expect("cpu regroup");
    let op = RegroupOp::check(&cpu, &xt, &table).expect("checked");
    let mut sc = Script::default();
    let (xb, tb, ob) = (sc.f32s(&x), sc.i32s(&ints(table.tensor())), sc.zeros(at * m));
    sc.launch("regroup", launch::per_element(at * m), &[Arg::Buf(xb), Arg::Buf(tb), Arg::Buf(ob), param(&op.params)]);
    let got = sc.run(exe, "regroup");
    close_f32("regroup", &host(&cpu, &want), got.f32s(ob), 0.0);
}

// ------------------------------------------------------------------ noise, stats, elementwise

#[test]
fn noise_and_router_stats_kernels_match_the_cpu_backend_under_emulation() {
    let Some(exe) = emulate::driver() else { return };
    let cpu = cpu();
    let (s_, e) = (29usize, 12usize);
    let seed = 0x1234_5678_9abc_def0u64;
    let kinds = [NoiseKind::Uniform, NoiseKind::Jitter(0.01), NoiseKind::Gumbel];
    let mut s = Script::default();
    let mut outs = Vec::new();
    for kind in kinds {
        let out = s.zeros(s_ * e);
        let op = NoiseOp::check(&cpu, kind, seed, 5, &[s_, e]).expect("checked");
        s.launch("noise", launch::per_element(op.n), &[Arg::Buf(out), param(&op.params)]);
        outs.push(out);
    }
    let logits: Vec<f32> = rand(s_ * e, 900).into_iter().map(|v| 2.0 * v).collect();
    let lt = up(&cpu, &[s_, e], logits.clone());
    let scores = cpu.route(&lt, &RouteSpec::softmax_top_k(2)).expect("route").scores;
    let stats = RouterStatsOp::check(&cpu, &lt, &scores).expect("checked").params;
    let (lb, sb, out) = (s.f32s(&logits), s.f32s(host(&cpu, &scores).as_f32("scores").expect("f32")), s.zeros(e + 1));
    s.launch("router_stats", launch::router_stats(e), &[Arg::Buf(lb), Arg::Buf(sb), Arg::Buf(out), param(&stats)]);
    let got = s.run(exe, "noise_stats");
    for (kind, buf) in kinds.iter().zip(outs) {
        let want = host(&cpu, &cpu.noise(*kind, seed, 5, &[s_, e]).expect("cpu noise"));
        close_f32(&format!("noise {kind:?}"), &want, got.f32s(buf), 1e-6);
    }
    let want = host(&cpu, &cpu.router_stats(&lt, &scores).expect("stats"));
    close_f32("router_stats", &want, got.f32s(out), 2e-6);
}

/// An elementwise op under test: name, kind and its operands.
type ElementwiseCase<'a> = (String, ElementwiseKind, &'a Cpu, Option<&'a Cpu>, Option<&'a Cpu>);

#[test]
fn elementwise_kernels_match_the_cpu_backend_under_emulation() {
    let Some(exe) = emulate::driver() else { return };
    let cpu = cpu();
    let (r, c) = (13usize, 20usize);
    let (a, b2) = (rand(r * c, 700), rand(2 * r * c, 701));
    let (b, gate, coef) = (rand(r * c, 702), rand(r, 703), rand(2 * r, 704));
    let (at, b2t, bt) = (up(&cpu, &[r, c], a.clone()), up(&cpu, &[r, 2 * c], b2.clone()), up(&cpu, &[r, c], b.clone()));
    let (gt, ct) = (up(&cpu, &[r, 1], gate.clone()), up(&cpu, &[r, 2], coef.clone()));
    let mut ops: Vec<ElementwiseCase<'_>> = Vec::new();
    for act in Activation::ALL {
        ops.push((format!("{act:?}"), ElementwiseKind::Activation(act), &at, None, None));
        ops.push((format!("glu {act:?}"), ElementwiseKind::Glu(act), &b2t, None, None));
    }
    let clamps = [
        (Activation::Silu, GluClamp::gpt_oss(0.6, 1.702)),
        (Activation::Silu, GluClamp::deepseek_v4(0.5)),
        (Activation::GeluTanh, GluClamp { limit: 0.7, alpha: 1.0, up_offset: -0.25 }),
    ];
    for (act, clamp) in clamps {
        ops.push((format!("glu {act:?} {clamp:?}"), ElementwiseKind::GluClamped(act, clamp), &b2t, None, None));
    }
    let bias = rand(c, 705);
    let biast = up(&cpu, &[c], bias.clone());
    ops.push(("add_bias".into(), ElementwiseKind::AddBias, &at, Some(&biast), None));
    ops.push(("mul".into(), ElementwiseKind::Mul, &at, Some(&bt), None));
    ops.push(("scale".into(), ElementwiseKind::Scale(-0.75), &at, None, None));
    ops.push(("add".into(), ElementwiseKind::AddGated, &at, Some(&bt), None));
    ops.push(("add_gated".into(), ElementwiseKind::AddGated, &at, Some(&bt), Some(&gt)));
    ops.push(("residual_mix".into(), ElementwiseKind::ResidualMix, &at, Some(&bt), Some(&ct)));

    let mut s = Script::default();
    let (ab, b2b, bb, gb, cb) = (s.f32s(&a), s.f32s(&b2), s.f32s(&b), s.f32s(&gate), s.f32s(&coef));
    let biasb = s.f32s(&bias);
    let dev = |t: &Cpu| -> usize {
        [(&at, ab), (&b2t, b2b), (&bt, bb), (&gt, gb), (&ct, cb), (&biast, biasb)]
            .iter()
            .find(|(h, _)| std::ptr::eq(*h, t))
            .map(|&(_, d)| d)
            .expect("a known input")
    };
    let mut outs = Vec::new();
    for (_, kind, x, y, z) in &ops {
        let op = ElementwiseOp::check(&cpu, *kind, x, *y, *z).expect("checked");
        let out = s.zeros(op.params.n as usize);
        let opt = |t: Option<&Cpu>| t.map_or(Arg::Null, |t| Arg::Buf(dev(t)));
        let args = [Arg::Buf(dev(x)), opt(*y), opt(*z), Arg::Buf(out), param(&op.params)];
        s.launch(kind.entry(), launch::per_element(op.params.n as usize), &args);
        outs.push(out);
    }
    let got = s.run(exe, "elementwise");
    for ((what, kind, x, y, z), out) in ops.iter().zip(outs) {
        let want = host(&cpu, &cpu.elementwise(*kind, x, *y, *z).expect("cpu op"));
        close_f32(what, &want, got.f32s(out), 2e-6);
    }
}

/// The kernels in front of cuBLAS: `to_half` writes each element in place under the
/// f16/bf16 flag, `fill_rows` broadcasts the bias. On the host the rounding itself is
/// emulate.h's stand-in for `cvt.rn` (round to nearest even), held here to the `half`
/// crate's, which the tensor-core reference above relies on too.
#[test]
fn cublas_feeding_kernels_cast_and_fill_as_specified() {
    let Some(exe) = emulate::driver() else { return };
    let (r, c) = (7usize, 9usize);
    let x: Vec<f32> = rand(r * c, 800).into_iter().map(|v| v * 300.0).collect();
    let bias = rand(c, 801);
    let mut s = Script::default();
    let (xb, bb) = (s.f32s(&x), s.f32s(&bias));
    // 16-bit outputs: two per 4-byte element, rounded up.
    let (h16, hbf, fill) = (s.zeros((r * c).div_ceil(2)), s.zeros((r * c).div_ceil(2)), s.zeros(r * c));
    let n = (r * c) as u64;
    let geometry = launch::per_element(r * c);
    for (out, bf16) in [(h16, 0), (hbf, 1)] {
        s.launch("to_half", geometry, &[Arg::Buf(xb), Arg::Buf(out), param(&CastParams { n, cols: 0, bf16 })]);
    }
    s.launch("fill_rows", geometry, &[Arg::Buf(bb), Arg::Buf(fill), param(&CastParams { n, cols: c as u32, bf16: 0 })]);
    let got = s.run(exe, "cublas_feeds");
    let halves = |i: usize| -> Vec<u16> {
        got.i32s(i).iter().flat_map(|w| [(*w as u32 & 0xffff) as u16, (*w as u32 >> 16) as u16]).collect()
    };
    assert_eq!(&halves(h16)[..r * c], &DType::F16.half_bits(&x).unwrap()[..], "f16 rounding (to nearest even)");
    assert_eq!(&halves(hbf)[..r * c], &DType::BF16.half_bits(&x).unwrap()[..], "bf16 rounding (to nearest even)");
    let want: Vec<f32> = (0..r * c).map(|i| bias[i % c]).collect();
    assert_eq!(got.f32s(fill), want, "bias rows");
}

/// `cast_weight` (kernels/matmul_tc.cu): the 16-bit patterns `upload_weight` stores (the
/// `half` crate's rounding), bit for bit, on the parity case's values: ties to even,
/// subnormals, overflow, ±inf, NaN payloads and random bit patterns. The kernel does the
/// rounding in integer arithmetic, so the host runs the very code the device does. Its
/// parameter block is written here, as `CastWeightOp::check` encodes it.
#[test]
fn cast_weight_rounds_as_upload_weight_bit_for_bit() {
    let Some(exe) = emulate::driver() else { return };
    for dtype in [DType::F16, DType::BF16] {
        let x = parity::cases::CastWeightCase { shape: vec![5, 41], dtype }.values().expect("values");
        let v = x.as_f32("x").expect("f32");
        let n = v.len();
        let mut s = Script::default();
        let xb = s.f32s(v);
        let out = s.zeros(n.div_ceil(2));
        let p = CastParams { n: n as u64, cols: 0, bf16: u32::from(dtype == DType::BF16) };
        s.launch("cast_weight", launch::per_element(n), &[Arg::Buf(xb), Arg::Buf(out), param(&p)]);
        let got = s.run(exe, "cast_weight");
        let bits: Vec<u16> =
            got.i32s(out).iter().flat_map(|w| [(*w as u32 & 0xffff) as u16, (*w as u32 >> 16) as u16]).collect();
        let want = dtype.half_bits(v).expect("half bits");
        for (i, (g, w)) in bits.iter().zip(&want).enumerate() {
            assert_eq!(g, w, "{dtype} element {i} ({:#010x}): {g:#06x} against {w:#06x}", v[i].to_bits());
        }
    }
}

// ------------------------------------------------------------------ backward and optimizer

/// `n` NaNs: an output buffer the kernels must write in full (a NaN left over fails every
/// comparison), where the backend relies on no zero-fill.
fn poisoned(s: &mut Script, n: usize) -> usize {
    s.f32s(&vec![f32::NAN; n])
}

/// The weight storage code of the matrix kernels.
fn weight_code(dtype: DType) -> u32 {
    match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        _ => 2,
    }
}

/// Bit-for-bit equality with the cpu (the kernels that keep its order of operations).
fn same_bits(what: &str, want: &HostTensor, got: Vec<f32>) {
    let want = want.as_f32(what).expect("f32");
    let bad: Vec<usize> = (0..want.len()).filter(|&i| want[i].to_bits() != got[i].to_bits()).collect();
    assert!(bad.is_empty(), "{what}: {} of {} values differ, first at {:?}", bad.len(), want.len(), bad.first());
}

/// A product whose gradients are under test.
struct GradMatmulCase {
    name: &'static str,
    counts: &'static [usize],
    /// Rows past the last group (zero in dx, unread by dw).
    extra_rows: usize,
    n: usize,
    k: usize,
    dtype: DType,
    grouped: bool,
    /// The last groups are weightless identity experts: no gradient, their rows zero in dx.
    tail: usize,
}

#[test]
fn backward_product_kernels_match_the_cpu_backend_under_emulation() {
    let Some(exe) = emulate::driver() else { return };
    let cpu = cpu();
    let base = GradMatmulCase {
        name: "grouped_f32_empty_group_two_column_blocks",
        counts: &[37, 0, 70, 3],
        extra_rows: 5,
        n: 33,
        k: 70,
        dtype: DType::F32,
        grouped: true,
        tail: 0,
    };
    let cases = [
        GradMatmulCase { ..base },
        GradMatmulCase {
            name: "grouped_bf16_empty_last_group",
            counts: &[20, 45, 0],
            extra_rows: 0,
            n: 19,
            k: 9,
            dtype: DType::BF16,
            ..base
        },
        GradMatmulCase {
            name: "grouped_f16_two_row_blocks",
            counts: &[1, 66],
            extra_rows: 2,
            n: 65,
            k: 17,
            dtype: DType::F16,
            ..base
        },
        GradMatmulCase { name: "dense_f32", counts: &[83], extra_rows: 0, n: 21, k: 66, grouped: false, ..base },
        GradMatmulCase {
            name: "grouped_f16_identity_tail",
            counts: &[9, 70, 0, 13, 5],
            extra_rows: 3,
            n: 33,
            k: 20,
            dtype: DType::F16,
            tail: 2,
            ..base
        },
    ];
    for (i, c) in cases.iter().enumerate() {
        let (g, n, k) = (c.counts.len() - c.tail, c.n, c.k);
        let rows = c.counts.iter().sum::<usize>() + c.extra_rows;
        let st = 1000 + 10 * i as u32;
        let (dy, x, w) = (rand(rows * n, st), rand(rows * k, st + 1), rand(g * n * k, st + 2));
        let dyt = up(&cpu, &[rows, n], dy.clone());
        let xt = up(&cpu, &[rows, k], x.clone());
        let w_shape = if c.grouped { vec![g, n, k] } else { vec![n, k] };
        // The reference multiplies the weights in their storage type, as the kernel reads them.
        let wt = cpu.upload_weight(&HostTensor::f32(&w_shape, round(&w, c.dtype)).expect("w"), DType::F32);
        let wt = wt.expect("weights");
        let ot = Offsets::from_host(&cpu, &offsets_of(c.counts)).expect("offsets").with_tail(c.tail);
        let off = c.grouped.then_some(&ot);
        let mut dx_params = LinearDxOp::check(&cpu, &dyt, &wt, off).expect("checked").params;
        dx_params.wdtype = weight_code(c.dtype);
        let wg_params = WeightGradOp::check(&cpu, &dyt, &xt, off, true).expect("checked").params;

        let mut s = Script::default();
        let (dyb, xb, offb) = (s.f32s(&dy), s.f32s(&x), s.i32s(&offsets_of(c.counts)));
        let wb = if c.dtype == DType::F32 { s.f32s(&w) } else { s.u16s(&c.dtype.half_bits(&w).expect("halves")) };
        let off_arg = || if c.grouped { Arg::Buf(offb) } else { Arg::Null };
        // dx starts zeroed as the backend allocates it: rows past the last group stay 0.
        let dx = s.zeros(rows * k);
        let (dw, db) = (poisoned(&mut s, g * n * k), poisoned(&mut s, g * n));
        let b = Arg::Buf;
        let dx_args = [b(dyb), b(wb), off_arg(), b(dx), param(&dx_params)];
        s.launch("linear_dx", launch::linear_dx(&dx_params), &dx_args);
        let dw_args = [b(dyb), b(xb), off_arg(), b(dw), param(&wg_params)];
        s.launch("weight_grad", launch::weight_grad(&wg_params), &dw_args);
        let db_args = [b(dyb), b(xb), off_arg(), b(db), param(&wg_params)];
        s.launch("bias_grad", launch::bias_grad(&wg_params), &db_args);
        let got = s.run(exe, c.name);

        let want_dx = cpu.linear_dx(&dyt, &wt, off).expect("cpu linear_dx");
        let want = cpu.weight_grad(&dyt, &xt, off, true).expect("cpu weight_grad");
        let name = |what: &str| format!("{}: {what}", c.name);
        close_f32(&name("dx"), &host(&cpu, &want_dx), got.f32s(dx), 1e-5);
        close_f32(&name("dw"), &host(&cpu, &want.dw), got.f32s(dw), 1e-5);
        // The bias gradient sums rows in row order, as the cpu: the same bits.
        same_bits(&name("db"), &host(&cpu, &want.db.expect("asked for")), got.f32s(db));
    }
}

#[test]
fn act_grad_kernel_matches_the_cpu_backend_under_emulation() {
    let Some(exe) = emulate::driver() else { return };
    let cpu = cpu();
    let (r, i) = (13usize, 21usize);
    // Pre-activations over [-3, 3], zero included (relu's kink).
    let mut pre: Vec<f32> = rand(r * 2 * i, 1100).into_iter().map(|v| 3.0 * v).collect();
    pre[5] = 0.0;
    // On the bounds of the first clamp below (gate = limit, up = −limit).
    pre[0] = 1.5;
    pre[i] = -1.5;
    let dy = rand(r * i, 1101);
    let (pre1t, pre2t) = (up(&cpu, &[r, i], pre[..r * i].to_vec()), up(&cpu, &[r, 2 * i], pre.clone()));
    let dyt = up(&cpu, &[r, i], dy.clone());
    let mut kinds = Vec::new();
    for act in Activation::ALL {
        kinds.push(ActGradKind::Activation(act));
        kinds.push(ActGradKind::Glu(act));
    }
    // Pre-activations over [-3, 3]: the clamps bite on both sides, and the first row's first
    // gate and up sit on gpt-oss's bounds, where torch's clamp passes no gradient.
    kinds.push(ActGradKind::GluClamped(Activation::Silu, GluClamp::gpt_oss(1.5, 1.702)));
    kinds.push(ActGradKind::GluClamped(Activation::Silu, GluClamp::deepseek_v4(2.0)));
    kinds.push(ActGradKind::GluClamped(Activation::Gelu, GluClamp { limit: 1.0, alpha: 1.0, up_offset: 0.5 }));
    let mut s = Script::default();
    let (dyb, pre1b, pre2b) = (s.f32s(&dy), s.f32s(&pre[..r * i]), s.f32s(&pre));
    let mut outs = Vec::new();
    for kind in &kinds {
        let glu = !matches!(kind, ActGradKind::Activation(_));
        let (pre_t, pre_b) = if glu { (&pre2t, pre2b) } else { (&pre1t, pre1b) };
        let op = ActGradOp::check(&cpu, *kind, &dyt, pre_t).expect("checked");
        let out = poisoned(&mut s, op.out_shape[0] * op.out_shape[1]);
        let args = [Arg::Buf(dyb), Arg::Buf(pre_b), Arg::Buf(out), param(&op.params)];
        s.launch("act_grad", launch::act_grad(&op.params), &args);
        outs.push(out);
    }
    let got = s.run(exe, "act_grad");
    for (kind, out) in kinds.iter().zip(outs) {
        let pre_t = if matches!(kind, ActGradKind::Activation(_)) { &pre1t } else { &pre2t };
        let want = host(&cpu, &cpu.act_grad(*kind, &dyt, pre_t).expect("cpu act_grad"));
        close_f32(&format!("act_grad {kind:?}"), &want, got.f32s(out), 1e-5);
    }
}

#[test]
fn combine_grad_kernels_match_the_cpu_backend_under_emulation() {
    let Some(exe) = emulate::driver() else { return };
    let cpu = cpu();
    let (s_, e, k, m) = (48usize, 8usize, 3usize, 13usize);
    // Skewed logits and DeepSpeed capacity: some routes dropped (row −1).
    let logits: Vec<f32> =
        rand(s_ * e, 1200).into_iter().enumerate().map(|(j, v)| 2.0 * v + if j % e < 2 { 1.5 } else { 0.0 }).collect();
    let lt = up(&cpu, &[s_, e], logits);
    let routes = cpu.route(&lt, &RouteSpec::softmax_top_k(k)).expect("cpu route");
    let plan_spec = PlanSpec {
        num_experts: e,
        capacity: CapacityRule::DeepSpeed { factor: 1.0, k_prime: k, min_capacity: 4 },
        keep: KeepPolicy::TokenOrder,
        used_token: None,
        group_size: None,
        renormalize_kept: true,
    };
    let plan = cpu.plan(&routes, &plan_spec).expect("cpu plan");
    let rows_host = host(&cpu, &plan.rows).into_i32("rows").expect("i32");
    assert!(rows_host.contains(&-1), "some routes dropped");
    let route_rows = plan.route_rows();
    let bound = route_rows.bound();
    let yp = rand(bound * m, 1201);
    let ypt = up(&cpu, &[bound, m], yp.clone());
    let weights = host(&cpu, &plan.weights).into_f32("weights").expect("f32");
    for (case, tokens) in [("every token", 0..s_), ("a range", 7..31)] {
        let dy = rand(tokens.len() * m, 1202);
        let dyt = up(&cpu, &[tokens.len(), m], dy.clone());
        let op = CombineGradOp::check(&cpu, &dyt, &ypt, &route_rows, &plan.weights, tokens.clone()).expect("checked");
        let mut s = Script::default();
        let (dyb, ypb, rb, wb) = (s.f32s(&dy), s.f32s(&yp), s.i32s(&rows_host), s.f32s(&weights));
        // d_yp starts zeroed as the backend allocates it; d_w is written in full.
        let (d_yp, d_w) = (s.zeros(bound * m), poisoned(&mut s, s_ * k));
        let b = Arg::Buf;
        s.launch(
            "combine_grad_rows",
            launch::combine_grad_rows(&op.params),
            &[b(dyb), b(rb), b(wb), b(d_yp), param(&op.params)],
        );
        s.launch(
            "combine_grad_weights",
            launch::combine_grad_weights(&op.params),
            &[b(dyb), b(ypb), b(rb), b(d_w), param(&op.params)],
        );
        let got = s.run(exe, "combine_grad");
        let want = cpu.combine_grad(&dyt, &ypt, &route_rows, &plan.weights, tokens.clone()).expect("cpu");
        close_f32(&format!("{case}: d_yp"), &host(&cpu, &want.d_yp), got.f32s(d_yp), 1e-5);
        close_f32(&format!("{case}: d_weights"), &host(&cpu, &want.d_weights), got.f32s(d_w), 1e-5);
    }
}

/// A forward route and plan whose backward is under test.
struct RouteGradCase {
    name: &'static str,
    s: usize,
    e: usize,
    k: usize,
    score: ScoreFn,
    choice: Choice,
    bias: bool,
    normalize: Normalize,
    scale: f32,
    capacity: CapacityRule,
    renorm: bool,
    aux: bool,
    z_coef: f32,
    /// Logits are uniform in [-spread, spread) (plus 1 on the first two experts).
    spread: f32,
}

#[test]
fn route_grad_kernel_matches_the_cpu_backend_under_emulation() {
    let Some(exe) = emulate::driver() else { return };
    let cpu = cpu();
    let base = RouteGradCase {
        name: "softmax_top2_deepspeed_renorm_aux_z",
        s: 48,
        e: 8,
        k: 2,
        score: ScoreFn::Softmax,
        choice: Choice::TopK,
        bias: false,
        normalize: Normalize::None,
        scale: 1.0,
        capacity: CapacityRule::DeepSpeed { factor: 1.0, k_prime: 2, min_capacity: 4 },
        renorm: true,
        aux: true,
        z_coef: 0.01,
        spread: 3.0,
    };
    let group_top2 = Choice::GroupLimited { n_group: 8, topk_group: 3, group_score: GroupScore::SumTop2 };
    // 4 groups of 2, one kept: the third route of every token lands on a masked expert,
    // weight 0.
    let group_max = Choice::GroupLimited { n_group: 4, topk_group: 1, group_score: GroupScore::Max };
    let cases = [
        RouteGradCase { ..base },
        RouteGradCase {
            name: "softmax_top3_sum_fixed_capacity",
            s: 37,
            e: 40,
            k: 3,
            normalize: Normalize::Sum,
            capacity: CapacityRule::Fixed(2),
            renorm: false,
            aux: false,
            z_coef: 0.0,
            ..base
        },
        RouteGradCase {
            name: "sigmoid_group_top2_sum_eps_scaled",
            s: 21,
            e: 64,
            k: 4,
            score: ScoreFn::Sigmoid,
            choice: group_top2,
            bias: true,
            normalize: Normalize::SumPlus(1e-20),
            scale: 2.5,
            capacity: CapacityRule::Fixed(1),
            aux: false,
            z_coef: 0.02,
            ..base
        },
        RouteGradCase {
            name: "softmax_group_max_masked_routes",
            s: 19,
            e: 8,
            k: 3,
            choice: group_max,
            normalize: Normalize::Sum,
            capacity: CapacityRule::DeepSpeed { factor: 1.0, k_prime: 3, min_capacity: 1 },
            ..base
        },
        RouteGradCase {
            name: "softmax_top6_300_experts_sum_eps",
            s: 10,
            e: 300,
            k: 6,
            normalize: Normalize::SumPlus(1e-3),
            scale: 0.75,
            capacity: CapacityRule::Unlimited,
            renorm: false,
            z_coef: 0.05,
            ..base
        },
        RouteGradCase {
            name: "sigmoid_top1_renorm",
            s: 33,
            e: 16,
            k: 1,
            score: ScoreFn::Sigmoid,
            capacity: CapacityRule::DeepSpeed { factor: 1.0, k_prime: 1, min_capacity: 1 },
            aux: false,
            z_coef: 0.0,
            ..base
        },
        RouteGradCase {
            name: "sqrt_softplus_bias_wide_renorm",
            s: 37,
            e: 40,
            k: 4,
            score: ScoreFn::SqrtSoftplus,
            bias: true,
            normalize: Normalize::SumPlus(1e-20),
            scale: 1.5,
            capacity: CapacityRule::DeepSpeed { factor: 1.0, k_prime: 4, min_capacity: 1 },
            aux: false,
            spread: 30.0,
            ..base
        },
        RouteGradCase {
            name: "softmax_bias_floor_binding",
            s: 37,
            e: 8,
            k: 2,
            bias: true,
            normalize: Normalize::SumFloor(0.6),
            capacity: CapacityRule::Unlimited,
            renorm: false,
            ..base
        },
        RouteGradCase {
            name: "p_norm_1_5_fixed_capacity",
            s: 29,
            e: 16,
            k: 4,
            normalize: Normalize::PNorm(1.5),
            capacity: CapacityRule::Fixed(3),
            renorm: false,
            ..base
        },
        RouteGradCase {
            name: "p_norm_0_5_300",
            s: 10,
            e: 300,
            k: 6,
            normalize: Normalize::PNorm(0.5),
            capacity: CapacityRule::Unlimited,
            renorm: false,
            ..base
        },
        RouteGradCase {
            name: "sparsemixer_0_01_renorm_aux_z",
            s: 48,
            e: 16,
            k: 2,
            choice: Choice::SparseMixer { jitter_eps: 0.01 },
            ..base
        },
        RouteGradCase {
            name: "sparsemixer_0_5_70",
            s: 19,
            e: 70,
            k: 2,
            choice: Choice::SparseMixer { jitter_eps: 0.5 },
            scale: 0.5,
            capacity: CapacityRule::Unlimited,
            renorm: false,
            ..base
        },
    ];
    for (i, c) in cases.iter().enumerate() {
        let st = 1300 + 10 * i as u32;
        let logits: Vec<f32> = rand(c.s * c.e, st)
            .into_iter()
            .enumerate()
            .map(|(j, v)| c.spread * v + if j % c.e < 2 { 1.0 } else { 0.0 })
            .collect();
        let lt = up(&cpu, &[c.s, c.e], logits.clone());
        let bt = up(&cpu, &[c.e], rand(c.e, st + 1).into_iter().map(|v| 0.1 * v).collect());
        let spec = RouteSpec {
            k: c.k,
            score: c.score,
            choice: c.choice,
            bias: c.bias.then_some(&bt),
            choice_noise: None,
            normalize: c.normalize,
            scale: c.scale,
        };
        let routes = cpu.route(&lt, &spec).expect("cpu route");
        let plan_spec = PlanSpec {
            num_experts: c.e,
            capacity: c.capacity,
            keep: KeepPolicy::TokenOrder,
            used_token: None,
            group_size: None,
            renormalize_kept: c.renorm,
        };
        let plan = cpu.plan(&routes, &plan_spec).expect("cpu plan");
        let dw = rand(c.s * c.k, st + 2);
        let dwt = up(&cpu, &[c.s, c.k], dw.clone());
        let grad_spec = RouteGradSpec {
            score: c.score,
            choice: c.choice,
            normalize: c.normalize,
            scale: c.scale,
            renormalize_kept: c.renorm,
        };
        let aux = || c.aux.then(|| AuxGrad { counts: &plan.counts, scale: 0.37 / (c.s * c.s) as f32 });
        let want = cpu.route_grad(&dwt, &routes, &plan, &lt, grad_spec, aux(), c.z_coef).expect("cpu route_grad");
        let op = RouteGradOp::check(&cpu, &dwt, &routes, &plan, &lt, grad_spec, aux(), c.z_coef).expect("checked");

        let ints = |t: &Cpu| host(&cpu, t).into_i32("i32").expect("i32");
        let floats = |t: &Cpu| host(&cpu, t).into_f32("f32").expect("f32");
        let (rows, rw) = (ints(&plan.rows), floats(&routes.weights));
        let mut s = Script::default();
        let bufs = [
            s.f32s(&dw),
            s.i32s(&ints(&routes.experts)),
            s.f32s(&rw),
            s.f32s(&floats(&routes.scores)),
            s.i32s(&rows),
            s.f32s(&logits),
        ];
        let counts = if c.aux { Arg::Buf(s.i32s(&ints(&plan.counts))) } else { Arg::Null };
        let out = poisoned(&mut s, c.s * c.e);
        let mut args = Vec::from(bufs.map(Arg::Buf));
        args.extend([counts, Arg::Buf(out), param(&op.params)]);
        s.launch("route_grad", launch::route_grad(c.s), &args);
        let got = s.run(exe, c.name);
        close_f32(&format!("{}: d_logits", c.name), &host(&cpu, &want), got.f32s(out), 1e-5);
        if !matches!(c.capacity, CapacityRule::Unlimited) {
            assert!(rows.contains(&-1), "{}: some routes dropped", c.name);
        }
        if c.choice == group_max {
            assert!(rw.contains(&0.0), "{}: some routes masked", c.name);
        }
    }
}

#[test]
fn mix_and_gated_add_grad_kernels_match_the_cpu_backend_under_emulation() {
    let Some(exe) = emulate::driver() else { return };
    let cpu = cpu();
    // 300 columns: more than a block's 256 threads; 5: fewer.
    for (r, m) in [(13usize, 300usize), (6, 5)] {
        let st = 1400 + m as u32;
        let (dy, moe, mlp) = (rand(r * m, st), rand(r * m, st + 1), rand(r * m, st + 2));
        let coef: Vec<f32> = rand(2 * r, st + 3).into_iter().map(|v| 2.0 * v).collect();
        let gate: Vec<f32> = rand(r, st + 4).into_iter().map(|v| 3.0 * v).collect();
        let t = |shape: &[usize], v: &Vec<f32>| up(&cpu, shape, v.clone());
        let (dyt, moet, mlpt, coeft, gatet) =
            (t(&[r, m], &dy), t(&[r, m], &moe), t(&[r, m], &mlp), t(&[r, 2], &coef), t(&[r, 1], &gate));
        let mix = MixGradOp::check(&cpu, &dyt, &moet, &mlpt, &coeft).expect("checked").params;
        let add = GatedAddGradOp::check(&cpu, &dyt, &mlpt, &gatet).expect("checked").params;
        let mut s = Script::default();
        let (dyb, moeb, mlpb, coefb, gateb) = (s.f32s(&dy), s.f32s(&moe), s.f32s(&mlp), s.f32s(&coef), s.f32s(&gate));
        let (d_moe, d_mlp, d_coef) = (poisoned(&mut s, r * m), poisoned(&mut s, r * m), poisoned(&mut s, 2 * r));
        let (d_shared, d_gate) = (poisoned(&mut s, r * m), poisoned(&mut s, r));
        let b = Arg::Buf;
        let mix_args = [b(dyb), b(moeb), b(mlpb), b(coefb), b(d_moe), b(d_mlp), b(d_coef), param(&mix)];
        s.launch("mix_grad", launch::grad_rows(r), &mix_args);
        let add_args = [b(dyb), b(mlpb), b(gateb), b(d_shared), b(d_gate), param(&add)];
        s.launch("gated_add_grad", launch::grad_rows(r), &add_args);
        let got = s.run(exe, "mix_gated_add_grad");
        let want = cpu.mix_grad(&dyt, &moet, &mlpt, &coeft).expect("cpu mix_grad");
        let name = |what: &str| format!("[{r}, {m}]: {what}");
        close_f32(&name("d_moe"), &host(&cpu, &want.d_moe), got.f32s(d_moe), 1e-5);
        close_f32(&name("d_mlp"), &host(&cpu, &want.d_mlp), got.f32s(d_mlp), 1e-5);
        close_f32(&name("d_coef"), &host(&cpu, &want.d_coef), got.f32s(d_coef), 1e-5);
        let want = cpu.gated_add_grad(&dyt, &mlpt, &gatet).expect("cpu gated_add_grad");
        close_f32(&name("d_shared"), &host(&cpu, &want.d_shared), got.f32s(d_shared), 1e-5);
        close_f32(&name("d_gate"), &host(&cpu, &want.d_gate), got.f32s(d_gate), 1e-5);
    }
}

#[test]
fn optimizer_kernels_match_the_cpu_backend_under_emulation() {
    let Some(exe) = emulate::driver() else { return };
    let cpu = cpu();
    let base = StepRule {
        kind: StepKind::Sgd,
        lr: 0.01,
        weight_decay: 0.0,
        momentum: 0.0,
        dampening: 0.0,
        nesterov: false,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        step: 1,
        grad_scale: 1.0,
    };
    let rules = [
        ("sgd_weight_decay", StepRule { weight_decay: 0.01, step: 4, ..base }),
        ("sgd_momentum_first_step", StepRule { momentum: 0.9, weight_decay: 1e-4, ..base }),
        ("sgd_momentum_dampening", StepRule { momentum: 0.9, dampening: 0.1, weight_decay: 1e-4, step: 5, ..base }),
        ("sgd_nesterov_scaled", StepRule { momentum: 0.8, nesterov: true, step: 3, grad_scale: 0.5, ..base }),
        ("adam_l2_scaled", StepRule { kind: StepKind::Adam, weight_decay: 0.01, step: 7, grad_scale: 0.25, ..base }),
        ("adam_first_step", StepRule { kind: StepKind::Adam, ..base }),
        // β₁ = 0.3: lerp weight 0.7, torch's second lerp branch.
        ("adam_lerp_upper_branch", StepRule { kind: StepKind::Adam, beta1: 0.3, step: 2, ..base }),
        ("adamw", StepRule { kind: StepKind::AdamW, weight_decay: 0.1, step: 3, ..base }),
    ];
    let shape = [37usize, 21];
    let n = shape[0] * shape[1];
    let (p, g) = (rand(n, 1500), rand(n, 1501));
    let m = rand(n, 1502).into_iter().map(|v| 0.1 * v).collect::<Vec<_>>();
    let v = rand(n, 1503).into_iter().map(|x| 1e-3 * x * x).collect::<Vec<_>>();
    let (pt, gt, mt, vt) = (
        up(&cpu, &shape, p.clone()),
        up(&cpu, &shape, g.clone()),
        up(&cpu, &shape, m.clone()),
        up(&cpu, &shape, v.clone()),
    );
    for (name, rule) in rules {
        let sgd_first = rule.kind == StepKind::Sgd && rule.step == 1;
        let m_in = (rule.has_m() && !sgd_first).then_some(&mt);
        let v_in = rule.has_v().then_some(&vt);
        let op = OptimStepOp::check(&cpu, &pt, &gt, m_in, v_in, rule).expect("checked");
        let mut s = Script::default();
        let (pb, gb, mb, vb) = (s.f32s(&p), s.f32s(&g), s.f32s(&m), s.f32s(&v));
        let p_out = poisoned(&mut s, n);
        let m_out = rule.has_m().then(|| poisoned(&mut s, n));
        let v_out = rule.has_v().then(|| poisoned(&mut s, n));
        let opt = |b: Option<usize>| b.map_or(Arg::Null, Arg::Buf);
        let args = [
            Arg::Buf(pb),
            Arg::Buf(gb),
            opt(m_in.map(|_| mb)),
            opt(v_in.map(|_| vb)),
            Arg::Buf(p_out),
            opt(m_out),
            opt(v_out),
            param(&op.params),
        ];
        s.launch("optim_step", launch::optim_step(n), &args);
        let got = s.run(exe, name);
        let want = cpu.optim_step(&pt, &gt, m_in, v_in, rule).expect("cpu step");
        // The kernel keeps the cpu's (torch's) order of f32 operations: the same bits.
        same_bits(&format!("{name}: param"), &host(&cpu, &want.param), got.f32s(p_out));
        if let (Some(w), Some(b)) = (&want.m, m_out) {
            same_bits(&format!("{name}: m"), &host(&cpu, w), got.f32s(b));
        }
        if let (Some(w), Some(b)) = (&want.v, v_out) {
            same_bits(&format!("{name}: v"), &host(&cpu, w), got.f32s(b));
        }
        assert_eq!((want.m.is_some(), want.v.is_some()), (m_out.is_some(), v_out.is_some()), "{name}: state kept");
    }
}

#[test]
fn sum_squares_kernels_match_the_cpu_backend_under_emulation() {
    let Some(exe) = emulate::driver() else { return };
    let cpu = cpu();
    assert!(launch::sum_squares_partial(100_003).grid[0] > 1, "the large case spans several blocks");
    for n in [0usize, 1, 777, 100_003] {
        let x: Vec<f32> = rand(n, 1600 + n as u32).into_iter().map(|v| 4.0 * v).collect();
        let xt = up(&cpu, &[n], x.clone());
        let op = SumSquaresOp::<CpuBackend>::check(&xt).expect("checked");
        let mut s = Script::default();
        let xb = s.f32s(&x);
        let (partials, out) = (poisoned(&mut s, launch::SUM_SQUARES_PARTIALS), poisoned(&mut s, 1));
        s.launch(
            "sum_squares_partial",
            launch::sum_squares_partial(n),
            &[Arg::Buf(xb), Arg::Buf(partials), param(&op.params)],
        );
        s.launch(
            "sum_squares_final",
            launch::sum_squares_final(),
            &[Arg::Buf(partials), Arg::Buf(out), param(&op.params)],
        );
        let got = s.run(exe, "sum_squares");
        let want = cpu.sum_squares(&xt).expect("cpu sum_squares");
        close_f32(&format!("sum_squares of {n}"), &host(&cpu, &want), got.f32s(out), 1e-5);
    }
}

/// `pass_rows` (kernels/permute.cu: identity experts' rows from x, the rest from y) and
/// `sum_rows` (grad_matmul.cu `bias_grad` over one dense group: the bias gradient of
/// `add_bias`), against the cpu. Both outputs start poisoned: every element is written.
#[test]
fn pass_rows_and_sum_rows_kernels_match_the_cpu_backend_under_emulation() {
    let Some(exe) = emulate::driver() else { return };
    let cpu = cpu();
    let (counts, m) = ([5usize, 0, 64, 7, 0, 3], 9usize);
    let rows = counts.iter().sum::<usize>() + 4;
    let off = offsets_of(&counts);
    let ot = Offsets::from_host(&cpu, &off).expect("offsets");
    let (y, x) = (rand(rows * m, 1300), rand(rows * m, 1301));
    let (yt, xt) = (up(&cpu, &[rows, m], y.clone()), up(&cpu, &[rows, m], x.clone()));
    let mut s = Script::default();
    let (yb, xb, ob) = (s.f32s(&y), s.f32s(&x), s.i32s(&off));
    let b = Arg::Buf;
    let mut outs = Vec::new();
    for from in [0, 3, 4, 6] {
        let op = PassRowsOp::check(&cpu, &yt, &xt, &ot, from).expect("checked");
        let out = poisoned(&mut s, rows * m);
        s.launch("pass_rows", launch::per_element(rows * m), &[b(xb), b(ob), b(yb), b(out), param(&op.params)]);
        outs.push((from, out));
    }
    let mut sums = Vec::new();
    for (r, c) in [(1usize, 5usize), (rows, m), (300, 70)] {
        let v = rand(r * c, 1302 + r as u32);
        let vt = up(&cpu, &[r, c], v.clone());
        let op = SumRowsOp::check(&cpu, &vt).expect("checked");
        let (vb, out) = (s.f32s(&v), poisoned(&mut s, c));
        s.launch("bias_grad", launch::bias_grad(&op.params), &[b(vb), Arg::Null, Arg::Null, b(out), param(&op.params)]);
        sums.push((vt, out));
    }
    let got = s.run(exe, "pass_rows_sum_rows");
    for (from, out) in outs {
        let want = cpu.pass_rows(&yt, &xt, &ot, from).expect("cpu pass_rows");
        close_f32(&format!("pass_rows from group {from}"), &host(&cpu, &want), got.f32s(out), 0.0);
    }
    for (vt, out) in sums {
        // Rows in row order, as the cpu: the same bits.
        same_bits(&format!("sum_rows {:?}", vt.shape()), &host(&cpu, &cpu.sum_rows(&vt).expect("cpu")), got.f32s(out));
    }
}

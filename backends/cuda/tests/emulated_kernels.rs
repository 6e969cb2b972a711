//! The CUDA kernels run on the host under kernels/emulate.h (threads for lanes, barriers
//! for `__syncthreads`/`__syncwarp`, shuffles and `mma.sync` exchanged through the warp),
//! launched as the cuda backend launches them, and are compared with the cpu backend:
//! routing (every choice rule, ties, >256 experts, non-finite inputs), the dispatch plan
//! (capacity rules, keep policies, masks, groups), permute/combine, the expert-parallel
//! bucketing, regrouping and ranged combine, Philox noise, router
//! statistics, and the grouped products (tiles that span group ends, empty groups, K and N
//! off the tile size, GLU experts, f32/f16/bf16 weights, the tensor-core kernels).
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
    BlockTable, BucketOp, CapacityRule, Choice, CombineOp, DevicePlacement, ElementwiseKind, ElementwiseOp, GroupScore,
    GroupedLinearOp, GroupedMlpOp, KeepPolicy, MlpWeights, NoiseOp, Normalize, Offsets, PlanOp, PlanSpec, RegroupOp,
    RouteOp, RouteSpec, RouterStatsOp, ScoreFn,
};
use moe_engine::philox::NoiseKind;
use moe_engine::{parity, philox, Activation, Backend, DType, Device, ExpertKind, HostTensor, Tensor};

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
            dtype: DType::BF16,
            tensor_cores: false,
            bias: false,
        },
    ];
    let cpu = cpu();
    for (i, c) in cases.iter().enumerate() {
        let (r, g) = (c.counts.iter().sum::<usize>(), c.counts.len());
        let s = 10 * i as u32;
        let (x, w, bias) = (rand(r * c.k, s), rand(g * c.n * c.k, s + 1), rand(g * c.n, s + 2));
        // The reference: the cpu backend on the values the kernel multiplies (weights in
        // their storage type; on tensor cores, activations rounded to it as well).
        let xr = if c.tensor_cores { round(&x, c.dtype) } else { x.clone() };
        let xt = up(&cpu, &[r, c.k], xr);
        let ot = Offsets::from_host(&cpu, &offsets_of(c.counts)).expect("offsets");
        let wt = cpu.upload_weight(&HostTensor::f32(&[g, c.n, c.k], round(&w, c.dtype)).expect("w"), DType::F32);
        let wt = wt.expect("weights");
        let bt = c.bias.then(|| up(&cpu, &[g, c.n], bias.clone()));
        // The parameter block the backend launches with, from the op's front door. The
        // front door checks on the cpu's f32 tensors; the weights' storage code is the
        // case's, as the cuda backend's tensors would carry it.
        let f = c.n / 2;
        let w_out = up(&cpu, &[g, c.k, f.max(1)], vec![0.0; g * c.k * f.max(1)]);
        let mlp = MlpWeights {
            kind: ExpertKind::Glu { activation: c.glu.unwrap_or(Activation::Silu) },
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
            Some(a) => (cpu.glu(&full, a).expect("cpu glu"), Some(full)),
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
    ];
    for (i, c) in cases.iter().enumerate() {
        let st = 100 + 10 * i as u32;
        let mut logits: Vec<f32> = rand(c.s * c.e, st).into_iter().map(|v| 3.0 * v).collect();
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
    ops.push(("mul".into(), ElementwiseKind::Mul, &at, Some(&bt), None));
    ops.push(("scale".into(), ElementwiseKind::Scale(-0.75), &at, None, None));
    ops.push(("add".into(), ElementwiseKind::AddGated, &at, Some(&bt), None));
    ops.push(("add_gated".into(), ElementwiseKind::AddGated, &at, Some(&bt), Some(&gt)));
    ops.push(("residual_mix".into(), ElementwiseKind::ResidualMix, &at, Some(&bt), Some(&ct)));

    let mut s = Script::default();
    let (ab, b2b, bb, gb, cb) = (s.f32s(&a), s.f32s(&b2), s.f32s(&b), s.f32s(&gate), s.f32s(&coef));
    let dev = |t: &Cpu| -> usize {
        [(&at, ab), (&b2t, b2b), (&bt, bb), (&gt, gb), (&ct, cb)]
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

//! The CUDA kernels run on the host under kernels/emulate.h (threads for lanes, barriers
//! for `__syncthreads`/`__syncwarp`, shuffles and `mma.sync` exchanged through the warp),
//! launched as the cuda backend launches them, and are compared with the cpu backend:
//! routing (every choice rule, ties, >256 experts, non-finite logits), the dispatch plan
//! (capacity rules, keep policies, masks, groups), permute/combine, Philox noise, router
//! statistics, and the grouped products (tiles that span group ends, empty groups, K and N
//! off the tile size, GLU experts, f32/f16/bf16 weights, the tensor-core kernels). This
//! checks what the kernels compute without a GPU; speed, and the PTX itself, are checked
//! on a GPU and by NVRTC.
//!
//! Needs g++ with C++20 (`<barrier>`); without it the test says so and returns, and with
//! `CI=true` a missing compiler is a failure.

mod emulate;

use emulate::{f32v, grid_1d, u32v, u64v, words, Arg, Script};
use moe_cpu::CpuBackend;
use moe_engine::backend::{
    Activation, CapacityRule, Choice, GroupScore, KeepPolicy, Normalize, PlanSpec, RouteSpec, ScoreFn,
};
use moe_engine::philox::NoiseKind;
use moe_engine::{parity, philox, Backend, DType, HostTensor, Tensor};
use std::path::Path;

type Cpu = Tensor<CpuBackend>;

struct Case {
    name: &'static str,
    counts: &'static [usize],
    k: usize,
    /// Output columns of the product (2·F for GLU experts).
    n: usize,
    glu: Option<Activation>,
    dtype: DType,
    tensor_cores: bool,
    bias: bool,
}

fn rand(n: usize, stream: u32) -> Vec<f32> {
    philox::words(0xe4a1, stream, n).into_iter().map(|w| philox::to_open_unit(w) * 2.0 - 1.0).collect()
}

fn round(v: &[f32], dtype: DType) -> Vec<f32> {
    v.iter()
        .map(|&x| match dtype {
            DType::F16 => half::f16::from_f32(x).to_f32(),
            DType::BF16 => half::bf16::from_f32(x).to_f32(),
            _ => x,
        })
        .collect()
}

fn bits(v: &[f32], dtype: DType) -> Vec<u16> {
    v.iter()
        .map(
            |&x| if dtype == DType::F16 { half::f16::from_f32(x).to_bits() } else { half::bf16::from_f32(x).to_bits() },
        )
        .collect()
}

/// Runs `case` as the backend launches it (`grouped_impl`): (out, pre).
fn emulate(exe: &Path, c: &Case, x: &[f32], w: &[f32], bias: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (r, g) = (c.counts.iter().sum::<usize>(), c.counts.len());
    let f = if c.glu.is_some() { c.n / 2 } else { c.n };
    let mut s = Script::default();
    let mut offsets = vec![0i32];
    for &n in c.counts {
        offsets.push(offsets[offsets.len() - 1] + n as i32);
    }
    let max_tiles = r.div_ceil(64) + g;
    let (off, tiles) = (s.i32s(&offsets), s.zeros(1 + 3 * max_tiles));
    s.launch("tile_map", grid_1d(1, 1), &[Arg::Buf(off), Arg::Buf(tiles), u32v(g as u32)]);
    let xb = s.f32s(x);
    let wb = if c.dtype == DType::F32 { s.f32s(w) } else { s.u16s(&bits(w, c.dtype)) };
    let bb = if c.bias { Arg::Buf(s.f32s(bias)) } else { Arg::Null };
    let (out, pre) = (s.zeros(r * f), s.zeros(if c.glu.is_some() { r * c.n } else { 0 }));
    let y = max_tiles.clamp(1, 65535);
    let grid = [f.div_ceil(64).max(1) as u32, y as u32, max_tiles.div_ceil(y).max(1) as u32];
    let mut args = vec![Arg::Buf(xb), Arg::Buf(wb), bb, Arg::Buf(tiles), Arg::Buf(out)];
    args.push(if c.glu.is_some() { Arg::Buf(pre) } else { Arg::Null });
    args.extend([u32v(c.n as u32), u32v(c.k as u32)]);
    let name = match (c.tensor_cores, c.dtype) {
        (false, d) => {
            args.push(u32v(match d {
                DType::F32 => 0,
                DType::F16 => 1,
                _ => 2,
            }));
            "grouped"
        }
        (true, DType::F16) => "grouped_tc_f16",
        (true, _) => "grouped_tc_bf16",
    };
    args.extend([u32v(c.glu.is_some() as u32), u32v(c.glu.map_or(0, |a| a.kernel_code()))]);
    let block = if c.tensor_cores { 128 } else { 256 };
    s.launch(name, (grid, [block, 1, 1]), &args);
    let b = s.run(exe, c.name);
    (b.f32s(out), b.f32s(pre))
}

#[test]
fn matrix_kernels_match_the_cpu_backend_under_emulation() {
    let Some(exe) = emulate::driver() else { return };
    let cases = [
        Case {
            name: "tc_bf16_plain",
            counts: &[70, 0, 5, 130],
            k: 40,
            n: 72,
            glu: None,
            dtype: DType::BF16,
            tensor_cores: true,
            bias: true,
        },
        Case {
            name: "tc_f16_swiglu",
            counts: &[1, 64, 65],
            k: 64,
            n: 80,
            glu: Some(Activation::Silu),
            dtype: DType::F16,
            tensor_cores: true,
            bias: false,
        },
        Case {
            name: "tc_bf16_geglu_two_column_blocks",
            counts: &[150],
            k: 96,
            n: 192,
            glu: Some(Activation::Gelu),
            dtype: DType::BF16,
            tensor_cores: true,
            bias: true,
        },
        Case {
            name: "simt_f32_swiglu",
            counts: &[3, 70, 0],
            k: 24,
            n: 40,
            glu: Some(Activation::Silu),
            dtype: DType::F32,
            tensor_cores: false,
            bias: true,
        },
        Case {
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
    let cpu = CpuBackend::new(Some(1)).expect("cpu backend");
    for (i, c) in cases.iter().enumerate() {
        let (r, g) = (c.counts.iter().sum::<usize>(), c.counts.len());
        let s = 10 * i as u32;
        let (x, w, bias) = (rand(r * c.k, s), rand(g * c.n * c.k, s + 1), rand(g * c.n, s + 2));
        let (out, pre) = emulate(exe, c, &x, &w, &bias);

        // The reference: the cpu backend on the values the kernel multiplies (weights in
        // their storage type; on tensor cores, activations rounded to it as well).
        let xr = if c.tensor_cores { round(&x, c.dtype) } else { x.clone() };
        let mut offsets = vec![0i32];
        for &n in c.counts {
            offsets.push(offsets.last().copied().unwrap_or(0) + n as i32);
        }
        let up = |t: HostTensor| cpu.upload(&t).expect("upload");
        let xt = up(HostTensor::f32(&[r, c.k], xr).expect("x"));
        let ot = up(HostTensor::i32(&[g + 1], offsets).expect("offsets"));
        let wt = up(HostTensor::f32(&[g, c.n, c.k], round(&w, c.dtype)).expect("w"));
        let bt = c.bias.then(|| up(HostTensor::f32(&[g, c.n], bias.clone()).expect("bias")));
        let full = cpu.grouped_linear(&xt, &ot, &wt, bt.as_ref()).expect("cpu product");
        let (out_ref, pre_ref) = match c.glu {
            Some(a) => (cpu.glu(&full, a).expect("cpu glu"), Some(full)),
            None => (full, None),
        };
        let f = if c.glu.is_some() { c.n / 2 } else { c.n };
        let got = HostTensor::f32(&[r, f], out).expect("out");
        let want = cpu.download(&out_ref).expect("download");
        if let Err(msg) = parity::compare("out", &want, &got, 1e-5) {
            panic!("{}: {msg}", c.name);
        }
        if let Some(p) = pre_ref {
            let got = HostTensor::f32(&[r, c.n], pre).expect("pre");
            if let Err(msg) = parity::compare("pre", &cpu.download(&p).expect("download"), &got, 1e-5) {
                panic!("{}: {msg}", c.name);
            }
        }
    }
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
    let got = HostTensor::f32(&want.shape, got[..want.numel()].to_vec()).expect("shape");
    if let Err(msg) = parity::compare(what, want, &got, tol) {
        panic!("{msg}");
    }
}

/// A route spec with its inputs, for the cpu side and the kernel's parameters.
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
    let cases = [
        RouteCase {
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
        },
        RouteCase {
            name: "softmax_top6_ties",
            s: 19,
            e: 40,
            k: 6,
            score: ScoreFn::Softmax,
            choice: Choice::TopK,
            bias: false,
            noise: false,
            normalize: Normalize::None,
            scale: 1.0,
            coarse: true,
        },
        RouteCase {
            name: "sigmoid_group_max_bias",
            s: 21,
            e: 64,
            k: 4,
            score: ScoreFn::Sigmoid,
            choice: group_max,
            bias: true,
            noise: false,
            normalize: Normalize::SumPlus(1e-20),
            scale: 2.5,
            coarse: false,
        },
        RouteCase {
            name: "sigmoid_group_top2_256",
            s: 9,
            e: 256,
            k: 8,
            score: ScoreFn::Sigmoid,
            choice: group_top2,
            bias: true,
            noise: false,
            normalize: Normalize::SumPlus(1e-20),
            scale: 2.5,
            coarse: true,
        },
        RouteCase {
            name: "deepspeed_top2_gumbel",
            s: 33,
            e: 16,
            k: 2,
            score: ScoreFn::Softmax,
            choice: Choice::DeepSpeedTop2,
            bias: false,
            noise: true,
            normalize: Normalize::None,
            scale: 1.0,
            coarse: false,
        },
        RouteCase {
            name: "noisy_topk_300",
            s: 10,
            e: 300,
            k: 3,
            score: ScoreFn::Softmax,
            choice: Choice::TopK,
            bias: false,
            noise: true,
            normalize: Normalize::Sum,
            scale: 1.0,
            coarse: false,
        },
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

        // As backend.rs `route`.
        let (choice, n_group, topk_group, group_score) = match c.choice {
            Choice::TopK => (0, 0, 0, 0),
            Choice::DeepSpeedTop2 => (1, 0, 0, 0),
            Choice::GroupLimited { n_group, topk_group, group_score } => {
                (2, n_group as u32, topk_group as u32, (group_score != GroupScore::Max) as u32)
            }
        };
        let (normalize, eps) = match c.normalize {
            Normalize::None => (0, 0.0f32),
            Normalize::Sum => (1, 0.0),
            Normalize::SumPlus(eps) => (2, eps),
        };
        let params = [
            c.s as u32,
            c.e as u32,
            c.k as u32,
            (c.score != ScoreFn::Softmax) as u32,
            choice,
            c.bias as u32,
            c.noise as u32,
            normalize,
            eps.to_bits(),
            c.scale.to_bits(),
            n_group,
            topk_group,
            group_score,
        ];
        let mut s = Script::default();
        let (l, dummy) = (s.f32s(&logits), s.zeros(4));
        let b = if c.bias { s.f32s(&bias) } else { dummy };
        let n = if c.noise { s.f32s(&noise) } else { dummy };
        let (scores, experts, weights) = (s.zeros(c.s * c.e), s.zeros(c.s * c.k), s.zeros(c.s * c.k));
        let status = s.u32s(&[u32::MAX]);
        let args = [l, b, n, scores, experts, weights, status].map(Arg::Buf);
        let mut args = Vec::from(args);
        args.push(words(&params));
        s.launch("route", ([c.s.div_ceil(8) as u32, 1, 1], [256, 1, 1]), &args);
        let got = s.run(exe, c.name);
        same_i32(&format!("{}: experts", c.name), &host(&cpu, &want.experts), got.i32s(experts));
        close_f32(&format!("{}: weights", c.name), &host(&cpu, &want.weights), got.f32s(weights), 2e-6);
        close_f32(&format!("{}: scores", c.name), &host(&cpu, &want.scores), got.f32s(scores), 2e-6);
        assert_eq!(got.i32s(status)[0] as u32, u32::MAX, "{}: finite logits flagged", c.name);
    }
}

#[test]
fn route_kernel_flags_the_first_non_finite_logit() {
    let Some(exe) = emulate::driver() else { return };
    let (s_, e) = (5usize, 40usize);
    let mut logits = rand(s_ * e, 7);
    logits[3 * e + 33] = f32::NAN;
    logits[3 * e + 35] = f32::INFINITY;
    logits[4 * e + 1] = f32::NEG_INFINITY;
    let params = [s_ as u32, e as u32, 2, 0, 0, 0, 0, 1, 0, 1f32.to_bits(), 0, 0, 0];
    let mut s = Script::default();
    let (l, dummy) = (s.f32s(&logits), s.zeros(4));
    let (scores, experts, weights) = (s.zeros(s_ * e), s.zeros(s_ * 2), s.zeros(s_ * 2));
    let status = s.u32s(&[u32::MAX]);
    let mut args = Vec::from([l, dummy, dummy, scores, experts, weights, status].map(Arg::Buf));
    args.push(words(&params));
    s.launch("route", ([1, 1, 1], [256, 1, 1]), &args);
    let got = s.run(exe, "route_non_finite");
    assert_eq!(got.i32s(status)[0] as usize, 3 * e + 33, "the lowest flat index of a non-finite logit");
}

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
    let cases = [
        PlanCase { name: "deepspeed_token_order", capacity: ds, keep: 0, used: false, groups: 1, renormalize: false },
        PlanCase {
            name: "fixed_rank_major_renorm",
            capacity: CapacityRule::Fixed(7),
            keep: 1,
            used: false,
            groups: 1,
            renormalize: true,
        },
        PlanCase { name: "deepspeed_priority_used", capacity: ds, keep: 2, used: true, groups: 1, renormalize: false },
        PlanCase {
            name: "dropless_clamped_two_groups",
            capacity: CapacityRule::Dropless { clamp_to_tokens: true },
            keep: 0,
            used: true,
            groups: 2,
            renormalize: false,
        },
        PlanCase {
            name: "unlimited",
            capacity: CapacityRule::Unlimited,
            keep: 0,
            used: false,
            groups: 1,
            renormalize: false,
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
        let priority = rand(s_ * e, st + 1);
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
        let xp = cpu.permute(&xt, &want).expect("cpu permute");
        let yp_host = host(&cpu, &xp);
        let yp: Vec<f32> = yp_host.as_f32("yp").expect("f32").iter().map(|v| v * 0.5 + 0.25).collect();
        let ypt = up(&cpu, &yp_host.shape, yp.clone());
        let y = cpu.combine(&ypt, &want).expect("cpu combine");

        // As backend.rs `plan`, `permute` and `combine`.
        let w = plan_spec.kernel_params(s_, k, &[s_, k]).expect("params");
        let (n_groups, keep) = (w[4] as usize, w[8]);
        let (sk, ge) = (s_ * k, n_groups * e);
        let ex = host(&cpu, &routes.experts).as_i32("experts").expect("i32").to_vec();
        let rw = host(&cpu, &routes.weights).as_f32("weights").expect("f32").to_vec();
        let mut s = Script::default();
        let (exb, rwb, dummy) = (s.i32s(&ex), s.f32s(&rw), s.zeros(4));
        let usedb = if c.used { s.f32s(&used) } else { dummy };
        let prib = if keep == 2 { s.f32s(&priority) } else { dummy };
        let (scratch, info, sr, pw) = (s.zeros(4 * ge + sk + 2 * s_), s.zeros(4 * e + 6), s.zeros(2 * sk), s.zeros(sk));
        let b = Arg::Buf;
        let one = grid_1d(1, 1);
        s.launch("plan_count", grid_1d(ge, 64), &[b(exb), b(usedb), b(scratch), words(&w)]);
        s.launch("plan_capacity", one, &[b(usedb), b(scratch), b(info), words(&w)]);
        if keep == 2 {
            s.launch("plan_rank", grid_1d(sk, 64), &[b(exb), b(usedb), b(prib), b(scratch), b(info), words(&w)]);
        }
        s.launch("plan_slots", grid_1d(ge, 64), &[b(exb), b(usedb), b(scratch), b(info), b(sr), words(&w)]);
        s.launch("plan_offsets", one, &[b(scratch), b(info), words(&w)]);
        s.launch("plan_finish", grid_1d(s_, 64), &[b(exb), b(rwb), b(usedb), b(scratch), b(sr), b(pw), words(&w)]);
        s.launch("plan_stats", one, &[b(scratch), b(info), words(&w)]);
        // permute and combine run on the reference plan's rows and weights, so that a plan
        // mismatch is reported as one (below) rather than as a permute or combine error.
        let (xb, ypb) = (s.f32s(&x), s.f32s(&yp));
        let rows: Vec<i32> = host(&cpu, &want.rows).as_i32("rows").expect("i32").to_vec();
        let (rowsb, pwb) = (s.i32s(&rows), s.f32s(host(&cpu, &want.weights).as_f32("w").expect("f32")));
        let (xpb, yb) = (s.zeros(sk * m), s.zeros(s_ * m));
        let (n1, n2) = ((sk * m) as u64, (s_ * m) as u64);
        s.launch("permute", grid_1d(sk * m, 256), &[b(xb), b(rowsb), b(xpb), u64v(n1), u32v(m as u32), u32v(k as u32)]);
        s.launch(
            "combine",
            grid_1d(s_ * m, 256),
            &[b(ypb), b(rowsb), b(pwb), b(yb), u64v(n2), u32v(m as u32), u32v(k as u32)],
        );
        let got = s.run(exe, c.name);

        let info_v = got.i32s(info);
        let sr_v = got.i32s(sr);
        let name = |what: &str| format!("{}: {what}", c.name);
        same_i32(&name("counts"), &host(&cpu, &want.counts), info_v[..e].to_vec());
        same_i32(&name("first_counts"), &host(&cpu, &want.first_counts), info_v[e..2 * e].to_vec());
        same_i32(&name("kept_counts"), &host(&cpu, &want.kept_counts), info_v[2 * e..3 * e].to_vec());
        same_i32(&name("offsets"), &host(&cpu, &want.offsets), info_v[3 * e..4 * e + 1].to_vec());
        same_i32(&name("stats"), &host(&cpu, &want.stats), info_v[4 * e + 1..4 * e + 5].to_vec());
        same_i32(&name("slots"), &host(&cpu, &want.slots), sr_v[..sk].to_vec());
        same_i32(&name("rows"), &host(&cpu, &want.rows), sr_v[sk..].to_vec());
        close_f32(&name("weights"), &host(&cpu, &want.weights), got.f32s(pw), 1e-6);
        close_f32(&name("permute"), &host(&cpu, &xp), got.f32s(xpb), 0.0);
        close_f32(&name("combine"), &host(&cpu, &y), got.f32s(yb), 1e-6);
        let dropped = host(&cpu, &want.stats).as_i32("stats").expect("i32")[1];
        if c.name == "deepspeed_token_order" {
            assert!(dropped > 0, "the skewed case should drop routes, dropped {dropped}");
        }
    }
}

#[test]
fn noise_and_router_stats_kernels_match_the_cpu_backend_under_emulation() {
    let Some(exe) = emulate::driver() else { return };
    let cpu = cpu();
    let (s_, e) = (29usize, 12usize);
    let mut s = Script::default();
    let kinds = [(NoiseKind::Uniform, 0u32, 0.0f32), (NoiseKind::Jitter(0.01), 1, 0.01), (NoiseKind::Gumbel, 2, 0.0)];
    let mut outs = Vec::new();
    for (_, code, eps) in kinds {
        let out = s.zeros(s_ * e);
        let seed = 0x1234_5678_9abc_def0u64;
        s.launch(
            "noise",
            grid_1d(s_ * e, 256),
            &[
                Arg::Buf(out),
                u64v((s_ * e) as u64),
                u32v(seed as u32),
                u32v((seed >> 32) as u32),
                u32v(5),
                u32v(code),
                f32v(eps),
            ],
        );
        outs.push(out);
    }
    let logits: Vec<f32> = rand(s_ * e, 900).into_iter().map(|v| 2.0 * v).collect();
    let lt = up(&cpu, &[s_, e], logits.clone());
    let spec = RouteSpec::softmax_top_k(2);
    let scores = host(&cpu, &cpu.route(&lt, &spec).expect("route").scores);
    let (lb, sb, stats) = (s.f32s(&logits), s.f32s(scores.as_f32("scores").expect("f32")), s.zeros(e + 1));
    s.launch(
        "router_stats",
        grid_1d(e + 1, 64),
        &[Arg::Buf(lb), Arg::Buf(sb), Arg::Buf(stats), u32v(s_ as u32), u32v(e as u32)],
    );
    let got = s.run(exe, "noise_stats");
    for ((kind, _, _), out) in kinds.iter().zip(outs) {
        let want = host(&cpu, &cpu.noise(*kind, 0x1234_5678_9abc_def0, 5, &[s_, e]).expect("cpu noise"));
        close_f32(&format!("noise {kind:?}"), &want, got.f32s(out), 1e-6);
    }
    let want = host(
        &cpu,
        &cpu.router_stats(&lt, &up(&cpu, &[s_, e], scores.as_f32("s").expect("f32").to_vec())).expect("stats"),
    );
    close_f32("router_stats", &want, got.f32s(stats), 2e-6);
}

#[test]
fn elementwise_kernels_match_the_cpu_backend_under_emulation() {
    let Some(exe) = emulate::driver() else { return };
    let cpu = cpu();
    let (r, c) = (13usize, 20usize);
    let n = r * c;
    let (a, b2) = (rand(n, 700), rand(2 * n, 701));
    let (b, gate, coef) = (rand(n, 702), rand(r, 703), rand(2 * r, 704));
    let acts = [Activation::Gelu, Activation::GeluTanh, Activation::Relu, Activation::Silu, Activation::Identity];
    let mut s = Script::default();
    let (ab, b2b, bb, gb, cb) = (s.f32s(&a), s.f32s(&b2), s.f32s(&b), s.f32s(&gate), s.f32s(&coef));
    let buf = Arg::Buf;
    let mut outs = Vec::new();
    for act in acts {
        let (o1, o2) = (s.zeros(n), s.zeros(n));
        let code = u32v(act.kernel_code());
        s.launch("activation", grid_1d(n, 256), &[buf(ab), buf(o1), u64v(n as u64), code]);
        let code = u32v(act.kernel_code());
        s.launch("glu", grid_1d(n, 256), &[buf(b2b), buf(o2), u64v(n as u64), u32v(c as u32), code]);
        outs.push((act, o1, o2));
    }
    let (mul, plain, gated, mix) = (s.zeros(n), s.zeros(n), s.zeros(n), s.zeros(n));
    s.launch("mul", grid_1d(n, 256), &[buf(ab), buf(bb), buf(mul), u64v(n as u64)]);
    for (out, g) in [(plain, 0u32), (gated, 1)] {
        let args = [buf(ab), buf(bb), buf(gb), buf(out), u64v(n as u64), u32v(c as u32), u32v(g)];
        s.launch("add_gated", grid_1d(n, 256), &args);
    }
    s.launch("residual_mix", grid_1d(n, 256), &[buf(ab), buf(bb), buf(cb), buf(mix), u64v(n as u64), u32v(c as u32)]);
    let got = s.run(exe, "elementwise");

    let (at, b2t, bt) = (up(&cpu, &[r, c], a), up(&cpu, &[r, 2 * c], b2), up(&cpu, &[r, c], b));
    let (gt, ct) = (up(&cpu, &[r, 1], gate), up(&cpu, &[r, 2], coef));
    for (act, o1, o2) in outs {
        close_f32(&format!("{act:?}"), &host(&cpu, &cpu.activation(&at, act).expect("act")), got.f32s(o1), 2e-6);
        close_f32(&format!("glu {act:?}"), &host(&cpu, &cpu.glu(&b2t, act).expect("glu")), got.f32s(o2), 2e-6);
    }
    close_f32("mul", &host(&cpu, &cpu.mul(&at, &bt).expect("mul")), got.f32s(mul), 2e-6);
    close_f32("add", &host(&cpu, &cpu.add_gated(&at, &bt, None).expect("add")), got.f32s(plain), 2e-6);
    let want = host(&cpu, &cpu.add_gated(&at, &bt, Some(&gt)).expect("gated"));
    close_f32("add_gated", &want, got.f32s(gated), 2e-6);
    let want = host(&cpu, &cpu.residual_mix(&at, &bt, &ct).expect("mix"));
    close_f32("residual_mix", &want, got.f32s(mix), 2e-6);
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
    let n = u64v((r * c) as u64);
    s.launch("to_half", grid_1d(r * c, 256), &[Arg::Buf(xb), Arg::Buf(h16), u64v((r * c) as u64), u32v(0)]);
    s.launch("to_half", grid_1d(r * c, 256), &[Arg::Buf(xb), Arg::Buf(hbf), u64v((r * c) as u64), u32v(1)]);
    s.launch("fill_rows", grid_1d(r * c, 256), &[Arg::Buf(bb), Arg::Buf(fill), n, u32v(c as u32)]);
    let got = s.run(exe, "cublas_feeds");
    let halves = |i: usize| -> Vec<u16> {
        got.i32s(i).iter().flat_map(|w| [(*w as u32 & 0xffff) as u16, (*w as u32 >> 16) as u16]).collect()
    };
    let want16: Vec<u16> = x.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
    let wantbf: Vec<u16> = x.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
    assert_eq!(&halves(h16)[..r * c], &want16[..], "f16 rounding (to nearest even)");
    assert_eq!(&halves(hbf)[..r * c], &wantbf[..], "bf16 rounding (to nearest even)");
    let want: Vec<f32> = (0..r * c).map(|i| bias[i % c]).collect();
    assert_eq!(got.f32s(fill), want, "bias rows");
}

//! Capacity and slot rules of the route and plan ops, through the public `Backend` API and
//! `Gate`, checked against the DeepSpeed `sharded_moe.py` rules (see SEMANTICS.md). Every
//! expected value is worked out by hand in the comments next to it.

mod common;

use common::{f32s, i32s, softmax, up_f32};
use moe_cpu::CpuBackend;
use moe_engine::config::{DeepSpeedGate, GateSpec, Mode, NoisyGatePolicy};
use moe_engine::gate::{Gate, GateOutput};
use moe_engine::ops::{CapacityRule, Choice, GroupScore, KeepPolicy, Plan, PlanSpec, RouteSpec, Routes, ScoreFn};
use moe_engine::{Backend, Error, GateOptions, HostTensor, NoiseOverrides};

fn be() -> CpuBackend {
    common::cpu(1)
}

/// A plan downloaded to the host.
#[derive(Debug)]
struct HostPlan {
    counts: Vec<i32>,
    first_counts: Vec<i32>,
    kept_counts: Vec<i32>,
    offsets: Vec<i32>,
    slots: Vec<i32>,
    rows: Vec<i32>,
    weights: Vec<f32>,
    /// `[capacity, dropped routes, masked routes, dropped tokens]`.
    stats: Vec<i32>,
}

fn host_plan(b: &CpuBackend, p: &Plan<CpuBackend>) -> HostPlan {
    HostPlan {
        counts: i32s(b, &p.counts),
        first_counts: i32s(b, &p.first_counts),
        kept_counts: i32s(b, &p.kept_counts),
        offsets: i32s(b, p.offsets.tensor()),
        slots: i32s(b, &p.slots),
        rows: i32s(b, &p.rows),
        weights: f32s(b, &p.weights),
        stats: i32s(b, &p.stats),
    }
}

/// Softmax top-k route spec without bias, noise or normalisation.
fn topk_spec<'a>(k: usize) -> RouteSpec<'a, CpuBackend> {
    RouteSpec::softmax_top_k(k)
}

fn route(b: &CpuBackend, s: usize, e: usize, logits: Vec<f32>, spec: &RouteSpec<'_, CpuBackend>) -> Routes<CpuBackend> {
    let l = up_f32(b, &[s, e], logits);
    b.route(&l, spec).expect("route")
}

/// Routes built by hand: `experts [S, k]`, weights `[S, k]`, uniform scores `[S, E]`.
fn hand_routes(
    b: &CpuBackend,
    s: usize,
    k: usize,
    e: usize,
    experts: Vec<i32>,
    weights: Vec<f32>,
) -> Routes<CpuBackend> {
    let t = |shape: &[usize], v| HostTensor::f32(shape, v).expect("host tensor");
    let ex = HostTensor::i32(&[s, k], experts).expect("host tensor");
    Routes::from_host(b, &ex, &t(&[s, k], weights), &t(&[s, e], vec![1.0 / e as f32; s * e])).expect("routes")
}

fn plan_spec<'a>(e: usize, capacity: CapacityRule, keep: KeepPolicy<'a, CpuBackend>) -> PlanSpec<'a, CpuBackend> {
    PlanSpec { num_experts: e, capacity, keep, used_token: None, group_size: None, renormalize_kept: false }
}

fn plan(b: &CpuBackend, routes: &Routes<CpuBackend>, spec: &PlanSpec<'_, CpuBackend>) -> HostPlan {
    host_plan(b, &b.plan(routes, spec).expect("plan"))
}

/// `CapacityRule::DeepSpeed`; a macro so float literals take the field's type.
macro_rules! ds_rule {
    ($factor:expr, $k_prime:expr, $min:expr) => {
        CapacityRule::DeepSpeed { factor: $factor, k_prime: $k_prime, min_capacity: $min }
    };
}

fn close(a: f32, b: f64) -> bool {
    (a as f64 - b).abs() <= 1e-6 * b.abs().max(1.0)
}

/// A DeepSpeed gate with an identity router (E = M), so the logits are the input rows.
fn identity_gate(b: &CpuBackend, e: usize, g: DeepSpeedGate) -> Gate<CpuBackend> {
    identity_gate_spec(b, e, GateSpec::DeepSpeed(g))
}

fn identity_gate_spec(b: &CpuBackend, e: usize, spec: GateSpec) -> Gate<CpuBackend> {
    let mut w = vec![0f32; e * e];
    for i in 0..e {
        w[i * e + i] = 1.0;
    }
    Gate::new(b, spec, &HostTensor::f32(&[e, e], w).unwrap(), None).expect("gate")
}

fn gate_forward(
    b: &CpuBackend,
    gate: &Gate<CpuBackend>,
    s: usize,
    e: usize,
    x: Vec<f32>,
    opts: &GateOptions,
) -> GateOutput<CpuBackend> {
    let x = up_f32(b, &[s, e], x);
    gate.forward(b, &x, s, opts).expect("gate forward")
}

// ------------------------------------------------------------------------------ capacity

#[test]
fn capacity_above_token_count_keeps_every_route() {
    let b = be();
    // S = 4, E = 2, top-1 choices [0, 0, 1, 0] (logits favour column 0 except token 2).
    let r = route(&b, 4, 2, vec![2.0, 0.0, 1.0, 0.0, 0.0, 3.0, 5.0, 1.0], &topk_spec(1));
    assert_eq!(i32s(&b, &r.experts), vec![0, 0, 1, 0]);
    // C = max(ceil(4 / 2 · 4.0 · 1), 0) = 8 > S = 4. DeepSpeed bounds the top-k selection
    // by S, so every route is kept and the reported capacity stays 8; the kernels take
    // min(C, S·k) = 4, which keeps the same routes.
    let spec = plan_spec(2, ds_rule!(4.0, 1, 0), KeepPolicy::TokenOrder);
    let device_plan = b.plan(&r, &spec).expect("plan");
    assert_eq!(device_plan.static_capacity(), Some(8));
    let p = host_plan(&b, &device_plan);
    assert_eq!(p.stats, vec![4, 0, 0, 0]);
    assert_eq!(p.counts, vec![3, 1]);
    assert_eq!(p.kept_counts, vec![3, 1]);
    // Slots in token order per expert: e0 gets tokens 0, 1, 3 → 0, 1, 2; e1 gets token 2 → 0.
    assert_eq!(p.slots, vec![0, 1, 0, 2]);
    assert_eq!(p.offsets, vec![0, 3, 4]);
    assert_eq!(p.rows, vec![0, 1, 3, 2]);
    // The same with a priority policy (the DeepSpeed RTS path) must not drop anything either.
    let prio = up_f32(&b, &[4, 2], vec![0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.4, 0.6]);
    let p = plan(&b, &r, &plan_spec(2, ds_rule!(4.0, 1, 0), KeepPolicy::Priority(&prio)));
    assert_eq!(p.stats, vec![4, 0, 0, 0]);
    assert_eq!(p.slots, vec![0, 1, 0, 2]);
}

#[test]
fn deepspeed_capacity_formula_and_min_capacity() {
    let b = be();
    // (S, E, factor, k', min_capacity, expected C = max(ceil(S / E · factor · k'), min)).
    let cases = [
        (10usize, 4usize, 1.5, 1usize, 0usize, 4i32), // 2.5 · 1.5 = 3.75 → 4
        (10, 4, 1.5, 1, 2, 4),                        // min below the formula: formula wins
        (10, 4, 1.5, 1, 6, 6),                        // min_capacity takes over
        (10, 4, 1.5, 2, 0, 8),                        // 2.5 · 3.0 = 7.5 → 8
        (7, 3, 1.0, 1, 0, 3),                         // 2.33 → 3
        (12, 4, 1.0, 1, 0, 3),                        // exactly 3: no extra slot
        (8, 4, 0.25, 3, 0, 2),                        // 2 · 0.75 = 1.5 → 2
        (6, 4, 0.1, 1, 0, 1),                         // 1.5 · 0.1 = 0.15 → 1
        (6, 4, 0.1, 1, 5, 5),                         // min_capacity takes over
        (16, 8, 2.0, 1, 4, 4),                        // 2 · 2 = 4 = min
    ];
    for (s, e, factor, kp, min, want) in cases {
        // Every token on expert 0: C of them are kept, S − C dropped.
        let r = hand_routes(&b, s, 1, e, vec![0; s], vec![1.0; s]);
        let p = plan(&b, &r, &plan_spec(e, ds_rule!(factor, kp, min), KeepPolicy::TokenOrder));
        let kept = (want as usize).min(s) as i32;
        let case = format!("S={s} E={e} factor={factor} k'={kp} min={min}");
        assert_eq!(p.stats[0], want, "capacity, {case}");
        assert_eq!(p.kept_counts[0], kept, "kept, {case}");
        assert_eq!(p.stats[1], s as i32 - kept, "dropped routes, {case}");
        assert_eq!(p.stats[3], s as i32 - kept, "dropped tokens, {case}");
    }
}

#[test]
fn gate_uses_train_or_eval_capacity_factor() {
    let b = be();
    let g = DeepSpeedGate {
        k: 1,
        capacity_factor: 2.0,
        eval_capacity_factor: 0.5,
        min_capacity: 0,
        use_rts: false,
        ..DeepSpeedGate::default()
    };
    let gate = identity_gate(&b, 4, g);
    // S = 8 tokens, E = 4, every token prefers expert 3.
    let x: Vec<f32> = (0..8).flat_map(|_| [0.0, 0.0, 0.0, 1.0]).collect();
    // Train: C = ceil(8 / 4 · 2.0) = 4. Eval: C = ceil(8 / 4 · 0.5) = 1.
    for (mode, c) in [(Mode::Train, 4), (Mode::Eval, 1)] {
        let out = gate_forward(&b, &gate, 8, 4, x.clone(), &GateOptions { mode, ..Default::default() });
        let r = out.report(&b).unwrap();
        assert_eq!(r.capacity, c, "{mode:?}");
        assert_eq!(r.exp_counts, vec![0, 0, 0, 8]);
        assert_eq!(r.kept_counts, vec![0, 0, 0, c]);
        assert_eq!(r.dropped_routes, 8 - c);
        assert_eq!(r.dropped_tokens, 8 - c);
        // Token order without RTS: the first C tokens hold slots 0..C−1.
        let slots = i32s(&b, &out.plan.slots);
        let want: Vec<i32> = (0..8).map(|t| if t < c { t as i32 } else { -1 }).collect();
        assert_eq!(slots, want, "{mode:?}");
    }
}

#[test]
fn dropless_capacity_is_the_largest_count() {
    let b = be();
    // Top-2 (rank-major), S = 3, E = 3, routes [[0,1],[0,2],[1,0]]: counts [3, 2, 1].
    // Dropless: C = max count = 3, nothing dropped.
    let r = hand_routes(&b, 3, 2, 3, vec![0, 1, 0, 2, 1, 0], vec![0.5; 6]);
    let mut spec = plan_spec(3, CapacityRule::Dropless { clamp_to_tokens: false }, KeepPolicy::RankMajor);
    spec.renormalize_kept = true;
    let p = plan(&b, &r, &spec);
    assert_eq!(p.counts, vec![3, 2, 1]);
    assert_eq!(p.stats, vec![3, 0, 0, 0]);
    assert_eq!(p.kept_counts, vec![3, 2, 1]);
    // Rank-major slots: e0 first choices t0, t1 → 0, 1, then t2's second → 2.
    // e1: first choice t2 → 0, then t0's second → 1. e2: t1's second → 0.
    assert_eq!(p.slots, vec![0, 1, 1, 0, 0, 2]);
    assert!(p.weights.iter().all(|&w| close(w, 0.5)));

    // Top-1 dropless with every token on one expert: C = count = S = 5.
    let r = hand_routes(&b, 5, 1, 2, vec![1; 5], vec![0.7; 5]);
    let p = plan(&b, &r, &plan_spec(2, CapacityRule::Dropless { clamp_to_tokens: true }, KeepPolicy::TokenOrder));
    assert_eq!(p.stats, vec![5, 0, 0, 0]);
    assert_eq!(p.slots, vec![0, 1, 2, 3, 4]);

    // The top-1 clamp: C = min(max count, S). A count above S cannot come out of a real
    // top-1 choice, so the routes are made by hand: S = 2 tokens each naming expert 0
    // twice gives count 4; clamped C = 2, so the last two routes (token order) drop.
    let r = hand_routes(&b, 2, 2, 2, vec![0, 0, 0, 0], vec![1.0; 4]);
    let p = plan(&b, &r, &plan_spec(2, CapacityRule::Dropless { clamp_to_tokens: true }, KeepPolicy::TokenOrder));
    assert_eq!(p.stats[0], 2);
    assert_eq!(p.slots, vec![0, 1, -1, -1]);
    let p = plan(&b, &r, &plan_spec(2, CapacityRule::Dropless { clamp_to_tokens: false }, KeepPolicy::TokenOrder));
    assert_eq!(p.stats, vec![4, 0, 0, 0]);
}

#[test]
fn deepspeed_dropless_gates() {
    let b = be();
    // Top-1, drop_tokens = false: S = 5, all on expert 2 of 3 → C = min(5, 5) = 5.
    let g = DeepSpeedGate { k: 1, min_capacity: 0, drop_tokens: false, use_rts: false, ..Default::default() };
    let gate = identity_gate(&b, 3, g);
    let x: Vec<f32> = (0..5).flat_map(|_| [0.0, 0.0, 2.0]).collect();
    let out = gate_forward(&b, &gate, 5, 3, x, &GateOptions::default());
    let r = out.report(&b).unwrap();
    assert_eq!((r.capacity, r.dropped_routes, r.dropped_tokens), (5, 0, 0));
    assert_eq!(r.exp_counts, vec![0, 0, 5]);

    // Top-2, drop_tokens = false, no second-expert sampling: logits rows
    // [3,2,0] → (0,1); [2,3,0] → (1,0); [3,0,2] → (0,2); [0,2,3] → (2,1).
    // Counts e0: 3, e1: 3, e2: 2 → C = 3 (top-2 dropless does not clamp).
    let g = DeepSpeedGate {
        k: 2,
        min_capacity: 0,
        drop_tokens: false,
        top2_2nd_expert_sampling: false,
        ..Default::default()
    };
    let gate = identity_gate(&b, 3, g);
    let x = vec![3.0, 2.0, 0.0, 2.0, 3.0, 0.0, 3.0, 0.0, 2.0, 0.0, 2.0, 3.0];
    let out = gate_forward(&b, &gate, 4, 3, x, &GateOptions::default());
    let r = out.report(&b).unwrap();
    assert_eq!(r.exp_counts, vec![3, 3, 2]);
    assert_eq!((r.capacity, r.dropped_routes, r.dropped_tokens), (3, 0, 0));
}

// ------------------------------------------------------------------------------ slots

#[test]
fn every_token_on_one_expert_drops_beyond_capacity() {
    let b = be();
    // S = 6, E = 3, every token's logits favour expert 1.
    let logits: Vec<f32> = (0..6).flat_map(|t| [0.0, 1.0 + t as f32, 0.5]).collect();
    let r = route(&b, 6, 3, logits.clone(), &topk_spec(1));
    assert_eq!(i32s(&b, &r.experts), vec![1; 6]);
    // C = ceil(6 / 3 · 1.0 · 1) = 2: tokens 0 and 1 keep slots 0, 1; tokens 2..5 drop.
    let p = plan(&b, &r, &plan_spec(3, ds_rule!(1.0, 1, 0), KeepPolicy::TokenOrder));
    assert_eq!(p.counts, vec![0, 6, 0]);
    assert_eq!(p.kept_counts, vec![0, 2, 0]);
    assert_eq!(p.offsets, vec![0, 0, 2, 2]);
    assert_eq!(p.slots, vec![0, 1, -1, -1, -1, -1]);
    assert_eq!(p.rows, vec![0, 1, -1, -1, -1, -1]);
    // Kept weights are the raw softmax probability of expert 1 (top-1 is not renormalised);
    // dropped routes weigh 0.
    for t in 0..6 {
        let p1 = softmax(&logits[t * 3..t * 3 + 3].iter().map(|&v| v as f64).collect::<Vec<_>>())[1];
        let want = if t < 2 { p1 } else { 0.0 };
        assert!(close(p.weights[t], want), "token {t}: {} vs {want}", p.weights[t]);
    }
    assert_eq!(p.stats, vec![2, 4, 0, 4]);
}

#[test]
fn experts_without_tokens_repeat_offsets() {
    let b = be();
    // E = 5, top-1 choices [3, 1, 3, 3, 1]: experts 0, 2 and 4 get nothing.
    let r = hand_routes(&b, 5, 1, 5, vec![3, 1, 3, 3, 1], vec![1.0; 5]);
    let p = plan(&b, &r, &plan_spec(5, CapacityRule::Unlimited, KeepPolicy::TokenOrder));
    assert_eq!(p.counts, vec![0, 2, 0, 3, 0]);
    assert_eq!(p.kept_counts, vec![0, 2, 0, 3, 0]);
    // offsets = exclusive prefix sum of [0, 2, 0, 3, 0].
    assert_eq!(p.offsets, vec![0, 0, 2, 2, 5, 5]);
    // e1 rows 0..2 (tokens 1, 4), e3 rows 2..5 (tokens 0, 2, 3).
    assert_eq!(p.rows, vec![2, 0, 3, 4, 1]);
    assert_eq!(p.slots, vec![0, 0, 1, 2, 1]);
    // Unlimited reports the largest count as the capacity.
    assert_eq!(p.stats, vec![3, 0, 0, 0]);
}

#[test]
fn k_equal_to_e_routes_every_expert() {
    let b = be();
    // S = 3, E = 3, k = 3: each token's choice is all experts by descending score.
    let logits = vec![0.1, 0.3, 0.2, 2.0, -1.0, 0.0, -0.5, -0.5, 1.0];
    let r = route(&b, 3, 3, logits.clone(), &topk_spec(3));
    // Row 0: 0.3 > 0.2 > 0.1 → [1, 2, 0]; row 1: [0, 2, 1]; row 2: 1.0, then the tie
    // −0.5/−0.5 goes to the lower index → [2, 0, 1].
    assert_eq!(i32s(&b, &r.experts), vec![1, 2, 0, 0, 2, 1, 2, 0, 1]);
    let w = f32s(&b, &r.weights);
    for t in 0..3 {
        let p = softmax(&logits[t * 3..t * 3 + 3].iter().map(|&v| v as f64).collect::<Vec<_>>());
        let ex = &i32s(&b, &r.experts)[t * 3..t * 3 + 3];
        for j in 0..3 {
            assert!(close(w[t * 3 + j], p[ex[j] as usize]));
        }
    }
    let p = plan(&b, &r, &plan_spec(3, CapacityRule::Unlimited, KeepPolicy::TokenOrder));
    assert_eq!(p.counts, vec![3, 3, 3]);
    assert_eq!(p.offsets, vec![0, 3, 6, 9]);
    // Expert e holds rows 3e..3e+2 in token order: route (t, j) with expert x has row 3x + t.
    let ex = i32s(&b, &r.experts);
    for t in 0..3 {
        for j in 0..3 {
            assert_eq!(p.rows[t * 3 + j], 3 * ex[t * 3 + j] + t as i32);
            assert_eq!(p.slots[t * 3 + j], t as i32);
        }
    }
}

#[test]
fn fewer_tokens_than_k_routes_and_k_above_e_is_an_error() {
    let b = be();
    // S = 1 < k = 3 is fine in the reference (top-k is over experts): one token, three routes.
    let r = route(&b, 1, 4, vec![0.0, 3.0, 1.0, 2.0], &topk_spec(3));
    assert_eq!(i32s(&b, &r.experts), vec![1, 3, 2]);
    let p = plan(&b, &r, &plan_spec(4, ds_rule!(1.0, 3, 0), KeepPolicy::TokenOrder));
    // C = ceil(1 / 4 · 1 · 3) = 1: each chosen expert holds the token's one route.
    assert_eq!(p.stats, vec![1, 0, 0, 0]);
    assert_eq!(p.counts, vec![0, 1, 1, 1]);
    assert_eq!(p.rows, vec![0, 2, 1]);

    // An empty batch routes and plans to nothing: C = max(ceil(0 / 4 · 3), 0) = 0.
    let r = route(&b, 0, 4, vec![], &topk_spec(3));
    let p = plan(&b, &r, &plan_spec(4, ds_rule!(1.0, 3, 0), KeepPolicy::TokenOrder));
    assert_eq!((p.counts, p.offsets, p.stats), (vec![0; 4], vec![0; 5], vec![0; 4]));

    // k > E and k = 0 are clean config errors naming k, never a panic.
    let l = up_f32(&b, &[2, 4], vec![0.0; 8]);
    for k in [0, 5] {
        match b.route(&l, &topk_spec(k)).err() {
            Some(Error::Config { field, .. }) => assert_eq!(field, "k"),
            other => panic!("k = {k}: expected a config error, got {other:?}"),
        }
    }
}

#[test]
fn top2_slots_are_rank_major_and_kept_weights_renormalise() {
    let b = be();
    // DeepSpeed top-2 without sampling: first = argmax(p), second = argmax(logits \ first).
    //   t0 [3, 2, 0] → (0, 1)    t1 [2, 3, 0] → (1, 0)
    //   t2 [3, 0, 2] → (0, 2)    t3 [0, 2, 3] → (2, 1)
    let logits = vec![3.0, 2.0, 0.0, 2.0, 3.0, 0.0, 3.0, 0.0, 2.0, 0.0, 2.0, 3.0];
    let spec = RouteSpec { k: 2, choice: Choice::DeepSpeedTop2, ..topk_spec(2) };
    let r = route(&b, 4, 3, logits, &spec);
    assert_eq!(i32s(&b, &r.experts), vec![0, 1, 1, 0, 0, 2, 2, 1]);

    // Slots: all first choices of an expert (token order), then its second choices.
    //   e0: t0 (1st) 0, t2 (1st) 1, t1 (2nd) 2
    //   e1: t1 (1st) 0, t0 (2nd) 1, t3 (2nd) 2
    //   e2: t3 (1st) 0, t2 (2nd) 1
    // C = ceil(4 / 3 · 0.5 · 2) = ceil(1.33) = 2: t1's and t3's second routes drop (slot 2).
    // In token order t1's second route would have taken e0's slot 1 and t2's first would
    // have dropped instead.
    let mut ps = plan_spec(3, ds_rule!(0.5, 2, 0), KeepPolicy::RankMajor);
    ps.renormalize_kept = true;
    let p = plan(&b, &r, &ps);
    assert_eq!(p.counts, vec![3, 3, 2]);
    assert_eq!(p.first_counts, vec![2, 1, 1]);
    assert_eq!(p.stats, vec![2, 2, 0, 0]);
    assert_eq!(p.slots, vec![0, 1, 0, -1, 1, 1, 0, -1]);
    assert_eq!(p.kept_counts, vec![2, 2, 2]);
    assert_eq!(p.offsets, vec![0, 2, 4, 6]);
    // Rows: e0 [t0, t2] → 0, 1; e1 [t1, t0] → 2, 3; e2 [t3, t2] → 4, 5.
    assert_eq!(p.rows, vec![0, 3, 2, -1, 1, 5, 4, -1]);
    // Weights: g1, g2 over kept routes / max(g1 + g2, eps). t0 and t2 keep both routes with
    // probabilities ∝ e³ and e²: e³ / (e³ + e²) = 1 / (1 + e⁻¹). t1 and t3 are lone
    // survivors: 1.0 and 0.
    let hi = 1.0 / (1.0 + (-1f64).exp());
    let want = [hi, 1.0 - hi, 1.0, 0.0, hi, 1.0 - hi, 1.0, 0.0];
    for (i, (&got, &w)) in p.weights.iter().zip(&want).enumerate() {
        assert!(close(got, w), "route {i}: {got} vs {w}");
    }

    // C = ceil(4 / 3 · 0.25 · 2) = ceil(0.67) = 1: only slot 0 of each expert survives.
    // e0 keeps t0 (1st), e1 keeps t1 (1st), e2 keeps t3 (1st). t2 loses both routes: its
    // weights are 0 / max(0, eps) = 0, and it counts as a dropped token.
    let mut ps = plan_spec(3, ds_rule!(0.25, 2, 0), KeepPolicy::RankMajor);
    ps.renormalize_kept = true;
    let p = plan(&b, &r, &ps);
    assert_eq!(p.slots, vec![0, -1, 0, -1, -1, -1, 0, -1]);
    assert_eq!(p.weights, vec![1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
    assert_eq!(p.stats, vec![1, 5, 0, 1]);
}

#[test]
fn top2_gate_drops_second_choices_first() {
    let b = be();
    // The same four tokens through a DeepSpeed top-2 Gate (identity router, no sampling,
    // min_capacity 0, eval_capacity_factor 0.5 → C = 2).
    let g = DeepSpeedGate {
        k: 2,
        eval_capacity_factor: 0.5,
        min_capacity: 0,
        top2_2nd_expert_sampling: false,
        ..Default::default()
    };
    let gate = identity_gate(&b, 3, g);
    let x = vec![3.0, 2.0, 0.0, 2.0, 3.0, 0.0, 3.0, 0.0, 2.0, 0.0, 2.0, 3.0];
    let out = gate_forward(&b, &gate, 4, 3, x, &GateOptions::default());
    let (idx, loc, gates) = out.sparse_routes(&b).unwrap();
    // [k, S] layout: first choices row, second choices row; dropped → −1, slot 0, gate 0.
    assert_eq!(idx.as_i32("idx").unwrap(), &[0, 1, 0, 2, 1, -1, 2, -1]);
    assert_eq!(loc.as_i32("loc").unwrap(), &[0, 0, 1, 0, 1, 0, 1, 0]);
    let hi = 1.0 / (1.0 + (-1f64).exp());
    let want = [hi, 1.0, hi, 1.0, 1.0 - hi, 0.0, 1.0 - hi, 0.0];
    for (got, w) in gates.as_f32("g").unwrap().iter().zip(want) {
        assert!(close(*got, w), "{got} vs {w}");
    }
    let r = out.report(&b).unwrap();
    assert_eq!((r.capacity, r.dropped_routes, r.dropped_tokens), (2, 2, 0));
}

#[test]
fn priority_keeps_highest_priority_then_token_order_slots() {
    let b = be();
    // S = 6, all on expert 0 of 2, C = 3 (Fixed). Priorities of expert 0's column:
    //   t0 0.10, t1 0.90, t2 0.30, t3 0.80, t4 0.50, t5 0.20
    // The three highest are t1 (0.9), t3 (0.8), t4 (0.5); they take slots in token order:
    // t1 → 0, t3 → 1, t4 → 2. Expert 1's column must be ignored (its values are the largest).
    let r = hand_routes(&b, 6, 1, 2, vec![0; 6], vec![0.6; 6]);
    let prio = up_f32(&b, &[6, 2], vec![0.10, 1.0, 0.90, 1.0, 0.30, 1.0, 0.80, 1.0, 0.50, 1.0, 0.20, 1.0]);
    let p = plan(&b, &r, &plan_spec(2, CapacityRule::Fixed(3), KeepPolicy::Priority(&prio)));
    assert_eq!(p.slots, vec![-1, 0, -1, 1, 2, -1]);
    assert_eq!(p.rows, vec![-1, 0, -1, 1, 2, -1]);
    assert_eq!(p.weights, vec![0.0, 0.6, 0.0, 0.6, 0.6, 0.0]);
    assert_eq!(p.stats, vec![3, 3, 0, 3]);
    // Equal priorities: the earlier token wins.
    let prio = up_f32(&b, &[6, 2], vec![0.5; 12]);
    let p = plan(&b, &r, &plan_spec(2, CapacityRule::Fixed(3), KeepPolicy::Priority(&prio)));
    assert_eq!(p.slots, vec![0, 1, 2, -1, -1, -1]);
}

#[test]
fn rts_gate_keeps_the_highest_uniforms() {
    let b = be();
    // DeepSpeed top-1 with use_rts, S = 6 all on expert 1 of 2, C = ceil(6 / 2 · 0.5) = 2.
    // RTS uniforms supplied: expert 1's column [0.2, 0.7, 0.1, 0.9, 0.4, 0.3] → keep t3 and
    // t1, slots in token order: t1 → 0, t3 → 1.
    let g = DeepSpeedGate { k: 1, eval_capacity_factor: 0.5, min_capacity: 0, use_rts: true, ..Default::default() };
    let gate = identity_gate(&b, 2, g);
    let x: Vec<f32> = (0..6).flat_map(|_| [0.0, 1.0]).collect();
    let rts = HostTensor::f32(&[6, 2], vec![0.9, 0.2, 0.9, 0.7, 0.9, 0.1, 0.9, 0.9, 0.9, 0.4, 0.9, 0.3]).unwrap();
    let opts = GateOptions { noise: NoiseOverrides { rts: Some(rts), ..Default::default() }, ..Default::default() };
    let out = gate_forward(&b, &gate, 6, 2, x, &opts);
    assert_eq!(i32s(&b, &out.plan.slots), vec![-1, 0, -1, 1, -1, -1]);
    let r = out.report(&b).unwrap();
    assert_eq!((r.capacity, r.dropped_routes, r.dropped_tokens), (2, 4, 4));
}

#[test]
fn used_token_masks_routes_without_counting_or_dropping_them() {
    let b = be();
    // S = 4 all on expert 0 of 2; used_token = [1, 0, 1, 0].
    let r = hand_routes(&b, 4, 1, 2, vec![0; 4], vec![0.8; 4]);
    let used = up_f32(&b, &[4], vec![1.0, 0.0, 1.0, 0.0]);
    // Unlimited: masked tokens take no slot, the used ones get slots 0, 1 in token order.
    let mut ps = plan_spec(2, CapacityRule::Fixed(4), KeepPolicy::TokenOrder);
    ps.used_token = Some(&used);
    let p = plan(&b, &r, &ps);
    assert_eq!(p.counts, vec![2, 0]);
    assert_eq!(p.first_counts, vec![2, 0]);
    assert_eq!(p.slots, vec![0, -1, 1, -1]);
    assert_eq!(p.rows, vec![0, -1, 1, -1]);
    assert_eq!(p.weights, vec![0.8, 0.0, 0.8, 0.0]);
    // [capacity, dropped, masked, dropped tokens]: 2 masked routes, none dropped.
    assert_eq!(p.stats, vec![4, 0, 2, 0]);
    // C = 1: token 2 is dropped (a real drop), tokens 1 and 3 are still only masked.
    let mut ps = plan_spec(2, CapacityRule::Fixed(1), KeepPolicy::TokenOrder);
    ps.used_token = Some(&used);
    let p = plan(&b, &r, &ps);
    assert_eq!(p.slots, vec![0, -1, -1, -1]);
    assert_eq!(p.stats, vec![1, 1, 2, 1]);

    // Through the DeepSpeed top-1 gate: exp_counts leave masked tokens out.
    let g = DeepSpeedGate { k: 1, min_capacity: 0, use_rts: false, ..Default::default() };
    let gate = identity_gate(&b, 2, g);
    let opts = GateOptions {
        used_token: Some(HostTensor::f32(&[4], vec![1.0, 0.0, 1.0, 0.0]).unwrap()),
        ..Default::default()
    };
    let out = gate_forward(&b, &gate, 4, 2, vec![1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0], &opts);
    let r = out.report(&b).unwrap();
    // Choices [0, 0, 1, 1]; used tokens 0 (e0) and 2 (e1).
    assert_eq!(r.exp_counts, vec![1, 1]);
    assert_eq!((r.masked_routes, r.dropped_routes, r.dropped_tokens), (2, 0, 0));
}

#[test]
fn switch_capacity_counts_per_group() {
    let b = be();
    // S = 6 as two sequences of 3; choices [0, 0, 1 | 0, 1, 1]; expert_capacity 1 per
    // sequence. Group 0: e0 keeps t0 (t1 drops), e1 keeps t2. Group 1: e0 keeps t3, e1
    // keeps t4 (t5 drops). Slots restart in each group.
    let r = hand_routes(&b, 6, 1, 2, vec![0, 0, 1, 0, 1, 1], vec![0.9; 6]);
    let mut ps = plan_spec(2, CapacityRule::Fixed(1), KeepPolicy::TokenOrder);
    ps.group_size = Some(3);
    let p = plan(&b, &r, &ps);
    assert_eq!(p.slots, vec![0, -1, 0, 0, 0, -1]);
    assert_eq!(p.kept_counts, vec![2, 2]);
    assert_eq!(p.offsets, vec![0, 2, 4]);
    // Expert-major rows, groups in order inside an expert: e0 [t0, t3], e1 [t2, t4].
    assert_eq!(p.rows, vec![0, -1, 2, 1, 3, -1]);
    assert_eq!(p.stats, vec![1, 2, 0, 2]);
    // One group over all six tokens would keep only t0 and t2.
    let p = plan(&b, &r, &plan_spec(2, CapacityRule::Fixed(1), KeepPolicy::TokenOrder));
    assert_eq!(p.slots, vec![0, -1, 0, -1, -1, -1]);
    // Tokens that do not split into whole groups are an error, not a panic.
    let mut ps = plan_spec(2, CapacityRule::Fixed(1), KeepPolicy::TokenOrder);
    ps.group_size = Some(4);
    assert!(b.plan(&r, &ps).is_err());

    // Through a Switch gate with seq = 3: the same choices from an identity router.
    let gate = identity_gate_spec(&b, 2, GateSpec::Switch { expert_capacity: 1 });
    let x = vec![1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0];
    let xt = up_f32(&b, &[6, 2], x);
    let out = gate.forward(&b, &xt, 3, &GateOptions::default()).unwrap();
    assert_eq!(i32s(&b, &out.plan.slots), vec![0, -1, 0, 0, 0, -1]);
    // The weight is the max probability: softmax([1, 0])₀ = 1 / (1 + e⁻¹).
    let hi = 1.0 / (1.0 + (-1f64).exp());
    let w = f32s(&b, &out.plan.weights);
    for (t, &kept) in [true, false, true, true, true, false].iter().enumerate() {
        assert!(close(w[t], if kept { hi } else { 0.0 }), "token {t}: {}", w[t]);
    }
}

#[test]
fn ties_go_to_the_lower_expert_index() {
    let b = be();
    // All-equal logits: top-1 picks expert 0, top-2 picks (0, 1).
    let r = route(&b, 1, 4, vec![1.0; 4], &topk_spec(1));
    assert_eq!(i32s(&b, &r.experts), vec![0]);
    let r = route(&b, 1, 4, vec![1.0; 4], &topk_spec(2));
    assert_eq!(i32s(&b, &r.experts), vec![0, 1]);
    // A tie between experts 2 and 3 above the rest: 2 first, then 3.
    let r = route(&b, 1, 4, vec![0.0, 0.0, 5.0, 5.0], &topk_spec(2));
    assert_eq!(i32s(&b, &r.experts), vec![2, 3]);
    // DeepSpeed top-2: [5, 5, 0, 0] → first = argmax(p) ties 0/1 → 0, second = 1.
    let spec = RouteSpec { k: 2, choice: Choice::DeepSpeedTop2, ..topk_spec(2) };
    let r = route(&b, 1, 4, vec![5.0, 5.0, 0.0, 0.0], &spec);
    assert_eq!(i32s(&b, &r.experts), vec![0, 1]);
    // [1, 5, 2, 2] → first 1, second (experts 0, 2, 3) ties 2/3 → 2.
    let r = route(&b, 1, 4, vec![1.0, 5.0, 2.0, 2.0], &spec);
    assert_eq!(i32s(&b, &r.experts), vec![1, 2]);
}

#[test]
fn non_finite_logits_name_the_first_bad_token() {
    let b = be();
    let cases: Vec<(Vec<f32>, usize, usize)> = vec![
        // NaN at token 1, expert 0 (and +inf later at token 2).
        (vec![0.0, 1.0, f32::NAN, 0.0, f32::INFINITY, 0.0], 1, 0),
        // −inf at token 2, expert 1.
        (vec![0.0, 1.0, 0.0, 1.0, 0.0, f32::NEG_INFINITY], 2, 1),
        // +inf at token 0, expert 1.
        (vec![0.0, f32::INFINITY, 0.0, 1.0, 0.0, 1.0], 0, 1),
    ];
    for (logits, tok, ex) in cases {
        let l = up_f32(&b, &[3, 2], logits.clone());
        match b.route(&l, &topk_spec(1)).err() {
            Some(Error::NonFiniteLogits { token, expert, value }) => {
                assert_eq!((token, expert), (tok, ex));
                let bad = logits[tok * 2 + ex];
                assert!(value.is_nan() && bad.is_nan() || value == bad);
                let msg = Error::NonFiniteLogits { token, expert, value }.to_string();
                assert!(msg.contains(&format!("token {tok}")), "{msg}");
            }
            other => panic!("expected NonFiniteLogits, got {other:?}"),
        }
    }
    // Through a gate: a NaN in the input makes token 2's logits NaN.
    let g = DeepSpeedGate { k: 1, min_capacity: 0, use_rts: false, ..Default::default() };
    let gate = identity_gate(&b, 2, g);
    let x = up_f32(&b, &[3, 2], vec![0.0, 1.0, 1.0, 0.0, f32::NAN, 1.0]);
    match gate.forward(&b, &x, 3, &GateOptions::default()).err() {
        Some(Error::NonFiniteLogits { token, .. }) => assert_eq!(token, 2),
        other => panic!("expected NonFiniteLogits, got {:?}", other.map(|e| e.to_string())),
    }
}

#[test]
fn compact_rows_are_an_expert_major_permutation() {
    let b = be();
    let (s, e, k) = (37, 5, 2);
    let logits = common::lcg(11, s * e, 2.0);
    let r = route(&b, s, e, logits, &topk_spec(k));
    let ex = i32s(&b, &r.experts);
    for (name, rule, keep) in [
        ("deepspeed C", ds_rule!(0.6, 2, 0), KeepPolicy::RankMajor),
        ("token order", CapacityRule::Fixed(9), KeepPolicy::TokenOrder),
        ("unlimited", CapacityRule::Unlimited, KeepPolicy::TokenOrder),
    ] {
        let p = plan(&b, &r, &plan_spec(e, rule, keep));
        let total = p.offsets[e] as usize;
        assert_eq!(total as i32, p.kept_counts.iter().sum::<i32>(), "{name}");
        // Kept rows form a permutation of 0..total.
        let mut seen = vec![false; total];
        for (i, &row) in p.rows.iter().enumerate() {
            assert_eq!(row < 0, p.slots[i] < 0, "{name}: row and slot agree on dropping");
            if row >= 0 {
                assert!((row as usize) < total, "{name}: row {row} out of 0..{total}");
                assert!(!seen[row as usize], "{name}: row {row} used twice");
                seen[row as usize] = true;
                // Expert-major: the route's row lies in its expert's range, at its slot
                // (one group).
                let x = ex[i] as usize;
                assert!(p.offsets[x] <= row && row < p.offsets[x + 1], "{name}: route {i}");
                assert_eq!(row - p.offsets[x], p.slots[i], "{name}: route {i}");
            }
        }
        assert!(seen.iter().all(|&v| v), "{name}: rows are not a permutation of 0..{total}");
        // Kept counts never exceed the capacity; counts match the routes.
        for x in 0..e {
            assert!(p.kept_counts[x] <= p.stats[0], "{name}");
            assert_eq!(p.counts[x], ex.iter().filter(|&&v| v as usize == x).count() as i32, "{name}");
        }
    }
}

#[test]
fn deepspeed_top1_needs_tokens_at_least_min_capacity() {
    let b = be();
    let g = DeepSpeedGate { k: 1, min_capacity: 4, use_rts: false, ..Default::default() };
    let gate = identity_gate(&b, 2, g);
    // S = 3 < min_capacity = 4: DeepSpeed asserts; the engine errors.
    let x = up_f32(&b, &[3, 2], vec![1.0, 0.0, 0.0, 1.0, 1.0, 0.0]);
    match gate.forward(&b, &x, 3, &GateOptions::default()).err() {
        Some(e @ Error::Precondition(_)) => assert!(e.to_string().contains("min_capacity"), "{e}"),
        other => panic!("expected Error::Precondition, got {:?}", other.map(|e| e.to_string())),
    }
    // The check holds for dropless gates too (DeepSpeed asserts before the drop step).
    let g = DeepSpeedGate { k: 1, min_capacity: 4, drop_tokens: false, use_rts: false, ..Default::default() };
    let gate = identity_gate(&b, 2, g);
    assert!(matches!(gate.forward(&b, &x, 3, &GateOptions::default()).err(), Some(Error::Precondition(_))));
    // S = min_capacity = 4 is fine: C = max(ceil(4 / 2 · 1), 4) = 4.
    let g = DeepSpeedGate { k: 1, min_capacity: 4, use_rts: false, ..Default::default() };
    let gate = identity_gate(&b, 2, g);
    let out = gate_forward(&b, &gate, 4, 2, vec![1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0], &GateOptions::default());
    assert_eq!(out.report(&b).unwrap().capacity, 4);
}

#[test]
fn rsample_has_no_effect_beyond_top1() {
    let b = be();
    // DeepSpeed passes noisy_gate_policy to top1gating only: a top-2 gate in training with
    // RSample routes exactly like one without a policy (same seed, so the same second-expert
    // Gumbel draws).
    let x: Vec<f32> = (0..24).map(|i| ((i * 7) % 11) as f32 * 0.3 - 1.5).collect();
    let opts = GateOptions { mode: Mode::Train, seed: 17, ..Default::default() };
    let mut outs = Vec::new();
    for policy in [None, Some(NoisyGatePolicy::RSample)] {
        let g = DeepSpeedGate { k: 2, min_capacity: 0, noisy_gate_policy: policy, ..Default::default() };
        let gate = identity_gate(&b, 4, g);
        let out = gate_forward(&b, &gate, 6, 4, x.clone(), &opts);
        outs.push((i32s(&b, &out.routes.experts), i32s(&b, &out.plan.slots), f32s(&b, &out.plan.weights)));
    }
    assert_eq!(outs[0], outs[1]);
    // For top-1 in training it does apply: logits + Gumbel pick the expert. With supplied
    // Gumbel noise that favours expert 2 by 100, every token goes to expert 2 while the
    // weight stays the clean softmax probability of expert 2.
    let g = DeepSpeedGate {
        k: 1,
        min_capacity: 0,
        noisy_gate_policy: Some(NoisyGatePolicy::RSample),
        use_rts: false,
        ..Default::default()
    };
    let gate = identity_gate(&b, 4, g);
    let gumbel = HostTensor::f32(&[6, 4], (0..24).map(|i| if i % 4 == 2 { 100.0 } else { 0.0 }).collect()).unwrap();
    let opts = GateOptions {
        mode: Mode::Train,
        noise: NoiseOverrides { gumbel: Some(gumbel), ..Default::default() },
        ..Default::default()
    };
    let out = gate_forward(&b, &gate, 6, 4, x.clone(), &opts);
    assert_eq!(i32s(&b, &out.routes.experts), vec![2; 6]);
    let w = f32s(&b, &out.routes.weights);
    for t in 0..6 {
        let p = softmax(&x[t * 4..t * 4 + 4].iter().map(|&v| v as f64).collect::<Vec<_>>());
        assert!(close(w[t], p[2]), "token {t}: {} vs {}", w[t], p[2]);
    }
}

#[test]
fn group_limited_sum_top2_with_one_expert_per_group_is_an_error() {
    let b = be();
    // 4 experts in 4 groups: the sum of a group's two largest scores does not exist (HF
    // DeepSeek-V3 fails in topk(2) over a group of 1). LayerSpec::validate rejects this, but
    // the public route op must not panic on it either.
    let l = up_f32(&b, &[1, 4], vec![0.0, 1.0, 2.0, 3.0]);
    let spec = RouteSpec {
        score: ScoreFn::Sigmoid,
        choice: Choice::GroupLimited { n_group: 4, topk_group: 2, group_score: GroupScore::SumTop2 },
        ..topk_spec(2)
    };
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| b.route(&l, &spec).err()));
    match r {
        Ok(Some(Error::Config { field, .. })) => assert_eq!(field, "n_group"),
        Ok(other) => panic!("expected a config error naming n_group, got {other:?}"),
        Err(_) => panic!("route panicked instead of returning an error"),
    }
}

#[test]
fn deepspeed_top2_choice_rejects_k_above_two() {
    let b = be();
    // DeepSpeed's top2gating makes exactly two choices; a third route has no meaning.
    let l = up_f32(&b, &[1, 4], vec![0.0, 1.0, 2.0, 3.0]);
    let spec = RouteSpec { k: 3, choice: Choice::DeepSpeedTop2, ..topk_spec(3) };
    match b.route(&l, &spec) {
        Err(Error::Config { field, .. }) => assert_eq!(field, "k"),
        Err(other) => panic!("expected a config error naming k, got {other}"),
        Ok(r) => panic!(
            "routed k = 3 with the top-2 rule: experts {:?}, weights {:?}",
            i32s(&b, &r.experts),
            f32s(&b, &r.weights)
        ),
    }
}

//! Properties of the layer forward on the cpu backend: agreement with a naive dense
//! reference, determinism, Philox noise behaviour, the DeepSpeed residual mix and the
//! dropped-token count of the report.

mod common;

use common::{ht, i32s, lcg, rel_l2, softmax};
use moe_cpu::CpuBackend;
use moe_engine::config::{DeepSpeedGate, ExpertSpec, GateSpec, LayerSpec, Mode, NoisyGatePolicy};
use moe_engine::layer::LayerOutput;
use moe_engine::philox::{self, streams, NoiseKind};
use moe_engine::weights::{HostLayerWeights, HostMlp};
use moe_engine::{Activation, DType, Device, ExpertKind, GateOptions, LayerOptions, MoeLayer};

fn be(threads: usize) -> CpuBackend {
    common::cpu(threads)
}

fn run(
    b: &CpuBackend,
    layer: &MoeLayer<CpuBackend>,
    s: usize,
    m: usize,
    x: &[f32],
    opts: &LayerOptions,
) -> LayerOutput<CpuBackend> {
    let xt = b.upload(&ht(&[s, m], x.to_vec())).unwrap();
    layer.forward(b, &xt, opts).expect("forward")
}

fn y_of(b: &CpuBackend, out: &LayerOutput<CpuBackend>) -> Vec<f32> {
    b.download(&out.y).unwrap().into_f32("y").unwrap()
}

/// `w [out, in] · x` in f64.
fn matvec(w: &[f32], x: &[f64], out: usize) -> Vec<f64> {
    common::matvec(w, None, x, out)
}

// ------------------------------------------------------------------------------ (a) dense reference

struct SwiGlu {
    m: usize,
    f: usize,
    e: usize,
    router: Vec<f32>, // [E, M]
    w_in: Vec<f32>,   // [E, 2F, M], gate rows first
    w_out: Vec<f32>,  // [E, M, F]
}

impl SwiGlu {
    fn new(m: usize, f: usize, e: usize, seed: u64) -> Self {
        SwiGlu {
            m,
            f,
            e,
            router: lcg(seed, e * m, 1.0),
            w_in: lcg(seed + 1, e * 2 * f * m, 0.4),
            w_out: lcg(seed + 2, e * m * f, 0.4),
        }
    }

    fn weights(&self) -> HostLayerWeights {
        let (m, f, e) = (self.m, self.f, self.e);
        HostLayerWeights {
            output_bias: None,
            router_bias: None,
            gate: ht(&[e, m], self.router.clone()),
            gate_bias: None,
            experts: HostMlp {
                w_in: ht(&[e, 2 * f, m], self.w_in.clone()),
                b_in: None,
                w_out: Some(ht(&[e, m, f], self.w_out.clone())),
                b_out: None,
            },
            residual: None,
            shared: None,
        }
    }

    /// Expert `x` on one token, by hand: down(silu(gate · t) ⊙ (up · t)).
    fn expert(&self, x: usize, t: &[f64]) -> Vec<f64> {
        let (m, f) = (self.m, self.f);
        let win = &self.w_in[x * 2 * f * m..(x + 1) * 2 * f * m];
        let g = matvec(&win[..f * m], t, f);
        let u = matvec(&win[f * m..], t, f);
        let h: Vec<f64> = g.iter().zip(&u).map(|(&a, &b)| a / (1.0 + (-a).exp()) * b).collect();
        matvec(&self.w_out[x * m * f..(x + 1) * m * f], &h, m)
    }

    /// The softmax top-k block: y = Σ over the k best experts of w · expert(x), with w the
    /// softmax probability, divided by the k probabilities' sum when `normalize`.
    fn reference(&self, x: &[f32], k: usize, normalize: bool) -> Vec<f64> {
        let m = self.m;
        let s = x.len() / m;
        let mut y = vec![0f64; s * m];
        for t in 0..s {
            let xt: Vec<f64> = x[t * m..(t + 1) * m].iter().map(|&v| v as f64).collect();
            let p = softmax(&matvec(&self.router, &xt, self.e));
            let mut idx: Vec<usize> = (0..self.e).collect();
            idx.sort_by(|&a, &b| p[b].partial_cmp(&p[a]).unwrap().then(a.cmp(&b)));
            let chosen = &idx[..k];
            let denom: f64 = if normalize { chosen.iter().map(|&x| p[x]).sum() } else { 1.0 };
            for &x in chosen {
                let o = self.expert(x, &xt);
                for c in 0..m {
                    y[t * m + c] += p[x] / denom * o[c];
                }
            }
        }
        y
    }

    fn spec(&self, k: usize, normalize: bool) -> LayerSpec {
        LayerSpec {
            output_bias: false,
            hidden: self.m,
            num_experts: self.e,
            gate: GateSpec::SoftmaxTopK { k, normalize },
            expert: ExpertSpec {
                kind: ExpertKind::Glu { activation: Activation::Silu, clamp: None },
                ffn: self.f,
                bias: false,
            },
            residual: false,
            shared: None,
        }
    }
}

#[test]
fn dropless_topk_matches_a_naive_dense_reference() {
    let (s, m, f, e) = (13, 24, 40, 6);
    let blk = SwiGlu::new(m, f, e, 42);
    let x = lcg(7, s * m, 1.0);
    for threads in [1, 3] {
        let b = be(threads);
        for (k, normalize) in [(3, true), (3, false), (e, true), (e, false), (1, false)] {
            let layer = MoeLayer::new(&b, blk.spec(k, normalize), &blk.weights(), DType::F32).unwrap();
            let out = run(&b, &layer, s, m, &x, &LayerOptions::default());
            let err = rel_l2(&y_of(&b, &out), &blk.reference(&x, k, normalize));
            assert!(err < 1e-5, "k = {k}, normalize = {normalize}, threads = {threads}: relative error {err}");
            // Dropless: every route kept.
            let r = out.report(&b).unwrap();
            assert_eq!((r.dropped_routes, r.dropped_tokens), (0, 0));
            assert_eq!(r.exp_counts.iter().sum::<i64>(), (s * k) as i64);
        }
    }
}

#[test]
fn batched_input_matches_flat_input() {
    // [B, T, M] input is the same tokens as [B·T, M] for a non-Switch gate.
    let (m, f, e) = (24, 40, 6);
    let blk = SwiGlu::new(m, f, e, 5);
    let b = be(1);
    let layer = MoeLayer::new(&b, blk.spec(2, true), &blk.weights(), DType::F32).unwrap();
    let x = lcg(8, 2 * 5 * m, 1.0);
    let flat = y_of(&b, &run(&b, &layer, 10, m, &x, &LayerOptions::default()));
    let xt = b.upload(&ht(&[2, 5, m], x.clone())).unwrap();
    let out = layer.forward(&b, &xt, &LayerOptions::default()).unwrap();
    assert_eq!(out.y.shape(), &[2, 5, m]);
    assert_eq!(y_of(&b, &out), flat);
    assert!(rel_l2(&flat, &blk.reference(&x, 2, true)) < 1e-5);
}

// ------------------------------------------------------------------------------ (b) determinism

fn linear_layer(e: usize, m: usize, gate: GateSpec, router: Vec<f32>, seed: u64) -> (LayerSpec, HostLayerWeights) {
    let spec = LayerSpec {
        output_bias: false,
        hidden: m,
        num_experts: e,
        gate,
        expert: ExpertSpec { kind: ExpertKind::Linear, ffn: 0, bias: false },
        residual: false,
        shared: None,
    };
    let w = HostLayerWeights {
        output_bias: None,
        router_bias: None,
        gate: ht(&[e, m], router),
        gate_bias: None,
        experts: HostMlp { w_in: ht(&[e, m, m], lcg(seed, e * m * m, 0.5)), b_in: None, w_out: None, b_out: None },
        residual: None,
        shared: None,
    };
    (spec, w)
}

#[test]
fn forward_is_bitwise_deterministic() {
    let (s, m, f, e) = (29, 24, 40, 6);
    let blk = SwiGlu::new(m, f, e, 11);
    let x = lcg(12, s * m, 1.0);
    for threads in [1, 4] {
        let b = be(threads);
        let layer = MoeLayer::new(&b, blk.spec(3, true), &blk.weights(), DType::F32).unwrap();
        let y1 = y_of(&b, &run(&b, &layer, s, m, &x, &LayerOptions::default()));
        let y2 = y_of(&b, &run(&b, &layer, s, m, &x, &LayerOptions::default()));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&y1), bits(&y2), "threads = {threads}");

        // A DeepSpeed top-2 gate with Gumbel second-expert sampling and drops, in training
        // with jitter: same seed, same bits.
        let g = DeepSpeedGate {
            k: 2,
            capacity_factor: 0.5,
            min_capacity: 0,
            noisy_gate_policy: Some(NoisyGatePolicy::Jitter),
            ..Default::default()
        };
        let (spec, w) = linear_layer(e, m, GateSpec::DeepSpeed(g), lcg(13, e * m, 1.0), 14);
        let layer = MoeLayer::new(&b, spec, &w, DType::F32).unwrap();
        let opts = LayerOptions {
            gate: GateOptions { mode: Mode::Train, seed: 1234, ..Default::default() },
            ..Default::default()
        };
        let o1 = run(&b, &layer, s, m, &x, &opts);
        let o2 = run(&b, &layer, s, m, &x, &opts);
        assert_eq!(bits(&y_of(&b, &o1)), bits(&y_of(&b, &o2)), "threads = {threads}");
        assert_eq!(i32s(&b, &o1.gate.plan.slots), i32s(&b, &o2.gate.plan.slots));
        assert!(o1.report(&b).unwrap().dropped_routes > 0, "the case should drop routes");
    }
}

// ------------------------------------------------------------------------------ (c) Philox noise

const NS: usize = 16; // tokens
const NM: usize = 4; // hidden
const NE: usize = 2; // experts

/// DeepSpeed top-1 with RTS and Jitter; the router sends every token to expert 0 by a wide
/// margin (logit gap ≥ 40 · 0.5, far beyond a ±1 % jitter), and C = ceil(16 / 2 · 0.25) = 2.
fn rts_layer(b: &CpuBackend) -> (MoeLayer<CpuBackend>, Vec<f32>, Vec<f32>) {
    let g = DeepSpeedGate {
        k: 1,
        capacity_factor: 0.25,
        eval_capacity_factor: 0.25,
        min_capacity: 0,
        noisy_gate_policy: Some(NoisyGatePolicy::Jitter),
        use_rts: true,
        ..Default::default()
    };
    let router = vec![5.0, 5.0, 5.0, 5.0, -5.0, -5.0, -5.0, -5.0];
    let (spec, w) = linear_layer(NE, NM, GateSpec::DeepSpeed(g), router.clone(), 21);
    let layer = MoeLayer::new(b, spec, &w, DType::F32).unwrap();
    // Positive inputs in [0.5, 1.5).
    let x: Vec<f32> = lcg(22, NS * NM, 0.5).into_iter().map(|v| v + 1.0).collect();
    (layer, x, router)
}

/// Tokens DeepSpeed RTS keeps: the C = 2 highest U(0, 1) priorities in expert 0's column
/// of the seed's draws (every token chose expert 0), in token order.
fn expected_kept(seed: u64) -> Vec<usize> {
    let u = philox::noise(NoiseKind::Uniform, seed, streams::RTS, NS * NE);
    let mut idx: Vec<usize> = (0..NS).collect();
    idx.sort_by(|&a, &b| u[b * NE].partial_cmp(&u[a * NE]).unwrap().then(a.cmp(&b)));
    let mut kept = idx[..2].to_vec();
    kept.sort_unstable();
    kept
}

fn kept_tokens(b: &CpuBackend, out: &LayerOutput<CpuBackend>) -> Vec<usize> {
    i32s(b, &out.gate.plan.slots).iter().enumerate().filter(|(_, &s)| s >= 0).map(|(t, _)| t).collect()
}

#[test]
fn philox_seed_drives_rts_and_jitter() {
    let b = be(1);
    let (layer, x, router) = rts_layer(&b);
    let train = |seed| LayerOptions {
        gate: GateOptions { mode: Mode::Train, seed, ..Default::default() },
        ..Default::default()
    };

    // Same seed: identical routing, slots, logits and output.
    let o1 = run(&b, &layer, NS, NM, &x, &train(5));
    let o2 = run(&b, &layer, NS, NM, &x, &train(5));
    assert_eq!(i32s(&b, &o1.gate.plan.slots), i32s(&b, &o2.gate.plan.slots));
    assert_eq!(b.download(&o1.gate.logits).unwrap(), b.download(&o2.gate.logits).unwrap());
    assert_eq!(y_of(&b, &o1), y_of(&b, &o2));
    assert_eq!(i32s(&b, &o1.gate.routes.experts), vec![0; NS]);

    let mut kept_sets = Vec::new();
    let mut logit_sets = Vec::new();
    for seed in 1..=6u64 {
        let out = run(&b, &layer, NS, NM, &x, &train(seed));
        // RTS: the kept tokens are the highest uniforms of this seed's RTS stream.
        let kept = kept_tokens(&b, &out);
        assert_eq!(kept, expected_kept(seed), "seed {seed}");
        // Jitter: logits = (x ⊙ J) · Wᵀ with J ~ U(0.99, 1.01) from the seed's JITTER stream.
        let j = philox::noise(NoiseKind::Jitter(0.01), seed, streams::JITTER, NS * NM);
        assert!(j.iter().all(|&v| (0.99..=1.01).contains(&v)));
        let logits = b.download(&out.gate.logits).unwrap().into_f32("logits").unwrap();
        for t in 0..NS {
            let xj: Vec<f64> = (0..NM).map(|c| x[t * NM + c] as f64 * j[t * NM + c] as f64).collect();
            let want = matvec(&router, &xj, NE);
            for e in 0..NE {
                let got = logits[t * NE + e] as f64;
                assert!((got - want[e]).abs() <= 1e-5 * want[e].abs(), "seed {seed} token {t}: {got} vs {}", want[e]);
            }
        }
        kept_sets.push(kept);
        logit_sets.push(logits);
    }
    // Different seeds draw different jitter (all six logit sets differ) and, here, pick
    // different tokens at least once.
    for i in 0..logit_sets.len() {
        for j in i + 1..logit_sets.len() {
            assert_ne!(logit_sets[i], logit_sets[j], "seeds {} and {} jittered alike", i + 1, j + 1);
        }
    }
    assert!(kept_sets.iter().any(|k| k != &kept_sets[0]), "every seed kept {:?}", kept_sets[0]);

    // Evaluation: no jitter (logits are x · Wᵀ whatever the seed) but DeepSpeed still
    // applies RTS, so the kept tokens follow the seed.
    let eval = |seed| LayerOptions {
        gate: GateOptions { mode: Mode::Eval, seed, ..Default::default() },
        ..Default::default()
    };
    let e1 = run(&b, &layer, NS, NM, &x, &eval(1));
    let e2 = run(&b, &layer, NS, NM, &x, &eval(2));
    assert_eq!(b.download(&e1.gate.logits).unwrap(), b.download(&e2.gate.logits).unwrap());
    assert_eq!(kept_tokens(&b, &e1), expected_kept(1));
    assert_eq!(kept_tokens(&b, &e2), expected_kept(2));
}

// ------------------------------------------------------------------------------ (d) residual mix

#[test]
fn residual_moe_mixes_by_the_coefficient_softmax() {
    // M = 2, E = 2, linear experts, identity router, DeepSpeed top-1 without RTS,
    // eval_capacity_factor 0.5 → C = ceil(3 / 2 · 0.5) = 1.
    //   W0 = [[2, 0], [0, 2]], W1 = [[0, 1], [1, 0]], mlp = [[1, 1], [0, 1]],
    //   coefficient W = I, b = [0.5, −0.5].
    let g = DeepSpeedGate { k: 1, eval_capacity_factor: 0.5, min_capacity: 0, use_rts: false, ..Default::default() };
    let spec = LayerSpec {
        output_bias: false,
        hidden: 2,
        num_experts: 2,
        gate: GateSpec::DeepSpeed(g),
        expert: ExpertSpec { kind: ExpertKind::Linear, ffn: 0, bias: false },
        residual: true,
        shared: None,
    };
    let w = HostLayerWeights {
        output_bias: None,
        router_bias: None,
        gate: ht(&[2, 2], vec![1.0, 0.0, 0.0, 1.0]),
        gate_bias: None,
        experts: HostMlp {
            w_in: ht(&[2, 2, 2], vec![2.0, 0.0, 0.0, 2.0, 0.0, 1.0, 1.0, 0.0]),
            b_in: None,
            w_out: None,
            b_out: None,
        },
        residual: Some((
            HostMlp { w_in: ht(&[1, 2, 2], vec![1.0, 1.0, 0.0, 1.0]), b_in: None, w_out: None, b_out: None },
            ht(&[2, 2], vec![1.0, 0.0, 0.0, 1.0]),
            ht(&[2], vec![0.5, -0.5]),
        )),
        shared: None,
    };
    let b = be(1);
    let layer = MoeLayer::new(&b, spec, &w, DType::F32).unwrap();
    let x = [1.0, 0.0, 0.0, 2.0, 2.0, 0.0];
    let out = run(&b, &layer, 3, 2, &x, &LayerOptions::default());
    let y = y_of(&b, &out);

    let sig = |z: f64| 1.0 / (1.0 + (-z).exp());
    // Token 0, x = [1, 0]: logits [1, 0] → expert 0 with p = σ(1); moe = p · [2, 0].
    //   mlp = [1, 0]; coefficient logits [1.5, −0.5] → c₀ = σ(2), c₁ = σ(−2).
    //   y = [2 σ(1) σ(2) + σ(−2), 0] ≈ [1.3380, 0].
    let y0 = [2.0 * sig(1.0) * sig(2.0) + sig(-2.0), 0.0];
    // Token 1, x = [0, 2]: logits [0, 2] → expert 1 with p = σ(2); moe = p · [2, 0].
    //   mlp = [2, 2]; coefficient logits [0.5, 1.5] → c₀ = σ(−1), c₁ = σ(1).
    //   y = [2 σ(2) σ(−1) + 2 σ(1), 2 σ(1)] ≈ [1.9367, 1.4621].
    let y1 = [2.0 * sig(2.0) * sig(-1.0) + 2.0 * sig(1.0), 2.0 * sig(1.0)];
    // Token 2, x = [2, 0]: expert 0 again, but C = 1 and token 0 holds the slot: dropped, so
    //   only the dense part remains: mlp = [2, 0], logits [2.5, −0.5] → c₁ = σ(−3).
    //   y = [2 σ(−3), 0] ≈ [0.0949, 0].
    let y2 = [2.0 * sig(-3.0), 0.0];
    let want: Vec<f64> = [y0, y1, y2].concat();
    for (i, (&got, &w)) in y.iter().zip(&want).enumerate() {
        assert!((got as f64 - w).abs() < 1e-6, "y[{i}] = {got}, want {w}");
    }
    let r = out.report(&b).unwrap();
    assert_eq!((r.capacity, r.dropped_routes, r.dropped_tokens), (1, 1, 1));
}

// ------------------------------------------------------------------------------ (e) dropped tokens

#[test]
fn report_counts_tokens_whose_every_route_dropped() {
    let (s, m, e) = (20, 8, 4);
    let b = be(2);
    // Router: feature 0 is a constant 3.0 and pushes every token's first choice to expert 0;
    // the rest of the logits are small and random, so second choices (Gumbel-sampled) spread.
    let mut router = lcg(31, e * m, 0.3);
    router[0] = 2.0;
    for x in 1..e {
        router[x * m] = 0.0;
    }
    let g = DeepSpeedGate { k: 2, eval_capacity_factor: 0.5, min_capacity: 0, ..Default::default() };
    let (spec, w) = linear_layer(e, m, GateSpec::DeepSpeed(g), router, 32);
    let layer = MoeLayer::new(&b, spec, &w, DType::F32).unwrap();
    let mut x = lcg(33, s * m, 1.0);
    for t in 0..s {
        x[t * m] = 3.0;
    }
    let out = run(
        &b,
        &layer,
        s,
        m,
        &x,
        &LayerOptions { gate: GateOptions { seed: 9, ..Default::default() }, ..Default::default() },
    );
    let ex = i32s(&b, &out.gate.routes.experts);

    // The DeepSpeed top-2 rule by hand: C = ceil(20 / 4 · 0.5 · 2) = 5; first choices take
    // locations by cumsum in token order, second choices start after all first choices of
    // their expert; a route is dropped when its location is ≥ C.
    let c = 5;
    let mut first = vec![0usize; e];
    let mut loc = vec![0usize; s * 2];
    for t in 0..s {
        let x0 = ex[t * 2] as usize;
        loc[t * 2] = first[x0];
        first[x0] += 1;
    }
    let mut second = first.clone();
    for t in 0..s {
        let x1 = ex[t * 2 + 1] as usize;
        loc[t * 2 + 1] = second[x1];
        second[x1] += 1;
    }
    let dropped_routes = loc.iter().filter(|&&l| l >= c).count() as i64;
    let dropped: Vec<usize> = (0..s).filter(|&t| loc[t * 2] >= c && loc[t * 2 + 1] >= c).collect();

    let r = out.report(&b).unwrap();
    assert_eq!(r.capacity, c as i64);
    assert_eq!(r.dropped_routes, dropped_routes);
    assert_eq!(r.dropped_tokens, dropped.len() as i64);
    assert!(!dropped.is_empty(), "the case should drop whole tokens (choices {ex:?})");
    // The plan agrees route by route, and a dropped token's output is exactly 0.
    let rows = i32s(&b, &out.gate.plan.rows);
    let y = y_of(&b, &out);
    for t in 0..s {
        for j in 0..2 {
            assert_eq!(rows[t * 2 + j] < 0, loc[t * 2 + j] >= c, "token {t} route {j}");
        }
        let zero = y[t * m..(t + 1) * m].iter().all(|&v| v == 0.0);
        assert_eq!(zero, dropped.contains(&t), "token {t}");
    }

    // Top-1 with a used_token mask: masked tokens are neither routed nor counted as dropped.
    // 8 tokens all on expert 0, C = ceil(8 / 2 · 0.5) = 2, tokens 0 and 3 masked: tokens 1
    // and 2 are kept, tokens 4..7 dropped → 4 dropped tokens, 2 masked routes.
    let g = DeepSpeedGate { k: 1, eval_capacity_factor: 0.5, min_capacity: 0, use_rts: false, ..Default::default() };
    let (spec, w) = linear_layer(2, 2, GateSpec::DeepSpeed(g), vec![1.0, 0.0, 0.0, 1.0], 34);
    let layer = MoeLayer::new(&b, spec, &w, DType::F32).unwrap();
    let x: Vec<f32> = (0..8).flat_map(|t| [1.0 + t as f32, 0.0]).collect();
    let used = ht(&[8], vec![0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0]);
    let out = run(
        &b,
        &layer,
        8,
        2,
        &x,
        &LayerOptions { gate: GateOptions { used_token: Some(used), ..Default::default() }, ..Default::default() },
    );
    let r = out.report(&b).unwrap();
    assert_eq!((r.masked_routes, r.dropped_routes, r.dropped_tokens), (2, 4, 4));
    let y = y_of(&b, &out);
    for t in 0..8 {
        let zero = y[t * 2..t * 2 + 2].iter().all(|&v| v == 0.0);
        assert_eq!(zero, ![1, 2].contains(&t), "token {t}: {:?}", &y[t * 2..t * 2 + 2]);
    }
}

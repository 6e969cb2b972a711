//! The backward pass: a reference gradient off by 1% fails its case, a backward is
//! bitwise repeatable, an expert that got no token has zero gradients, and the backward
//! refuses what it cannot differentiate (a forward that kept nothing, a misshaped dy)
//! with errors naming it. The golden gradients themselves run in golden_cpu.rs /
//! wgpu_backend.rs / expert_parallel.rs through `golden::run_case`.

mod common;

use common::{tmp_dir, Entry};
use moe_cpu::CpuBackend;
use moe_engine::config::{ExpertSpec, GateSpec, LayerSpec, Mode};
use moe_engine::{golden, stack, Activation, Backend, BackwardOptions, Device, ExpertKind, HostTensor, LayerOptions};
use moe_engine::{ErrorKind, MoeLayer};

/// Copies a golden case to a temp folder with tensor `key` multiplied by `factor`.
fn perturbed_copy(case: &str, key: &str, factor: f32, name: &str) -> std::path::PathBuf {
    let src = common::golden_dir().join(case);
    let dst = tmp_dir("backward", name);
    std::fs::copy(src.join("case.json"), dst.join("case.json")).unwrap();
    let bytes = std::fs::read(src.join("tensors.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut entries = Vec::new();
    let mut found = false;
    for (n, view) in st.tensors() {
        let mut data = view.data().to_vec();
        if n == key {
            assert_eq!(view.dtype(), safetensors::Dtype::F32);
            data = data
                .chunks_exact(4)
                .flat_map(|c| (f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * factor).to_le_bytes())
                .collect();
            found = true;
        }
        entries.push(Entry { name: n, dtype: view.dtype(), shape: view.shape().to_vec(), bytes: data });
    }
    assert!(found, "{case} has no tensor {key}");
    common::write_st(&dst.join("tensors.safetensors"), &entries);
    dst
}

#[test]
fn a_reference_gradient_changed_by_one_percent_fails_its_case() {
    let b = common::cpu(2);
    // Unchanged, the copy passes: the perturbation alone makes the failure.
    let same = perturbed_copy("22_hf_mixtral", "grad/input/x", 1.0, "unchanged");
    assert!(golden::run_case(&b, &same).unwrap().pass);
    for (case, key) in [
        ("22_hf_mixtral", "grad/input/x"),
        ("22_hf_mixtral", "grad/param/experts.5.w3.weight"),
        ("19_ds_moe_top2_residual", "grad/param/coefficient.weight"),
        ("19_ds_moe_top2_residual", "grad/param/deepspeed_moe.gate.wg.weight"),
        ("26_hf_deepseek_v3_grouped", "grad/param/shared_experts.down_proj.weight"),
    ] {
        let dir = perturbed_copy(case, key, 1.01, &key.replace('/', "_"));
        let r = golden::run_case(&b, &dir).unwrap();
        assert!(!r.pass, "{case} passed with {key} changed by 1%");
        let failed: Vec<&str> = r.outputs.iter().filter(|o| !o.pass).map(|o| o.name.as_str()).collect();
        assert_eq!(failed.len(), 1, "{case}: only the changed gradient fails, got {failed:?}");
        assert!(r.outputs.iter().all(|o| o.pass || o.backward), "{case}: forward outputs still pass");
    }
}

/// A small Mixtral-like layer whose router never picks expert `cold`.
fn layer_with_a_cold_expert(b: &CpuBackend, cold: usize) -> (MoeLayer<CpuBackend>, HostTensor) {
    let spec = LayerSpec {
        output_bias: false,
        hidden: 16,
        num_experts: 6,
        gate: GateSpec::SoftmaxTopK { k: 2, normalize: true },
        expert: ExpertSpec {
            kind: ExpertKind::Glu { activation: Activation::Silu, clamp: None },
            ffn: 20,
            bias: false,
        },
        residual: false,
        shared: None,
    };
    let mut w = stack::random_weights(&spec, 3).unwrap();
    // Inputs are positive, so a strongly negative router row is never in the top 2.
    let mut g = w.gate.as_f32("gate").unwrap().to_vec();
    g[cold * 16..(cold + 1) * 16].iter_mut().for_each(|v| *v = -50.0);
    w.gate = HostTensor::f32(&[6, 16], g).unwrap();
    let x = HostTensor::f32(&[30, 16], common::lcg(9, 30 * 16, 1.0).iter().map(|v| v.abs() + 0.1).collect()).unwrap();
    (MoeLayer::new_trainable(b, spec, &w).unwrap(), x)
}

#[test]
fn an_expert_with_no_token_gets_zero_gradients_and_the_backward_repeats_bitwise() {
    let b = common::cpu(2);
    let cold = 4;
    let (layer, x) = layer_with_a_cold_expert(&b, cold);
    let dy = b.upload(&HostTensor::f32(&[30, 16], common::lcg(10, 30 * 16, 1.0)).unwrap()).unwrap();
    let opts = LayerOptions { keep_activations: true, ..LayerOptions::mode(Mode::Eval) };
    let run = || {
        let out = layer.forward(&b, &b.upload(&x).unwrap(), &opts).unwrap();
        assert_eq!(out.report(&b).unwrap().exp_counts[cold], 0, "the cold expert got no route");
        let g = layer.backward(&b, &out, &dy, &BackwardOptions::default()).unwrap();
        let mut all = vec![("dx".to_string(), b.download(&g.dx).unwrap())];
        all.extend(g.into_named().into_iter().map(|(n, t)| (n, b.download(&t).unwrap())));
        all
    };
    let (first, second) = (run(), run());
    for ((name, a), (_, c)) in first.iter().zip(&second) {
        let bits = |t: &HostTensor| t.as_f32("g").unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(a), bits(c), "{name} differs between two identical backward passes");
        if name.starts_with("experts.") {
            let v = a.as_f32(name).unwrap();
            let per = v.len() / 6;
            assert!(v[cold * per..(cold + 1) * per].iter().all(|&g| g == 0.0), "{name} of the cold expert");
            assert!(v.iter().any(|&g| g != 0.0), "{name} of the other experts");
        }
    }
}

#[test]
fn the_backward_refuses_what_it_cannot_differentiate() {
    let b = common::cpu(1);
    let (layer, x) = layer_with_a_cold_expert(&b, 0);
    let xt = b.upload(&x).unwrap();
    let dy = b.upload(&HostTensor::f32(&[30, 16], vec![0.5; 480]).unwrap()).unwrap();
    // A forward that kept no activations.
    let out = layer.forward(&b, &xt, &LayerOptions::mode(Mode::Eval)).unwrap();
    let e = layer.backward(&b, &out, &dy, &BackwardOptions::default()).err().expect("needs activations");
    assert!(e.to_string().contains("keep_activations"), "{e}");
    // dy of another shape.
    let opts = LayerOptions { keep_activations: true, ..LayerOptions::mode(Mode::Eval) };
    let out = layer.forward(&b, &xt, &opts).unwrap();
    let bad = b.upload(&HostTensor::f32(&[29, 16], vec![0.5; 464]).unwrap()).unwrap();
    let e = layer.backward(&b, &out, &bad, &BackwardOptions::default()).err().expect("misshaped dy");
    assert_eq!(e.kind(), ErrorKind::BadInput, "{e}");
    assert!(e.to_string().contains("dy"), "{e}");
    // A loss coefficient that is not a number.
    let nan = moe_engine::losses::LossCoefs { l_aux: f64::NAN, ..Default::default() };
    let e = layer.backward(&b, &out, &dy, &BackwardOptions { losses: nan }).err().expect("NaN coefficient");
    assert!(e.to_string().contains("aux_coef"), "{e}");
}

#[test]
fn backward_ops_name_the_operand_they_refuse() {
    let b = common::cpu(1);
    let t = |shape: &[usize]| b.upload(&HostTensor::f32(shape, vec![0.1; shape.iter().product()]).unwrap()).unwrap();
    let msg = |r: moe_engine::Result<moe_engine::Tensor<CpuBackend>>| r.expect_err("refused").to_string();
    assert!(msg(b.linear_dx(&t(&[3, 4]), &t(&[5, 6]), None)).contains("weight"));
    let e = b.weight_grad(&t(&[3, 4]), &t(&[2, 6]), None, false).err().expect("rows differ").to_string();
    assert!(e.contains("forward input"), "{e}");
    let glu = moe_engine::ops::ActGradKind::Glu(Activation::Silu);
    assert!(msg(b.act_grad(glu, &t(&[3, 4]), &t(&[3, 7]))).contains("pre-activation"));
    let e = b.mix_grad(&t(&[3, 4]), &t(&[3, 4]), &t(&[3, 4]), &t(&[3, 3])).err().expect("coef").to_string();
    assert!(e.contains("coefficient"), "{e}");
    let e = b.gated_add_grad(&t(&[3, 4]), &t(&[3, 5]), &t(&[3, 1])).err().expect("shared").to_string();
    assert!(e.contains("shared expert output"), "{e}");
    let rule = moe_engine::ops::StepRule {
        kind: moe_engine::ops::StepKind::Adam,
        lr: 1e-3,
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
    let e = b.optim_step(&t(&[4]), &t(&[4]), None, None, rule).err().expect("no moments").to_string();
    assert!(e.contains("moment"), "{e}");
    let e = b.optim_step(&t(&[4]), &t(&[5]), Some(&t(&[4])), Some(&t(&[4])), rule).err().expect("grad").to_string();
    assert!(e.contains("gradient"), "{e}");
    let bad = moe_engine::ops::StepRule { beta1: 1.0, ..rule };
    let e = b.optim_step(&t(&[4]), &t(&[4]), Some(&t(&[4])), Some(&t(&[4])), bad).err().expect("beta").to_string();
    assert!(e.contains("betas[0]"), "{e}");
}

/// `Σ y · dy + z_coef · z_loss + balance_coef · expert_balance` of a forward, in f64.
fn objective(
    b: &CpuBackend,
    spec: &LayerSpec,
    w: &moe_engine::weights::HostLayerWeights,
    x: &HostTensor,
    dy: &[f32],
    coefs: (f64, f64),
) -> (f64, Vec<i64>) {
    let layer = MoeLayer::new_trainable(b, spec.clone(), w).unwrap();
    let out = layer.forward(b, &b.upload(x).unwrap(), &LayerOptions::mode(Mode::Eval)).unwrap();
    let y = b.download(&out.y).unwrap();
    let dot: f64 = y.as_f32("y").unwrap().iter().zip(dy).map(|(a, c)| *a as f64 * *c as f64).sum();
    let rep = out.report(b).unwrap();
    (dot + coefs.0 * rep.losses.z_loss + coefs.1 * rep.losses.expert_balance, rep.exp_counts)
}

#[test]
fn the_z_loss_and_the_expert_balance_loss_match_finite_differences() {
    // The golden cases weight DeepSpeed's l_aux (and the traces the HF load-balancing
    // loss); these two have no reference run, so central differences of the objective
    // in the router weight check their gradients.
    let b = common::cpu(1);
    let spec = LayerSpec {
        output_bias: false,
        hidden: 8,
        num_experts: 4,
        gate: GateSpec::SoftmaxTopK { k: 2, normalize: false },
        expert: ExpertSpec { kind: ExpertKind::Mlp { activation: Activation::Gelu }, ffn: 12, bias: true },
        residual: false,
        shared: None,
    };
    let w = stack::random_weights(&spec, 11).unwrap();
    let x = HostTensor::f32(&[16, 8], common::lcg(12, 128, 1.0)).unwrap();
    let dy = common::lcg(13, 128, 1.0);
    let coefs = (0.3, 0.7);
    let layer = MoeLayer::new_trainable(&b, spec.clone(), &w).unwrap();
    let opts = LayerOptions { keep_activations: true, ..LayerOptions::mode(Mode::Eval) };
    let out = layer.forward(&b, &b.upload(&x).unwrap(), &opts).unwrap();
    let losses = moe_engine::losses::LossCoefs { z_loss: coefs.0, expert_balance: coefs.1, ..Default::default() };
    let g = layer
        .backward(
            &b,
            &out,
            &b.upload(&HostTensor::f32(&[16, 8], dy.clone()).unwrap()).unwrap(),
            &BackwardOptions { losses },
        )
        .unwrap();
    let analytic = b.download(&g.gate).unwrap().to_f64();
    let (_, counts) = objective(&b, &spec, &w, &x, &dy, coefs);
    let h = 1e-2f32;
    let mut numeric = Vec::new();
    for i in 0..32 {
        let at = |d: f32| {
            let mut w2 = w.clone();
            let mut v = w2.gate.as_f32("gate").unwrap().to_vec();
            v[i] += d;
            w2.gate = HostTensor::f32(&[4, 8], v).unwrap();
            let (j, c) = objective(&b, &spec, &w2, &x, &dy, coefs);
            assert_eq!(c, counts, "element {i}: the step changed the routing; use a smaller step");
            j
        };
        numeric.push((at(h) - at(-h)) / (2.0 * h as f64));
    }
    let err = golden::rel_l2(&analytic[..32], &numeric);
    assert!(err < 2e-2, "router weight gradient vs central differences: rel L2 {err:.2e}");
}

#[test]
fn an_optimizer_step_in_place_equals_the_step_into_new_tensors_and_spares_shared_buffers() {
    let b = common::cpu(2);
    let up = |seed, scale| b.upload(&HostTensor::f32(&[70_001], common::lcg(seed, 70_001, scale)).unwrap()).unwrap();
    let bits = |t: &moe_engine::Tensor<CpuBackend>| {
        b.download(t).unwrap().as_f32("t").unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    };
    for kind in [moe_engine::ops::StepKind::Adam, moe_engine::ops::StepKind::AdamW, moe_engine::ops::StepKind::Sgd] {
        let rule = moe_engine::ops::StepRule {
            kind,
            lr: 1e-2,
            weight_decay: 0.1,
            momentum: 0.9,
            dampening: 0.0,
            nesterov: false,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            step: 3,
            grad_scale: 0.5,
        };
        let (p, g, m) = (up(1, 1.0), up(2, 0.1), up(3, 0.01));
        let v = b.scale(&b.mul(&m, &m).unwrap(), 4.0).unwrap();
        let v_in = rule.has_v().then(|| v.clone());
        let want = b.optim_step(&p, &g, Some(&m), v_in.as_ref(), rule).unwrap();
        // Fresh copies the optimizer alone holds: updated in place.
        let copy = |t: &moe_engine::Tensor<CpuBackend>| b.upload(&b.download(t).unwrap()).unwrap();
        let (mut p2, mut m2, mut v2) = (copy(&p), Some(copy(&m)), v_in.as_ref().map(copy));
        b.optim_step_in_place(&mut p2, &g, &mut m2, &mut v2, rule).unwrap();
        assert_eq!(bits(&p2), bits(&want.param), "{kind:?} parameter");
        assert_eq!(bits(m2.as_ref().unwrap()), bits(want.m.as_ref().unwrap()), "{kind:?} first moment");
        // A parameter another handle shares is replaced, not written: the other keeps its values.
        let before = bits(&p);
        let (mut p3, mut m3, mut v3) = (p.clone(), Some(copy(&m)), v_in.as_ref().map(copy));
        b.optim_step_in_place(&mut p3, &g, &mut m3, &mut v3, rule).unwrap();
        assert_eq!(bits(&p3), bits(&want.param), "{kind:?} shared parameter, stepped");
        assert_eq!(bits(&p), before, "{kind:?}: the other handle saw the step");
    }
}

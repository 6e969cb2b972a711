//! Mixed-precision training on the cpu and on wgpu (lavapipe in CI): golden training traces replayed with
//! the MLP weights in bf16 and in f16 (f16 with DeepSpeed's dynamic loss scaling), f32
//! master weights and optimizer state; the losses stay within the half-precision
//! tolerances of the f32 run; the compute copies are `cast_weight` of the masters; and an
//! injected overflow (an infinity in the loss gradient) skips the step, leaving every
//! parameter, master and state tensor bitwise as it was while the scaler follows
//! DeepSpeed's rules. Each runs on the cpu (half weights widened in its kernels) and on
//! wgpu: without an adapter the wgpu half says so and returns, and with `CI=true` a
//! missing adapter fails.

mod common;

use moe_engine::golden::{self, Trace};
use moe_engine::import::{save_safetensors, Checkpoint};
use moe_engine::layer::BackwardOptions;
use moe_engine::train::{state_path, CheckpointNames, LossScaler, Optimizer, Precision};
use moe_engine::{Backend, DType, Device, Error, HostTensor, MoeLayer};
use serde_json::json;

fn trace(name: &str) -> Trace {
    Trace::load(&common::golden_dir().join(name)).expect("trace")
}

/// The precision a DeepSpeed config with this section trains in.
fn precision(section: serde_json::Value) -> Precision {
    Precision::from_deepspeed_config(&section).expect("precision")
}

fn fp16() -> Precision {
    precision(json!({"fp16": {"enabled": true, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
        "hysteresis": 2, "consecutive_hysteresis": false, "min_loss_scale": 1}}))
}

fn bf16() -> Precision {
    precision(json!({"bf16": {"enabled": true}}))
}

/// The trace's layer in `p`'s precision and its optimizer with `p`'s loss scaler.
fn mixed<B: Backend>(b: &B, tr: &Trace, p: &Precision) -> (MoeLayer<B>, Optimizer<B>) {
    let (spec, w) = tr.import(&mut tr.params()).expect("import");
    let mut layer = MoeLayer::new_mixed(b, spec, &w, p.dtype).expect("mixed layer");
    let mut opt = tr.optimizer(&mut layer).expect("optimizer");
    opt.set_loss_scaler(p.scaler.clone());
    (layer, opt)
}

/// The losses of `steps` steps, and the layer and optimizer after them.
fn run<B: Backend>(b: &B, tr: &Trace, p: &Precision, steps: usize) -> (Vec<f64>, MoeLayer<B>, Optimizer<B>) {
    let (mut layer, mut opt) = mixed(b, tr, p);
    let mut losses = Vec::new();
    for t in 0..steps {
        let (rec, rep) = tr.step_reported(b, &mut layer, &mut opt, t).expect("step");
        assert!(!rep.skipped, "{} {} step {t} skipped at scale {}", tr.name, p.dtype, rep.loss_scale);
        assert_eq!(rep.loss_scale, if p.dtype == DType::F16 { 65536.0 } else { 1.0 });
        losses.push(rec.loss);
    }
    (losses, layer, opt)
}

fn bits(h: &HostTensor) -> Vec<u32> {
    h.as_f32("t").expect("f32").iter().map(|v| v.to_bits()).collect()
}

/// Every parameter, master and state tensor of the layer and optimizer, downloaded.
fn snapshot<B: Backend>(b: &B, layer: &mut MoeLayer<B>, opt: &Optimizer<B>) -> Vec<(String, Vec<u32>)> {
    let mut out = Vec::new();
    for p in layer.params_mut() {
        out.push((p.name.clone(), bits(&b.download(p.tensor).expect("param"))));
        if let Some(m) = opt.master(&p.name) {
            out.push((format!("{}.master", p.name), bits(&b.download(m).expect("master"))));
        }
        let st = opt.state(&p.name).expect("state");
        for (what, t) in [("m", st.m), ("v", st.v)] {
            if let Some(t) = t {
                out.push((format!("{}.{what}", p.name), bits(&b.download(t).expect("state"))));
            }
        }
    }
    out
}

/// Checks that every half-precision parameter has an f32 master whose cast is the
/// compute copy, bit for bit, and that the rest (router, coefficient, biases) are f32.
fn masters_are_f32<B: Backend>(b: &B, layer: &mut MoeLayer<B>, opt: &Optimizer<B>, dtype: DType) {
    let dtypes: Vec<(String, DType)> = opt.param_dtypes().map(|(n, d)| (n.to_string(), d)).collect();
    let mut halves = 0;
    for p in layer.params_mut() {
        let (_, want) = dtypes.iter().find(|(n, _)| *n == p.name).expect("known parameter");
        assert_eq!(p.tensor.dtype(), *want, "{}", p.name);
        let weight = p.name.ends_with(".w_in") || p.name.ends_with(".w_out");
        if !weight {
            assert_eq!(p.tensor.dtype(), DType::F32, "{} stays f32", p.name);
            assert!(opt.master(&p.name).is_none(), "{}: an f32 parameter is its own master", p.name);
            continue;
        }
        halves += 1;
        assert_eq!(p.tensor.dtype(), dtype, "{} computes in {dtype}", p.name);
        let master = opt.master(&p.name).unwrap_or_else(|| panic!("{} has no master", p.name));
        assert_eq!((master.dtype(), master.shape()), (DType::F32, p.tensor.shape()), "{} master", p.name);
        let st = opt.state(&p.name).expect("state");
        for t in [st.m, st.v].into_iter().flatten() {
            assert_eq!(t.dtype(), DType::F32, "{} state", p.name);
        }
        let m = b.download(master).expect("master");
        let rounded = HostTensor::f32(
            m.shape(),
            dtype.from_half_bits(&dtype.half_bits(m.as_f32("m").unwrap()).unwrap()).unwrap(),
        )
        .unwrap();
        assert_eq!(bits(&b.download(p.tensor).expect("compute")), bits(&rounded), "{}: compute = cast(master)", p.name);
    }
    assert!(halves >= 2, "the layer has half-precision weights");
}

/// ‖a − r‖ / ‖r‖.
fn rel(a: &[f64], r: &[f64]) -> f64 {
    golden::rel_l2(a, r)
}

/// bf16 and f16 (dynamic loss scaling at 2^16) runs of a DeepSpeed trace (residual MoE,
/// Adam) and an HF trace (Mixtral GLU experts with the load-balancing loss, AdamW)
/// against the f32 run of the same trace on the same backend.
///
/// The bounds are the parity harness's half-precision product tolerances
/// (`parity::cases::product_tolerance`: 1e-2 for bf16, 2e-3 for f16), the relative L2 of
/// an MLP's output when every product input is rounded to the type (unit roundoff u =
/// 2⁻⁸ or 2⁻¹¹, about u/√3 per rounded input, two products). On wgpu only the weights
/// are rounded (it multiplies f32 activations by the stored halves), a subset of those
/// roundings; the cpu rounds bf16 products' activations too (as PyTorch's bf16 models
/// do), which is the bound's own case, and f16 ones like wgpu; the squared error `mean((y − t)²)` turns a relative output error ε into a
/// loss error of at most 2ε‖y‖/‖y − t‖, and the traces' targets keep ‖y − t‖ of the
/// order of ‖y‖; the masters follow the f32 trajectory (they start from the f32 weights
/// and take f32 steps), so the rounding does not accumulate over the steps. On lavapipe
/// the losses land 15 to 30 times inside the bounds (bf16 3e-4 to 6e-4, f16 2e-5 to
/// 7e-5); the f32 run itself matches the reference to 1e-5 (tests/training.rs), so the
/// bounds measure the half precision alone. The final masters are held to the same bounds
/// against the f32 run's final parameters.
#[test]
fn half_precision_training_stays_within_the_half_tolerances_of_f32() {
    half_precision_training_stays_within_the_half_tolerances_of_f32_on(common::cpu(2));
    if let Some(b) = common::wgpu("half_precision_training_stays_within_the_half_tolerances_of_f32") {
        half_precision_training_stays_within_the_half_tolerances_of_f32_on(b);
    }
}

fn half_precision_training_stays_within_the_half_tolerances_of_f32_on<B: Backend>(b: B) {
    for name in ["t01_ds_top2_residual_adam", "t05_hf_mixtral_aux_adamw"] {
        let tr = trace(name);
        let steps = tr.steps();
        let f32_precision = Precision { dtype: DType::F32, scaler: None };
        let (reference, mut ref_layer, _) = run(&b, &tr, &f32_precision, steps);
        let ref_params: Vec<(String, Vec<f64>)> = ref_layer
            .params_mut()
            .into_iter()
            .map(|p| (p.name.clone(), b.download(p.tensor).unwrap().to_f64()))
            .collect();
        let want = tr.tensor(&tr.meta.expected.loss).unwrap().to_f64();
        assert!(rel(&reference, &want) <= 1e-5, "{name}: the f32 run is off the trace");
        for (p, tol) in [(bf16(), 1e-2), (fp16(), 2e-3)] {
            let (losses, mut layer, opt) = run(&b, &tr, &p, steps);
            let e = rel(&losses, &reference);
            eprintln!("{name} {}: losses rel L2 {e:.2e} from f32 (bound {tol:.0e})", p.dtype);
            assert!(e <= tol, "{name} {}: losses {losses:?} against f32 {reference:?}: rel L2 {e:.2e}", p.dtype);
            assert!(e > 0.0, "{name} {}: the half-precision run is the f32 run", p.dtype);
            masters_are_f32(&b, &mut layer, &opt, p.dtype);
            assert_eq!(layer.compute_dtype(), p.dtype);
            // The masters (and the f32 parameters) end where the f32 run's parameters do.
            for q in layer.params_mut() {
                let have = b.download(opt.master(&q.name).unwrap_or(q.tensor)).unwrap().to_f64();
                let (_, want) = ref_params.iter().find(|(n, _)| *n == q.name).unwrap();
                let e = rel(&have, want);
                assert!(e <= tol, "{name} {}: final {} rel L2 {e:.2e} from f32", p.dtype, q.name);
            }
            for g in opt.groups() {
                assert_eq!(g.step(), steps as u64, "{name} {} group {}", p.dtype, g.name());
            }
        }
    }
}

/// The forward of step `t` and the gradient of the trace's loss, with an infinity at
/// `bad` when given, multiplied by the optimizer's loss scale; then the step.
fn step_with_dy<B: Backend>(
    b: &B,
    tr: &Trace,
    layer: &mut MoeLayer<B>,
    opt: &mut Optimizer<B>,
    t: usize,
    bad: Option<usize>,
) -> moe_engine::Result<moe_engine::train::StepReport> {
    let x = tr.tensor(&tr.meta.train.inputs.x)?;
    let per: usize = x.shape()[1..].iter().product();
    let xt = HostTensor::f32(&x.shape()[1..], x.as_f32("x")?[t * per..(t + 1) * per].to_vec())?;
    let out = layer.forward(b, &b.upload(&xt)?, &tr.options(t)?)?;
    let mut dy = common::lcg(t as u64, out.y.numel(), 1e-2);
    if let Some(i) = bad {
        dy[i] = f32::INFINITY;
    }
    let dy = b.scale(&b.upload(&HostTensor::f32(out.y.shape(), dy)?)?, opt.loss_scale() as f32)?;
    let grads = layer.backward(b, &out, &dy, &BackwardOptions::default())?;
    drop(out);
    opt.step(b, layer, grads)
}

/// An infinity in dy overflows the gradients: the step is skipped and reported, every
/// parameter (compute copies included), master and state tensor is bitwise unchanged, the
/// step counts stay, and the scaler follows DeepSpeed: the first overflow uses up the
/// hysteresis (scale kept), the second halves the scale; a clean step then goes on at the
/// new scale. bf16 (no loss scaling) skips the same way with its scale fixed at 1.
#[test]
fn an_overflow_skips_the_step_and_leaves_everything_bitwise_unchanged() {
    an_overflow_skips_the_step_and_leaves_everything_bitwise_unchanged_on(common::cpu(2));
    if let Some(b) = common::wgpu("an_overflow_skips_the_step_and_leaves_everything_bitwise_unchanged") {
        an_overflow_skips_the_step_and_leaves_everything_bitwise_unchanged_on(b);
    }
}

fn an_overflow_skips_the_step_and_leaves_everything_bitwise_unchanged_on<B: Backend>(b: B) {
    let tr = trace("t01_ds_top2_residual_adam");
    for p in [fp16(), bf16()] {
        let (mut layer, mut opt) = mixed(&b, &tr, &p);
        for t in 0..2 {
            assert!(!step_with_dy(&b, &tr, &mut layer, &mut opt, t, None).unwrap().skipped);
        }
        let steps: Vec<u64> = opt.groups().iter().map(|g| g.step()).collect();
        let before = snapshot(&b, &mut layer, &opt);
        let scale = opt.loss_scale();
        for (round, want_scale, want_hysteresis) in [(0, scale, 1), (1, scale / 2.0, 1)] {
            let rep = step_with_dy(&b, &tr, &mut layer, &mut opt, 2, Some(5 + round)).unwrap();
            assert!(rep.skipped, "{} overflow {round} was stepped", p.dtype);
            assert_eq!(rep.grad_norm, Some(f64::INFINITY));
            assert_eq!(rep.loss_scale, scale, "the skipped step's gradients carried the old scale");
            assert_eq!(snapshot(&b, &mut layer, &opt), before, "{} overflow {round} changed the layer", p.dtype);
            assert_eq!(opt.groups().iter().map(|g| g.step()).collect::<Vec<_>>(), steps);
            match opt.loss_scaler() {
                Some(LossScaler::Dynamic(d)) => {
                    assert_eq!((d.loss_scale(), d.hysteresis()), (want_scale, want_hysteresis), "overflow {round}");
                    assert_eq!(d.last_overflow_iteration(), 2 + round as i64);
                }
                Some(LossScaler::Static(s)) => assert_eq!((*s, opt.loss_scale()), (1.0, 1.0)),
                None => panic!("no scaler"),
            }
        }
        let rep = step_with_dy(&b, &tr, &mut layer, &mut opt, 3, None).unwrap();
        assert!(!rep.skipped);
        assert_eq!(rep.loss_scale, if p.dtype == DType::F16 { scale / 2.0 } else { 1.0 });
        assert_ne!(snapshot(&b, &mut layer, &opt), before, "the clean step stepped");
        masters_are_f32(&b, &mut layer, &opt, p.dtype);
    }
    // Without a loss scaler, non-finite gradients are an error (with clipping, which
    // measures the norm), and nothing is stepped either.
    let (mut layer, mut opt) = mixed(&b, &tr, &Precision { dtype: DType::BF16, scaler: None });
    opt.set_gradient_clipping(1.0).unwrap();
    let before = snapshot(&b, &mut layer, &opt);
    let err = step_with_dy(&b, &tr, &mut layer, &mut opt, 0, Some(0)).unwrap_err();
    assert!(matches!(err, Error::NonFinite { .. }), "{err}");
    assert_eq!(snapshot(&b, &mut layer, &opt), before);
}

/// Loss scaling changes nothing but the rounding of the scaled gradients: a power-of-two
/// scale is exact in f32, so an f32 layer stepped with gradients scaled by 2^16 and
/// un-scaled by the optimizer gives bitwise the f32 run without scaling (gradients far
/// from the f32 range's ends), on the cpu too.
#[test]
fn a_power_of_two_loss_scale_is_exact_on_f32_layers() {
    let cpu = common::cpu(1);
    let tr = trace("t01_ds_top2_residual_adam");
    let mut scaled = Precision { dtype: DType::F32, scaler: fp16().scaler };
    let plain = Precision { dtype: DType::F32, scaler: None };
    let params = |p: &Precision| {
        let (mut layer, mut opt) = mixed(&cpu, &tr, p);
        for t in 0..3 {
            let rep = tr.step_reported(&cpu, &mut layer, &mut opt, t).unwrap().1;
            assert!(!rep.skipped);
        }
        snapshot(&cpu, &mut layer, &opt)
    };
    assert_eq!(params(&scaled), params(&plain));
    scaled.scaler = Some(LossScaler::Static(1024.0));
    assert_eq!(params(&scaled), params(&plain));
}

/// A backend that stores f32 only (the cpu's parity reference) refuses a mixed-precision
/// layer, naming the dtype.
#[test]
fn a_backend_without_half_storage_refuses_half_precision_compute_copies() {
    let cpu = common::cpu_reference(1);
    let tr = trace("t01_ds_top2_residual_adam");
    let (spec, w) = tr.import(&mut tr.params()).unwrap();
    for dtype in [DType::F16, DType::BF16] {
        match MoeLayer::new_mixed(&cpu, spec.clone(), &w, dtype) {
            Err(Error::Unsupported { what, .. }) => assert!(what.contains(&dtype.to_string()), "{what}"),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("the f32-only backend built {dtype} weights"),
        }
        let x = cpu.upload(&HostTensor::f32(&[2, 3], vec![0.0; 6]).unwrap()).unwrap();
        assert!(matches!(cpu.cast_weight(&x, dtype), Err(Error::Unsupported { .. })));
    }
    assert!(MoeLayer::new_mixed(&cpu, spec, &w, DType::I32).is_err());
}

/// A mixed-precision run saved after k steps (the weights: the compute copies and f32
/// parameters; the state: moments, f32 masters and the dynamic scaler's state) and
/// resumed in a fresh layer and optimizer continues bit for bit as the uninterrupted run,
/// with the state under the engine's names and under the reference's.
#[test]
fn a_mixed_precision_run_resumes_bit_for_bit() {
    a_mixed_precision_run_resumes_bit_for_bit_on(common::cpu(2));
    if let Some(b) = common::wgpu("a_mixed_precision_run_resumes_bit_for_bit") {
        a_mixed_precision_run_resumes_bit_for_bit_on(b);
    }
}

fn a_mixed_precision_run_resumes_bit_for_bit_on<B: Backend>(b: B) {
    for (name, p, checkpoint_names) in [
        ("t01_ds_top2_residual_adam", fp16(), false),
        ("t05_hf_mixtral_aux_adamw", bf16(), true),
        ("t01_ds_top2_residual_adam", bf16(), true),
    ] {
        let tr = trace(name);
        let (n, k) = (tr.steps(), 3);
        let (mut layer, mut opt) = mixed(&b, &tr, &p);
        let straight: Vec<_> = (0..n).map(|t| tr.step(&b, &mut layer, &mut opt, t).unwrap()).collect();
        let want = snapshot(&b, &mut layer, &opt);

        let (mut layer, mut opt) = mixed(&b, &tr, &p);
        let mut resumed: Vec<_> = (0..k).map(|t| tr.step(&b, &mut layer, &mut opt, t).unwrap()).collect();
        if let Some(LossScaler::Dynamic(d)) = opt.loss_scaler() {
            assert_eq!(d.iteration(), k as u64);
        }
        let dir = common::tmp_dir("mixed_resume", &format!("{name}_{}_{checkpoint_names}", p.dtype));
        let weights = dir.join("layer.safetensors");
        let map = tr.names().unwrap();
        save_safetensors(&weights, &map.gather_weights(&layer.download_weights(&b).unwrap()).unwrap()).unwrap();
        opt.save(&b, &state_path(&weights), checkpoint_names.then_some(&map)).unwrap();
        let saved = Checkpoint::load(&state_path(&weights)).unwrap();
        assert!(saved.names().any(|n| n.ends_with(".master")), "{name}: no masters saved");
        drop((layer, opt));

        let (spec, w) = tr.import(&mut Checkpoint::load(&weights).unwrap()).unwrap();
        let mut layer = MoeLayer::new_mixed(&b, spec, &w, p.dtype).unwrap();
        let mut opt = tr.optimizer(&mut layer).unwrap();
        opt.set_loss_scaler(p.scaler.clone());
        let importer = tr.importer();
        let names = CheckpointNames { map: &map, import: &importer };
        opt.load(&b, &state_path(&weights), checkpoint_names.then_some(&names)).unwrap();
        if let Some(LossScaler::Dynamic(d)) = opt.loss_scaler() {
            assert_eq!(d.iteration(), k as u64, "{name}: the scaler's state was not restored");
        }
        resumed.extend((k..n).map(|t| tr.step(&b, &mut layer, &mut opt, t).unwrap()));
        assert_eq!(resumed, straight, "{name} {}: the resumed steps differ", p.dtype);
        assert_eq!(snapshot(&b, &mut layer, &opt), want, "{name} {}: the resumed parameters differ", p.dtype);
    }
}

/// Half-precision parameters without f32 weights behind them (their masters taken away,
/// as for parameters handed to `Optimizer::for_params`) get masters made from their
/// compute copies at their first step, as DeepSpeed makes its masters; the run then
/// follows the f32 run as closely as one that started from the f32 weights.
#[test]
fn masters_missing_at_the_start_are_made_from_the_compute_copies() {
    masters_missing_at_the_start_are_made_from_the_compute_copies_on(common::cpu(2));
    if let Some(b) = common::wgpu("masters_missing_at_the_start_are_made_from_the_compute_copies") {
        masters_missing_at_the_start_are_made_from_the_compute_copies_on(b);
    }
}

fn masters_missing_at_the_start_are_made_from_the_compute_copies_on<B: Backend>(b: B) {
    let tr = trace("t01_ds_top2_residual_adam");
    let (spec, w) = tr.import(&mut tr.params()).unwrap();
    let mut layer = MoeLayer::new_mixed(&b, spec, &w, DType::BF16).unwrap();
    assert!(!layer.take_masters().is_empty());
    let mut opt = tr.optimizer(&mut layer).unwrap();
    assert!(opt.master("experts.w_in").is_none(), "no master before the first step");
    let (f32_losses, _, _) = run(&b, &tr, &Precision { dtype: DType::F32, scaler: None }, tr.steps());
    let losses: Vec<f64> = (0..tr.steps()).map(|t| tr.step(&b, &mut layer, &mut opt, t).unwrap().loss).collect();
    masters_are_f32(&b, &mut layer, &opt, DType::BF16);
    let e = rel(&losses, &f32_losses);
    assert!(e <= 1e-2, "losses rel L2 {e:.2e} from f32");
}

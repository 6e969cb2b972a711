//! Training on the cpu: the seven golden training traces (DeepSpeed 0.19.8 and
//! transformers 5.23 layers trained by torch.optim) replayed step by step through the
//! library, a trace whose expected values are off failing, malformed traces refused
//! naming the key, and a run resumed from saved weights and optimizer state continuing
//! bit for bit as the uninterrupted one.

mod common;

use moe_cpu::CpuBackend;
use moe_engine::golden::{self, StepRecord, Trace};
use moe_engine::import::{save_safetensors, Checkpoint};
use moe_engine::train::{state_path, CheckpointNames, Optimizer};
use moe_engine::{Device, Error, HostTensor, MoeLayer};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const TRACES: [&str; 7] = [
    "t01_ds_top2_residual_adam",
    "t02_ds_top1_linear_rts_sgd",
    "t03_ds_top1_rsample_adamw",
    "t04_ds_top3_dropless_adamw",
    "t05_hf_mixtral_aux_adamw",
    "t06_hf_qwen2_moe_shared_adam",
    "t07_hf_deepseek_v3_aux_free_bias",
];

fn trace_dir(name: &str) -> PathBuf {
    common::golden_dir().join(name)
}

#[test]
fn all_seven_traces_pass_on_cpu() {
    let b = common::cpu(2);
    let found: Vec<PathBuf> =
        golden::discover(&common::golden_dir()).unwrap().into_iter().filter(|d| golden::is_trace(d)).collect();
    let names: Vec<String> = found.iter().map(|d| d.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, TRACES);
    for dir in &found {
        let trace = Trace::load(dir).unwrap();
        let r = golden::run_case(&b, dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        assert!(r.pass, "{}: {:?}", r.name, r.outputs.iter().filter(|o| !o.pass).collect::<Vec<_>>());
        assert!(r.not_compared.is_empty(), "{}: {:?}", r.name, r.not_compared);
        // Every step's loss and counts and every parameter were compared.
        let compared: Vec<&str> = r.outputs.iter().map(|o| o.name.as_str()).collect();
        for want in ["loss", "exp_counts"] {
            assert!(compared.contains(&want), "{}: {want} not compared", r.name);
        }
        for p in trace.meta.expected.final_params.keys() {
            assert!(compared.contains(&format!("final/{p}").as_str()), "{}: final/{p} not compared", r.name);
        }
        // f32 steps of the same arithmetic: far inside the traces' 1e-4.
        assert!(r.worst_rel_l2 <= 1e-5, "{}: worst rel L2 {}", r.name, r.worst_rel_l2);
    }
}

/// Copies a golden folder to `to`.
fn copy_case(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["case.json", "tensors.safetensors"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

/// Rewrites `dir`'s tensors with `edit` applied.
fn edit_tensors(dir: &Path, edit: impl FnOnce(&mut BTreeMap<String, HostTensor>)) {
    let ck = Checkpoint::load(&dir.join("tensors.safetensors")).unwrap();
    let mut all: BTreeMap<String, HostTensor> = ck.iter().unwrap().map(|(k, v)| (k.to_string(), v.clone())).collect();
    edit(&mut all);
    save_safetensors(&dir.join("tensors.safetensors"), &all).unwrap();
}

/// Rewrites `dir`'s case.json with `edit` applied.
fn edit_meta(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let path = dir.join("case.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn scaled(t: &HostTensor, by: f32) -> HostTensor {
    HostTensor::f32(t.shape(), t.as_f32("t").unwrap().iter().map(|v| v * by).collect()).unwrap()
}

#[test]
fn a_trace_whose_expected_values_are_one_percent_off_fails() {
    let b = common::cpu(2);
    let name = "t05_hf_mixtral_aux_adamw";
    let param = "experts.3.w2.weight";
    let dir = common::tmp_dir("training", "final_param_off");
    copy_case(&trace_dir(name), &dir);
    edit_tensors(&dir, |all| {
        let key = format!("expect/final/{param}");
        let t = scaled(&all[&key], 1.01);
        all.insert(key, t);
    });
    let r = golden::run_case(&b, &dir).unwrap();
    assert!(!r.pass, "a final parameter 1% off passed");
    let failed: Vec<&str> = r.outputs.iter().filter(|o| !o.pass).map(|o| o.name.as_str()).collect();
    assert_eq!(failed, [format!("final/{param}")]);
    let off = r.outputs.iter().find(|o| !o.pass).unwrap();
    assert!((off.error - 0.01 / 1.01).abs() < 1e-4, "rel L2 {}", off.error);

    // A loss 1% off fails too, and only the loss.
    let dir = common::tmp_dir("training", "loss_off");
    copy_case(&trace_dir(name), &dir);
    edit_tensors(&dir, |all| {
        let t = scaled(&all["expect/loss"], 1.01);
        all.insert("expect/loss".into(), t);
    });
    let r = golden::run_case(&b, &dir).unwrap();
    let failed: Vec<&str> = r.outputs.iter().filter(|o| !o.pass).map(|o| o.name.as_str()).collect();
    assert_eq!(failed, ["loss"]);

    // One route count off fails exactly.
    let dir = common::tmp_dir("training", "counts_off");
    copy_case(&trace_dir(name), &dir);
    edit_tensors(&dir, |all| {
        let t = &all["expect/exp_counts"];
        let mut v = t.as_i32("c").unwrap().to_vec();
        v[3] += 1;
        all.insert("expect/exp_counts".into(), HostTensor::i32(t.shape(), v).unwrap());
    });
    let r = golden::run_case(&b, &dir).unwrap();
    let failed: Vec<(&str, f64)> = r.outputs.iter().filter(|o| !o.pass).map(|o| (o.name.as_str(), o.error)).collect();
    assert_eq!(failed, [("exp_counts", 1.0)]);
}

#[test]
fn malformed_traces_are_errors_naming_the_key() {
    let base = trace_dir("t07_hf_deepseek_v3_aux_free_bias");
    type Edit = fn(&mut Value);
    let cases: [(&str, Edit, &str); 12] = [
        ("unknown_key", |v| v["train"]["stepz"] = 3.into(), "stepz"),
        ("zero_steps", |v| v["train"]["steps"] = 0.into(), "train.steps"),
        ("steps_mismatch", |v| v["train"]["steps"] = 7.into(), "train.inputs.x"),
        ("steps_not_a_number", |v| v["train"]["steps"] = "six".into(), "key `steps`"),
        ("unknown_loss", |v| v["train"]["loss"] = "mean(|y - target|)".into(), "key `loss`"),
        ("aux_without_term", |v| v["train"]["aux_coef"] = 0.5.into(), "train.aux_coef"),
        ("optimizer_type", |v| v["train"]["optimizer"]["type"] = "lamb".into(), "key `type`"),
        ("optimizer_arg", |v| v["train"]["optimizer"]["momentum"] = 0.9.into(), "train.optimizer.momentum"),
        ("exact_without_counts", |v| v["tolerance"]["exact"] = Value::Array(vec![]), "tolerance.exact"),
        (
            "final_params_missing",
            |v| {
                v["expected"]["final_params"].as_object_mut().unwrap().remove("gate.weight");
            },
            "gate.weight",
        ),
        ("routing_mode", |v| v["train"]["routing_mode"] = "sometimes".into(), "train.routing_mode"),
        ("train_not_object", |v| v["train"]["inputs"] = Value::Array(vec![]), "train.inputs"),
    ];
    for (name, edit, key) in cases {
        let dir = common::tmp_dir("training_malformed", name);
        copy_case(&base, &dir);
        edit_meta(&dir, edit);
        let err = match Trace::load(&dir) {
            Ok(_) => panic!("{name}: a malformed trace loaded"),
            Err(e) => e,
        };
        let text = format!("{err}");
        assert!(text.contains(key), "{name}: `{text}` does not name `{key}`");
        // The case runner reports it as that case's error, never a panic.
        assert!(golden::run_case(&common::cpu(1), &dir).is_err(), "{name}");
    }
}

/// Every weight of `layer` as bits, by engine name.
fn weight_bits(b: &CpuBackend, layer: &MoeLayer<CpuBackend>) -> BTreeMap<String, Vec<u32>> {
    let w = layer.download_weights(b).unwrap();
    w.named().into_iter().map(|(n, t)| (n, t.as_f32("w").unwrap().iter().map(|v| v.to_bits()).collect())).collect()
}

/// Runs steps `range` of `trace`.
fn run_steps(
    b: &CpuBackend,
    trace: &Trace,
    layer: &mut MoeLayer<CpuBackend>,
    opt: &mut Optimizer<CpuBackend>,
    range: std::ops::Range<usize>,
) -> Vec<StepRecord> {
    range.map(|t| trace.step(b, layer, opt, t).unwrap()).collect()
}

/// N steps straight against k steps, save (weights and state), load into a fresh layer
/// and optimizer, N − k steps: every parameter and every step's record must be the same
/// bits. `checkpoint_names`: save under the reference's names (else the engine's).
fn resume_is_bitwise(name: &str, k: usize, checkpoint_names: bool) {
    let b = common::cpu(2);
    let trace = Trace::load(&trace_dir(name)).unwrap();
    let n = trace.steps();
    let mut layer = trace.layer(&b, None).unwrap();
    let mut opt = trace.optimizer(&mut layer).unwrap();
    let straight = run_steps(&b, &trace, &mut layer, &mut opt, 0..n);
    let want = weight_bits(&b, &layer);

    let mut layer = trace.layer(&b, None).unwrap();
    let mut opt = trace.optimizer(&mut layer).unwrap();
    let mut resumed = run_steps(&b, &trace, &mut layer, &mut opt, 0..k);
    let dir = common::tmp_dir("training_resume", &format!("{name}_{k}_{checkpoint_names}"));
    let weights_path = dir.join("layer.safetensors");
    let map = trace.names().unwrap();
    let importer = trace.importer();
    let names = CheckpointNames { map: &map, import: &importer };
    let host = layer.download_weights(&b).unwrap();
    let saved: BTreeMap<String, HostTensor> = if checkpoint_names {
        map.gather_weights(&host).unwrap()
    } else {
        host.named().into_iter().map(|(n, t)| (n, t.clone())).collect()
    };
    save_safetensors(&weights_path, &saved).unwrap();
    opt.save(&b, &state_path(&weights_path), checkpoint_names.then_some(&map)).unwrap();
    drop((layer, opt));

    let mut layer = if checkpoint_names {
        let (spec, w) = trace.import(&mut Checkpoint::load(&weights_path).unwrap()).unwrap();
        MoeLayer::new_trainable(&b, spec, &w).unwrap()
    } else {
        // Engine names: the weights are the trace's layout with the saved values put in.
        let (spec, mut w) = trace.import(&mut trace.params()).unwrap();
        let ck = Checkpoint::load(&weights_path).unwrap();
        overwrite(&mut w, &ck);
        MoeLayer::new_trainable(&b, spec, &w).unwrap()
    };
    let mut opt = trace.optimizer(&mut layer).unwrap();
    opt.load(&b, &state_path(&weights_path), checkpoint_names.then_some(&names)).unwrap();
    for g in opt.groups() {
        assert_eq!(g.step(), k as u64, "{name}: group {} resumed at step {}", g.name(), g.step());
    }
    resumed.extend(run_steps(&b, &trace, &mut layer, &mut opt, k..n));
    assert_eq!(resumed, straight, "{name}: the resumed run's steps differ");
    assert_eq!(weight_bits(&b, &layer), want, "{name}: the resumed run's parameters differ");
}

/// Replaces every tensor of `w` by `ck`'s tensor of the same engine name.
fn overwrite(w: &mut moe_engine::weights::HostLayerWeights, ck: &Checkpoint) {
    let put = |t: &mut HostTensor, name: &str| {
        let v = ck.get(name).unwrap().clone();
        *t = v.reshape(t.shape()).unwrap();
    };
    put(&mut w.gate, "gate.weight");
    if let Some(g) = &mut w.gate_bias {
        put(g, "gate.bias");
    }
    let mlp = |m: &mut moe_engine::weights::HostMlp, p: &str| {
        put(&mut m.w_in, &format!("{p}.w_in"));
        for (t, n) in [(&mut m.b_in, "b_in"), (&mut m.w_out, "w_out"), (&mut m.b_out, "b_out")] {
            if let Some(t) = t {
                put(t, &format!("{p}.{n}"));
            }
        }
    };
    mlp(&mut w.experts, "experts");
    if let Some((m, cw, cb)) = &mut w.residual {
        mlp(m, "residual");
        put(cw, "coefficient.weight");
        put(cb, "coefficient.bias");
    }
    if let Some((m, g)) = &mut w.shared {
        mlp(m, "shared");
        if let Some(g) = g {
            put(g, "shared_gate.weight");
        }
    }
}

#[test]
fn a_resumed_adam_run_with_deepspeed_groups_continues_bitwise() {
    resume_is_bitwise("t01_ds_top2_residual_adam", 3, true);
}

#[test]
fn a_resumed_sgd_momentum_run_continues_bitwise() {
    resume_is_bitwise("t02_ds_top1_linear_rts_sgd", 2, true);
}

#[test]
fn a_resumed_run_with_the_v3_bias_update_continues_bitwise() {
    // The correction bias is a buffer: saved with the weights, without optimizer state.
    resume_is_bitwise("t07_hf_deepseek_v3_aux_free_bias", 5, true);
}

#[test]
fn a_resumed_run_under_engine_names_continues_bitwise() {
    resume_is_bitwise("t06_hf_qwen2_moe_shared_adam", 4, false);
}

#[test]
fn state_saved_under_checkpoint_names_reads_as_the_checkpoint_does() {
    let b = common::cpu(1);
    let trace = Trace::load(&trace_dir("t01_ds_top2_residual_adam")).unwrap();
    let mut layer = trace.layer(&b, None).unwrap();
    let mut opt = trace.optimizer(&mut layer).unwrap();
    assert_eq!(opt.groups().iter().map(|g| g.name()).collect::<Vec<_>>(), ["dense-params", "ep_size_1"]);
    let groups: BTreeMap<&str, &str> = opt.params().collect();
    assert_eq!(groups["experts.w_in"], "ep_size_1");
    assert_eq!(groups["gate.weight"], "dense-params");
    assert_eq!(groups["residual.w_in"], "dense-params");
    run_steps(&b, &trace, &mut layer, &mut opt, 0..1);
    let dir = common::tmp_dir("training", "state_names");
    let path = dir.join("layer.optim.safetensors");
    let map = trace.names().unwrap();
    opt.save(&b, &path, Some(&map)).unwrap();
    let ck = Checkpoint::load(&path).unwrap();
    let names: Vec<&str> = ck.names().collect();
    // Every parameter of the checkpoint has both moments under its own name and shape.
    for p in map.names() {
        for s in ["exp_avg", "exp_avg_sq"] {
            let t = ck.get(&format!("{p}.{s}")).unwrap_or_else(|_| panic!("{p}.{s} missing: {names:?}"));
            assert_eq!(t.shape(), map.shape(p).unwrap(), "{p}.{s}");
        }
    }
    assert_eq!(ck.get("param_groups.ep_size_1.step").unwrap().as_i32("s").unwrap(), [1]);
    assert_eq!(names.len(), 2 * map.names().count() + 2);
    // Expert 2's first moment under DeepSpeed's name is row block 2 of the engine's stack.
    let m = opt.state("experts.w_in").unwrap().m;
    let stack = b.download(m.unwrap()).unwrap();
    let per = stack.numel() / 4;
    let want = &stack.as_f32("m").unwrap()[2 * per..3 * per];
    let got = ck.get("deepspeed_moe.experts.deepspeed_experts.2.0.weight.exp_avg").unwrap();
    assert_eq!(got.as_f32("m").unwrap(), want);
}

#[test]
fn bad_state_files_are_errors_that_leave_the_optimizer_as_it_was() {
    let b = common::cpu(1);
    let trace = Trace::load(&trace_dir("t02_ds_top1_linear_rts_sgd")).unwrap();
    let mut layer = trace.layer(&b, None).unwrap();
    let mut opt = trace.optimizer(&mut layer).unwrap();
    run_steps(&b, &trace, &mut layer, &mut opt, 0..2);
    let dir = common::tmp_dir("training", "bad_state");
    let path = dir.join("layer.optim.safetensors");
    opt.save(&b, &path, None).unwrap();
    let good = Checkpoint::load(&path).unwrap();
    let all: BTreeMap<String, HostTensor> = good.iter().unwrap().map(|(k, v)| (k.to_string(), v.clone())).collect();
    assert!(all.contains_key("experts.w_in.momentum_buffer"), "{:?}", all.keys());
    let before = opt.state("experts.w_in").unwrap().m.map(|t| b.download(t).unwrap().into_f32("m").unwrap());

    let mut fresh_layer = trace.layer(&b, None).unwrap();
    let mut fresh = trace.optimizer(&mut fresh_layer).unwrap();
    type Edit = Box<dyn Fn(&mut BTreeMap<String, HostTensor>)>;
    let variants: [(&str, Edit, &str); 4] = [
        ("missing", Box::new(|m| drop(m.remove("gate.weight.momentum_buffer"))), "gate.weight.momentum_buffer"),
        (
            "extra",
            Box::new(|m| drop(m.insert("gate.weight.exp_avg".into(), HostTensor::zeros(&[4, 84]).unwrap()))),
            "gate.weight.exp_avg",
        ),
        (
            "shape",
            Box::new(|m| drop(m.insert("experts.w_in.momentum_buffer".into(), HostTensor::zeros(&[4, 84]).unwrap()))),
            "experts.w_in.momentum_buffer",
        ),
        ("no_step", Box::new(|m| drop(m.remove("param_groups.ep_size_1.step"))), "param_groups.ep_size_1.step"),
    ];
    for (what, edit, key) in variants {
        let mut m = all.clone();
        edit(&mut m);
        let p = dir.join(format!("{what}.safetensors"));
        save_safetensors(&p, &m).unwrap();
        let err = fresh.load(&b, &p, None).unwrap_err();
        assert!(err.to_string().contains(key), "{what}: {err}");
        assert!(matches!(err, Error::MissingTensor(_) | Error::UnexpectedTensors(_) | Error::Shape { .. }), "{what}");
        assert!(fresh.groups().iter().all(|g| g.step() == 0), "{what}: the failed load moved the steps");
        assert!(fresh.state("experts.w_in").unwrap().m.is_none(), "{what}: the failed load left state");
    }
    fresh.load(&b, &path, None).unwrap();
    let after = fresh.state("experts.w_in").unwrap().m.map(|t| b.download(t).unwrap().into_f32("m").unwrap());
    assert_eq!(after, before);
}

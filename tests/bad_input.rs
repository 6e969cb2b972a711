//! Bad input is an error, never a panic, an abort, a hang or a silent reroute. Each test
//! is named for what it tries, as a new user would try it on copies of the golden cases:
//! non-finite noise, bias, loads and weights, forged case metadata, absurd sizes,
//! capacities past i32, and data that does not match its shape.

mod common;

use common::{cpu, f32s, ht, up_f32};
use moe_cpu::{CpuBackend, CpuBuffer};
use moe_engine::config::{DeepSpeedGate, ExpertSpec, GateSpec, LayerSpec};
use moe_engine::gate::Gate;
use moe_engine::import::{hf, save_safetensors, Checkpoint};
use moe_engine::ops::{
    AuxGrad, BlockTable, CapacityRule, Choice, DevicePlacement, KeepPolicy, Normalize, Offsets, PlanSpec,
    RouteGradSpec, RouteSpec, Routes, ScoreFn,
};
use moe_engine::{
    golden, stack, Activation, Backend, DType, Device, Error, ExpertKind, GateOptions, HostTensor, LayerOptions,
    MoeLayer, NoiseOverrides, Tensor,
};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Asserts a non-finite error naming `tensor` at `index`.
#[track_caller]
fn non_finite<T>(r: moe_engine::Result<T>, tensor: &str, index: &[usize]) {
    match r {
        Err(Error::NonFinite { tensor: t, index: i, .. }) => {
            assert_eq!((t.as_str(), i.as_slice()), (tensor, index));
        }
        Err(e) => panic!("expected a non-finite `{tensor}` at {index:?}, got: {e}"),
        Ok(_) => panic!("expected a non-finite `{tensor}` at {index:?}, got success"),
    }
}

/// A copy of golden case `src` in a temp folder, with its metadata and tensors edited.
fn broken_case(
    name: &str,
    src: &str,
    meta: impl FnOnce(&mut Value),
    tensors: impl FnOnce(&mut BTreeMap<String, HostTensor>),
) -> PathBuf {
    let from = common::golden_dir().join(src);
    let dir = common::tmp_dir("bad_input", name);
    let mut m: Value = serde_json::from_str(&std::fs::read_to_string(from.join("case.json")).unwrap()).unwrap();
    meta(&mut m);
    std::fs::write(dir.join("case.json"), serde_json::to_string_pretty(&m).unwrap()).unwrap();
    let ck = Checkpoint::load(&from.join("tensors.safetensors")).unwrap();
    let mut map: BTreeMap<String, HostTensor> = ck.iter().unwrap().map(|(k, v)| (k.to_string(), v.clone())).collect();
    tensors(&mut map);
    save_safetensors(&dir.join("tensors.safetensors"), &map).unwrap();
    dir
}

/// The case error of running `dir` on the cpu; the test fails if the case passes.
#[track_caller]
fn case_error(dir: &Path) -> Error {
    match golden::run_case(&cpu(1), dir) {
        Err(e) => e,
        Ok(r) => panic!("{} ran (pass = {}) but is broken", dir.display(), r.pass),
    }
}

fn poke(map: &mut BTreeMap<String, HostTensor>, key: &str, at: usize, v: f32) {
    let t = map.remove(key).unwrap_or_else(|| panic!("no {key}"));
    let shape = t.shape().to_vec();
    let mut d = t.into_f32(key).unwrap();
    d[at] = v;
    map.insert(key.into(), ht(&shape, d));
}

// ------------------------------------------------------------------ non-finite values

#[test]
fn nan_in_gumbel_noise_is_rejected_naming_the_tensor_and_index() {
    // 12_ds_gate_top2_train_sampling replays Gumbel noise [S, E] with S·E > 20 (the sort
    // that used to panic on NaN past 20 items).
    let dir =
        broken_case("gumbel_nan", "12_ds_gate_top2_train_sampling", |_| {}, |m| poke(m, "noise/gumbel", 13, f32::NAN));
    let shape =
        Checkpoint::load(&dir.join("tensors.safetensors")).unwrap().get("noise/gumbel").unwrap().shape().to_vec();
    let e = *shape.last().unwrap();
    non_finite(golden::run_case(&cpu(1), &dir), "noise.gumbel", &[13 / e, 13 % e]);
}

#[test]
fn infinite_rts_noise_is_rejected_naming_the_tensor_and_index() {
    let dir =
        broken_case("rts_nan", "06_ds_gate_top1_train_rts", |_| {}, |m| poke(m, "noise/rts_uniform", 0, f32::INFINITY));
    non_finite(golden::run_case(&cpu(1), &dir), "noise.rts_uniform", &[0, 0]);
}

#[test]
fn nan_in_choice_noise_given_to_the_route_op_directly_is_an_error_not_a_panic() {
    let b = cpu(1);
    let (s, e) = (9, 30);
    let logits = up_f32(&b, &[s, e], common::lcg(1, s * e, 2.0));
    let mut noise = common::lcg(2, s * e, 1.0);
    noise[4 * e + 7] = f32::NAN;
    let nt = up_f32(&b, &[s, e], noise);
    let spec = RouteSpec { choice_noise: Some(&nt), ..RouteSpec::softmax_top_k(3) };
    non_finite(b.route(&logits, &spec), "choice noise (gumbel)", &[4, 7]);
}

#[test]
fn nan_in_the_correction_bias_is_rejected_at_the_gate_and_at_the_route_op() {
    let dir = broken_case(
        "bias_nan",
        "26_hf_deepseek_v3_grouped",
        |_| {},
        |m| poke(m, "param/gate.e_score_correction_bias", 3, f32::NAN),
    );
    non_finite(golden::run_case(&cpu(1), &dir), "gate.e_score_correction_bias", &[3]);
    // Straight to the route op with 32 experts: an error naming the element.
    let b = cpu(1);
    let (s, e) = (5, 32);
    let logits = up_f32(&b, &[s, e], common::lcg(3, s * e, 2.0));
    let mut bias = vec![0.0; e];
    bias[21] = f32::NEG_INFINITY;
    let bt = up_f32(&b, &[e], bias);
    let spec = RouteSpec { bias: Some(&bt), ..RouteSpec::softmax_top_k(4) };
    non_finite(b.route(&logits, &spec), "e_score_correction_bias", &[21]);
}

#[test]
fn nan_in_an_expert_weight_is_rejected_naming_the_tensor_and_index() {
    let dir = broken_case("expert_nan", "22_hf_mixtral", |_| {}, |m| poke(m, "param/experts.2.w2.weight", 5, f32::NAN));
    // Mixtral's w2 of expert 2 becomes w_out [E, H, I] of the stack: expert 2, row 0, column 5.
    non_finite(golden::run_case(&cpu(1), &dir), "experts.w_out", &[2, 0, 5]);
}

#[test]
fn nan_in_the_router_weight_or_the_input_is_rejected() {
    let dir = broken_case("router_nan", "01_ds_gate_top1_eval", |_| {}, |m| poke(m, "param/wg.weight", 1, f32::NAN));
    non_finite(golden::run_case(&cpu(1), &dir), "gate.weight", &[0, 1]);
    let dir = broken_case("x_inf", "18_ds_moe_top2_mlp_eval", |_| {}, |m| poke(m, "input/x", 0, f32::INFINITY));
    non_finite(golden::run_case(&cpu(1), &dir), "inputs.x", &[0, 0, 0]);
}

#[test]
fn nan_in_used_token_is_rejected() {
    let dir =
        broken_case("used_nan", "05_ds_gate_top1_used_token", |_| {}, |m| poke(m, "input/used_token", 2, f32::NAN));
    non_finite(golden::run_case(&cpu(1), &dir), "used_token", &[2]);
}

#[test]
fn a_used_token_mask_that_is_not_one_value_per_token_is_a_shape_error() {
    for (name, shape) in [("used_extra_dims", vec![32, 1, 1]), ("used_as_matrix", vec![4, 8])] {
        let dir = broken_case(
            name,
            "05_ds_gate_top1_used_token",
            |_| {},
            |m| {
                let t = m.remove("input/used_token").unwrap();
                m.insert("input/used_token".into(), t.reshape(&shape).unwrap());
            },
        );
        assert!(matches!(case_error(&dir), Error::Shape { tensor, .. } if tensor == "used_token"), "{name}");
    }
}

#[test]
fn a_nan_priority_ranks_lowest_instead_of_panicking_the_sort() {
    let b = cpu(1);
    let (s, e) = (40, 2);
    let ex = HostTensor::i32(&[s, 1], vec![0; s]).unwrap();
    let routes = Routes::from_host(&b, &ex, &ht(&[s, 1], vec![1.0; s]), &ht(&[s, e], vec![0.5; s * e])).unwrap();
    let mut pri: Vec<f32> = (0..s * e).map(|i| i as f32).collect();
    pri[0] = f32::NAN; // token 0, expert 0: would be kept first by a NaN-greatest order
    let pt = up_f32(&b, &[s, e], pri);
    let spec = PlanSpec {
        num_experts: e,
        capacity: CapacityRule::Fixed(3),
        keep: KeepPolicy::Priority(&pt),
        used_token: None,
        group_size: None,
        renormalize_kept: false,
    };
    let plan = b.plan(&routes, &spec).expect("a plan, not a panic");
    let slots = common::i32s(&b, &plan.slots);
    // The three highest finite priorities of expert 0 are tokens 37, 38, 39.
    let kept: Vec<usize> = (0..s).filter(|&t| slots[t] >= 0).collect();
    assert_eq!(kept, vec![37, 38, 39]);
}

// ------------------------------------------------------------------ case metadata

#[test]
fn a_zero_dimensional_x_is_an_error_naming_inputs_x() {
    let dir = broken_case(
        "x_scalar",
        "01_ds_gate_top1_eval",
        |_| {},
        |m| {
            m.insert("input/x".into(), HostTensor::scalar(1.0));
        },
    );
    let e = case_error(&dir);
    assert!(matches!(&e, Error::Shape { tensor, .. } if tensor == "inputs.x"), "{e}");
    let dir = broken_case(
        "x_scalar_layer",
        "22_hf_mixtral",
        |_| {},
        |m| {
            m.insert("input/x".into(), HostTensor::scalar(1.0));
        },
    );
    assert!(case_error(&dir).to_string().contains("inputs.x"));
}

#[test]
fn an_empty_expected_an_unknown_mode_or_format_99_are_errors() {
    for (name, edit) in [
        ("expected_empty", Box::new(|m: &mut Value| m["expected"] = serde_json::json!({})) as Box<dyn Fn(&mut Value)>),
        ("expected_missing", Box::new(|m: &mut Value| drop(m.as_object_mut().unwrap().remove("expected")))),
        ("expected_unknown_key", Box::new(|m: &mut Value| m["expected"]["z_loss"] = "expect/y".into())),
        ("expected_not_of_this_kind", Box::new(|m: &mut Value| m["expected"]["indices"] = "expect/y".into())),
        ("mode_unknown", Box::new(|m: &mut Value| m["mode"] = "inference".into())),
        ("format_99", Box::new(|m: &mut Value| m["format"] = 99.into())),
        ("kind_unknown", Box::new(|m: &mut Value| m["kind"] = "hf.llama".into())),
        ("unknown_top_level_key", Box::new(|m: &mut Value| m["expectd"] = serde_json::json!({}))),
        ("tolerance_negative", Box::new(|m: &mut Value| m["tolerance"]["rel_l2"] = (-1.0).into())),
        ("tolerance_huge", Box::new(|m: &mut Value| m["tolerance"]["rel_l2"] = 1e30.into())),
        (
            "exact_not_expected",
            Box::new(|m: &mut Value| m["tolerance"]["exact"] = serde_json::json!(["router_logits"])),
        ),
        ("missing_tensor", Box::new(|m: &mut Value| m["expected"]["y"] = "expect/nothing".into())),
    ] {
        let dir = broken_case(name, "18_ds_moe_top2_mlp_eval", |m| edit(m), |_| {});
        let e = case_error(&dir);
        assert!(matches!(e, Error::Case { .. }), "{name}: {e}");
    }
}

#[test]
fn a_malformed_backward_block_or_a_section_given_as_an_array_is_a_case_error() {
    type Edit = Box<dyn Fn(&mut Value)>;
    let edits: Vec<(&str, Edit)> = vec![
        ("backward_not_object", Box::new(|m| m["backward"] = 0.into())),
        ("backward_unknown_key", Box::new(|m| m["backward"]["ddx"] = "grad/input/x".into())),
        ("backward_unknown_loss", Box::new(|m| m["backward"]["loss"] = "mean(y)".into())),
        ("backward_aux_coef_missing", Box::new(|m| drop(m["backward"].as_object_mut().unwrap().remove("aux_coef")))),
        ("backward_dx_missing_tensor", Box::new(|m| m["backward"]["dx"] = "grad/none".into())),
        ("backward_params_empty", Box::new(|m| m["backward"]["params"] = serde_json::json!({}))),
        ("backward_params_no_such_param", Box::new(|m| m["backward"]["params"]["w9"] = "grad/input/x".into())),
        ("inputs_as_array", Box::new(|m| m["inputs"] = serde_json::json!(["input/x"]))),
        ("noise_as_array", Box::new(|m| m["noise"] = serde_json::json!([]))),
    ];
    for (name, edit) in edits {
        let dir = broken_case(name, "18_ds_moe_top2_mlp_eval", |m| edit(m), |_| {});
        let e = case_error(&dir);
        assert!(matches!(e, Error::Case { .. }), "{name}: {e}");
    }
    // A gradient of another shape than its parameter names the parameter.
    let dir = broken_case(
        "backward_grad_wrong_shape",
        "22_hf_mixtral",
        |_| {},
        |t| drop(t.insert("grad/param/gate.weight".into(), HostTensor::zeros(&[3]).unwrap())),
    );
    assert!(case_error(&dir).to_string().contains("backward.params.gate.weight"));
}

#[test]
fn a_non_finite_expected_value_is_an_error_even_where_routes_are_masked() {
    // The last route of 01_ds_gate_top1_eval is dropped, so its gate is never compared:
    // the value is still checked where it enters.
    let dir =
        broken_case("inf_masked_gate", "01_ds_gate_top1_eval", |_| {}, |t| poke(t, "expect/gates", 31, f32::INFINITY));
    non_finite(golden::run_case(&cpu(1), &dir), "expected.gates", &[0, 31]);
}

#[test]
fn an_expected_value_of_another_shape_or_a_stray_tensor_is_a_case_error() {
    let dir = broken_case(
        "y_transposed",
        "18_ds_moe_top2_mlp_eval",
        |_| {},
        |t| {
            let y = t.remove("expect/y").unwrap();
            let s: Vec<usize> = y.shape().iter().rev().copied().collect();
            t.insert("expect/y".into(), y.reshape(&s).unwrap());
        },
    );
    assert!(case_error(&dir).to_string().contains("shape"));
    let dir = broken_case(
        "stray",
        "18_ds_moe_top2_mlp_eval",
        |_| {},
        |t| drop(t.insert("expect/z".into(), ht(&[1], vec![0.0]))),
    );
    assert!(case_error(&dir).to_string().contains("expect/z"));
}

#[test]
fn a_gate_config_without_typed_model_dim_and_num_experts_or_with_null_values_is_refused() {
    for (name, key, v) in [
        ("model_dim_string", "model_dim", Value::from("16")),
        ("model_dim_null", "model_dim", Value::Null),
        ("num_experts_float", "num_experts", Value::from(4.5)),
        ("num_experts_negative", "num_experts", Value::from(-4)),
        ("k_null", "k", Value::Null),
        ("capacity_factor_null", "capacity_factor", Value::Null),
        ("drop_tokens_null", "drop_tokens", Value::Null),
    ] {
        let dir = broken_case(name, "01_ds_gate_top1_eval", |m| m["config"][key] = v, |_| {});
        match case_error(&dir) {
            Error::Config { field, .. } => assert_eq!(field, key, "{name}"),
            e => panic!("{name}: expected a config error naming `{key}`, got {e}"),
        }
    }
    let dir = broken_case(
        "model_dim_missing",
        "01_ds_gate_top1_eval",
        |m| drop(m["config"].as_object_mut().unwrap().remove("model_dim")),
        |_| {},
    );
    assert!(matches!(case_error(&dir), Error::Config { field, .. } if field == "model_dim"));
}

#[test]
fn a_forged_or_truncated_tensor_file_is_a_checkpoint_error() {
    let dir = broken_case("truncated", "22_hf_mixtral", |_| {}, |_| {});
    let file = dir.join("tensors.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    for (what, forged) in [
        ("truncated", bytes[..bytes.len() / 2].to_vec()),
        ("header length past the file", {
            let mut b = bytes.clone();
            b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
            b
        }),
        ("empty", Vec::new()),
    ] {
        std::fs::write(&file, &forged).unwrap();
        let e = case_error(&dir);
        assert!(matches!(e, Error::Checkpoint { .. }), "{what}: {e}");
    }
}

#[test]
fn integer_inputs_are_a_dtype_error() {
    let dir = broken_case(
        "x_int",
        "22_hf_mixtral",
        |_| {},
        |m| {
            let x = m.remove("input/x").unwrap();
            let shape = x.shape().to_vec();
            m.insert("input/x".into(), HostTensor::i32(&shape, vec![1; x.numel()]).unwrap());
        },
    );
    assert!(matches!(case_error(&dir), Error::DType { .. }));
}

// ------------------------------------------------------------------ sizes

#[test]
fn a_billion_experts_in_a_config_fails_before_anything_is_allocated() {
    // A config that claims 10⁹ experts against a checkpoint with 4: refused at the
    // router's shape, before any per-expert name is built.
    let cfg = serde_json::json!({
        "model_type": "mixtral", "hidden_size": 16, "intermediate_size": 24,
        "num_local_experts": 1_000_000_000u64, "num_experts_per_tok": 2
    });
    let (fam, spec) = hf::layer_spec(&cfg).expect("the config itself is well-formed");
    let w = stack::random_weights(&LayerSpec { num_experts: 4, ..spec.clone() }, 1).unwrap();
    let mut map = BTreeMap::new();
    map.insert("gate.weight".to_string(), w.gate.clone());
    let mut ck = Checkpoint::from_map(map, "test");
    let start = Instant::now();
    let e = hf::layer_weights(&mut ck, fam, &spec, "").unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(1), "took {:?}", start.elapsed());
    assert!(matches!(&e, Error::Shape { tensor, .. } if tensor == "gate.weight"), "{e}");
}

#[test]
fn sizes_whose_product_overflows_are_errors() {
    let spec = LayerSpec {
        output_bias: false,
        hidden: usize::MAX / 2,
        num_experts: 4,
        gate: GateSpec::SoftmaxTopK { k: 2, normalize: true },
        expert: ExpertSpec {
            kind: ExpertKind::Glu { activation: Activation::Silu, clamp: None },
            ffn: usize::MAX / 3,
            bias: false,
        },
        residual: false,
        shared: None,
    };
    assert!(matches!(spec.validate(), Err(Error::TooLarge { .. }) | Err(Error::Config { .. })));
    assert!(stack::random_weights(&spec, 1).is_err());
    assert!(HostTensor::zeros(&[1 << 40, 1 << 40]).is_err());
    let b = cpu(1);
    let x = up_f32(&b, &[2, 3], vec![0.0; 6]);
    assert!(x.reshape(&[usize::MAX, 2]).is_err());
}

#[test]
fn host_and_device_tensors_cannot_be_built_over_too_little_data() {
    assert!(HostTensor::f32(&[2, 3], vec![0.0; 5]).is_err());
    let short: moe_engine::Result<Tensor<CpuBackend>> =
        moe_engine::DeviceTensor::from_parts(CpuBuffer::F32(vec![0.0; 3]), vec![2, 2], DType::F32);
    assert!(matches!(short, Err(Error::Internal(_))));
    // Group offsets that leave their rows, or run backwards, are refused on the way in.
    let b = cpu(1);
    assert!(Offsets::from_host(&b, &[0, 5, 3]).is_err());
    assert!(Offsets::from_host(&b, &[1, 5]).is_err());
    let off = Offsets::from_host(&b, &[0, 4, 9]).unwrap();
    let x = up_f32(&b, &[8, 3], vec![0.0; 24]);
    let w = b.upload_weight(&ht(&[2, 4, 3], vec![0.0; 24]), DType::F32).unwrap();
    let e = b.grouped_linear(&x, &off, &w, None).unwrap_err();
    assert!(e.to_string().contains("9 rows"), "{e}");
    // Routes naming an expert past E are refused before any kernel indexes by them.
    let ex = HostTensor::i32(&[2, 1], vec![0, 7]).unwrap();
    let e = Routes::from_host(&b, &ex, &ht(&[2, 1], vec![1.0; 2]), &ht(&[2, 4], vec![0.25; 8])).err().unwrap();
    assert!(matches!(e, Error::OutOfRange { value: 7, .. }), "{e}");
}

/// Top-2 routes of `s` random tokens over `e` experts, and the spec of an unlimited plan.
fn top2_routes(b: &CpuBackend, s: usize, e: usize) -> (Routes<CpuBackend>, PlanSpec<'static, CpuBackend>) {
    let logits = up_f32(b, &[s, e], common::lcg(s as u64, s * e, 1.0));
    let routes = b.route(&logits, &RouteSpec::softmax_top_k(2)).unwrap();
    let spec = PlanSpec {
        num_experts: e,
        capacity: CapacityRule::Unlimited,
        keep: KeepPolicy::TokenOrder,
        used_token: None,
        group_size: None,
        renormalize_kept: false,
    };
    (routes, spec)
}

/// Asserts a config error naming `field`.
#[track_caller]
fn config_error<T>(r: moe_engine::Result<T>, field: &str, what: &str) {
    match r {
        Err(Error::Config { field: f, .. }) => assert_eq!(f, field, "{what}"),
        Err(e) => panic!("{what}: expected a config error naming `{field}`, got: {e}"),
        Ok(_) => panic!("{what}: expected a config error naming `{field}`, got success"),
    }
}

#[test]
fn route_options_outside_their_domain_are_errors_naming_the_field() {
    let b = cpu(1);
    let (s, e) = (5, 8);
    let logits = up_f32(&b, &[s, e], common::lcg(4, s * e, 2.0));
    let bt = up_f32(&b, &[e], vec![0.1; e]);
    let nt = up_f32(&b, &[s, e], vec![0.0; s * e]);
    let mixer = |jitter_eps| RouteSpec { choice: Choice::SparseMixer { jitter_eps }, ..RouteSpec::softmax_top_k(2) };
    let norm = |normalize| RouteSpec { normalize, ..RouteSpec::softmax_top_k(2) };
    let refused = [
        ("p = 0", norm(Normalize::PNorm(0.0)), "normalize p"),
        ("p < 0", norm(Normalize::PNorm(-2.0)), "normalize p"),
        ("p NaN", norm(Normalize::PNorm(f32::NAN)), "normalize p"),
        ("p infinite", norm(Normalize::PNorm(f32::INFINITY)), "normalize p"),
        ("negative floor", norm(Normalize::SumFloor(-1e-12)), "normalize floor"),
        ("NaN floor", norm(Normalize::SumFloor(f32::NAN)), "normalize floor"),
        ("sparsemixer with k = 3", RouteSpec { k: 3, ..mixer(0.01) }, "k"),
        ("sparsemixer with k = 1", RouteSpec { k: 1, ..mixer(0.01) }, "k"),
        ("negative jitter", mixer(-0.01), "jitter_eps"),
        ("NaN jitter", mixer(f32::NAN), "jitter_eps"),
        ("sparsemixer on sigmoid scores", RouteSpec { score: ScoreFn::Sigmoid, ..mixer(0.01) }, "score"),
        ("sparsemixer renormalised", RouteSpec { normalize: Normalize::Sum, ..mixer(0.01) }, "normalize"),
        ("sparsemixer with a bias", RouteSpec { bias: Some(&bt), ..mixer(0.01) }, "e_score_correction_bias"),
        ("sparsemixer with noise", RouteSpec { choice_noise: Some(&nt), ..mixer(0.01) }, "choice noise"),
    ];
    for (what, spec, field) in refused {
        config_error(b.route(&logits, &spec), field, what);
    }
    // The edges of each domain are taken.
    for spec in [norm(Normalize::PNorm(1e-3)), norm(Normalize::SumFloor(0.0)), mixer(0.0)] {
        b.route(&logits, &spec).unwrap_or_else(|e| panic!("{:?} / {:?}: {e}", spec.choice, spec.normalize));
    }
}

#[test]
fn the_route_backward_refuses_what_the_forward_refuses_and_losses_on_other_scores_than_softmax() {
    let b = cpu(1);
    let (s, e) = (6, 5);
    let (routes, plan_spec) = top2_routes(&b, s, e);
    let plan = b.plan(&routes, &plan_spec).unwrap();
    let logits = up_f32(&b, &[s, e], common::lcg(5, s * e, 1.0));
    let d_w = up_f32(&b, &[s, 2], vec![1.0; s * 2]);
    let base = RouteGradSpec {
        score: ScoreFn::Softmax,
        choice: Choice::TopK,
        normalize: Normalize::None,
        scale: 1.0,
        renormalize_kept: false,
    };
    let refused = [
        ("p = 0", RouteGradSpec { normalize: Normalize::PNorm(0.0), ..base }, "normalize p"),
        ("negative floor", RouteGradSpec { normalize: Normalize::SumFloor(-1.0), ..base }, "normalize floor"),
        ("negative jitter", RouteGradSpec { choice: Choice::SparseMixer { jitter_eps: -1.0 }, ..base }, "jitter_eps"),
        (
            "sparsemixer renormalised",
            RouteGradSpec { choice: Choice::SparseMixer { jitter_eps: 0.01 }, normalize: Normalize::Sum, ..base },
            "normalize",
        ),
    ];
    for (what, spec, field) in refused {
        config_error(b.route_grad(&d_w, &routes, &plan, &logits, spec, None, 0.0), field, what);
    }
    // The load-balancing losses are defined on the softmax.
    for score in [ScoreFn::Sigmoid, ScoreFn::SqrtSoftplus] {
        let aux = AuxGrad { counts: &plan.counts, scale: 0.01 };
        let r = b.route_grad(&d_w, &routes, &plan, &logits, RouteGradSpec { score, ..base }, Some(aux), 0.0);
        assert!(matches!(r, Err(Error::Unsupported { .. })), "a router loss on {score:?} scores");
    }
}

#[test]
fn a_combine_with_the_wrong_rows_is_refused() {
    let b = cpu(1);
    let (routes, spec) = top2_routes(&b, 4, 3);
    let plan = b.plan(&routes, &spec).unwrap();
    let yp = up_f32(&b, &[5, 2], vec![0.0; 10]);
    let rows = plan.route_rows();
    assert!(matches!(b.combine(&yp, &rows, &plan.weights, 0..4), Err(Error::Shape { .. })));
    // The right rows, but tokens past the plan's, or weights of another shape.
    let yp = up_f32(&b, &[8, 2], vec![0.0; 16]);
    assert!(matches!(b.combine(&yp, &rows, &plan.weights, 2..5), Err(Error::Precondition(_))));
    assert!(matches!(b.combine(&yp, &rows, &yp, 0..4), Err(Error::Shape { .. })));
    assert_eq!(b.combine(&yp, &rows, &plan.weights, 1..3).unwrap().shape(), &[2, 2]);
    let spec = PlanSpec { num_experts: 5, ..spec };
    assert!(matches!(b.plan(&routes, &spec), Err(Error::Shape { .. })), "routes over 3 experts, a plan for 5");
}

/// Asserts an error of the given kind naming `name` (a tensor, or a config field).
#[track_caller]
fn names<T>(r: moe_engine::Result<T>, name: &str) {
    match r {
        Err(Error::Shape { tensor, .. } | Error::DType { tensor, .. }) => assert_eq!(tensor, name),
        Err(Error::Config { field, .. }) => assert_eq!(field, name),
        Err(e) => panic!("expected an error naming `{name}`, got: {e}"),
        Ok(_) => panic!("expected an error naming `{name}`, got success"),
    }
}

#[test]
fn the_expert_side_ops_refuse_operands_that_do_not_fit_naming_them() {
    use moe_engine::ops::{ActGradKind, MlpWeights};
    use moe_engine::GluClamp;
    let b = cpu(1);
    let (routes, spec) = top2_routes(&b, 4, 3);
    let plan = b.plan(&routes, &spec).unwrap();
    let rows = plan.route_rows();
    let (x, x5) = (up_f32(&b, &[4, 2], vec![0.5; 8]), up_f32(&b, &[5, 2], vec![0.5; 10]));
    let ints = b.upload(&HostTensor::i32(&[4, 2], vec![1; 8]).unwrap()).unwrap();
    // The weighted permute: one weight per route, f32; one token row per route's token.
    names(b.permute_scaled(&x, &rows, &x5), "route weights");
    names(b.permute_scaled(&x, &rows, &ints), "route weights");
    names(b.permute_scaled(&x5, &rows, &plan.weights), "x");
    assert_eq!(b.permute_scaled(&x, &rows, &plan.weights).unwrap().shape(), &[8, 2]);
    // pass_rows: y and x alike, rows for every group, a first group within the groups.
    let off = Offsets::from_host(&b, &[0, 2, 3, 5]).unwrap();
    let (y5, y4) = (up_f32(&b, &[5, 3], vec![0.0; 15]), up_f32(&b, &[4, 3], vec![0.0; 12]));
    names(b.pass_rows(&y5, &x5, &off, 1), "pass_rows x");
    names(b.pass_rows(&y4, &y4, &off, 1), "pass_rows y");
    names(b.pass_rows(&y5, &y5, &off, 4), "from_group");
    assert_eq!(b.pass_rows(&y5, &y5, &off, 3).unwrap().shape(), &[5, 3]);
    // The output bias: one value per column; its gradient takes a matrix.
    names(b.add_bias(&y5, &up_f32(&b, &[2], vec![0.0; 2])), "output bias");
    names(b.add_bias(&up_f32(&b, &[3], vec![0.0; 3]), &up_f32(&b, &[3], vec![0.0; 3])), "add_bias input");
    names(b.sum_rows(&up_f32(&b, &[2, 2, 2], vec![0.0; 8])), "row sum input");
    names(b.sum_rows(&ints), "row sum input");
    // Identity-expert tails: the stack's experts plus the tail must be the offsets' groups.
    let w = b.upload_weight(&ht(&[2, 3, 3], vec![0.0; 18]), DType::F32).unwrap();
    names(b.grouped_linear(&y5, &off, &w, None), "offsets");
    assert!(b.grouped_linear(&y5, &off.with_tail(1), &w, None).is_ok());
    names(b.grouped_linear(&y5, &off.with_tail(2), &w, None), "offsets");
    names(b.linear_dx(&y5, &w, Some(&off.with_tail(5))), "offsets");
    // A clamp the activation cannot take, or a limit that is no bound.
    let pre = up_f32(&b, &[5, 6], vec![0.0; 30]);
    names(b.glu_clamped(&pre, Activation::Gelu, Some(GluClamp::gpt_oss(7.0, 1.702))), "clamp.alpha");
    names(b.glu_clamped(&pre, Activation::Silu, Some(GluClamp::deepseek_v4(-1.0))), "clamp.limit");
    let bad = ActGradKind::glu(Activation::Silu, Some(GluClamp::deepseek_v4(f32::NAN)));
    names(b.act_grad(bad, &y5, &pre), "clamp.limit");
    let w_in = b.upload_weight(&ht(&[3, 6, 3], vec![0.0; 54]), DType::F32).unwrap();
    let w_out = b.upload_weight(&ht(&[3, 3, 3], vec![0.0; 27]), DType::F32).unwrap();
    let mlp = MlpWeights {
        kind: ExpertKind::Glu { activation: Activation::Relu, clamp: Some(GluClamp::gpt_oss(7.0, 0.5)) },
        w_in: &w_in,
        b_in: None,
        w_out: Some(&w_out),
        b_out: None,
    };
    names(b.grouped_mlp(&y5, &off, &mlp, false), "clamp.alpha");
}

#[test]
fn expert_parallel_ops_refuse_placements_tokens_and_tables_that_do_not_fit() {
    let b = cpu(1);
    let (routes, spec) = top2_routes(&b, 6, 4);
    let plan = b.plan(&routes, &spec).unwrap();
    // Placements: an expert without a slot, a slot used twice or past the slots, a slot
    // holding no expert.
    for (reps, why) in [
        (vec![vec![0], vec![1], vec![], vec![3]], "expert 2 has no slot"),
        (vec![vec![0], vec![1], vec![1], vec![3]], "slot 1 of expert 2 already holds"),
        (vec![vec![0], vec![1], vec![2], vec![7]], "slot 7 of expert 3 is past"),
        (vec![vec![0], vec![1], vec![2], vec![3]], "slot 4 holds no expert"),
    ] {
        let slots_per_rank = if why.contains("slot 4") { 3 } else { 2 };
        let err = DevicePlacement::new(&b, &reps, slots_per_rank, 2).err().expect(why);
        assert!(err.to_string().contains(why), "{why}: {err}");
    }
    // A placement of 3 experts for a plan over 4; tokens past the plan's.
    let three = DevicePlacement::new(&b, &[vec![0], vec![1], vec![2]], 3, 1).unwrap();
    assert!(matches!(b.bucket(&plan, &three, 0..6), Err(Error::Config { ref field, .. }) if field == "placement"));
    let four = DevicePlacement::new(&b, &[vec![0], vec![1], vec![2], vec![3]], 2, 2).unwrap();
    assert!(matches!(b.bucket(&plan, &four, 2..7), Err(Error::Precondition(_))));
    assert_eq!(b.bucket(&plan, &four, 2..4).unwrap().counts.shape(), &[4 + 2]);
    // Block tables reading past their input; a regroup of the wrong number of rows.
    assert!(matches!(BlockTable::new(&b, &[(0, 2), (3, 2)], 4), Err(Error::Precondition(_))));
    let table = BlockTable::new(&b, &[(2, 2), (0, 2)], 4).unwrap();
    let x = up_f32(&b, &[5, 3], vec![0.0; 15]);
    assert!(matches!(b.regroup(&x, &table), Err(Error::Shape { .. })));
    // A permute of another number of tokens than the routes'.
    let x = up_f32(&b, &[5, 3], vec![0.0; 15]);
    assert!(matches!(b.permute(&x, &plan.route_rows()), Err(Error::Shape { .. })));
}

// ------------------------------------------------------------------ capacities

/// The reported capacity of a DeepSpeed top-1 gate over `s` tokens on `b`.
fn capacity<B: Backend>(b: &B, s: usize, factor: f64, min_capacity: usize) -> moe_engine::Result<(i64, Vec<i32>)> {
    let g = DeepSpeedGate {
        k: 1,
        capacity_factor: factor,
        eval_capacity_factor: factor,
        min_capacity,
        use_rts: false,
        ..Default::default()
    };
    let e = 4;
    let mut w = vec![0f32; e * e];
    (0..e).for_each(|i| w[i * e + i] = 1.0);
    let gate = Gate::new(b, GateSpec::DeepSpeed(g), &ht(&[e, e], w), None)?;
    let x = b.upload(&ht(&[s, e], common::lcg(9, s * e, 1.0)))?;
    let out = gate.forward(b, &x, s, &GateOptions::default())?;
    let kept = common::i32s(b, &out.plan.kept_counts);
    Ok((out.report(b)?.capacity, kept))
}

#[test]
fn capacities_past_i32_are_checked_integers_reported_exactly() {
    let b = cpu(1);
    // ceil(16 / 4 · 1e12) in DeepSpeed's f32 arithmetic (1e12 rounds to 999999995904 in
    // f32): past i32, kept exactly in the report, and every route kept.
    let (cap, kept) = capacity(&b, 16, 1e12, 0).unwrap();
    assert_eq!(cap, (4.0f32 * 1e12f32).ceil() as i64);
    assert!(cap > i32::MAX as i64);
    assert_eq!(kept.iter().sum::<i32>(), 16);
    // A factor whose product is not a finite 64-bit count names the field.
    let e = capacity(&b, 16, 1e300, 0).unwrap_err();
    assert!(matches!(&e, Error::Config { field, .. } if field == "capacity_factor"), "{e}");
    // A min_capacity past i64 names its field.
    let e = capacity(&b, 16, 1.0, usize::MAX).unwrap_err();
    assert!(e.to_string().contains("min_capacity"), "{e}");
    if let Some(w) = common::wgpu("capacities_past_i32_are_checked_integers_reported_exactly") {
        for (factor, min) in [(1e12, 0), (1.0, 3), (0.1, 0), (3e9, 7)] {
            assert_eq!(
                capacity(&w, 16, factor, min).unwrap(),
                capacity(&b, 16, factor, min).unwrap(),
                "factor {factor}"
            );
        }
    }
}

// ------------------------------------------------------------------ the layer and the gate

#[test]
fn a_router_with_zero_experts_or_width_is_refused() {
    let b = cpu(1);
    let g = GateSpec::SoftmaxTopK { k: 1, normalize: false };
    assert!(Gate::new(&b, g.clone(), &HostTensor::f32(&[0, 4], vec![]).unwrap(), None).is_err());
    assert!(Gate::new(&b, g.clone(), &HostTensor::f32(&[1_000_000_000, 0], vec![]).unwrap(), None).is_err());
    assert!(Gate::new(&b, GateSpec::SoftmaxTopK { k: 5, normalize: false }, &ht(&[4, 2], vec![0.0; 8]), None).is_err());
}

#[test]
fn a_layer_forward_takes_only_f32_inputs_of_its_width() {
    let b = cpu(1);
    let spec = LayerSpec {
        output_bias: false,
        hidden: 8,
        num_experts: 4,
        gate: GateSpec::SoftmaxTopK { k: 2, normalize: true },
        expert: ExpertSpec {
            kind: ExpertKind::Glu { activation: Activation::Silu, clamp: None },
            ffn: 16,
            bias: false,
        },
        residual: false,
        shared: None,
    };
    let layer = MoeLayer::new(&b, spec.clone(), &stack::random_weights(&spec, 3).unwrap(), DType::F32).unwrap();
    let opts = LayerOptions::default();
    let ints = b.upload(&HostTensor::i32(&[3, 8], vec![1; 24]).unwrap()).unwrap();
    assert!(matches!(layer.forward(&b, &ints, &opts), Err(Error::DType { .. })));
    for shape in [vec![8], vec![3, 7], vec![1, 2, 3, 8]] {
        let n = shape.iter().product();
        let x = up_f32(&b, &shape, vec![0.5; n]);
        assert!(matches!(layer.forward(&b, &x, &opts), Err(Error::Shape { .. })), "{shape:?}");
    }
    // Zero tokens is a valid, empty batch.
    let x = up_f32(&b, &[0, 8], vec![]);
    assert_eq!(f32s(&b, &layer.forward(&b, &x, &opts).unwrap().y), Vec::<f32>::new());
}

#[test]
fn noise_overrides_of_the_wrong_shape_are_errors() {
    let b = cpu(1);
    let g = DeepSpeedGate { k: 2, top2_2nd_expert_sampling: true, min_capacity: 0, ..Default::default() };
    let gate = Gate::new(&b, GateSpec::DeepSpeed(g), &ht(&[4, 4], common::lcg(5, 16, 1.0)), None).unwrap();
    let x = up_f32(&b, &[6, 4], common::lcg(6, 24, 1.0));
    let opts = GateOptions {
        noise: NoiseOverrides { gumbel: Some(ht(&[5, 4], vec![0.0; 20])), ..Default::default() },
        ..Default::default()
    };
    assert!(
        matches!(gate.forward(&b, &x, 6, &opts).err(), Some(Error::Shape { tensor, .. }) if tensor == "noise.gumbel")
    );
}

#[test]
fn a_communicator_timeout_near_u64_max_does_not_overflow() {
    let comms = moe_engine::parallel::in_process(2, Duration::from_secs(u64::MAX));
    std::thread::scope(|s| {
        for c in comms {
            s.spawn(move || {
                use moe_engine::parallel::Communicator;
                assert_eq!(c.all_gather(vec![c.rank() as u8]).unwrap(), vec![vec![0], vec![1]]);
            });
        }
    });
}

#[test]
fn cast_weight_refuses_vectors_integers_i32_storage_and_halves_a_backend_cannot_store() {
    let b = cpu(1);
    let shape = |r: moe_engine::Result<Tensor<CpuBackend>>| match r {
        Err(Error::Shape { tensor, .. }) => assert_eq!(tensor, "cast_weight input"),
        Err(e) => panic!("expected a shape error, got {e}"),
        Ok(_) => panic!("cast a tensor that is no matrix or stack"),
    };
    shape(b.cast_weight(&up_f32(&b, &[6], vec![0.0; 6]), DType::F32));
    shape(b.cast_weight(&up_f32(&b, &[1, 2, 3, 1], vec![0.0; 6]), DType::F32));
    let ints = b.upload(&HostTensor::i32(&[2, 3], vec![0; 6]).unwrap()).unwrap();
    assert!(matches!(b.cast_weight(&ints, DType::F32), Err(Error::DType { .. })));
    let x = up_f32(&b, &[2, 3], vec![1.0; 6]);
    assert!(matches!(b.cast_weight(&x, DType::I32), Err(Error::DType { .. })));
    let f32_only = CpuBackend::f32_reference(Some(1)).unwrap();
    let xr = up_f32(&f32_only, &[2, 3], vec![1.0; 6]);
    for d in [DType::F16, DType::BF16] {
        assert!(matches!(f32_only.cast_weight(&xr, d), Err(Error::Unsupported { .. })), "{d}");
    }
    // The cpu itself stores halves: rounded to nearest even, read back as their values.
    let v: Vec<f32> = vec![1.0 + 2f32.powi(-10), -3.3, 65504.0, 1e-8, 0.0, 7.0];
    let x = up_f32(&b, &[2, 3], v.clone());
    for d in [DType::F16, DType::BF16] {
        let c = b.cast_weight(&x, d).unwrap();
        assert_eq!(c.dtype(), d);
        assert_eq!(f32s(&b, &c), v.iter().map(|&x| d.round(x)).collect::<Vec<_>>(), "{d}");
    }
    // f32 is a copy in the weight layout, even of a weight reshaped to other matrices.
    let w = b.upload_weight(&ht(&[2, 3], (0..6).map(|i| i as f32).collect()), DType::F32).unwrap();
    let c = b.cast_weight(&w.reshape(&[3, 2]).unwrap(), DType::F32).unwrap();
    assert_eq!(f32s(&b, &c), (0..6).map(|i| i as f32).collect::<Vec<_>>());
}

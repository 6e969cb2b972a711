//! Configuration errors: `LayerSpec::validate` and the DeepSpeed / HF config importers must
//! reject bad values with an `Error::Config` whose field (and Display text) names the
//! offending field.

use moe_engine::config::{
    DeepSeekV2Method, DeepSpeedGate, DropPolicy, ExpertSpec, GateSpec, LayerSpec, NoisyGatePolicy, SharedSpec,
};
use moe_engine::import::{deepspeed, hf};
use moe_engine::{Activation, ExpertKind};
use moe_engine::{Error, Result};
use serde_json::{json, Value};

/// Asserts a config error naming `field`, in the variant and in its Display text.
#[track_caller]
fn expect_field<T: std::fmt::Debug>(r: Result<T>, field: &str) {
    match r {
        Err(e @ Error::Config { .. }) => {
            let msg = e.to_string();
            let Error::Config { field: f, .. } = &e else { unreachable!() };
            assert_eq!(f, field, "wrong field in `{msg}`");
            assert!(msg.contains(&format!("`{field}`")), "Display `{msg}` does not name `{field}`");
        }
        other => panic!("expected a config error naming `{field}`, got {other:?}"),
    }
}

fn glu(ffn: usize) -> ExpertSpec {
    ExpertSpec { kind: ExpertKind::Glu { activation: Activation::Silu, clamp: None }, ffn, bias: false }
}

fn base() -> LayerSpec {
    LayerSpec {
        output_bias: false,
        hidden: 8,
        num_experts: 8,
        gate: GateSpec::SoftmaxTopK { k: 2, normalize: true },
        expert: glu(16),
        residual: false,
        shared: None,
    }
}

fn with_gate(gate: GateSpec) -> LayerSpec {
    LayerSpec { gate, ..base() }
}

fn v3(k: usize, n_group: usize, topk_group: usize) -> GateSpec {
    GateSpec::DeepSeekV3 { k, n_group, topk_group, normalize: true, routed_scaling_factor: 2.5 }
}

fn v2(k: usize, n_group: usize, topk_group: usize, method: DeepSeekV2Method) -> GateSpec {
    GateSpec::DeepSeekV2 { k, n_group, topk_group, method, normalize: false, routed_scaling_factor: 1.0 }
}

fn ds(g: DeepSpeedGate) -> GateSpec {
    GateSpec::DeepSpeed(g)
}

// ------------------------------------------------------------------------ LayerSpec::validate

#[test]
fn valid_specs_pass() {
    base().validate().unwrap();
    with_gate(v3(8, 4, 4)).validate().unwrap();
    with_gate(v3(2, 4, 1)).validate().unwrap(); // 1 kept group of 2 experts holds k = 2
    with_gate(v2(6, 3, 1, DeepSeekV2Method::Greedy)).validate().unwrap(); // groups unused by greedy
    with_gate(ds(DeepSpeedGate { k: 2, noisy_gate_policy: Some(NoisyGatePolicy::Jitter), ..Default::default() }))
        .validate()
        .unwrap();
    with_gate(ds(DeepSpeedGate { k: 1, noisy_gate_policy: Some(NoisyGatePolicy::RSample), ..Default::default() }))
        .validate()
        .unwrap();
    // Linear experts ignore ffn.
    LayerSpec { expert: ExpertSpec { kind: ExpertKind::Linear, ffn: 0, bias: true }, ..base() }.validate().unwrap();
}

#[test]
fn k_zero_or_above_e_names_k() {
    expect_field(with_gate(GateSpec::SoftmaxTopK { k: 0, normalize: true }).validate(), "k");
    expect_field(with_gate(GateSpec::SoftmaxTopK { k: 9, normalize: true }).validate(), "k");
    expect_field(with_gate(ds(DeepSpeedGate { k: 0, ..Default::default() })).validate(), "k");
    expect_field(with_gate(ds(DeepSpeedGate { k: 9, ..Default::default() })).validate(), "k");
    expect_field(with_gate(v3(0, 4, 2)).validate(), "k");
    // k = E is allowed.
    with_gate(GateSpec::SoftmaxTopK { k: 8, normalize: false }).validate().unwrap();
}

#[test]
fn zero_sizes_name_the_field() {
    expect_field(LayerSpec { hidden: 0, ..base() }.validate(), "hidden_size");
    expect_field(LayerSpec { num_experts: 0, ..base() }.validate(), "num_experts");
    expect_field(LayerSpec { expert: glu(0), ..base() }.validate(), "expert.ffn_hidden");
    let mlp0 = ExpertSpec { kind: ExpertKind::Mlp { activation: Activation::Relu }, ffn: 0, bias: true };
    expect_field(LayerSpec { expert: mlp0, ..base() }.validate(), "expert.ffn_hidden");
    let shared = Some(SharedSpec { combine: Default::default(), expert: glu(0), gated: true });
    expect_field(LayerSpec { shared, ..base() }.validate(), "shared_expert.ffn_hidden");
    expect_field(with_gate(GateSpec::Switch { expert_capacity: 0 }).validate(), "expert_capacity");
}

#[test]
fn expert_groups_name_the_field() {
    // 8 experts in 3 groups: 3 does not divide 8.
    expect_field(with_gate(v3(2, 3, 1)).validate(), "n_group");
    expect_field(with_gate(v3(2, 0, 1)).validate(), "n_group");
    expect_field(with_gate(v2(2, 3, 1, DeepSeekV2Method::GroupLimitedGreedy)).validate(), "n_group");
    // topk_group must be in 1..=n_group.
    expect_field(with_gate(v3(2, 4, 5)).validate(), "topk_group");
    expect_field(with_gate(v3(2, 4, 0)).validate(), "topk_group");
    expect_field(with_gate(v2(2, 4, 5, DeepSeekV2Method::GroupLimitedGreedy)).validate(), "topk_group");
    // 1 kept group of 8 / 4 = 2 experts cannot hold k = 3 routes.
    expect_field(with_gate(v3(3, 4, 1)).validate(), "num_experts_per_tok");
    // DeepSeek-V2 is different: HF masks the other groups' scores with 0 (not −inf), so
    // k beyond the kept groups' experts is valid there (the extra routes weigh 0).
    with_gate(v2(5, 4, 2, DeepSeekV2Method::GroupLimitedGreedy)).validate().unwrap();
    // DeepSeek-V3's sum-of-top-2 group score needs 2 experts per group.
    expect_field(with_gate(v3(2, 8, 4)).validate(), "n_group");
    // A non-finite routed_scaling_factor.
    let g = GateSpec::DeepSeekV3 { k: 2, n_group: 4, topk_group: 2, normalize: true, routed_scaling_factor: f32::NAN };
    expect_field(with_gate(g).validate(), "routed_scaling_factor");
}

#[test]
fn bad_capacity_factors_name_the_field() {
    // Parsed so the values take the field's float type.
    let bad = ["0", "-1", "NaN", "inf"].map(|v| v.parse().unwrap());
    for v in bad {
        expect_field(
            with_gate(ds(DeepSpeedGate { capacity_factor: v, ..Default::default() })).validate(),
            "capacity_factor",
        );
        expect_field(
            with_gate(ds(DeepSpeedGate { eval_capacity_factor: v, ..Default::default() })).validate(),
            "eval_capacity_factor",
        );
    }
}

#[test]
fn rsample_with_k_above_one_is_accepted_like_deepspeed() {
    // DeepSpeed's MoE accepts noisy_gate_policy = RSample whatever k is and applies it in
    // top1gating only (top2gating / topkgating never see it), so validation accepts it; the
    // policy's lack of effect is checked in capacity_slots.rs.
    for k in [2, 3] {
        let g = DeepSpeedGate { k, noisy_gate_policy: Some(NoisyGatePolicy::RSample), ..Default::default() };
        with_gate(ds(g)).validate().unwrap();
    }
    // An unknown policy name is still an error naming the field.
    expect_field(deepspeed::gate_spec(&json!({"k": 2, "noisy_gate_policy": "rsample"})), "noisy_gate_policy");
}

#[test]
fn residual_and_shared_are_exclusive() {
    let spec = LayerSpec {
        residual: true,
        shared: Some(SharedSpec { combine: Default::default(), expert: glu(16), gated: false }),
        ..base()
    };
    expect_field(spec.validate(), "use_residual");
    LayerSpec { residual: true, ..base() }.validate().unwrap();
    LayerSpec { shared: Some(SharedSpec { combine: Default::default(), expert: glu(16), gated: false }), ..base() }
        .validate()
        .unwrap();
}

// ------------------------------------------------------------------------ DeepSpeed importer

fn ds_cfg() -> Value {
    json!({
        "hidden_size": 8,
        "num_experts": 4,
        "k": 1,
        "expert": {"type": "mlp_gelu", "ffn_hidden": 16},
    })
}

fn with(mut v: Value, key: &str, val: Value) -> Value {
    v[key] = val;
    v
}

fn without(mut v: Value, key: &str) -> Value {
    v.as_object_mut().unwrap().remove(key);
    v
}

#[test]
fn deepspeed_config_parses_with_deepspeed_defaults() {
    let spec = deepspeed::layer_spec(&ds_cfg()).unwrap();
    assert_eq!((spec.hidden, spec.num_experts), (8, 4));
    assert_eq!(spec.expert, ExpertSpec { kind: ExpertKind::Mlp { activation: Activation::Gelu }, ffn: 16, bias: true });
    // deepspeed.moe.layer.MoE defaults: capacity 1.0 / 1.0, min_capacity 4, no noise,
    // drop_tokens, use_rts, top2_2nd_expert_sampling, drop_policy probs.
    let GateSpec::DeepSpeed(g) = &spec.gate else { panic!("not a DeepSpeed gate: {:?}", spec.gate) };
    assert_eq!(g.k, 1);
    assert_eq!((g.capacity_factor, g.eval_capacity_factor, g.min_capacity), (1.0, 1.0, 4));
    assert_eq!(g.noisy_gate_policy, None);
    assert!(g.drop_tokens && g.use_rts && g.top2_2nd_expert_sampling);
    assert_eq!(g.drop_policy, DropPolicy::Probs);
    assert!(!spec.residual);
    let g = deepspeed::gate_spec(&json!({"noisy_gate_policy": "Jitter", "drop_policy": "position", "k": 3})).unwrap();
    assert_eq!((g.noisy_gate_policy, g.drop_policy, g.k), (Some(NoisyGatePolicy::Jitter), DropPolicy::Position, 3));
    // "None" (the string DeepSpeed scripts pass) and null both mean no policy.
    assert_eq!(deepspeed::gate_spec(&json!({"noisy_gate_policy": "None"})).unwrap().noisy_gate_policy, None);
    assert_eq!(deepspeed::gate_spec(&json!({"noisy_gate_policy": null})).unwrap().noisy_gate_policy, None);
}

#[test]
fn deepspeed_bad_policies_name_the_field() {
    expect_field(deepspeed::gate_spec(&json!({"noisy_gate_policy": "Gaussian"})), "noisy_gate_policy");
    expect_field(deepspeed::gate_spec(&json!({"noisy_gate_policy": 3})), "noisy_gate_policy");
    expect_field(deepspeed::gate_spec(&json!({"drop_policy": "random"})), "drop_policy");
    expect_field(deepspeed::layer_spec(&with(ds_cfg(), "noisy_gate_policy", json!("Gaussian"))), "noisy_gate_policy");
    expect_field(deepspeed::layer_spec(&with(ds_cfg(), "drop_policy", json!("random"))), "drop_policy");
    // RSample with k = 2 is accepted, as DeepSpeed accepts it (and ignores it).
    let cfg = with(with(ds_cfg(), "noisy_gate_policy", json!("RSample")), "k", json!(2));
    let spec = deepspeed::layer_spec(&cfg).unwrap();
    assert!(matches!(spec.gate, GateSpec::DeepSpeed(g) if g.noisy_gate_policy == Some(NoisyGatePolicy::RSample)));
}

#[test]
fn deepspeed_expert_errors_name_the_field() {
    expect_field(deepspeed::layer_spec(&without(ds_cfg(), "expert")), "expert");
    expect_field(deepspeed::layer_spec(&with(ds_cfg(), "expert", json!({"type": "conv"}))), "expert.type");
    expect_field(
        deepspeed::layer_spec(&with(ds_cfg(), "expert", json!({"type": "mlp_tanh", "ffn_hidden": 4}))),
        "expert.type",
    );
    expect_field(deepspeed::layer_spec(&with(ds_cfg(), "expert", json!({"ffn_hidden": 4}))), "expert.type");
    expect_field(deepspeed::layer_spec(&with(ds_cfg(), "expert", json!({"type": "glu_silu"}))), "expert.ffn_hidden");
    expect_field(deepspeed::expert_spec(&json!({"type": "moe"})), "expert.type");
    // Linear experts need no ffn_hidden.
    let spec = deepspeed::layer_spec(&with(ds_cfg(), "expert", json!({"type": "linear", "bias": false}))).unwrap();
    assert_eq!(spec.expert.kind, ExpertKind::Linear);
}

#[test]
fn deepspeed_sizes_name_the_field() {
    expect_field(deepspeed::layer_spec(&with(ds_cfg(), "ep_size", json!(3))), "ep_size");
    expect_field(deepspeed::layer_spec(&with(ds_cfg(), "ep_size", json!(0))), "ep_size");
    deepspeed::layer_spec(&with(ds_cfg(), "ep_size", json!(2))).unwrap();
    expect_field(deepspeed::layer_spec(&with(ds_cfg(), "min_capacity", json!(-1))), "min_capacity");
    expect_field(deepspeed::gate_spec(&json!({"min_capacity": -4})), "min_capacity");
    expect_field(deepspeed::layer_spec(&without(ds_cfg(), "num_experts")), "num_experts");
    expect_field(deepspeed::layer_spec(&without(ds_cfg(), "hidden_size")), "hidden_size");
    expect_field(deepspeed::layer_spec(&with(ds_cfg(), "k", json!("two"))), "k");
    expect_field(deepspeed::layer_spec(&with(ds_cfg(), "k", json!(5))), "k");
    expect_field(deepspeed::layer_spec(&with(ds_cfg(), "capacity_factor", json!(0.0))), "capacity_factor");
    expect_field(deepspeed::layer_spec(&with(ds_cfg(), "eval_capacity_factor", json!(-2.0))), "eval_capacity_factor");
}

// ------------------------------------------------------------------------ HF importer

fn qwen3() -> Value {
    json!({
        "model_type": "qwen3_moe",
        "hidden_size": 16,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 12,
        "norm_topk_prob": true,
        "hidden_act": "silu",
    })
}

fn deepseek_v2() -> Value {
    json!({
        "model_type": "deepseek_v2",
        "hidden_size": 16,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 12,
        "n_shared_experts": 2,
        "n_group": 4,
        "topk_group": 2,
        "topk_method": "group_limited_greedy",
        "routed_scaling_factor": 16.0,
    })
}

#[test]
fn hf_configs_parse() {
    let (fam, spec) = hf::layer_spec(&qwen3()).unwrap();
    assert_eq!(fam, hf::Family::Qwen3Moe);
    assert_eq!((spec.hidden, spec.num_experts, spec.expert.ffn), (16, 8, 12));
    assert_eq!(spec.gate, GateSpec::SoftmaxTopK { k: 2, normalize: true });
    let (_, spec) = hf::layer_spec(&deepseek_v2()).unwrap();
    let want = GateSpec::DeepSeekV2 {
        k: 2,
        n_group: 4,
        topk_group: 2,
        method: DeepSeekV2Method::GroupLimitedGreedy,
        normalize: false,
        routed_scaling_factor: 16.0,
    };
    assert_eq!(spec.gate, want);
    // n_shared_experts · moe_intermediate_size = 24.
    assert_eq!(spec.shared.map(|s| s.expert.ffn), Some(24));
}

#[test]
fn hf_unknown_model_type_names_model_type() {
    expect_field(hf::layer_spec(&with(qwen3(), "model_type", json!("llama"))), "model_type");
    expect_field(hf::layer_spec(&without(qwen3(), "model_type")), "model_type");
    expect_field(hf::Family::from_model_type("gpt2"), "model_type");
}

#[test]
fn hf_missing_fields_are_named() {
    expect_field(hf::layer_spec(&without(qwen3(), "num_experts_per_tok")), "num_experts_per_tok");
    expect_field(hf::layer_spec(&without(qwen3(), "moe_intermediate_size")), "moe_intermediate_size");
    let mixtral = json!({"model_type": "mixtral", "hidden_size": 8, "intermediate_size": 16, "num_experts_per_tok": 2});
    expect_field(hf::layer_spec(&mixtral), "num_local_experts / num_experts");
    let mixtral = with(mixtral, "num_local_experts", json!(4));
    hf::layer_spec(&mixtral).unwrap();
    expect_field(hf::layer_spec(&without(mixtral, "num_experts_per_tok")), "num_experts_per_tok");
    // A mistyped value names the field too.
    expect_field(hf::layer_spec(&with(qwen3(), "num_experts_per_tok", json!("2"))), "num_experts_per_tok");
    // num_experts_per_tok above the experts is caught by validation.
    expect_field(hf::layer_spec(&with(qwen3(), "num_experts_per_tok", json!(9))), "k");
}

#[test]
fn hf_nulls_are_none_as_transformers_reads_them() {
    // Fields the router needs refuse null (Python's None would fail inside transformers).
    for key in ["num_experts_per_tok", "routed_scaling_factor", "n_shared_experts", "n_group", "topk_group"] {
        expect_field(hf::layer_spec(&with(deepseek_v2(), key, Value::Null)), key);
    }
    expect_field(hf::layer_spec(&with(qwen3(), "norm_topk_prob", Value::Null)), "norm_topk_prob");
    expect_field(hf::layer_spec(&with(qwen3(), "hidden_act", Value::Null)), "hidden_act");
    // Greedy DeepSeek-V2 routing never reads the groups, whose default is None.
    let greedy = with(with(deepseek_v2(), "topk_method", json!("greedy")), "n_group", Value::Null);
    hf::layer_spec(&with(greedy, "topk_group", Value::Null)).unwrap();
    // DeepSeek-V3's `norm_topk_prob: bool | None = True` is tested for truth: null is false.
    let v3 = with(with(deepseek_v2(), "model_type", json!("deepseek_v3")), "n_group", json!(4));
    let normalize = |cfg: Value| match hf::layer_spec(&cfg).unwrap().1.gate {
        GateSpec::DeepSeekV3 { normalize, .. } => normalize,
        g => panic!("{g:?}"),
    };
    assert!(normalize(without(v3.clone(), "norm_topk_prob")));
    // An absent group count takes V3's default (topk_group 4) while the other is kept.
    match hf::layer_spec(&without(v3.clone(), "topk_group")).unwrap().1.gate {
        GateSpec::DeepSeekV3 { n_group, topk_group, .. } => assert_eq!((n_group, topk_group), (4, 4)),
        g => panic!("{g:?}"),
    }
    assert!(!normalize(with(v3, "norm_topk_prob", Value::Null)));
}

#[test]
fn hf_bad_topk_method_names_topk_method() {
    expect_field(hf::layer_spec(&with(deepseek_v2(), "topk_method", json!("noaux_tc"))), "topk_method");
    // group_limited_greedy with groups that do not divide the experts.
    expect_field(hf::layer_spec(&with(deepseek_v2(), "n_group", json!(3))), "n_group");
}

#[test]
fn hf_unsupported_activation_names_the_field() {
    expect_field(hf::layer_spec(&with(qwen3(), "hidden_act", json!("tanh"))), "hidden_act");
    expect_field(hf::layer_spec(&with(deepseek_v2(), "hidden_act", json!("mish"))), "hidden_act");
    let switch = json!({
        "model_type": "switch_transformers",
        "d_model": 8,
        "d_ff": 16,
        "num_experts": 4,
        "expert_capacity": 2,
        "dense_act_fn": "gelu_fast",
    });
    expect_field(hf::layer_spec(&switch), "dense_act_fn");
    // A biased Switch router is named.
    let switch = with(with(switch, "dense_act_fn", json!("relu")), "router_bias", json!(true));
    expect_field(hf::layer_spec(&switch), "router_bias");
}

/// The config.json of a golden model-family case.
fn case_config(case: &str) -> Value {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden-models")
        .join(case)
        .join("model/config.json");
    serde_json::from_str(&std::fs::read_to_string(p).expect("config")).expect("json")
}

#[test]
fn model_family_configs_name_the_field_they_cannot_use() {
    // Values the families' own code refuses, or the engine cannot run, name their key.
    let v4 = case_config("23_deepseek_v4");
    expect_field(hf::layer_spec(&with(v4.clone(), "scoring_func", json!("tanh"))), "scoring_func");
    expect_field(hf::layer_spec(&with(v4, "swiglu_limit", json!(-1.0))), "clamp.limit");
    let cohere = case_config("29_cohere2_moe");
    expect_field(hf::layer_spec(&with(cohere.clone(), "expert_selection_fn", json!("relu"))), "expert_selection_fn");
    expect_field(
        hf::layer_spec(&with(cohere, "shared_expert_combination_strategy", json!("max"))),
        "shared_expert_combination_strategy",
    );
    expect_field(hf::layer_spec(&without(case_config("20_dbrx"), "ffn_config")), "ffn_config");
    let mut dbrx = case_config("20_dbrx");
    dbrx["ffn_config"]["moe_normalize_expert_weights"] = json!(-2.0);
    expect_field(hf::layer_spec(&dbrx), "moe_normalize_expert_weights");
    expect_field(
        hf::layer_spec(&with(case_config("21_phimoe"), "num_experts_per_tok", json!(3))),
        "num_experts_per_tok",
    );
    expect_field(hf::layer_spec(&with(case_config("15_ernie4_5_moe"), "moe_norm_min", json!(-1.0))), "normalize");
    expect_field(
        hf::layer_spec(&with(case_config("24_longcat_flash"), "zero_expert_num", json!(-1))),
        "zero_expert_num",
    );
    expect_field(hf::layer_spec(&with(case_config("10_gpt_oss"), "model_type", json!("gpt_neo"))), "model_type");
    // A multimodal config: the text config is read (the family from the outer type when
    // the text config names none), and its missing keys are named.
    let nested = json!({"model_type": "llama4", "text_config": {"hidden_size": 8}});
    expect_field(hf::layer_spec(&nested), "intermediate_size");
    expect_field(hf::layer_spec(&json!({"text_config": {"hidden_size": 8}})), "model_type");
}

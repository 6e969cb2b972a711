//! Loading an MoE block from an HF model folder: config.json plus sharded safetensors with
//! the model's full tensor names, as downloaded from a hub.

use moe_engine::import::hf::{HfModel, LayerKind};
use moe_engine::import::{hf, save_safetensors, Checkpoint};
use moe_engine::{golden, stack, DType, Device, HostTensor, LayerOptions, MoeLayer};
use std::collections::BTreeMap;

mod common;

fn tmpdir(tag: &str) -> std::path::PathBuf {
    common::tmp_dir("hf_model_dir", tag)
}

fn f32t(shape: &[usize], seed: u64) -> HostTensor {
    let n: usize = shape.iter().product();
    let v = moe_engine::philox::noise(moe_engine::philox::NoiseKind::Uniform, seed, 0, n)
        .into_iter()
        .map(|u| u - 0.5)
        .collect();
    HostTensor::f32(shape, v).expect("shape")
}

#[test]
fn mixtral_block_loads_from_sharded_model_folder() {
    let dir = tmpdir("mixtral");
    let cfg = serde_json::json!({
        "model_type": "mixtral", "hidden_size": 16, "intermediate_size": 24,
        "num_local_experts": 4, "num_experts_per_tok": 2, "hidden_act": "silu",
        "num_hidden_layers": 2
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).expect("write config");
    // Layer 1's block, split over two shards, next to unrelated tensors of the model.
    let p = "model.layers.1.block_sparse_moe.";
    let mut a = BTreeMap::new();
    let mut b = BTreeMap::new();
    a.insert(format!("{p}gate.weight"), f32t(&[4, 16], 1));
    a.insert("model.embed_tokens.weight".to_string(), f32t(&[10, 16], 2));
    for e in 0..4u64 {
        let shard = if e < 2 { &mut a } else { &mut b };
        shard.insert(format!("{p}experts.{e}.w1.weight"), f32t(&[24, 16], 10 + e));
        shard.insert(format!("{p}experts.{e}.w3.weight"), f32t(&[24, 16], 20 + e));
        shard.insert(format!("{p}experts.{e}.w2.weight"), f32t(&[16, 24], 30 + e));
    }
    b.insert("model.layers.0.self_attn.q_proj.weight".to_string(), f32t(&[16, 16], 3));
    save_safetensors(&dir.join("model-00001-of-00002.safetensors"), &a).expect("write shard 1");
    save_safetensors(&dir.join("model-00002-of-00002.safetensors"), &b).expect("write shard 2");

    let (fam, spec, w) = hf::load_block(&dir, 1).expect("layer 1 loads");
    assert_eq!(fam, hf::Family::Mixtral);
    assert_eq!((spec.num_experts, spec.hidden, spec.expert.ffn), (4, 16, 24));
    // Gate rows then up rows in the stacked input projection of expert 2.
    let w_in = w.experts.w_in.as_f32("w_in").expect("f32");
    let gate2 = f32t(&[24, 16], 12);
    let up2 = f32t(&[24, 16], 22);
    let base = 2 * 48 * 16;
    assert_eq!(&w_in[base..base + 24 * 16], gate2.as_f32("g").expect("f32"));
    assert_eq!(&w_in[base + 24 * 16..base + 48 * 16], up2.as_f32("u").expect("f32"));

    // The block runs.
    let cpu = moe_cpu::CpuBackend::new(Some(1)).expect("cpu");
    let layer = MoeLayer::new(&cpu, spec, &w, DType::F32).expect("layer");
    let x = cpu.upload(&f32t(&[5, 16], 9)).expect("upload");
    let out = layer.forward(&cpu, &x, &LayerOptions::default()).expect("forward");
    assert_eq!(out.report(&cpu).expect("report").exp_counts.iter().sum::<i64>(), 10);

    // A layer without an MoE block is a clear error naming the missing prefix.
    let err = hf::load_block(&dir, 0).expect_err("layer 0 has no block").to_string();
    assert!(err.contains("model.layers.0.block_sparse_moe."), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn save_and_load_round_trip() {
    let dir = tmpdir("roundtrip");
    let spec = hf::layer_spec(&serde_json::json!({
        "model_type": "qwen3_moe", "hidden_size": 8, "moe_intermediate_size": 4,
        "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": true
    }))
    .expect("spec")
    .1;
    let w = stack::random_weights(&spec, 5).expect("weights");
    let mut m = BTreeMap::new();
    m.insert("gate.weight".to_string(), w.gate.clone());
    m.insert("experts.gate_up_proj".to_string(), w.experts.w_in.clone());
    m.insert("experts.down_proj".to_string(), w.experts.w_out.clone().expect("down"));
    let path = dir.join("m.safetensors");
    save_safetensors(&path, &m).expect("save");
    let ck = Checkpoint::load(&path).expect("load");
    assert_eq!(ck.get("experts.gate_up_proj").expect("present"), &w.experts.w_in);
    std::fs::remove_dir_all(&dir).ok();
}

/// The model folder of a golden model-family case.
fn case_model(case: &str) -> std::path::PathBuf {
    common::golden_models_dir().join(case).join("model")
}

#[test]
fn every_case_folder_says_which_layers_are_moe() {
    // Layer 1 of every case is an MoE layer; layer 0 is dense where the family's config
    // makes it so (mlp_only_layers, first_k_dense_replace, mlp_layer_types, moe_layers,
    // the ERNIE interval, Jamba's period, num_dense_layers) and hash-routed in DeepSeek-V4.
    let dense0 = [
        "02_qwen2_moe",
        "03_qwen3_moe",
        "05_deepseek_v2",
        "06_deepseek_v3",
        "07_glm4_moe",
        "11_llama4",
        "14_dots1",
        "15_ernie4_5_moe",
        "19_jamba",
        "22_deepseek_v32",
        "26_lfm2_moe",
        "27_exaone_moe",
        "28_afmoe",
        "29_cohere2_moe",
        "32_deepseek_v3_fp8",
        "33_qwen3_moe_bf16",
    ];
    for case in golden::discover(&common::golden_models_dir()).expect("cases") {
        let name = case.file_name().and_then(|n| n.to_str()).expect("name").to_string();
        let model = HfModel::open(&case.join("model")).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(model.num_layers(), 2, "{name}");
        let moe = model.moe_layers();
        assert!(moe.contains(&1), "{name}: layer 1 is the case's MoE layer, got {moe:?}");
        let layer0 = model.check_moe_layer(0);
        match name.as_str() {
            n if dense0.contains(&n) => {
                let e = layer0.expect_err("layer 0 is dense").to_string();
                assert!(e.contains("dense") && e.contains("MoE layers are 1"), "{name}: {e}");
            }
            "23_deepseek_v4" => {
                let e = layer0.expect_err("layer 0 is hash-routed").to_string();
                assert!(e.contains("hash-routed") && e.contains("MoE layers are 1"), "{name}: {e}");
                assert!(matches!(model.layer_kinds()[0], LayerKind::Unsupported(_)));
            }
            _ => layer0.unwrap_or_else(|e| panic!("{name}: layer 0 is MoE too: {e}")),
        }
        let e = model.check_moe_layer(2).expect_err("past the end").to_string();
        assert!(e.contains("past the model's 2 layers"), "{name}: {e}");
    }
}

#[test]
fn layer_rules_follow_each_config_key() {
    let dir = tmpdir("layer_rules");
    let kinds = |cfg: serde_json::Value| -> Vec<usize> {
        std::fs::write(dir.join("config.json"), cfg.to_string()).expect("write config");
        HfModel::open(&dir).expect("config").moe_layers()
    };
    let qwen = |extra: serde_json::Value| {
        let mut c = serde_json::json!({"model_type": "qwen3_moe", "hidden_size": 8, "moe_intermediate_size": 4,
            "num_experts": 4, "num_experts_per_tok": 2, "num_hidden_layers": 6});
        c.as_object_mut().expect("object").extend(extra.as_object().expect("object").clone());
        c
    };
    // (layer + 1) % decoder_sparse_step == 0, minus mlp_only_layers.
    assert_eq!(kinds(qwen(serde_json::json!({"decoder_sparse_step": 2}))), vec![1, 3, 5]);
    assert_eq!(kinds(qwen(serde_json::json!({"decoder_sparse_step": 1, "mlp_only_layers": [0, 4]}))), vec![1, 2, 3, 5]);
    let ds = serde_json::json!({"model_type": "deepseek_v3", "hidden_size": 8, "moe_intermediate_size": 4,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "num_hidden_layers": 5, "first_k_dense_replace": 3,
        "n_group": 2, "topk_group": 1});
    assert_eq!(kinds(ds), vec![3, 4]);
    // Llama 4 without an explicit list: every interleave_moe_layer_step-th layer.
    let llama = serde_json::json!({"model_type": "llama4_text", "hidden_size": 8, "intermediate_size": 4,
        "num_local_experts": 4, "num_experts_per_tok": 1, "num_hidden_layers": 6, "interleave_moe_layer_step": 2});
    assert_eq!(kinds(llama), vec![1, 3, 5]);
    // A multimodal config: the text model's settings and layers count.
    let nested = serde_json::json!({"model_type": "llama4", "text_config": {"model_type": "llama4_text",
        "hidden_size": 8, "intermediate_size": 4, "num_local_experts": 4, "num_experts_per_tok": 1,
        "num_hidden_layers": 4, "moe_layers": [0, 2]}, "vision_config": {"model_type": "llama4_vision_model"}});
    assert_eq!(kinds(nested), vec![0, 2]);
    let ernie = serde_json::json!({"model_type": "ernie4_5_moe", "hidden_size": 8, "moe_intermediate_size": 4,
        "moe_num_experts": 4, "moe_k": 2, "num_hidden_layers": 8, "moe_layer_start_index": 2,
        "moe_layer_end_index": 6, "moe_layer_interval": 2});
    assert_eq!(kinds(ernie), vec![3, 5]);
    let jamba = serde_json::json!({"model_type": "jamba", "hidden_size": 8, "intermediate_size": 4,
        "num_experts": 4, "num_experts_per_tok": 2, "num_hidden_layers": 8, "expert_layer_period": 4,
        "expert_layer_offset": 2});
    assert_eq!(kinds(jamba), vec![2, 6]);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_multimodal_checkpoint_nests_the_text_block_and_still_loads() {
    // Qwen3.5-MoE's text model saved inside a multimodal model: the config nests it in
    // `text_config`, the tensors sit under `model.language_model.`.
    let src = case_model("09_qwen3_5_moe");
    let dir = tmpdir("multimodal");
    let text: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).expect("config")).expect("json");
    let cfg = serde_json::json!({"model_type": "qwen3_5_moe", "text_config": text,
        "vision_config": {"model_type": "qwen3_5_moe_vision"}});
    std::fs::write(dir.join("config.json"), cfg.to_string()).expect("write config");
    let ck = Checkpoint::load_dir(&src).expect("tensors");
    let renamed: BTreeMap<String, HostTensor> = ck
        .iter()
        .expect("tensors")
        .map(|(n, t)| (n.replacen("model.", "model.language_model.", 1), t.clone()))
        .collect();
    save_safetensors(&dir.join("model.safetensors"), &renamed).expect("save");
    let nested = HfModel::open(&dir).expect("nested config");
    assert_eq!(nested.family(), hf::Family::Qwen3_5Moe);
    let ck = nested.checkpoint().expect("checkpoint");
    assert_eq!(nested.block_prefix(&ck, 1).expect("prefix"), "model.language_model.layers.1.mlp.");
    let (spec, w) = nested.load_layer(1).expect("nested block");
    let (spec0, w0) = HfModel::open(&src).expect("plain").load_layer(1).expect("plain block");
    assert_eq!(spec, spec0);
    assert_eq!(w.experts.w_in, w0.experts.w_in);
    assert_eq!(w.gate, w0.gate);
    std::fs::remove_dir_all(&dir).ok();
}

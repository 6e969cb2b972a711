//! Loading an MoE block from an HF model folder: config.json plus sharded safetensors with
//! the model's full tensor names, as downloaded from a hub.

use moe_engine::import::{hf, save_safetensors, Checkpoint};
use moe_engine::{stack, DType, Device, HostTensor, LayerOptions, MoeLayer};
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

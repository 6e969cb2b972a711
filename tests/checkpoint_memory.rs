//! Loading one MoE block from a checkpoint folder reads that block and nothing else: a
//! folder holding the block and a 400 MB tensor of another layer is opened and the block
//! imported while the process's peak resident memory (`VmHWM`) grows by far less than the
//! big tensor. Its own test binary, with one test, so that no other test's allocations move
//! the peak.

mod common;

use moe_engine::import::{deepspeed, Checkpoint};
use serde_json::json;
use std::io::Write;
use std::path::Path;

/// The process's peak resident memory in bytes, where Linux reports it.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Writes a safetensors file of small f32 tensors followed by one f32 tensor `big` of
/// `big_len` elements, all zeros, without writing its bytes: the file is extended past
/// them, so the filesystem keeps a hole and the test itself stays cheap.
fn write_with_hole(path: &Path, small: &[(String, Vec<usize>, Vec<f32>)], big: &str, big_len: usize) {
    let mut header = serde_json::Map::new();
    let mut at = 0usize;
    for (name, shape, v) in small {
        header.insert(name.clone(), json!({"dtype": "F32", "shape": shape, "data_offsets": [at, at + 4 * v.len()]}));
        at += 4 * v.len();
    }
    header.insert(big.into(), json!({"dtype": "F32", "shape": [big_len], "data_offsets": [at, at + 4 * big_len]}));
    let mut text = serde_json::to_string(&header).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&(text.len() as u64).to_le_bytes()).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    for (_, _, v) in small {
        f.write_all(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    }
    let end = 8 + text.len() as u64 + (at + 4 * big_len) as u64;
    f.set_len(end).unwrap();
}

#[test]
fn loading_one_block_does_not_read_the_rest_of_the_checkpoint() {
    let Some(before) = peak_rss() else {
        common::skip(
            "loading_one_block_does_not_read_the_rest_of_the_checkpoint",
            "no /proc/self/status VmHWM on this platform to measure peak memory with",
        );
        return;
    };
    let dir = common::tmp_dir("checkpoint_memory", "hole");
    let (e, m, f) = (4usize, 16usize, 32usize);
    let prefix = "layers.0.moe.";
    let mut small = vec![(format!("{prefix}deepspeed_moe.gate.wg.weight"), vec![e, m], common::lcg(1, e * m, 0.5))];
    for i in 0..e {
        let p = format!("{prefix}deepspeed_moe.experts.deepspeed_experts.{i}.");
        small.push((format!("{p}0.weight"), vec![f, m], common::lcg(10 + i as u64, f * m, 0.3)));
        small.push((format!("{p}0.bias"), vec![f], common::lcg(20 + i as u64, f, 0.1)));
        small.push((format!("{p}2.weight"), vec![m, f], common::lcg(30 + i as u64, m * f, 0.3)));
        small.push((format!("{p}2.bias"), vec![m], common::lcg(40 + i as u64, m, 0.1)));
    }
    const BIG: usize = 100_000_000; // 400 MB of f32
    let big_bytes = 4 * BIG as u64;
    write_with_hole(&dir.join("model-00001-of-00002.safetensors"), &small, "layers.1.moe.lm_big.weight", BIG);
    common::write_st(
        &dir.join("model-00002-of-00002.safetensors"),
        &[common::f32_entry("embed.weight", &[2, m], &common::lcg(5, 2 * m, 1.0))],
    );
    let mut map = serde_json::Map::new();
    for (n, _, _) in &small {
        map.insert(n.clone(), json!("model-00001-of-00002.safetensors"));
    }
    map.insert("layers.1.moe.lm_big.weight".into(), json!("model-00001-of-00002.safetensors"));
    map.insert("embed.weight".into(), json!("model-00002-of-00002.safetensors"));
    std::fs::write(dir.join("model.safetensors.index.json"), json!({"metadata": {}, "weight_map": map}).to_string())
        .unwrap();

    let cfg = json!({"hidden_size": m, "num_experts": e, "k": 2, "expert": {"type": "mlp_gelu", "ffn_hidden": f}});
    let spec = deepspeed::layer_spec(&cfg).unwrap();
    let mut ck = Checkpoint::load_dir(&dir).unwrap();
    // Every name is known from the headers, the big tensor's included, with its shape.
    assert!(ck.contains("layers.1.moe.lm_big.weight") && ck.contains("embed.weight"));
    assert_eq!(ck.shape("layers.1.moe.lm_big.weight"), Some(vec![BIG]));
    let w = deepspeed::layer_weights(&mut ck, &spec, prefix).unwrap();
    assert_eq!(w.experts.w_in.shape(), [e, f, m]);
    assert_eq!(w.experts.w_in.as_f32("w_in").unwrap()[..4], small[1].2[..4]);
    let after = peak_rss().unwrap();
    let grew = after.saturating_sub(before);
    assert!(grew < big_bytes / 8, "peak RSS grew by {grew} bytes loading one block beside a {big_bytes}-byte tensor");

    // The measure itself sees memory that is touched: 128 MB written lifts the peak.
    let touched = vec![1u8; 128 << 20];
    std::hint::black_box(&touched);
    let control = peak_rss().unwrap();
    drop(touched);
    assert!(control >= after + (64 << 20), "VmHWM did not see 128 MB being touched ({after} -> {control})");
    std::fs::remove_dir_all(&dir).unwrap();
}

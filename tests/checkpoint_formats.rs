//! The checkpoint formats `Checkpoint` reads, and how it refuses bad ones: quantized HF
//! folders (MXFP4, FP8 block scales) dequantized exactly as transformers loads them, sharded
//! folders through `model.safetensors.index.json`, headers that lie, dtypes that do not
//! convert, torch `.pt` archives and DeepSpeed checkpoint folders. Every bad input is an
//! error naming the file and the tensor, never a panic.

mod common;

use common::{f32_entry, write_st, Entry};
use moe_engine::golden;
use moe_engine::import::{deepspeed, Checkpoint, DeepSpeedCheckpoint, Quantization};
use moe_engine::{Error, HostTensor};
use safetensors::Dtype;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

// ------------------------------------------------------------------------------ helpers

fn tmp_dir(name: &str) -> PathBuf {
    common::tmp_dir("checkpoint_formats", name)
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// c01's DeepSpeed checkpoint folder (`latest` + `step3/`).
fn ds_folder() -> PathBuf {
    repo().join("tests/golden/c01_ds_ckpt_top2_residual/checkpoint")
}

fn entry(name: &str, dtype: Dtype, shape: &[usize], bytes: Vec<u8>) -> Entry {
    Entry { name: name.into(), dtype, shape: shape.to_vec(), bytes }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The error of `r`, which must have failed.
fn err<T>(r: moe_engine::Result<T>, what: &str) -> Error {
    match r {
        Ok(_) => panic!("{what}: expected an error"),
        Err(e) => e,
    }
}

/// Asserts `e` is a checkpoint error whose file ends with `file` and whose message holds
/// every one of `words`.
fn assert_checkpoint_error(e: &Error, file: &str, words: &[&str]) {
    match e {
        Error::Checkpoint { path, msg, .. } => {
            assert!(path.ends_with(file), "error names {path}, not {file}: {e}");
            for w in words {
                assert!(msg.contains(w), "`{w}` missing from: {msg}");
            }
        }
        other => panic!("expected Error::Checkpoint about {file}, got {other:?}"),
    }
}

/// SHA-256 of a tensor's f32 values as little-endian bytes.
fn sha(v: &[f32]) -> String {
    Sha256::digest(f32_bytes(v)).iter().map(|b| format!("{b:02x}")).collect()
}

fn write_config(dir: &Path, quant: serde_json::Value) {
    std::fs::write(dir.join("config.json"), json!({"model_type": "test", "quantization_config": quant}).to_string())
        .unwrap();
}

// ------------------------------------------------------------------------------ quantized HF folders

// The hashes and first values of what transformers 5.23 itself loads from the two quantized
// golden folders (its own dequantizers, dtype float32), printed by
// tests/fixtures/quant/hash_golden_models.py.

#[test]
fn mxfp4_folder_dequantizes_to_what_transformers_loads() {
    let mut ck = Checkpoint::load_dir(&repo().join("tests/golden-models/31_gpt_oss_mxfp4/model")).unwrap();
    assert_eq!(ck.quantization(), Some(Quantization::Mxfp4));
    let p = "model.layers.1.mlp.experts.";
    // Each pair is one tensor, named as transformers names the parameter.
    assert!(ck.contains(&format!("{p}gate_up_proj")) && !ck.contains(&format!("{p}gate_up_proj_blocks")));
    assert!(ck.names().all(|n| !n.ends_with("_blocks") && !n.ends_with("_scales")));
    assert_eq!(ck.shape(&format!("{p}gate_up_proj")), Some(vec![8, 64, 128]));
    for (name, shape, hash, first) in [
        (
            "gate_up_proj",
            [8, 64, 128],
            "9a3f21a2cb3ad998f4560c923018fe98200df2c1a8b275d0b5fb43e9363538c9",
            [0.125, -0.03125, -0.25, -0.0625],
        ),
        (
            "down_proj",
            [8, 64, 64],
            "b67d6cc1298a50c05009f80b6fbf5874167955290df089b6fb59284917a10497",
            [0.0, -0.03125, 0.09375, 0.0625],
        ),
    ] {
        let t = ck.take(&format!("{p}{name}")).unwrap();
        assert_eq!(t.shape(), shape, "{name}");
        let v = t.as_f32(name).unwrap();
        assert_eq!(v[..4], first, "{name}");
        assert_eq!(sha(v), hash, "{name} differs from transformers' dequantized parameter");
    }
    for n in ["experts.gate_up_proj_bias", "experts.down_proj_bias", "router.weight", "router.bias"] {
        ck.take(&format!("model.layers.1.mlp.{n}")).unwrap();
    }
    // Taking a pair's tensor used both its files' tensors.
    ck.finish("model.layers.1.mlp.").unwrap();
}

#[test]
fn fp8_folder_dequantizes_to_what_transformers_loads() {
    let mut ck = Checkpoint::load_dir(&repo().join("tests/golden-models/32_deepseek_v3_fp8/model")).unwrap();
    assert_eq!(ck.quantization(), Some(Quantization::Fp8 { block: [16, 32] }));
    let p = "model.layers.1.mlp.";
    // transformers merges the experts: gate_up_proj [E, 2I, H] (gate rows, then up rows) and
    // down_proj [E, H, I].
    let (mut gate_up, mut down) = (Vec::new(), Vec::new());
    for e in 0..16 {
        for (proj, shape) in [("gate_proj", [32, 64]), ("up_proj", [32, 64])] {
            gate_up.extend(
                ck.take_shaped(&format!("{p}experts.{e}.{proj}.weight"), &shape).unwrap().into_f32("w").unwrap(),
            );
        }
        down.extend(
            ck.take_shaped(&format!("{p}experts.{e}.down_proj.weight"), &[64, 32]).unwrap().into_f32("w").unwrap(),
        );
    }
    assert_eq!(sha(&gate_up), "400124b20b76c789b44a01556b3f1163d762253e5f674c62a2e0772d1b74f613");
    assert_eq!(gate_up[..2], [0.230_307_73, -0.002_998_798_6]);
    assert_eq!(sha(&down), "09d69d0e3b87e5e1b4e22ee984b86b9b3fd58b481ada1de6c8ff903cb90bc021");
    assert_eq!(down[..2], [0.350_064_43, -0.568_854_7]);
    let shared = ck.take(&format!("{p}shared_experts.gate_proj.weight")).unwrap();
    assert_eq!(sha(shared.as_f32("s").unwrap()), "1530b4f9324a97fc550c24e21bf9c9750e359f80aaeab6aaa10ddfc7a7cf0b9a");
    // A dense layer's projection, a 64 × 64 matrix of 4 × 2 blocks.
    let dense = ck.take("model.layers.0.mlp.down_proj.weight").unwrap();
    assert_eq!(sha(dense.as_f32("d").unwrap()), "5735b151fb28f5611505ca11b6312ea3f5141fcf06ab6230f9b1c6b20c08559b");
    // Taking each weight marked its scales used: nothing of the block is left over.
    for n in [
        "shared_experts.up_proj.weight",
        "shared_experts.down_proj.weight",
        "gate.weight",
        "gate.e_score_correction_bias",
    ] {
        ck.take(&format!("{p}{n}")).unwrap();
    }
    ck.finish(p).unwrap();
}

/// q codes of `[r, c]` as F8_E4M3 bytes.
fn f8_entry(name: &str, shape: &[usize], codes: &[u8]) -> Entry {
    entry(name, Dtype::F8_E4M3, shape, codes.to_vec())
}

#[test]
fn fp8_weights_need_their_scales_the_block_size_and_finite_codes() {
    let dir = tmp_dir("fp8");
    write_config(&dir, json!({"quant_method": "fp8", "weight_block_size": [2, 2]}));
    // Codes: 0x38 = 1.0, 0x40 = 2.0, 0xB8 = -1.0, 0x30 = 0.5, 0x7F = NaN.
    let q3 = [0x38, 0x40, 0xB8, 0x30, 0x38, 0x40, 0xB8, 0x30, 0x38];
    let bf16_half = half::bf16::from_f32(0.5).to_le_bytes().to_vec();
    let file = dir.join("model.safetensors");
    write_st(
        &file,
        &[
            // [3, 3] in 2 × 2 blocks: partial last blocks, so the grid is [2, 2].
            f8_entry("a.weight", &[3, 3], &q3),
            f32_entry("a.weight_scale_inv", &[2, 2], &[1.0, 10.0, 100.0, 1000.0]),
            f8_entry("b.weight", &[2, 2], &[0x38, 0x40, 0xB8, 0x30]),
            entry("b.weight_scale_inv", Dtype::BF16, &[1, 1], bf16_half),
            f8_entry("c.weight", &[2, 2], &[0x38; 4]),
            f8_entry("d.weight", &[3, 3], &q3),
            f32_entry("d.weight_scale_inv", &[1, 1], &[1.0]),
            f8_entry("e.weight", &[2, 2], &[0x38; 4]),
            entry("e.weight_scale_inv", Dtype::I32, &[1, 1], 1i32.to_le_bytes().to_vec()),
            f8_entry("f.weight", &[2, 2], &[0x38, 0x38, 0x38, 0x7F]),
            f32_entry("f.weight_scale_inv", &[1, 1], &[1.0]),
        ],
    );
    let mut ck = Checkpoint::load_dir(&dir).unwrap();
    // W[r, c] = q[r, c] · scale[r / 2, c / 2].
    let a = ck.take("a.weight").unwrap();
    assert_eq!(a.shape(), [3, 3]);
    assert_eq!(a.as_f32("a").unwrap(), [1.0, 2.0, -10.0, 0.5, 1.0, 20.0, -100.0, 50.0, 1000.0]);
    ck.finish("a.").unwrap();
    assert_eq!(ck.take("b.weight").unwrap().as_f32("b").unwrap(), [0.5, 1.0, -0.5, 0.25]);

    let e = err(ck.take("c.weight"), "no scales");
    assert_checkpoint_error(&e, "model.safetensors", &["c.weight", "c.weight_scale_inv", "missing"]);
    let e = err(ck.take("d.weight"), "scales of the wrong shape");
    assert_checkpoint_error(&e, "model.safetensors", &["d.weight_scale_inv", "[1, 1]", "[2, 2]"]);
    match err(ck.take("e.weight"), "integer scales") {
        Error::DType { tensor, got, .. } => {
            assert!(tensor.contains("e.weight_scale_inv") && got == "I32", "{tensor} {got}")
        }
        other => panic!("expected a dtype error, got {other:?}"),
    }
    let e = err(ck.take("f.weight"), "a NaN code");
    assert_checkpoint_error(&e, "model.safetensors", &["f.weight", "NaN", "[1, 1]"]);

    // Without config.json the block size is unknown: an error saying where it comes from.
    let e = err(Checkpoint::load(&file).unwrap().take("a.weight"), "no quantization");
    assert_checkpoint_error(&e, "model.safetensors", &["a.weight", "quantization_config"]);
    let given = Checkpoint::load(&file).unwrap().with_quantization(Some(Quantization::Fp8 { block: [2, 2] })).unwrap();
    assert_eq!(given.get("a.weight").unwrap(), &a);

    // A config.json whose quantization the engine does not decode refuses the folder.
    write_config(&dir, json!({"quant_method": "awq", "bits": 4}));
    assert_checkpoint_error(&err(Checkpoint::load_dir(&dir), "awq"), "config.json", &["awq"]);
}

#[test]
fn mxfp4_pairs_read_as_one_tensor_and_refuse_nan_scales() {
    let dir = tmp_dir("mxfp4");
    write_config(&dir, json!({"quant_method": "mxfp4"}));
    // Two rows of one block each. Row 0: bytes 0x21 (element 0 = FP4[1] = 0.5, element 1 =
    // FP4[2] = 1.0), scale 2^0. Row 1: bytes 0x9F (FP4[15] = -6, FP4[9] = -0.5), scale 2^1.
    let blocks: Vec<u8> = [[0x21u8; 16], [0x9F; 16]].concat();
    let file = dir.join("model.safetensors");
    write_st(
        &file,
        &[
            entry("p_blocks", Dtype::U8, &[1, 2, 1, 16], blocks.clone()),
            entry("p_scales", Dtype::U8, &[1, 2, 1], vec![127, 128]),
            entry("q_blocks", Dtype::U8, &[1, 2, 1, 16], blocks.clone()),
            entry("q_scales", Dtype::U8, &[1, 2, 1], vec![127, 255]),
            entry("r_blocks", Dtype::U8, &[1, 2, 1, 16], blocks.clone()),
            entry("s_blocks", Dtype::U8, &[1, 2, 1, 16], blocks),
            entry("s_scales", Dtype::U8, &[1, 1, 1], vec![127]),
        ],
    );
    let mut ck = Checkpoint::load_dir(&dir).unwrap();
    assert!(ck.contains("p") && !ck.contains("p_blocks") && !ck.contains("p_scales"));
    // [E, G·32, R]: column r of the result is row r of the blocks.
    let p = ck.take("p").unwrap();
    assert_eq!(p.shape(), [1, 32, 2]);
    let v = p.as_f32("p").unwrap();
    assert_eq!((v[0], v[1], v[2], v[3]), (0.5, -12.0, 1.0, -1.0));
    let e = err(ck.take("q"), "an E8M0 NaN");
    assert_checkpoint_error(&e, "model.safetensors", &["q_blocks", "255", "[0, 1, 0]"]);
    // Blocks without scales stay raw, and U8 is not read on its own.
    assert!(ck.contains("r_blocks") && !ck.contains("r"));
    assert_checkpoint_error(&err(ck.take("r_blocks"), "lone blocks"), "model.safetensors", &["r_blocks", "MXFP4"]);
    assert_eq!(ck.shape("s"), None);
    assert_checkpoint_error(&err(ck.take("s"), "mismatched scales"), "model.safetensors", &["s_scales", "[1, 2, 1]"]);
}

// ------------------------------------------------------------------------------ shard index

#[test]
fn index_folders_read_the_listed_shards_and_name_the_file_when_they_disagree() {
    let dir = tmp_dir("index");
    let (s1, s2) = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors");
    write_st(&dir.join(s1), &[f32_entry("a", &[2], &[1.0, 2.0]), f32_entry("b", &[1], &[3.0])]);
    write_st(&dir.join(s2), &[f32_entry("c", &[1], &[4.0])]);
    // A stray file the index does not list (repos ship `consolidated.safetensors` beside
    // the shards) is not read, though it repeats a name.
    write_st(&dir.join("consolidated.safetensors"), &[f32_entry("a", &[2], &[9.0, 9.0])]);
    let index = |map: serde_json::Value| {
        std::fs::write(dir.join("model.safetensors.index.json"), json!({"metadata": {}, "weight_map": map}).to_string())
            .unwrap()
    };
    index(json!({"a": s1, "b": s1, "c": s2}));
    let mut ck = Checkpoint::load_dir(&dir).unwrap();
    assert_eq!(ck.names().collect::<Vec<_>>(), ["a", "b", "c"]);
    assert_eq!(ck.take("a").unwrap().as_f32("a").unwrap(), [1.0, 2.0]);

    index(json!({"a": s1, "b": s1, "c": "model-00003-of-00002.safetensors"}));
    assert_checkpoint_error(
        &err(Checkpoint::load_dir(&dir), "missing shard"),
        "model-00003-of-00002.safetensors",
        &["missing"],
    );
    index(json!({"a": s1, "b": s2, "c": s2}));
    assert_checkpoint_error(&err(Checkpoint::load_dir(&dir), "wrong shard"), s1, &["`b`", s2]);
    index(json!({"a": s1, "b": s1, "c": s2, "d": s2}));
    assert_checkpoint_error(&err(Checkpoint::load_dir(&dir), "absent tensor"), s2, &["`d`", "not in its shard"]);
    index(json!({"a": "../elsewhere.safetensors"}));
    assert_checkpoint_error(
        &err(Checkpoint::load_dir(&dir), "a path"),
        "model.safetensors.index.json",
        &["../elsewhere"],
    );
    std::fs::write(dir.join("model.safetensors.index.json"), "{\"weight_map\": ").unwrap();
    assert_checkpoint_error(&err(Checkpoint::load_dir(&dir), "bad JSON"), "model.safetensors.index.json", &["JSON"]);

    // Without an index, the same name in two files is an error naming both.
    std::fs::remove_file(dir.join("model.safetensors.index.json")).unwrap();
    match err(Checkpoint::load_dir(&dir), "duplicate") {
        Error::Checkpoint { path, msg, .. } => {
            assert!(msg.contains("`a`") && (path + &msg).contains("consolidated"), "{msg}")
        }
        other => panic!("{other:?}"),
    }
}

// ------------------------------------------------------------------------------ lying headers

/// A safetensors file with `header` as its JSON header and `data` after it.
fn raw_file(path: &Path, header: &serde_json::Value, data: &[u8]) {
    let text = header.to_string();
    let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
    bytes.extend(text.as_bytes());
    bytes.extend(data);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn headers_that_do_not_match_the_file_are_refused_before_any_tensor_is_read() {
    let dir = tmp_dir("headers");
    let cases: Vec<(&str, serde_json::Value, Vec<u8>)> = vec![
        // Offsets past the end of the file.
        ("past_end", json!({"w": {"dtype": "F32", "shape": [100], "data_offsets": [0, 400]}}), vec![0; 16]),
        // Offsets that do not match the dtype and shape.
        ("wrong_size", json!({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}), vec![0; 4]),
        // A shape whose size overflows.
        (
            "overflow",
            json!({"w": {"dtype": "F32", "shape": [1u64 << 40, 1u64 << 40], "data_offsets": [0, 16]}}),
            vec![0; 16],
        ),
        // Overlapping tensors.
        (
            "overlap",
            json!({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                   "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}),
            vec![0; 12],
        ),
        // Trailing bytes no tensor accounts for.
        ("trailing", json!({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}), vec![0; 8]),
    ];
    for (name, header, data) in cases {
        let path = dir.join(format!("{name}.safetensors"));
        raw_file(&path, &header, &data);
        assert_checkpoint_error(&err(Checkpoint::load(&path), name), &format!("{name}.safetensors"), &["safetensors"]);
    }
    // A length prefix claiming a header longer than the file.
    let path = dir.join("long_header.safetensors");
    let mut bytes = 1_000_000u64.to_le_bytes().to_vec();
    bytes.extend(b"{}");
    std::fs::write(&path, bytes).unwrap();
    assert_checkpoint_error(&err(Checkpoint::load(&path), "long header"), "long_header.safetensors", &[]);
}

// ------------------------------------------------------------------------------ lazy reading, dtypes

#[test]
fn tensors_are_read_when_asked_for_and_bad_ones_fail_by_name() {
    let dir = tmp_dir("lazy");
    let path = dir.join("mixed.safetensors");
    let too_big = (i32::MAX as i64 + 1).to_le_bytes().to_vec();
    write_st(
        &path,
        &[
            f32_entry("ok", &[2, 2], &[1.0, 2.0, 3.0, 4.0]),
            entry(
                "half",
                Dtype::F16,
                &[2],
                [half::f16::from_f32(0.25), half::f16::from_f32(-8.0)].iter().flat_map(|h| h.to_le_bytes()).collect(),
            ),
            entry("bytes", Dtype::I8, &[3], vec![1, 2, 3]),
            entry("wide", Dtype::I64, &[2], [7i64.to_le_bytes().to_vec(), too_big].concat()),
        ],
    );
    // Opening succeeds whatever the tensors hold: they are read one by one.
    let mut ck = Checkpoint::load(&path).unwrap();
    assert_eq!(ck.names().collect::<Vec<_>>(), ["bytes", "half", "ok", "wide"]);
    assert_eq!(ck.shape("bytes"), Some(vec![3]));
    // `get` reads once and keeps the tensor; `take` hands over what `get` read.
    let first: *const HostTensor = ck.get("ok").unwrap();
    assert!(std::ptr::eq(first, ck.get("ok").unwrap()));
    assert_eq!(ck.take("ok").unwrap().as_f32("ok").unwrap(), [1.0, 2.0, 3.0, 4.0]);
    assert_eq!(ck.take("half").unwrap().as_f32("half").unwrap(), [0.25, -8.0]);
    assert_checkpoint_error(&err(ck.take("bytes"), "I8"), "mixed.safetensors", &["`bytes`", "I8"]);
    assert_checkpoint_error(
        &err(ck.take("wide"), "i64 overflow"),
        "mixed.safetensors",
        &["`wide`", "2147483648", "index 1"],
    );
    assert!(ck.try_take_opt("bytes").is_err());
    assert!(matches!(ck.try_take_opt("absent"), Ok(None)));
    // `take_opt` cannot return the error: it returns None, and `finish` says why.
    assert!(ck.take_opt("bytes").is_none());
    assert_checkpoint_error(&err(ck.finish(""), "unread optional"), "mixed.safetensors", &["`bytes`", "I8"]);
    // `iter` reads everything, so an unreadable tensor is its error too.
    assert!(Checkpoint::load(&path).unwrap().iter().is_err());
    // `renamed` keeps tensors in their files and shares what was read.
    let sub = ck.renamed(|n| n.strip_prefix("o").map(|r| format!("x{r}")), "sub");
    assert_eq!(sub.names().collect::<Vec<_>>(), ["xk"]);
    assert_eq!(sub.get("xk").unwrap().as_f32("xk").unwrap(), [1.0, 2.0, 3.0, 4.0]);
}

// ------------------------------------------------------------------------------ torch archives

#[test]
fn torch_archives_read_a_dict_or_one_of_its_entries() {
    let states = ds_folder().join("step3/mp_rank_00_model_states.pt");
    let mut module = Checkpoint::load_pt(&states, Some("module")).unwrap();
    let names: Vec<&str> = module.names().collect();
    assert_eq!(names.len(), 10, "{names:?}");
    assert!(names.contains(&"embed.weight") && names.contains(&"moe.1.mlp.2.bias"), "{names:?}");
    assert_eq!(module.shape("moe.1.mlp.0.weight"), Some(vec![32, 16]));
    // Values as torch.load gives them.
    assert_eq!(module.take("moe.1.coefficient.bias").unwrap().as_f32("b").unwrap(), [0.545_343_5, 0.634_423_14]);
    // The whole dict: tensors by dotted path, DeepSpeed's bookkeeping (optimizer state
    // included) alongside, its non-tensor values skipped.
    let all = Checkpoint::load_pt(&states, None).unwrap();
    assert!(all.contains("module.embed.weight") && all.names().any(|n| n.starts_with("optimizer.")));
    let expert = ds_folder().join("step3/layer_1_expert_2_mp_rank_00_model_states.pt");
    let mut e = Checkpoint::load_pt(&expert, None).unwrap();
    let b = e.take("moe.1.deepspeed_moe.experts.deepspeed_experts.2.2.bias").unwrap();
    assert_eq!(b.as_f32("b").unwrap()[..3], [0.068_312_83, 0.266_238_96, -0.222_034_34]);

    let e = err(Checkpoint::load_pt(&states, Some("model")), "absent key");
    assert_checkpoint_error(&e, "mp_rank_00_model_states.pt", &["`model`"]);
    assert!(matches!(Checkpoint::load_pt(&states.with_extension("nope"), None), Err(Error::Io { .. })));
    let not_pt = repo().join("tests/golden/c01_ds_ckpt_top2_residual/tensors.safetensors");
    assert_checkpoint_error(&err(Checkpoint::load_pt(&not_pt, None), "safetensors"), "tensors.safetensors", &[]);
}

#[test]
fn truncated_torch_archives_are_errors_naming_the_file() {
    let dir = tmp_dir("pt_cut");
    let bytes = std::fs::read(ds_folder().join("step3/layer_1_expert_0_mp_rank_00_model_states.pt")).unwrap();
    for cut in [0, 10, bytes.len() / 4, bytes.len() / 2, bytes.len() - 30, bytes.len() - 1] {
        let path = dir.join(format!("cut{cut}.pt"));
        std::fs::write(&path, &bytes[..cut]).unwrap();
        // Either opening fails, or (a cut the zip directory does not notice) reading does.
        let result = Checkpoint::load_pt(&path, None).and_then(|ck| ck.iter().map(|it| it.count()));
        assert_checkpoint_error(&err(result, &format!("cut at {cut}")), &format!("cut{cut}.pt"), &[]);
    }
}

// ------------------------------------------------------------------------------ DeepSpeed folders

/// A copy of c01's checkpoint folder to break.
fn copy_ds_folder(name: &str) -> PathBuf {
    let dir = tmp_dir(name);
    std::fs::create_dir_all(dir.join("step3")).unwrap();
    std::fs::copy(ds_folder().join("latest"), dir.join("latest")).unwrap();
    for f in std::fs::read_dir(ds_folder().join("step3")).unwrap() {
        let f = f.unwrap();
        let n = f.file_name();
        if n.to_str().is_some_and(|s| s.ends_with("_model_states.pt")) {
            std::fs::copy(f.path(), dir.join("step3").join(n)).unwrap();
        }
    }
    dir
}

#[test]
fn deepspeed_folders_give_one_moe_layer_under_the_importers_names() {
    let ds = DeepSpeedCheckpoint::open(&ds_folder()).unwrap();
    assert_eq!(ds.tag(), "step3");
    assert_eq!(ds.expert_files(1).unwrap().len(), 4);
    let ck = ds.moe_layer(1, "moe.1.").unwrap();
    let names: Vec<&str> = ck.names().collect();
    assert_eq!(names.len(), 7 + 4 * 4, "{names:?}");
    assert!(names.iter().all(|n| n.starts_with("moe.1.")));
    for n in [
        "moe.1.deepspeed_moe.gate.wg.weight",
        "moe.1.deepspeed_moe.experts.deepspeed_experts.3.2.bias",
        "moe.1.coefficient.weight",
    ] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
    // Through the importer: the residual MoE's weights, and an error for a spec that
    // leaves some of them unused.
    let cfg = |residual: bool| {
        let c = json!({"hidden_size": 16, "num_experts": 4, "k": 2, "use_residual": residual,
                       "expert": {"type": "mlp_gelu", "ffn_hidden": 32}});
        deepspeed::layer_spec(&c).unwrap()
    };
    let w = ds.layer_weights(1, "moe.1.", &cfg(true)).unwrap();
    assert_eq!((w.experts.w_in.shape(), w.gate.shape()), (&[4usize, 32, 16][..], &[4usize, 16][..]));
    assert!(w.residual.is_some());
    match err(ds.layer_weights(1, "moe.1.", &cfg(false)), "residual weights unused") {
        Error::UnexpectedTensors(names) => assert!(names.iter().any(|n| n == "moe.1.coefficient.weight"), "{names:?}"),
        other => panic!("{other:?}"),
    }
    // Layer 0's expert files hold `moe.0.` tensors: not the experts of `moe.1.`.
    let e = err(ds.moe_layer(0, "moe.1."), "layer and prefix apart");
    assert_checkpoint_error(&e, "layer_0_expert_0_mp_rank_00_model_states.pt", &["moe.0.", "expert 0"]);
    let e = err(ds.moe_layer(1, "moe.7."), "no such module");
    assert_checkpoint_error(&e, "mp_rank_00_model_states.pt", &["moe.7."]);
    assert_checkpoint_error(&err(ds.expert_files(5), "no such layer"), "step3", &["layer 5"]);
}

#[test]
fn broken_deepspeed_folders_are_errors_naming_the_file() {
    let dir = copy_ds_folder("ds_broken");
    std::fs::remove_file(dir.join("step3/layer_1_expert_2_mp_rank_00_model_states.pt")).unwrap();
    let ds = DeepSpeedCheckpoint::open(&dir).unwrap();
    assert_checkpoint_error(
        &err(ds.moe_layer(1, "moe.1."), "a missing expert"),
        "layer_1_expert_2_mp_rank_00_model_states.pt",
        &["missing"],
    );
    // An expert file holding another expert's tensors.
    std::fs::copy(
        dir.join("step3/layer_1_expert_3_mp_rank_00_model_states.pt"),
        dir.join("step3/layer_1_expert_2_mp_rank_00_model_states.pt"),
    )
    .unwrap();
    let e = err(ds.moe_layer(1, "moe.1."), "a misnamed expert");
    assert_checkpoint_error(&e, "layer_1_expert_2_mp_rank_00_model_states.pt", &["deepspeed_experts.3.", "expert 2"]);
    for (latest, words) in [("step9", vec!["step9"]), ("../step3", vec!["not a folder name"]), ("  \n", vec!["no tag"])]
    {
        std::fs::write(dir.join("latest"), latest).unwrap();
        let e = err(DeepSpeedCheckpoint::open(&dir), latest);
        let Error::Checkpoint { msg, .. } = &e else { panic!("{latest:?}: {e:?}") };
        assert!(words.iter().all(|w| msg.contains(w)), "{latest:?}: {msg}");
    }
    std::fs::remove_file(dir.join("latest")).unwrap();
    assert!(matches!(DeepSpeedCheckpoint::open(&dir), Err(Error::Io { .. })));
}

#[test]
fn checkpoint_cases_check_their_checkpoint_block() {
    let src = repo().join("tests/golden/c01_ds_ckpt_top2_residual");
    let dir = tmp_dir("ckpt_case");
    std::fs::copy(src.join("tensors.safetensors"), dir.join("tensors.safetensors")).unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("case.json")).unwrap()).unwrap();
    let with = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut m = meta.clone();
        m["checkpoint"]["dir"] = json!(src.join("checkpoint").display().to_string());
        edit(&mut m);
        std::fs::write(dir.join("case.json"), m.to_string()).unwrap();
        golden::run_case(&common::cpu(1), &dir)
    };
    // An absolute `checkpoint.dir` is read as it is: the case passes from another folder.
    assert!(with(&|_| {}).unwrap().pass);
    let e = err(with(&|m| m["checkpoint"]["tag"] = json!("step9")), "wrong tag");
    assert!(e.to_string().contains("step9") && e.to_string().contains("step3"), "{e}");
    let e = err(with(&|m| m["checkpoint"]["moe_layer_index"] = json!(0)), "wrong layer");
    assert!(e.to_string().contains("layer_0_expert_0"), "{e}");
    let e = err(with(&|m| m.as_object_mut().unwrap().remove("checkpoint").map(|_| ()).unwrap()), "no block");
    assert!(e.to_string().contains("needs `checkpoint`"), "{e}");
    let e = err(with(&|m| m["kind"] = json!("deepspeed.moe")), "block on another kind");
    assert!(e.to_string().contains("only read by deepspeed.checkpoint"), "{e}");
}

#[test]
fn deepspeed_state_dict_is_the_inverse_of_the_importer() {
    for (ty, bias, residual) in [("linear", true, false), ("mlp_gelu", false, true), ("glu_silu", true, true)] {
        let cfg = json!({"hidden_size": 6, "num_experts": 4, "k": 2, "use_residual": residual,
                         "expert": {"type": ty, "ffn_hidden": if ty == "linear" { json!(null) } else { json!(5) }, "bias": bias}});
        let spec = deepspeed::layer_spec(&cfg).unwrap();
        let w = moe_engine::stack::random_weights(&spec, 11).unwrap();
        let sd = deepspeed::state_dict(&spec, &w, "moe.").unwrap();
        let expect_one = |name: &str| assert!(sd.contains_key(name), "{ty}: {name} missing from {:?}", sd.keys());
        expect_one("moe.deepspeed_moe.gate.wg.weight");
        match ty {
            "linear" => expect_one("moe.deepspeed_moe.experts.deepspeed_experts.3.bias"),
            "mlp_gelu" => expect_one("moe.mlp.2.weight"),
            _ => expect_one("moe.deepspeed_moe.experts.deepspeed_experts.0.up_proj.bias"),
        }
        let back = deepspeed::layer_weights(&mut Checkpoint::from_map(sd.clone(), "sd"), &spec, "moe.").unwrap();
        for ((n, a), (_, b)) in w.named().into_iter().zip(back.named()) {
            assert_eq!(a.as_f32(&n).unwrap(), b.as_f32(&n).unwrap(), "{ty}: {n}");
        }
        // One rank's share: its experts numbered from 0, the router whole.
        let mut share = w.clone();
        share.experts = w.experts.slice_experts(2..4).unwrap();
        let sd = deepspeed::state_dict(&spec, &share, "").unwrap();
        assert!(!sd.keys().any(|k| k.contains("deepspeed_experts.2.")), "{:?}", sd.keys());
        let got = deepspeed::layer_weights_holding(&mut Checkpoint::from_map(sd, "share"), &spec, "", 2).unwrap();
        assert_eq!(got.experts.w_in.as_f32("w_in").unwrap(), share.experts.w_in.as_f32("w_in").unwrap());
    }
}

//! Checkpoint import: safetensors files written in a temp dir, read back through
//! `Checkpoint` and the HF / DeepSpeed importers. Missing, unexpected and mis-shaped
//! tensors are named; broken files are errors, never panics; f16 / bf16 / i64 convert;
//! the per-expert hub layout, transformers-5's fused layout and Mixtral's w1/w3/w2 names
//! give the same layer; a DeepSpeed residual state dict matches a hand-computed forward.

mod common;

use common::{f32_entry, lcg, matvec, rel_l2, softmax, write_st, Entry};
use moe_cpu::CpuBackend;
use moe_engine::import::{deepspeed, hf, Checkpoint};
use moe_engine::{DType, Device, Error, HostTensor, LayerOptions, LayerSpec, MoeLayer};
use safetensors::Dtype;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

// ------------------------------------------------------------------------------ helpers

/// A fresh directory for one test.
fn tmp_dir(name: &str) -> PathBuf {
    common::tmp_dir("import_errors", name)
}

fn be() -> CpuBackend {
    CpuBackend::new(Some(1)).unwrap()
}

fn forward(b: &CpuBackend, spec: &LayerSpec, w: &moe_engine::weights::HostLayerWeights, x: &[f32]) -> Vec<f32> {
    let layer = MoeLayer::new(b, spec.clone(), w, DType::F32).unwrap();
    let s = x.len() / spec.hidden;
    let xt = b.upload(&HostTensor::f32(&[s, spec.hidden], x.to_vec()).unwrap()).unwrap();
    let out = layer.forward(b, &xt, &LayerOptions::default()).unwrap();
    b.download(&out.y).unwrap().into_f32("y").unwrap()
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

// ------------------------------------------------------------------------------ qwen3 / mixtral

const H: usize = 8;
const E: usize = 4;
const I: usize = 6;
const K: usize = 2;

/// Per-expert weights of a small SwiGLU MoE block.
struct GluWeights {
    router: Vec<f32>,
    gate: Vec<Vec<f32>>, // [I, H] per expert
    up: Vec<Vec<f32>>,   // [I, H]
    down: Vec<Vec<f32>>, // [H, I]
}

fn glu_weights() -> GluWeights {
    GluWeights {
        router: lcg(1, E * H, 1.0),
        gate: (0..E).map(|e| lcg(10 + e as u64, I * H, 0.5)).collect(),
        up: (0..E).map(|e| lcg(20 + e as u64, I * H, 0.5)).collect(),
        down: (0..E).map(|e| lcg(30 + e as u64, H * I, 0.5)).collect(),
    }
}

fn qwen3_cfg() -> Value {
    json!({
        "model_type": "qwen3_moe",
        "hidden_size": H,
        "num_experts": E,
        "num_experts_per_tok": K,
        "moe_intermediate_size": I,
        "norm_topk_prob": true,
    })
}

fn mixtral_cfg() -> Value {
    json!({
        "model_type": "mixtral",
        "hidden_size": H,
        "num_local_experts": E,
        "num_experts_per_tok": K,
        "intermediate_size": I,
    })
}

/// Hub layout entries: `{prefix}gate.weight`, `{prefix}experts.N.{g,u,d}.weight`.
fn hub_entries(w: &GluWeights, prefix: &str, (g, u, d): (&str, &str, &str)) -> Vec<Entry> {
    let mut v = vec![f32_entry(&format!("{prefix}gate.weight"), &[E, H], &w.router)];
    for e in 0..E {
        v.push(f32_entry(&format!("{prefix}experts.{e}.{g}.weight"), &[I, H], &w.gate[e]));
        v.push(f32_entry(&format!("{prefix}experts.{e}.{u}.weight"), &[I, H], &w.up[e]));
        v.push(f32_entry(&format!("{prefix}experts.{e}.{d}.weight"), &[H, I], &w.down[e]));
    }
    v
}

const QWEN: (&str, &str, &str) = ("gate_proj", "up_proj", "down_proj");
const MIXTRAL: (&str, &str, &str) = ("w1", "w3", "w2");

/// transformers-5 fused layout: `gate_up_proj [E, 2I, H]` (gate rows first, or up rows
/// first when `swap`), `down_proj [E, H, I]`.
fn fused_entries(w: &GluWeights, prefix: &str, swap: bool) -> Vec<Entry> {
    let mut gu = Vec::with_capacity(E * 2 * I * H);
    let mut down = Vec::with_capacity(E * H * I);
    for e in 0..E {
        let (first, second) = if swap { (&w.up[e], &w.gate[e]) } else { (&w.gate[e], &w.up[e]) };
        gu.extend_from_slice(first);
        gu.extend_from_slice(second);
        down.extend_from_slice(&w.down[e]);
    }
    vec![
        f32_entry(&format!("{prefix}gate.weight"), &[E, H], &w.router),
        f32_entry(&format!("{prefix}experts.gate_up_proj"), &[E, 2 * I, H], &gu),
        f32_entry(&format!("{prefix}experts.down_proj"), &[E, H, I], &down),
    ]
}

/// Naive reference of the softmax top-k (renormalised) SwiGLU block in f64.
fn glu_reference(w: &GluWeights, x: &[f32]) -> Vec<f64> {
    let s = x.len() / H;
    let mut y = vec![0f64; s * H];
    for t in 0..s {
        let xt: Vec<f64> = x[t * H..(t + 1) * H].iter().map(|&v| v as f64).collect();
        let p = softmax(&matvec(&w.router, None, &xt, E));
        let mut idx: Vec<usize> = (0..E).collect();
        idx.sort_by(|&a, &b| p[b].partial_cmp(&p[a]).unwrap().then(a.cmp(&b)));
        let chosen = &idx[..K];
        let norm: f64 = chosen.iter().map(|&e| p[e]).sum();
        for &e in chosen {
            let g = matvec(&w.gate[e], None, &xt, I);
            let u = matvec(&w.up[e], None, &xt, I);
            let h: Vec<f64> = g.iter().zip(&u).map(|(&a, &b)| silu(a) * b).collect();
            let o = matvec(&w.down[e], None, &h, H);
            for c in 0..H {
                y[t * H + c] += p[e] / norm * o[c];
            }
        }
    }
    y
}

fn load_hf(
    path: &Path,
    cfg: &Value,
    prefix: &str,
) -> moe_engine::Result<(LayerSpec, moe_engine::weights::HostLayerWeights)> {
    let (fam, spec) = hf::layer_spec(cfg)?;
    let mut ck = Checkpoint::load(path)?;
    let w = hf::layer_weights(&mut ck, fam, &spec, prefix)?;
    Ok((spec, w))
}

#[test]
fn hub_fused_and_mixtral_layouts_give_identical_outputs() {
    let dir = tmp_dir("layouts");
    let w = glu_weights();
    let x = lcg(99, 5 * H, 1.0);
    let b = be();

    let hub = dir.join("hub.safetensors");
    write_st(&hub, &hub_entries(&w, "", QWEN));
    let fused = dir.join("fused.safetensors");
    write_st(&fused, &fused_entries(&w, "", false));
    let mixtral = dir.join("mixtral.safetensors");
    write_st(&mixtral, &hub_entries(&w, "", MIXTRAL));

    let (spec, wh) = load_hf(&hub, &qwen3_cfg(), "").unwrap();
    let (spec_f, wf) = load_hf(&fused, &qwen3_cfg(), "").unwrap();
    let (spec_m, wm) = load_hf(&mixtral, &mixtral_cfg(), "").unwrap();
    // The importers build the same engine-layout weights.
    assert_eq!(wh.experts.w_in, wf.experts.w_in);
    assert_eq!(wh.experts.w_out, wf.experts.w_out);
    assert_eq!(wh.experts.w_in, wm.experts.w_in);

    let yh = forward(&b, &spec, &wh, &x);
    let yf = forward(&b, &spec_f, &wf, &x);
    let ym = forward(&b, &spec_m, &wm, &x);
    assert_eq!(yh, yf, "hub and fused layouts differ");
    assert_eq!(yh, ym, "qwen3 hub and mixtral w1/w3/w2 differ");
    // And the shared result is the SwiGLU block: down(silu(gate x) · up x), gate = w1.
    let err = rel_l2(&yh, &glu_reference(&w, &x));
    assert!(err < 1e-5, "relative error {err}");

    // Gate rows first matters: a fused tensor with the halves swapped is another layer.
    let swapped = dir.join("swapped.safetensors");
    write_st(&swapped, &fused_entries(&w, "", true));
    let (spec_s, ws) = load_hf(&swapped, &qwen3_cfg(), "").unwrap();
    assert_ne!(forward(&b, &spec_s, &ws, &x), yh);
}

#[test]
fn prefixed_keys_and_other_layers_are_separated() {
    let dir = tmp_dir("prefix");
    let w = glu_weights();
    let path = dir.join("model.safetensors");
    let mut entries = hub_entries(&w, "model.layers.3.mlp.", QWEN);
    // Tensors of other modules lie outside the prefix and are not the importer's business.
    entries.push(f32_entry("model.embed_tokens.weight", &[2, H], &[0.0; 2 * H]));
    entries.push(f32_entry("model.layers.2.mlp.gate.weight", &[E, H], &w.router));
    write_st(&path, &entries);
    let (spec, wp) = load_hf(&path, &qwen3_cfg(), "model.layers.3.mlp.").unwrap();
    let x = lcg(7, 3 * H, 1.0);
    let err = rel_l2(&forward(&be(), &spec, &wp, &x), &glu_reference(&w, &x));
    assert!(err < 1e-5, "relative error {err}");
}

// ------------------------------------------------------------------------------ named errors

#[test]
fn missing_tensor_is_named() {
    let dir = tmp_dir("missing");
    let w = glu_weights();
    let path = dir.join("m.safetensors");
    let entries: Vec<Entry> =
        hub_entries(&w, "", QWEN).into_iter().filter(|e| e.name != "experts.1.up_proj.weight").collect();
    write_st(&path, &entries);
    match load_hf(&path, &qwen3_cfg(), "").err() {
        Some(e @ Error::MissingTensor(_)) => {
            assert!(matches!(&e, Error::MissingTensor(n) if n == "experts.1.up_proj.weight"), "{e}");
            assert!(e.to_string().contains("experts.1.up_proj.weight"), "{e}");
        }
        other => panic!("expected MissingTensor, got {other:?}"),
    }
    // Fused layout without its down projection.
    let path = dir.join("f.safetensors");
    let entries: Vec<Entry> =
        fused_entries(&w, "", false).into_iter().filter(|e| e.name != "experts.down_proj").collect();
    write_st(&path, &entries);
    match load_hf(&path, &qwen3_cfg(), "").err() {
        Some(Error::MissingTensor(n)) => assert_eq!(n, "experts.down_proj"),
        other => panic!("expected MissingTensor, got {other:?}"),
    }
    // No router.
    let path = dir.join("g.safetensors");
    let entries: Vec<Entry> = hub_entries(&w, "", QWEN).into_iter().filter(|e| e.name != "gate.weight").collect();
    write_st(&path, &entries);
    match load_hf(&path, &qwen3_cfg(), "").err() {
        Some(Error::MissingTensor(n)) => assert_eq!(n, "gate.weight"),
        other => panic!("expected MissingTensor, got {other:?}"),
    }
}

#[test]
fn unexpected_tensor_is_named() {
    let dir = tmp_dir("unexpected");
    let w = glu_weights();
    let path = dir.join("u.safetensors");
    let mut entries = hub_entries(&w, "", QWEN);
    // A fifth expert the config (num_experts = 4) does not have, and a stray bias.
    entries.push(f32_entry("experts.4.gate_proj.weight", &[I, H], &w.gate[0]));
    entries.push(f32_entry("gate.bias", &[E], &[0.0; E]));
    write_st(&path, &entries);
    match load_hf(&path, &qwen3_cfg(), "").err() {
        Some(e @ Error::UnexpectedTensors(_)) => {
            let Error::UnexpectedTensors(names) = &e else { unreachable!() };
            assert!(names.contains(&"experts.4.gate_proj.weight".to_string()), "{names:?}");
            assert!(names.contains(&"gate.bias".to_string()), "{names:?}");
            assert_eq!(names.len(), 2, "{names:?}");
            let msg = e.to_string();
            assert!(msg.contains("experts.4.gate_proj.weight") && msg.contains("gate.bias"), "{msg}");
        }
        other => panic!("expected UnexpectedTensors, got {other:?}"),
    }
}

#[test]
fn mis_shaped_tensor_is_named_with_expected_shape() {
    let dir = tmp_dir("shape");
    let w = glu_weights();
    // experts.2.down_proj.weight stored [I, H] = [6, 8] instead of [H, I] = [8, 6].
    let path = dir.join("d.safetensors");
    let mut entries = hub_entries(&w, "", QWEN);
    for e in entries.iter_mut().filter(|e| e.name == "experts.2.down_proj.weight") {
        e.shape = vec![I, H];
    }
    write_st(&path, &entries);
    match load_hf(&path, &qwen3_cfg(), "").err() {
        Some(e @ Error::Shape { .. }) => {
            let Error::Shape { tensor, expected, got } = &e else { unreachable!() };
            assert_eq!(tensor, "experts.2.down_proj.weight");
            assert_eq!(expected, "[8, 6]");
            assert_eq!(got, &vec![6, 8]);
            let msg = e.to_string();
            assert!(msg.contains("experts.2.down_proj.weight") && msg.contains("[8, 6]"), "{msg}");
        }
        other => panic!("expected a shape error, got {other:?}"),
    }
    // Router with one column too many.
    let path = dir.join("g.safetensors");
    let mut entries = hub_entries(&w, "", QWEN);
    entries[0] = f32_entry("gate.weight", &[E, H + 1], &lcg(5, E * (H + 1), 1.0));
    write_st(&path, &entries);
    match load_hf(&path, &qwen3_cfg(), "").err() {
        Some(Error::Shape { tensor, expected, got }) => {
            assert_eq!((tensor.as_str(), expected.as_str(), got), ("gate.weight", "[4, 8]", vec![4, 9]));
        }
        other => panic!("expected a shape error, got {other:?}"),
    }
    // A fused gate_up_proj holding only the gate half.
    let path = dir.join("f.safetensors");
    let mut entries = fused_entries(&w, "", false);
    entries[1] = f32_entry("experts.gate_up_proj", &[E, I, H], &lcg(6, E * I * H, 1.0));
    write_st(&path, &entries);
    match load_hf(&path, &qwen3_cfg(), "").err() {
        Some(Error::Shape { tensor, expected, .. }) => {
            assert_eq!((tensor.as_str(), expected.as_str()), ("experts.gate_up_proj", "[4, 12, 8]"));
        }
        other => panic!("expected a shape error, got {other:?}"),
    }
}

// ------------------------------------------------------------------------------ broken files

#[test]
fn truncated_file_is_a_checkpoint_error() {
    let dir = tmp_dir("truncated");
    let full = dir.join("full.safetensors");
    write_st(&full, &hub_entries(&glu_weights(), "", QWEN));
    let bytes = std::fs::read(&full).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    // Cut in half, and at every awkward place: empty, inside the length prefix, right
    // after it, inside the JSON header, right after it, one byte short.
    for cut in [bytes.len() / 2, 0, 4, 8, 9, 8 + header / 2, 8 + header, bytes.len() - 1] {
        let path = dir.join(format!("cut{cut}.safetensors"));
        std::fs::write(&path, &bytes[..cut]).unwrap();
        match Checkpoint::load(&path) {
            Err(Error::Checkpoint { path: p, .. }) => assert!(p.contains(&format!("cut{cut}")), "{p}"),
            Err(other) => panic!("cut at {cut}: expected Error::Checkpoint, got {other:?}"),
            Ok(_) => panic!("cut at {cut}: a truncated file loaded"),
        }
    }
    // Not safetensors at all.
    assert!(matches!(Checkpoint::from_bytes(b"{\"not\": \"safetensors\"}", "junk"), Err(Error::Checkpoint { .. })));
    // The full file loads.
    assert!(Checkpoint::load(&full).unwrap().contains("experts.3.down_proj.weight"));
}

#[test]
fn missing_file_is_an_io_error() {
    let dir = tmp_dir("nofile");
    let path = dir.join("does-not-exist.safetensors");
    match Checkpoint::load(&path) {
        Err(e @ Error::Io { .. }) => {
            let Error::Io { path: p, source } = &e else { unreachable!() };
            assert!(p.contains("does-not-exist.safetensors"), "{p}");
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            assert!(e.to_string().contains("does-not-exist.safetensors"));
        }
        other => panic!("expected Error::Io, got {:?}", other.err()),
    }
    assert!(matches!(Checkpoint::load_dir(&dir.join("no-such-dir")), Err(Error::Io { .. })));
    // A folder without safetensors files.
    assert!(matches!(Checkpoint::load_dir(&dir), Err(Error::Checkpoint { .. })));
}

#[test]
fn sharded_folders_merge_and_reject_duplicates() {
    let dir = tmp_dir("sharded");
    let w = glu_weights();
    let entries = hub_entries(&w, "", QWEN);
    let (a, b) = entries.split_at(5);
    write_st(&dir.join("model-00001-of-00002.safetensors"), a);
    write_st(&dir.join("model-00002-of-00002.safetensors"), b);
    let (fam, spec) = hf::layer_spec(&qwen3_cfg()).unwrap();
    let mut ck = Checkpoint::load_dir(&dir).unwrap();
    let wl = hf::layer_weights(&mut ck, fam, &spec, "").unwrap();
    let x = lcg(3, 2 * H, 1.0);
    assert!(rel_l2(&forward(&be(), &spec, &wl, &x), &glu_reference(&w, &x)) < 1e-5);
    // The same tensor in two shards is an error naming it.
    write_st(&dir.join("model-extra.safetensors"), &[f32_entry("gate.weight", &[E, H], &w.router)]);
    match Checkpoint::load_dir(&dir) {
        Err(Error::Checkpoint { msg, .. }) => assert!(msg.contains("gate.weight"), "{msg}"),
        other => panic!("expected a duplicate-tensor error, got {:?}", other.err()),
    }
}

// ------------------------------------------------------------------------------ dtypes

#[test]
fn half_precision_tensors_convert_to_f32() {
    let dir = tmp_dir("dtypes");
    // Values exactly representable in both formats, plus format-specific edges:
    // f16 max 65504 and the smallest f16 subnormal 2⁻²⁴; bf16 256 and 2⁻¹⁰⁰ (bf16 has f32's
    // exponent range). 0.1 is not representable in bf16: f32 0.1 = 0x3DCCCCCD, rounded to
    // the upper 16 bits with round-to-nearest-even is 0x3DCD = 0.10009765625.
    let f16_vals = [1.5f32, -2.25, 0.0, 65504.0, 2f32.powi(-24), -0.5];
    let bf16_vals = [1.5f32, -2.25, 256.0, 2f32.powi(-100), 0.1, -0.0];
    let bf16_tenth = f32::from_bits(0x3DCD_0000);
    assert_eq!(bf16_tenth as f64, 0.100_097_656_25);
    let bf16_want = [1.5f32, -2.25, 256.0, 2f32.powi(-100), bf16_tenth, -0.0];
    let f64_vals = [0.5f64, -3.25, 1e-3];
    let path = dir.join("half.safetensors");
    write_st(
        &path,
        &[
            Entry {
                name: "h".into(),
                dtype: Dtype::F16,
                shape: vec![2, 3],
                bytes: f16_vals.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
            },
            Entry {
                name: "b".into(),
                dtype: Dtype::BF16,
                shape: vec![6],
                bytes: bf16_vals.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
            },
            Entry {
                name: "d".into(),
                dtype: Dtype::F64,
                shape: vec![3],
                bytes: f64_vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
            },
        ],
    );
    let ck = Checkpoint::load(&path).unwrap();
    let h = ck.get("h").unwrap();
    assert_eq!((h.dtype(), h.shape()), (DType::F32, &[2usize, 3][..]));
    assert_eq!(h.as_f32("h").unwrap(), &f16_vals);
    let bt = ck.get("b").unwrap();
    assert_eq!(bt.dtype(), DType::F32);
    let got = bt.as_f32("b").unwrap();
    for (i, (&g, &w)) in got.iter().zip(&bf16_want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "bf16 element {i}: {g} vs {w}");
    }
    let d = ck.get("d").unwrap().as_f32("d").unwrap();
    assert_eq!(d, &[0.5f32, -3.25, 1e-3f64 as f32]);
}

#[test]
fn integer_tensors_convert_to_i32() {
    let dir = tmp_dir("ints");
    let i64_vals = [0i64, -5, 7, i32::MAX as i64, i32::MIN as i64, 3];
    let i32_vals = [1i32, -1, 42];
    let path = dir.join("ints.safetensors");
    write_st(
        &path,
        &[
            Entry {
                name: "outputs.expert_idx".into(),
                dtype: Dtype::I64,
                shape: vec![2, 3],
                bytes: i64_vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
            },
            Entry {
                name: "i".into(),
                dtype: Dtype::I32,
                shape: vec![3],
                bytes: i32_vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
            },
        ],
    );
    let ck = Checkpoint::load(&path).unwrap();
    let t = ck.get("outputs.expert_idx").unwrap();
    assert_eq!((t.dtype(), t.shape()), (DType::I32, &[2usize, 3][..]));
    assert_eq!(t.as_i32("idx").unwrap(), &[0, -5, 7, i32::MAX, i32::MIN, 3]);
    assert_eq!(ck.get("i").unwrap().as_i32("i").unwrap(), &i32_vals);
    // An int64 that does not fit int32 is a checkpoint error naming the tensor, not a wrap
    // (when the tensor is read: opening reads headers only).
    let path = dir.join("big.safetensors");
    write_st(
        &path,
        &[Entry {
            name: "too_big".into(),
            dtype: Dtype::I64,
            shape: vec![2],
            bytes: [1i64, 1 << 31].iter().flat_map(|v| v.to_le_bytes()).collect(),
        }],
    );
    match Checkpoint::load(&path).unwrap().get("too_big") {
        Err(Error::Checkpoint { msg, .. }) => assert!(msg.contains("too_big"), "{msg}"),
        other => panic!("expected Error::Checkpoint, got {other:?}"),
    }
}

// ------------------------------------------------------------------------------ DeepSpeed

const DM: usize = 6; // hidden
const DF: usize = 5; // ffn
const DE: usize = 3; // experts

/// One `nn.Sequential(Linear(M, F), ReLU, Linear(F, M))` block: `0.weight`, `0.bias`,
/// `2.weight`, `2.bias`.
struct MlpBlock {
    w0: Vec<f32>,
    b0: Vec<f32>,
    w2: Vec<f32>,
    b2: Vec<f32>,
}

fn mlp_block(seed: u64) -> MlpBlock {
    MlpBlock {
        w0: lcg(seed, DF * DM, 0.6),
        b0: lcg(seed + 1, DF, 0.3),
        w2: lcg(seed + 2, DM * DF, 0.6),
        b2: lcg(seed + 3, DM, 0.3),
    }
}

fn mlp_entries(prefix: &str, m: &MlpBlock) -> Vec<Entry> {
    vec![
        f32_entry(&format!("{prefix}0.weight"), &[DF, DM], &m.w0),
        f32_entry(&format!("{prefix}0.bias"), &[DF], &m.b0),
        f32_entry(&format!("{prefix}2.weight"), &[DM, DF], &m.w2),
        f32_entry(&format!("{prefix}2.bias"), &[DM], &m.b2),
    ]
}

fn mlp_ref(m: &MlpBlock, x: &[f64]) -> Vec<f64> {
    let h: Vec<f64> = matvec(&m.w0, Some(&m.b0), x, DF).into_iter().map(|v| v.max(0.0)).collect();
    matvec(&m.w2, Some(&m.b2), &h, DM)
}

struct DsWeights {
    wg: Vec<f32>,
    experts: Vec<MlpBlock>,
    mlp: MlpBlock,
    cw: Vec<f32>,
    cb: Vec<f32>,
}

fn ds_weights() -> DsWeights {
    DsWeights {
        wg: lcg(200, DE * DM, 1.0),
        experts: (0..DE).map(|e| mlp_block(300 + 10 * e as u64)).collect(),
        mlp: mlp_block(400),
        cw: lcg(500, 2 * DM, 1.0),
        cb: vec![0.25, -0.5],
    }
}

fn ds_entries(w: &DsWeights, prefix: &str) -> Vec<Entry> {
    let mut v = vec![f32_entry(&format!("{prefix}deepspeed_moe.gate.wg.weight"), &[DE, DM], &w.wg)];
    for (e, blk) in w.experts.iter().enumerate() {
        v.extend(mlp_entries(&format!("{prefix}deepspeed_moe.experts.deepspeed_experts.{e}."), blk));
    }
    v.extend(mlp_entries(&format!("{prefix}mlp."), &w.mlp));
    v.push(f32_entry(&format!("{prefix}coefficient.weight"), &[2, DM], &w.cw));
    v.push(f32_entry(&format!("{prefix}coefficient.bias"), &[2], &w.cb));
    v
}

fn ds_cfg() -> Value {
    json!({
        "hidden_size": DM,
        "num_experts": DE,
        "k": 1,
        "min_capacity": 0,
        "drop_tokens": false,
        "use_rts": false,
        "use_residual": true,
        "expert": {"type": "mlp_relu", "ffn_hidden": DF},
    })
}

/// DeepSpeed top-1 residual MoE in f64: moe = p[e*] · expert_e*(x) (top-1 weights are not
/// renormalised), c = softmax(coefficient(x)), y = moe · c₀ + mlp(x) · c₁.
fn ds_reference(w: &DsWeights, x: &[f32]) -> Vec<f64> {
    let s = x.len() / DM;
    let mut y = Vec::with_capacity(s * DM);
    for t in 0..s {
        let xt: Vec<f64> = x[t * DM..(t + 1) * DM].iter().map(|&v| v as f64).collect();
        let p = softmax(&matvec(&w.wg, None, &xt, DE));
        let best = (0..DE).fold(0, |b, e| if p[e] > p[b] { e } else { b });
        let moe = mlp_ref(&w.experts[best], &xt);
        let dense = mlp_ref(&w.mlp, &xt);
        let c = softmax(&matvec(&w.cw, Some(&w.cb), &xt, 2));
        y.extend((0..DM).map(|i| p[best] * moe[i] * c[0] + dense[i] * c[1]));
    }
    y
}

#[test]
fn deepspeed_residual_state_dict_imports_and_matches_reference() {
    let dir = tmp_dir("deepspeed");
    let w = ds_weights();
    let path = dir.join("ds.safetensors");
    write_st(&path, &ds_entries(&w, "layers.1.mlp."));
    let spec = deepspeed::layer_spec(&ds_cfg()).unwrap();
    let mut ck = Checkpoint::load(&path).unwrap();
    let wl = deepspeed::layer_weights(&mut ck, &spec, "layers.1.mlp.").unwrap();
    assert!(wl.residual.is_some());
    let x = lcg(600, 7 * DM, 1.5);
    let y = forward(&be(), &spec, &wl, &x);
    let err = rel_l2(&y, &ds_reference(&w, &x));
    assert!(err < 1e-5, "relative error {err}");
}

#[test]
fn deepspeed_state_dict_errors_are_named() {
    let dir = tmp_dir("deepspeed_errors");
    let w = ds_weights();
    let spec = deepspeed::layer_spec(&ds_cfg()).unwrap();
    let load = |name: &str, entries: Vec<Entry>| {
        let path = dir.join(name);
        write_st(&path, &entries);
        let mut ck = Checkpoint::load(&path).unwrap();
        deepspeed::layer_weights(&mut ck, &spec, "").err()
    };
    // Missing residual coefficient bias.
    let e =
        load("nobias.safetensors", ds_entries(&w, "").into_iter().filter(|e| e.name != "coefficient.bias").collect());
    assert!(matches!(&e, Some(Error::MissingTensor(n)) if n == "coefficient.bias"), "{e:?}");
    // Missing an expert's output bias.
    let name = "deepspeed_moe.experts.deepspeed_experts.2.2.bias";
    let e = load("noexp.safetensors", ds_entries(&w, "").into_iter().filter(|e| e.name != name).collect());
    assert!(matches!(&e, Some(Error::MissingTensor(n)) if n == name), "{e:?}");
    // A fourth expert the config does not have.
    let mut entries = ds_entries(&w, "");
    entries.extend(mlp_entries("deepspeed_moe.experts.deepspeed_experts.3.", &w.mlp));
    match load("extra.safetensors", entries) {
        Some(Error::UnexpectedTensors(names)) => {
            assert_eq!(names.len(), 4, "{names:?}");
            assert!(names.iter().all(|n| n.starts_with("deepspeed_moe.experts.deepspeed_experts.3.")), "{names:?}");
        }
        other => panic!("expected UnexpectedTensors, got {other:?}"),
    }
    // A router of the wrong shape, named with the expected one.
    let mut entries = ds_entries(&w, "");
    entries[0] = f32_entry("deepspeed_moe.gate.wg.weight", &[DM, DE], &w.wg);
    match load("shape.safetensors", entries) {
        Some(Error::Shape { tensor, expected, .. }) => {
            assert_eq!((tensor.as_str(), expected.as_str()), ("deepspeed_moe.gate.wg.weight", "[3, 6]"));
        }
        other => panic!("expected a shape error, got {other:?}"),
    }
    // Residual tensors present while use_residual = false are unexpected.
    let spec_nores = deepspeed::layer_spec(&json!({
        "hidden_size": DM, "num_experts": DE, "min_capacity": 0,
        "expert": {"type": "mlp_relu", "ffn_hidden": DF},
    }))
    .unwrap();
    let path = dir.join("nores.safetensors");
    write_st(&path, &ds_entries(&w, ""));
    let mut ck = Checkpoint::load(&path).unwrap();
    match deepspeed::layer_weights(&mut ck, &spec_nores, "") {
        Err(Error::UnexpectedTensors(names)) => {
            assert!(names.contains(&"coefficient.weight".to_string()), "{names:?}");
            assert!(names.contains(&"mlp.0.weight".to_string()), "{names:?}");
        }
        other => panic!("expected UnexpectedTensors, got {:?}", other.err()),
    }
}

#[test]
fn deepspeed_glu_experts_with_bias_import() {
    let dir = tmp_dir("deepspeed_glu_bias");
    let (m, f, e) = (4usize, 3usize, 2usize);
    let wg = lcg(1, e * m, 1.0);
    let mut entries = vec![f32_entry("deepspeed_moe.gate.wg.weight", &[e, m], &wg)];
    let mut blocks = Vec::new();
    for x in 0..e {
        let s = 10 * x as u64;
        let blk = (
            lcg(s + 100, f * m, 0.5),
            lcg(s + 101, f, 0.2),
            lcg(s + 102, f * m, 0.5),
            lcg(s + 103, f, 0.2),
            lcg(s + 104, m * f, 0.5),
            lcg(s + 105, m, 0.2),
        );
        let p = format!("deepspeed_moe.experts.deepspeed_experts.{x}.");
        entries.push(f32_entry(&format!("{p}gate_proj.weight"), &[f, m], &blk.0));
        entries.push(f32_entry(&format!("{p}gate_proj.bias"), &[f], &blk.1));
        entries.push(f32_entry(&format!("{p}up_proj.weight"), &[f, m], &blk.2));
        entries.push(f32_entry(&format!("{p}up_proj.bias"), &[f], &blk.3));
        entries.push(f32_entry(&format!("{p}down_proj.weight"), &[m, f], &blk.4));
        entries.push(f32_entry(&format!("{p}down_proj.bias"), &[m], &blk.5));
        blocks.push(blk);
    }
    let path = dir.join("glu.safetensors");
    write_st(&path, &entries);
    let spec = deepspeed::layer_spec(&json!({
        "hidden_size": m, "num_experts": e, "min_capacity": 0, "drop_tokens": false, "use_rts": false,
        "expert": {"type": "glu_silu", "ffn_hidden": f, "bias": true},
    }))
    .unwrap();
    let mut ck = Checkpoint::load(&path).unwrap();
    let wl = deepspeed::layer_weights(&mut ck, &spec, "").expect("GLU experts with biases import");
    // Reference: top-1, y = p · down(silu(gate x + bg) · (up x + bu)) + bd.
    let x = lcg(9, 3 * m, 1.0);
    let mut want = Vec::new();
    for t in 0..3 {
        let xt: Vec<f64> = x[t * m..(t + 1) * m].iter().map(|&v| v as f64).collect();
        let p = softmax(&matvec(&wg, None, &xt, e));
        let best = if p[1] > p[0] { 1 } else { 0 };
        let b = &blocks[best];
        let g = matvec(&b.0, Some(&b.1), &xt, f);
        let u = matvec(&b.2, Some(&b.3), &xt, f);
        let h: Vec<f64> = g.iter().zip(&u).map(|(&a, &c)| silu(a) * c).collect();
        want.extend(matvec(&b.4, Some(&b.5), &h, m).into_iter().map(|v| p[best] * v));
    }
    let err = rel_l2(&forward(&be(), &spec, &wl, &x), &want);
    assert!(err < 1e-5, "relative error {err}");
}

//! The backward of every HF model-family block against torch autograd through
//! transformers' own module (tests/golden-models-grad, written by gen_grads.py there):
//! the input's gradient, the router weight's, and the router and output biases' where the
//! family has them.

mod common;

use moe_engine::import::hf::HfModel;
use moe_engine::import::Checkpoint;
use moe_engine::layer::BackwardOptions;
use moe_engine::{golden, Backend, LayerOptions, MoeLayer};
use std::path::Path;

/// The engine's gradient name of each reference tensor.
const GRADS: [(&str, &str); 3] =
    [("grad/router", "gate.weight"), ("grad/router_bias", "gate.logit_bias"), ("grad/output_bias", "output_bias")];

/// Runs one case's backward on `b`; the worst relative L2 error, or why it failed.
fn check_case<B: Backend>(b: &B, case: &Path, grads: &Path) -> Result<f64, String> {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(case.join("case.json")).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    let layer_idx = meta["layer"].as_u64().ok_or("case.json: layer")? as usize;
    let model = HfModel::open(&case.join(meta["model_dir"].as_str().ok_or("case.json: model_dir")?))
        .map_err(|e| e.to_string())?;
    let (spec, w) = model.load_layer(layer_idx).map_err(|e| e.to_string())?;
    let inputs = Checkpoint::load(&case.join("tensors.safetensors")).map_err(|e| e.to_string())?;
    let refs = Checkpoint::load(grads).map_err(|e| e.to_string())?;
    let layer = MoeLayer::new_trainable(b, spec, &w).map_err(|e| e.to_string())?;
    let x = b.upload(inputs.get("input/x").map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    let opts = LayerOptions { keep_activations: true, ..Default::default() };
    let out = layer.forward(b, &x, &opts).map_err(|e| e.to_string())?;
    let dy = b.upload(refs.get("input/dy").map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    let g = layer.backward(b, &out, &dy, &BackwardOptions::default()).map_err(|e| e.to_string())?;
    let dx = b.download(&g.dx).map_err(|e| e.to_string())?;
    let mut compared = vec![("grad/dx", dx)];
    let named = g.into_named();
    for (key, engine) in GRADS {
        let have = named.iter().find(|(n, _)| n == engine);
        match (refs.contains(key), have) {
            (true, Some((_, t))) => compared.push((key, b.download(t).map_err(|e| e.to_string())?)),
            (false, None) => {}
            (true, None) => return Err(format!("the engine has no gradient `{engine}` for `{key}`")),
            (false, Some(_)) => return Err(format!("the engine has a gradient `{engine}` the reference lacks")),
        }
    }
    let mut worst = 0f64;
    for (key, have) in compared {
        let want = refs.get(key).map_err(|e| e.to_string())?;
        if want.shape() != have.shape() {
            return Err(format!("{key}: shape {:?}, reference {:?}", have.shape(), want.shape()));
        }
        let e = golden::rel_l2(&have.to_f64(), &want.to_f64());
        if e > 1e-5 {
            return Err(format!("{key}: rel L2 {e:.2e}"));
        }
        worst = worst.max(e);
    }
    Ok(worst)
}

fn check_all<B: Backend>(b: &B) {
    let dir = common::golden_models_dir();
    let grads = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden-models-grad");
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in golden::discover(&dir).expect("model cases") {
        let name = case.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let reference = grads.join(format!("{name}.safetensors"));
        if !reference.exists() {
            // 31-33 are the quantised copies of families 10, 06 and 03.
            assert!(name.as_str() > "30", "{name} has no reference gradients");
            continue;
        }
        checked += 1;
        if let Err(e) = check_case(b, &case, &reference) {
            failures.push(format!("{name}: {e}"));
        }
    }
    assert_eq!(checked, 30, "every family's gradients are checked");
    assert!(failures.is_empty(), "gradients off on {}:\n{}", b.name(), failures.join("\n"));
}

#[test]
fn every_family_block_backward_matches_torch_autograd_on_cpu() {
    check_all(&common::cpu(2));
}

#[test]
fn every_family_block_backward_matches_torch_autograd_on_wgpu() {
    let Some(b) = common::wgpu("every_family_block_backward_matches_torch_autograd_on_wgpu") else { return };
    check_all(&b);
}

//! `moe_engine._native`: the extension module under the Python package `moe_engine`.
//! It builds engine layers from torch state dicts (a DeepSpeed `MoE`, a transformers MoE
//! block), runs them on the chosen backend, and hands back torch tensors. The torch
//! modules, autograd and the process groups are in the Python package (`moe_engine/`).
//! No panic crosses into Python: engine errors are `ValueError` / `RuntimeError`
//! ([`errors`]), and PyO3 turns a panic into `PanicException` rather than an abort.

mod backends;
mod dist;
mod engine;
mod errors;
mod tensors;

use engine::{AnyLayer, Forward, Naming, SavedForward};
use errors::{value_error, OrPy};
use moe_engine::config::Mode;
use moe_engine::import::{deepspeed, hf, Checkpoint};
use moe_engine::{GateOptions, LayerOptions, NoiseOverrides};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use serde_json::Value;
use std::sync::{Arc, Mutex};
use tensors::{host_from_torch, host_map, torch_from_host};

fn parse_json(text: &str, what: &str) -> PyResult<Value> {
    serde_json::from_str(text).map_err(|e| value_error(format!("{what}: not valid JSON: {e}")))
}

/// One MoE layer on a backend.
#[pyclass(module = "moe_engine._native", frozen)]
struct Layer {
    inner: Arc<dyn AnyLayer>,
}

/// What a training forward kept for its backward (the device tensors of that forward).
#[pyclass(module = "moe_engine._native", frozen)]
struct Saved {
    inner: Mutex<Option<Box<dyn SavedForward>>>,
}

fn forward_result<'py>(
    py: Python<'py>,
    f: Forward,
    saved: Option<Box<dyn SavedForward>>,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("y", torch_from_host(py, &f.y)?)?;
    d.set_item("logits", torch_from_host(py, &f.logits)?)?;
    let r = &f.report;
    d.set_item("l_aux", r.losses.l_aux)?;
    d.set_item("load_balancing", r.losses.load_balancing)?;
    d.set_item("z_loss", r.losses.z_loss)?;
    d.set_item("exp_counts", r.exp_counts.clone())?;
    d.set_item("kept_counts", r.kept_counts.clone())?;
    d.set_item("capacity", r.capacity)?;
    d.set_item("dropped_routes", r.dropped_routes)?;
    d.set_item("dropped_tokens", r.dropped_tokens)?;
    d.set_item("masked_routes", r.masked_routes)?;
    if let Some(s) = saved {
        d.set_item("saved", Saved { inner: Mutex::new(Some(s)) })?;
    }
    Ok(d)
}

#[pymethods]
impl Layer {
    /// The backend the layer runs on (`cpu`, `wgpu`, `cuda`).
    #[getter]
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    /// Routed experts of the layer (all ranks together).
    #[getter]
    fn num_experts(&self) -> usize {
        self.inner.spec().num_experts
    }

    /// The routing in one line.
    #[getter]
    fn routing(&self) -> String {
        self.inner.spec().gate.to_string()
    }

    /// Forward of `x` `[S, M]` (or `[B, T, M]`): a dict with `y`, `logits`, `l_aux`,
    /// `exp_counts`, drops, and with `keep=True` the `saved` state of a backward.
    /// Noise tensors replace the engine's own draws (how the torch module replays
    /// DeepSpeed's torch RNG draws).
    #[pyo3(signature = (x, *, train=false, keep=false, seed=0, jitter=None, gumbel=None, rts=None, used_token=None))]
    #[allow(clippy::too_many_arguments)]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        train: bool,
        keep: bool,
        seed: u64,
        jitter: Option<&Bound<'py, PyAny>>,
        gumbel: Option<&Bound<'py, PyAny>>,
        rts: Option<&Bound<'py, PyAny>>,
        used_token: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let x = host_from_torch(x, "hidden_states")?;
        let opt = |t: Option<&Bound<'py, PyAny>>, name: &str| t.map(|t| host_from_torch(t, name)).transpose();
        let opts = LayerOptions {
            gate: GateOptions {
                mode: if train { Mode::Train } else { Mode::Eval },
                seed,
                noise: NoiseOverrides {
                    jitter: opt(jitter, "jitter")?,
                    gumbel: opt(gumbel, "gumbel")?,
                    rts: opt(rts, "rts")?,
                },
                used_token: opt(used_token, "used_token")?,
            },
            keep_activations: keep,
            time_exchange: false,
        };
        // The GIL is released while the engine computes (torch's other threads run on); an
        // expert-parallel exchange takes it back for its collectives.
        let inner = &self.inner;
        let (f, saved) = py.detach(|| inner.forward(&x, &opts)).py()?;
        forward_result(py, f, saved)
    }
}

#[pymethods]
impl Saved {
    /// The backward of the saved forward for `Σ y · dy + l_aux_coef · l_aux`: `(dx,
    /// {parameter name: gradient})`, names as the torch module's. Runs once: the saved
    /// tensors are freed after it.
    #[pyo3(signature = (dy, l_aux_coef=0.0))]
    fn backward<'py>(
        &self,
        py: Python<'py>,
        dy: &Bound<'py, PyAny>,
        l_aux_coef: f64,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyDict>)> {
        let dy = host_from_torch(dy, "grad of the output")?;
        let saved = self
            .inner
            .lock()
            .map_err(|_| value_error("a backward of this forward failed"))?
            .take()
            .ok_or_else(|| value_error("this forward's backward already ran (retain_graph is not supported)"))?;
        let (dx, grads) = py.detach(move || saved.backward(&dy, l_aux_coef)).py()?;
        let out = PyDict::new(py);
        for (name, g) in grads {
            out.set_item(name, torch_from_host(py, &g)?)?;
        }
        Ok((torch_from_host(py, &dx)?, out))
    }
}

/// A layer from `deepspeed.moe.layer.MoE` keyword arguments (JSON, with an `expert`
/// description `{type, ffn_hidden, bias}`) and the module's state dict. With `group` (a
/// `moe_engine._dist.TorchGroup`), the layer is one rank of an expert-parallel group and
/// `tensors` hold only its own experts, as DeepSpeed's state dict on that rank does.
#[pyfunction]
#[pyo3(signature = (config, tensors, backend="cpu", device=None, trainable=true, group=None))]
fn deepspeed_layer(
    config: &str,
    tensors: &Bound<'_, PyDict>,
    backend: &str,
    device: Option<&str>,
    trainable: bool,
    group: Option<&Bound<'_, PyAny>>,
) -> PyResult<Layer> {
    let cfg = parse_json(config, "config")?;
    let spec = deepspeed::layer_spec(&cfg).py()?;
    let mut ck = Checkpoint::from_map(host_map(tensors)?, "the module's state_dict");
    let transport = group.map(dist::TorchTransport::new).transpose()?;
    let holding = match &transport {
        Some(t) => {
            // layer_spec checked that ep_size is a count dividing num_experts.
            let ep = cfg.get("ep_size").and_then(Value::as_u64).unwrap_or(1) as usize;
            if ep != moe_engine::parallel::Communicator::size(t) {
                return Err(value_error(format!(
                    "ep_size = {ep}, but the expert-parallel group has {} ranks",
                    moe_engine::parallel::Communicator::size(t)
                )));
            }
            spec.num_experts / ep
        }
        None => spec.num_experts,
    };
    let weights = deepspeed::layer_weights_holding(&mut ck, &spec, "", holding).py()?;
    let inner = backends::build(backend, device, spec, &weights, trainable, transport, Naming::DeepSpeed).py()?;
    Ok(Layer { inner })
}

/// A layer from a transformers model's config (JSON, `model.config.to_json_string()`),
/// the decoder layer's index, and its MoE block's `state_dict()` (names relative to the
/// block). Inference only.
#[pyfunction]
#[pyo3(signature = (config, layer, tensors, backend="cpu", device=None))]
fn hf_layer(
    config: &str,
    layer: usize,
    tensors: &Bound<'_, PyDict>,
    backend: &str,
    device: Option<&str>,
) -> PyResult<Layer> {
    let model = hf::HfModel::from_config(parse_json(config, "config")?).py()?;
    let mut ck = Checkpoint::from_map(host_map(tensors)?, &format!("layer {layer}'s MoE block"));
    let (spec, weights) = model.load_block_at(&mut ck, layer, "").py()?;
    let inner = backends::build(backend, device, spec, &weights, false, None, Naming::Hf).py()?;
    Ok(Layer { inner })
}

/// The decoder layers of a transformers config whose feed-forward is an MoE block the
/// engine runs, and the family's name.
#[pyfunction]
fn hf_moe_layers(config: &str) -> PyResult<(String, Vec<usize>)> {
    let model = hf::HfModel::from_config(parse_json(config, "config")?).py()?;
    Ok((model.family().model_type().to_string(), model.moe_layers()))
}

/// The backend `auto` picks on this machine.
#[pyfunction]
fn auto_backend() -> &'static str {
    backends::auto()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Layer>()?;
    m.add_class::<Saved>()?;
    m.add_function(wrap_pyfunction!(deepspeed_layer, m)?)?;
    m.add_function(wrap_pyfunction!(hf_layer, m)?)?;
    m.add_function(wrap_pyfunction!(hf_moe_layers, m)?)?;
    m.add_function(wrap_pyfunction!(auto_backend, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

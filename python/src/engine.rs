//! One MoE layer on a backend, with the backend's type erased for Python: built from a
//! DeepSpeed `MoE` state dict or a transformers MoE block, run forward, and (DeepSpeed
//! layers) backward, with the gradients named as the torch module names its parameters.

use moe_engine::config::LayerSpec;
use moe_engine::import::deepspeed;
use moe_engine::losses::LossCoefs;
use moe_engine::weights::{HostLayerWeights, HostMlp};
use moe_engine::LayerGrads;
use moe_engine::{Backend, BackwardOptions, Error, HostTensor, LayerOptions, LayerOutput, MoeLayer, Report, Result};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// How a layer's parameters are named on the torch side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Naming {
    /// `deepspeed.moe.layer.MoE`'s state dict (gradients can be named).
    DeepSpeed,
    /// A transformers block (inference only).
    Hf,
}

/// What a forward hands back to Python.
pub struct Forward {
    /// The output, shaped like the input.
    pub y: HostTensor,
    /// Router logits `[S, E]`.
    pub logits: HostTensor,
    /// Loads, drops and losses.
    pub report: Report,
}

/// Gradients of one backward: of the input, and of every parameter by its torch name.
pub type Grads = (HostTensor, Vec<(String, HostTensor)>);

/// A forward's state kept for its backward (type-erased).
pub trait SavedForward: Send {
    /// The backward for `Σ y · dy + l_aux_coef · l_aux`.
    fn backward(&self, dy: &HostTensor, l_aux_coef: f64) -> Result<Grads>;
}

/// A layer on some backend (type-erased).
pub trait AnyLayer: Send + Sync {
    /// The backend's name.
    fn backend(&self) -> &'static str;
    /// The layer's spec.
    fn spec(&self) -> &LayerSpec;
    /// Forward of `x`; with `opts.keep_activations`, the state its backward needs.
    fn forward(&self, x: &HostTensor, opts: &LayerOptions) -> Result<(Forward, Option<Box<dyn SavedForward>>)>;
}

/// A layer and the backend it lives on.
pub struct Engine<B: Backend> {
    b: Arc<B>,
    layer: MoeLayer<B>,
    naming: Naming,
}

impl<B: Backend> Engine<B> {
    /// Wraps a built layer.
    pub fn new(b: Arc<B>, layer: MoeLayer<B>, naming: Naming) -> Arc<Self> {
        Arc::new(Engine { b, layer, naming })
    }
}

/// The handle Python holds: the engine behind an `Arc`, so a forward's saved state keeps
/// the weights it ran with even after the module rebuilt its layer.
pub struct Handle<B: Backend>(pub Arc<Engine<B>>);

struct Saved<B: Backend> {
    engine: Arc<Engine<B>>,
    // The device tensors of one forward; a Mutex makes the handle shareable with Python.
    out: Mutex<LayerOutput<B>>,
}

impl<B: Backend> AnyLayer for Handle<B>
where
    LayerOutput<B>: Send,
{
    fn backend(&self) -> &'static str {
        self.0.b.name()
    }

    fn spec(&self) -> &LayerSpec {
        self.0.layer.spec()
    }

    fn forward(&self, x: &HostTensor, opts: &LayerOptions) -> Result<(Forward, Option<Box<dyn SavedForward>>)> {
        let e = &self.0;
        let b = &*e.b;
        let out = e.layer.forward(b, &b.upload(x)?, opts)?;
        let fwd = Forward { y: b.download(&out.y)?, logits: b.download(&out.gate.logits)?, report: out.report(b)? };
        let saved: Option<Box<dyn SavedForward>> = if opts.keep_activations {
            Some(Box::new(Saved { engine: e.clone(), out: Mutex::new(out) }))
        } else {
            None
        };
        Ok((fwd, saved))
    }
}

impl<B: Backend> SavedForward for Saved<B>
where
    LayerOutput<B>: Send,
{
    fn backward(&self, dy: &HostTensor, l_aux_coef: f64) -> Result<Grads> {
        let e = &self.engine;
        if e.naming != Naming::DeepSpeed {
            return Err(Error::Misuse("the backward of a patched transformers block is not supported".into()));
        }
        let b = &*e.b;
        let out = self.out.lock().map_err(|_| Error::Internal("a backward panicked on this forward".into()))?;
        let opts = BackwardOptions { losses: LossCoefs { l_aux: l_aux_coef, ..Default::default() } };
        let g = e.layer.backward(b, &out, &b.upload(dy)?, &opts)?;
        let dx = b.download(&g.dx)?;
        let weights = host_grads(b, g)?;
        let named = deepspeed::state_dict(e.layer.spec(), &weights, "")?;
        Ok((dx, named.into_iter().collect()))
    }
}

/// A layer's gradients downloaded into the weights' own layout, so the importer's inverse
/// names them.
fn host_grads<B: Backend>(b: &B, g: LayerGrads<B>) -> Result<HostLayerWeights> {
    let mut named: BTreeMap<String, HostTensor> = BTreeMap::new();
    for (name, t) in g.into_named() {
        named.insert(name, b.download(&t)?);
    }
    let mut take = |n: &str| named.remove(n);
    // A dense block's gradients (the residual MLP) come without the expert dimension its
    // weights are read with ([1, ..]): put it back, so the importer's inverse reads them.
    let mlp = |take: &mut dyn FnMut(&str) -> Option<HostTensor>, p: &str, dense: bool| -> Result<Option<HostMlp>> {
        let mut get = |n: &str| -> Result<Option<HostTensor>> {
            match take(&format!("{p}.{n}")) {
                Some(t) if dense => {
                    let shape: Vec<usize> = std::iter::once(1).chain(t.shape().iter().copied()).collect();
                    Ok(Some(t.reshape(&shape)?))
                }
                other => Ok(other),
            }
        };
        let Some(w_in) = get("w_in")? else { return Ok(None) };
        Ok(Some(HostMlp { w_in, b_in: get("b_in")?, w_out: get("w_out")?, b_out: get("b_out")? }))
    };
    let gate = take("gate.weight").ok_or_else(|| Error::Internal("no router gradient".into()))?;
    let experts = mlp(&mut take, "experts", false)?.ok_or_else(|| Error::Internal("no expert gradients".into()))?;
    let residual = match mlp(&mut take, "residual", true)? {
        Some(m) => {
            let cw = take("coefficient.weight").ok_or_else(|| Error::Internal("no coefficient gradient".into()))?;
            let cb = take("coefficient.bias").ok_or_else(|| Error::Internal("no coefficient bias gradient".into()))?;
            Some((m, cw, cb))
        }
        None => None,
    };
    Ok(HostLayerWeights {
        gate,
        gate_bias: None,
        router_bias: None,
        output_bias: None,
        experts,
        residual,
        shared: None,
    })
}

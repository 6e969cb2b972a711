//! Which backend a layer runs on: `cpu`, `wgpu`, `cuda`, or `auto` (CUDA when a driver
//! and device answer, else a wgpu GPU adapter, else the cpu). One backend of each kind
//! is opened per process, on first use, and shared by every layer on it.

use crate::dist::TorchTransport;
use crate::engine::{AnyLayer, Engine, Handle, Naming};
use moe_engine::config::LayerSpec;
use moe_engine::parallel::{ExpertParallel, TokenLayout};
use moe_engine::weights::HostLayerWeights;
use moe_engine::{Backend, DType, Error, MoeLayer, Result};
use std::sync::{Arc, Mutex};

/// The backend `auto` stands for on this machine.
pub fn auto() -> &'static str {
    if moe_cuda::CudaBackend::new(0).is_ok() {
        "cuda"
    } else if moe_wgpu::list_adapters().iter().any(|a| a.kind != "Cpu") {
        "wgpu"
    } else {
        "cpu"
    }
}

/// The process's backend of one kind and device, opened on first use.
fn shared<B>(cache: &Mutex<Vec<(String, Arc<B>)>>, device: &str, open: impl FnOnce() -> Result<B>) -> Result<Arc<B>> {
    let mut c = cache.lock().map_err(|_| Error::Internal("the backend cache was poisoned".into()))?;
    if let Some((_, b)) = c.iter().find(|(d, _)| d == device) {
        return Ok(b.clone());
    }
    let b = Arc::new(open()?);
    c.push((device.to_string(), b.clone()));
    Ok(b)
}

static CPU: Mutex<Vec<(String, Arc<moe_cpu::CpuBackend>)>> = Mutex::new(Vec::new());
static WGPU: Mutex<Vec<(String, Arc<moe_wgpu::WgpuBackend>)>> = Mutex::new(Vec::new());
static CUDA: Mutex<Vec<(String, Arc<moe_cuda::CudaBackend>)>> = Mutex::new(Vec::new());

fn layer_on<B: Backend>(
    b: Arc<B>,
    spec: LayerSpec,
    weights: &HostLayerWeights,
    trainable: bool,
    transport: Option<TorchTransport>,
    naming: Naming,
) -> Result<Arc<dyn AnyLayer>>
where
    moe_engine::LayerOutput<B>: Send,
    TorchTransport: moe_engine::parallel::Transport<B>,
{
    let layer = match transport {
        // Each rank gates its own tokens, as every DeepSpeed rank does.
        Some(t) => {
            let ep = ExpertParallel::deepspeed(Arc::new(t), spec.num_experts, TokenLayout::Sharded)?;
            MoeLayer::new_ep_local(&*b, spec, weights, trainable, ep)?
        }
        None if trainable => MoeLayer::new_trainable(&*b, spec, weights)?,
        None => MoeLayer::new(&*b, spec, weights, DType::F32)?,
    };
    Ok(Arc::new(Handle(Engine::new(b, layer, naming))))
}

/// Builds a layer on backend `name` (`device`: a wgpu adapter or CUDA device index).
pub fn build(
    name: &str,
    device: Option<&str>,
    spec: LayerSpec,
    weights: &HostLayerWeights,
    trainable: bool,
    transport: Option<TorchTransport>,
    naming: Naming,
) -> Result<Arc<dyn AnyLayer>> {
    let name = if name == "auto" { auto() } else { name };
    let key = device.unwrap_or("");
    match name {
        "cpu" => {
            layer_on(shared(&CPU, key, || moe_cpu::CpuBackend::new(None))?, spec, weights, trainable, transport, naming)
        }
        "wgpu" => layer_on(
            shared(&WGPU, key, || moe_wgpu::WgpuBackend::new(device))?,
            spec,
            weights,
            trainable,
            transport,
            naming,
        ),
        "cuda" => {
            let ordinal = match device {
                None => 0,
                Some(d) => {
                    d.parse().map_err(|_| Error::config("device", format!("cuda takes a device index, got `{d}`")))?
                }
            };
            layer_on(
                shared(&CUDA, key, || moe_cuda::CudaBackend::new(ordinal))?,
                spec,
                weights,
                trainable,
                transport,
                naming,
            )
        }
        other => Err(Error::config("backend", format!("`{other}` is not one of cpu, wgpu, cuda, auto"))),
    }
}

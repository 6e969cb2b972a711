//! Quickstart: build a DeepSpeed-style MoE layer in code and run it on the cpu backend.
//!
//! The equivalent DeepSpeed code is
//!
//! ```python
//! expert = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
//! moe = deepspeed.moe.layer.MoE(hidden_size=64, expert=expert, num_experts=8, k=2,
//!                               capacity_factor=1.0, eval_capacity_factor=1.0,
//!                               min_capacity=4, use_residual=True)
//! y, l_aux, exp_counts = moe(x)
//! ```
//!
//! Run with `cargo run --release --example quickstart`.

use moe_engine::import::deepspeed;
use moe_engine::{stack, DType, Device, HostTensor, LayerOptions, MoeLayer};

fn main() -> moe_engine::Result<()> {
    // 1. The layer, from the same keyword arguments DeepSpeed's MoE(...) takes, plus a
    //    description of the expert module.
    let spec = deepspeed::layer_spec(&serde_json::json!({
        "hidden_size": 64,
        "num_experts": 8,
        "k": 2,
        "capacity_factor": 1.0,
        "eval_capacity_factor": 1.0,
        "min_capacity": 4,
        "use_residual": true,
        "expert": {"type": "mlp_gelu", "ffn_hidden": 256, "bias": true}
    }))?;

    // 2. Weights: random here; `deepspeed::layer_weights` reads a DeepSpeed state dict
    //    from safetensors instead (see `moe_engine::import`).
    let weights = stack::random_weights(&spec, 42)?;

    // 3. A backend and the layer on it.
    let backend = moe_cpu::CpuBackend::new(None)?;
    let layer = MoeLayer::new(&backend, spec, &weights, DType::F32)?;

    // 4. A batch of 2 sequences of 16 tokens.
    let x: Vec<f32> = (0..2 * 16 * 64).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
    let x = backend.upload(&HostTensor::f32(&[2, 16, 64], x)?)?;
    let out = layer.forward(&backend, &x, &LayerOptions::default())?;

    // 5. Outputs: y stays on the device until downloaded; the report carries the
    //    per-expert load, capacity, drops and losses.
    let y = backend.download(&out.y)?;
    let report = out.report(&backend)?;
    println!("y: shape {:?}, first values {:?}", y.shape(), &y.as_f32("y")?[..4]);
    println!(
        "exp_counts {:?}  capacity {}  dropped routes {}  dropped tokens {}",
        report.exp_counts, report.capacity, report.dropped_routes, report.dropped_tokens
    );
    println!("l_aux {:.5}", report.losses.l_aux);
    Ok(())
}

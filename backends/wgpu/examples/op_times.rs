//! Times single wgpu ops on the default adapter (each: record, submit, wait), to see where
//! a layer forward spends its time. `cargo run --release -p moe-wgpu --example op_times`
use moe_engine::{Backend, Device, HostTensor};
use std::time::Instant;

fn main() -> moe_engine::Result<()> {
    let b = moe_wgpu::WgpuBackend::new(None)?;
    println!("{}", b.capabilities().device);
    let (r, k, n) = (512, 1024, 1024);
    let x = b.upload(&HostTensor::f32(&[r, k], vec![0.5; r * k])?)?;
    let w = b.upload_weight(&HostTensor::f32(&[n, k], vec![0.25; n * k])?, moe_engine::DType::F32)?;
    for _ in 0..2 {
        let t = Instant::now();
        let y = b.linear(&x, &w, None)?;
        b.synchronize()?;
        let s = t.elapsed().as_secs_f64();
        println!("linear {r}x{k}x{n}: {:.1} ms, {:.2} GFLOP/s", s * 1e3, 2.0 * (r * k * n) as f64 / s / 1e9);
        drop(y);
    }
    let t = Instant::now();
    let a = b.activation(&x, moe_engine::Activation::Silu)?;
    b.synchronize()?;
    println!("silu over {} values: {:.1} ms", r * k, t.elapsed().as_secs_f64() * 1e3);
    drop(a);
    Ok(())
}

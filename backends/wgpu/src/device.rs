//! Adapter discovery and selection: by index or name (`--device`), by the
//! `WGPU_ADAPTER_NAME` environment variable (as wgpu's own examples honour it), or the best
//! kind available (discrete, integrated, virtual, then cpu).

use moe_engine::{Error, Result};

/// What `moe info` lists for one adapter.
#[derive(Clone, Debug)]
pub struct AdapterSummary {
    /// Index in enumeration order (what `--device N` picks).
    pub index: usize,
    /// Adapter name as the driver reports it.
    pub name: String,
    /// Graphics API (Vulkan, Metal, Dx12, Gl).
    pub api: String,
    /// Discrete, integrated, virtual or cpu.
    pub kind: String,
    /// Driver name and version.
    pub driver: String,
    /// Whether the adapter can store f16 (`SHADER_F16`).
    pub f16: bool,
    /// Largest storage binding in bytes.
    pub max_storage_binding: u64,
}

pub(crate) fn instance() -> wgpu::Instance {
    // Honours WGPU_BACKEND and the other wgpu environment variables.
    wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env())
}

/// Adapters that can run compute shaders: the primary APIs (Vulkan, Metal, DX12) first;
/// GL only when none of those has an adapter (or when WGPU_BACKEND asks for it), since
/// probing GL on a headless machine prints display-server noise and its compute support
/// is the weakest.
pub(crate) fn compute_adapters(instance: &wgpu::Instance) -> Vec<wgpu::Adapter> {
    let list = |backends| -> Vec<wgpu::Adapter> {
        pollster::block_on(instance.enumerate_adapters(backends))
            .into_iter()
            .filter(|a| a.get_downlevel_capabilities().flags.contains(wgpu::DownlevelFlags::COMPUTE_SHADERS))
            .collect()
    };
    if let Some(requested) = wgpu::Backends::from_env() {
        return list(requested);
    }
    let primary = list(wgpu::Backends::PRIMARY);
    if primary.is_empty() {
        list(wgpu::Backends::SECONDARY)
    } else {
        primary
    }
}

pub(crate) fn summary(index: usize, a: &wgpu::Adapter) -> AdapterSummary {
    let info = a.get_info();
    AdapterSummary {
        index,
        name: info.name.clone(),
        api: format!("{:?}", info.backend),
        kind: format!("{:?}", info.device_type),
        driver: format!("{} {}", info.driver, info.driver_info).trim().to_string(),
        f16: a.features().contains(wgpu::Features::SHADER_F16),
        max_storage_binding: a.limits().max_storage_buffer_binding_size,
    }
}

/// Every compute adapter this machine has.
pub fn list_adapters() -> Vec<AdapterSummary> {
    compute_adapters(&instance()).iter().enumerate().map(|(i, a)| summary(i, a)).collect()
}

fn rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

/// Picks an adapter: `selector` is an index or a case-insensitive name fragment; without
/// one, `WGPU_ADAPTER_NAME` is honoured; otherwise the best kind wins (ties: enumeration
/// order, so the choice is stable).
pub(crate) fn select(selector: Option<&str>) -> Result<(wgpu::Adapter, usize)> {
    let adapters = compute_adapters(&instance());
    if adapters.is_empty() {
        return Err(Error::backend(
            "wgpu",
            "no GPU adapter with compute shaders found (no Vulkan, Metal, DX12 or GL driver; on Linux \
                  without a GPU install Mesa's lavapipe: apt install mesa-vulkan-drivers)",
        ));
    }
    let names = || adapters.iter().enumerate().map(|(i, a)| format!("[{i}] {}", a.get_info().name)).collect::<Vec<_>>();
    let env = std::env::var("WGPU_ADAPTER_NAME").ok().filter(|s| !s.is_empty());
    let wanted = selector.map(str::to_string).or(env);
    let index = match wanted {
        Some(w) => {
            if let Ok(i) = w.parse::<usize>() {
                if i >= adapters.len() {
                    return Err(Error::backend(
                        "wgpu",
                        format!("device index {i} out of range; adapters: {}", names().join(", ")),
                    ));
                }
                i
            } else {
                let lw = w.to_lowercase();
                adapters.iter().position(|a| a.get_info().name.to_lowercase().contains(&lw)).ok_or_else(|| {
                    Error::backend("wgpu", format!("no adapter named like `{w}`; adapters: {}", names().join(", ")))
                })?
            }
        }
        None => (0..adapters.len()).min_by_key(|&i| rank(adapters[i].get_info().device_type)).unwrap_or(0),
    };
    let adapter = adapters
        .into_iter()
        .nth(index)
        .ok_or_else(|| Error::Internal("an adapter vanished between enumeration and selection".into()))?;
    Ok((adapter, index))
}

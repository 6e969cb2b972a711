//! The WGSL shader families, their bind group layouts, and the pipeline cache.
//!
//! Every family follows one binding convention, so a launcher only lists buffers:
//! binding 0 is the uniform parameter block, then `reads` read-only storage buffers, then
//! `writes` read-write storage buffers, in the order the shader declares them. The layout
//! is explicit (not derived from each entry point), so entry points of a family may leave
//! some bindings unused.

use moe_engine::{Error, Result};
use std::collections::HashMap;
use std::sync::Mutex;

/// One `shaders/*.wgsl` file.
pub(crate) struct Family {
    pub(crate) name: &'static str,
    pub(crate) source: &'static str,
    pub(crate) reads: u32,
    pub(crate) writes: u32,
}

pub(crate) const ELEMENTWISE: Family = Family {
    name: "elementwise",
    source: concat!(
        include_str!("../../../shaders/activation.wgsl"),
        include_str!("../../../shaders/elementwise.wgsl")
    ),
    reads: 3,
    writes: 1,
};
pub(crate) const PERMUTE: Family =
    Family { name: "permute", source: include_str!("../../../shaders/permute.wgsl"), reads: 3, writes: 1 };
pub(crate) const BUCKET: Family =
    Family { name: "bucket", source: include_str!("../../../shaders/bucket.wgsl"), reads: 4, writes: 3 };
pub(crate) const REGROUP: Family =
    Family { name: "regroup", source: include_str!("../../../shaders/regroup.wgsl"), reads: 2, writes: 1 };
pub(crate) const MATMUL: Family = Family {
    name: "matmul",
    source: concat!(include_str!("../../../shaders/activation.wgsl"), include_str!("../../../shaders/matmul.wgsl")),
    reads: 4,
    writes: 3,
};
pub(crate) const ROUTE: Family = Family {
    name: "route",
    source: concat!(include_str!("../../../shaders/route_common.wgsl"), include_str!("../../../shaders/route.wgsl")),
    reads: 3,
    writes: 4,
};
pub(crate) const PLAN: Family =
    Family { name: "plan", source: include_str!("../../../shaders/plan.wgsl"), reads: 4, writes: 4 };
pub(crate) const PHILOX: Family =
    Family { name: "philox", source: include_str!("../../../shaders/philox.wgsl"), reads: 0, writes: 1 };
pub(crate) const STATS: Family =
    Family { name: "stats", source: include_str!("../../../shaders/stats.wgsl"), reads: 2, writes: 1 };

pub(crate) const CAST: Family =
    Family { name: "cast", source: include_str!("../../../shaders/cast.wgsl"), reads: 1, writes: 1 };

pub(crate) const GRAD_MATMUL: Family =
    Family { name: "grad_matmul", source: include_str!("../../../shaders/grad_matmul.wgsl"), reads: 3, writes: 2 };
pub(crate) const GRAD: Family = Family {
    name: "grad",
    source: concat!(include_str!("../../../shaders/activation.wgsl"), include_str!("../../../shaders/grad.wgsl")),
    reads: 5,
    writes: 3,
};
pub(crate) const ROUTE_GRAD: Family = Family {
    name: "route_grad",
    source: concat!(
        include_str!("../../../shaders/route_common.wgsl"),
        include_str!("../../../shaders/route_grad.wgsl")
    ),
    reads: 7,
    writes: 1,
};
pub(crate) const OPTIM: Family =
    Family { name: "optim", source: include_str!("../../../shaders/optim.wgsl"), reads: 4, writes: 3 };

/// Every family, for `moe info` and the compile test.
pub const FAMILIES: &[(&str, &[&str])] = &[
    ("elementwise", &["activation", "glu", "mul", "add_gated", "residual_mix", "scale", "add_bias"]),
    ("permute", &["permute", "permute_scaled", "pass_rows", "combine"]),
    ("bucket", &["bucket_clear", "bucket_invert", "bucket_rank", "bucket_offsets", "bucket_rows"]),
    ("regroup", &["regroup"]),
    ("matmul", &["tile_map", "linear", "grouped", "grouped_glu"]),
    ("route", &["route"]),
    ("plan", &["plan_count", "plan_capacity", "plan_rank", "plan_slots", "plan_offsets", "plan_finish", "plan_stats"]),
    ("stats", &["router_stats"]),
    ("philox", &["noise"]),
    ("cast", &["cast_weight"]),
    ("grad_matmul", &["linear_dx", "weight_grad", "bias_grad"]),
    ("grad", &["act_grad", "combine_grad_rows", "combine_grad_weights", "mix_grad", "gated_add_grad"]),
    ("route_grad", &["route_grad"]),
    ("optim", &["optim_step", "sum_squares"]),
];

pub(crate) fn family(name: &str) -> Option<&'static Family> {
    [
        &ELEMENTWISE,
        &PERMUTE,
        &BUCKET,
        &REGROUP,
        &MATMUL,
        &ROUTE,
        &PLAN,
        &STATS,
        &PHILOX,
        &CAST,
        &GRAD_MATMUL,
        &GRAD,
        &ROUTE_GRAD,
        &OPTIM,
    ]
    .into_iter()
    .find(|f| f.name == name)
}

struct Compiled {
    module: wgpu::ShaderModule,
    bind_layout: wgpu::BindGroupLayout,
    pipe_layout: wgpu::PipelineLayout,
}

/// Shader modules and layouts per family, pipelines per (family, entry point); each is
/// compiled once per device, on first use.
#[derive(Default)]
pub(crate) struct Cache {
    families: Mutex<HashMap<&'static str, std::sync::Arc<Compiled>>>,
    pipelines: Mutex<HashMap<(&'static str, &'static str), wgpu::ComputePipeline>>,
}

fn entry(binding: u32, ty: wgpu::BufferBindingType) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer { ty, has_dynamic_offset: false, min_binding_size: None },
        count: None,
    }
}

impl Cache {
    fn compiled(&self, device: &wgpu::Device, f: &Family) -> std::sync::Arc<Compiled> {
        let mut fams = self.families.lock().unwrap_or_else(|e| e.into_inner());
        fams.entry(f.name)
            .or_insert_with(|| {
                let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(f.name),
                    source: wgpu::ShaderSource::Wgsl(f.source.into()),
                });
                let mut entries = vec![entry(0, wgpu::BufferBindingType::Uniform)];
                for i in 0..f.reads {
                    entries.push(entry(1 + i, wgpu::BufferBindingType::Storage { read_only: true }));
                }
                for i in 0..f.writes {
                    entries.push(entry(1 + f.reads + i, wgpu::BufferBindingType::Storage { read_only: false }));
                }
                let bind_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                    label: Some(f.name),
                    entries: &entries,
                });
                let pipe_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                    label: Some(f.name),
                    bind_group_layouts: &[Some(&bind_layout)],
                    immediate_size: 0,
                });
                std::sync::Arc::new(Compiled { module, bind_layout, pipe_layout })
            })
            .clone()
    }

    /// The pipeline of `entry` in family `f` and its bind group layout. A shader that does
    /// not compile is an `Err` with the compiler's message (caught in an error scope, not
    /// left to wgpu's uncaptured-error handler).
    pub(crate) fn pipeline(
        &self,
        device: &wgpu::Device,
        f: &'static Family,
        entry: &'static str,
    ) -> Result<(wgpu::ComputePipeline, wgpu::BindGroupLayout)> {
        if let Some(p) = self.pipelines.lock().unwrap_or_else(|e| e.into_inner()).get(&(f.name, entry)) {
            let c = self.compiled(device, f);
            return Ok((p.clone(), c.bind_layout.clone()));
        }
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let c = self.compiled(device, f);
        let p = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(entry),
            layout: Some(&c.pipe_layout),
            module: &c.module,
            entry_point: Some(entry),
            compilation_options: Default::default(),
            cache: None,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            // Drop the family so a later call reports the compile error again.
            self.families.lock().unwrap_or_else(|e| e.into_inner()).remove(f.name);
            return Err(Error::backend("wgpu", format!("shaders/{}.wgsl, entry `{entry}`: {e}", f.name)));
        }
        self.pipelines.lock().unwrap_or_else(|e| e.into_inner()).insert((f.name, entry), p.clone());
        Ok((p, c.bind_layout.clone()))
    }

    /// Compiles every entry point of every family; one result per (family, entry).
    pub(crate) fn compile_all(&self, device: &wgpu::Device) -> Vec<(&'static str, &'static str, Result<()>)> {
        let mut out = Vec::new();
        for (fam, entries) in FAMILIES {
            let Some(f) = family(fam) else { continue };
            for e in *entries {
                out.push((f.name, *e, self.pipeline(device, f, e).map(|_| ())));
            }
        }
        out
    }
}

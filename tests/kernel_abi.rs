//! The kernel ABI is one layout in three languages: every parameter struct of
//! `moe_engine::kernel_abi` is declared with the same fields, in the same order, in the
//! WGSL shaders that take it as their uniform and in kernels/abi.cuh, which every CUDA
//! family is compiled with; and no shader or kernel declares a parameter block of its own.

use moe_engine::kernel_abi::{
    Abi, BucketParams, CastParams, ElementwiseParams, GradMatmulParams, GradParams, MatmulParams, NoiseParams,
    OptimParams, PermuteParams, PlanParams, RegroupParams, RouteGradParams, RouteParams, StatsParams,
};
use std::collections::BTreeMap;
use std::path::Path;

fn read(rel: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The ABI structs: name → fields, and the shader that takes each (None: CUDA only).
fn abi() -> Vec<(&'static str, &'static [&'static str], Option<&'static str>)> {
    fn one<T: Abi>(shader: Option<&'static str>) -> (&'static str, &'static [&'static str], Option<&'static str>) {
        (T::NAME, T::FIELDS, shader)
    }
    vec![
        one::<RouteParams>(Some("route")),
        one::<PlanParams>(Some("plan")),
        one::<MatmulParams>(Some("matmul")),
        one::<ElementwiseParams>(Some("elementwise")),
        one::<PermuteParams>(Some("permute")),
        one::<BucketParams>(Some("bucket")),
        one::<RegroupParams>(Some("regroup")),
        one::<NoiseParams>(Some("philox")),
        one::<StatsParams>(Some("stats")),
        one::<CastParams>(Some("cast")),
        one::<GradMatmulParams>(Some("grad_matmul")),
        one::<GradParams>(Some("grad")),
        one::<RouteGradParams>(Some("route_grad")),
        one::<OptimParams>(Some("optim")),
    ]
}

/// `struct Name { ... }` bodies of a source, by name, with comments removed.
fn structs(src: &str) -> BTreeMap<String, String> {
    let text: String = src.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n");
    let mut out = BTreeMap::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("struct ") {
        let after = &rest[at + 7..];
        let name: String = after.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        let (Some(open), Some(close)) = (after.find('{'), after.find('}')) else { break };
        out.insert(name, after[open + 1..close].to_string());
        rest = &after[close..];
    }
    out
}

/// Field names of a WGSL struct body (`name: type,` each).
fn wgsl_fields(body: &str) -> Vec<String> {
    body.split(',')
        .filter_map(|f| f.split(':').next())
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .collect()
}

/// Field names of a C struct body (`type a, b, c;` declarations).
fn c_fields(body: &str) -> Vec<String> {
    body.split(';')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .flat_map(|d| {
            let (_, names) = d.split_once(char::is_whitespace).unwrap_or(("", d));
            names.split(',').map(|n| n.trim().to_string()).collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn every_shader_uniform_is_the_abi_struct_field_for_field() {
    for (name, fields, shader) in abi() {
        let Some(shader) = shader else { continue };
        let src = read(&format!("shaders/{shader}.wgsl"));
        let body = structs(&src).remove(name).unwrap_or_else(|| panic!("shaders/{shader}.wgsl lacks struct {name}"));
        assert_eq!(wgsl_fields(&body), fields, "shaders/{shader}.wgsl struct {name}");
        assert!(src.contains(&format!("var<uniform> p: {name};")), "shaders/{shader}.wgsl binds p as {name}");
    }
}

#[test]
fn every_cuda_parameter_block_is_the_abi_struct_field_for_field() {
    let declared = structs(&read("kernels/abi.cuh"));
    for (name, fields, _) in abi() {
        let body = declared.get(name).unwrap_or_else(|| panic!("kernels/abi.cuh lacks struct {name}"));
        assert_eq!(c_fields(body), fields, "kernels/abi.cuh struct {name}");
    }
    assert_eq!(declared.len(), abi().len(), "kernels/abi.cuh declares only the ABI: {:?}", declared.keys());
}

#[test]
fn no_shader_or_kernel_declares_a_parameter_block_of_its_own() {
    let names: Vec<&str> = abi().iter().map(|(n, _, _)| *n).collect();
    for dir in ["shaders", "kernels"] {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        for entry in std::fs::read_dir(&root).expect("source folder") {
            let path = entry.expect("entry").path();
            let file = path.file_name().and_then(|f| f.to_str()).unwrap_or_default().to_string();
            if file == "abi.cuh" || file == "emulate.h" {
                continue;
            }
            let src = std::fs::read_to_string(&path).expect("source");
            for (s, _) in structs(&src) {
                if s.ends_with("Params") {
                    assert!(
                        dir == "shaders" && names.contains(&s.as_str()),
                        "{dir}/{file} declares its own parameter block {s}"
                    );
                }
            }
        }
    }
}

//! The kernel sources and their NVRTC compilation. `moe info --compile-kernels` compiles
//! every family for every target architecture and reports registers and spills from
//! ptxas's verbose log; no GPU is needed, only libnvrtc.

use crate::probe::nvrtc_status;
use moe_engine::Result;
use std::ffi::{CStr, CString};

/// Prepended to every family (NVRTC has no CUDA headers to include from the wheel): the
/// shared helpers, then the kernel ABI's parameter blocks.
const COMMON: &str = concat!(include_str!("../../../kernels/common.cuh"), include_str!("../../../kernels/abi.cuh"));

/// Every kernel family: (file, source).
pub const FAMILIES: &[(&str, &str)] = &[
    ("route.cu", include_str!("../../../kernels/route.cu")),
    ("plan.cu", include_str!("../../../kernels/plan.cu")),
    ("permute.cu", include_str!("../../../kernels/permute.cu")),
    ("bucket.cu", include_str!("../../../kernels/bucket.cu")),
    ("regroup.cu", include_str!("../../../kernels/regroup.cu")),
    ("elementwise.cu", include_str!("../../../kernels/elementwise.cu")),
    ("matmul.cu", include_str!("../../../kernels/matmul.cu")),
    ("matmul_tc.cu", include_str!("../../../kernels/matmul_tc.cu")),
    ("philox.cu", include_str!("../../../kernels/philox.cu")),
    ("stats.cu", include_str!("../../../kernels/stats.cu")),
    ("grad_matmul.cu", include_str!("../../../kernels/grad_matmul.cu")),
    ("grad.cu", include_str!("../../../kernels/grad.cu")),
    ("route_grad.cu", include_str!("../../../kernels/route_grad.cu")),
    ("optim.cu", include_str!("../../../kernels/optim.cu")),
];

/// Architectures the compile check covers: A100 (sm_80) and H100 (sm_90).
pub const ARCHS: &[&str] = &["sm_80", "sm_90"];

/// What compiling one family for one architecture gave.
#[derive(Clone, Debug)]
pub struct KernelReport {
    /// Kernel file.
    pub family: &'static str,
    /// Target architecture.
    pub arch: &'static str,
    /// `Ok(per-kernel lines "name: N registers, S bytes spill stores, L bytes spill loads")`
    /// or `Err(the compiler log)`.
    pub result: std::result::Result<Vec<String>, String>,
}

/// The full source NVRTC compiles for a family.
pub fn source(family_src: &str) -> String {
    format!("{COMMON}\n{family_src}")
}

/// Compiles `src` for `arch` to a cubin; returns the cubin and ptxas's verbose log.
pub fn compile(name: &str, src: &str, arch: &str) -> Result<(Vec<u8>, String)> {
    nvrtc_status()?;
    use cudarc::nvrtc::result;
    let err = |m: String| moe_engine::Error::backend("cuda", m);
    let csrc = CString::new(src).map_err(|_| err(format!("{name}: source contains a NUL byte")))?;
    let cname = CString::new(name).map_err(|_| err(format!("{name}: bad name")))?;
    // SAFETY: the library is present (probed above); the program is created, used and
    // destroyed here, and the C strings outlive it.
    unsafe {
        let prog = result::create_program(csrc.as_c_str(), Some(cname.as_c_str()))
            .map_err(|e| err(format!("{name}: nvrtcCreateProgram: {e:?}")))?;
        let opts =
            [format!("--gpu-architecture={arch}"), "--std=c++17".to_string(), "--ptxas-options=--verbose".to_string()];
        let compiled = result::compile_program(prog, &opts);
        let log = result::get_program_log(prog)
            .map(|l| CStr::from_ptr(l.as_ptr()).to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Err(e) = compiled {
            let _ = result::destroy_program(prog);
            return Err(err(format!("{name} for {arch}: {e:?}\n{log}")));
        }
        let mut size = 0usize;
        let cubin = if cudarc::nvrtc::sys::nvrtcGetCUBINSize(prog, &mut size)
            == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS
        {
            let mut buf = vec![0u8; size];
            cudarc::nvrtc::sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast());
            buf
        } else {
            Vec::new()
        };
        let _ = result::destroy_program(prog);
        Ok((cubin, log))
    }
}

/// One line per kernel from ptxas's verbose log: `name: R registers, F B stack,
/// S B spill stores, L B spill loads`.
fn summarise(log: &str) -> Vec<String> {
    // The number just before `unit` on a line ("272 bytes stack frame" → 272).
    fn before(line: &str, unit: &str) -> Option<u64> {
        let head = &line[..line.find(unit)?];
        head.split_whitespace().last()?.parse().ok()
    }
    let mut out: Vec<(String, [Option<u64>; 4])> = Vec::new();
    for line in log.lines() {
        if let Some(pos) = line.find("Compiling entry function '") {
            let name = line[pos + 26..].split('\'').next().unwrap_or("?").to_string();
            out.push((name, [None; 4]));
            continue;
        }
        let Some((_, v)) = out.last_mut() else { continue };
        if let Some(n) = line.find("Used ").and_then(|p| line[p + 5..].split_whitespace().next()?.parse().ok()) {
            v[0] = Some(n);
        }
        v[1] = v[1].or(before(line, " bytes stack frame"));
        v[2] = v[2].or(before(line, " bytes spill stores"));
        v[3] = v[3].or(before(line, " bytes spill loads"));
    }
    let f = |x: Option<u64>| x.map_or("?".to_string(), |n| n.to_string());
    out.into_iter()
        .map(|(name, v)| {
            format!(
                "{name}: {} registers, {} B stack, {} B spill stores, {} B spill loads",
                f(v[0]),
                f(v[1]),
                f(v[2]),
                f(v[3])
            )
        })
        .collect()
}

/// Where compiled kernels are kept between runs: `MOE_KERNEL_CACHE`, else
/// `$XDG_CACHE_HOME/moe-engine/kernels`, else `~/.cache/moe-engine/kernels`.
pub fn cache_dir() -> Option<std::path::PathBuf> {
    if let Some(d) = std::env::var_os("MOE_KERNEL_CACHE") {
        return Some(d.into());
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache")))?;
    Some(base.join("moe-engine").join("kernels"))
}

/// The cubin of `src` for `arch`, from the disk cache when an earlier run compiled the
/// same source for the same architecture with the same NVRTC (the file name is the
/// SHA-256 of all three), else compiled now and stored. A cache that cannot be written
/// only costs the next run a compile.
pub fn cached_cubin(name: &str, src: &str, arch: &str, dir: Option<&std::path::Path>) -> Result<Vec<u8>> {
    use sha2::{Digest, Sha256};
    let mut major = 0;
    let mut minor = 0;
    nvrtc_status()?;
    // SAFETY: NVRTC is present (probed above); the call writes two ints.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    let key = Sha256::new()
        .chain_update(src.as_bytes())
        .chain_update(arch.as_bytes())
        .chain_update(format!("nvrtc {major}.{minor}").as_bytes())
        .finalize();
    let file = dir.map(|d| d.join(format!("{}-{arch}-{:x}.cubin", name.trim_end_matches(".cu"), key)));
    if let Some(bytes) = file.as_ref().and_then(|f| std::fs::read(f).ok()).filter(|b| !b.is_empty()) {
        return Ok(bytes);
    }
    let (cubin, _) = compile(name, src, arch)?;
    if let (Some(f), Some(d)) = (&file, dir) {
        let stored = std::fs::create_dir_all(d).and_then(|_| {
            // Write then rename, so a concurrent reader never sees half a file.
            let tmp = f.with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&tmp, &cubin)?;
            std::fs::rename(&tmp, f)
        });
        if let Err(e) = stored {
            tracing::warn!("kernel cache {}: {e}", d.display());
        }
    }
    Ok(cubin)
}

/// Compiles every family for every architecture in [`ARCHS`].
pub fn compile_all() -> Result<Vec<KernelReport>> {
    nvrtc_status()?;
    let mut out = Vec::new();
    for (family, src) in FAMILIES {
        for arch in ARCHS {
            let result = match compile(family, &source(src), arch) {
                Ok((_, log)) => Ok(summarise(&log)),
                Err(e) => Err(e.to_string()),
            };
            out.push(KernelReport { family, arch, result });
        }
    }
    Ok(out)
}

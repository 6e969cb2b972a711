//! The matrix kernels (kernels/matmul.cu and the tensor-core kernels/matmul_tc.cu) run on
//! the host under kernels/emulate.h, launched as the cuda backend launches them, and are
//! compared with the cpu backend: tiles that span group ends, empty groups, K and N that
//! are not multiples of the tile, GLU experts with their pre-activation, f32/f16/bf16
//! weights. This checks the kernels' indexing and fragment layout without a GPU; speed and
//! the PTX itself are checked on a GPU and by NVRTC.
//!
//! Needs g++ with C++20 (`<barrier>`); without it the test says so and returns, and with
//! `CI=true` a missing compiler is a failure.

use moe_cpu::CpuBackend;
use moe_engine::backend::Activation;
use moe_engine::{parity, philox, Backend, DType, HostTensor};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Compiles the driver once; `None` (with the reason printed) when there is no g++.
fn driver() -> Option<&'static Path> {
    static DRIVER: OnceLock<Option<PathBuf>> = OnceLock::new();
    DRIVER
        .get_or_init(|| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR"));
            let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join("matmul_driver");
            let built = Command::new("g++")
                .args(["-std=c++20", "-O1", "-pthread", "-Wall", "-Wno-unknown-pragmas", "-I"])
                .arg(root.join("../../kernels"))
                .arg("-o")
                .arg(&exe)
                .arg(root.join("tests/emulate/matmul_driver.cpp"))
                .output();
            match built {
                Ok(o) if o.status.success() => Some(exe),
                Ok(o) => panic!("the emulated kernels do not compile:\n{}", String::from_utf8_lossy(&o.stderr)),
                Err(e) => {
                    if std::env::var("CI").is_ok_and(|v| v == "true") {
                        panic!("CI=true and g++ cannot be run: {e}");
                    }
                    let _ = writeln!(std::io::stderr(), "SKIP emulated kernels: g++ cannot be run ({e})");
                    None
                }
            }
        })
        .as_deref()
}

struct Case {
    name: &'static str,
    counts: &'static [usize],
    k: usize,
    /// Output columns of the product (2·F for GLU experts).
    n: usize,
    glu: Option<Activation>,
    dtype: DType,
    tensor_cores: bool,
    bias: bool,
}

fn rand(n: usize, stream: u32) -> Vec<f32> {
    philox::words(0xe4a1, stream, n).into_iter().map(|w| philox::to_open_unit(w) * 2.0 - 1.0).collect()
}

fn round(v: &[f32], dtype: DType) -> Vec<f32> {
    v.iter()
        .map(|&x| match dtype {
            DType::F16 => half::f16::from_f32(x).to_f32(),
            DType::BF16 => half::bf16::from_f32(x).to_f32(),
            _ => x,
        })
        .collect()
}

fn bits(v: &[f32], dtype: DType) -> Vec<u16> {
    v.iter()
        .map(
            |&x| if dtype == DType::F16 { half::f16::from_f32(x).to_bits() } else { half::bf16::from_f32(x).to_bits() },
        )
        .collect()
}

/// Runs `case` through the emulated kernel: (out, pre).
fn emulate(exe: &Path, c: &Case, x: &[f32], w: &[f32], bias: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (r, g) = (c.counts.iter().sum::<usize>(), c.counts.len());
    let mut input: Vec<u8> = Vec::new();
    let wdtype = match c.dtype {
        DType::F32 => 0u32,
        DType::F16 => 1,
        _ => 2,
    };
    let glu = c.glu.map_or(0, |a| a.kernel_code());
    for v in [r, c.k, c.n, g, c.glu.is_some() as usize, glu as usize, wdtype as usize, c.bias as usize] {
        input.extend((v as u32).to_le_bytes());
    }
    input.extend((c.tensor_cores as u32).to_le_bytes());
    let mut at = 0i32;
    input.extend(at.to_le_bytes());
    for &n in c.counts {
        at += n as i32;
        input.extend(at.to_le_bytes());
    }
    input.extend(x.iter().flat_map(|v| v.to_le_bytes()));
    if c.dtype == DType::F32 {
        input.extend(w.iter().flat_map(|v| v.to_le_bytes()));
    } else {
        input.extend(bits(w, c.dtype).iter().flat_map(|v| v.to_le_bytes()));
    }
    if c.bias {
        input.extend(bias.iter().flat_map(|v| v.to_le_bytes()));
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let (inp, outp) = (dir.join(format!("{}.in", c.name)), dir.join(format!("{}.out", c.name)));
    std::fs::write(&inp, input).expect("write input");
    let run = Command::new(exe).arg(&inp).arg(&outp).output().expect("run driver");
    assert!(run.status.success(), "{}: driver failed: {}", c.name, String::from_utf8_lossy(&run.stderr));
    let floats: Vec<f32> = std::fs::read(&outp)
        .expect("read output")
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let f = if c.glu.is_some() { c.n / 2 } else { c.n };
    let (out, pre) = floats.split_at(r * f);
    (out.to_vec(), pre.to_vec())
}

#[test]
fn matrix_kernels_match_the_cpu_backend_under_emulation() {
    let Some(exe) = driver() else { return };
    let cases = [
        Case {
            name: "tc_bf16_plain",
            counts: &[70, 0, 5, 130],
            k: 40,
            n: 72,
            glu: None,
            dtype: DType::BF16,
            tensor_cores: true,
            bias: true,
        },
        Case {
            name: "tc_f16_swiglu",
            counts: &[1, 64, 65],
            k: 64,
            n: 80,
            glu: Some(Activation::Silu),
            dtype: DType::F16,
            tensor_cores: true,
            bias: false,
        },
        Case {
            name: "tc_bf16_geglu_two_column_blocks",
            counts: &[150],
            k: 96,
            n: 192,
            glu: Some(Activation::Gelu),
            dtype: DType::BF16,
            tensor_cores: true,
            bias: true,
        },
        Case {
            name: "simt_f32_swiglu",
            counts: &[3, 70, 0],
            k: 24,
            n: 40,
            glu: Some(Activation::Silu),
            dtype: DType::F32,
            tensor_cores: false,
            bias: true,
        },
        Case {
            name: "simt_bf16_plain",
            counts: &[33, 31],
            k: 17,
            n: 65,
            glu: None,
            dtype: DType::BF16,
            tensor_cores: false,
            bias: false,
        },
    ];
    let cpu = CpuBackend::new(Some(1)).expect("cpu backend");
    for (i, c) in cases.iter().enumerate() {
        let (r, g) = (c.counts.iter().sum::<usize>(), c.counts.len());
        let s = 10 * i as u32;
        let (x, w, bias) = (rand(r * c.k, s), rand(g * c.n * c.k, s + 1), rand(g * c.n, s + 2));
        let (out, pre) = emulate(exe, c, &x, &w, &bias);

        // The reference: the cpu backend on the values the kernel multiplies (weights in
        // their storage type; on tensor cores, activations rounded to it as well).
        let xr = if c.tensor_cores { round(&x, c.dtype) } else { x.clone() };
        let mut offsets = vec![0i32];
        for &n in c.counts {
            offsets.push(offsets.last().copied().unwrap_or(0) + n as i32);
        }
        let up = |t: HostTensor| cpu.upload(&t).expect("upload");
        let xt = up(HostTensor::f32(&[r, c.k], xr).expect("x"));
        let ot = up(HostTensor::i32(&[g + 1], offsets).expect("offsets"));
        let wt = up(HostTensor::f32(&[g, c.n, c.k], round(&w, c.dtype)).expect("w"));
        let bt = c.bias.then(|| up(HostTensor::f32(&[g, c.n], bias.clone()).expect("bias")));
        let full = cpu.grouped_linear(&xt, &ot, &wt, bt.as_ref()).expect("cpu product");
        let (out_ref, pre_ref) = match c.glu {
            Some(a) => (cpu.glu(&full, a).expect("cpu glu"), Some(full)),
            None => (full, None),
        };
        let f = if c.glu.is_some() { c.n / 2 } else { c.n };
        let got = HostTensor::f32(&[r, f], out).expect("out");
        let want = cpu.download(&out_ref).expect("download");
        if let Err(msg) = parity::compare("out", &want, &got, 1e-5) {
            panic!("{}: {msg}", c.name);
        }
        if let Some(p) = pre_ref {
            let got = HostTensor::f32(&[r, c.n], pre).expect("pre");
            if let Err(msg) = parity::compare("pre", &cpu.download(&p).expect("download"), &got, 1e-5) {
                panic!("{}: {msg}", c.name);
            }
        }
    }
}

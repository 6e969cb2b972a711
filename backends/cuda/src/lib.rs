//! # moe-cuda
//!
//! The CUDA fast path of moe-engine for A100/H100 clusters: kernels in `kernels/*.cu`
//! (one file per op family) compiled at run time by NVRTC for the device's architecture,
//! cuBLAS for the dense products, NCCL for the expert-parallel exchange, all through
//! `cudarc` with dynamic loading, so this crate builds on machines with no CUDA at all.
//!
//! ## Which CUDA API the bindings target, and why
//!
//! cudarc is built with `cuda-12020`: the CUDA 12.2 API. Production clusters run CUDA 12.x
//! drivers, and 12.2 (driver branch 535, a long-term support branch) is the oldest one
//! still widely deployed; binding to its API means every entry point cudarc may resolve
//! exists on every 12.x driver, so a binary built here loads on all of them. Newer-API
//! features are not reachable through these bindings: cuBLAS's grouped GEMM
//! (`cublasGemmGroupedBatchedEx`, cuBLAS 12.5) among them. It would not serve anyway: it
//! takes the group sizes on the host, a synchronisation inside every forward. Grouped
//! expert products use `kernels/matmul_tc.cu` (mma.sync tensor cores, f16/bf16 weights,
//! sm_80+) and `kernels/matmul.cu` (f32 SIMT, the exact path), both reading the group
//! offsets on the device; `kernels/emulate.h` runs them on the host for the tests. NVRTC
//! from any 12.x toolkit (the `nvidia-cuda-nvrtc-cu12` wheel included) compiles the
//! kernels.
//!
//! ## The backward and the optimizer
//!
//! The backward and optimizer ops (`grad`) run on kernels of their own, none with float
//! atomics, so a backward is bitwise repeatable: the backward's products in
//! kernels/grad_matmul.cu (f32 SIMT, each output element summed by one thread in one
//! order, group offsets read on the device), the row ops in kernels/grad.cu and
//! kernels/route_grad.cu (fixed reduction trees), the optimizer steps in kernels/optim.cu
//! (the cpu's order of f32 operations, bit for bit).
//!
//! ## Missing libraries are errors, not panics
//!
//! cudarc panics when it resolves a symbol from a library that is absent, so every entry
//! point here first probes for the library ([`probe`]) and returns an `Err` saying what is
//! missing.

mod backend;
pub mod compile;
mod device;
mod elementwise;
mod exchange;
mod grad;
pub mod launch;
mod matmul;
mod nccl;
mod noise;
pub mod probe;
mod routing;

pub use device::{CudaBackend, CudaBuffer};
pub use nccl::{nccl_status, NcclComm};

pub use compile::{compile_all, KernelReport, ARCHS, FAMILIES};
pub use probe::{cublas_status, driver_status, nvrtc_status};

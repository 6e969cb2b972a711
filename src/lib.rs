//! # moe-engine
//!
//! A Mixture-of-Experts engine: one body of MoE logic (gating, capacity, dispatch, expert
//! FFN, combine, residual and shared experts) over the [`backend::Backend`] trait, with
//! importers for DeepSpeed and HF transformers configurations and checkpoints, and a runner
//! for golden reference cases.
//!
//! Backends live in their own crates (`moe-cpu`, `moe-wgpu`, `moe-cuda`); this crate
//! depends on none of them. Every op enters through one front door on the trait that
//! checks its operands ([`ops`]) and encodes its kernel parameters ([`kernel_abi`]) once.

pub mod backend;
pub mod config;
pub mod device;
pub mod device_tensor;
pub mod dispatcher;
pub mod error;
pub mod expert;
pub mod gate;
pub mod golden;
pub mod import;
pub mod kernel_abi;
pub mod layer;
pub mod losses;
pub mod memory;
pub mod ops;
pub mod options;
pub mod parallel;
pub mod parity;
pub mod philox;
pub mod profile;
pub mod report;
pub mod stack;
pub mod tensor;
pub mod train;
pub mod weights;

pub use backend::Backend;
pub use config::{GateSpec, LayerSpec, Mode};
pub use device::{Capabilities, Device, Tensor};
pub use device_tensor::{DeviceBuffer, DeviceTensor};
pub use error::{Error, ErrorKind, Result};
pub use expert::{Activation, ExpertKind, GluClamp};
pub use layer::{is_expert_param, BackwardOptions, LayerGrads, LayerOutput, MoeLayer, ParamMut};
pub use options::{GateOptions, LayerOptions, NoiseOverrides};
pub use report::Report;
pub use tensor::{DType, HostTensor};

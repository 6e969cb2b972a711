//! # moe-engine
//!
//! A Mixture-of-Experts engine: one body of MoE logic (gating, capacity, dispatch, expert
//! FFN, combine, residual and shared experts) over the [`backend::Backend`] trait, with
//! importers for DeepSpeed and HF transformers configurations and checkpoints, and a runner
//! for golden reference cases.
//!
//! Backends live in their own crates (`moe-cpu`, ...); this crate depends on none of them.

pub mod backend;
pub mod config;
pub mod error;
pub mod gate;
pub mod golden;
pub mod import;
pub mod layer;
pub mod losses;
pub mod parallel;
pub mod parity;
pub mod philox;
pub mod stack;
pub mod tensor;
pub mod weights;

pub use backend::{Backend, Capabilities, Tensor};
pub use config::{GateSpec, LayerSpec, Mode};
pub use error::{Error, Result};
pub use layer::{ForwardOptions, LayerOutput, MoeLayer, Report};
pub use tensor::{DType, HostTensor};

//! Training a layer: an [`Optimizer`] that steps a [`crate::MoeLayer`]'s parameters on
//! the device with the backend's fused optimizer step, in torch.optim's arithmetic (SGD,
//! Adam, AdamW), over DeepSpeed's parameter groups, with gradient clipping by global norm
//! and its state saved beside the weights.
//!
//! ```text
//! out   = layer.forward(b, &x, &LayerOptions { keep_activations: true, .. })
//! grads = layer.backward(b, &out, &dy, &opts)
//! opt.step(b, &mut layer, grads)          // clip, then one step of every parameter
//! opt.save(b, &state_path(weights), Some(&names))
//! ```
//!
//! The optimizer is configured from a DeepSpeed config ([`OptimizerSpec`], see
//! [`spec`] for what is read and how it maps to torch.optim). Groups follow DeepSpeed's
//! split ([`Grouping::DeepSpeed`]): the routed experts' parameters ([`crate::ParamMut::expert`])
//! in a group `ep_size_{P}`, the rest in the base group, each group with its own
//! hyperparameters and step count.
//!
//! Mixed precision, as DeepSpeed's `fp16` / `bf16` configs ask for it ([`Precision`]): a
//! layer from [`crate::MoeLayer::new_mixed`] computes with f16 / bf16 MLP weights, the
//! optimizer steps f32 masters of them (state in f32) and refreshes the compute copies
//! with [`crate::Backend::cast_weight`]; f16 adds DeepSpeed's dynamic loss scaling
//! ([`DynamicLossScaler`], see [`loss_scale`]):
//!
//! ```text
//! let p = Precision::from_deepspeed_config(&ds_config)?;
//! layer = MoeLayer::new_mixed(b, spec, &weights, p.dtype)
//! opt   = Optimizer::new(&mut layer, ..);  opt.set_loss_scaler(p.scaler)
//! grads = layer.backward(b, &out, &b.scale(&dy, opt.loss_scale() as f32)?, &opts)
//! if opt.step(b, &mut layer, grads)?.skipped { /* overflow: nothing changed */ }
//! ```
//!
//! What is not implemented: DeepSpeed's `max_group_size` splitting of a very large expert
//! group into several groups with the same hyperparameters (which changes nothing
//! numerically), ZeRO, and the optimizers other than SGD, Adam and AdamW.

pub mod loss_scale;
pub mod optimizer;
pub mod spec;
pub mod state;

pub use loss_scale::{DynamicLossScaler, LossScaler, Precision};
pub use optimizer::{Grouping, Optimizer, ParamGroup, ParamState, StepReport, DENSE_GROUP, SINGLE_GROUP};
pub use spec::{Hyper, OptimizerSpec, DEEPSPEED_GRADIENT_CLIPPING};
pub use state::{state_path, CheckpointNames};

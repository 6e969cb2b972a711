//! The optimizer: parameter groups, per-parameter state on the device, gradient clipping
//! by global norm, and one step of every parameter through the backend's
//! [`Backend::optim_step`].
//!
//! # Mixed precision
//!
//! A parameter whose tensor is f16 or bf16 (the MLP weights of a layer from
//! [`MoeLayer::new_mixed`]) is a compute copy: the optimizer keeps an f32 master copy of
//! it, steps the master (its state, like every state, in f32) and after each step replaces
//! the compute copy with [`Backend::cast_weight`] of the master. f32 parameters are their
//! own masters. [`Optimizer::new`] starts the masters from the f32 weights the layer was
//! built from ([`MoeLayer::take_masters`]), so the master trajectory starts where the f32
//! run's does and the half-precision rounding enters only the forward and backward;
//! DeepSpeed's `FP16_Optimizer` can only start them from the fp16 parameters
//! (`fp16_groups_flat[i].clone().float()`), since its model was cast before it was
//! built. Parameters handed to [`Optimizer::for_params`] have no f32 weights behind them,
//! so their masters are made as DeepSpeed makes them, from the compute copies, at their
//! first step. A [`LossScaler`] ([`Optimizer::set_loss_scaler`]) adds loss scaling and
//! the skipping of overflowing steps (see [`super::loss_scale`]).

use super::loss_scale::LossScaler;
use super::spec::{Hyper, OptimizerSpec};
use crate::backend::Backend;
use crate::device::Tensor;
use crate::error::{Error, Result};
use crate::layer::{LayerGrads, MoeLayer, ParamMut};
use crate::ops::StepKind;
use crate::tensor::{DType, HostTensor};

/// How the parameters are split into groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grouping {
    /// One group over every parameter, as `torch.optim.X(module.parameters())` makes it
    /// (named [`SINGLE_GROUP`]).
    Single,
    /// DeepSpeed's split (`deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer`,
    /// as `DeepSpeedEngine` applies it through `configure_moe_param_groups`): the
    /// non-expert parameters stay in the base group ([`DENSE_GROUP`]), the routed experts'
    /// go into a group named `ep_size_{ep_size}` (their expert-parallel group's name)
    /// holding a copy of the base group's hyperparameters.
    DeepSpeed {
        /// The expert-parallel size P of the layer (`MoE(ep_size=P)`).
        ep_size: usize,
    },
}

/// The name of the group [`Grouping::Single`] makes.
pub const SINGLE_GROUP: &str = "default";

/// The name DeepSpeed gives the base group when it builds the groups itself
/// (`configure_moe_param_groups`).
pub const DENSE_GROUP: &str = "dense-params";

/// A parameter group: its hyperparameters and its step count.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamGroup {
    name: String,
    moe: bool,
    /// The group's rule and hyperparameters, read at every step (change `lr` here for a
    /// schedule; they are checked when the next step starts).
    pub hyper: Hyper,
    step: u64,
}

impl ParamGroup {
    /// The group's name (`dense-params`, `ep_size_1`, ...).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether it is DeepSpeed's MoE group of expert parameters.
    pub fn is_moe(&self) -> bool {
        self.moe
    }

    /// Steps taken so far (torch's `state[p]["step"]` of each of its parameters).
    pub fn step(&self) -> u64 {
        self.step
    }

    pub(super) fn set_step(&mut self, step: u64) {
        self.step = step;
    }
}

/// Which family of rule produced a parameter's state: Adam and AdamW share their moments;
/// SGD's momentum buffer is something else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum StateKind {
    /// Adam or AdamW: `exp_avg`, `exp_avg_sq`.
    Adam,
    /// SGD: `momentum_buffer`.
    Sgd,
}

impl StateKind {
    pub(super) fn of(kind: StepKind) -> Self {
        match kind {
            StepKind::Sgd => StateKind::Sgd,
            StepKind::Adam | StepKind::AdamW => StateKind::Adam,
        }
    }
}

/// One parameter's place in the optimizer and its state (device tensors).
pub(super) struct Slot<B: Backend> {
    /// The engine's name of the parameter.
    pub(super) name: String,
    /// Its group.
    pub(super) group: usize,
    /// Its shape.
    pub(super) shape: Vec<usize>,
    /// First moment or momentum buffer.
    pub(super) m: Option<Tensor<B>>,
    /// Second moment.
    pub(super) v: Option<Tensor<B>>,
    /// The rule family `m` and `v` belong to (None while there is no state).
    pub(super) kind: Option<StateKind>,
    /// The storage dtype of the parameter's tensor: f32, or f16 / bf16 for a compute copy
    /// of `master`.
    pub(super) dtype: DType,
    /// The f32 master copy of an f16 / bf16 parameter (None for f32 parameters, and for a
    /// half one until its master is made).
    pub(super) master: Option<Tensor<B>>,
}

/// A parameter's optimizer state: device tensors, None before its first step or where
/// the rule keeps none.
pub struct ParamState<'a, B: Backend> {
    /// First moment (Adam's `exp_avg`) or momentum buffer (SGD's `momentum_buffer`).
    pub m: Option<&'a Tensor<B>>,
    /// Second moment (Adam's `exp_avg_sq`).
    pub v: Option<&'a Tensor<B>>,
}

/// What a step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// The global L2 norm of the gradients before clipping (what
    /// `torch.nn.utils.clip_grad_norm_` returns), when clipping is on.
    pub grad_norm: Option<f64>,
    /// The factor the gradients were multiplied by: `min(1, max_norm / (norm + 1e-6))`,
    /// or 1 without clipping.
    pub clip_coef: f64,
    /// The loss scale the step's gradients carried (1 without a [`LossScaler`]); they
    /// were multiplied by `clip_coef / loss_scale`.
    pub loss_scale: f64,
    /// Whether the step was skipped because the gradients overflowed (their global norm
    /// was not finite): parameters, state and step counts are as before it. Only with a
    /// [`LossScaler`]; without one such gradients are an error.
    pub skipped: bool,
}

/// An optimizer over one layer's parameters, stepping them on the device with the
/// backend's [`Backend::optim_step`] in torch.optim's arithmetic. Its state (Adam's
/// moments, SGD's momentum buffers) stays on the device between steps; see
/// [`Optimizer::save`] and [`Optimizer::load`] for checkpoints.
pub struct Optimizer<B: Backend> {
    pub(super) groups: Vec<ParamGroup>,
    pub(super) slots: Vec<Slot<B>>,
    gradient_clipping: f64,
    scaler: Option<LossScaler>,
}

impl<B: Backend> Optimizer<B> {
    /// An optimizer over `layer`'s parameters (a layer from [`MoeLayer::new_trainable`] or
    /// [`MoeLayer::new_mixed`]), every group starting with `spec`'s hyperparameters.
    /// DeepSpeed's grouping needs an `ep_size` that divides the layer's experts. The f32
    /// masters of a mixed-precision layer's half-precision weights are taken from the
    /// layer (the weights it was built from; see the module docs).
    pub fn new(layer: &mut MoeLayer<B>, spec: &OptimizerSpec, grouping: Grouping) -> Result<Self> {
        if !layer.is_trainable() {
            return Err(Error::Misuse(
                "an optimizer steps the f32 master weights of a layer from MoeLayer::new_trainable or new_mixed".into(),
            ));
        }
        if let Grouping::DeepSpeed { ep_size } = grouping {
            let e = layer.spec().num_experts;
            if ep_size == 0 || !e.is_multiple_of(ep_size) {
                return Err(Error::config("ep_size", format!("{ep_size} must divide num_experts = {e}")));
            }
        }
        let mut opt = Self::for_params(&layer.params_mut(), spec, grouping)?;
        for (name, master) in layer.take_masters() {
            let slot = opt
                .slots
                .iter_mut()
                .find(|s| s.name == name)
                .ok_or_else(|| Error::Internal(format!("a master copy of `{name}`, which is no parameter")))?;
            master.expect_dtype(&format!("master of {name}"), DType::F32)?;
            master.expect_shape(&format!("master of {name}"), &slot.shape)?;
            if slot.dtype == DType::F32 {
                return Err(Error::Internal(format!("a master copy of the f32 parameter `{name}`")));
            }
            slot.master = Some(master);
        }
        Ok(opt)
    }

    /// An optimizer over `params` (their names, expert flags, shapes and storage dtypes;
    /// the tensors are handed to every [`Optimizer::step_params`]). f16 / bf16 tensors are
    /// compute copies whose f32 masters are made from them at their first step.
    pub fn for_params(params: &[ParamMut<'_, B>], spec: &OptimizerSpec, grouping: Grouping) -> Result<Self> {
        spec.validate()?;
        let group = |name: String, moe: bool| ParamGroup { name, moe, hyper: spec.hyper, step: 0 };
        let groups = match grouping {
            Grouping::Single => vec![group(SINGLE_GROUP.into(), false)],
            Grouping::DeepSpeed { ep_size } => {
                if ep_size == 0 {
                    return Err(Error::config("ep_size", "must be at least 1"));
                }
                vec![group(DENSE_GROUP.into(), false), group(format!("ep_size_{ep_size}"), true)]
            }
        };
        let mut slots: Vec<Slot<B>> = Vec::with_capacity(params.len());
        for p in params {
            if slots.iter().any(|s| s.name == p.name) {
                return Err(Error::Internal(format!("two parameters are named `{}`", p.name)));
            }
            let dtype = p.tensor.dtype();
            if !dtype.is_float() {
                return Err(Error::dtype(&p.name, "f32, f16 or bf16", dtype));
            }
            let group = usize::from(p.expert && matches!(grouping, Grouping::DeepSpeed { .. }));
            slots.push(Slot {
                name: p.name.clone(),
                group,
                shape: p.tensor.shape().to_vec(),
                m: None,
                v: None,
                kind: None,
                dtype,
                master: None,
            });
        }
        Ok(Optimizer { groups, slots, gradient_clipping: spec.gradient_clipping, scaler: None })
    }

    /// The parameter groups, in torch's order (DeepSpeed: the base group, then the
    /// expert group).
    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// The group named `name`, to change its hyperparameters.
    pub fn group_mut(&mut self, name: &str) -> Option<&mut ParamGroup> {
        self.groups.iter_mut().find(|g| g.name == name)
    }

    /// The parameters' names with their group's name, in stepping order.
    pub fn params(&self) -> impl Iterator<Item = (&str, &str)> {
        self.slots.iter().map(|s| (s.name.as_str(), self.groups[s.group].name.as_str()))
    }

    /// The state of parameter `name` (None: no such parameter).
    pub fn state(&self, name: &str) -> Option<ParamState<'_, B>> {
        self.slots.iter().find(|s| s.name == name).map(|s| ParamState { m: s.m.as_ref(), v: s.v.as_ref() })
    }

    /// The f32 master copy of parameter `name`: its master for an f16 / bf16 parameter
    /// (None before its first step when it was not given one), None for an f32 parameter
    /// (its tensor is its master) or no such parameter.
    pub fn master(&self, name: &str) -> Option<&Tensor<B>> {
        self.slots.iter().find(|s| s.name == name).and_then(|s| s.master.as_ref())
    }

    /// The storage dtype of every parameter's tensor, in stepping order (f16 / bf16: a
    /// compute copy of an f32 master).
    pub fn param_dtypes(&self) -> impl Iterator<Item = (&str, DType)> {
        self.slots.iter().map(|s| (s.name.as_str(), s.dtype))
    }

    /// Sets the loss scaler (None: no loss scaling, and non-finite gradients are an
    /// error). With one, the gradients handed to a step must carry
    /// [`Optimizer::loss_scale`] (the caller scales the loss gradient, `b.scale(&dy,
    /// scale)`), and a step whose gradients overflow is skipped (see
    /// [`super::loss_scale`]).
    pub fn set_loss_scaler(&mut self, scaler: Option<LossScaler>) {
        self.scaler = scaler;
    }

    /// The loss scaler, if any.
    pub fn loss_scaler(&self) -> Option<&LossScaler> {
        self.scaler.as_ref()
    }

    /// The scale the next step's gradients must carry (1 without a loss scaler).
    pub fn loss_scale(&self) -> f64 {
        self.scaler.as_ref().map_or(1.0, LossScaler::loss_scale)
    }

    /// `max_norm` of the gradient clipping (0: off).
    pub fn gradient_clipping(&self) -> f64 {
        self.gradient_clipping
    }

    /// Sets `max_norm` of the gradient clipping (0: off).
    pub fn set_gradient_clipping(&mut self, max_norm: f64) -> Result<()> {
        if !max_norm.is_finite() || max_norm < 0.0 {
            return Err(Error::config("gradient_clipping", format!("must be finite and >= 0, got {max_norm}")));
        }
        self.gradient_clipping = max_norm;
        Ok(())
    }

    /// The global L2 norm of `grads`, `sqrt(Σ sum_squares(g))`: each tensor's sum of
    /// squares on the device (one `[1]` download each), summed on the host in f64.
    pub fn grad_norm(b: &B, grads: &[(String, Tensor<B>)]) -> Result<f64> {
        let mut total = 0f64;
        for (name, g) in grads {
            let s = b.download(&b.sum_squares(g)?)?;
            let v = s.as_f32(name)?.first().copied().ok_or_else(|| Error::Internal("sum_squares gave [0]".into()))?;
            total += v as f64;
        }
        Ok(total.sqrt())
    }

    /// One step of every parameter of `layer` with the gradients of its backward.
    pub fn step(&mut self, b: &B, layer: &mut MoeLayer<B>, grads: LayerGrads<B>) -> Result<StepReport> {
        self.step_params(b, layer.params_mut(), grads.into_named())
    }

    /// One step of every parameter: `params` as [`MoeLayer::params_mut`] gives them and
    /// `grads` as [`LayerGrads::into_named`] names them, both in the optimizer's order.
    /// With clipping on, the gradients are first scaled as `torch.nn.utils.clip_grad_norm_`
    /// scales them (through the step's `grad_scale`, never in place); a gradient norm
    /// that is not finite is an error before anything is stepped. With a loss scaler the
    /// norm is always taken: not finite, the step is skipped and reported so
    /// ([`StepReport::skipped`]); finite, the gradients are un-scaled through
    /// `grad_scale` and clipping is computed on the un-scaled norm. f16 / bf16 parameters
    /// step their f32 masters and get `cast_weight` of them. Everything that the caller
    /// gives is checked before the first parameter changes; only a failure of the device
    /// itself can leave a step half done.
    pub fn step_params(
        &mut self,
        b: &B,
        mut params: Vec<ParamMut<'_, B>>,
        grads: Vec<(String, Tensor<B>)>,
    ) -> Result<StepReport> {
        if params.len() != self.slots.len() || grads.len() != self.slots.len() {
            return Err(Error::Misuse(format!(
                "the optimizer holds {} parameters; the step got {} parameters and {} gradients",
                self.slots.len(),
                params.len(),
                grads.len()
            )));
        }
        for ((slot, p), (gname, g)) in self.slots.iter().zip(&params).zip(&grads) {
            if p.name != slot.name || *gname != slot.name {
                return Err(Error::Misuse(format!(
                    "parameter `{}` (gradient `{gname}`) where the optimizer holds `{}`",
                    p.name, slot.name
                )));
            }
            p.tensor.expect_shape(&p.name, &slot.shape)?;
            p.tensor.expect_dtype(&p.name, slot.dtype)?;
            g.expect_shape(&format!("gradient of {}", slot.name), &slot.shape)?;
            g.expect_dtype(&format!("gradient of {}", slot.name), crate::DType::F32)?;
            let kind = StateKind::of(self.groups[slot.group].hyper.kind);
            if slot.kind.is_some_and(|k| k != kind) {
                return Err(Error::Misuse(format!(
                    "group `{}` changed its rule between SGD and Adam: the state of `{}` does not carry over",
                    self.groups[slot.group].name, slot.name
                )));
            }
        }
        for g in &self.groups {
            g.hyper.rule(g.step + 1, 1.0).validate().map_err(|e| match e {
                Error::Config { field, msg } => Error::config(format!("param_groups.{}.{field}", g.name), msg),
                other => other,
            })?;
        }

        let loss_scale = self.loss_scale();
        let norm = if self.gradient_clipping > 0.0 || self.scaler.is_some() {
            // With a loss scaler: the norm of the scaled gradients, un-scaled below.
            Some(Self::grad_norm(b, &grads)?)
        } else {
            None
        };
        if let Some(norm) = norm.filter(|n| !n.is_finite()) {
            let Some(scaler) = &mut self.scaler else {
                return Err(Error::NonFinite {
                    tensor: "gradients (their global norm)".into(),
                    index: vec![],
                    value: norm as f32,
                });
            };
            // An overflow: nothing is stepped, and the scaler learns of it.
            scaler.update(true)?;
            return Ok(StepReport { grad_norm: Some(f64::INFINITY), clip_coef: 1.0, loss_scale, skipped: true });
        }
        if let Some(scaler) = &mut self.scaler {
            scaler.update(false)?;
        }
        let grad_norm = norm.map(|n| n / loss_scale);
        let clip_coef = match grad_norm {
            // torch.nn.utils.clip_grad_norm_: coef = max_norm / (norm + 1e-6), clamped to 1.
            Some(n) if self.gradient_clipping > 0.0 => (self.gradient_clipping / (n + 1e-6)).min(1.0),
            _ => 1.0,
        };
        // Exactly the clip coefficient without loss scaling (a division by 1).
        let grad_scale = clip_coef / loss_scale;

        for ((slot, p), (_, g)) in self.slots.iter_mut().zip(params.iter_mut()).zip(&grads) {
            let group = &self.groups[slot.group];
            let mut rule = group.hyper.rule(group.step + 1, grad_scale);
            if !rule.has_m() {
                // SGD whose momentum was turned off: torch leaves the old buffer unused.
                slot.m = None;
            }
            match rule.kind {
                StepKind::Adam | StepKind::AdamW if slot.m.is_none() || slot.v.is_none() => {
                    // torch starts both moments at zero on a parameter's first step.
                    let zeros = HostTensor::zeros(&slot.shape)?;
                    slot.m = Some(b.upload(&zeros)?);
                    slot.v = Some(b.upload(&zeros)?);
                }
                // torch starts the momentum buffer from the gradient whenever it has none
                // (the step number does not enter SGD's arithmetic, so the op's "first
                // step" is this parameter's first step with momentum).
                StepKind::Sgd if slot.m.is_none() => rule.step = 1,
                _ => {}
            }
            if slot.dtype == DType::F32 {
                b.optim_step_in_place(p.tensor, g, &mut slot.m, &mut slot.v, rule)?;
            } else {
                let mut master = match slot.master.take() {
                    Some(m) => m,
                    // DeepSpeed's start: the compute copy's values in f32.
                    None => b.upload(&b.download(p.tensor)?)?,
                };
                b.optim_step_in_place(&mut master, g, &mut slot.m, &mut slot.v, rule)?;
                *p.tensor = b.cast_weight(&master, slot.dtype)?;
                slot.master = Some(master);
            }
            slot.kind = (slot.m.is_some() || slot.v.is_some()).then_some(StateKind::of(rule.kind));
        }
        for g in &mut self.groups {
            g.step += 1;
        }
        Ok(StepReport { grad_norm, clip_coef, loss_scale, skipped: false })
    }
}

//! Optimizer ops: one fused elementwise step per parameter tensor (SGD, Adam, AdamW as
//! torch.optim defines them), and the sum of squares that gradient clipping by global
//! norm reduces. The step's scalars (bias corrections, step size) are computed once on
//! the host per step ([`StepRule`]), the same for every backend.

use super::{f32_shaped, f32_tensor, output};
use crate::device::{Device, Tensor};
use crate::error::{Error, Result};
use crate::kernel_abi::OptimParams;
use crate::tensor::DType;

/// Which update rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepKind {
    /// SGD: `g += wd·p`; with momentum `buf = g` on the first step, then `buf = μ·buf +
    /// (1 − dampening)·g`; `g = buf` (or `g + μ·buf`, Nesterov); `p −= lr·g`.
    Sgd,
    /// Adam with L2 weight decay added to the gradient.
    Adam,
    /// AdamW: decoupled weight decay `p ·= 1 − lr·wd`, then Adam without it.
    AdamW,
}

/// The scalars of one step of one parameter group, as torch.optim computes them (in
/// double precision on the host, then used in f32).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepRule {
    /// The rule.
    pub kind: StepKind,
    /// Learning rate.
    pub lr: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// SGD momentum μ (0: none).
    pub momentum: f64,
    /// SGD dampening.
    pub dampening: f64,
    /// SGD Nesterov momentum.
    pub nesterov: bool,
    /// Adam β₁.
    pub beta1: f64,
    /// Adam β₂.
    pub beta2: f64,
    /// Adam ε (added outside the square root).
    pub eps: f64,
    /// The step number, from 1.
    pub step: u64,
    /// Multiplier applied to the gradient before anything else (the clipping
    /// coefficient, or 1 / loss scale).
    pub grad_scale: f64,
}

impl StepRule {
    /// Whether the rule keeps a first moment (Adam) or momentum buffer (SGD with μ > 0).
    pub fn has_m(&self) -> bool {
        !matches!(self.kind, StepKind::Sgd) || self.momentum != 0.0
    }

    /// Whether the rule keeps a second moment (Adam, AdamW).
    pub fn has_v(&self) -> bool {
        !matches!(self.kind, StepKind::Sgd)
    }

    /// Checks the hyperparameters as torch.optim does: lr, eps and weight decay ≥ 0,
    /// betas in [0, 1), momentum ≥ 0, Nesterov only with momentum and no dampening, the
    /// step from 1, every value finite.
    pub fn validate(&self) -> Result<()> {
        let fields = [
            ("lr", self.lr),
            ("weight_decay", self.weight_decay),
            ("momentum", self.momentum),
            ("dampening", self.dampening),
            ("betas[0]", self.beta1),
            ("betas[1]", self.beta2),
            ("eps", self.eps),
            ("grad_scale", self.grad_scale),
        ];
        for (name, v) in fields {
            if !v.is_finite() || v < 0.0 {
                return Err(Error::config(name, format!("must be finite and >= 0, got {v}")));
            }
        }
        for (name, v) in [("betas[0]", self.beta1), ("betas[1]", self.beta2)] {
            if v >= 1.0 {
                return Err(Error::config(name, format!("must be in [0, 1), got {v}")));
            }
        }
        if self.nesterov && (self.momentum <= 0.0 || self.dampening != 0.0) {
            return Err(Error::config("nesterov", "requires a momentum and zero dampening"));
        }
        if self.step == 0 {
            return Err(Error::config("step", "steps count from 1"));
        }
        Ok(())
    }

    /// The f32 scalars the kernels take: `[lr, wd, momentum, 1 − dampening, β₁-lerp
    /// weight (1 − β₁), β₂, 1 − β₂, eps, step size lr / (1 − β₁ᵗ), √(1 − β₂ᵗ), 1 − lr·wd,
    /// grad_scale]`.
    pub fn scalars(&self) -> [f32; 12] {
        let t = self.step as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2 = 1.0 - self.beta2.powi(t);
        [
            self.lr as f32,
            self.weight_decay as f32,
            self.momentum as f32,
            (1.0 - self.dampening) as f32,
            (1.0 - self.beta1) as f32,
            self.beta2 as f32,
            (1.0 - self.beta2) as f32,
            self.eps as f32,
            (self.lr / bc1) as f32,
            bc2.sqrt() as f32,
            (1.0 - self.lr * self.weight_decay) as f32,
            self.grad_scale as f32,
        ]
    }
}

/// One optimizer step of one parameter tensor, checked: the parameter and its gradient
/// (f32, same shape) and the state the rule keeps.
#[non_exhaustive]
pub struct OptimStepOp<'a, B: Device> {
    /// The parameter (f32 master copy).
    pub param: &'a Tensor<B>,
    /// Its gradient.
    pub grad: &'a Tensor<B>,
    /// First moment / momentum buffer (None on SGD's first step: it starts as the
    /// gradient).
    pub m: Option<&'a Tensor<B>>,
    /// Second moment.
    pub v: Option<&'a Tensor<B>>,
    /// The rule and its scalars.
    pub rule: StepRule,
    /// Kernel parameters.
    pub params: OptimParams,
}

/// What a step returns: the new parameter and state.
pub struct StepOut<B: Device> {
    /// The updated parameter.
    pub param: Tensor<B>,
    /// The updated first moment / momentum buffer.
    pub m: Option<Tensor<B>>,
    /// The updated second moment.
    pub v: Option<Tensor<B>>,
}

impl<'a, B: Device> OptimStepOp<'a, B> {
    /// Checks the operands against the rule: Adam takes both moments (zeros before the
    /// first step); SGD with momentum takes its buffer from the second step on.
    pub fn check(
        b: &B,
        param: &'a Tensor<B>,
        grad: &'a Tensor<B>,
        m: Option<&'a Tensor<B>>,
        v: Option<&'a Tensor<B>>,
        rule: StepRule,
    ) -> Result<Self> {
        rule.validate()?;
        let shape = f32_tensor("parameter", param)?;
        f32_shaped("gradient", grad, shape)?;
        let sgd_first = rule.kind == StepKind::Sgd && rule.step == 1;
        match (m, rule.has_m()) {
            (Some(t), true) => f32_shaped("first moment", t, shape)?,
            (None, true) if sgd_first => {}
            (None, true) => return Err(Error::MissingTensor("first moment / momentum buffer".into())),
            (Some(_), false) => return Err(Error::Misuse("a momentum buffer for SGD without momentum".into())),
            (None, false) => {}
        }
        match (v, rule.has_v()) {
            (Some(t), true) => f32_shaped("second moment", t, shape)?,
            (None, true) => return Err(Error::MissingTensor("second moment".into())),
            (Some(_), false) => return Err(Error::Misuse("a second moment for SGD".into())),
            (None, false) => {}
        }
        let n = output(b, "updated parameter", shape, DType::F32)?;
        let [lr, wd, mu, one_minus_damp, w1, beta2, one_minus_b2, eps, step_size, bc2_sqrt, decay, grad_scale] =
            rule.scalars();
        let params = OptimParams {
            n: super::to_u32("parameter elements", n)?,
            kind: match rule.kind {
                StepKind::Sgd => 0,
                StepKind::Adam => 1,
                StepKind::AdamW => 2,
            },
            has_m: m.is_some() as u32,
            nesterov: rule.nesterov as u32,
            lr,
            wd,
            mu,
            one_minus_damp,
            w1,
            beta2,
            one_minus_b2,
            eps,
            step_size,
            bc2_sqrt,
            decay,
            grad_scale,
        };
        Ok(OptimStepOp { param, grad, m, v, rule, params })
    }
}

/// Σ x² of an f32 tensor in f32, as `[1]`, summed in a fixed order. Checked.
#[non_exhaustive]
pub struct SumSquaresOp<'a, B: Device> {
    /// The tensor.
    pub x: &'a Tensor<B>,
    /// Kernel parameters (`n` only).
    pub params: OptimParams,
}

impl<'a, B: Device> SumSquaresOp<'a, B> {
    /// Checks the dtype.
    pub fn check(x: &'a Tensor<B>) -> Result<Self> {
        f32_tensor("tensor", x)?;
        let params = OptimParams { n: super::to_u32("tensor elements", x.numel())?, ..Default::default() };
        Ok(SumSquaresOp { x, params })
    }
}

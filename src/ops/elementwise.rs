//! Elementwise ops: activations, GLU, products and the residual / shared-expert mixes.
//! One checked op covers them all, since every backend runs them as one kernel family
//! with one parameter block.

use super::{f32_matrix, f32_shaped, f32_tensor, output};
use crate::device::{Device, Tensor};
use crate::error::{Error, Result};
use crate::expert::{Activation, GluClamp};
use crate::kernel_abi::ElementwiseParams;
use crate::tensor::DType;

/// Which elementwise op.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ElementwiseKind {
    /// `act(a)`.
    Activation(Activation),
    /// `a [R, 2I]` (gate columns first) → `act(gate) · up`, `[R, I]`.
    Glu(Activation),
    /// The clamped GLU ([`GluClamp`]): `a [R, 2I]` → `act_α(min(gate, limit)) ·
    /// (clamp(up, −limit, limit) + up_offset)`, `[R, I]`. The same entry point as `Glu`.
    GluClamped(Activation, GluClamp),
    /// `a [R, M] + b [M]` on every row (JetMoE's output bias).
    AddBias,
    /// `a · b`, equal shapes (multiplicative jitter).
    Mul,
    /// `a + sigmoid(c) · b` with the gate `c [R, 1]`, or `a + b` without it.
    AddGated,
    /// DeepSpeed residual MoE: `a · s₀ + b · s₁`, `s = softmax(c [R, 2])`.
    ResidualMix,
    /// `alpha · a` (loss scaling, gradient scaling), alpha finite.
    Scale(f32),
}

impl ElementwiseKind {
    /// The entry point (shaders/elementwise.wgsl and kernels/elementwise.cu use the same
    /// names).
    pub fn entry(self) -> &'static str {
        match self {
            ElementwiseKind::Activation(_) => "activation",
            ElementwiseKind::Glu(_) | ElementwiseKind::GluClamped(..) => "glu",
            ElementwiseKind::AddBias => "add_bias",
            ElementwiseKind::Mul => "mul",
            ElementwiseKind::AddGated => "add_gated",
            ElementwiseKind::ResidualMix => "residual_mix",
            ElementwiseKind::Scale(_) => "scale",
        }
    }
}

/// An elementwise op with checked operands: `a`, and `b` / `c` where the kind takes them.
#[non_exhaustive]
pub struct ElementwiseOp<'a, B: Device> {
    /// Which op.
    pub kind: ElementwiseKind,
    /// First input.
    pub a: &'a Tensor<B>,
    /// Second input (mul, add_gated, residual_mix, add_bias).
    pub b: Option<&'a Tensor<B>>,
    /// Third input: the gate logits of add_gated, the coefficient logits of residual_mix.
    pub c: Option<&'a Tensor<B>>,
    /// Output shape.
    pub out_shape: Vec<usize>,
    /// Kernel parameters.
    pub params: ElementwiseParams,
}

impl<'a, B: Device> ElementwiseOp<'a, B> {
    /// Checks the operands of `kind`.
    pub fn check(
        backend: &B,
        kind: ElementwiseKind,
        a: &'a Tensor<B>,
        b: Option<&'a Tensor<B>>,
        c: Option<&'a Tensor<B>>,
    ) -> Result<Self> {
        let need = |t: Option<&'a Tensor<B>>, name: &str| {
            t.ok_or_else(|| Error::Internal(format!("{} without its `{name}` operand", kind.entry())))
        };
        let mut clamp = None;
        let (out_shape, act, gated) = match kind {
            ElementwiseKind::Activation(act) => (f32_tensor("activation input", a)?.to_vec(), act, 0),
            ElementwiseKind::Glu(act) | ElementwiseKind::GluClamped(act, _) => {
                if let ElementwiseKind::GluClamped(_, c) = kind {
                    c.check(act)?;
                    clamp = Some(c);
                }
                let (r, two_i) = f32_matrix("glu input", a)?;
                if two_i % 2 != 0 {
                    return Err(Error::shape("glu input", "[rows, 2·ffn] (gate columns, then up)", a.shape()));
                }
                (vec![r, two_i / 2], act, 0)
            }
            ElementwiseKind::AddBias => {
                let (r, m) = f32_matrix("add_bias input", a)?;
                f32_shaped("output bias", need(b, "bias")?, &[m])?;
                (vec![r, m], Activation::Identity, 0)
            }
            ElementwiseKind::Mul => {
                f32_tensor("mul lhs", a)?;
                f32_shaped("mul rhs", need(b, "rhs")?, a.shape())?;
                (a.shape().to_vec(), Activation::Identity, 0)
            }
            ElementwiseKind::AddGated => {
                let (r, m) = f32_matrix("add_gated lhs", a)?;
                f32_shaped("shared expert output", need(b, "rhs")?, &[r, m])?;
                if let Some(g) = c {
                    f32_shaped("shared_expert_gate logits", g, &[r, 1])?;
                }
                (vec![r, m], Activation::Identity, c.is_some() as u32)
            }
            ElementwiseKind::Scale(alpha) => {
                if !alpha.is_finite() {
                    return Err(Error::config("scale", format!("the factor must be finite, got {alpha}")));
                }
                (f32_tensor("scaled tensor", a)?.to_vec(), Activation::Identity, 0)
            }
            ElementwiseKind::ResidualMix => {
                let (r, m) = f32_matrix("moe output", a)?;
                f32_shaped("residual mlp output", need(b, "mlp")?, &[r, m])?;
                f32_shaped("coefficient logits", need(c, "coef")?, &[r, 2])?;
                (vec![r, m], Activation::Identity, 0)
            }
        };
        let n = output(backend, kind.entry(), &out_shape, DType::F32)?;
        let cols = *out_shape.last().unwrap_or(&1);
        let params = ElementwiseParams {
            n: n as u64,
            cols: super::to_u32("elementwise row length", cols.max(1))?,
            act: act.kernel_code(),
            gated,
            alpha: if let ElementwiseKind::Scale(alpha) = kind { alpha } else { 0.0 },
            clamp: clamp.is_some() as u32,
            limit: clamp.map_or(0.0, |c| c.limit),
            glu_alpha: clamp.map_or(0.0, |c| c.alpha),
            up_offset: clamp.map_or(0.0, |c| c.up_offset),
            ..Default::default()
        };
        Ok(ElementwiseOp { kind, a, b, c, out_shape, params })
    }
}

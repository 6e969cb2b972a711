//! The form of an expert: its kind (linear, MLP, GLU) and activation. Both the layer
//! configuration and the ops use these, so they live apart from either.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// Activation functions of expert and dense MLPs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Gaussian error linear unit, exact (erf) form: PyTorch `GELU()`.
    Gelu,
    /// GELU with the tanh approximation: PyTorch `GELU(approximate="tanh")`.
    GeluTanh,
    /// max(x, 0).
    Relu,
    /// x · sigmoid(x), also called swish.
    Silu,
    /// Identity: for linear experts.
    Identity,
}

impl Activation {
    /// Every activation, in kernel-code order.
    pub const ALL: [Activation; 5] =
        [Activation::Gelu, Activation::GeluTanh, Activation::Relu, Activation::Silu, Activation::Identity];

    /// The code the GPU kernels switch on (shaders/activation.wgsl, kernels/common.cuh):
    /// 0 gelu, 1 gelu_tanh, 2 relu, 3 silu, 4 identity.
    pub fn kernel_code(self) -> u32 {
        match self {
            Activation::Gelu => 0,
            Activation::GeluTanh => 1,
            Activation::Relu => 2,
            Activation::Silu => 3,
            Activation::Identity => 4,
        }
    }

    /// The name configs use for it.
    pub fn name(self) -> &'static str {
        match self {
            Activation::Gelu => "gelu",
            Activation::GeluTanh => "gelu_tanh",
            Activation::Relu => "relu",
            Activation::Silu => "silu",
            Activation::Identity => "identity",
        }
    }
}

impl std::str::FromStr for Activation {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "gelu" | "gelu_new_exact" => Ok(Activation::Gelu),
            "gelu_tanh" | "gelu_new" | "gelu_pytorch_tanh" => Ok(Activation::GeluTanh),
            "relu" => Ok(Activation::Relu),
            "silu" | "swish" => Ok(Activation::Silu),
            "identity" | "linear" => Ok(Activation::Identity),
            _ => Err(Error::config("activation", format!("unknown activation `{s}` (gelu, gelu_tanh, relu, silu)"))),
        }
    }
}

/// The clamp of a clamped GLU (gpt-oss, DeepSeek-V4): on the first projection's output
/// split into gate and up, `g = min(gate, limit)`, `u = clamp(up, −limit, limit)` and the
/// output `act_α(g) · (u + up_offset)`, where silu takes `act_α(g) = g · σ(α · g)` (α = 1
/// is plain silu) and every other activation α = 1 only.
///
/// gpt-oss (`GptOssExperts._apply_gate`: `gate.clamp(min=None, max=limit)`, `up.clamp(-limit,
/// limit)`, `gate * sigmoid(gate * alpha)`, `(up + 1) * glu`) is
/// [`GluClamp::gpt_oss`]`(swiglu_limit, swiglu_alpha)`; DeepSeek-V4 (`DeepseekV4Experts._apply_gate`
/// and `DeepseekV4MLP`: the same clamps, then `act_fn(gate) * up`) is
/// [`GluClamp::deepseek_v4`]`(swiglu_limit)`. Both references always clamp (their configs
/// carry a float limit, 7.0 and 10.0 by default); an expert without a clamp is
/// `ExpertKind::Glu { clamp: None, .. }`.
///
/// The backward follows torch's autograd of those expressions: the clamps pass the
/// gradient only where the value lies strictly inside the bounds (`gate < limit`, `−limit <
/// up < limit`; torch 2.15's scalar `clamp` gives 0 at the bound itself, checked with its
/// autograd), so a clamped value takes none.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct GluClamp {
    /// The bound of both clamps: finite and positive.
    pub limit: f32,
    /// The silu's sigmoid scale α (1 for plain silu; other activations take 1 only).
    pub alpha: f32,
    /// Added to the clamped up value (1 for gpt-oss, 0 for DeepSeek-V4).
    pub up_offset: f32,
}

impl GluClamp {
    /// gpt-oss: `{limit, alpha, up_offset: 1}` (`swiglu_limit`, `swiglu_alpha`).
    pub fn gpt_oss(limit: f32, alpha: f32) -> Self {
        GluClamp { limit, alpha, up_offset: 1.0 }
    }

    /// DeepSeek-V4: `{limit, alpha: 1, up_offset: 0}` (`swiglu_limit`).
    pub fn deepseek_v4(limit: f32) -> Self {
        GluClamp { limit, alpha: 1.0, up_offset: 0.0 }
    }

    /// Checks the clamp for the GLU's activation: a finite positive limit, a finite alpha
    /// and offset, and alpha 1 unless the activation is silu. Errors name the field.
    pub fn check(self, activation: Activation) -> Result<()> {
        if !(self.limit.is_finite() && self.limit > 0.0) {
            return Err(Error::config("clamp.limit", format!("must be finite and positive, got {}", self.limit)));
        }
        if !self.alpha.is_finite() {
            return Err(Error::config("clamp.alpha", format!("must be finite, got {}", self.alpha)));
        }
        if !self.up_offset.is_finite() {
            return Err(Error::config("clamp.up_offset", format!("must be finite, got {}", self.up_offset)));
        }
        if activation != Activation::Silu && self.alpha != 1.0 {
            return Err(Error::config(
                "clamp.alpha",
                format!("only silu takes a sigmoid scale; {} takes 1, got {}", activation.name(), self.alpha),
            ));
        }
        Ok(())
    }
}

/// The form of one expert.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExpertKind {
    /// One linear layer `hidden → hidden` (DeepSpeed's CIFAR-10 example).
    Linear,
    /// Linear → activation → Linear.
    Mlp {
        /// The activation.
        activation: Activation,
    },
    /// Gated: `down(act(gate(x)) · up(x))` (SwiGLU with silu, GeGLU with gelu), or with a
    /// clamp `down(act_α(min(gate, l)) · (clamp(up, −l, l) + up_offset))` (gpt-oss,
    /// DeepSeek-V4).
    Glu {
        /// The activation applied to the gate projection.
        activation: Activation,
        /// The clamp of a clamped GLU (None: plain). Configs without the field read None.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        clamp: Option<GluClamp>,
    },
}

impl ExpertKind {
    /// Rows of the first projection for intermediate size `ffn` and model size `hidden`:
    /// `hidden` (linear), `ffn` (MLP) or `2·ffn`, gate rows first (GLU).
    pub fn first_rows(self, ffn: usize, hidden: usize) -> Option<usize> {
        match self {
            ExpertKind::Linear => Some(hidden),
            ExpertKind::Mlp { .. } => Some(ffn),
            ExpertKind::Glu { .. } => ffn.checked_mul(2),
        }
    }

    /// Checks what the kind carries (a GLU's clamp against its activation); errors name
    /// the field.
    pub fn check(self) -> Result<()> {
        match self {
            ExpertKind::Glu { activation, clamp: Some(c) } => c.check(activation),
            _ => Ok(()),
        }
    }
}

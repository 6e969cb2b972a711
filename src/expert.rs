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

/// The form of one expert.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExpertKind {
    /// One linear layer `hidden → hidden` (DeepSpeed's CIFAR-10 example).
    Linear,
    /// Linear → activation → Linear.
    Mlp {
        /// The activation.
        activation: Activation,
    },
    /// Gated: `down(act(gate(x)) · up(x))` (SwiGLU with silu, GeGLU with gelu).
    Glu {
        /// The activation applied to the gate projection.
        activation: Activation,
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
}

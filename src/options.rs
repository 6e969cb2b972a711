//! Per-call options of a forward: what the gate needs ([`GateOptions`]) and what the
//! layer adds ([`LayerOptions`]).

use crate::config::Mode;
use crate::tensor::HostTensor;

/// Noise the caller supplies instead of drawing it (how golden cases replay the
/// references' draws). Shapes: jitter `[S, M]`, gumbel `[S, E]`, rts `[S, E]`; the
/// values must be finite (checked where the gate takes them).
#[derive(Clone, Debug, Default)]
pub struct NoiseOverrides {
    /// Multiplicative gate-input jitter.
    pub jitter: Option<HostTensor>,
    /// Gumbel noise on the logits.
    pub gumbel: Option<HostTensor>,
    /// Random-token-selection priorities.
    pub rts: Option<HostTensor>,
}

/// Options of the gate: mode, randomness and the token mask.
#[derive(Clone, Debug, Default)]
pub struct GateOptions {
    /// Training or evaluation.
    pub mode: Mode,
    /// Seed of the Philox draws (jitter, Gumbel, RTS).
    pub seed: u64,
    /// Explicit noise, replacing the Philox draws where given.
    pub noise: NoiseOverrides,
    /// DeepSpeed `used_token` mask `[S]` of 0 / 1 (top-1 only, as in DeepSpeed).
    pub used_token: Option<HostTensor>,
}

/// Options of a layer forward: the gate's, and what the experts keep.
#[derive(Clone, Debug, Default)]
pub struct LayerOptions {
    /// The gate's options.
    pub gate: GateOptions,
    /// Keep the expert pre-activations in the output for a backward pass. Off for
    /// inference: the fused expert path then never writes the `[S·k, N]` intermediate to
    /// memory.
    pub keep_activations: bool,
    /// Wait for the device before each step of an expert-parallel exchange, so that the
    /// exchange time a forward reports counts the exchange alone, not compute still queued
    /// before it. A device synchronisation per step: benchmarks set it, production leaves
    /// it off.
    pub time_exchange: bool,
}

impl LayerOptions {
    /// Evaluation or training with the default seed, no overrides.
    pub fn mode(mode: Mode) -> Self {
        LayerOptions { gate: GateOptions { mode, ..Default::default() }, ..Default::default() }
    }
}

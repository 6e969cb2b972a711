//! The MoE layer forward, written once over the [`Backend`] trait:
//!
//! ```text
//! x → gate (logits f32 → route → plan) → dispatch → experts (grouped) → combine
//!   → + residual MLP (DeepSpeed coefficient) or shared experts → y
//! ```
//!
//! The dispatch and combine are the layer's [`Dispatcher`], chosen when it is built: local
//! (permute and combine on this device) or expert parallel (the exchange over a transport).
//! Nothing is read back to the host inside a local forward, and an expert-parallel one
//! reads only the routes per expert slot; [`LayerOutput::report`] downloads the small
//! per-expert tensors afterwards and computes the losses.

use crate::backend::Backend;
use crate::config::{ExpertSpec, LayerSpec};
use crate::device::Tensor;
use crate::dispatcher::{DispatchState, Dispatched, Dispatcher};
use crate::error::{human_bytes, Error, Result};
use crate::expert::ExpertKind;
use crate::gate::{Gate, GateOutput};
use crate::ops::{MlpWeights, Offsets};
use crate::options::LayerOptions;
use crate::parallel::ExpertParallel;
use crate::report::Report;
use crate::tensor::{DType, HostTensor};
use crate::weights::{HostLayerWeights, HostMlp};

/// An MLP block on the device: an expert stack (`[E, N, M]`) or a dense MLP (`[N, M]`).
pub struct DeviceMlp<B: Backend> {
    kind: ExpertKind,
    w_in: Tensor<B>,
    b_in: Option<Tensor<B>>,
    w_out: Option<Tensor<B>>,
    b_out: Option<Tensor<B>>,
}

/// Intermediate tensors of the expert computation, kept for a backward pass. With expert
/// parallelism they are this rank's experts' rows (what the exchange brought here).
pub struct ExpertActivations<B: Backend> {
    /// Input rows grouped by expert: compact expert-major `[S·k, M]` when local.
    pub xp: Tensor<B>,
    /// Pre-activation of the first projection `[rows, N]`, kept when
    /// [`LayerOptions::keep_activations`] asks for it (never for linear experts).
    pub pre_activation: Option<Tensor<B>>,
    /// Expert outputs before combining, in the layout of `xp`.
    pub yp: Tensor<B>,
}

impl<B: Backend> DeviceMlp<B> {
    /// Uploads an expert stack (`dense = false`) or a dense block (the E = 1 stack).
    pub fn upload(backend: &B, host: &HostMlp, spec: &ExpertSpec, dense: bool, dtype: DType) -> Result<Self> {
        // A dense block is the E = 1 stack without its leading dimension.
        let squeeze = |t: &HostTensor| if dense { t.clone().reshape(&t.shape()[1..]) } else { Ok(t.clone()) };
        let weight = |t: &HostTensor| backend.upload_weight(&squeeze(t)?, dtype);
        let bias = |t: &Option<HostTensor>| t.as_ref().map(|t| backend.upload_as(&squeeze(t)?, dtype)).transpose();
        Ok(DeviceMlp {
            kind: spec.kind,
            w_in: weight(&host.w_in)?,
            b_in: bias(&host.b_in)?,
            w_out: host.w_out.as_ref().map(weight).transpose()?,
            b_out: bias(&host.b_out)?,
        })
    }

    fn w_out(&self) -> Result<&Tensor<B>> {
        self.w_out.as_ref().ok_or_else(|| Error::Internal("an MLP block was uploaded without w_out".into()))
    }

    /// Runs a dense block on token rows.
    pub fn dense(&self, b: &B, x: &Tensor<B>) -> Result<Tensor<B>> {
        let h = b.linear(x, &self.w_in, self.b_in.as_ref())?;
        let h = match self.kind {
            ExpertKind::Linear => return Ok(h),
            ExpertKind::Mlp { activation } => b.activation(&h, activation)?,
            ExpertKind::Glu { activation } => b.glu(&h, activation)?,
        };
        b.linear(&h, self.w_out()?, self.b_out.as_ref())
    }

    /// Runs the expert stack on compact expert-major rows; `keep_pre` keeps the
    /// pre-activation for a backward pass.
    pub fn grouped(&self, b: &B, xp: Tensor<B>, offsets: &Offsets<B>, keep_pre: bool) -> Result<ExpertActivations<B>> {
        let w = MlpWeights {
            kind: self.kind,
            w_in: &self.w_in,
            b_in: self.b_in.as_ref(),
            w_out: self.w_out.as_ref(),
            b_out: self.b_out.as_ref(),
        };
        let out = b.grouped_mlp(&xp, offsets, &w, keep_pre)?;
        Ok(ExpertActivations { xp, pre_activation: out.pre, yp: out.y })
    }
}

/// Everything a forward produced. Tensors stay on the device.
pub struct LayerOutput<B: Backend> {
    /// Output, same shape as the input.
    pub y: Tensor<B>,
    /// Logits, routes, plan and router reductions.
    pub gate: GateOutput<B>,
    /// Expert intermediates (for backward).
    pub experts: ExpertActivations<B>,
    /// What the dispatcher kept (for backward), and the time it spent exchanging.
    pub dispatch: DispatchState<B>,
}

impl<B: Backend> LayerOutput<B> {
    /// Loads, drops and losses (downloads only per-expert tensors).
    pub fn report(&self, b: &B) -> Result<Report> {
        self.gate.report(b)
    }
}

/// An input flattened to `[S, M]`, with what is needed to shape the output back.
struct Flat<B: Backend> {
    x: Tensor<B>,
    seq: usize,
    shape: Vec<usize>,
}

/// One MoE layer with its weights on a backend.
pub struct MoeLayer<B: Backend> {
    spec: LayerSpec,
    gate: Gate<B>,
    /// The routed experts this instance holds: all of them, or its dispatcher's share.
    experts: DeviceMlp<B>,
    residual: Option<(DeviceMlp<B>, Tensor<B>, Tensor<B>)>,
    shared: Option<(DeviceMlp<B>, Option<Tensor<B>>)>,
    dispatcher: Dispatcher<B>,
}

impl<B: Backend> MoeLayer<B> {
    /// Validates spec and weights and uploads the weights (router in f32, the rest in
    /// `dtype`); every expert is on this device.
    pub fn new(backend: &B, spec: LayerSpec, weights: &HostLayerWeights, dtype: DType) -> Result<Self> {
        Self::build(backend, spec, weights, dtype, Dispatcher::Local)
    }

    /// As [`MoeLayer::new`] for one rank of an expert-parallel group: the router and the
    /// dense parts are uploaded whole, the routed experts only for the rank's slots of
    /// `ep.placement` (DeepSpeed's contiguous blocks, or an EPLB plan with replicas). A
    /// placement over another number of ranks than the transport's is refused here.
    pub fn new_ep(
        backend: &B,
        spec: LayerSpec,
        weights: &HostLayerWeights,
        dtype: DType,
        ep: ExpertParallel<B>,
    ) -> Result<Self> {
        let dispatcher = Dispatcher::expert_parallel(backend, ep, spec.num_experts)?;
        Self::build(backend, spec, weights, dtype, dispatcher)
    }

    fn build(
        backend: &B,
        spec: LayerSpec,
        weights: &HostLayerWeights,
        dtype: DType,
        dispatcher: Dispatcher<B>,
    ) -> Result<Self> {
        spec.validate()?;
        weights.validate(&spec)?;
        if !backend.capabilities().storage_dtypes.contains(&dtype) {
            return Err(Error::unsupported(backend.name(), format!("{dtype} weights")));
        }
        let local_experts = dispatcher.local_experts();
        check_memory(backend, &spec, local_experts.map_or(spec.num_experts, <[usize]>::len), dtype)?;
        let local = match local_experts {
            Some(ids) => weights.experts.gather_experts(ids)?,
            None => weights.experts.clone(),
        };
        let experts = DeviceMlp::upload(backend, &local, &spec.expert, false, dtype)?;
        let residual = match &weights.residual {
            Some((mlp, cw, cb)) => Some((
                DeviceMlp::upload(backend, mlp, &spec.expert, true, dtype)?,
                backend.upload_weight(cw, DType::F32)?,
                backend.upload(cb)?,
            )),
            None => None,
        };
        let shared = match (&weights.shared, &spec.shared) {
            (Some((mlp, g)), Some(s)) => Some((
                DeviceMlp::upload(backend, mlp, &s.expert, true, dtype)?,
                g.as_ref().map(|g| backend.upload_weight(g, DType::F32)).transpose()?,
            )),
            _ => None,
        };
        let gate = Gate::new(backend, spec.gate.clone(), &weights.gate, weights.gate_bias.as_ref())?;
        Ok(MoeLayer { spec, gate, experts, residual, shared, dispatcher })
    }

    /// The layer's configuration.
    pub fn spec(&self) -> &LayerSpec {
        &self.spec
    }

    /// `x` as `[S, M]`, with S, M, the sequence length and the original shape.
    fn flatten_input(&self, x: &Tensor<B>) -> Result<Flat<B>> {
        let m = self.spec.hidden;
        let shape = x.shape().to_vec();
        if shape.len() < 2 || shape.len() > 3 || shape[shape.len() - 1] != m {
            return Err(Error::shape("x", format!("[tokens, {m}] or [batch, seq, {m}]"), &shape));
        }
        x.expect_dtype("x", DType::F32)?;
        let s: usize = shape[..shape.len() - 1].iter().product();
        let seq = shape[shape.len() - 2];
        Ok(Flat { x: x.reshape(&[s, m])?, seq, shape })
    }

    /// Adds the residual MLP (DeepSpeed coefficient mix) or the shared experts to the
    /// routed output `y`.
    fn add_dense_parts(&self, b: &B, x2: &Tensor<B>, mut y: Tensor<B>) -> Result<Tensor<B>> {
        if let Some((mlp, cw, cb)) = &self.residual {
            let dense = mlp.dense(b, x2)?;
            let coef = b.linear(x2, cw, Some(cb))?;
            y = b.residual_mix(&y, &dense, &coef)?;
        }
        if let Some((mlp, gate_w)) = &self.shared {
            let dense = mlp.dense(b, x2)?;
            let g = gate_w.as_ref().map(|g| b.linear(x2, g, None)).transpose()?;
            y = b.add_gated(&y, &dense, g.as_ref())?;
        }
        Ok(y)
    }

    /// Forward of `x` shaped `[S, M]` or `[B, T, M]` (Switch counts capacity per row of B).
    /// An expert-parallel layer runs it on every rank of its group together (the exchange
    /// is collective).
    pub fn forward(&self, b: &B, x: &Tensor<B>, opts: &LayerOptions) -> Result<LayerOutput<B>> {
        let Flat { x: x2, seq, shape } = self.flatten_input(x)?;
        let gate = self.gate.forward(b, &x2, seq, &opts.gate)?;
        let timed = opts.time_exchange;
        let Dispatched { xp, offsets, mut state } = self.dispatcher.dispatch(b, &x2, &gate.plan, timed)?;
        let acts = self.experts.grouped(b, xp, &offsets, opts.keep_activations)?;
        let y = self.dispatcher.combine(b, &acts.yp, &gate.plan, &mut state, timed)?;
        let y = self.add_dense_parts(b, &x2, y)?;
        Ok(LayerOutput { y: y.reshape(&shape)?, gate, experts: acts, dispatch: state })
    }
}

/// Refuses a layer whose weights (`local` of its experts, in `dtype`) need more memory
/// than the backend has free, before anything is uploaded.
fn check_memory<B: Backend>(b: &B, spec: &LayerSpec, local: usize, dtype: DType) -> Result<()> {
    let Some(free) = b.available_memory() else { return Ok(()) };
    let all = spec.weight_count()?;
    let per_expert = spec.expert.kind.first_rows(spec.expert.ffn, spec.hidden).unwrap_or(0) as u64 * spec.hidden as u64
        + if matches!(spec.expert.kind, ExpertKind::Linear) { 0 } else { (spec.hidden * spec.expert.ffn) as u64 };
    let elems = all.saturating_sub(per_expert.saturating_mul(spec.num_experts.saturating_sub(local) as u64));
    let need = elems.saturating_mul(dtype.size() as u64);
    if need > free {
        return Err(Error::too_large(
            format!("the layer's weights ({local} of {} experts in {dtype})", spec.num_experts),
            human_bytes(need),
            format!("the {} free on {} ({})", human_bytes(free), b.name(), b.capabilities().device),
        ));
    }
    Ok(())
}

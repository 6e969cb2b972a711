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
use crate::config::{ExpertSpec, LayerSpec, SharedCombine};
use crate::device::Tensor;
use crate::dispatcher::{DispatchState, Dispatched, Dispatcher};
use crate::error::{human_bytes, Error, Result};
use crate::expert::ExpertKind;
use crate::gate::{Gate, GateOutput};
use crate::ops::{MlpOutput, MlpWeights, Offsets};
use crate::options::LayerOptions;
use crate::parallel::ExpertParallel;
use crate::report::Report;
use crate::tensor::{DType, HostTensor};
use crate::weights::{HostLayerWeights, HostMlp};

mod backward;
pub use backward::{BackwardOptions, LayerGrads, MlpGrads};

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
    /// The group offsets of `xp`'s rows (this rank's experts).
    pub offsets: Offsets<B>,
}

/// How a layer's weights are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Storage {
    /// For inference: the MLP weights in this dtype, in the device's weight layout.
    Inference(DType),
    /// For training in f32: every weight a plain f32 tensor, the layout its gradient and
    /// optimizer state share.
    Trainable,
    /// For mixed-precision training: the MLP weights as compute copies in this dtype (f16
    /// or bf16), made on the device from f32 masters the layer keeps until an optimizer
    /// takes them; everything else as [`Storage::Trainable`].
    Mixed(DType),
}

impl<B: Backend> DeviceMlp<B> {
    /// Uploads an expert stack (`dense = false`) or a dense block (the E = 1 stack).
    pub fn upload(backend: &B, host: &HostMlp, spec: &ExpertSpec, dense: bool, dtype: DType) -> Result<Self> {
        Self::upload_with(backend, host, spec, dense, Storage::Inference(dtype), "", &mut Vec::new())
    }

    /// As [`DeviceMlp::upload`] in `storage`; a mixed-precision block adds the f32 masters
    /// of its weights to `masters`, named `{prefix}.w_in` and `{prefix}.w_out`.
    fn upload_with(
        backend: &B,
        host: &HostMlp,
        spec: &ExpertSpec,
        dense: bool,
        storage: Storage,
        prefix: &str,
        masters: &mut Vec<(String, Tensor<B>)>,
    ) -> Result<Self> {
        // A dense block is the E = 1 stack without its leading dimension.
        let squeeze = |t: &HostTensor| if dense { t.clone().reshape(&t.shape()[1..]) } else { Ok(t.clone()) };
        let mut weight = |t: &HostTensor, name: &str| match storage {
            Storage::Inference(dtype) => backend.upload_weight(&squeeze(t)?, dtype),
            Storage::Trainable => backend.upload(&squeeze(t)?),
            Storage::Mixed(dtype) => {
                let master = backend.upload(&squeeze(t)?)?;
                let compute = backend.cast_weight(&master, dtype)?;
                masters.push((format!("{prefix}.{name}"), master));
                Ok(compute)
            }
        };
        let w_in = weight(&host.w_in, "w_in")?;
        let w_out = host.w_out.as_ref().map(|t| weight(t, "w_out")).transpose()?;
        // Biases beside half-precision inference weights are rounded to their type; a
        // trained bias is its own f32 master.
        let bias_dtype = if let Storage::Inference(dtype) = storage { dtype } else { DType::F32 };
        let bias = |t: &Option<HostTensor>| t.as_ref().map(|t| backend.upload_as(&squeeze(t)?, bias_dtype)).transpose();
        Ok(DeviceMlp { kind: spec.kind, w_in, b_in: bias(&host.b_in)?, w_out, b_out: bias(&host.b_out)? })
    }

    fn w_out(&self) -> Result<&Tensor<B>> {
        self.w_out.as_ref().ok_or_else(|| Error::Internal("an MLP block was uploaded without w_out".into()))
    }

    /// Runs a dense block on token rows.
    pub fn dense(&self, b: &B, x: &Tensor<B>) -> Result<Tensor<B>> {
        Ok(self.dense_kept(b, x, false)?.y)
    }

    /// Runs a dense block on token rows, keeping the pre-activation when `keep_pre`
    /// (never for linear blocks).
    pub fn dense_kept(&self, b: &B, x: &Tensor<B>, keep_pre: bool) -> Result<MlpOutput<B>> {
        let h = b.linear(x, &self.w_in, self.b_in.as_ref())?;
        let a = match self.kind {
            ExpertKind::Linear => return Ok(MlpOutput { pre: None, y: h }),
            ExpertKind::Mlp { activation } => b.activation(&h, activation)?,
            ExpertKind::Glu { activation, clamp } => b.glu_clamped(&h, activation, clamp)?,
        };
        let y = b.linear(&a, self.w_out()?, self.b_out.as_ref())?;
        Ok(MlpOutput { pre: keep_pre.then_some(h), y })
    }

    /// Every weight, in the order `w_in, b_in, w_out, b_out` (absent ones skipped).
    pub(crate) fn params_mut(&mut self) -> Vec<(&'static str, &mut Tensor<B>)> {
        let mut v = vec![("w_in", &mut self.w_in)];
        v.extend(self.b_in.as_mut().map(|t| ("b_in", t)));
        v.extend(self.w_out.as_mut().map(|t| ("w_out", t)));
        v.extend(self.b_out.as_mut().map(|t| ("b_out", t)));
        v
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
        Ok(ExpertActivations { xp, pre_activation: out.pre, yp: out.y, offsets: offsets.clone() })
    }
}

/// What a dense block (residual MLP or shared experts) computed, kept for the backward.
pub struct DenseKept<B: Backend> {
    /// Its output `[S, M]`.
    pub out: Tensor<B>,
    /// The pre-activation of its first projection (absent for linear blocks, and unless
    /// [`LayerOptions::keep_activations`]).
    pub pre: Option<Tensor<B>>,
    /// The mixing logits: the residual coefficient `[S, 2]`, or the shared-expert gate
    /// `[S, 1]` (absent for ungated shared experts).
    pub mix: Option<Tensor<B>>,
}

/// What the dense parts of a forward kept for the backward.
pub struct DenseActivations<B: Backend> {
    /// The routed experts' combined output, before the dense parts were added.
    pub routed: Tensor<B>,
    /// The residual MLP (DeepSpeed `use_residual`).
    pub residual: Option<DenseKept<B>>,
    /// The shared experts.
    pub shared: Option<DenseKept<B>>,
}

/// Everything a forward produced. Tensors stay on the device.
pub struct LayerOutput<B: Backend> {
    /// The input flattened to `[S, M]` (a handle, not a copy): the products' backward
    /// needs it.
    pub input: Tensor<B>,
    /// The dense parts' intermediates.
    pub dense: DenseActivations<B>,
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

/// Whether the parameter (or gradient) named `name` by [`MoeLayer::params_mut`] belongs
/// to the routed experts: DeepSpeed's MoE parameters, in their own optimizer group and
/// reduced over the expert-data-parallel group.
pub fn is_expert_param(name: &str) -> bool {
    name.starts_with("experts.")
}

/// A trainable parameter of a layer, for an optimizer to replace.
pub struct ParamMut<'a, B: Backend> {
    /// The engine's name of it (`experts.w_in`, ...).
    pub name: String,
    /// Whether it belongs to the routed experts (DeepSpeed's MoE parameter group).
    pub expert: bool,
    /// The tensor.
    pub tensor: &'a mut Tensor<B>,
}

/// One MoE layer with its weights on a backend.
pub struct MoeLayer<B: Backend> {
    spec: LayerSpec,
    gate: Gate<B>,
    /// The routed experts this instance holds: all of them, or its dispatcher's share.
    experts: DeviceMlp<B>,
    residual: Option<(DeviceMlp<B>, Tensor<B>, Tensor<B>)>,
    shared: Option<(DeviceMlp<B>, Option<Tensor<B>>)>,
    /// The bias `[M]` added to every output row (JetMoE).
    output_bias: Option<Tensor<B>>,
    dispatcher: Dispatcher<B>,
    trainable: bool,
    /// The storage dtype of the MLP weights' compute copies (f32 unless mixed precision).
    compute_dtype: DType,
    /// A mixed-precision layer's f32 masters of its half-precision weights, until an
    /// optimizer takes them ([`MoeLayer::take_masters`]).
    masters: Vec<(String, Tensor<B>)>,
}

impl<B: Backend> MoeLayer<B> {
    /// Validates spec and weights and uploads the weights (router in f32, the rest in
    /// `dtype`); every expert is on this device.
    pub fn new(backend: &B, spec: LayerSpec, weights: &HostLayerWeights, dtype: DType) -> Result<Self> {
        Self::build(backend, spec, weights, Storage::Inference(dtype), Dispatcher::Local, false)
    }

    /// A layer to train: every expert on this device, every weight uploaded as a plain
    /// f32 tensor (the master copy the optimizer steps, in the layout its gradient and
    /// state share). Run its forward with [`LayerOptions::keep_activations`], then
    /// [`MoeLayer::backward`].
    pub fn new_trainable(backend: &B, spec: LayerSpec, weights: &HostLayerWeights) -> Result<Self> {
        Self::build(backend, spec, weights, Storage::Trainable, Dispatcher::Local, false)
    }

    /// A layer to train in mixed precision: the routed experts', residual MLP's and shared
    /// experts' weight matrices stored in `dtype` (f16 or bf16) for the forward and
    /// backward, made on the device from f32 copies of `weights` by
    /// [`Backend::cast_weight`]; the router, coefficient and shared-gate weights and every
    /// bias are plain f32 tensors, as in [`MoeLayer::new_trainable`] (the router runs in
    /// f32). The f32 copies are the masters an optimizer steps: the layer keeps them until
    /// [`crate::train::Optimizer::new`] takes them ([`MoeLayer::take_masters`]), and the
    /// optimizer refreshes the compute copies from them after every step. `dtype` f32 is
    /// [`MoeLayer::new_trainable`]; a dtype the device does not store is an error.
    pub fn new_mixed(backend: &B, spec: LayerSpec, weights: &HostLayerWeights, dtype: DType) -> Result<Self> {
        let storage = match dtype {
            DType::F32 => Storage::Trainable,
            DType::F16 | DType::BF16 => Storage::Mixed(dtype),
            DType::I32 => return Err(Error::dtype("mixed-precision weights", "f32, f16 or bf16", dtype)),
        };
        Self::build(backend, spec, weights, storage, Dispatcher::Local, false)
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
        Self::build(backend, spec, weights, Storage::Inference(dtype), dispatcher, false)
    }

    /// As [`MoeLayer::new_trainable`] for one rank of an expert-parallel group (see
    /// [`MoeLayer::new_ep`]): the rank's experts and the dense parts as plain f32
    /// tensors for an optimizer to step.
    pub fn new_ep_trainable(
        backend: &B,
        spec: LayerSpec,
        weights: &HostLayerWeights,
        ep: ExpertParallel<B>,
    ) -> Result<Self> {
        let dispatcher = Dispatcher::expert_parallel(backend, ep, spec.num_experts)?;
        Self::build(backend, spec, weights, Storage::Trainable, dispatcher, false)
    }

    /// As [`MoeLayer::new_ep`] (`trainable` false) or [`MoeLayer::new_ep_trainable`]
    /// (true) from weights whose routed experts are only this rank's, in its local slot
    /// order ([`crate::parallel::Placement::local`]): what a DeepSpeed rank's state dict
    /// holds (`deepspeed_experts.0 ..` are its own experts), so no rank needs the others'.
    pub fn new_ep_local(
        backend: &B,
        spec: LayerSpec,
        local_weights: &HostLayerWeights,
        trainable: bool,
        ep: ExpertParallel<B>,
    ) -> Result<Self> {
        let dispatcher = Dispatcher::expert_parallel(backend, ep, spec.num_experts)?;
        let storage = if trainable { Storage::Trainable } else { Storage::Inference(DType::F32) };
        Self::build(backend, spec, local_weights, storage, dispatcher, true)
    }

    fn build(
        backend: &B,
        spec: LayerSpec,
        weights: &HostLayerWeights,
        storage: Storage,
        dispatcher: Dispatcher<B>,
        weights_are_local: bool,
    ) -> Result<Self> {
        spec.validate()?;
        let local_experts = dispatcher.local_experts();
        match (local_experts, weights_are_local) {
            (Some(ids), true) => weights.validate_holding(&spec, ids.len())?,
            (None, true) => {
                return Err(Error::Internal("local expert weights for a layer without a dispatcher".into()))
            }
            (_, false) => weights.validate(&spec)?,
        }
        let (dtype, trainable) = match storage {
            Storage::Inference(d) => (d, false),
            Storage::Trainable => (DType::F32, true),
            Storage::Mixed(d) => (d, true),
        };
        if !backend.capabilities().storage_dtypes.contains(&dtype) {
            return Err(Error::unsupported(backend.name(), format!("{dtype} weights")));
        }
        if local_experts.is_some() && spec.gate.identity_experts() > 0 {
            return Err(Error::unsupported(
                "expert parallelism",
                "routers with identity experts (LongCat-Flash): run them on one device",
            ));
        }
        // Mixed precision: the f32 masters are the larger part (the compute copies add half).
        let sized = if trainable { DType::F32 } else { dtype };
        check_memory(backend, &spec, local_experts.map_or(spec.num_experts, <[usize]>::len), sized)?;
        let local = match local_experts {
            Some(ids) if !weights_are_local => weights.experts.gather_experts(ids)?,
            _ => weights.experts.clone(),
        };
        let mut masters = Vec::new();
        let experts = DeviceMlp::upload_with(backend, &local, &spec.expert, false, storage, "experts", &mut masters)?;
        let f32_weight =
            |t: &HostTensor| if trainable { backend.upload(t) } else { backend.upload_weight(t, DType::F32) };
        let residual = match &weights.residual {
            Some((mlp, cw, cb)) => Some((
                DeviceMlp::upload_with(backend, mlp, &spec.expert, true, storage, "residual", &mut masters)?,
                f32_weight(cw)?,
                backend.upload(cb)?,
            )),
            None => None,
        };
        let shared = match (&weights.shared, &spec.shared) {
            (Some((mlp, g)), Some(s)) => Some((
                DeviceMlp::upload_with(backend, mlp, &s.expert, true, storage, "shared", &mut masters)?,
                g.as_ref().map(f32_weight).transpose()?,
            )),
            _ => None,
        };
        let gate = Gate::build(
            backend,
            spec.gate.clone(),
            &weights.gate,
            weights.gate_bias.as_ref(),
            weights.router_bias.as_ref(),
            trainable,
        )?;
        let output_bias = weights.output_bias.as_ref().map(|t| backend.upload(t)).transpose()?;
        let compute_dtype = if let Storage::Mixed(d) = storage { d } else { DType::F32 };
        Ok(MoeLayer {
            spec,
            gate,
            experts,
            residual,
            shared,
            output_bias,
            dispatcher,
            trainable,
            compute_dtype,
            masters,
        })
    }

    /// How the shared experts join the routed output.
    fn shared_combine(&self) -> SharedCombine {
        self.spec.shared.as_ref().map_or(SharedCombine::Add, |s| s.combine)
    }

    /// The layer's configuration.
    pub fn spec(&self) -> &LayerSpec {
        &self.spec
    }

    /// The logical experts this layer holds, in local slot order (`None`: all of them).
    pub fn local_experts(&self) -> Option<&[usize]> {
        self.dispatcher.local_experts()
    }

    /// Whether the layer was built for training ([`MoeLayer::new_trainable`],
    /// [`MoeLayer::new_mixed`]): weights an optimizer may step, plain f32 tensors or
    /// half-precision compute copies of f32 masters.
    pub fn is_trainable(&self) -> bool {
        self.trainable
    }

    /// The storage dtype of the MLP weights a trainable layer computes with: f16 / bf16
    /// for a layer from [`MoeLayer::new_mixed`], else f32.
    pub fn compute_dtype(&self) -> DType {
        self.compute_dtype
    }

    /// Hands over the f32 masters of a mixed-precision layer's half-precision weights (the
    /// weights it was built from, uploaded as f32), named as [`MoeLayer::params_mut`] names
    /// the parameters; the layer keeps none afterwards, so a second call gives none.
    /// [`crate::train::Optimizer::new`] takes them.
    pub fn take_masters(&mut self) -> Vec<(String, Tensor<B>)> {
        std::mem::take(&mut self.masters)
    }

    /// Every trainable parameter, named as [`LayerGrads::into_named`] names their
    /// gradients and in the same order: `gate.weight`, `experts.{w_in,b_in,w_out,b_out}`,
    /// `residual.*`, `coefficient.{weight,bias}`, `shared.*`, `shared_gate.weight`. The
    /// routed experts' parameters are marked `expert` (DeepSpeed's MoE parameter group).
    /// DeepSeek-V3's correction bias is a buffer, not a parameter: see
    /// [`MoeLayer::update_correction_bias`].
    pub fn params_mut(&mut self) -> Vec<ParamMut<'_, B>> {
        let (gate_w, _, logit_bias) = self.gate.params_mut();
        let mut out = vec![ParamMut { name: "gate.weight".into(), expert: false, tensor: gate_w }];
        if let Some(t) = logit_bias {
            out.push(ParamMut { name: "gate.logit_bias".into(), expert: false, tensor: t });
        }
        for (name, t) in self.experts.params_mut() {
            let name = format!("experts.{name}");
            out.push(ParamMut { expert: is_expert_param(&name), name, tensor: t });
        }
        if let Some((m, cw, cb)) = &mut self.residual {
            for (name, t) in m.params_mut() {
                out.push(ParamMut { name: format!("residual.{name}"), expert: false, tensor: t });
            }
            out.push(ParamMut { name: "coefficient.weight".into(), expert: false, tensor: cw });
            out.push(ParamMut { name: "coefficient.bias".into(), expert: false, tensor: cb });
        }
        if let Some((m, g)) = &mut self.shared {
            for (name, t) in m.params_mut() {
                out.push(ParamMut { name: format!("shared.{name}"), expert: false, tensor: t });
            }
            if let Some(g) = g {
                out.push(ParamMut { name: "shared_gate.weight".into(), expert: false, tensor: g });
            }
        }
        if let Some(t) = &mut self.output_bias {
            out.push(ParamMut { name: "output_bias".into(), expert: false, tensor: t });
        }
        out
    }

    /// DeepSeek-V3's auxiliary-loss-free balancing after a step:
    /// `e_score_correction_bias += rate · sign(mean(counts) − counts)` with the routes per
    /// expert of that step. Errors for a gate without a correction bias.
    pub fn update_correction_bias(&mut self, b: &B, counts: &[i64], rate: f32) -> Result<()> {
        let Some(bias) = self.gate.params_mut().1 else {
            return Err(Error::config("bias_update", "the gate has no e_score_correction_bias"));
        };
        if counts.len() != self.spec.num_experts {
            return Err(Error::shape("counts", format!("[{}]", self.spec.num_experts), &[counts.len()]));
        }
        let mut v = b.download(bias)?.as_f32("e_score_correction_bias")?.to_vec();
        crate::losses::v3_bias_update(&mut v, counts, rate);
        *bias = b.upload(&HostTensor::f32(&[v.len()], v)?)?;
        Ok(())
    }

    /// Every weight downloaded to the host in the importers' layout
    /// ([`HostLayerWeights`]; routed experts: the ones this layer holds).
    pub fn download_weights(&self, b: &B) -> Result<HostLayerWeights> {
        let mlp = |m: &DeviceMlp<B>, dense: bool| -> Result<HostMlp> {
            let get = |t: &Tensor<B>| -> Result<HostTensor> {
                let h = b.download(t)?;
                if dense {
                    let mut shape = vec![1];
                    shape.extend_from_slice(h.shape());
                    h.reshape(&shape)
                } else {
                    Ok(h)
                }
            };
            Ok(HostMlp {
                w_in: get(&m.w_in)?,
                b_in: m.b_in.as_ref().map(get).transpose()?,
                w_out: m.w_out.as_ref().map(get).transpose()?,
                b_out: m.b_out.as_ref().map(get).transpose()?,
            })
        };
        let (gw, gb) = self.gate.params();
        Ok(HostLayerWeights {
            gate: b.download(gw)?,
            gate_bias: gb.map(|t| b.download(t)).transpose()?,
            router_bias: self.gate.logit_bias().map(|t| b.download(t)).transpose()?,
            output_bias: self.output_bias.as_ref().map(|t| b.download(t)).transpose()?,
            experts: mlp(&self.experts, false)?,
            residual: match &self.residual {
                Some((m, cw, cb)) => Some((mlp(m, true)?, b.download(cw)?, b.download(cb)?)),
                None => None,
            },
            shared: match &self.shared {
                Some((m, g)) => Some((mlp(m, true)?, g.as_ref().map(|g| b.download(g)).transpose()?)),
                None => None,
            },
        })
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
    /// routed output `routed`; `keep` keeps the pre-activations for a backward.
    fn add_dense_parts(
        &self,
        b: &B,
        x2: &Tensor<B>,
        routed: Tensor<B>,
        keep: bool,
    ) -> Result<(Tensor<B>, DenseActivations<B>)> {
        let mut y = routed.clone();
        let mut kept = DenseActivations { routed, residual: None, shared: None };
        if let Some((mlp, cw, cb)) = &self.residual {
            let dense = mlp.dense_kept(b, x2, keep)?;
            let coef = b.linear(x2, cw, Some(cb))?;
            y = b.residual_mix(&y, &dense.y, &coef)?;
            kept.residual = Some(DenseKept { out: dense.y, pre: dense.pre, mix: Some(coef) });
        }
        if let Some((mlp, gate_w)) = &self.shared {
            let dense = mlp.dense_kept(b, x2, keep)?;
            let g = gate_w.as_ref().map(|g| b.linear(x2, g, None)).transpose()?;
            y = b.add_gated(&y, &dense.y, g.as_ref())?;
            if self.shared_combine() == SharedCombine::Average {
                y = b.scale(&y, 0.5)?;
            }
            kept.shared = Some(DenseKept { out: dense.y, pre: dense.pre, mix: g });
        }
        Ok((y, kept))
    }

    /// Forward of `x` shaped `[S, M]` or `[B, T, M]` (Switch counts capacity per row of B).
    /// An expert-parallel layer runs it on every rank of its group together (the exchange
    /// is collective).
    pub fn forward(&self, b: &B, x: &Tensor<B>, opts: &LayerOptions) -> Result<LayerOutput<B>> {
        let Flat { x: x2, seq, shape } = self.flatten_input(x)?;
        let gate = self.gate.forward(b, &x2, seq, &opts.gate)?;
        let timed = opts.time_exchange;
        let scaled = self.spec.gate.scales_input();
        let Dispatched { xp, offsets, mut state } = self.dispatcher.dispatch(b, &x2, &gate.plan, timed, scaled)?;
        // Identity experts (LongCat-Flash): the plan's last groups run no weights; their
        // rows come back as they went.
        let z = self.spec.gate.identity_experts();
        let offsets = if z > 0 { offsets.with_tail(z) } else { offsets };
        let mut acts = self.experts.grouped(b, xp, &offsets, opts.keep_activations)?;
        if z > 0 {
            acts.yp = b.pass_rows(&acts.yp, &acts.xp, &offsets, self.spec.num_experts)?;
        }
        // Scaled inputs carried the weights: the outputs are summed unweighted.
        let y = self.dispatcher.combine(b, &acts.yp, &gate.plan, &mut state, timed, !scaled)?;
        let (y, dense) = self.add_dense_parts(b, &x2, y, opts.keep_activations)?;
        let y = match &self.output_bias {
            Some(bias) => b.add_bias(&y, bias)?,
            None => y,
        };
        Ok(LayerOutput { y: y.reshape(&shape)?, input: x2, dense, gate, experts: acts, dispatch: state })
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

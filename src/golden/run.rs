//! Running a case: build the gate or layer through the importers, run it forward on a
//! backend (or on several in-process expert-parallel ranks) and compare every expected
//! output.

use super::case::{Backward, Case, CaseKind, Loss, Output};
use super::trace::Trace;
use super::{rel_l2, CaseResult, OutputCheck};
use crate::backend::Backend;
use crate::config::GateSpec;
use crate::config::LayerSpec;
use crate::error::{Error, Result};
use crate::gate::Gate;
use crate::import::{deepspeed, hf, Checkpoint, NameMap};
use crate::layer::BackwardOptions;
use crate::layer::MoeLayer;
use crate::losses::LossCoefs;
use crate::options::{GateOptions, LayerOptions, NoiseOverrides};
use crate::parallel::{Communicator, ExpertParallel, Hierarchical, TokenLayout, Transport};
use crate::tensor::{DType, HostTensor};
use crate::weights::HostLayerWeights;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// The bound on every gradient's relative L2 error (f32: the error of a backward's
/// roundings, not of its semantics).
pub const GRAD_REL_L2: f64 = 1e-5;

/// Runs one case folder on backend `b` and compares every expected output.
/// A training trace ([`super::trace`]) is replayed step by step.
pub fn run_case<B: Backend>(b: &B, dir: &Path) -> Result<CaseResult> {
    if super::trace::is_trace(dir) {
        return super::trace::run_trace(b, dir);
    }
    run_case_on(b, &Case::load(dir)?, None, DType::F32)
}

/// As [`run_case`], with the expert (and shared-expert) weights stored in `weights`: f32,
/// or f16 / bf16 where the backend stores them (the router stays f32). With a half type
/// the forward's float outputs are held to that type's product tolerance
/// ([`crate::parity::half_tolerance`]) rather than the case's f32 one, exact outputs
/// (routing, counts) stay exact, and gradients are not compared: the f32 references'
/// gradients of ReLU and GELU experts move with the rounding of the weights (a kink
/// crossed), by more than any product tolerance, on the f32 path with the same rounded
/// weights too; the half-weight backward products are held to the f32 path by the parity
/// harness. Training traces replay in f32 only (mixed-precision training has its own
/// tests): a half type is [`Error::Unsupported`] for them.
pub fn run_case_in<B: Backend>(b: &B, dir: &Path, weights: DType) -> Result<CaseResult> {
    if weights == DType::F32 {
        return run_case(b, dir);
    }
    if super::trace::is_trace(dir) {
        return Err(Error::unsupported("training traces", format!("{weights} inference weights (they replay in f32)")));
    }
    run_case_on(b, &Case::load(dir)?, None, weights)
}

/// A case or a training trace, loaded.
enum Loaded {
    Case(Box<Case>),
    Trace(Box<Trace>),
}

/// Runs one case on `n` in-process ranks that all hold the case's whole batch, the
/// experts spread over them (the tensor-parallel arrangement: each rank sends its share
/// of the tokens to the experts' owners and the outputs are gathered after). `make(rank)`
/// builds each rank's backend. With `per_node` > 0 the ranks form nodes of that many and
/// exchange hierarchically (within nodes, then across). Returns every rank's result; `n`
/// must divide the experts. A rank that fails or panics makes the run an error (that
/// rank's, not its peers' timeouts), never a panic of the caller. A training trace runs
/// every step on the ranks, each stepping its own experts and the replicated rest.
pub fn run_case_ep<B, F>(
    make: F,
    dir: &Path,
    n: usize,
    per_node: usize,
    timeout: std::time::Duration,
) -> Result<Vec<CaseResult>>
where
    B: Backend,
    F: Fn(usize) -> Result<B> + Sync,
{
    if n == 0 {
        return Err(Error::config("ep", "at least one rank"));
    }
    let case = if super::trace::is_trace(dir) {
        Loaded::Trace(Box::new(Trace::load(dir)?))
    } else {
        Loaded::Case(Box::new(Case::load(dir)?))
    };
    let comms = crate::parallel::in_process(n, timeout);
    std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let (make, case) = (&make, &case);
                scope.spawn(move || {
                    let rank = comm.rank();
                    let body = || -> Result<CaseResult> {
                        let b = make(rank)?;
                        let transport: Arc<dyn Transport<B>> =
                            if per_node > 0 { Arc::new(Hierarchical::new(comm, per_node)?) } else { Arc::new(comm) };
                        match case {
                            Loaded::Case(c) => run_case_on(&b, c, Some(transport), DType::F32),
                            Loaded::Trace(t) => t.run(&b, Some(transport)),
                        }
                    };
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).unwrap_or_else(|p| {
                        let msg = p
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| p.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "(no message)".into());
                        Err(Error::Internal(format!("rank {rank} panicked: {msg}")))
                    })
                })
            })
            .collect();
        let results: Vec<Result<CaseResult>> = handles
            .into_iter()
            .enumerate()
            .map(|(r, h)| h.join().unwrap_or_else(|_| Err(Error::Internal(format!("rank {r} panicked")))))
            .collect();
        // When ranks fail, report the cause: a rank's own error rather than the peers'
        // "no answer from rank r" that follows it.
        if results.iter().any(Result::is_err) {
            let mut errors: Vec<Error> = results.into_iter().filter_map(Result::err).collect();
            let cause = errors.iter().position(|e| !matches!(e, Error::Communication { .. })).unwrap_or(0);
            return Err(errors.swap_remove(cause));
        }
        let results: Vec<CaseResult> = results.into_iter().collect::<Result<_>>()?;
        if let Loaded::Case(c) = &case {
            every_gradient_compared(c.as_ref(), &results)?;
        }
        Ok(results)
    })
}

/// Errors unless every reference gradient of `case` was compared on at least one rank
/// (each rank compares the experts it holds).
fn every_gradient_compared(case: &Case, ranks: &[CaseResult]) -> Result<()> {
    let Some(bw) = &case.meta.backward else { return Ok(()) };
    let compared: std::collections::BTreeSet<&str> =
        ranks.iter().flat_map(|r| r.outputs.iter().filter(|o| o.backward).map(|o| o.name.as_str())).collect();
    let expected = std::iter::once("dx").chain(bw.params.keys().map(String::as_str));
    if let Some(missing) = expected.map(|p| format!("d{p}")).find(|p| !compared.contains(p.as_str())) {
        return Err(Error::Internal(format!("case {}: gradient `{missing}` was compared on no rank", case.name)));
    }
    Ok(())
}

/// The forward options of a case: its mode, replayed noise (each flattened to
/// `[rows, last dim]`) and `used_token` mask.
fn options(case: &Case) -> Result<LayerOptions> {
    let m = &case.meta;
    let flat = |key: &Option<String>| -> Result<Option<HostTensor>> {
        key.as_ref()
            .map(|k| {
                let t = case.tensor(k)?.clone();
                let cols = t.shape().last().copied().unwrap_or(1).max(1);
                let rows = t.numel() / cols;
                t.reshape(&[rows, cols])
            })
            .transpose()
    };
    // One mask value per token: `[S]` or the token dims of `x` (`[B, T]`).
    let used_token = match &m.inputs.used_token {
        Some(k) => {
            let t = case.tensor(k)?.clone();
            let x = case.tensor(&m.inputs.x)?.shape();
            let tokens = &x[..x.len().saturating_sub(1)];
            let n: usize = tokens.iter().product();
            if t.shape() != [n] && t.shape() != tokens {
                return Err(Error::shape("used_token", format!("[{n}] or {tokens:?} (one per token of x)"), t.shape()));
            }
            Some(t.reshape(&[n])?)
        }
        None => None,
    };
    let noise = NoiseOverrides {
        jitter: flat(&m.noise.jitter)?,
        gumbel: flat(&m.noise.gumbel)?,
        rts: flat(&m.noise.rts_uniform)?,
    };
    Ok(LayerOptions { gate: GateOptions { mode: m.mode, seed: 0, noise, used_token }, ..Default::default() })
}

/// The layer spec and weights of a layer case, through the importer of its kind.
fn import_layer(case: &Case, kind: CaseKind, ck: &mut Checkpoint) -> Result<(LayerSpec, HostLayerWeights)> {
    let cfg = &case.meta.config;
    match kind {
        CaseKind::HfModel => {
            let (Some(dir), Some(layer)) = (&case.meta.model_dir, case.meta.layer) else {
                return Err(Error::case(&case.name, "an hf.model case needs `model_dir` and `layer`"));
            };
            hf::HfModel::open(&case.dir.join(dir))?.load_layer(layer)
        }
        CaseKind::DeepSpeedCheckpoint => super::ds_checkpoint::import_layer(case),
        CaseKind::Hf(family) => {
            let (fam, spec) = hf::layer_spec(cfg)?;
            if fam != family {
                return Err(Error::config("model_type", format!("does not match case kind `{}`", kind.name())));
            }
            let w = hf::layer_weights(ck, fam, &spec, "")?;
            Ok((spec, w))
        }
        _ => {
            let spec = deepspeed::layer_spec(cfg)?;
            let w = deepspeed::layer_weights(ck, &spec, "")?;
            Ok((spec, w))
        }
    }
}

/// Runs the backward of a case's forward for its loss and returns every gradient under
/// the case's names: `dx`, and each parameter's (read back through the importer's
/// [`NameMap`]).
fn backward_grads<B: Backend>(
    b: &B,
    case: &Case,
    kind: CaseKind,
    layer: &MoeLayer<B>,
    out: &crate::LayerOutput<B>,
    bw: &Backward,
) -> Result<BTreeMap<String, HostTensor>> {
    let dy = b.upload(case.tensor(&bw.dy)?)?;
    let l_aux = match bw.loss {
        Loss::Dot => 0.0,
        Loss::DotPlusAux => bw.aux_coef.unwrap_or(0.0),
    };
    let opts = BackwardOptions { losses: LossCoefs { l_aux, ..Default::default() } };
    let g = layer.backward(b, out, &dy, &opts)?;
    let dx = b.download(&g.dx)?;
    let e = layer.spec().num_experts;
    let mut engine = BTreeMap::new();
    for (name, t) in g.into_named() {
        let t = b.download(&t)?;
        // An expert-parallel rank holds its own experts' gradients: placed in a stack of
        // all of them, NaN where another rank's experts are.
        let t = match layer.local_experts() {
            Some(ids) if name.starts_with("experts.") => scatter_experts(&t, ids, e)?,
            _ => t,
        };
        engine.insert(name, t);
    }
    let names = NameMap::build(&case.params(), |ck| Ok(import_layer(case, kind, ck)?.1))?;
    let mut out = BTreeMap::new();
    out.insert("dx".to_string(), dx);
    for p in bw.params.keys() {
        let t = names.gather(&engine, p)?;
        let v = t.as_f32(p)?;
        match (v.iter().all(|x| x.is_nan()), v.iter().any(|x| x.is_nan())) {
            // Another rank's expert: compared there.
            (true, _) if !v.is_empty() => continue,
            (false, true) => return Err(Error::Internal(format!("gradient `{p}` is partly on another rank"))),
            _ => {
                out.insert(p.clone(), t);
            }
        }
    }
    Ok(out)
}

/// A stack of `e` experts with `t`'s matrices at the experts `ids` it holds, NaN elsewhere.
pub(super) fn scatter_experts(t: &HostTensor, ids: &[usize], e: usize) -> Result<HostTensor> {
    let per: usize = t.shape()[1..].iter().product();
    let v = t.as_f32("expert gradients")?;
    let mut full = vec![f32::NAN; e * per];
    for (j, &id) in ids.iter().enumerate() {
        if id >= e || (j + 1) * per > v.len() {
            return Err(Error::Internal(format!("local expert {j} (expert {id}) outside the stack")));
        }
        full[id * per..(id + 1) * per].copy_from_slice(&v[j * per..(j + 1) * per]);
    }
    let mut shape = t.shape().to_vec();
    shape[0] = e;
    HostTensor::f32(&shape, full)
}

fn run_case_on<B: Backend>(
    b: &B,
    case: &Case,
    ep: Option<Arc<dyn Transport<B>>>,
    weights: DType,
) -> Result<CaseResult> {
    let ep_backward = ep.is_some();
    let x = case.x()?;
    let opts = options(case)?;
    let cfg = &case.meta.config;
    let mut got: BTreeMap<Output, HostTensor> = BTreeMap::new();
    let mut grads: Option<BTreeMap<String, HostTensor>> = None;
    let counts = |v: &[i64]| HostTensor::i32(&[v.len()], v.iter().map(|&c| c as i32).collect());

    match case.meta.kind {
        CaseKind::DeepSpeedGate => {
            // A gate has no experts to spread: every rank of an expert-parallel run routes
            // the whole batch itself, as each DeepSpeed rank runs its own gate.
            let g = deepspeed::topk_gate_spec(cfg)?;
            let mut params = case.params();
            let w = params.take("wg.weight")?;
            params.finish("")?;
            let s = match x.shape()[..] {
                [s, _] => s,
                _ => return Err(Error::shape("inputs.x", "[tokens, model_dim] for a gate case", x.shape())),
            };
            let (e, m) = match w.shape()[..] {
                [e, m] => (e, m),
                _ => return Err(Error::shape("param/wg.weight", "[num_experts, model_dim]", w.shape())),
            };
            // `TopKGate(model_dim, num_experts, ...)`: both required.
            for (field, want) in [("num_experts", e), ("model_dim", m)] {
                let v: usize = crate::import::field(cfg, field)?;
                if v != want {
                    return Err(Error::config(field, format!("{v} does not match wg.weight {:?}", w.shape())));
                }
            }
            let gate = Gate::new(b, GateSpec::DeepSpeed(g), &w, None)?;
            let out = gate.forward(b, &b.upload(&x)?, s, &opts.gate)?;
            let (idx, loc, gates) = out.sparse_routes(b)?;
            let rep = out.report(b)?;
            let cap = i32::try_from(rep.capacity)
                .map_err(|_| Error::too_large("capacity", rep.capacity.to_string(), "the i32 the case stores it in"))?;
            got.insert(Output::Indices, idx);
            got.insert(Output::Locations, loc);
            got.insert(Output::Gates, gates);
            got.insert(Output::Capacity, HostTensor::i32(&[], vec![cap])?);
            got.insert(Output::ExpCounts, counts(&rep.exp_counts)?);
            got.insert(Output::LAux, HostTensor::scalar(rep.losses.l_aux as f32));
        }
        kind => {
            let (spec, host) = import_layer(case, kind, &mut case.params())?;
            let backward = case.meta.backward.as_ref().filter(|_| weights == DType::F32);
            let opts = LayerOptions { keep_activations: backward.is_some(), ..opts };
            let layer = match ep {
                None => MoeLayer::new(b, spec, &host, weights)?,
                Some(transport) => {
                    let ep = ExpertParallel::deepspeed(transport, spec.num_experts, TokenLayout::Replicated)?;
                    MoeLayer::new_ep(b, spec, &host, weights, ep)?
                }
            };
            let out = layer.forward(b, &b.upload(&x)?, &opts)?;
            let rep = out.report(b)?;
            got.insert(Output::Y, b.download(&out.y)?);
            got.insert(Output::RouterLogits, b.download(&out.gate.logits)?);
            got.insert(Output::LAux, HostTensor::scalar(rep.losses.l_aux as f32));
            got.insert(Output::ExpCounts, counts(&rep.exp_counts)?);
            if let Some(bw) = backward {
                grads = Some(backward_grads(b, case, kind, &layer, &out, bw)?);
            }
        }
    }
    compare(case, &got, grads.as_ref(), ep_backward, crate::parity::half_tolerance(weights))
}

/// Compares the outputs (and gradients) a run produced with the case's; `half_tol`, the
/// bound for a run with half-precision weights, replaces the f32 bounds where larger.
fn compare(
    case: &Case,
    got: &BTreeMap<Output, HostTensor>,
    grads: Option<&BTreeMap<String, HostTensor>>,
    ep: bool,
    half_tol: Option<f64>,
) -> Result<CaseResult> {
    let m = &case.meta;
    let rel_l2_bound = m.tolerance.rel_l2.max(half_tol.unwrap_or(0.0));
    // Gate cases: locations and gates are compared where the route was kept.
    let kept_mask: Option<Vec<bool>> = match m.expected.get(&Output::Indices) {
        Some(k) if m.kind == CaseKind::DeepSpeedGate => {
            Some(case.tensor(k)?.to_f64().iter().map(|&i| i >= 0.0).collect())
        }
        _ => None,
    };
    let mut outputs = Vec::new();
    for (&out, key) in &m.expected {
        let name = out.name();
        let want = case.tensor(key)?;
        let have = got
            .get(&out)
            .ok_or_else(|| Error::Internal(format!("case {}: the run produced no output `{name}`", case.name)))?;
        let (mut w, mut h) = (want.to_f64(), have.to_f64());
        if want.shape() != have.shape() {
            return Err(Error::case(
                &case.name,
                format!("expected `{name}` has shape {:?}; the run produced {:?}", want.shape(), have.shape()),
            ));
        }
        if let (Some(mask), Output::Locations | Output::Gates) = (&kept_mask, out) {
            if mask.len() != w.len() {
                return Err(Error::case(
                    &case.name,
                    format!("expected `{name}` has shape {:?}, not the shape of `indices`", want.shape()),
                ));
            }
            w = w.iter().zip(mask).filter(|(_, &k)| k).map(|(v, _)| *v).collect();
            h = h.iter().zip(mask).filter(|(_, &k)| k).map(|(v, _)| *v).collect();
        }
        let exact = m.tolerance.exact.contains(&out);
        let (error, pass) = if exact {
            let bad = w.iter().zip(&h).filter(|(a, b)| a != b).count();
            (bad as f64, bad == 0)
        } else {
            let e = rel_l2(&h, &w);
            (e, e <= rel_l2_bound)
        };
        outputs.push(OutputCheck { name: name.into(), error, exact, pass, backward: false });
    }
    let worst = outputs.iter().filter(|o| !o.exact).map(|o| o.error).fold(0.0, f64::max);
    let mut not_compared = Vec::new();
    let mut worst_grad = None;
    match (&m.backward, grads) {
        (Some(bw), Some(grads)) => {
            let expected = std::iter::once(("dx", &bw.dx)).chain(bw.params.iter().map(|(p, k)| (p.as_str(), k)));
            for (name, key) in expected {
                let want = case.tensor(key)?;
                let Some(have) = grads.get(name) else {
                    if ep {
                        // Another rank's expert: compared there (run_case_ep checks that
                        // every gradient was compared on some rank).
                        continue;
                    }
                    return Err(Error::Internal(format!("case {}: the backward produced no `{name}`", case.name)));
                };
                if want.numel() != have.numel() {
                    return Err(Error::case(
                        &case.name,
                        format!("gradient `{name}` has shape {:?}; the run produced {:?}", want.shape(), have.shape()),
                    ));
                }
                let e = rel_l2(&have.to_f64(), &want.to_f64());
                let pass = e <= GRAD_REL_L2;
                outputs.push(OutputCheck { name: format!("d{name}"), error: e, exact: false, pass, backward: true });
                worst_grad = Some(worst_grad.unwrap_or(0.0f64).max(e));
            }
        }
        (Some(bw), None) => not_compared.push(format!(
            "gradients of dx and {} parameters ({})",
            bw.params.len(),
            if half_tol.is_some() { "not compared with half-precision weights" } else { "no backward run" }
        )),
        (None, _) => {}
    }
    let pass = !outputs.is_empty() && outputs.iter().all(|o| o.pass);
    Ok(CaseResult {
        name: case.name.clone(),
        kind: m.kind.name(),
        outputs,
        worst_rel_l2: worst,
        worst_grad_rel_l2: worst_grad,
        pass,
        not_compared,
    })
}

//! Golden cases: reference results from DeepSpeed and HF transformers (see
//! `tests/golden/FORMAT.md`). [`run_case`] builds the case's gate or layer through the
//! importers, runs it forward on a backend and compares every expected output.

use crate::backend::Backend;
use crate::config::{GateSpec, Mode};
use crate::error::{Error, Result};
use crate::gate::Gate;
use crate::import::{deepspeed, hf, Checkpoint};
use crate::layer::{ForwardOptions, MoeLayer, NoiseOverrides};
use crate::tensor::{DType, HostTensor};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One compared output.
#[derive(Clone, Debug, serde::Serialize)]
pub struct OutputCheck {
    /// Output name (`y`, `indices`, ...).
    pub name: String,
    /// Relative L2 error for float outputs; mismatching elements for exact outputs.
    pub error: f64,
    /// Whether the comparison was exact.
    pub exact: bool,
    /// Whether it passed.
    pub pass: bool,
}

/// The result of one case.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CaseResult {
    /// Case name.
    pub name: String,
    /// Case kind.
    pub kind: String,
    /// Every compared output.
    pub outputs: Vec<OutputCheck>,
    /// The largest relative L2 error over float outputs.
    pub worst_rel_l2: f64,
    /// Whether every output passed.
    pub pass: bool,
}

/// Folders under `path` holding a `case.json` (or `path` itself), sorted.
pub fn discover(path: &Path) -> Result<Vec<PathBuf>> {
    if path.join("case.json").is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let rd = std::fs::read_dir(path).map_err(|e| Error::Io { path: path.display().to_string(), source: e })?;
    let mut out: Vec<PathBuf> =
        rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.join("case.json").is_file()).collect();
    out.sort();
    if out.is_empty() {
        return Err(Error::Invalid(format!("{}: no golden cases (folders with case.json) found", path.display())));
    }
    Ok(out)
}

/// Relative L2 error ‖a − b‖ / ‖b‖ (absolute when ‖b‖ = 0); NaN anywhere gives +inf.
pub fn rel_l2(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() || a.iter().chain(b).any(|x| x.is_nan()) {
        return f64::INFINITY;
    }
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    if den == 0.0 {
        num
    } else {
        num / den
    }
}

struct Case {
    name: String,
    kind: String,
    meta: Value,
    tensors: Checkpoint,
}

impl Case {
    fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("case.json");
        let text =
            std::fs::read_to_string(&path).map_err(|e| Error::Io { path: path.display().to_string(), source: e })?;
        let meta: Value =
            serde_json::from_str(&text).map_err(|e| Error::config(path.display().to_string(), e.to_string()))?;
        let tensors = Checkpoint::load(&dir.join("tensors.safetensors"))?;
        let name = meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_else(|| dir.file_name().and_then(|n| n.to_str()).unwrap_or("?"))
            .to_string();
        let kind = meta
            .get("kind")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::config("kind", "missing in case.json"))?
            .to_string();
        Ok(Case { name, kind, meta, tensors })
    }

    fn key(&self, section: &str, name: &str) -> Option<&str> {
        self.meta.get(section)?.get(name)?.as_str()
    }

    fn tensor(&self, section: &str, name: &str) -> Result<Option<HostTensor>> {
        match self.key(section, name) {
            Some(k) => Ok(Some(self.tensors.get(k)?.clone())),
            None => Ok(None),
        }
    }

    /// The case's parameters under their reference names (without `param/`).
    fn params(&self) -> Checkpoint {
        let map: BTreeMap<String, HostTensor> = self
            .tensors
            .names()
            .filter_map(|n| {
                n.strip_prefix("param/").map(|p| (p.to_string(), self.tensors.get(n).expect("listed").clone()))
            })
            .collect();
        Checkpoint::from_map(map, &format!("{} params", self.name))
    }

    fn options(&self) -> Result<ForwardOptions> {
        let mode = match self.meta.get("mode").and_then(Value::as_str) {
            Some("train") => Mode::Train,
            _ => Mode::Eval,
        };
        let flat = |t: Option<HostTensor>| -> Result<Option<HostTensor>> {
            t.map(|t| {
                let cols = *t.shape.last().unwrap_or(&1);
                let rows = t.numel() / cols.max(1);
                t.reshape(&[rows, cols])
            })
            .transpose()
        };
        Ok(ForwardOptions {
            mode,
            seed: 0,
            noise: NoiseOverrides {
                jitter: flat(self.tensor("noise", "jitter")?)?,
                gumbel: flat(self.tensor("noise", "gumbel")?)?,
                rts: flat(self.tensor("noise", "rts_uniform")?)?,
            },
            used_token: self.tensor("inputs", "used_token")?.map(|t| {
                let n = t.numel();
                t.reshape(&[n]).expect("same count")
            }),
            keep_activations: false,
        })
    }
}

/// Runs one case folder on backend `b` and compares every expected output.
pub fn run_case<B: Backend>(b: &B, dir: &Path) -> Result<CaseResult> {
    run_case_on(b, dir, None)
}

/// Runs one case on `n` in-process ranks that all hold the case's whole batch, the
/// experts spread over them (the tensor-parallel arrangement: each rank sends its share
/// of the tokens to the experts' owners and the outputs are gathered after). `make(rank)`
/// builds each rank's backend. With `per_node` > 0 the ranks form nodes of that many and
/// exchange hierarchically (within nodes, then across). Returns every rank's result; `n`
/// must divide the experts.
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
    let comms = crate::parallel::in_process(n, timeout);
    std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let make = &make;
                scope.spawn(move || -> Result<CaseResult> {
                    let b = make(crate::parallel::Communicator::rank(&comm))?;
                    if per_node > 0 {
                        let h = crate::parallel::Hierarchical::new(&comm, per_node)?;
                        run_case_on(&b, dir, Some(&h))
                    } else {
                        run_case_on(&b, dir, Some(&comm))
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(r, h)| {
                h.join().unwrap_or_else(|_| Err(Error::Communication { rank: r, msg: "rank panicked".into() }))
            })
            .collect()
    })
}

fn run_case_on<B: Backend>(b: &B, dir: &Path, ep: Option<&dyn crate::parallel::Communicator>) -> Result<CaseResult> {
    let case = Case::load(dir)?;
    let x = case.tensor("inputs", "x")?.ok_or_else(|| Error::config("inputs.x", "missing in case.json"))?;
    let opts = case.options()?;
    let cfg = case.meta.get("config").ok_or_else(|| Error::config("config", "missing in case.json"))?;
    let mut got: BTreeMap<String, HostTensor> = BTreeMap::new();
    let scalar = |v: f64| HostTensor::f32(&[], vec![v as f32]).expect("scalar");
    let counts = |v: &[i64]| HostTensor::i32(&[v.len()], v.iter().map(|&c| c as i32).collect()).expect("vector");

    match case.kind.as_str() {
        "deepspeed.gate" => {
            let g = deepspeed::topk_gate_spec(cfg)?;
            let mut params = case.params();
            let w = params.take("wg.weight")?;
            params.finish("")?;
            let gate = Gate::new(b, GateSpec::DeepSpeed(g), &w, None)?;
            let s = x.shape[0];
            let out = gate.forward(b, &b.upload(&x)?, s, &opts)?;
            let (idx, loc, gates) = out.sparse_routes(b)?;
            let rep = out.report(b)?;
            got.insert("indices".into(), idx);
            got.insert("locations".into(), loc);
            got.insert("gates".into(), gates);
            got.insert("capacity".into(), HostTensor::i32(&[], vec![rep.capacity as i32])?);
            got.insert("exp_counts".into(), counts(&rep.exp_counts));
            got.insert("l_aux".into(), scalar(rep.losses.l_aux));
        }
        kind => {
            let (spec, weights) = if kind == "deepspeed.moe" {
                let spec = deepspeed::layer_spec(cfg)?;
                let w = deepspeed::layer_weights(&mut case.params(), &spec, "")?;
                (spec, w)
            } else if let Some(family) = kind.strip_prefix("hf.") {
                let (fam, spec) = hf::layer_spec(cfg)?;
                if cfg.get("model_type").and_then(Value::as_str) != Some(family) {
                    return Err(Error::config("model_type", format!("does not match case kind `{kind}`")));
                }
                let w = hf::layer_weights(&mut case.params(), fam, &spec, "")?;
                (spec, w)
            } else {
                return Err(Error::config("kind", format!("unknown case kind `{kind}`")));
            };
            let out = match ep {
                None => MoeLayer::new(b, spec, &weights, DType::F32)?.forward(b, &b.upload(&x)?, &opts)?,
                Some(comm) => {
                    let layout = crate::parallel::EpLayout::new(spec.num_experts, comm.rank(), comm.size())?;
                    let layer = MoeLayer::new_ep(b, spec, &weights, DType::F32, layout)?;
                    layer.forward_ep(b, &b.upload(&x)?, &opts, comm, crate::parallel::TokenLayout::Replicated)?
                }
            };
            let rep = out.report(b)?;
            got.insert("y".into(), b.download(&out.y)?);
            got.insert("router_logits".into(), b.download(&out.gate.logits)?);
            got.insert("l_aux".into(), scalar(rep.losses.l_aux));
            got.insert("exp_counts".into(), counts(&rep.exp_counts));
        }
    }
    compare(&case, &got)
}

fn compare(case: &Case, got: &BTreeMap<String, HostTensor>) -> Result<CaseResult> {
    let tol = case.meta.get("tolerance").ok_or_else(|| Error::config("tolerance", "missing in case.json"))?;
    let rel_tol =
        tol.get("rel_l2").and_then(Value::as_f64).ok_or_else(|| Error::config("tolerance.rel_l2", "missing"))?;
    let exact: Vec<&str> = tol
        .get("exact")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let expected = case
        .meta
        .get("expected")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::config("expected", "missing in case.json"))?;
    let is_gate = case.kind == "deepspeed.gate";
    // Gate cases: locations and gates are compared where the route was kept.
    let kept_mask: Option<Vec<bool>> = if is_gate {
        let k = expected
            .get("indices")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::config("expected.indices", "missing"))?;
        Some(case.tensors.get(k)?.to_f64().iter().map(|&i| i >= 0.0).collect())
    } else {
        None
    };
    let mut outputs = Vec::new();
    for (name, key) in expected {
        let key = key.as_str().ok_or_else(|| Error::config(format!("expected.{name}"), "not a tensor key"))?;
        let want = case.tensors.get(key)?;
        let have = got
            .get(name)
            .ok_or_else(|| Error::Invalid(format!("case {}: the engine produces no output `{name}`", case.name)))?;
        let (mut w, mut h) = (want.to_f64(), have.to_f64());
        if w.len() != h.len() {
            return Err(Error::shape(format!("output `{name}`"), format!("{:?}", want.shape), &have.shape));
        }
        if let (Some(mask), true) = (&kept_mask, name == "locations" || name == "gates") {
            w = w.iter().zip(mask).filter(|(_, &m)| m).map(|(v, _)| *v).collect();
            h = h.iter().zip(mask).filter(|(_, &m)| m).map(|(v, _)| *v).collect();
        }
        let is_exact = exact.contains(&name.as_str());
        let (error, pass) = if is_exact {
            let bad = w.iter().zip(&h).filter(|(a, b)| a != b).count();
            (bad as f64, bad == 0)
        } else {
            let e = rel_l2(&h, &w);
            (e, e <= rel_tol)
        };
        outputs.push(OutputCheck { name: name.clone(), error, exact: is_exact, pass });
    }
    let worst = outputs.iter().filter(|o| !o.exact).map(|o| o.error).fold(0.0, f64::max);
    let pass = outputs.iter().all(|o| o.pass);
    Ok(CaseResult { name: case.name.clone(), kind: case.kind.clone(), outputs, worst_rel_l2: worst, pass })
}

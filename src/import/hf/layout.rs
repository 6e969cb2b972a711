//! Where a family keeps its MoE block's tensors, relative to the block's prefix, and how
//! they become the engine's [`HostLayerWeights`]: per-expert hub names, transformers-5's
//! fused stacks (gate rows first, or `[E, H, 2I]` columns, gpt-oss's interleaved), DBRX's
//! flat `[E·I, H]` matrices, and the shared-expert blocks beside them.

use super::super::checkpoint::{concat_rows, stack, Checkpoint};
use crate::config::LayerSpec;
use crate::error::{Error, Result};
use crate::tensor::HostTensor;
use crate::weights::{HostLayerWeights, HostMlp};

/// How the routed experts are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ExpertLayout {
    /// `experts.{e}.{gate|up|down}.weight` (`.bias` with biases); a checkpoint that holds
    /// transformers-5's fused `experts.gate_up_proj` `[E, 2I, H]` and `experts.down_proj`
    /// `[E, H, I]` instead is read too.
    PerExpert {
        /// Names of the gate, up and down projections (`w1, w3, w2` or `gate_proj, ...`).
        names: (&'static str, &'static str, &'static str),
    },
    /// One stack each: input `[E, 2I, H]` with the gate rows first, output `[E, H, I]`
    /// (Granite-MoE `input_linear`/`output_linear`, JetMoE).
    FusedRows {
        /// The input stack's name.
        input: &'static str,
        /// The output stack's name.
        output: &'static str,
    },
    /// `experts.gate_up_proj` `[E, H, 2I]` and `experts.down_proj` `[E, I, H]` (the
    /// transposes of the products' weights): Llama 4 with gate then up columns, gpt-oss
    /// with them interleaved (gate even, up odd) and with `_bias` tensors.
    FusedColumns {
        /// gate/up interleaved by column.
        interleaved: bool,
        /// `gate_up_proj_bias [E, 2I]` and `down_proj_bias [E, H]`.
        bias: bool,
    },
    /// DBRX: `experts.mlp.{w1, v1, w2}`, each `[E·I, H]`; the down product is `h · w2ₑ`.
    Dbrx,
}

/// How the shared experts are stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SharedLayout {
    /// Their prefix, relative to the block's (or to the decoder layer's: `outside`).
    pub dir: &'static str,
    /// Whether `dir` is relative to the decoder layer rather than the block (Granite-MoE
    /// shared: `shared_mlp` sits beside `block_sparse_moe`).
    pub outside: bool,
    /// Per-block names, or `None` for Granite's fused `input_linear [2S, H]` (gate
    /// first) and `output_linear [H, S]`.
    pub names: Option<(&'static str, &'static str, &'static str)>,
    /// The sigmoid gate's weight `[1, H]`, relative to the block's prefix.
    pub gate: Option<&'static str>,
}

/// Every tensor of a family's MoE block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BlockLayout {
    /// The router weight `[E (+ Z), H]`.
    pub router: &'static str,
    /// The router's logit bias `[E]` (gpt-oss).
    pub router_bias: Option<&'static str>,
    /// A router bias the reference never reads (LongCat-Flash's `classifier.bias` when
    /// `router_bias` is set): consumed so it is not reported unused.
    pub ignored: Option<&'static str>,
    /// The selection bias `[E]` (or `[1, E]`, ERNIE 4.5).
    pub selection_bias: Option<&'static str>,
    /// The routed experts.
    pub experts: ExpertLayout,
    /// The shared experts.
    pub shared: Option<SharedLayout>,
    /// The output bias `[H]` (JetMoE).
    pub output_bias: Option<&'static str>,
}

/// The block's tensors under `prefix` (the decoder layer's prefix is `layer_prefix`),
/// checked against `spec`. Unused tensors under the block's prefix are an error.
pub(crate) fn read_block(
    ck: &mut Checkpoint,
    layout: &BlockLayout,
    spec: &LayerSpec,
    prefix: &str,
    layer_prefix: &str,
) -> Result<HostLayerWeights> {
    let (e, m, f) = (spec.num_experts, spec.hidden, spec.expert.ffn);
    let scored = e + spec.gate.identity_experts();
    // The router first: its shape checks the config's expert count against the
    // checkpoint before any per-expert name is built.
    let gate = ck.take_shaped(&format!("{prefix}{}", layout.router), &[scored, m])?;
    let router_bias = layout.router_bias.map(|n| ck.take_shaped(&format!("{prefix}{n}"), &[scored])).transpose()?;
    if let Some(n) = layout.ignored {
        ck.take_opt(&format!("{prefix}{n}"));
    }
    let gate_bias = match layout.selection_bias {
        Some(n) => {
            let name = format!("{prefix}{n}");
            let t = ck.take(&name)?;
            // ERNIE 4.5 keeps it as `[1, E]` (one expert group).
            if t.shape() != [scored] && t.shape() != [1, scored] {
                return Err(Error::shape(name, format!("[{scored}] or [1, {scored}]"), t.shape()));
            }
            Some(t.reshape(&[scored])?)
        }
        None => None,
    };
    let bias = spec.expert.bias;
    let experts = match layout.experts {
        ExpertLayout::PerExpert { names } => {
            let fused = format!("{prefix}experts.gate_up_proj");
            if ck.contains(&fused) && !bias {
                let w_in = ck.take_shaped(&fused, &[e, 2 * f, m])?;
                let w_out = ck.take_shaped(&format!("{prefix}experts.down_proj"), &[e, m, f])?;
                HostMlp { w_in, b_in: None, w_out: Some(w_out), b_out: None }
            } else {
                let prefixes: Vec<String> = (0..e).map(|i| format!("{prefix}experts.{i}.")).collect();
                let mlp = hub_glu(ck, names, &prefixes, f, m, bias)?;
                // transformers allocates gate/up projections for the identity experts too
                // (LongCat-Flash's gate_up_proj spans E + Z) and never reads them.
                for i in e..scored {
                    for n in [names.0, names.1, names.2] {
                        ck.take_opt(&format!("{prefix}experts.{i}.{n}.weight"));
                    }
                }
                mlp
            }
        }
        ExpertLayout::FusedRows { input, output } => HostMlp {
            w_in: ck.take_shaped(&format!("{prefix}{input}"), &[e, 2 * f, m])?,
            b_in: None,
            w_out: Some(ck.take_shaped(&format!("{prefix}{output}"), &[e, m, f])?),
            b_out: None,
        },
        ExpertLayout::FusedColumns { interleaved, bias: has_bias } => {
            let gu_name = format!("{prefix}experts.gate_up_proj");
            let gu = ck.take_shaped(&gu_name, &[e, m, 2 * f])?;
            let mut w_in = transpose_last(&gu, &gu_name)?;
            let down_name = format!("{prefix}experts.down_proj");
            let w_out = transpose_last(&ck.take_shaped(&down_name, &[e, f, m])?, &down_name)?;
            let (mut b_in, mut b_out) = (None, None);
            if has_bias {
                b_in = Some(ck.take_shaped(&format!("{prefix}experts.gate_up_proj_bias"), &[e, 2 * f])?);
                b_out = Some(ck.take_shaped(&format!("{prefix}experts.down_proj_bias"), &[e, m])?);
            }
            if interleaved {
                w_in = deinterleave_rows(&w_in, &gu_name)?;
                b_in = b_in
                    .map(|b| deinterleave_rows(&b.reshape(&[e, 2 * f, 1])?, &gu_name)?.reshape(&[e, 2 * f]))
                    .transpose()?;
            }
            HostMlp { w_in, b_in, w_out: Some(w_out), b_out }
        }
        ExpertLayout::Dbrx => {
            let flat = |ck: &mut Checkpoint, n: &str| -> Result<HostTensor> {
                ck.take_shaped(&format!("{prefix}experts.mlp.{n}"), &[e * f, m])?.reshape(&[e, f, m])
            };
            let (w1, v1) = (flat(ck, "w1")?, flat(ck, "v1")?);
            let w2 = flat(ck, "w2")?;
            HostMlp {
                w_in: concat_rows(&w1, &v1, "experts.mlp.v1")?,
                b_in: None,
                w_out: Some(transpose_last(&w2, "experts.mlp.w2")?),
                b_out: None,
            }
        }
    };
    let shared = match (&layout.shared, &spec.shared) {
        (Some(sl), Some(s)) => {
            let dir = if sl.outside { format!("{layer_prefix}{}", sl.dir) } else { format!("{prefix}{}", sl.dir) };
            let ffn = s.expert.ffn;
            let mlp = match sl.names {
                Some(names) => hub_glu(ck, names, std::slice::from_ref(&dir), ffn, m, s.expert.bias)?,
                None => HostMlp {
                    w_in: ck.take_shaped(&format!("{dir}input_linear.weight"), &[2 * ffn, m])?.reshape(&[
                        1,
                        2 * ffn,
                        m,
                    ])?,
                    b_in: None,
                    w_out: Some(
                        ck.take_shaped(&format!("{dir}output_linear.weight"), &[m, ffn])?.reshape(&[1, m, ffn])?,
                    ),
                    b_out: None,
                },
            };
            let gate_w = match (sl.gate, s.gated) {
                (Some(g), true) => Some(ck.take_shaped(&format!("{prefix}{g}"), &[1, m])?),
                _ => None,
            };
            Some((mlp, gate_w))
        }
        (Some(sl), None) => {
            // With zero shared experts HF still writes zero-size shared MLP tensors (and
            // Qwen2-MoE its shared_expert_gate); they contribute nothing.
            let dir = if sl.outside { format!("{layer_prefix}{}", sl.dir) } else { format!("{prefix}{}", sl.dir) };
            let empty: Vec<String> = ck
                .names()
                .filter(|n| n.starts_with(&dir) && ck.shape(n).is_some_and(|s| s.contains(&0)))
                .map(String::from)
                .collect();
            for n in &empty {
                ck.take(n)?;
            }
            if !empty.is_empty() {
                if let Some(g) = sl.gate {
                    ck.take_opt(&format!("{prefix}{g}"));
                }
            }
            None
        }
        (None, Some(_)) => return Err(Error::Internal("a shared-expert spec for a family without them".into())),
        (None, None) => None,
    };
    let output_bias = layout.output_bias.map(|n| ck.take_shaped(&format!("{prefix}{n}"), &[m])).transpose()?;
    ck.finish(prefix)?;
    if let Some(sl) = layout.shared.as_ref().filter(|s| s.outside) {
        ck.finish(&format!("{layer_prefix}{}", sl.dir))?;
    }
    let w = HostLayerWeights { gate, gate_bias, router_bias, output_bias, experts, residual: None, shared };
    w.validate(spec)?;
    Ok(w)
}

/// Reads a GLU block in hub layout under each prefix (`{prefix}{gate}.weight`, ...), with
/// `.bias` tensors when `bias`.
pub(crate) fn hub_glu(
    ck: &mut Checkpoint,
    (g, u, d): (&str, &str, &str),
    prefixes: &[String],
    ffn: usize,
    hidden: usize,
    bias: bool,
) -> Result<HostMlp> {
    let (mut gs, mut us, mut ds) = (Vec::new(), Vec::new(), Vec::new());
    let (mut gb, mut ub, mut db) = (Vec::new(), Vec::new(), Vec::new());
    for p in prefixes {
        gs.push(ck.take_shaped(&format!("{p}{g}.weight"), &[ffn, hidden])?);
        us.push(ck.take_shaped(&format!("{p}{u}.weight"), &[ffn, hidden])?);
        ds.push(ck.take_shaped(&format!("{p}{d}.weight"), &[hidden, ffn])?);
        if bias {
            gb.push(ck.take_shaped(&format!("{p}{g}.bias"), &[ffn])?);
            ub.push(ck.take_shaped(&format!("{p}{u}.bias"), &[ffn])?);
            db.push(ck.take_shaped(&format!("{p}{d}.bias"), &[hidden])?);
        }
    }
    let w_in = concat_rows(&stack(gs, g)?, &stack(us, u)?, u)?;
    let (b_in, b_out) = if bias {
        // [E, ffn] gate biases then up biases, as the fused input projection's rows.
        let n = gb.len();
        let (g2, u2) = (stack(gb, g)?.reshape(&[n, ffn, 1])?, stack(ub, u)?.reshape(&[n, ffn, 1])?);
        (Some(concat_rows(&g2, &u2, u)?.reshape(&[n, 2 * ffn])?), Some(stack(db, d)?))
    } else {
        (None, None)
    };
    Ok(HostMlp { w_in, b_in, w_out: Some(stack(ds, d)?), b_out })
}

/// `[E, A, B]` → `[E, B, A]`.
fn transpose_last(t: &HostTensor, name: &str) -> Result<HostTensor> {
    let (e, a, b) = match t.shape()[..] {
        [e, a, b] => (e, a, b),
        _ => return Err(Error::shape(name, "[experts, rows, cols]", t.shape())),
    };
    let v = t.as_f32(name)?;
    let mut out = vec![0f32; v.len()];
    for x in 0..e {
        let base = x * a * b;
        for i in 0..a {
            for j in 0..b {
                out[base + j * a + i] = v[base + i * b + j];
            }
        }
    }
    HostTensor::f32(&[e, b, a], out)
}

/// `[E, 2I, K]` with gate and up rows interleaved (gate even, up odd) → gate rows first.
fn deinterleave_rows(t: &HostTensor, name: &str) -> Result<HostTensor> {
    let (e, two_i, k) = match t.shape()[..] {
        [e, r, k] if r % 2 == 0 => (e, r, k),
        _ => return Err(Error::shape(name, "[experts, 2 · intermediate, cols]", t.shape())),
    };
    let v = t.as_f32(name)?;
    let i = two_i / 2;
    let mut out = vec![0f32; v.len()];
    for x in 0..e {
        let base = x * two_i * k;
        for r in 0..two_i {
            let dst = if r % 2 == 0 { r / 2 } else { i + r / 2 };
            out[base + dst * k..base + (dst + 1) * k].copy_from_slice(&v[base + r * k..base + (r + 1) * k]);
        }
    }
    HostTensor::f32(&[e, two_i, k], out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaved_columns_become_gate_then_up_rows() {
        // One expert, H = 2, I = 2: columns [g0 u0 g1 u1] of [H, 2I].
        let t = HostTensor::f32(&[1, 2, 4], vec![1., 10., 2., 20., 3., 30., 4., 40.]).unwrap();
        let rows = deinterleave_rows(&transpose_last(&t, "t").unwrap(), "t").unwrap();
        // Rows g0, g1, u0, u1, each over H.
        assert_eq!(rows.as_f32("r").unwrap(), &[1., 3., 2., 4., 10., 30., 20., 40.]);
    }
}

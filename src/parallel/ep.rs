//! The expert-parallel layer forward: plan → exchange counts → exchange rows → local
//! experts → exchange back → combine, with the rows staged through the host.

use super::comm::{all_to_all_v_f32, all_to_all_v_i32, Communicator};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::layer::{ExpertActivations, LayerOutput, MoeLayer};
use crate::ops::Offsets;
use crate::options::LayerOptions;
use crate::tensor::HostTensor;
use std::ops::Range;

/// This rank's place in an expert-parallel group of `size` contiguous ranks: global
/// expert `e` lives on rank `e / (E / size)` (DeepSpeed's placement).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpLayout {
    /// This rank, `0..size`.
    pub rank: usize,
    /// `ep_size`: ranks the experts are spread over.
    pub size: usize,
    /// Experts in the layer.
    pub num_experts: usize,
}

impl EpLayout {
    /// Checks that `size` divides the experts and `rank < size`.
    pub fn new(num_experts: usize, rank: usize, size: usize) -> Result<Self> {
        if size == 0 || !num_experts.is_multiple_of(size) {
            return Err(Error::config(
                "ep_size",
                format!("{size} ranks must divide the {num_experts} experts (DeepSpeed requires num_experts % ep_size == 0)"),
            ));
        }
        if rank >= size {
            return Err(Error::config("rank", format!("rank {rank} in a group of {size}")));
        }
        Ok(EpLayout { rank, size, num_experts })
    }

    /// Experts per rank.
    pub fn per_rank(&self) -> usize {
        self.num_experts / self.size
    }

    /// The global experts this rank holds.
    pub fn local(&self) -> Range<usize> {
        self.rank * self.per_rank()..(self.rank + 1) * self.per_rank()
    }

    /// The rank holding global expert `e`.
    pub fn owner(&self, e: usize) -> usize {
        e / self.per_rank()
    }
}

/// Expert slots spread over the ranks from an EPLB plan: hot experts have several
/// replicas, and a route to a replicated expert goes to replica `token % replicas`.
/// Made by [`Placement::new`] or [`Placement::from_plan`], which check that every expert
/// has a slot and every slot an expert.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    phy2log: Vec<usize>,
    replicas: Vec<Vec<usize>>,
    slots_per_rank: usize,
}

impl Placement {
    /// The placement of `num_experts` experts given the logical expert of every physical
    /// slot, the slots split evenly over `ranks` ranks (slot `p` on rank
    /// `p / (slots / ranks)`).
    pub fn new(phy2log: Vec<usize>, ranks: usize, num_experts: usize) -> Result<Self> {
        if ranks == 0 || phy2log.is_empty() || !phy2log.len().is_multiple_of(ranks) {
            return Err(Error::config("ep_size", format!("{} slots do not split over {ranks} ranks", phy2log.len())));
        }
        let mut replicas = vec![Vec::new(); num_experts];
        for (p, &l) in phy2log.iter().enumerate() {
            let slot = replicas.get_mut(l).ok_or_else(|| {
                Error::config("placement", format!("slot {p} holds expert {l} of only {num_experts}"))
            })?;
            slot.push(p);
        }
        if let Some(missing) = replicas.iter().position(Vec::is_empty) {
            return Err(Error::config("placement", format!("expert {missing} has no slot")));
        }
        Ok(Placement { slots_per_rank: phy2log.len() / ranks, phy2log, replicas })
    }

    /// Layer `layer` of an EPLB plan over `ranks` ranks (one rank per GPU of the plan).
    pub fn from_plan(plan: &super::EplbPlan, layer: usize, ranks: usize) -> Result<Self> {
        let phy2log = plan
            .phy2log
            .get(layer)
            .ok_or_else(|| Error::config("layer", format!("the plan has no layer {layer}")))?
            .clone();
        Self::new(phy2log, ranks, plan.logcnt[layer].len())
    }

    /// The logical experts of `rank`'s slots, in slot order (empty past the last rank).
    pub fn local(&self, rank: usize) -> &[usize] {
        self.phy2log.get(rank * self.slots_per_rank..(rank + 1) * self.slots_per_rank).unwrap_or(&[])
    }

    /// Logical expert of every physical slot.
    pub fn phy2log(&self) -> &[usize] {
        &self.phy2log
    }

    /// The slots of each logical expert (never empty).
    pub fn replicas(&self) -> &[Vec<usize>] {
        &self.replicas
    }

    /// Slots per rank.
    pub fn slots_per_rank(&self) -> usize {
        self.slots_per_rank
    }

    /// Ranks the slots are spread over.
    pub fn ranks(&self) -> usize {
        self.phy2log.len() / self.slots_per_rank
    }
}

/// How the batch is spread over the ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenLayout {
    /// Every rank holds the same tokens (tensor-parallel ranks, DeepSpeed-MoE's
    /// parallelism-coordinated exchange): each sends only its share of them to the
    /// experts (`drop_tokens`), and the outputs are gathered after (`gather_tokens`), so
    /// every rank ends with the whole output.
    Replicated,
    /// Each rank holds its own tokens (data parallel): each gates and drops on its own
    /// tokens, and its output equals a single-rank run on its shard. The exchange is
    /// variable-size, so no capacity needs agreeing across the group.
    Sharded,
}

/// Contiguous share `rank` of `n` items over `size` ranks (sizes differ by at most one).
fn share(n: usize, rank: usize, size: usize) -> Range<usize> {
    rank * n / size..(rank + 1) * n / size
}

impl<B: Backend> MoeLayer<B> {
    /// The layer forward across an expert-parallel group: this rank runs the gate, sends
    /// each kept route's row to the rank owning its expert, runs its local experts on what
    /// arrives, sends the results back and combines them. The layer must come from
    /// [`MoeLayer::new_ep`] with the communicator's rank and size.
    pub fn forward_ep(
        &self,
        b: &B,
        x: &crate::device::Tensor<B>,
        opts: &LayerOptions,
        comm: &dyn Communicator,
        tokens: TokenLayout,
    ) -> Result<LayerOutput<B>> {
        let ep = self.ep.ok_or_else(|| Error::Misuse("forward_ep on a layer built without MoeLayer::new_ep".into()))?;
        if comm.rank() != ep.rank || comm.size() != ep.size {
            return Err(Error::Misuse(format!(
                "communicator rank {} of {} does not match the layer's expert layout (rank {} of {})",
                comm.rank(),
                comm.size(),
                ep.rank,
                ep.size
            )));
        }
        let crate::layer::Flat { x: x2, s, m, seq, shape } = self.flatten_input(x)?;
        let gate = self.gate.forward(b, &x2, seq, &opts.gate)?;
        let k = gate.plan.rows.shape()[1];
        let rows = b.download(&gate.plan.rows)?.into_i32("plan.rows")?;
        let weights = b.download(&gate.plan.weights)?.into_f32("plan.weights")?;
        let experts = b.download(&gate.routes.experts)?.into_i32("routes.experts")?;
        let xh = b.download(&x2)?.into_f32("x")?;
        let placement = self.placement.as_ref();
        let per = placement.map_or(ep.per_rank(), |p| p.slots_per_rank());
        // (owner rank, local slot) of a route of token t to expert e.
        let target = |t: usize, e: usize| -> (usize, usize) {
            match placement {
                Some(p) => {
                    let reps = &p.replicas()[e];
                    let slot = reps[t % reps.len()];
                    (slot / p.slots_per_rank(), slot % p.slots_per_rank())
                }
                None => (ep.owner(e), e % per),
            }
        };
        let mine = match tokens {
            TokenLayout::Replicated => share(s, ep.rank, ep.size),
            TokenLayout::Sharded => 0..s,
        };

        // This rank's kept routes in compact-row (expert-major) order, bucketed by owner.
        let mut kept: Vec<(i32, usize)> = mine
            .clone()
            .flat_map(|t| (0..k).map(move |j| t * k + j))
            .filter(|&r| rows[r] >= 0)
            .map(|r| (rows[r], r))
            .collect();
        kept.sort_unstable();
        let mut send_x: Vec<Vec<f32>> = vec![Vec::new(); ep.size];
        let mut send_e: Vec<Vec<i32>> = vec![Vec::new(); ep.size];
        let mut sent: Vec<Vec<usize>> = vec![Vec::new(); ep.size];
        for &(_, r) in &kept {
            let (t, e) = (r / k, experts[r] as usize);
            let (dst, slot) = target(t, e);
            send_e[dst].push(slot as i32);
            send_x[dst].extend_from_slice(&xh[t * m..(t + 1) * m]);
            sent[dst].push(r);
        }
        let recv_e = all_to_all_v_i32(comm, send_e)?;
        let recv_x = all_to_all_v_f32(comm, send_x)?;

        // What arrived, in compact layout: by local expert, then source rank, then order.
        let mut arrived: Vec<(i32, usize, usize)> = recv_e
            .iter()
            .enumerate()
            .flat_map(|(src, es)| es.iter().enumerate().map(move |(i, &le)| (le, src, i)))
            .collect();
        arrived.sort_unstable();
        let mut offsets = vec![0i32; per + 1];
        for &(le, _, _) in &arrived {
            if le < 0 || le as usize >= per {
                return Err(Error::Communication {
                    rank: ep.rank,
                    msg: format!("received a row for local expert {le} of {per}"),
                });
            }
            offsets[le as usize + 1] += 1;
        }
        for i in 0..per {
            offsets[i + 1] += offsets[i];
        }
        let mut xp = Vec::with_capacity(arrived.len() * m);
        for &(_, src, i) in &arrived {
            let row = recv_x[src].get(i * m..(i + 1) * m).ok_or_else(|| Error::Communication {
                rank: ep.rank,
                msg: format!("rank {src} sent fewer rows than expert ids"),
            })?;
            xp.extend_from_slice(row);
        }
        let xp_t = b.upload(&HostTensor::f32(&[arrived.len(), m], xp)?)?;
        let off_t = Offsets::from_host(b, &offsets)?;
        let acts = self.experts.grouped(b, xp_t, &off_t, opts.keep_activations)?;
        let yp = b.download(&acts.yp)?.into_f32("expert outputs")?;

        // Results go back to their sources in the order the sources sent them.
        let mut back: Vec<Vec<f32>> = recv_e.iter().map(|es| vec![0f32; es.len() * m]).collect();
        for (pos, &(_, src, i)) in arrived.iter().enumerate() {
            back[src][i * m..(i + 1) * m].copy_from_slice(&yp[pos * m..(pos + 1) * m]);
        }
        let ret = all_to_all_v_f32(comm, back)?;
        let mut result_of: Vec<Option<(usize, usize)>> = vec![None; s * k];
        for (dst, routes) in sent.iter().enumerate() {
            if ret[dst].len() != routes.len() * m {
                return Err(Error::Communication {
                    rank: ep.rank,
                    msg: format!("rank {dst} returned {} values for {} rows", ret[dst].len(), routes.len()),
                });
            }
            for (i, &r) in routes.iter().enumerate() {
                result_of[r] = Some((dst, i));
            }
        }

        // Combine this rank's tokens, routes in order, f32 (as the combine op does).
        let mut y_mine = vec![0f32; mine.len() * m];
        for (ti, t) in mine.clone().enumerate() {
            let o = &mut y_mine[ti * m..(ti + 1) * m];
            for j in 0..k {
                let r = t * k + j;
                if let Some((dst, i)) = result_of[r] {
                    let src = &ret[dst][i * m..(i + 1) * m];
                    for (oc, &v) in o.iter_mut().zip(src) {
                        *oc += weights[r] * v;
                    }
                }
            }
        }
        let y_host = match tokens {
            TokenLayout::Sharded => y_mine,
            TokenLayout::Replicated => {
                let parts = comm.all_gather(bytemuck::cast_slice(&y_mine).to_vec())?;
                let mut all = Vec::with_capacity(s * m);
                for p in parts {
                    all.extend(bytemuck::pod_collect_to_vec::<u8, f32>(&p));
                }
                if all.len() != s * m {
                    return Err(Error::Communication {
                        rank: ep.rank,
                        msg: "gathered output has the wrong size".into(),
                    });
                }
                all
            }
        };
        let y = b.upload(&HostTensor::f32(&[s, m], y_host)?)?;
        let y = self.add_dense_parts(b, &x2, y)?;
        let experts = ExpertActivations { xp: acts.xp, pre_activation: acts.pre_activation, yp: acts.yp };
        Ok(LayerOutput { y: y.reshape(&shape)?, gate, experts })
    }
}

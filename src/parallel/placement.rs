//! Where the experts of an expert-parallel layer live: [`Placement`].

use super::eplb::EplbPlan;
use crate::error::{Error, Result};

/// Where the experts live: physical expert slots spread evenly over the ranks, each
/// holding one logical expert. DeepSpeed's layout gives expert `e` slot `e`
/// ([`Placement::contiguous`]: rank `e / (E / ep_size)`); an EPLB plan gives hot experts
/// several replicas ([`Placement::from_plan`]), and a route to a replicated expert goes to
/// replica `token % replicas`. Every constructor checks that every expert has a slot and
/// every slot an expert.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    phy2log: Vec<usize>,
    replicas: Vec<Vec<usize>>,
    slots_per_rank: usize,
}

impl Placement {
    /// DeepSpeed's placement of `num_experts` experts over `ranks` ranks: contiguous
    /// blocks of `num_experts / ranks`, which `ranks` must divide.
    pub fn contiguous(num_experts: usize, ranks: usize) -> Result<Self> {
        if ranks == 0 || !num_experts.is_multiple_of(ranks) {
            return Err(Error::config(
                "ep_size",
                format!("{ranks} ranks must divide the {num_experts} experts (DeepSpeed requires num_experts % ep_size == 0)"),
            ));
        }
        Self::new((0..num_experts).collect(), ranks, num_experts)
    }

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
    pub fn from_plan(plan: &EplbPlan, layer: usize, ranks: usize) -> Result<Self> {
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

//! Hierarchical all-to-all (DeepSpeed-MoE's and Tutel's 2D exchange): ranks are `nodes ×
//! per_node`, rank = node · per_node + local. Phase 1 exchanges within each node, so the
//! rank with local index l collects everything its node sends to local index l of any
//! node; phase 2 exchanges between the ranks with the same local index across nodes. The
//! slow inter-node links then carry one aggregated message per node pair and local index
//! instead of one per rank pair.

use super::comm::Communicator;
use crate::error::{Error, Result};

/// A communicator whose `all_to_all_v` runs in the two phases above over `inner`; every
/// other collective is `inner`'s. Over a flat in-process group the phases are flat
/// exchanges in which only the phase's peers receive data (how the tests simulate
/// nodes); over a transport with sub-groups each phase runs on its own group.
pub struct Hierarchical<'a> {
    inner: &'a dyn Communicator,
    per_node: usize,
}

impl<'a> Hierarchical<'a> {
    /// `per_node` ranks per node; it must divide the group size.
    pub fn new(inner: &'a dyn Communicator, per_node: usize) -> Result<Self> {
        if per_node == 0 || !inner.size().is_multiple_of(per_node) {
            return Err(Error::config(
                "ranks_per_node",
                format!("{per_node} does not divide the {} ranks", inner.size()),
            ));
        }
        Ok(Hierarchical { inner, per_node })
    }
}

fn pack(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.len() + 8).sum());
    for p in parts {
        out.extend_from_slice(&(p.len() as u64).to_le_bytes());
        out.extend_from_slice(p);
    }
    out
}

fn unpack(mut b: &[u8], n: usize, rank: usize) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let bad = || Error::Communication { rank, msg: "hierarchical all_to_all_v: truncated bundle".into() };
        let len = u64::from_le_bytes(b.get(..8).ok_or_else(bad)?.try_into().map_err(|_| bad())?) as usize;
        out.push(b.get(8..8 + len).ok_or_else(bad)?.to_vec());
        b = &b[8 + len..];
    }
    Ok(out)
}

impl Communicator for Hierarchical<'_> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn size(&self) -> usize {
        self.inner.size()
    }

    fn all_to_all_v(&self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        let (size, l_n, me) = (self.size(), self.per_node, self.rank());
        if send.len() != size {
            return Err(Error::Communication { rank: me, msg: format!("{} buffers for {size} ranks", send.len()) });
        }
        let nodes = size / l_n;
        let (node, local) = (me / l_n, me % l_n);
        // Phase 1, within the node: to local rank l go my messages for (every node, l).
        let mut phase1 = vec![Vec::new(); size];
        for l in 0..l_n {
            let parts: Vec<&[u8]> = (0..nodes).map(|n| send[n * l_n + l].as_slice()).collect();
            phase1[node * l_n + l] = pack(&parts);
        }
        let got1 = self.inner.all_to_all_v(phase1)?;
        // from_src[l_src][n]: what (node, l_src) sends to (n, local).
        let from_src: Vec<Vec<Vec<u8>>> =
            (0..l_n).map(|l| unpack(&got1[node * l_n + l], nodes, me)).collect::<Result<_>>()?;
        // Phase 2, across nodes: to (n, local) go my node's messages for it.
        let mut phase2 = vec![Vec::new(); size];
        for n in 0..nodes {
            let parts: Vec<&[u8]> = (0..l_n).map(|l| from_src[l][n].as_slice()).collect();
            phase2[n * l_n + local] = pack(&parts);
        }
        let got2 = self.inner.all_to_all_v(phase2)?;
        let mut out = vec![Vec::new(); size];
        for n in 0..nodes {
            for (l, msg) in unpack(&got2[n * l_n + local], l_n, me)?.into_iter().enumerate() {
                out[n * l_n + l] = msg;
            }
        }
        Ok(out)
    }

    fn all_gather(&self, data: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        self.inner.all_gather(data)
    }

    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Communicator>> {
        self.inner.split(color, key)
    }
}

//! Hierarchical all-to-all (DeepSpeed-MoE's and Tutel's 2D exchange): ranks are `nodes ×
//! per_node`, rank = node · per_node + local. Phase 1 exchanges within each node, so the
//! rank with local index l collects everything its node sends to local index l of any
//! node; phase 2 exchanges between the ranks with the same local index across nodes. The
//! slow inter-node links then carry one aggregated message per node pair and local index
//! instead of one per rank pair. Both phases are rounds of the inner transport's
//! [`Transport::exchange`] on device tensors, planned from the row counts every rank holds.

use super::comm::Communicator;
use super::transport::{ExchangeOp, RowCounts, Segment, Transport};
use crate::device::{Device, Tensor};
use crate::error::{Error, Result};

/// A transport whose all-to-all runs in the two phases above over `inner`; every other
/// collective is `inner`'s. Over a flat group the phases are flat exchanges in which only
/// the phase's peers receive data (how the tests simulate nodes).
pub struct Hierarchical<C> {
    inner: C,
    per_node: usize,
}

impl<C: Communicator> Hierarchical<C> {
    /// `per_node` ranks per node; it must divide the group size.
    pub fn new(inner: C, per_node: usize) -> Result<Self> {
        if per_node == 0 || !inner.size().is_multiple_of(per_node) {
            return Err(Error::config(
                "ranks_per_node",
                format!("{per_node} does not divide the {} ranks", inner.size()),
            ));
        }
        Ok(Hierarchical { inner, per_node })
    }

    /// The flat group the phases run over.
    pub fn inner(&self) -> &C {
        &self.inner
    }
}

impl<C: Communicator> Communicator for Hierarchical<C> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn size(&self) -> usize {
        self.inner.size()
    }

    fn all_gather(&self, data: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        self.inner.all_gather(data)
    }

    /// A split of the inner group, hierarchical with the same ranks per node (which must
    /// divide the new group).
    fn split(&self, color: usize, key: usize) -> Result<Self> {
        Hierarchical::new(self.inner.split(color, key)?, self.per_node)
    }
}

/// The two phases of rank `me`'s all-to-all: (phase 1 sends, receives, rows held between
/// the phases; phase 2 sends, receives).
type Phases = ((Vec<Segment>, Vec<Segment>, usize), (Vec<Segment>, Vec<Segment>));

fn phases(counts: &RowCounts, per_node: usize, me: usize) -> Phases {
    let (size, l_n) = (counts.ranks(), per_node);
    let nodes = size / l_n;
    let (node, local) = (me / l_n, me % l_n);
    let rank = |n: usize, l: usize| n * l_n + l;
    // Where this rank's rows for each destination start in its send buffer.
    let mut send_at = vec![0usize; size + 1];
    for d in 0..size {
        send_at[d + 1] = send_at[d] + counts.get(me, d);
    }
    // Phase 1, within the node: to local rank l go my rows for (every node n, l), by n.
    let mut s1 = Vec::new();
    for l in 0..l_n {
        for n in 0..nodes {
            let d = rank(n, l);
            s1.push(Segment { peer: rank(node, l), start: send_at[d], rows: counts.get(me, d) });
        }
    }
    // From each (node, l_src), its rows for (n, local), held by (l_src, n).
    let mut r1 = Vec::new();
    let mut held_at = vec![vec![0usize; nodes]; l_n];
    let mut at = 0;
    for (l_src, held) in held_at.iter_mut().enumerate() {
        for (n, h) in held.iter_mut().enumerate() {
            let rows = counts.get(rank(node, l_src), rank(n, local));
            *h = at;
            r1.push(Segment { peer: rank(node, l_src), start: at, rows });
            at += rows;
        }
    }
    // Phase 2, across nodes: to (n, local) go the rows held for it, by source l_src.
    let mut s2 = Vec::new();
    for n in 0..nodes {
        for (l_src, held) in held_at.iter().enumerate() {
            s2.push(Segment {
                peer: rank(n, local),
                start: held[n],
                rows: counts.get(rank(node, l_src), rank(n, local)),
            });
        }
    }
    // From (n, local), the rows of each (n, l) for me, placed in source order.
    let mut out_at = vec![0usize; size + 1];
    for src in 0..size {
        out_at[src + 1] = out_at[src] + counts.get(src, me);
    }
    let mut r2 = Vec::new();
    for n in 0..nodes {
        for l in 0..l_n {
            let src = rank(n, l);
            r2.push(Segment { peer: rank(n, local), start: out_at[src], rows: counts.get(src, me) });
        }
    }
    ((s1, r1, at), (s2, r2))
}

impl<B: Device, C: Transport<B>> Transport<B> for Hierarchical<C> {
    fn run_exchange(&self, b: &B, op: &ExchangeOp<'_, B>) -> Result<Tensor<B>> {
        self.inner.run_exchange(b, op)
    }

    fn all_to_all_rows(&self, b: &B, x: &Tensor<B>, counts: &RowCounts) -> Result<Tensor<B>> {
        counts.check_group(self)?;
        let me = self.rank();
        let ((s1, r1, held), (s2, r2)) = phases(counts, self.per_node, me);
        let mid = self.inner.exchange(b, x, &s1, &r1, held)?;
        self.inner.exchange(b, &mid, &s2, &r2, counts.received_by(me))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_two_delivers_every_source_in_order() {
        // 2 nodes of 2; rank r sends r + d + 1 rows to d.
        let counts = RowCounts::new(4, (0..16).map(|i| i / 4 + i % 4 + 1).collect()).unwrap();
        for me in 0..4 {
            let ((s1, r1, held), (s2, r2)) = phases(&counts, 2, me);
            assert_eq!(s1.iter().map(|s| s.rows).sum::<usize>(), counts.sent_by(me));
            assert_eq!(r1.iter().map(|s| s.rows).sum::<usize>(), held);
            assert_eq!(s2.iter().map(|s| s.rows).sum::<usize>(), held);
            assert_eq!(r2.iter().map(|s| s.rows).sum::<usize>(), counts.received_by(me));
            // Phase 1 stays in the node, phase 2 keeps the local index.
            assert!(s1.iter().all(|s| s.peer / 2 == me / 2));
            assert!(s2.iter().all(|s| s.peer % 2 == me % 2));
        }
    }
}

//! Expert placement and replication from observed loads: the EPLB algorithm (DeepSeek's
//! expert-parallelism load balancer). Hot experts get replicas, replicas are packed onto
//! GPUs so each GPU carries about the same load, and with the hierarchical policy expert
//! groups are first packed onto nodes so replicas stay within a node. The output maps
//! physical expert slots to logical experts, which a layer uses to place its weights.
//!
//! Follows the reference's arithmetic (f32 loads, descending sort with ties kept in index
//! order, the lightest non-full pack with ties to the lower pack, the first maximum when
//! replicating), so its README example gives the same placement.

use crate::error::{Error, Result};

/// The placement for every layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EplbPlan {
    /// `[layers][replicas]`: the logical expert in each physical slot (slot `p` is on
    /// GPU `p / (replicas / gpus)`).
    pub phy2log: Vec<Vec<usize>>,
    /// `[layers][experts][max replicas]`: the physical slots of each logical expert, −1
    /// past its count.
    pub log2phy: Vec<Vec<Vec<i64>>>,
    /// `[layers][experts]`: replicas of each logical expert.
    pub logcnt: Vec<Vec<usize>>,
}

/// Packs each row's items into `packs` packs of equal item count, balancing the summed
/// weight: heaviest first, each into the lightest pack with room. Returns the pack and
/// the position within the pack of every item.
fn balanced_packing(weight: &[Vec<f32>], packs: usize) -> (Vec<Vec<usize>>, Vec<Vec<usize>>) {
    let n = weight.first().map_or(0, Vec::len);
    let per = n / packs;
    if per == 1 {
        return (weight.iter().map(|_| (0..n).collect()).collect(), weight.iter().map(|_| vec![0; n]).collect());
    }
    let mut pack_index = Vec::with_capacity(weight.len());
    let mut rank_in_pack = Vec::with_capacity(weight.len());
    for row in weight {
        let mut order: Vec<usize> = (0..n).collect();
        // Loads are checked finite on the way in, so this is a total order; the stable
        // sort keeps ties in index order.
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        let (mut pw, mut items) = (vec![0f32; packs], vec![0usize; packs]);
        let (mut pi, mut ri) = (vec![0usize; n], vec![0usize; n]);
        for item in order {
            let mut best = usize::MAX;
            for p in 0..packs {
                if items[p] < per && (best == usize::MAX || pw[p] < pw[best]) {
                    best = p;
                }
            }
            pi[item] = best;
            ri[item] = items[best];
            pw[best] += row[item];
            items[best] += 1;
        }
        pack_index.push(pi);
        rank_in_pack.push(ri);
    }
    (pack_index, rank_in_pack)
}

/// Replicates each row's `num_log` experts into `num_phy` slots, each extra replica going
/// to the expert with the largest load per replica. Returns (slot → expert, replica rank
/// of each slot, replicas per expert).
#[allow(clippy::type_complexity)]
fn replicate_experts(weight: &[Vec<f32>], num_phy: usize) -> (Vec<Vec<usize>>, Vec<Vec<usize>>, Vec<Vec<usize>>) {
    let (mut phy2log, mut rank, mut logcnt) = (Vec::new(), Vec::new(), Vec::new());
    for row in weight {
        let num_log = row.len();
        let mut p2l: Vec<usize> = (0..num_phy).collect();
        let mut rk = vec![0usize; num_phy];
        let mut cnt = vec![1usize; num_log];
        for slot in num_log..num_phy {
            let mut best = 0;
            for e in 1..num_log {
                if row[e] / cnt[e] as f32 > row[best] / cnt[best] as f32 {
                    best = e;
                }
            }
            p2l[slot] = best;
            rk[slot] = cnt[best];
            cnt[best] += 1;
        }
        phy2log.push(p2l);
        rank.push(rk);
        logcnt.push(cnt);
    }
    (phy2log, rank, logcnt)
}

fn inverse(perm: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        inv[p] = i;
    }
    inv
}

#[allow(clippy::type_complexity)]
fn hierarchical(
    weight: &[Vec<f32>],
    num_phy: usize,
    groups: usize,
    nodes: usize,
    gpus: usize,
) -> (Vec<Vec<usize>>, Vec<Vec<usize>>, Vec<Vec<usize>>) {
    let (layers, e) = (weight.len(), weight[0].len());
    let gs = e / groups;
    let groups_per_node = groups / nodes;
    let phy_per_gpu = num_phy / gpus;
    let (log_per_node, phy_per_node) = (e / nodes, num_phy / nodes);

    // Step 1: pack expert groups onto nodes.
    let tokens_per_group: Vec<Vec<f32>> =
        weight.iter().map(|row| (0..groups).map(|g| row[g * gs..(g + 1) * gs].iter().sum()).collect()).collect();
    let (gpi, grp) = balanced_packing(&tokens_per_group, nodes);
    let log2mlog: Vec<Vec<usize>> = (0..layers)
        .map(|l| (0..e).map(|j| (gpi[l][j / gs] * groups_per_node + grp[l][j / gs]) * gs + j % gs).collect())
        .collect();
    let mlog2log: Vec<Vec<usize>> = log2mlog.iter().map(|p| inverse(p)).collect();

    // Step 2: replicas within each node (rows: layer × node).
    let tokens_per_mlog: Vec<Vec<f32>> = (0..layers * nodes)
        .map(|row| {
            let (l, n) = (row / nodes, row % nodes);
            (0..log_per_node).map(|i| weight[l][mlog2log[l][n * log_per_node + i]]).collect()
        })
        .collect();
    let (phy2mlog, phyrank, mlogcnt) = replicate_experts(&tokens_per_mlog, phy_per_node);

    // Step 3: pack the node's replicas onto its GPUs.
    let tokens_per_phy: Vec<Vec<f32>> = (0..layers * nodes)
        .map(|row| phy2mlog[row].iter().map(|&m| tokens_per_mlog[row][m] / mlogcnt[row][m] as f32).collect())
        .collect();
    let (pi, ri) = balanced_packing(&tokens_per_phy, gpus / nodes);
    let pphy2phy: Vec<Vec<usize>> = (0..layers * nodes)
        .map(|row| inverse(&(0..phy_per_node).map(|p| pi[row][p] * phy_per_gpu + ri[row][p]).collect::<Vec<_>>()))
        .collect();

    let mut phy2log = vec![vec![0usize; num_phy]; layers];
    let mut rank = vec![vec![0usize; num_phy]; layers];
    for row in 0..layers * nodes {
        let (l, n) = (row / nodes, row % nodes);
        for q in 0..phy_per_node {
            let p = pphy2phy[row][q];
            let mlog = phy2mlog[row][p] + n * log_per_node;
            phy2log[l][n * phy_per_node + q] = mlog2log[l][mlog];
            rank[l][n * phy_per_node + q] = phyrank[row][p];
        }
    }
    let logcnt: Vec<Vec<usize>> = (0..layers)
        .map(|l| {
            let flat: Vec<usize> = (0..nodes).flat_map(|n| mlogcnt[l * nodes + n].iter().copied()).collect();
            (0..e).map(|j| flat[log2mlog[l][j]]).collect()
        })
        .collect();
    (phy2log, rank, logcnt)
}

/// Plans `num_replicas` physical expert slots over `num_gpus` GPUs in `num_nodes` nodes
/// from the per-layer loads `weight[layer][expert]`. With `num_groups` divisible by
/// `num_nodes` the hierarchical policy keeps each expert group, and its replicas, inside
/// one node; otherwise the global policy replicates and packs over all GPUs.
pub fn rebalance_experts(
    weight: &[Vec<f64>],
    num_replicas: usize,
    num_groups: usize,
    num_nodes: usize,
    num_gpus: usize,
) -> Result<EplbPlan> {
    let e = weight.first().map_or(0, Vec::len);
    let bad = |m: String| Err(Error::config("eplb", m));
    if e == 0 || weight.iter().any(|r| r.len() != e) {
        return bad("every layer needs the same, non-zero number of expert loads".into());
    }
    if num_gpus == 0 || num_nodes == 0 || num_groups == 0 || num_replicas < e || !num_replicas.is_multiple_of(num_gpus)
    {
        return bad(format!(
            "{num_replicas} replicas must be at least the {e} experts and a multiple of the {num_gpus} GPUs"
        ));
    }
    let (groups, nodes) = if num_groups.is_multiple_of(num_nodes) { (num_groups, num_nodes) } else { (1, 1) };
    if !e.is_multiple_of(groups) || !num_gpus.is_multiple_of(nodes) || (num_replicas / nodes) < (e / nodes) {
        return bad(format!("{e} experts, {groups} groups, {nodes} nodes and {num_gpus} GPUs do not divide evenly"));
    }
    // The reference computes in f32; a load that is not a finite, non-negative f32 is an
    // error naming it (a NaN would otherwise reorder the packing silently).
    let w32: Vec<Vec<f32>> = weight.iter().map(|r| r.iter().map(|&v| v as f32 + 0.0).collect()).collect();
    for (l, row) in w32.iter().enumerate() {
        if let Some(x) = row.iter().position(|v| !(v.is_finite() && *v >= 0.0)) {
            return Err(Error::config(
                "eplb loads",
                format!("load {} of expert {x} in layer {l} is not a finite, non-negative f32", weight[l][x]),
            ));
        }
    }
    let (phy2log, rank, logcnt) = hierarchical(&w32, num_replicas, groups, nodes, num_gpus);
    let max = logcnt.iter().flatten().copied().max().unwrap_or(1);
    let log2phy = (0..weight.len())
        .map(|l| {
            let mut t = vec![vec![-1i64; max]; e];
            for (p, (&log, &r)) in phy2log[l].iter().zip(&rank[l]).enumerate() {
                t[log][r] = p as i64;
            }
            t
        })
        .collect();
    Ok(EplbPlan { phy2log, log2phy, logcnt })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example in the EPLB README (deepseek-ai/EPLB), with the placement its
    /// reference implementation prints.
    #[test]
    fn readme_example() {
        let weight = vec![
            vec![90.0, 132.0, 40.0, 61.0, 104.0, 165.0, 39.0, 4.0, 73.0, 56.0, 183.0, 86.0],
            vec![20.0, 107.0, 104.0, 64.0, 19.0, 197.0, 187.0, 157.0, 172.0, 86.0, 16.0, 27.0],
        ];
        let plan = rebalance_experts(&weight, 16, 4, 2, 8).unwrap();
        assert_eq!(
            plan.phy2log,
            vec![
                vec![5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                vec![7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
            ]
        );
        for l in 0..2 {
            assert_eq!(plan.logcnt[l].iter().sum::<usize>(), 16);
            for (e, slots) in plan.log2phy[l].iter().enumerate() {
                let used: Vec<i64> = slots.iter().copied().filter(|&p| p >= 0).collect();
                assert_eq!(used.len(), plan.logcnt[l][e]);
                assert!(used.iter().all(|&p| plan.phy2log[l][p as usize] == e));
            }
        }
    }

    #[test]
    fn global_policy_when_groups_do_not_divide_nodes_and_errors_name_the_problem() {
        let weight = vec![vec![10.0, 1.0, 1.0, 1.0]];
        let plan = rebalance_experts(&weight, 8, 3, 2, 4).unwrap();
        // The hot expert gets the most replicas.
        assert_eq!(*plan.logcnt[0].iter().max().unwrap(), plan.logcnt[0][0]);
        assert!(plan.logcnt[0][0] >= 3);
        assert!(rebalance_experts(&weight, 6, 1, 1, 4).is_err());
        assert!(rebalance_experts(&weight, 3, 1, 1, 1).is_err());
    }
}

//! Expert parallelism on in-process ranks: the communicator's collectives and the
//! transport's device-row exchanges (flat, hierarchical, on split groups), the layer
//! forward with experts spread over ranks (tensor-parallel and data-parallel token
//! layouts, EPLB replicas) against the single-rank forward, what the exchange reads on
//! the host, DeepSpeed's divisibility rule, layers refused at build, and faults (a rank
//! that stops or errors makes its peers fail within the timeout, never hang).

mod common;

use moe_cpu::CpuBackend;
use moe_engine::config::{DeepSpeedGate, ExpertSpec, GateSpec, LayerSpec, Mode};
use moe_engine::parallel::{
    in_process, Communicator, ExchangeOp, ExpertParallel, Hierarchical, InProcessComm, Placement, RowCounts, Segment,
    TokenLayout, Transport,
};
use moe_engine::{golden, stack, Activation, DType, Device, Error, ExpertKind, HostTensor, LayerOptions, MoeLayer};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The DeepSpeed-placed expert-parallel layer of `comm`'s rank.
fn ep_layer(
    b: &CpuBackend,
    spec: LayerSpec,
    weights: &moe_engine::weights::HostLayerWeights,
    comm: InProcessComm,
    tokens: TokenLayout,
) -> moe_engine::Result<MoeLayer<CpuBackend>> {
    let ep = ExpertParallel::deepspeed(Arc::new(comm), spec.num_experts, tokens)?;
    MoeLayer::new_ep(b, spec, weights, DType::F32, ep)
}

#[test]
fn collectives_move_variable_sized_data_between_ranks() {
    let comms = in_process(3, Duration::from_secs(10));
    std::thread::scope(|s| {
        for c in comms {
            s.spawn(move || {
                let r = c.rank();
                // Rank r sends r + d bytes of value (r, d) to rank d.
                let send: Vec<Vec<u8>> = (0..3).map(|d| vec![(10 * r + d) as u8; r + d]).collect();
                let got = c.all_to_all_v(send).unwrap();
                for (src, bytes) in got.iter().enumerate() {
                    assert_eq!(bytes, &vec![(10 * src + r) as u8; src + r], "rank {r} from {src}");
                }
                let all = c.all_gather(vec![r as u8; r]).unwrap();
                assert_eq!(all, vec![vec![], vec![1], vec![2, 2]]);
                assert_eq!(c.all_reduce_max(r as u64 * 7).unwrap(), 14);
                assert_eq!(c.all_reduce_sum(&[r as f32, 1.0]).unwrap(), vec![3.0, 3.0]);
                c.barrier().unwrap();
            });
        }
    });
}

#[test]
fn golden_cases_pass_on_two_and_four_ranks() {
    let root = common::golden_dir();
    for n in [2, 4] {
        for dir in golden::discover(&root).unwrap() {
            let rs = golden::run_case_ep(|_| CpuBackend::new(Some(1)), &dir, n, 0, Duration::from_secs(60))
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            assert_eq!(rs.len(), n);
            for (rank, r) in rs.iter().enumerate() {
                assert!(r.pass, "{} on rank {rank} of {n}: {:?}", r.name, r.outputs);
            }
        }
    }
}

fn spec(e: usize, gate: GateSpec) -> LayerSpec {
    LayerSpec {
        output_bias: false,
        hidden: 24,
        num_experts: e,
        gate,
        expert: ExpertSpec {
            kind: ExpertKind::Glu { activation: Activation::Silu, clamp: None },
            ffn: 40,
            bias: false,
        },
        residual: false,
        shared: None,
    }
}

fn tokens(s: usize, m: usize, seed: u32) -> HostTensor {
    let v = moe_engine::philox::noise(moe_engine::philox::NoiseKind::Uniform, 5, seed, s * m)
        .into_iter()
        .map(|u| 2.0 * u - 1.0)
        .collect();
    HostTensor::f32(&[s, m], v).unwrap()
}

#[test]
fn data_parallel_shards_match_single_rank_runs_on_each_shard() {
    // DeepSpeed top-2 with capacity: each rank gates and drops on its own tokens.
    let g = GateSpec::DeepSpeed(DeepSpeedGate { k: 2, use_rts: false, min_capacity: 2, ..Default::default() });
    let spec = spec(6, g);
    let weights = stack::random_weights(&spec, 3).unwrap();
    let opts = LayerOptions::mode(Mode::Eval);
    let shards: Vec<HostTensor> = (0..3).map(|r| tokens(10 + r, 24, r as u32)).collect();
    let comms = in_process(3, Duration::from_secs(30));
    std::thread::scope(|s| {
        for c in comms {
            let (spec, weights, opts, shard) = (spec.clone(), &weights, &opts, shards[c.rank()].clone());
            s.spawn(move || {
                let b = CpuBackend::new(Some(1)).unwrap();
                let rank = c.rank();
                let layer = ep_layer(&b, spec.clone(), weights, c, TokenLayout::Sharded).unwrap();
                let x = b.upload(&shard).unwrap();
                let y = layer.forward(&b, &x, opts).unwrap().y;
                let single = MoeLayer::new(&b, spec, weights, DType::F32).unwrap().forward(&b, &x, opts).unwrap().y;
                let (a, w) = (b.download(&y).unwrap().to_f64(), b.download(&single).unwrap().to_f64());
                let err = golden::rel_l2(&a, &w);
                assert!(err < 1e-6, "rank {rank}: rel L2 {err} against the single-rank run on its shard");
            });
        }
    });
}

#[test]
fn a_rank_built_from_its_own_experts_equals_one_built_from_all() {
    // What a DeepSpeed rank's state dict holds: the router whole, its experts only.
    let g = GateSpec::DeepSpeed(DeepSpeedGate { k: 2, use_rts: false, min_capacity: 2, ..Default::default() });
    let spec = spec(4, g);
    let weights = stack::random_weights(&spec, 7).unwrap();
    let opts = LayerOptions::mode(Mode::Eval);
    let comms = in_process(2, Duration::from_secs(30));
    let all_comms = in_process(2, Duration::from_secs(30));
    std::thread::scope(|s| {
        for (c, c_all) in comms.into_iter().zip(all_comms) {
            let (spec, weights, opts) = (spec.clone(), &weights, &opts);
            s.spawn(move || {
                let b = CpuBackend::new(Some(1)).unwrap();
                let rank = c.rank();
                let mut local = weights.clone();
                local.experts = weights.experts.slice_experts(rank * 2..rank * 2 + 2).unwrap();
                let ep = ExpertParallel::deepspeed(Arc::new(c), 4, TokenLayout::Sharded).unwrap();
                let mine = MoeLayer::new_ep_local(&b, spec.clone(), &local, false, ep).unwrap();
                let whole = ep_layer(&b, spec.clone(), weights, c_all, TokenLayout::Sharded).unwrap();
                let x = b.upload(&tokens(9 + rank, 24, rank as u32)).unwrap();
                let y = b.download(&mine.forward(&b, &x, opts).unwrap().y).unwrap();
                let w = b.download(&whole.forward(&b, &x, opts).unwrap().y).unwrap();
                assert_eq!(y.as_f32("y").unwrap(), w.as_f32("y").unwrap(), "rank {rank}");
                // Weights holding all experts are not one rank's share.
                let ep = ExpertParallel::deepspeed(
                    Arc::new(in_process(2, Duration::from_millis(50)).remove(rank)),
                    4,
                    TokenLayout::Sharded,
                )
                .unwrap();
                let err =
                    MoeLayer::new_ep_local(&b, spec, weights, false, ep).err().expect("4 experts for a share of 2");
                assert!(err.to_string().contains("experts.w_in"), "{err}");
            });
        }
    });
}

#[test]
fn expert_count_not_divisible_by_ranks_is_a_config_error() {
    let err = Placement::contiguous(8, 3).unwrap_err();
    assert!(matches!(err, Error::Config { ref field, .. } if field == "ep_size"), "{err}");
    assert!(err.to_string().contains("divide"), "{err}");
    let root = common::golden_dir().join("22_hf_mixtral");
    let err = golden::run_case_ep(|_| CpuBackend::new(Some(1)), &root, 3, 0, Duration::from_secs(5)).unwrap_err();
    assert!(err.to_string().contains("ep_size"), "{err}");
}

#[test]
fn a_rank_that_stops_or_errors_makes_the_others_fail_within_the_timeout() {
    let spec = spec(4, GateSpec::SoftmaxTopK { k: 2, normalize: true });
    let weights = stack::random_weights(&spec, 9).unwrap();
    let timeout = Duration::from_millis(500);
    for failing in ["stops", "errors"] {
        let comms = in_process(4, timeout);
        let start = Instant::now();
        let results: Vec<Result<(), Error>> = std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .into_iter()
                .map(|c| {
                    let (spec, weights) = (spec.clone(), &weights);
                    s.spawn(move || -> Result<(), Error> {
                        let b = CpuBackend::new(Some(1))?;
                        let rank = c.rank();
                        if rank == 3 && failing == "stops" {
                            drop(c);
                            return Ok(());
                        }
                        let layer = ep_layer(&b, spec, weights, c, TokenLayout::Replicated)?;
                        // Rank 3 "errors": a wrong input shape fails before any collective.
                        let x = b.upload(&tokens(8, if rank == 3 { 23 } else { 24 }, 1))?;
                        layer.forward(&b, &x, &LayerOptions::default()).map(|_| ())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("no panic")).collect()
        });
        let waited = start.elapsed();
        assert!(waited < timeout * 6, "{failing}: peers took {waited:?} to give up");
        for (rank, r) in results.iter().enumerate().take(3) {
            match r {
                Err(Error::Communication { rank: who, msg }) => {
                    assert_eq!(*who, rank);
                    assert!(msg.contains('3') || msg.contains("stopped"), "{failing}, rank {rank}: {msg}");
                }
                other => panic!("{failing}: rank {rank} should fail with a communication error, got {other:?}"),
            }
        }
    }
}

/// Rank `r`'s rows for every destination, tagged (source, destination, row), and the
/// count matrix: `r` sends `(3r + d) % 5` rows to `d`.
fn tagged_rows(b: &CpuBackend, n: usize, r: usize) -> (moe_engine::Tensor<CpuBackend>, RowCounts) {
    let count = |src: usize, dst: usize| (3 * src + dst) % 5;
    let counts = RowCounts::new(n, (0..n * n).map(|i| count(i / n, i % n)).collect()).unwrap();
    let v: Vec<f32> = (0..n).flat_map(|d| (0..count(r, d)).flat_map(move |i| [r as f32, d as f32, i as f32])).collect();
    (b.upload(&HostTensor::f32(&[v.len() / 3, 3], v).unwrap()).unwrap(), counts)
}

#[test]
fn hierarchical_exchange_on_two_nodes_of_four_equals_the_flat_one() {
    assert!(Hierarchical::new(in_process(8, Duration::from_secs(1)).remove(0), 3).is_err());
    let comms = in_process(8, Duration::from_secs(10));
    std::thread::scope(|s| {
        for c in comms {
            s.spawn(move || {
                let b = CpuBackend::new(Some(1)).unwrap();
                let r = c.rank();
                let (x, counts) = tagged_rows(&b, 8, r);
                let flat = b.download(&c.all_to_all_rows(&b, &x, &counts).unwrap()).unwrap();
                // What arrived: every source's rows for this rank, by source, in order.
                let want: Vec<f32> = (0..8)
                    .flat_map(|src| (0..(3 * src + r) % 5).flat_map(move |i| [src as f32, r as f32, i as f32]))
                    .collect();
                assert_eq!(flat.as_f32("flat").unwrap(), &want[..], "rank {r}");
                let h = Hierarchical::new(c, 4).unwrap();
                let two_d = b.download(&h.all_to_all_rows(&b, &x, &counts).unwrap()).unwrap();
                assert_eq!(flat, two_d, "rank {r}");
            });
        }
    });
}

#[test]
fn exchange_segments_outside_their_tensors_or_overlapping_are_refused() {
    let c = in_process(2, Duration::from_millis(200)).remove(0);
    let b = CpuBackend::new(Some(1)).unwrap();
    let x = b.upload(&HostTensor::f32(&[3, 2], vec![0.0; 6]).unwrap()).unwrap();
    let seg = |peer, start, rows| Segment { peer, start, rows };
    // Past the rows sent, a peer outside the group, overlapping receives, own rows unmatched.
    for (sends, recvs, rows) in [
        (vec![seg(0, 2, 2)], vec![seg(0, 0, 2)], 2),
        (vec![seg(2, 0, 1)], vec![], 0),
        (vec![seg(0, 0, 2)], vec![seg(0, 0, 2), seg(1, 1, 2)], 4),
        (vec![seg(0, 0, 2)], vec![seg(0, 0, 1)], 2),
    ] {
        let err = c.exchange(&b, &x, &sends, &recvs, rows).unwrap_err();
        assert!(matches!(err, Error::Internal(_)), "{sends:?} {recvs:?}: {err}");
    }
}

#[test]
fn golden_cases_pass_with_hierarchical_exchange_on_two_nodes_of_two() {
    let root = common::golden_dir();
    for dir in golden::discover(&root).unwrap() {
        let rs = golden::run_case_ep(|_| CpuBackend::new(Some(1)), &dir, 4, 2, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        assert!(rs.iter().all(|r| r.pass), "{}", dir.display());
    }
}

#[test]
fn a_layer_placed_by_eplb_with_replicas_matches_the_single_rank_forward() {
    use moe_engine::parallel::rebalance_experts;
    let spec = spec(8, GateSpec::SoftmaxTopK { k: 2, normalize: true });
    let weights = stack::random_weights(&spec, 21).unwrap();
    let b = CpuBackend::new(Some(1)).unwrap();
    let x = tokens(40, 24, 7);
    let single = MoeLayer::new(&b, spec.clone(), &weights, DType::F32).unwrap();
    let out = single.forward(&b, &b.upload(&x).unwrap(), &LayerOptions::default()).unwrap();
    let want = b.download(&out.y).unwrap().to_f64();
    // Observed loads → 12 slots over 4 ranks (4 replicas of the hottest experts), 2 nodes.
    let loads: Vec<f64> = out.report(&b).unwrap().exp_counts.iter().map(|&c| c as f64).collect();
    let plan = rebalance_experts(&[loads], 12, 4, 2, 4).unwrap();
    assert!(plan.logcnt[0].iter().any(|&c| c > 1), "the plan replicates some expert");
    let comms = in_process(4, Duration::from_secs(30));
    std::thread::scope(|s| {
        for c in comms {
            let (spec, weights, x, want, plan) = (spec.clone(), &weights, x.clone(), &want, &plan);
            s.spawn(move || {
                let b = CpuBackend::new(Some(1)).unwrap();
                let rank = c.rank();
                let placement = Placement::from_plan(plan, 0, 4).unwrap();
                let ep = ExpertParallel { transport: Arc::new(c), placement, tokens: TokenLayout::Replicated };
                let layer = MoeLayer::new_ep(&b, spec, weights, DType::F32, ep).unwrap();
                let y = layer.forward(&b, &b.upload(&x).unwrap(), &LayerOptions::default()).unwrap().y;
                let err = golden::rel_l2(&b.download(&y).unwrap().to_f64(), want);
                assert!(err < 1e-6, "rank {rank}: rel L2 {err}");
            });
        }
    });
}

#[test]
fn deepspeed_expert_and_expert_data_parallel_groups_by_split() {
    use moe_engine::parallel::ExpertGroups;
    let g = ExpertGroups::new(8, 4).unwrap();
    assert_eq!(g.ep, vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
    assert_eq!(g.edp, vec![vec![0, 4], vec![1, 5], vec![2, 6], vec![3, 7]]);
    assert!(ExpertGroups::new(8, 3).is_err());
    let comms = in_process(8, Duration::from_secs(10));
    std::thread::scope(|s| {
        for c in comms {
            s.spawn(move || {
                let r = c.rank();
                let (ep, edp) = ExpertGroups::split(&c, 4).unwrap();
                assert_eq!((ep.rank(), ep.size()), (r % 4, 4));
                assert_eq!((edp.rank(), edp.size()), (r / 4, 2));
                // Sums stay within each group.
                assert_eq!(ep.all_reduce_sum(&[r as f32]).unwrap(), vec![if r < 4 { 6.0 } else { 22.0 }]);
                assert_eq!(edp.all_reduce_sum(&[r as f32]).unwrap(), vec![(2 * (r % 4) + 4) as f32]);
                // A sub-group runs the expert-parallel exchange on its own, on device rows.
                let b = CpuBackend::new(Some(1)).unwrap();
                let x = b.upload(&HostTensor::i32(&[4, 1], (0..4).map(|d| (r * 10 + d) as i32).collect()).unwrap());
                let counts = RowCounts::new(4, vec![1; 16]).unwrap();
                let got = b.download(&ep.all_to_all_rows(&b, &x.unwrap(), &counts).unwrap()).unwrap();
                let block = r / 4 * 4;
                let want: Vec<i32> = (0..4).map(|src| ((block + src) * 10 + r % 4) as i32).collect();
                assert_eq!(got.as_i32("rows").unwrap(), &want[..]);
            });
        }
    });
}

#[test]
fn a_panicking_rank_is_an_error_of_that_rank_not_a_panic() {
    let dir = common::golden_dir().join("22_hf_mixtral");
    let make = |rank: usize| -> moe_engine::Result<CpuBackend> {
        if rank == 1 {
            panic!("backend factory of rank 1 failed");
        }
        CpuBackend::new(Some(1))
    };
    let start = Instant::now();
    let err = golden::run_case_ep(make, &dir, 2, 0, Duration::from_millis(500)).unwrap_err();
    // The cause is named (not the peer's timeout waiting for it), and the peer gave up
    // within its timeout instead of hanging.
    assert!(matches!(err, Error::Internal(_)), "{err}");
    assert!(err.to_string().contains("rank 1") && err.to_string().contains("factory"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
}

#[test]
fn a_placement_with_an_expert_without_a_slot_is_refused() {
    // Expert 2 of 3 has no slot: routes to it would divide by zero replicas.
    let err = Placement::new(vec![0, 1, 0, 1], 2, 3).unwrap_err();
    assert!(err.to_string().contains("expert 2 has no slot"), "{err}");
    // A slot naming an expert past the layer's.
    let err = Placement::new(vec![0, 1, 5, 2], 2, 3).unwrap_err();
    assert!(err.to_string().contains("expert 5"), "{err}");
    // Slots that do not split over the ranks.
    assert!(Placement::new(vec![0, 1, 2], 2, 3).is_err());
    assert!(Placement::new(vec![0, 1, 2, 0], 0, 3).is_err());
    let p = Placement::new(vec![0, 1, 2, 0], 2, 3).unwrap();
    assert_eq!((p.ranks(), p.local(1), p.replicas()[0].clone()), (2, &[2usize, 0][..], vec![0, 3]));
}

#[test]
fn non_finite_eplb_loads_are_refused_naming_the_expert() {
    use moe_engine::parallel::rebalance_experts;
    for bad in [f64::NAN, f64::INFINITY, -1.0, 1e300] {
        let mut loads: Vec<f64> = (0..30).map(|i| i as f64).collect();
        loads[17] = bad;
        let err = rebalance_experts(&[loads], 32, 1, 1, 4).unwrap_err();
        assert!(err.to_string().contains("expert 17"), "{bad}: {err}");
    }
}

#[test]
fn a_layer_placed_over_another_number_of_ranks_is_refused_when_built() {
    let spec = spec(8, GateSpec::SoftmaxTopK { k: 2, normalize: true });
    let weights = stack::random_weights(&spec, 4).unwrap();
    let b = CpuBackend::new(Some(1)).unwrap();
    let c = in_process(2, Duration::from_secs(1)).remove(0);
    let ep = ExpertParallel {
        transport: Arc::new(c),
        placement: Placement::contiguous(8, 4).unwrap(),
        tokens: TokenLayout::Replicated,
    };
    let Err(err) = MoeLayer::new_ep(&b, spec, &weights, DType::F32, ep) else { panic!("a layer for 4 ranks on 2") };
    assert!(matches!(err, Error::Config { ref field, .. } if field == "ep_size"), "{err}");
    assert!(err.to_string().contains("4 ranks") && err.to_string().contains("has 2"), "{err}");
}

/// The in-process transport, counting what its staging downloads.
struct Counted {
    inner: InProcessComm,
    staged: std::sync::atomic::AtomicU64,
}

impl Communicator for Counted {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn all_gather(&self, data: Vec<u8>) -> moe_engine::Result<Vec<Vec<u8>>> {
        self.inner.all_gather(data)
    }
    fn split(&self, _: usize, _: usize) -> moe_engine::Result<Self> {
        Err(Error::Misuse("not split in this test".into()))
    }
}

impl Transport<CpuBackend> for Counted {
    fn run_exchange(
        &self,
        b: &CpuBackend,
        op: &ExchangeOp<'_, CpuBackend>,
    ) -> moe_engine::Result<moe_engine::Tensor<CpuBackend>> {
        let before = b.downloads();
        let out = self.inner.run_exchange(b, op);
        self.staged.fetch_add(b.downloads() - before, std::sync::atomic::Ordering::Relaxed);
        out
    }
}

#[test]
fn the_exchange_reads_only_the_routes_per_slot_on_the_host() {
    let spec = spec(8, GateSpec::SoftmaxTopK { k: 2, normalize: true });
    let weights = stack::random_weights(&spec, 6).unwrap();
    let x = tokens(21, 24, 3);
    // A local forward reads nothing.
    let b = CpuBackend::new(Some(1)).unwrap();
    let xt = b.upload(&x).unwrap();
    let layer = MoeLayer::new(&b, spec.clone(), &weights, DType::F32).unwrap();
    let before = b.downloads();
    let _out = layer.forward(&b, &xt, &LayerOptions::default()).unwrap();
    assert_eq!(b.downloads(), before, "a local forward downloads nothing");
    for tokens in [TokenLayout::Replicated, TokenLayout::Sharded] {
        let comms = in_process(4, Duration::from_secs(30));
        std::thread::scope(|s| {
            for c in comms {
                let (spec, weights, x) = (spec.clone(), &weights, x.clone());
                s.spawn(move || {
                    let b = CpuBackend::new(Some(1)).unwrap();
                    let t = Arc::new(Counted { inner: c, staged: Default::default() });
                    let placement = Placement::contiguous(8, 4).unwrap();
                    let ep = ExpertParallel { transport: t.clone(), placement, tokens };
                    let layer = MoeLayer::new_ep(&b, spec, weights, DType::F32, ep).unwrap();
                    let xt = b.upload(&x).unwrap();
                    for _ in 0..2 {
                        let (before, staged) = (b.downloads(), t.staged.load(std::sync::atomic::Ordering::Relaxed));
                        let out = layer.forward(&b, &xt, &LayerOptions::default()).unwrap();
                        let staged = t.staged.load(std::sync::atomic::Ordering::Relaxed) - staged;
                        assert_eq!(b.downloads() - before - staged, 1, "{tokens:?}: one read, the routes per slot");
                        assert!(out.dispatch.exchange_time() > Duration::ZERO);
                    }
                });
            }
        });
    }
}

#[test]
fn sharded_ranks_with_eplb_replicas_match_single_rank_runs_on_each_shard() {
    let spec = spec(4, GateSpec::SoftmaxTopK { k: 2, normalize: true });
    let weights = stack::random_weights(&spec, 8).unwrap();
    // 6 slots over 2 ranks: experts 0 and 1 twice, once on each rank.
    let placement = Placement::new(vec![0, 1, 2, 1, 0, 3], 2, 4).unwrap();
    let opts = LayerOptions::default();
    let comms = in_process(2, Duration::from_secs(30));
    std::thread::scope(|s| {
        for c in comms {
            let (spec, weights, opts, placement) = (spec.clone(), &weights, &opts, placement.clone());
            s.spawn(move || {
                let b = CpuBackend::new(Some(1)).unwrap();
                let rank = c.rank();
                let x = b.upload(&tokens(13 + 4 * rank, 24, 40 + rank as u32)).unwrap();
                let ep = ExpertParallel { transport: Arc::new(c), placement, tokens: TokenLayout::Sharded };
                let y = MoeLayer::new_ep(&b, spec.clone(), weights, DType::F32, ep).unwrap().forward(&b, &x, opts);
                let single = MoeLayer::new(&b, spec, weights, DType::F32).unwrap().forward(&b, &x, opts).unwrap().y;
                let err = golden::rel_l2(
                    &b.download(&y.unwrap().y).unwrap().to_f64(),
                    &b.download(&single).unwrap().to_f64(),
                );
                assert!(err < 1e-6, "rank {rank}: rel L2 {err}");
            });
        }
    });
}

/// Runs `spec` on one rank and on `ranks` ranks (hierarchical with `per_node` > 0) holding
/// the same batch; every rank's output, logits and report must be the single rank's.
fn replicated_matches_single(spec: &LayerSpec, x: &HostTensor, opts: &LayerOptions, ranks: usize, per_node: usize) {
    let weights = stack::random_weights(spec, 17).unwrap();
    let b = CpuBackend::new(Some(1)).unwrap();
    let single = MoeLayer::new(&b, spec.clone(), &weights, DType::F32).unwrap();
    let out = single.forward(&b, &b.upload(x).unwrap(), opts).unwrap();
    let (want_y, want_report) = (b.download(&out.y).unwrap().to_f64(), out.report(&b).unwrap());
    let comms = in_process(ranks, Duration::from_secs(30));
    std::thread::scope(|s| {
        for c in comms {
            let (weights, want_y, want_report) = (&weights, &want_y, &want_report);
            s.spawn(move || {
                let b = CpuBackend::new(Some(1)).unwrap();
                let rank = c.rank();
                let transport: Arc<dyn Transport<CpuBackend>> =
                    if per_node > 0 { Arc::new(Hierarchical::new(c, per_node).unwrap()) } else { Arc::new(c) };
                let ep = ExpertParallel::deepspeed(transport, spec.num_experts, TokenLayout::Replicated).unwrap();
                let layer = MoeLayer::new_ep(&b, spec.clone(), weights, DType::F32, ep).unwrap();
                let out = layer.forward(&b, &b.upload(x).unwrap(), opts).unwrap();
                let what = format!("{:?} on rank {rank} of {ranks} ({per_node} per node)", spec.gate);
                let err = golden::rel_l2(&b.download(&out.y).unwrap().to_f64(), want_y);
                assert!(err < 1e-6, "{what}: rel L2 {err}");
                let report = out.report(&b).unwrap();
                assert_eq!(report.exp_counts, want_report.exp_counts, "{what}");
                assert_eq!(report.dropped_tokens, want_report.dropped_tokens, "{what}");
                assert!((report.losses.l_aux - want_report.losses.l_aux).abs() <= 1e-6, "{what}");
            });
        }
    });
}

#[test]
fn every_gate_kind_on_two_four_and_eight_ranks_matches_the_single_rank_forward() {
    use moe_engine::config::{DeepSeekV2Method, DropPolicy, NoisyGatePolicy, SharedSpec};
    let ds = |k, drop_tokens| DeepSpeedGate { k, drop_tokens, min_capacity: 1, ..Default::default() };
    let gates = [
        GateSpec::DeepSpeed(DeepSpeedGate {
            use_rts: true,
            noisy_gate_policy: Some(NoisyGatePolicy::RSample),
            ..ds(1, true)
        }),
        GateSpec::DeepSpeed(DeepSpeedGate { noisy_gate_policy: Some(NoisyGatePolicy::Jitter), ..ds(2, true) }),
        GateSpec::DeepSpeed(DeepSpeedGate { drop_policy: DropPolicy::Position, ..ds(3, true) }),
        GateSpec::DeepSpeed(ds(2, false)),
        GateSpec::SoftmaxTopK { k: 2, normalize: false },
        GateSpec::DeepSeekV2 {
            k: 3,
            n_group: 4,
            topk_group: 2,
            method: DeepSeekV2Method::GroupLimitedGreedy,
            normalize: false,
            routed_scaling_factor: 2.0,
        },
        GateSpec::DeepSeekV3 { k: 2, n_group: 4, topk_group: 2, normalize: true, routed_scaling_factor: 1.5 },
        GateSpec::Switch { expert_capacity: 2 },
    ];
    for (i, gate) in gates.into_iter().enumerate() {
        let mut spec = spec(8, gate);
        // Residual MoE with the DeepSpeed gates, shared experts with the others.
        if i < 4 {
            spec.residual = i % 2 == 0;
        } else {
            spec.shared = Some(SharedSpec { combine: Default::default(), expert: spec.expert, gated: i % 2 == 0 });
        }
        // Switch counts capacity per sequence: x is [batch, seq, hidden].
        let switch = matches!(spec.gate, GateSpec::Switch { .. });
        let x = tokens(if switch { 27 } else { 27 + i }, 24, 60 + i as u32);
        let x = if switch { x.reshape(&[3, 9, 24]).unwrap() } else { x };
        let mut opts = LayerOptions::mode(Mode::Train);
        opts.gate.seed = 1234 + i as u64;
        opts.keep_activations = i % 3 == 0;
        for (ranks, per_node) in [(2, 0), (4, 0), (4, 2), (8, 4)] {
            replicated_matches_single(&spec, &x, &opts, ranks, per_node);
        }
    }
}

#[test]
fn ranks_that_disagree_on_the_batch_or_the_placement_fail_instead_of_mismatching_transfers() {
    let spec = spec(4, GateSpec::SoftmaxTopK { k: 2, normalize: true });
    let weights = stack::random_weights(&spec, 12).unwrap();
    for case in ["tokens", "placement"] {
        let comms = in_process(2, Duration::from_secs(10));
        let results: Vec<moe_engine::Result<()>> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .into_iter()
                .map(|c| {
                    let (spec, weights) = (spec.clone(), &weights);
                    s.spawn(move || {
                        let b = CpuBackend::new(Some(1))?;
                        let rank = c.rank();
                        // Rank 1 holds one more token, or places experts 2 and 3 the other way.
                        let placement = if case == "placement" && rank == 1 {
                            Placement::new(vec![0, 1, 3, 2], 2, 4)?
                        } else {
                            Placement::contiguous(4, 2)?
                        };
                        let ep = ExpertParallel { transport: Arc::new(c), placement, tokens: TokenLayout::Replicated };
                        let layer = MoeLayer::new_ep(&b, spec, weights, DType::F32, ep)?;
                        let s = if case == "tokens" { 10 + rank } else { 10 };
                        layer.forward(&b, &b.upload(&tokens(s, 24, 2))?, &LayerOptions::default()).map(|_| ())
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().expect("no panic")).collect()
        });
        for (rank, r) in results.iter().enumerate() {
            match r {
                Err(Error::Communication { msg, .. }) => {
                    let want = if case == "tokens" { "same batch" } else { "places the experts differently" };
                    assert!(msg.contains(want), "{case}, rank {rank}: {msg}");
                }
                other => panic!("{case}: rank {rank} should fail with a communication error, got {other:?}"),
            }
        }
    }
}

#[test]
fn row_counts_for_another_group_size_are_an_error_not_a_panic() {
    let c = in_process(2, Duration::from_millis(200)).remove(0);
    let b = CpuBackend::new(Some(1)).unwrap();
    let x = b.upload(&HostTensor::f32(&[1, 2], vec![0.0; 2]).unwrap()).unwrap();
    let counts = RowCounts::new(3, vec![0; 9]).unwrap();
    assert!(matches!(c.all_to_all_rows(&b, &x, &counts), Err(Error::Internal(_))));
    let h = Hierarchical::new(in_process(4, Duration::from_millis(200)).remove(0), 2).unwrap();
    let counts = RowCounts::new(2, vec![0; 4]).unwrap();
    assert!(matches!(h.all_to_all_rows(&b, &x, &counts), Err(Error::Internal(_))));
}

/// A DeepSpeed top-2 layer with residual MoE, GLU experts and 8 experts.
fn grad_spec() -> LayerSpec {
    let gate =
        GateSpec::DeepSpeed(DeepSpeedGate { k: 2, capacity_factor: 1.25, min_capacity: 1, ..Default::default() });
    LayerSpec { residual: true, ..spec(8, gate) }
}

/// The mean over ranks of each rank's single-device gradients on its own shard.
fn mean_single_rank_grads(
    spec: &LayerSpec,
    w: &moe_engine::weights::HostLayerWeights,
    shards: &[(HostTensor, HostTensor)],
    coefs: moe_engine::losses::LossCoefs,
) -> std::collections::BTreeMap<String, Vec<f64>> {
    let b = CpuBackend::new(Some(1)).unwrap();
    let layer = MoeLayer::new(&b, spec.clone(), w, DType::F32).unwrap();
    let opts = LayerOptions { keep_activations: true, ..LayerOptions::mode(Mode::Train) };
    let mut sum: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    for (x, dy) in shards {
        let out = layer.forward(&b, &b.upload(x).unwrap(), &opts).unwrap();
        let g =
            layer.backward(&b, &out, &b.upload(dy).unwrap(), &moe_engine::BackwardOptions { losses: coefs }).unwrap();
        for (name, t) in g.into_named() {
            let v = b.download(&t).unwrap().to_f64();
            let acc = sum.entry(name).or_insert_with(|| vec![0.0; v.len()]);
            acc.iter_mut().zip(&v).for_each(|(a, x)| *a += x / shards.len() as f64);
        }
    }
    sum
}

#[test]
fn data_parallel_gradients_are_the_mean_of_the_ranks_single_device_gradients() {
    // W = 4 data-parallel ranks, each gating its own 24 tokens; ep_size P = 1, 2, 4.
    let (world, s, m) = (4, 24, 24);
    let spec = grad_spec();
    let weights = stack::random_weights(&spec, 7).unwrap();
    let shards: Vec<(HostTensor, HostTensor)> = (0..world)
        .map(|r| {
            let x = HostTensor::f32(&[s, m], common::lcg(100 + r as u64, s * m, 1.0)).unwrap();
            let dy = HostTensor::f32(&[s, m], common::lcg(200 + r as u64, s * m, 1.0)).unwrap();
            (x, dy)
        })
        .collect();
    let coefs = moe_engine::losses::LossCoefs { l_aux: 0.01, ..Default::default() };
    let want = mean_single_rank_grads(&spec, &weights, &shards, coefs);
    for p in [1, 2, 4] {
        let comms = in_process(world, Duration::from_secs(60));
        std::thread::scope(|scope| {
            for comm in comms {
                let (spec, weights, shards, want) = (spec.clone(), &weights, &shards, &want);
                scope.spawn(move || {
                    let r = comm.rank();
                    let b = CpuBackend::new(Some(1)).unwrap();
                    let (ep, edp) = moe_engine::parallel::ExpertGroups::split(&comm, p).unwrap();
                    let layer = ep_layer(&b, spec, weights, ep, TokenLayout::Sharded).unwrap();
                    let opts = LayerOptions { keep_activations: true, ..LayerOptions::mode(Mode::Train) };
                    let (x, dy) = &shards[r];
                    let out = layer.forward(&b, &b.upload(x).unwrap(), &opts).unwrap();
                    let bw = moe_engine::BackwardOptions { losses: coefs };
                    let mut grads = layer.backward(&b, &out, &b.upload(dy).unwrap(), &bw).unwrap().into_params();
                    let sync =
                        moe_engine::parallel::GradientSync::<CpuBackend>::new(Arc::new(comm), Arc::new(edp)).unwrap();
                    sync.reduce(&b, &mut grads).unwrap();
                    let local = layer.local_experts().unwrap().to_vec();
                    for (name, expert, t) in grads {
                        let have = b.download(&t).unwrap().to_f64();
                        let full = &want[&name];
                        // An expert stack holds this rank's experts: compare their slices.
                        let reference: Vec<f64> = if expert {
                            let per = full.len() / 8;
                            local.iter().flat_map(|&e| full[e * per..(e + 1) * per].iter().copied()).collect()
                        } else {
                            full.clone()
                        };
                        let err = golden::rel_l2(&have, &reference);
                        assert!(err <= 1e-5, "P = {p}, rank {r}, {name}: rel L2 {err:.2e}");
                    }
                });
            }
        });
    }
}

#[test]
fn scaled_expert_inputs_on_two_ranks_match_the_single_device_forward_and_backward() {
    // Llama 4 multiplies each expert's input by its route weight: the rows leave their rank
    // scaled, come back unweighted, and the weights' gradient is x · d(row) on the sending
    // rank, gathered over the tensor-parallel ranks.
    let case = common::golden_models_dir().join("11_llama4/model");
    let (spec, w) = moe_engine::import::hf::HfModel::open(&case).unwrap().load_layer(1).unwrap();
    assert!(spec.gate.scales_input());
    let (s, m) = (10, spec.hidden);
    let x = HostTensor::f32(&[s, m], common::lcg(31, s * m, 1.0)).unwrap();
    let dy = HostTensor::f32(&[s, m], common::lcg(32, s * m, 1.0)).unwrap();
    let opts = LayerOptions { keep_activations: true, ..Default::default() };
    let b = CpuBackend::new(Some(1)).unwrap();
    let single = MoeLayer::new_trainable(&b, spec.clone(), &w).unwrap();
    let out = single.forward(&b, &b.upload(&x).unwrap(), &opts).unwrap();
    let y0 = b.download(&out.y).unwrap().to_f64();
    let g = single.backward(&b, &out, &b.upload(&dy).unwrap(), &Default::default()).unwrap();
    let dx0 = b.download(&g.dx).unwrap().to_f64();
    let g0: std::collections::BTreeMap<String, Vec<f64>> =
        g.into_named().into_iter().map(|(n, t)| (n, b.download(&t).unwrap().to_f64())).collect();
    let comms = in_process(2, Duration::from_secs(60));
    std::thread::scope(|scope| {
        for comm in comms {
            let (spec, w, x, dy, y0, g0, dx0, opts) = (spec.clone(), &w, &x, &dy, &y0, &g0, &dx0, opts.clone());
            scope.spawn(move || {
                let b = CpuBackend::new(Some(1)).unwrap();
                let ep = ExpertParallel::deepspeed(Arc::new(comm), spec.num_experts, TokenLayout::Replicated).unwrap();
                let layer = MoeLayer::new_ep_trainable(&b, spec, w, ep).unwrap();
                let out = layer.forward(&b, &b.upload(x).unwrap(), &opts).unwrap();
                let y = b.download(&out.y).unwrap().to_f64();
                assert!(golden::rel_l2(&y, y0) < 1e-6, "y: {}", golden::rel_l2(&y, y0));
                let g = layer.backward(&b, &out, &b.upload(dy).unwrap(), &Default::default()).unwrap();
                let dx = b.download(&g.dx).unwrap().to_f64();
                assert!(golden::rel_l2(&dx, dx0) < 1e-6, "dx: {}", golden::rel_l2(&dx, dx0));
                let local = layer.local_experts().expect("expert parallel").to_vec();
                for (name, t) in g.into_named() {
                    let v = b.download(&t).unwrap().to_f64();
                    let want = &g0[&name];
                    let want: Vec<f64> = if name.starts_with("experts.") {
                        let per = want.len() / 8;
                        local.iter().flat_map(|&e| want[e * per..(e + 1) * per].iter().copied()).collect()
                    } else {
                        want.clone()
                    };
                    let e = golden::rel_l2(&v, &want);
                    assert!(e < 1e-6, "{name}: rel L2 {e:.2e}");
                }
            });
        }
    });
}

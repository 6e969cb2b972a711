//! Expert parallelism on in-process ranks: the communicator's collectives, the layer
//! forward with experts spread over ranks (tensor-parallel and data-parallel token
//! layouts) against the single-rank forward, DeepSpeed's divisibility rule, and faults
//! (a rank that stops or errors makes its peers fail within the timeout, never hang).

mod common;

use moe_cpu::CpuBackend;
use moe_engine::config::{DeepSpeedGate, ExpertSpec, GateSpec, LayerSpec, Mode};
use moe_engine::parallel::{in_process, Communicator, EpLayout, Placement, TokenLayout};
use moe_engine::{golden, stack, Activation, DType, Device, Error, ExpertKind, HostTensor, LayerOptions, MoeLayer};
use std::time::{Duration, Instant};

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
        hidden: 24,
        num_experts: e,
        gate,
        expert: ExpertSpec { kind: ExpertKind::Glu { activation: Activation::Silu }, ffn: 40, bias: false },
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
                let layout = EpLayout::new(6, c.rank(), 3).unwrap();
                let layer = MoeLayer::new_ep(&b, spec.clone(), weights, DType::F32, layout).unwrap();
                let x = b.upload(&shard).unwrap();
                let y = layer.forward_ep(&b, &x, opts, &c, TokenLayout::Sharded).unwrap().y;
                let single = MoeLayer::new(&b, spec, weights, DType::F32).unwrap().forward(&b, &x, opts).unwrap().y;
                let (a, w) = (b.download(&y).unwrap().to_f64(), b.download(&single).unwrap().to_f64());
                let err = golden::rel_l2(&a, &w);
                assert!(err < 1e-6, "rank {}: rel L2 {err} against the single-rank run on its shard", c.rank());
            });
        }
    });
}

#[test]
fn expert_count_not_divisible_by_ranks_is_a_config_error() {
    let err = EpLayout::new(8, 0, 3).unwrap_err();
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
                        let layer = MoeLayer::new_ep(&b, spec, weights, DType::F32, EpLayout::new(4, c.rank(), 4)?)?;
                        let rows = if c.rank() == 3 && failing == "errors" { 7 } else { 8 };
                        if c.rank() == 3 && failing == "stops" {
                            drop(c);
                            return Ok(());
                        }
                        // Rank 3 "errors": a wrong input shape fails before any collective.
                        let x = b.upload(&tokens(8, if rows == 7 { 23 } else { 24 }, 1))?;
                        layer.forward_ep(&b, &x, &LayerOptions::default(), &c, TokenLayout::Replicated).map(|_| ())
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

#[test]
fn hierarchical_exchange_on_two_nodes_of_four_equals_the_flat_one() {
    use moe_engine::parallel::Hierarchical;
    let comms = in_process(8, Duration::from_secs(10));
    std::thread::scope(|s| {
        for c in comms {
            s.spawn(move || {
                let r = c.rank();
                let send = |tag: u8| -> Vec<Vec<u8>> {
                    (0..8).map(|d| vec![tag ^ (16 * r + d) as u8; (r * 3 + d) % 5]).collect()
                };
                let flat = c.all_to_all_v(send(0)).unwrap();
                let h = Hierarchical::new(&c, 4).unwrap();
                let two_d = h.all_to_all_v(send(0)).unwrap();
                assert_eq!(flat, two_d, "rank {r}");
                assert!(Hierarchical::new(&c, 3).is_err());
            });
        }
    });
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
                let placement = Placement::from_plan(plan, 0, 4).unwrap();
                let layer = MoeLayer::new_ep_placed(&b, spec, weights, DType::F32, c.rank(), placement).unwrap();
                let y = layer
                    .forward_ep(&b, &b.upload(&x).unwrap(), &LayerOptions::default(), &c, TokenLayout::Replicated)
                    .unwrap()
                    .y;
                let err = golden::rel_l2(&b.download(&y).unwrap().to_f64(), want);
                assert!(err < 1e-6, "rank {}: rel L2 {err}", c.rank());
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
                // A sub-group runs the expert-parallel exchange on its own.
                let got = ep.all_to_all_v((0..4).map(|d| vec![(r * 10 + d) as u8]).collect()).unwrap();
                let block = r / 4 * 4;
                assert_eq!(got, (0..4).map(|src| vec![((block + src) * 10 + r % 4) as u8]).collect::<Vec<_>>());
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

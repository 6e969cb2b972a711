//! The wgpu backend on whatever adapter this machine has (lavapipe in CI): every shader
//! compiles, every golden case passes (on one device and on four expert-parallel ranks),
//! results are bitwise reproducible, and non-finite
//! router logits surface as an error naming the token.
//!
//! Without an adapter these tests say so on the terminal and return; with `CI=true` a
//! missing adapter is a failure instead.

mod common;

use moe_engine::ops::{Normalize, RouteSpec};
use moe_engine::{golden, Backend, Device, Error, HostTensor};
use moe_wgpu::WgpuBackend;
use std::path::Path;

fn backend(test: &str) -> Option<WgpuBackend> {
    common::wgpu(test)
}

#[test]
fn every_shader_entry_point_compiles() {
    let Some(b) = backend("every_shader_entry_point_compiles") else { return };
    let results = b.compile_all();
    let expected: usize = moe_wgpu::FAMILIES.iter().map(|(_, e)| e.len()).sum();
    assert_eq!(results.len(), expected);
    let bad: Vec<String> =
        results.iter().filter_map(|(f, e, r)| r.as_ref().err().map(|err| format!("{f}::{e}: {err}"))).collect();
    assert!(bad.is_empty(), "shaders that do not compile:\n{}", bad.join("\n"));
}

#[test]
fn all_golden_cases_pass_on_wgpu() {
    let Some(b) = backend("all_golden_cases_pass_on_wgpu") else { return };
    let (failures, passed) = common::run_golden(&b);
    assert!(failures.is_empty(), "golden failures on {}:\n{}", b.capabilities().device, failures.join("\n"));
    for r in passed {
        assert!(r.worst_rel_l2 <= 1e-5, "{}: rel L2 {} above the wgpu f32 bound", r.name, r.worst_rel_l2);
    }
}

#[test]
fn all_model_family_cases_pass_on_wgpu() {
    let Some(b) = backend("all_model_family_cases_pass_on_wgpu") else { return };
    let (failures, passed) = common::run_golden_models(&b);
    assert!(failures.is_empty(), "model-family failures on {}:\n{}", b.capabilities().device, failures.join("\n"));
    for r in passed {
        assert!(r.worst_rel_l2 <= 1e-5, "{}: rel L2 {} above the bound", r.name, r.worst_rel_l2);
    }
}

#[test]
fn golden_cases_pass_on_four_wgpu_ranks_in_two_nodes() {
    // Every rank opens its own device; the exchange (bucket, regroup, ranged combine)
    // runs in the shaders, the rows move through the in-process transport.
    if backend("golden_cases_pass_on_four_wgpu_ranks_in_two_nodes").is_none() {
        return;
    }
    for dir in golden::discover(&common::golden_dir()).expect("golden cases") {
        let rs = golden::run_case_ep(|_| WgpuBackend::new(None), &dir, 4, 2, std::time::Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for (rank, r) in rs.iter().enumerate() {
            assert!(r.pass && r.worst_rel_l2 <= 1e-5, "{} on rank {rank}: {:?}", r.name, r.outputs);
        }
    }
}

fn topk<'a>(k: usize) -> RouteSpec<'a, WgpuBackend> {
    RouteSpec { normalize: Normalize::Sum, ..RouteSpec::softmax_top_k(k) }
}

#[test]
fn non_finite_logits_name_the_first_bad_token() {
    let Some(b) = backend("non_finite_logits_name_the_first_bad_token") else { return };
    let cases: Vec<(Vec<f32>, usize, usize)> = vec![
        (vec![0.0, 1.0, f32::NAN, 0.0, f32::INFINITY, 0.0], 1, 0),
        (vec![0.0, 1.0, 0.0, 1.0, 0.0, f32::NEG_INFINITY], 2, 1),
        (vec![0.0, f32::INFINITY, 0.0, 1.0, 0.0, 1.0], 0, 1),
    ];
    for (logits, tok, ex) in cases {
        let l = b.upload(&HostTensor::f32(&[3, 2], logits.clone()).unwrap()).unwrap();
        // The route op only records work; the check is settled by the next download.
        let routes = b.route(&l, &topk(1)).expect("recorded");
        match b.download(&routes.experts).err() {
            Some(Error::NonFiniteLogits { token, expert, value }) => {
                assert_eq!((token, expert), (tok, ex));
                let bad = logits[tok * 2 + ex];
                assert!(value.is_nan() && bad.is_nan() || value == bad);
            }
            other => panic!("expected NonFiniteLogits, got {other:?}"),
        }
        // Once reported, the device is usable again.
        let ok = b.upload(&HostTensor::f32(&[1, 2], vec![0.5, 0.25]).unwrap()).unwrap();
        let r = b.route(&ok, &topk(1)).unwrap();
        assert_eq!(b.download(&r.experts).unwrap().as_i32("experts").unwrap(), [0]);
    }
}

#[test]
fn routes_recorded_before_one_download_report_the_first_flagged_call() {
    let Some(b) = backend("routes_recorded_before_one_download_report_the_first_flagged_call") else { return };
    let up = |v: Vec<f32>| b.upload(&HostTensor::f32(&[2, 2], v).unwrap()).unwrap();
    let (clean, bad_token_1, bad_token_0) =
        (up(vec![0.0, 1.0, 1.0, 0.0]), up(vec![0.0, 1.0, f32::NAN, 0.0]), up(vec![f32::INFINITY, 0.0, 0.0, 1.0]));
    // Each call has its own status words: a clean call after a flagged one stays clean, and
    // of two flagged calls the earlier is reported.
    for (calls, want) in [
        (vec![&clean, &bad_token_1, &clean], (1, 0)),
        (vec![&bad_token_1, &bad_token_0], (1, 0)),
        (vec![&clean, &bad_token_0, &bad_token_1], (0, 0)),
    ] {
        let routes: Vec<_> = calls.iter().map(|l| b.route(l, &topk(1)).expect("recorded")).collect();
        match b.download(&routes[0].experts).err() {
            Some(Error::NonFiniteLogits { token, expert, .. }) => assert_eq!((token, expert), want),
            other => panic!("expected NonFiniteLogits {want:?}, got {other:?}"),
        }
        assert!(b.download(&routes[0].experts).is_ok(), "the checks settle once");
    }
}

#[test]
fn forward_is_bitwise_reproducible() {
    let Some(b) = backend("forward_is_bitwise_reproducible") else { return };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/22_hf_mixtral");
    let first = golden::run_case(&b, &root).expect("runs");
    let second = golden::run_case(&b, &root).expect("runs");
    let errs = |r: &golden::CaseResult| r.outputs.iter().map(|o| o.error.to_bits()).collect::<Vec<_>>();
    assert_eq!(errs(&first), errs(&second), "two runs of the same case differ");
}

/// A backend that splits any weight stack above 16 KiB into parts, as it must on
/// adapters whose largest storage binding is smaller than an expert stack.
fn splitting_backend(test: &str) -> Option<WgpuBackend> {
    backend(test)?;
    Some(WgpuBackend::with_max_binding(None, Some(32 << 10)).expect("adapter"))
}

#[test]
fn split_weight_stacks_round_trip_and_pass_golden_and_parity() {
    let Some(b) = splitting_backend("split_weight_stacks_round_trip_and_pass_golden_and_parity") else { return };
    // Whole experts per part, and column ranges of one expert per part.
    for (shape, dtype) in [
        ([8, 100, 30], moe_engine::DType::F32),
        ([3, 300, 80], moe_engine::DType::BF16),
        ([2, 300, 120], moe_engine::DType::F16),
    ] {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 8.0).collect();
        let w = b.upload_weight(&HostTensor::f32(&shape, v.clone()).unwrap(), dtype).unwrap();
        assert!(b.buffer_count(&w) > 1, "{shape:?} {dtype} was not split");
        assert_eq!(b.download(&w).unwrap().as_f32("w").unwrap(), &v[..], "{shape:?} {dtype} round trip");
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    for dir in golden::discover(&root).unwrap() {
        let r = golden::run_case(&b, &dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        assert!(r.pass, "{} fails with split weights", r.name);
    }
    let cpu = common::cpu_reference(2);
    let bad: Vec<_> = moe_engine::parity::run(&cpu, &b)
        .into_iter()
        .filter(|r| !matches!(r.outcome, moe_engine::parity::Outcome::Pass(_)))
        .map(|r| format!("{} {}: {:?}", r.op, r.case, r.outcome))
        .collect();
    assert!(bad.is_empty(), "parity with split weights:\n{}", bad.join("\n"));
}

/// `cast_weight` gives what `upload_weight` gives: the same values back, the same parts
/// (a stack that upload_weight splits takes the host path), and products over the cast
/// weight bitwise equal to products over the uploaded one (the layout the shaders read),
/// empty stacks included.
#[test]
fn cast_weights_are_uploaded_weights_split_or_not() {
    let Some(b) = splitting_backend("cast_weights_are_uploaded_weights_split_or_not") else { return };
    use moe_engine::DType;
    for (shape, dtype) in [
        (vec![8, 100, 30], DType::F32),
        (vec![3, 300, 80], DType::BF16),
        (vec![2, 300, 120], DType::F16),
        (vec![3, 37, 41], DType::F16),
        (vec![37, 41], DType::BF16),
        (vec![4, 33, 17], DType::F32),
        (vec![0, 6, 4], DType::BF16),
        (vec![2, 5, 0], DType::F16),
    ] {
        let n: usize = shape.iter().product();
        let v = common::lcg(n as u64 + 3, n, 3.0);
        let h = HostTensor::f32(&shape, v).unwrap();
        let up = b.upload_weight(&h, dtype).unwrap();
        let cast = b.cast_weight(&b.upload(&h).unwrap(), dtype).unwrap();
        assert_eq!(b.buffer_count(&cast), b.buffer_count(&up), "{shape:?} {dtype}: parts");
        assert_eq!((cast.shape(), cast.dtype()), (up.shape(), up.dtype()), "{shape:?} {dtype}");
        let (dc, du) = (b.download(&cast).unwrap(), b.download(&up).unwrap());
        let bits = |t: &HostTensor| t.as_f32("w").unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&dc), bits(&du), "{shape:?} {dtype}: values");
        if n == 0 {
            continue;
        }
        let (k, nn) = (shape[shape.len() - 1], shape[shape.len() - 2]);
        let x = common::up_f32(&b, &[5, k], common::lcg(7, 5 * k, 1.0));
        let product = |w: &moe_engine::Tensor<WgpuBackend>| {
            let y = if shape.len() == 2 {
                b.linear(&x, w, None).unwrap()
            } else {
                // Rows 0..2 to the first expert, none to the second, 2..5 to the third.
                let off: Vec<i32> = (0..=shape[0]).map(|g| [0, 2, 2, 5][g.min(3)]).collect();
                let off = moe_engine::ops::Offsets::from_host(&b, &off).unwrap();
                b.grouped_linear(&x, &off, w, None).unwrap()
            };
            common::f32s(&b, &y).iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        assert_eq!(product(&cast), product(&up), "{shape:?} {dtype}: products over [{nn}, {k}] matrices");
    }
}

#[test]
fn empty_weight_stacks_round_trip_as_on_the_cpu() {
    let Some(b) = backend("empty_weight_stacks_round_trip_as_on_the_cpu") else { return };
    // A rank can own no expert of a stack, and a stack can have no columns: neither is an
    // error, and the shape survives the round trip.
    fn round_trip<B: Backend>(b: &B, shape: &[usize], dtype: moe_engine::DType) -> Vec<usize> {
        let n = shape.iter().product();
        let w = b.upload_weight(&HostTensor::f32(shape, vec![0.0; n]).unwrap(), dtype).expect("uploads");
        let back = b.download(&w).expect("downloads");
        assert!(back.as_f32("w").unwrap().is_empty());
        back.shape().to_vec()
    }
    let cpu = common::cpu(1);
    for shape in [[0, 6, 4], [3, 0, 4], [2, 5, 0]] {
        for dtype in [moe_engine::DType::F32, moe_engine::DType::BF16] {
            assert_eq!(round_trip(&b, &shape, dtype), shape, "wgpu {shape:?} {dtype}");
            assert_eq!(round_trip(&cpu, &shape, dtype), shape, "cpu {shape:?} {dtype}");
        }
    }
}

#[test]
fn device_philox_uniforms_equal_the_cpu_draws_bit_for_bit() {
    let Some(b) = backend("device_philox_uniforms_equal_the_cpu_draws_bit_for_bit") else { return };
    use moe_engine::philox::{self, NoiseKind};
    for (seed, stream, n) in [(0u64, 0u32, 5usize), (0xdead_beef_0000_0001, 3, 1001), (u64::MAX, 2, 4096)] {
        let got = b.download(&b.noise(NoiseKind::Uniform, seed, stream, &[n]).unwrap()).unwrap();
        let want = philox::noise(NoiseKind::Uniform, seed, stream, n);
        let same = got.as_f32("u").unwrap().iter().zip(&want).all(|(a, c)| a.to_bits() == c.to_bits());
        assert!(same, "seed {seed:#x} stream {stream}: device draws differ from the cpu's");
    }
}

#[test]
fn non_finite_bias_and_noise_are_named_at_the_next_download_as_on_the_cpu() {
    let Some(b) = backend("non_finite_bias_and_noise_are_named_at_the_next_download_as_on_the_cpu") else { return };
    let cpu = common::cpu(1);
    let (s, e) = (5, 32);
    let logits = common::lcg(3, s * e, 2.0);
    let mut bias = vec![0.0; e];
    bias[21] = f32::NAN;
    let mut noise = common::lcg(4, s * e, 1.0);
    noise[2 * e + 9] = f32::INFINITY;
    for (with_bias, with_noise, want) in
        [(true, false, "e_score_correction_bias"), (false, true, "choice noise (gumbel)")]
    {
        // The same route on either backend; the error comes now (cpu) or at the download (wgpu).
        fn routed<B: Backend>(b: &B, s: usize, e: usize, v: [&[f32]; 3], flags: (bool, bool)) -> Error {
            let (lt, bt, nt) = (
                common::up_f32(b, &[s, e], v[0].to_vec()),
                common::up_f32(b, &[e], v[1].to_vec()),
                common::up_f32(b, &[s, e], v[2].to_vec()),
            );
            let spec = RouteSpec {
                bias: flags.0.then_some(&bt),
                choice_noise: flags.1.then_some(&nt),
                ..RouteSpec::softmax_top_k(2)
            };
            match b.route(&lt, &spec) {
                Ok(r) => b.download(&r.experts).expect_err("flagged at the download"),
                Err(e) => e,
            }
        }
        let inputs = [&logits[..], &bias[..], &noise[..]];
        let (on_wgpu, on_cpu) =
            (routed(&b, s, e, inputs, (with_bias, with_noise)), routed(&cpu, s, e, inputs, (with_bias, with_noise)));
        match (&on_wgpu, &on_cpu) {
            (Error::NonFinite { tensor: a, index: i, .. }, Error::NonFinite { tensor: c, index: j, .. }) => {
                assert_eq!((a.as_str(), i), (want, j), "wgpu names the element");
                assert_eq!(a, c, "wgpu and cpu name the same tensor");
            }
            other => panic!("expected NonFinite on both, got {other:?}"),
        }
    }
}

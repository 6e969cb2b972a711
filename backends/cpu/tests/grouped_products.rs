//! The tiled grouped products and the fused GLU expert path against a plain f64 triple
//! loop, over shapes that cross every tile edge: groups longer than one row tile, output
//! widths that are not a multiple of the column tile, empty groups, biases, and both
//! weight layouts (`upload`: row-major `[G, N, K]`; `upload_weight`: the backend's K-major
//! layout).

use approx::assert_relative_eq;
use moe_cpu::CpuBackend;
use moe_engine::ops::{GroupedMlpOp, MlpWeights, Offsets};
use moe_engine::philox;
use moe_engine::{Activation, Backend, Device, ExpertKind, HostTensor};

fn rand(shape: &[usize], stream: u32) -> HostTensor {
    let n = shape.iter().product();
    let v = philox::words(7, stream, n).into_iter().map(|w| philox::to_open_unit(w) * 2.0 - 1.0).collect();
    HostTensor::f32(shape, v).unwrap()
}

/// `y[r] = x[r] · w[e]ᵀ + b[e]` for the group e holding row r; rows past the last offset 0.
fn reference(x: &HostTensor, off: &[i32], w: &HostTensor, b: Option<&HostTensor>) -> Vec<f64> {
    let (r, k) = (x.shape()[0], x.shape()[1]);
    let n = w.shape()[1];
    let (x, w) = (x.to_f64(), w.to_f64());
    let b = b.map(|b| b.to_f64());
    let mut y = vec![0f64; r * n];
    for e in 0..off.len() - 1 {
        for row in off[e] as usize..off[e + 1] as usize {
            for c in 0..n {
                let mut acc = b.as_ref().map_or(0.0, |b| b[e * n + c]);
                for i in 0..k {
                    acc += x[row * k + i] * w[(e * n + c) * k + i];
                }
                y[row * n + c] = acc;
            }
        }
    }
    y
}

fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).powi(2)).sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    assert!(num.is_finite(), "non-finite output");
    (num / den.max(1e-300)).sqrt()
}

fn offsets(b: &CpuBackend, counts: &[usize]) -> (Vec<i32>, Offsets<CpuBackend>) {
    let mut off = vec![0i32];
    for c in counts {
        off.push(off.last().unwrap() + *c as i32);
    }
    let t = Offsets::from_host(b, &off).unwrap();
    (off, t)
}

/// Group sizes covering: empty groups, a group longer than a 256-row tile, a single row.
const COUNTS: [usize; 5] = [0, 300, 1, 37, 0];

#[test]
fn grouped_linear_matches_reference_across_tiles_and_layouts() {
    let b = CpuBackend::new(Some(2)).unwrap();
    let (k, n) = (70, 300); // n crosses the 256-column tile with a remainder
    let rows: usize = COUNTS.iter().sum::<usize>() + 5; // trailing rows beyond the groups
    let (off, off_t) = offsets(&b, &COUNTS);
    let x = rand(&[rows, k], 1);
    let w = rand(&[COUNTS.len(), n, k], 2);
    let bias = rand(&[COUNTS.len(), n], 3);
    for with_bias in [false, true] {
        let want = reference(&x, &off, &w, with_bias.then_some(&bias));
        for weight_layout in [false, true] {
            let wt = if weight_layout { b.upload_weight(&w, w.dtype()).unwrap() } else { b.upload(&w).unwrap() };
            let bt = b.upload(&bias).unwrap();
            let y = b.grouped_linear(&b.upload(&x).unwrap(), &off_t, &wt, with_bias.then_some(&bt)).unwrap();
            let y = b.download(&y).unwrap();
            assert_eq!(y.shape(), [rows, n]);
            let err = rel_l2(y.as_f32("y").unwrap(), &want);
            assert!(err < 1e-6, "bias {with_bias}, K-major {weight_layout}: rel L2 {err}");
        }
    }
}

#[test]
fn linear_matches_reference() {
    let b = CpuBackend::new(Some(2)).unwrap();
    let (r, k, n) = (513, 64, 257);
    let x = rand(&[r, k], 4);
    let w = rand(&[1, n, k], 5);
    let bias = rand(&[1, n], 6);
    let want = reference(&x, &[0, r as i32], &w, Some(&bias));
    let w2 = w.clone().reshape(&[n, k]).unwrap();
    let b2 = bias.clone().reshape(&[n]).unwrap();
    let y = b
        .linear(&b.upload(&x).unwrap(), &b.upload_weight(&w2, w2.dtype()).unwrap(), Some(&b.upload(&b2).unwrap()))
        .unwrap();
    let err = rel_l2(b.download(&y).unwrap().as_f32("y").unwrap(), &want);
    assert!(err < 1e-6, "rel L2 {err}");
}

#[test]
fn fused_glu_experts_match_the_unfused_composition() {
    let b = CpuBackend::new(Some(2)).unwrap();
    let (h, f) = (48, 150); // f crosses the 128-column GLU tile with a remainder
    let rows: usize = COUNTS.iter().sum::<usize>() + 3;
    let (_, off_t) = offsets(&b, &COUNTS);
    let g = COUNTS.len();
    let x = b.upload(&rand(&[rows, h], 10)).unwrap();
    let w_in = b.upload_weight(&rand(&[g, 2 * f, h], 11), moe_engine::DType::F32).unwrap();
    let b_in = b.upload(&rand(&[g, 2 * f], 12)).unwrap();
    let w_out = b.upload_weight(&rand(&[g, h, f], 13), moe_engine::DType::F32).unwrap();
    let b_out = b.upload(&rand(&[g, h], 14)).unwrap();
    for activation in [Activation::Silu, Activation::Gelu, Activation::GeluTanh, Activation::Relu] {
        for with_bias in [false, true] {
            let w = MlpWeights {
                kind: ExpertKind::Glu { activation, clamp: None },
                w_in: &w_in,
                b_in: with_bias.then_some(&b_in),
                w_out: Some(&w_out),
                b_out: with_bias.then_some(&b_out),
            };
            let want = b.grouped_mlp_unfused(&GroupedMlpOp::check(&b, &x, &off_t, &w, true).unwrap()).unwrap();
            let want_y = b.download(&want.y).unwrap().to_f64();
            let want_pre = b.download(want.pre.as_ref().unwrap()).unwrap().to_f64();
            for keep_pre in [false, true] {
                let got = b.grouped_mlp(&x, &off_t, &w, keep_pre).unwrap();
                let y = b.download(&got.y).unwrap();
                let err = rel_l2(y.as_f32("y").unwrap(), &want_y);
                assert!(err < 1e-6, "{activation:?} bias {with_bias} keep_pre {keep_pre}: rel L2 {err}");
                assert_eq!(got.pre.is_some(), keep_pre, "pre-activation kept only when asked");
                if let Some(pre) = got.pre {
                    let pre = b.download(&pre).unwrap();
                    for (p, q) in pre.as_f32("pre").unwrap().iter().zip(&want_pre) {
                        assert_relative_eq!(*p as f64, *q, max_relative = 1e-5, epsilon = 1e-6);
                    }
                }
            }
        }
    }
}

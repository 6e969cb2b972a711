//! The expert-side ops' backward identities, on the cpu and on wgpu (the emulated CUDA
//! tests check the cuda kernels against the cpu): the weighted permute's backward from
//! `combine` and `combine_grad`, `pass_rows` as its own backward, `sum_rows` as the bias
//! gradient of `add_bias`, and identity-expert tails in the grouped products, which must
//! give exactly what the same products over the weighted groups alone give. Each adjoint
//! identity is `⟨op(a), d⟩ = ⟨a, op*(d)⟩` for random `a` and `d`: it holds for the right
//! backward only.

mod common;

use moe_engine::ops::{CapacityRule, KeepPolicy, MlpWeights, Offsets, PlanSpec, Routes};
use moe_engine::{philox, Activation, Backend, DType, ExpertKind, GluClamp, HostTensor, Tensor};

fn rand(shape: &[usize], stream: u32) -> HostTensor {
    let n = shape.iter().product();
    let v = philox::words(0xe0e0, stream, n).into_iter().map(|w| philox::to_open_unit(w) * 2.0 - 1.0).collect();
    HostTensor::f32(shape, v).expect("shape")
}

fn host<B: Backend>(b: &B, t: &Tensor<B>) -> Vec<f32> {
    b.download(t).expect("download").into_f32("t").expect("f32")
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

fn close(what: &str, a: f64, b: f64) {
    assert!((a - b).abs() <= 1e-5 * a.abs().max(b.abs()).max(1.0), "{what}: {a} against {b}");
}

/// A plan of 23 tokens over 5 experts, top-2, with DeepSpeed capacity drops (rows −1).
fn plan<B: Backend>(b: &B) -> moe_engine::ops::Plan<B> {
    let (s, e, k) = (23, 5, 2);
    // First choices on experts 0 and 1 only: 12 routes on expert 0, past its capacity of 10.
    let experts: Vec<i32> = (0..s * k).map(|i| if i % k == 0 { (i / k) % 2 } else { 2 + (i / k) % 3 } as i32).collect();
    let w: Vec<f32> = rand(&[s, k], 1).into_f32("w").unwrap().into_iter().map(f32::abs).collect();
    let routes = Routes::from_host(
        b,
        &HostTensor::i32(&[s, k], experts).unwrap(),
        &HostTensor::f32(&[s, k], w).unwrap(),
        &rand(&[s, e as usize], 2),
    )
    .expect("routes");
    let spec = PlanSpec {
        num_experts: e as usize,
        capacity: CapacityRule::DeepSpeed { factor: 1.0, k_prime: 2, min_capacity: 1 },
        keep: KeepPolicy::TokenOrder,
        used_token: None,
        group_size: None,
        renormalize_kept: false,
    };
    b.plan(&routes, &spec).expect("plan")
}

fn weighted_permute_backward<B: Backend>(b: &B) {
    let p = plan(b);
    let (rows, s, m) = (p.route_rows(), p.tokens(), 7);
    let dropped = b.download(rows.tensor()).unwrap().into_i32("rows").unwrap();
    assert!(dropped.contains(&-1), "some routes dropped");
    let x = b.upload(&rand(&[s, m], 3)).unwrap();
    let dxp = b.upload(&rand(&[rows.bound(), m], 4)).unwrap();
    let y = b.permute_scaled(&x, &rows, &p.weights).unwrap();
    // dx = combine(dxp, rows, w): the adjoint in x.
    let dx = b.combine(&dxp, &rows, &p.weights, 0..s).unwrap();
    close("<y, dxp> = <x, dx>", dot(&host(b, &y), &host(b, &dxp)), dot(&host(b, &x), &host(b, &dx)));
    // d_weights = combine_grad(x, dxp, ..).d_weights: y is linear in the weights, so for a
    // direction e of weights, <permute_scaled(x, rows, e), dxp> = <e, d_weights>.
    let g = b.combine_grad(&x, &dxp, &rows, &p.weights, 0..s).unwrap();
    let e = b.upload(&rand(&[s, 2], 5)).unwrap();
    let ye = b.permute_scaled(&x, &rows, &e).unwrap();
    close(
        "<y(e), dxp> = <e, d_weights>",
        dot(&host(b, &ye), &host(b, &dxp)),
        dot(&host(b, &e), &host(b, &g.d_weights)),
    );
    // combine_grad's other output is the weighted permute itself, bit for bit.
    assert_eq!(host(b, &g.d_yp), host(b, &y), "combine_grad d_yp = permute_scaled");
    // Unit weights give the plain permute.
    let ones = b.upload(&HostTensor::f32(&[s, 2], vec![1.0; s * 2]).unwrap()).unwrap();
    assert_eq!(host(b, &b.permute_scaled(&x, &rows, &ones).unwrap()), host(b, &b.permute(&x, &rows).unwrap()));
}

fn pass_rows_backward<B: Backend>(b: &B) {
    let (counts, m) = ([4usize, 0, 6, 3, 2], 5);
    let r = counts.iter().sum::<usize>() + 3;
    let off = Offsets::from_host(b, &[0, 4, 4, 10, 13, 15]).unwrap();
    let (y, x, d) = (rand(&[r, m], 6), rand(&[r, m], 7), rand(&[r, m], 8));
    let (yt, xt, dt) = (b.upload(&y).unwrap(), b.upload(&x).unwrap(), b.upload(&d).unwrap());
    let zero = b.upload(&HostTensor::f32(&[r, m], vec![0.0; r * m]).unwrap()).unwrap();
    let out = host(b, &b.pass_rows(&yt, &xt, &off, 3).unwrap());
    for row in 0..r {
        let from = if (10..15).contains(&row) { &x } else { &y };
        assert_eq!(&out[row * m..(row + 1) * m], &from.as_f32("v").unwrap()[row * m..(row + 1) * m], "row {row}");
    }
    let d_x = host(b, &b.pass_rows(&zero, &dt, &off, 3).unwrap());
    let d_y = host(b, &b.pass_rows(&dt, &zero, &off, 3).unwrap());
    let lhs = dot(&out, d.as_f32("d").unwrap());
    close(
        "<pass_rows(y, x), d> = <y, d_y> + <x, d_x>",
        lhs,
        dot(y.as_f32("y").unwrap(), &d_y) + dot(x.as_f32("x").unwrap(), &d_x),
    );
    let sum: Vec<f32> = d_x.iter().zip(&d_y).map(|(a, b)| a + b).collect();
    assert_eq!(sum, d.as_f32("d").unwrap(), "d_x and d_y split d");
}

fn add_bias_backward<B: Backend>(b: &B) {
    let (r, m) = (37, 19);
    let (y, bias, d) = (rand(&[r, m], 9), rand(&[m], 10), rand(&[r, m], 11));
    let out = host(b, &b.add_bias(&b.upload(&y).unwrap(), &b.upload(&bias).unwrap()).unwrap());
    let db = host(b, &b.sum_rows(&b.upload(&d).unwrap()).unwrap());
    let (yv, bv, dv) = (y.as_f32("y").unwrap(), bias.as_f32("b").unwrap(), d.as_f32("d").unwrap());
    close("<y + bias, d> = <y, d> + <bias, sum_rows(d)>", dot(&out, dv), dot(yv, dv) + dot(bv, &db));
    for (i, o) in out.iter().enumerate() {
        assert_eq!(*o, yv[i] + bv[i % m], "element {i}");
    }
}

/// Identity experts: offsets over 3 experts and 2 tail groups run the 3-expert stack
/// exactly as offsets over the 3 experts alone do (the tail's rows come out zero), in the
/// forward and in both gradients.
fn identity_tail<B: Backend>(b: &B) {
    let (k, n) = (11, 13);
    let full = [0, 5, 5, 40, 47, 52];
    let rows = 55;
    let tail = Offsets::from_host(b, &full).unwrap().with_tail(2);
    let alone = Offsets::from_host(b, &full[..4]).unwrap();
    let x = b.upload(&rand(&[rows, k], 12)).unwrap();
    let w = b.upload_weight(&rand(&[3, n, k], 13), DType::F32).unwrap();
    let bias = b.upload(&rand(&[3, n], 14)).unwrap();
    let with_tail = host(b, &b.grouped_linear(&x, &tail, &w, Some(&bias)).unwrap());
    assert_eq!(with_tail, host(b, &b.grouped_linear(&x, &alone, &w, Some(&bias)).unwrap()));
    assert!(with_tail[40 * n..].iter().all(|&v| v == 0.0), "the tail's rows are zero");
    let dy = b.upload(&rand(&[rows, n], 15)).unwrap();
    let dx = |o| host(b, &b.linear_dx(&dy, &w, Some(o)).unwrap());
    assert_eq!(dx(&tail), dx(&alone), "linear_dx");
    let (gt, ga) =
        (b.weight_grad(&dy, &x, Some(&tail), true).unwrap(), b.weight_grad(&dy, &x, Some(&alone), true).unwrap());
    assert_eq!(host(b, &gt.dw), host(b, &ga.dw), "weight_grad");
    assert_eq!(host(b, &gt.db.unwrap()), host(b, &ga.db.unwrap()), "bias gradient");
    // The whole expert MLP (gpt-oss's clamped GLU, fused), then the identity rows passed.
    let w_in = b.upload_weight(&rand(&[3, 2 * n, k], 16), DType::F32).unwrap();
    let w_out = b.upload_weight(&rand(&[3, k, n], 17), DType::F32).unwrap();
    let mlp = MlpWeights {
        kind: ExpertKind::Glu { activation: Activation::Silu, clamp: Some(GluClamp::gpt_oss(0.8, 1.702)) },
        w_in: &w_in,
        b_in: None,
        w_out: Some(&w_out),
        b_out: None,
    };
    let yt = b.grouped_mlp(&x, &tail, &mlp, false).unwrap().y;
    let ya = b.grouped_mlp(&x, &alone, &mlp, false).unwrap().y;
    assert_eq!(host(b, &yt), host(b, &ya), "grouped_mlp");
    let out = host(b, &b.pass_rows(&yt, &x, &tail, 3).unwrap());
    assert_eq!(&out[40 * k..52 * k], &host(b, &x)[40 * k..52 * k], "identity experts return their input");
    assert!(out[52 * k..].iter().all(|&v| v == 0.0), "rows past the groups stay as the experts left them");
    // A tail that does not leave the stack's expert count is an error naming the offsets.
    let e = b.grouped_linear(&x, &Offsets::from_host(b, &full).unwrap().with_tail(1), &w, None).expect_err("4 groups");
    assert!(e.to_string().contains("offsets"), "{e}");
    let e = b.linear_dx(&dy, &w, Some(&Offsets::from_host(b, &full).unwrap().with_tail(9))).expect_err("tail > G");
    assert!(e.to_string().contains("offsets"), "{e}");
    let Err(e) = b.weight_grad(&dy, &x, Some(&Offsets::from_host(b, &full).unwrap().with_tail(9)), false) else {
        panic!("a tail past the groups is refused");
    };
    assert!(e.to_string().contains("offsets"), "{e}");
}

fn all<B: Backend>(b: &B) {
    weighted_permute_backward(b);
    pass_rows_backward(b);
    add_bias_backward(b);
    identity_tail(b);
}

#[test]
fn expert_op_identities_hold_on_the_cpu() {
    all(&common::cpu(2));
}

#[test]
fn expert_op_identities_hold_on_wgpu() {
    let Some(b) = common::wgpu("expert_op_identities_hold_on_wgpu") else { return };
    all(&b);
}

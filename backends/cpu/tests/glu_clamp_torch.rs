//! The clamped GLU of gpt-oss and DeepSeek-V4 on the cpu reference against transformers
//! itself: the forward and the autograd backward of the exact expressions the models run,
//! `GptOssExperts._apply_gate` (limit 7, α 1.702, `(up + 1) * gate * sigmoid(gate *
//! alpha)`, gate and up interleaved in its layout) and `DeepseekV4Experts._apply_gate`
//! (limit 10, `act_fn(gate) * up` with silu), on fixed inputs that sit on, inside and past
//! both bounds.
//!
//! The constants were made with torch 2.15.0 and transformers 5.23 (float32, cpu) by this
//! script (its output pasted below, each value the shortest decimal that reads back as
//! the same f32):
//!
//! ```python
//! import torch, types
//! from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
//! from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Experts
//! from transformers.activations import ACT2FN
//! gate, up, dy = ...  # the [3, 5] tensors of PRE (gate | up per row) and DY below
//! def gpt_oss(limit, alpha):
//!     g, u = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
//!     gu = torch.stack([g, u], dim=-1).reshape(g.shape[0], -1)  # HF's interleaved layout
//!     y = GptOssExperts._apply_gate(types.SimpleNamespace(alpha=alpha, limit=limit), gu)
//!     (y * dy).sum().backward()
//!     return y, torch.cat([g.grad, u.grad], dim=-1)
//! def ds_v4(limit):
//!     g, u = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
//!     me = types.SimpleNamespace(limit=limit, act_fn=ACT2FN["silu"])
//!     y = DeepseekV4Experts._apply_gate(me, torch.cat([g, u], dim=-1))
//!     (y * dy).sum().backward()
//!     return y, torch.cat([g.grad, u.grad], dim=-1)
//! gpt_oss(7.0, 1.702); ds_v4(10.0)
//! ```
//!
//! The same torch gives `clamp`'s gradient as 0 at the bound itself (`x.clamp(-7, 7)` at
//! ±7 and `x.clamp(max=7)` at 7 pass nothing), which the zeros below at gate = 7 (gpt-oss),
//! gate = 10 and up = ±10 (DeepSeek-V4) pin down: the engine passes the gradient strictly
//! inside the bounds.

use moe_cpu::CpuBackend;
use moe_engine::ops::{ActGradKind, MlpWeights, Offsets};
use moe_engine::parity::compare;
use moe_engine::{Activation, Backend, Device, ExpertKind, GluClamp, HostTensor};

const PRE: [f32; 30] = [
    -9.0, -7.0, 0.5, 7.0, 8.0, -8.0, -7.0, 0.25, 7.0, 7.5, 3.25, -0.75, 6.999, 10.0, 12.5, -1.5, 2.0, -10.0, 10.0,
    11.0, -10.0, 1.5, -2.25, 0.0, 9.5, -10.5, 3.0, -6.5, 0.125, 4.0,
];
const DY: [f32; 15] = [0.5, -1.25, 2.0, 0.75, -0.5, 1.5, 0.25, -0.75, 1.0, 2.5, -2.0, 0.625, 1.75, -1.5, 0.375];
const GPT_OSS_Y: [f32; 15] = [
    1.2019071e-05,
    0.00028123002,
    0.43798554,
    55.999626,
    55.999626,
    -1.6185904,
    -0.49082986,
    -41.99372,
    55.999626,
    55.999626,
    2.4347755e-06,
    5.566649,
    0.2630767,
    0.0,
    34.999767,
];
const GPT_OSS_D_PRE: [f32; 30] = [
    9.5605e-06,
    -0.00054809323,
    2.1980548,
    0.0,
    0.0,
    0.0,
    0.0,
    0.7007769,
    0.0,
    0.0,
    -0.76334095,
    0.00032134354,
    4.5003276,
    0.0,
    0.0,
    4.855771,
    -0.040902488,
    0.0,
    0.0,
    0.0,
    -7.801021e-06,
    2.74712,
    0.5623009,
    -0.84375,
    0.0,
    0.0,
    0.8697889,
    -0.08370622,
    0.0,
    2.6249824,
];
const DS_V4_Y: [f32; 15] = [
    0.008884409,
    0.04464151,
    0.07780742,
    48.95536,
    59.97988,
    -4.6930313,
    -0.48123193,
    -69.92617,
    99.99546,
    99.99546,
    0.0045397873,
    3.6790848,
    1.394486,
    0.0,
    37.997154,
];
const DS_V4_D_PRE: [f32; 30] = [
    0.0039480785,
    -0.047779348,
    0.3699806,
    5.278666,
    -3.7587993,
    -0.0005552756,
    0.007971698,
    0.62245935,
    5.2452173,
    -3.9986587,
    -2.4287791,
    0.07870002,
    7.540987,
    0.0,
    0.0,
    4.6930313,
    -0.06015399,
    0.0,
    0.0,
    0.0,
    -0.0081712045,
    1.9524266,
    1.1230642,
    -0.09375,
    1.5009544,
    0.0,
    0.76647604,
    -0.3754385,
    -0.0,
    3.5622332,
];

const ROWS: usize = 3;
const F: usize = 5;

/// Within the last ulps of the transcendentals (relative L2, as the parity harness
/// compares), and every zero of torch's (a clamped gradient, a zero gate) exactly zero.
fn check(what: &str, got: &HostTensor, want: &[f32]) {
    let want_t = HostTensor::f32(got.shape(), want.to_vec()).unwrap();
    if let Err(msg) = compare(what, &want_t, got, 1e-6) {
        panic!("{msg}");
    }
    let got = got.as_f32(what).unwrap();
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w == 0.0 {
            assert_eq!(g, 0.0, "{what}[{i}]: torch gives exactly 0, got {g}");
        }
    }
}

fn cases() -> [(&'static str, GluClamp, &'static [f32], &'static [f32]); 2] {
    [
        ("gpt-oss", GluClamp::gpt_oss(7.0, 1.702), &GPT_OSS_Y, &GPT_OSS_D_PRE),
        ("DeepSeek-V4", GluClamp::deepseek_v4(10.0), &DS_V4_Y, &DS_V4_D_PRE),
    ]
}

#[test]
fn the_clamped_glu_and_its_gradient_are_transformers_own() {
    let b = CpuBackend::new(Some(1)).unwrap();
    let pre = b.upload(&HostTensor::f32(&[ROWS, 2 * F], PRE.to_vec()).unwrap()).unwrap();
    let dy = b.upload(&HostTensor::f32(&[ROWS, F], DY.to_vec()).unwrap()).unwrap();
    for (what, clamp, y, d_pre) in cases() {
        let got = b.download(&b.glu_clamped(&pre, Activation::Silu, Some(clamp)).unwrap()).unwrap();
        check(&format!("{what} glu"), &got, y);
        let kind = ActGradKind::glu(Activation::Silu, Some(clamp));
        let got = b.download(&b.act_grad(kind, &dy, &pre).unwrap()).unwrap();
        check(&format!("{what} act_grad"), &got, d_pre);
    }
}

/// The fused GLU epilogue of the expert product, on the same values: one expert whose
/// projections are identities (exact products), so its output is the clamped GLU itself.
#[test]
fn the_fused_expert_product_clamps_as_transformers() {
    let b = CpuBackend::new(Some(1)).unwrap();
    let eye = |n: usize| {
        let v = (0..n * n).map(|i| if i / n == i % n { 1.0 } else { 0.0 }).collect();
        b.upload_weight(&HostTensor::f32(&[1, n, n], v).unwrap(), moe_engine::DType::F32).unwrap()
    };
    let (w_in, w_out) = (eye(2 * F), eye(F));
    let x = b.upload(&HostTensor::f32(&[ROWS, 2 * F], PRE.to_vec()).unwrap()).unwrap();
    let off = Offsets::from_host(&b, &[0, ROWS as i32]).unwrap();
    for (what, clamp, y, _) in cases() {
        let w = MlpWeights {
            kind: ExpertKind::Glu { activation: Activation::Silu, clamp: Some(clamp) },
            w_in: &w_in,
            b_in: None,
            w_out: Some(&w_out),
            b_out: None,
        };
        let out = b.grouped_mlp(&x, &off, &w, true).unwrap();
        check(&format!("{what} fused"), &b.download(&out.y).unwrap(), y);
        // The kept pre-activation is the product's output, before the clamps.
        let kept = b.download(&out.pre.unwrap()).unwrap();
        assert_eq!(kept.as_f32("pre").unwrap(), &PRE[..], "{what}: the pre-activation is kept unclamped");
    }
}

/// Without a clamp nothing changes: the plain GLU is the one the engine always ran.
#[test]
fn no_clamp_is_the_plain_glu_bit_for_bit() {
    let b = CpuBackend::new(Some(1)).unwrap();
    let pre = b.upload(&HostTensor::f32(&[ROWS, 2 * F], PRE.to_vec()).unwrap()).unwrap();
    for act in Activation::ALL {
        let plain = b.download(&b.glu(&pre, act).unwrap()).unwrap();
        let none = b.download(&b.glu_clamped(&pre, act, None).unwrap()).unwrap();
        assert_eq!(plain.as_f32("y").unwrap(), none.as_f32("y").unwrap(), "{act:?}");
    }
}

#[test]
fn a_bad_clamp_is_an_error_naming_its_field() {
    let b = CpuBackend::new(Some(1)).unwrap();
    let pre = b.upload(&HostTensor::f32(&[ROWS, 2 * F], PRE.to_vec()).unwrap()).unwrap();
    let dy = b.upload(&HostTensor::f32(&[ROWS, F], DY.to_vec()).unwrap()).unwrap();
    let bad = [
        (Activation::Silu, GluClamp { limit: f32::NAN, alpha: 1.0, up_offset: 0.0 }, "clamp.limit"),
        (Activation::Silu, GluClamp { limit: 0.0, alpha: 1.0, up_offset: 0.0 }, "clamp.limit"),
        (Activation::Silu, GluClamp { limit: f32::INFINITY, alpha: 1.0, up_offset: 0.0 }, "clamp.limit"),
        (Activation::Silu, GluClamp { limit: 7.0, alpha: f32::NAN, up_offset: 0.0 }, "clamp.alpha"),
        (Activation::Silu, GluClamp { limit: 7.0, alpha: 1.0, up_offset: f32::INFINITY }, "clamp.up_offset"),
        (Activation::Gelu, GluClamp::gpt_oss(7.0, 1.702), "clamp.alpha"),
    ];
    for (act, c, field) in bad {
        let e = b.glu_clamped(&pre, act, Some(c)).expect_err("refused");
        assert!(e.to_string().contains(field), "{c:?}: {e}");
        let e = b.act_grad(ActGradKind::glu(act, Some(c)), &dy, &pre).expect_err("refused");
        assert!(e.to_string().contains(field), "{c:?}: {e}");
        assert!(ExpertKind::Glu { activation: act, clamp: Some(c) }.check().is_err());
    }
    // gelu with α = 1 (DeepSeek-V4's clamp on a gelu expert) is fine.
    assert!(b.glu_clamped(&pre, Activation::Gelu, Some(GluClamp::deepseek_v4(7.0))).is_ok());
}

/// Configs written before the clamp existed read as unclamped GLUs, and a clamp round
/// trips through the config format.
#[test]
fn the_clamp_is_optional_in_configs() {
    let old: ExpertKind = serde_json::from_str(r#"{"type": "glu", "activation": "silu"}"#).unwrap();
    assert_eq!(old, ExpertKind::Glu { activation: Activation::Silu, clamp: None });
    let k = ExpertKind::Glu { activation: Activation::Silu, clamp: Some(GluClamp::gpt_oss(7.0, 1.702)) };
    let back: ExpertKind = serde_json::from_str(&serde_json::to_string(&k).unwrap()).unwrap();
    assert_eq!(back, k);
}

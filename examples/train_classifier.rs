//! Trains a classifier with an MoE layer from scratch, the way DeepSpeed's CIFAR-10 MoE
//! example does (its last hidden layer becomes `deepspeed.moe.layer.MoE(...)` with a
//! residual MLP, top-2 gating and noisy gating), on the 8×8 handwritten digits that
//! scikit-learn ships (exported once to `examples/data/digits.safetensors`). Then it shows
//! Mixture-of-Students (DeepSpeed-MoE paper, section 5): a PR-MoE-shaped teacher (more
//! experts in the deeper MoE layer, residual MoE everywhere) distilled into a shallower
//! student with staged knowledge distillation (cross-entropy plus KL to the teacher's
//! soft labels, the KL term stopped after a configured step).
//!
//! ```text
//! x [B, 64] → fc1 (64 → 84) → ReLU → blocks (MoE or dense, 84 → 84) → fc4 (84 → 10) → logits
//! ```
//!
//! Every op runs through the engine's backend (forward, backward, AdamW over DeepSpeed's
//! MoE parameter groups); only the cross-entropy over the `[B, 10]` logits is computed on
//! the host. The dense baseline replaces the MoE layer by an MLP with the multiply-adds of
//! the MoE's active path (top-2 experts plus the residual MLP).
//!
//! Run with `cargo run --release --example train_classifier` (`-- --help` for options).
//! It prints a progress bar, the loss and accuracy per epoch and the per-expert load, and
//! writes an SVG of the loss curves and the expert load over time.

use clap::Parser;
use moe_cpu::CpuBackend;
use moe_engine::config::{DeepSpeedGate, ExpertSpec, GateSpec, LayerSpec, Mode, NoisyGatePolicy};
use moe_engine::losses::LossCoefs;
use moe_engine::ops::ActGradKind;
use moe_engine::train::{Grouping, Hyper, Optimizer, OptimizerSpec};
use moe_engine::{
    stack, Activation, Backend, BackwardOptions, ExpertKind, HostTensor, LayerOptions, MoeLayer, ParamMut, Result,
    Tensor,
};
use std::path::PathBuf;

/// Options of the example.
#[derive(Parser, Debug, Clone)]
struct Args {
    /// Training epochs of each network.
    #[arg(long, default_value_t = 30)]
    epochs: usize,
    /// Samples per step.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Experts of the MoE layer (the teacher's deeper layer has twice as many).
    #[arg(long, default_value_t = 4)]
    experts: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Weight of l_aux in the loss.
    #[arg(long, default_value_t = 0.01)]
    aux_coef: f64,
    /// Weight α of the distillation term: (1 − α) · CE + α · T² · KL.
    #[arg(long, default_value_t = 0.5)]
    kd_alpha: f64,
    /// Temperature T of the soft labels.
    #[arg(long, default_value_t = 2.0)]
    kd_temperature: f64,
    /// The fraction of the student's steps that distil (staged KD: cross-entropy only after).
    #[arg(long, default_value_t = 0.6)]
    kd_stop: f64,
    /// Where the SVG of the loss curves and expert load goes.
    #[arg(long, default_value = "train_classifier.svg")]
    svg: PathBuf,
    /// The digits file.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/data/digits.safetensors"))]
    data: PathBuf,
    /// Seed of the weights and the shuffles.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Skip the distillation part.
    #[arg(long)]
    no_distill: bool,
}

/// The digits: `[N, 64]` pixels in [0, 1] and labels, split into train and test.
struct Digits {
    train: (Vec<f32>, Vec<u8>),
    test: (Vec<f32>, Vec<u8>),
}

fn load_digits(path: &std::path::Path, seed: u64) -> Result<Digits> {
    let bytes =
        std::fs::read(path).map_err(|e| moe_engine::Error::Io { path: path.display().to_string(), source: e })?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| moe_engine::Error::config("data", format!("{}: {e}", path.display())))?;
    let get = |name: &str| {
        st.tensor(name).map(|t| t.data().to_vec()).map_err(|e| moe_engine::Error::MissingTensor(format!("{name}: {e}")))
    };
    let (pixels, labels) = (get("pixels")?, get("labels")?);
    let n = labels.len();
    if pixels.len() != n * 64 || labels.iter().any(|&l| l > 9) {
        return Err(moe_engine::Error::config("data", "pixels [N, 64] and labels [N] in 0..10 expected"));
    }
    let mut order: Vec<usize> = (0..n).collect();
    shuffle(&mut order, seed ^ 0xd161);
    let take = |ids: &[usize]| {
        let x = ids.iter().flat_map(|&i| pixels[i * 64..(i + 1) * 64].iter().map(|&p| p as f32 / 16.0)).collect();
        (x, ids.iter().map(|&i| labels[i]).collect())
    };
    let cut = n * 4 / 5;
    Ok(Digits { train: take(&order[..cut]), test: take(&order[cut..]) })
}

/// Fisher–Yates with a SplitMix64 stream (no dependency for a shuffle of indices).
fn shuffle(v: &mut [usize], seed: u64) {
    let mut s = seed;
    let mut next = || {
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    for i in (1..v.len()).rev() {
        v.swap(i, (next() % (i as u64 + 1)) as usize);
    }
}

/// Named gradients, in the optimizer's order.
type Grads<B> = Vec<(String, Tensor<B>)>;

/// A dense layer `x · Wᵀ + b` on the device, with its gradients.
struct Dense<B: Backend> {
    name: String,
    w: Tensor<B>,
    b: Tensor<B>,
}

impl<B: Backend> Dense<B> {
    fn new(be: &B, name: &str, out: usize, inp: usize, seed: u64) -> Result<Self> {
        // PyTorch's nn.Linear initialisation: U(-1/√in, 1/√in).
        let bound = 1.0 / (inp as f32).sqrt();
        let u = |n, stream| -> Vec<f32> {
            moe_engine::philox::noise(moe_engine::philox::NoiseKind::Uniform, seed, stream, n)
                .into_iter()
                .map(|v| (2.0 * v - 1.0) * bound)
                .collect()
        };
        Ok(Dense {
            name: name.into(),
            w: be.upload(&HostTensor::f32(&[out, inp], u(out * inp, 0))?)?,
            b: be.upload(&HostTensor::f32(&[out], u(out, 1))?)?,
        })
    }

    fn forward(&self, be: &B, x: &Tensor<B>) -> Result<Tensor<B>> {
        be.linear(x, &self.w, Some(&self.b))
    }

    /// `dx` and the named gradients of W and b.
    fn backward(&self, be: &B, x: &Tensor<B>, dy: &Tensor<B>) -> Result<(Tensor<B>, Grads<B>)> {
        let g = be.weight_grad(dy, x, None, true)?;
        let db = g.db.ok_or_else(|| moe_engine::Error::Internal("no bias gradient".into()))?;
        let dx = be.linear_dx(dy, &self.w, None)?;
        Ok((dx, vec![(format!("{}.weight", self.name), g.dw), (format!("{}.bias", self.name), db)]))
    }

    fn params_mut(&mut self) -> Vec<ParamMut<'_, B>> {
        vec![
            ParamMut { name: format!("{}.weight", self.name), expert: false, tensor: &mut self.w },
            ParamMut { name: format!("{}.bias", self.name), expert: false, tensor: &mut self.b },
        ]
    }
}

/// A hidden block: an MoE layer, or the dense MLP of the same active size.
enum Block<B: Backend> {
    Moe(Box<MoeLayer<B>>),
    Mlp(Dense<B>, Dense<B>),
}

/// What a block's forward kept for its backward.
enum Kept<B: Backend> {
    Moe(Box<moe_engine::LayerOutput<B>>),
    Mlp { x: Tensor<B>, pre: Tensor<B>, h: Tensor<B> },
}

/// The network of the example.
struct Net<B: Backend> {
    fc1: Dense<B>,
    blocks: Vec<Block<B>>,
    fc4: Dense<B>,
}

/// The cached activations of one forward.
struct Forward<B: Backend> {
    x: Tensor<B>,
    pre1: Tensor<B>,
    kept: Vec<Kept<B>>,
    h_last: Tensor<B>,
    logits: Tensor<B>,
}

const HIDDEN: usize = 84;
const FFN: usize = 64;

/// DeepSpeed's `MoE(hidden_size=84, expert=MLP(84, 64, 84), num_experts=e, k=2,
/// use_residual=True, noisy_gate_policy="Jitter")`.
fn moe_spec(experts: usize) -> LayerSpec {
    LayerSpec {
        output_bias: false,
        hidden: HIDDEN,
        num_experts: experts,
        gate: GateSpec::DeepSpeed(DeepSpeedGate {
            k: 2,
            capacity_factor: 1.25,
            eval_capacity_factor: 2.0,
            min_capacity: 4,
            noisy_gate_policy: Some(NoisyGatePolicy::Jitter),
            ..Default::default()
        }),
        expert: ExpertSpec { kind: ExpertKind::Mlp { activation: Activation::Relu }, ffn: FFN, bias: true },
        residual: true,
        shared: None,
    }
}

impl<B: Backend> Net<B> {
    /// `experts`: one entry per hidden block, its experts (0: the dense MLP of the MoE's
    /// active size, (k + 1) · FFN wide).
    fn new(be: &B, experts: &[usize], seed: u64) -> Result<Self> {
        let mut blocks = Vec::new();
        for (i, &e) in experts.iter().enumerate() {
            let s = seed * 100 + i as u64;
            blocks.push(if e == 0 {
                Block::Mlp(
                    Dense::new(be, &format!("block{i}.fc_in"), 3 * FFN, HIDDEN, s)?,
                    Dense::new(be, &format!("block{i}.fc_out"), HIDDEN, 3 * FFN, s + 50)?,
                )
            } else {
                let spec = moe_spec(e);
                let w = stack::random_weights(&spec, s)?;
                Block::Moe(Box::new(MoeLayer::new_trainable(be, spec, &w)?))
            });
        }
        Ok(Net {
            fc1: Dense::new(be, "fc1", HIDDEN, 64, seed * 100 + 90)?,
            blocks,
            fc4: Dense::new(be, "fc4", 10, HIDDEN, seed * 100 + 91)?,
        })
    }

    fn forward(&self, be: &B, x: &Tensor<B>, mode: Mode, seed: u64, train: bool) -> Result<Forward<B>> {
        let pre1 = self.fc1.forward(be, x)?;
        let mut h = be.activation(&pre1, Activation::Relu)?;
        let mut kept = Vec::new();
        for (i, blk) in self.blocks.iter().enumerate() {
            match blk {
                Block::Moe(layer) => {
                    let mut opts = LayerOptions { keep_activations: train, ..LayerOptions::mode(mode) };
                    opts.gate.seed = seed.wrapping_mul(31).wrapping_add(i as u64);
                    let out = layer.forward(be, &h, &opts)?;
                    h = out.y.clone();
                    kept.push(Kept::Moe(Box::new(out)));
                }
                Block::Mlp(a, b2) => {
                    let pre = a.forward(be, &h)?;
                    let hh = be.activation(&pre, Activation::Relu)?;
                    let y = b2.forward(be, &hh)?;
                    kept.push(Kept::Mlp { x: h, pre, h: hh });
                    h = y;
                }
            }
        }
        let logits = self.fc4.forward(be, &h)?;
        Ok(Forward { x: x.clone(), pre1, kept, h_last: h, logits })
    }

    /// Every gradient, in [`Net::params_mut`]'s order, from the gradient of the logits.
    fn backward(
        &self,
        be: &B,
        f: &Forward<B>,
        d_logits: &Tensor<B>,
        aux_coef: f64,
    ) -> Result<Vec<(String, Tensor<B>)>> {
        let (mut dh, g4) = self.fc4.backward(be, &f.h_last, d_logits)?;
        let mut block_grads = Vec::new();
        for (blk, kept) in self.blocks.iter().zip(&f.kept).rev() {
            match (blk, kept) {
                (Block::Moe(layer), Kept::Moe(out)) => {
                    let opts = BackwardOptions { losses: LossCoefs { l_aux: aux_coef, ..Default::default() } };
                    let g = layer.backward(be, out, &dh, &opts)?;
                    dh = g.dx.clone();
                    block_grads.push(g.into_named());
                }
                (Block::Mlp(a, b2), Kept::Mlp { x, pre, h }) => {
                    let (dhh, gb) = b2.backward(be, h, &dh)?;
                    let dpre = be.act_grad(ActGradKind::Activation(Activation::Relu), &dhh, pre)?;
                    let (dx, ga) = a.backward(be, x, &dpre)?;
                    dh = dx;
                    block_grads.push(ga.into_iter().chain(gb).collect());
                }
                _ => return Err(moe_engine::Error::Internal("block and kept state differ".into())),
            }
        }
        let dpre1 = be.act_grad(ActGradKind::Activation(Activation::Relu), &dh, &f.pre1)?;
        let (_, g1) = self.fc1.backward(be, &f.x, &dpre1)?;
        let mut all = g1;
        for (i, g) in block_grads.into_iter().rev().enumerate() {
            all.extend(g.into_iter().map(|(n, t)| (prefixed(i, &self.blocks[i], &n), t)));
        }
        all.extend(g4);
        Ok(all)
    }

    fn params_mut(&mut self) -> Vec<ParamMut<'_, B>> {
        let mut out = self.fc1.params_mut();
        for (i, blk) in self.blocks.iter_mut().enumerate() {
            match blk {
                Block::Moe(layer) => out.extend(
                    layer.params_mut().into_iter().map(|p| ParamMut { name: format!("block{i}.{}", p.name), ..p }),
                ),
                Block::Mlp(a, b2) => {
                    out.extend(a.params_mut());
                    out.extend(b2.params_mut());
                }
            }
        }
        out.extend(self.fc4.params_mut());
        out
    }
}

/// An MoE layer's gradient names carry the block's prefix, as its parameters do.
fn prefixed<B: Backend>(i: usize, blk: &Block<B>, name: &str) -> String {
    match blk {
        Block::Moe(_) => format!("block{i}.{name}"),
        Block::Mlp(..) => name.to_string(),
    }
}

/// Softmax of each row of `logits [B, 10]` at temperature `t`.
fn softmax_rows(logits: &[f32], t: f64) -> Vec<f64> {
    logits
        .chunks(10)
        .flat_map(|row| {
            let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let e: Vec<f64> = row.iter().map(|&v| ((v as f64 - mx) / t).exp()).collect();
            let s: f64 = e.iter().sum();
            e.into_iter().map(move |v| v / s)
        })
        .collect()
}

/// Cross-entropy of a batch (mean), its gradient in the logits, and the correct count;
/// with a teacher's logits, the staged-KD loss `(1 − α) · CE + α · T² · KL(teacher ‖ student)`.
fn loss_and_grad(logits: &[f32], labels: &[u8], teacher: Option<(&[f32], f64, f64)>) -> (f64, Vec<f32>, usize) {
    let n = labels.len();
    let p = softmax_rows(logits, 1.0);
    let alpha = teacher.map_or(0.0, |t| t.1);
    let mut loss = 0.0;
    let mut grad = vec![0f32; n * 10];
    let mut correct = 0;
    for (i, &y) in labels.iter().enumerate() {
        let row = &p[i * 10..(i + 1) * 10];
        loss += -(1.0 - alpha) * row[y as usize].max(1e-30).ln() / n as f64;
        for c in 0..10 {
            let onehot = if c == y as usize { 1.0 } else { 0.0 };
            grad[i * 10 + c] = ((1.0 - alpha) * (row[c] - onehot) / n as f64) as f32;
        }
        let best = (0..10).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap_or(0);
        correct += usize::from(best == y as usize);
    }
    if let Some((tl, alpha, t)) = teacher {
        // d/ds of T² · KL(softmax(t/T) ‖ softmax(s/T)) is T · (softmax(s/T) − softmax(t/T)).
        let (ps, pt) = (softmax_rows(logits, t), softmax_rows(tl, t));
        for i in 0..n * 10 {
            if pt[i] > 0.0 {
                loss += alpha * t * t * pt[i] * (pt[i].ln() - ps[i].max(1e-30).ln()) / n as f64;
            }
            grad[i] += (alpha * t * (ps[i] - pt[i]) / n as f64) as f32;
        }
    }
    (loss, grad, correct)
}

/// One network's training record.
struct History {
    name: String,
    loss: Vec<f64>,
    test_acc: Vec<f64>,
    /// Per epoch, the routes each expert of the first MoE block took (fractions).
    load: Vec<Vec<f64>>,
}

/// Accuracy of `net` on `(x, labels)` in eval mode.
fn accuracy<B: Backend>(be: &B, net: &Net<B>, data: &(Vec<f32>, Vec<u8>)) -> Result<f64> {
    let n = data.1.len();
    let x = be.upload(&HostTensor::f32(&[n, 64], data.0.clone())?)?;
    let f = net.forward(be, &x, Mode::Eval, 0, false)?;
    let logits = be.download(&f.logits)?;
    let (_, _, correct) = loss_and_grad(logits.as_f32("logits")?, &data.1, None);
    Ok(correct as f64 / n as f64)
}

/// Trains `net` for `epochs`, distilling from `teacher` for the first `kd_steps` steps.
#[allow(clippy::too_many_arguments)]
fn train<B: Backend>(
    be: &B,
    name: &str,
    net: &mut Net<B>,
    data: &Digits,
    a: &Args,
    teacher: Option<(&Net<B>, usize)>,
    quiet: bool,
) -> Result<History> {
    let spec = OptimizerSpec { hyper: Hyper { weight_decay: 0.01, ..Hyper::adamw(a.lr) }, gradient_clipping: 1.0 };
    let mut opt = Optimizer::for_params(&net.params_mut(), &spec, Grouping::DeepSpeed { ep_size: 1 })?;
    let n = data.train.1.len();
    let steps_per_epoch = n.div_ceil(a.batch);
    let mut hist = History { name: name.into(), loss: vec![], test_acc: vec![], load: vec![] };
    let mut order: Vec<usize> = (0..n).collect();
    let mut step = 0usize;
    for epoch in 0..a.epochs {
        shuffle(&mut order, a.seed.wrapping_mul(1000).wrapping_add(epoch as u64));
        let bar =
            if quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(steps_per_epoch as u64) };
        bar.set_style(
            indicatif::ProgressStyle::with_template("{prefix} {bar:30} {pos}/{len} steps {msg}")
                .expect("static template"),
        );
        bar.set_prefix(format!("{name:>8} epoch {:>2}", epoch + 1));
        let (mut loss_sum, mut correct) = (0.0, 0usize);
        let mut load: Vec<f64> = Vec::new();
        for chunk in order.chunks(a.batch) {
            let x: Vec<f32> = chunk.iter().flat_map(|&i| data.train.0[i * 64..(i + 1) * 64].iter().copied()).collect();
            let y: Vec<u8> = chunk.iter().map(|&i| data.train.1[i]).collect();
            let xt = be.upload(&HostTensor::f32(&[chunk.len(), 64], x)?)?;
            let f = net.forward(be, &xt, Mode::Train, (epoch * 1000 + step) as u64, true)?;
            let logits = be.download(&f.logits)?;
            let t_logits = match teacher {
                Some((t, kd_steps)) if step < kd_steps => {
                    Some(be.download(&t.forward(be, &xt, Mode::Eval, 0, false)?.logits)?)
                }
                _ => None,
            };
            let kd = t_logits.as_ref().map(|t| t.as_f32("teacher logits")).transpose()?;
            let (loss, grad, c) =
                loss_and_grad(logits.as_f32("logits")?, &y, kd.map(|t| (t, a.kd_alpha, a.kd_temperature)));
            loss_sum += loss * chunk.len() as f64;
            correct += c;
            if let Some(Kept::Moe(out)) = f.kept.first() {
                let rep = out.report(be)?;
                load.resize(rep.exp_counts.len(), 0.0);
                for (l, &c) in load.iter_mut().zip(&rep.exp_counts) {
                    *l += c as f64;
                }
                loss_sum += a.aux_coef * rep.losses.l_aux * chunk.len() as f64;
            }
            let d_logits = be.upload(&HostTensor::f32(&[chunk.len(), 10], grad)?)?;
            let grads = net.backward(be, &f, &d_logits, a.aux_coef)?;
            opt.step_params(be, net.params_mut(), grads)?;
            step += 1;
            bar.inc(1);
        }
        bar.finish_and_clear();
        let test = accuracy(be, net, &data.test)?;
        let total: f64 = load.iter().sum();
        let load: Vec<f64> = load.iter().map(|c| if total > 0.0 { c / total } else { 0.0 }).collect();
        let shown: Vec<String> =
            load.iter().take_while(|_| total > 0.0).map(|f| format!("{:.0}%", 100.0 * f)).collect();
        if !quiet {
            println!(
                "{name:>8} epoch {:>2}: loss {:.4}  train acc {:.1}%  test acc {:.1}%{}",
                epoch + 1,
                loss_sum / n as f64,
                100.0 * correct as f64 / n as f64,
                100.0 * test,
                if shown.is_empty() { String::new() } else { format!("  expert load [{}]", shown.join(" ")) }
            );
        }
        hist.loss.push(loss_sum / n as f64);
        hist.test_acc.push(test);
        hist.load.push(load);
    }
    Ok(hist)
}

/// An SVG with the loss curves (left) and the first MoE block's expert load per epoch
/// (right, stacked).
fn write_svg(path: &std::path::Path, runs: &[&History]) -> std::io::Result<()> {
    use svg::node::element::{Line, Polyline, Rectangle, Text};
    let (w, h, pad) = (900.0, 360.0, 40.0);
    let colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f"];
    let mut doc = svg::Document::new().set("viewBox", (0, 0, w, h)).set("width", w).set("height", h);
    doc = doc.add(Rectangle::new().set("width", w).set("height", h).set("fill", "white"));
    // Loss curves.
    let (pw, ph) = (w / 2.0 - 2.0 * pad, h - 2.0 * pad);
    let max_loss = runs.iter().flat_map(|r| r.loss.iter()).copied().fold(1e-9, f64::max);
    let epochs = runs.iter().map(|r| r.loss.len()).max().unwrap_or(1).max(2);
    doc = doc.add(Text::new("training loss per epoch").set("x", pad).set("y", pad - 12.0).set("font-size", 14));
    for (axis, (x2, y2)) in [(pad + pw, pad + ph), (pad, pad)].into_iter().enumerate() {
        let _ = axis;
        doc =
            doc.add(Line::new().set("x1", pad).set("y1", pad + ph).set("x2", x2).set("y2", y2).set("stroke", "black"));
    }
    for (i, r) in runs.iter().enumerate() {
        let pts: Vec<String> = r
            .loss
            .iter()
            .enumerate()
            .map(|(e, l)| {
                format!("{:.1},{:.1}", pad + pw * e as f64 / (epochs - 1) as f64, pad + ph * (1.0 - l / max_loss))
            })
            .collect();
        let c = colors[i % colors.len()];
        doc = doc.add(
            Polyline::new().set("points", pts.join(" ")).set("fill", "none").set("stroke", c).set("stroke-width", 2),
        );
        doc = doc.add(
            Text::new(format!("{} (test acc {:.1}%)", r.name, 100.0 * r.test_acc.last().copied().unwrap_or(0.0)))
                .set("x", pad + pw - 180.0)
                .set("y", pad + 16.0 * (i + 1) as f64)
                .set("fill", c)
                .set("font-size", 12),
        );
    }
    // Expert load of the first run with an MoE block, stacked per epoch.
    if let Some(r) = runs.iter().find(|r| r.load.iter().any(|l| l.iter().any(|&f| f > 0.0))) {
        let x0 = w / 2.0 + pad;
        doc = doc.add(
            Text::new(format!("{}: expert load per epoch", r.name))
                .set("x", x0)
                .set("y", pad - 12.0)
                .set("font-size", 14),
        );
        let bw = pw / r.load.len().max(1) as f64;
        for (e, l) in r.load.iter().enumerate() {
            let mut y = pad + ph;
            for (j, f) in l.iter().enumerate() {
                let hh = ph * f;
                y -= hh;
                doc = doc.add(
                    Rectangle::new()
                        .set("x", x0 + bw * e as f64)
                        .set("y", y)
                        .set("width", bw * 0.9)
                        .set("height", hh)
                        .set("fill", colors[j % colors.len()]),
                );
            }
        }
    }
    svg::save(path, &doc)
}

/// The whole example: MoE vs dense, then teacher → student; returns the histories.
fn run(a: &Args, quiet: bool) -> Result<Vec<History>> {
    let be = CpuBackend::new(Some(2))?;
    let data = load_digits(&a.data, a.seed)?;
    if !quiet {
        println!(
            "8x8 digits: {} training and {} test images; MoE layer: {} experts, top-2, residual, Jitter noise",
            data.train.1.len(),
            data.test.1.len(),
            a.experts
        );
    }
    let mut moe = Net::new(&be, &[a.experts], a.seed)?;
    let h_moe = train(&be, "moe", &mut moe, &data, a, None, quiet)?;
    let mut dense = Net::new(&be, &[0], a.seed)?;
    let h_dense = train(&be, "dense", &mut dense, &data, a, None, quiet)?;
    let mut runs = vec![h_moe, h_dense];
    if !a.no_distill {
        // PR-MoE-shaped teacher: two residual MoE layers, the deeper with twice the experts.
        let mut teacher = Net::new(&be, &[a.experts, 2 * a.experts], a.seed + 7)?;
        let h_t = train(&be, "teacher", &mut teacher, &data, a, None, quiet)?;
        // Mixture-of-Students: the teacher's deeper layer only; KD for the first kd_stop.
        let mut student = Net::new(&be, &[2 * a.experts], a.seed + 8)?;
        let steps = a.epochs * data.train.1.len().div_ceil(a.batch);
        let kd_steps = (a.kd_stop * steps as f64) as usize;
        let h_s = train(&be, "student", &mut student, &data, a, Some((&teacher, kd_steps)), quiet)?;
        // The same student shape trained without the teacher, for comparison.
        let mut alone = Net::new(&be, &[2 * a.experts], a.seed + 8)?;
        let h_a = train(&be, "no-KD", &mut alone, &data, a, None, quiet)?;
        runs.extend([h_t, h_s, h_a]);
    }
    Ok(runs)
}

fn main() -> Result<()> {
    let a = Args::parse();
    let runs = run(&a, false)?;
    let last = |r: &History| 100.0 * r.test_acc.last().copied().unwrap_or(0.0);
    println!();
    for r in &runs {
        println!("{:>8}: final test accuracy {:.1}%", r.name, last(r));
    }
    if runs.len() > 2 {
        println!(
            "Mixture-of-Students: student {:.1}% vs teacher {:.1}% (the same student without KD: {:.1}%)",
            last(&runs[3]),
            last(&runs[2]),
            last(&runs[4])
        );
    }
    write_svg(&a.svg, &runs.iter().collect::<Vec<_>>())
        .map_err(|e| moe_engine::Error::Io { path: a.svg.display().to_string(), source: e })?;
    println!("wrote {}", a.svg.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_run_learns() {
        let mut a = Args::parse_from(["train_classifier", "--epochs", "3", "--no-distill"]);
        a.svg = std::env::temp_dir().join("train_classifier_test.svg");
        let runs = run(&a, true).expect("trains");
        for r in &runs {
            assert!(r.loss.last() < r.loss.first(), "{}: loss {:?} does not fall", r.name, r.loss);
            let acc = *r.test_acc.last().expect("an epoch");
            assert!(acc > 0.5, "{}: test accuracy {acc} (chance is 0.1)", r.name);
        }
        write_svg(&a.svg, &runs.iter().collect::<Vec<_>>()).expect("svg");
        let text = std::fs::read_to_string(&a.svg).expect("svg written");
        assert!(text.contains("<polyline") && text.contains("expert load"), "the SVG has the curves and the load");
    }
}

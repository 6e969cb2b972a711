"""``moe_engine.torch.MoE`` against DeepSpeed's own ``deepspeed.moe.layer.MoE``, in one
process (ep_size = 1, no process group: DeepSpeed's layer needs none at ep_size 1).

Both layers get the same weights (DeepSpeed's state dict), the same tokens and the same
torch RNG seed before each forward, since both draw their noise (Jitter, RSample, RTS,
top-2 second-expert sampling) from torch's global generator. Checked: the output,
``l_aux``, ``exp_counts`` (exactly, dtype too), the generator's state after the forward
(the same draws were made), ``dx`` and every parameter's gradient of
``Σ y·dy + c·l_aux``, in train and in eval mode, and parameters after a few optimizer
steps.

Known limitation, deliberately not tested: k = 1 with ``use_rts=False`` *and* capacity
drops. DeepSpeed then picks the kept tokens with ``torch.topk`` over the 0/1 mask, whose
order among tied ones is implementation-defined (e.g. 16 tokens on one expert with
capacity 4 keep tokens 9..12), while the engine keeps tokens in order (first come). The
``use_rts=False`` configurations below therefore run with ``drop_tokens=False``.
"""

import os
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("deepspeed")
from deepspeed.moe.layer import MoE as DSMoE  # noqa: E402

from moe_engine.torch import MoE  # noqa: E402

M, F, E = 16, 24, 4
X_SHAPE = (2, 16, M)  # 32 tokens: capacity 8 per expert at capacity_factor 1
C_AUX = 0.1  # l_aux's weight in the loss

# Output, l_aux and gradients are float32 sums in different orders on the two sides:
# they agree to a few ulps (about 1e-7 relative); these bounds leave a margin.
Y_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)


def _mlp(act, bias=True):
    return lambda: nn.Sequential(nn.Linear(M, F, bias=bias), act(), nn.Linear(F, M, bias=bias))


EXPERTS = {
    "linear": lambda: nn.Linear(M, M),
    "linear_nobias": lambda: nn.Linear(M, M, bias=False),
    "gelu": _mlp(nn.GELU),
    "gelu_nobias": _mlp(nn.GELU, bias=False),
    "gelu_tanh": _mlp(lambda: nn.GELU(approximate="tanh")),
    "relu": _mlp(nn.ReLU),
    "relu_nobias": _mlp(nn.ReLU, bias=False),
    "silu": _mlp(nn.SiLU),
    "silu_nobias": _mlp(nn.SiLU, bias=False),
}
EXPERT_KINDS = list(EXPERTS)

# name: (DeepSpeed kwargs, the train forward drops routes, used_token kind)
GATINGS = {
    "k1_rts": (dict(k=1, use_rts=True, min_capacity=1), True, None),
    "k1_rts_mincap": (dict(k=1, use_rts=True, capacity_factor=0.5, min_capacity=6), True, None),
    "k1_rsample_rts": (dict(k=1, noisy_gate_policy="RSample", use_rts=True, min_capacity=1), True, None),
    "k1_jitter_rts": (dict(k=1, noisy_gate_policy="Jitter", use_rts=True, min_capacity=1), True, None),
    "k1_none_str_policy": (dict(k=1, noisy_gate_policy="None", use_rts=True, min_capacity=1), True, None),
    "k1_nodrop_rts": (dict(k=1, drop_tokens=False, use_rts=True), False, None),
    "k1_nodrop_norts": (dict(k=1, drop_tokens=False, use_rts=False), False, None),
    "k1_rsample_nodrop_norts": (dict(k=1, noisy_gate_policy="RSample", drop_tokens=False, use_rts=False), False, None),
    "k1_jitter_nodrop_norts": (dict(k=1, noisy_gate_policy="Jitter", drop_tokens=False, use_rts=False), False, None),
    "k1_evalcap": (dict(k=1, use_rts=True, capacity_factor=0.75, eval_capacity_factor=2.0, min_capacity=1), True, None),
    "k1_used_token_bool": (dict(k=1, use_rts=True, min_capacity=1), None, "bool"),
    "k1_used_token_int": (dict(k=1, use_rts=True, min_capacity=1), None, "int64"),
    "k1_used_token_nodrop": (dict(k=1, drop_tokens=False, use_rts=False), False, "bool"),
    "k2_top2s": (dict(k=2, top2_2nd_expert_sampling=True), None, None),
    "k2_no_top2s": (dict(k=2, top2_2nd_expert_sampling=False), None, None),
    "k2_drops": (dict(k=2, capacity_factor=0.5, min_capacity=1), True, None),
    "k2_drops_no_top2s": (dict(k=2, capacity_factor=0.5, min_capacity=1, top2_2nd_expert_sampling=False), True, None),
    "k2_nodrop": (dict(k=2, drop_tokens=False), False, None),
    "k2_jitter": (dict(k=2, noisy_gate_policy="Jitter", capacity_factor=0.5, min_capacity=1), True, None),
    # RSample is a k = 1 policy: DeepSpeed ignores it for k = 2 (no draw).
    "k2_rsample_ignored": (dict(k=2, noisy_gate_policy="RSample", capacity_factor=0.5, min_capacity=1), True, None),
    # used_token is a k = 1 argument: DeepSpeed ignores it for k >= 2.
    "k2_used_token_ignored": (dict(k=2, capacity_factor=0.5, min_capacity=1), True, "bool"),
    "k3": (dict(k=3, capacity_factor=1.0, min_capacity=1), None, None),
    "k3_drops": (dict(k=3, capacity_factor=0.5, min_capacity=1), True, None),
    "k3_nodrop": (dict(k=3, drop_tokens=False), False, None),
    "k3_jitter": (dict(k=3, noisy_gate_policy="Jitter", min_capacity=1), None, None),
    "k1_residual": (dict(k=1, use_rts=True, min_capacity=1, use_residual=True), True, None),
    "k2_residual": (dict(k=2, capacity_factor=0.5, min_capacity=1, use_residual=True), True, None),
}



def build(kind: str, seed: int = 0, **kw):
    """DeepSpeed's layer with random (distinct) weights, and the engine's built from the
    same keyword arguments and loaded from DeepSpeed's state dict."""
    torch.manual_seed(seed)
    ds = DSMoE(hidden_size=M, expert=EXPERTS[kind](), num_experts=E, ep_size=1, **kw)
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in ds.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    me = MoE(hidden_size=M, expert=EXPERTS[kind](), num_experts=E, ep_size=1, **kw)
    me.load_state_dict(ds.state_dict())
    return ds, me


def make_used_token(kind, n, gen):
    if kind is None:
        return None
    keep = torch.rand(n, generator=gen) < 0.6
    return keep if kind == "bool" else keep.to(torch.int64)


def max_diff(a, b) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item() if a.numel() else 0.0


def record(diffs, name, ref, got):
    """Keeps the largest absolute difference, and relative to the reference's largest
    magnitude."""
    d = max_diff(ref, got)
    diffs(name, d)
    scale = ref.detach().abs().max().item() if ref.numel() else 0.0
    diffs(name + " (rel)", d / scale if scale > 0 else d)


def compare_step(ds, me, x, diffs, *, seed, used_token=None, dy_seed=0, grads=True, c=C_AUX):
    """One forward (and backward) on both layers; asserts they agree."""
    xa = x.clone().requires_grad_(grads)
    xb = x.clone().requires_grad_(grads)
    torch.manual_seed(seed)
    ya, la, ca = ds(xa, used_token=used_token)
    rng_a = torch.get_rng_state()
    torch.manual_seed(seed)
    yb, lb, cb = me(xb, used_token=used_token)
    rng_b = torch.get_rng_state()

    assert torch.equal(rng_a, rng_b), "the engine drew a different amount of noise from torch's generator"
    assert yb.shape == ya.shape and yb.dtype == ya.dtype
    torch.testing.assert_close(yb, ya, **Y_TOL)
    assert lb.shape == la.shape == () and lb.dtype == la.dtype == torch.float32
    torch.testing.assert_close(lb, la, rtol=1e-6, atol=1e-6)
    assert cb.dtype == ca.dtype and torch.equal(cb, ca), f"exp_counts {cb.tolist()} vs DeepSpeed's {ca.tolist()}"
    record(diffs, "output", ya, yb)
    record(diffs, "l_aux", la, lb)
    if used_token is not None and ds.deepspeed_moe.gate.k == 1 and not ds.use_residual:
        masked = ~used_token.bool()
        assert torch.equal(yb.reshape(-1, M)[masked], torch.zeros_like(yb.reshape(-1, M)[masked]))

    if not grads:
        return me.last_report
    assert lb.requires_grad
    dy = torch.randn(ya.shape, generator=torch.Generator().manual_seed(dy_seed))
    ((ya * dy).sum() + c * la).backward()
    ((yb * dy).sum() + c * lb).backward()
    torch.testing.assert_close(xb.grad, xa.grad, **GRAD_TOL)
    record(diffs, "dx", xa.grad, xb.grad)
    pa, pb = dict(ds.named_parameters()), dict(me.named_parameters())
    assert list(pa) == list(pb)
    for name, p in pa.items():
        q = pb[name]
        assert (p.grad is None) == (q.grad is None), f"{name}: a gradient on one side only (DeepSpeed: {p.grad is not None})"
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, **GRAD_TOL, msg=lambda m: f"{name}: {m}")
            record(diffs, "grad " + ("gate" if ".gate." in name else "expert" if "experts" in name else "residual"),
                   p.grad, q.grad)
    return me.last_report


def tokens(seed, shape=X_SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- parity
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("gating", list(GATINGS))
def test_gating_matches_deepspeed(gating, mode, diffs):
    kw, drops, ut_kind = GATINGS[gating]
    kind = EXPERT_KINDS[list(GATINGS).index(gating) % len(EXPERT_KINDS)]
    ds, me = build(kind, seed=3, **kw)
    ds.train(mode == "train")
    me.train(mode == "train")
    gen = torch.Generator().manual_seed(11)
    for step in range(2):  # a second forward of the same layers, on other tokens and noise
        x = tokens(100 + step)
        ut = make_used_token(ut_kind, x.numel() // M, gen)
        report = compare_step(ds, me, x, diffs, seed=7 + step, used_token=ut, dy_seed=step)
        for p in list(ds.parameters()) + list(me.parameters()):
            p.grad = None
        if mode == "train" and drops is not None and step == 0:
            # The configuration does what its name says (drops routes or keeps them all).
            assert (report["dropped_routes"] > 0) == drops, report
    if mode == "eval":
        with torch.no_grad():
            compare_step(ds, me, tokens(300), diffs, seed=9, grads=False)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("gating", ["k1_rts", "k2_drops", "k3"])
@pytest.mark.parametrize("kind", EXPERT_KINDS)
def test_expert_kinds_match_deepspeed(kind, gating, mode, diffs):
    kw, _, _ = GATINGS[gating]
    ds, me = build(kind, seed=5, **kw)
    ds.train(mode == "train")
    me.train(mode == "train")
    compare_step(ds, me, tokens(200), diffs, seed=13)


def test_bfloat16_input_keeps_dtype(diffs):
    # DeepSpeed runs bf16 experts in bf16, the engine in float32 on the same (bf16-valued)
    # weights: the routing is the same (both gate in float32), the outputs agree to bf16.
    ds, me = build("gelu", seed=2, k=2)
    ds.to(torch.bfloat16)
    me.load_state_dict(ds.state_dict())
    x = tokens(4).to(torch.bfloat16)
    torch.manual_seed(1)
    ya, _, ca = ds(x)
    torch.manual_seed(1)
    yb, _, cb = me(x)
    assert yb.dtype == ya.dtype == torch.bfloat16
    torch.testing.assert_close(yb, ya, rtol=5e-2, atol=5e-2)
    assert torch.equal(ca, cb)


# ---------------------------------------------------------------------------- training
OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
}


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize(
    "kind,gating",
    [("gelu", "k1_rts"), ("relu", "k2_drops"), ("silu", "k1_jitter_rts"), ("linear", "k3"), ("gelu_nobias", "k1_rsample_rts")],
)
def test_optimizer_steps_match_deepspeed(kind, gating, opt, diffs):
    kw, _, _ = GATINGS[gating]
    ds, me = build(kind, seed=8, **kw)
    ds.train()
    me.train()
    oa, ob = OPTIMIZERS[opt](ds.parameters()), OPTIMIZERS[opt](me.parameters())
    for step in range(4):
        oa.zero_grad()
        ob.zero_grad()
        compare_step(ds, me, tokens(400 + step), diffs, seed=20 + step, dy_seed=50 + step)
        oa.step()
        ob.step()
        for (name, p), (_, q) in zip(ds.named_parameters(), me.named_parameters()):
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=lambda m: f"step {step}, {name}: {m}")
            record(diffs, f"params after {opt}", p, q)
    # The engine runs on the stepped weights (its layer is rebuilt), not on stale ones.
    with torch.no_grad():
        compare_step(ds, me, tokens(499), diffs, seed=99, grads=False)


@pytest.mark.parametrize("kind,gating", [("gelu", "k1_residual"), ("linear", "k2_residual")])
def test_residual_backward_matches_deepspeed(kind, gating, diffs):
    kw, _, _ = GATINGS[gating]
    ds, me = build(kind, seed=6, **kw)
    ds.train()
    me.train()
    oa, ob = torch.optim.SGD(ds.parameters(), lr=0.05), torch.optim.SGD(me.parameters(), lr=0.05)
    for step in range(2):
        oa.zero_grad()
        ob.zero_grad()
        compare_step(ds, me, tokens(600 + step), diffs, seed=30 + step, dy_seed=step)
        oa.step()
        ob.step()
        for (name, p), (_, q) in zip(ds.named_parameters(), me.named_parameters()):
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- state dict, construction
@pytest.mark.parametrize("kind,kw", [("gelu", {}), ("linear_nobias", {}), ("silu", {"use_residual": True})])
def test_state_dict_names_match_deepspeed(kind, kw):
    ds, me = build(kind, **kw)
    sa, sb = ds.state_dict(), me.state_dict()
    assert list(sb) == list(sa)
    for name in sa:
        assert sb[name].shape == sa[name].shape and sb[name].dtype == sa[name].dtype, name
        assert torch.equal(sb[name], sa[name]), name
    # And back: the engine's state dict loads into DeepSpeed's layer.
    ds2 = DSMoE(hidden_size=M, expert=EXPERTS[kind](), num_experts=E, **kw)
    ds2.load_state_dict(me.state_dict())
    # A fresh engine layer loads DeepSpeed's (strict) and runs on it.
    me2 = MoE(hidden_size=M, expert=EXPERTS[kind](), num_experts=E, **kw)
    res = me2.load_state_dict(ds.state_dict())
    assert not res.missing_keys and not res.unexpected_keys
    x = tokens(1)
    torch.manual_seed(0)
    y1 = me(x)[0]
    torch.manual_seed(0)
    y2 = me2(x)[0]
    assert torch.equal(y1, y2)


def test_deepspeed_parameter_marks():
    """DeepSpeed's utilities see the same expert parameters: ``allreduce=False`` and
    ``group_name`` on every expert parameter, the layer's ``expert_group_name``, and the
    optimizer's MoE parameter groups."""
    from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer

    ds, me = build("gelu", use_residual=True)
    assert me.expert_group_name == ds.expert_group_name == "ep_size_1"
    assert me.num_local_experts == ds.num_local_experts and me.num_experts == ds.num_experts
    for (name, p), (_, q) in zip(ds.named_parameters(), me.named_parameters()):
        assert is_moe_param(q) == is_moe_param(p), name
        assert getattr(q, "group_name", None) == getattr(p, "group_name", None), name
    ga = split_params_into_different_moe_groups_for_optimizer({"params": list(ds.parameters()), "name": "p"})
    gb = split_params_into_different_moe_groups_for_optimizer({"params": list(me.parameters()), "name": "p"})
    shape = lambda groups: [(g["name"], g.get("moe", False), [tuple(p.shape) for p in g["params"]]) for g in groups]
    assert shape(gb) == shape(ga)


def test_from_deepspeed(diffs):
    for kind, kw in [("relu", GATINGS["k2_drops"][0]), ("gelu_tanh", GATINGS["k1_residual"][0])]:
        ds, _ = build(kind, seed=4, **kw)
        ds.eval()
        me = MoE.from_deepspeed(ds)
        assert not me.training
        assert me.config["k"] == kw["k"] and me.use_residual == kw.get("use_residual", False)
        compare_step(ds, me, tokens(5), diffs, seed=3)
        ds.train()
        me.train()
        compare_step(ds, me, tokens(6), diffs, seed=4)
    with pytest.raises(ValueError, match="deepspeed_moe"):
        MoE.from_deepspeed(nn.Linear(M, M))


def test_use_tutel_warns():
    with pytest.warns(UserWarning, match="use_tutel"):
        MoE(hidden_size=M, expert=nn.Linear(M, M), num_experts=E, use_tutel=True)


class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(M, M)

    def forward(self, x):
        return self.fc(x).tanh()


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(noisy_gate_policy="Gaussian"), "noisy_gate_policy.*Gaussian"),
        (dict(num_experts=4, ep_size=3), "ep_size"),
        (dict(expert=nn.Sequential(nn.Linear(M, F), nn.Tanh(), nn.Linear(F, M))), "Tanh"),
        (dict(expert=_Custom()), "_Custom"),
        (dict(expert=nn.Sequential(nn.Linear(M, F), nn.ReLU())), "Sequential"),
        (dict(expert=nn.Linear(M, 2 * M)), r"Linear\(16, 32\)"),
        (dict(expert=nn.Sequential(nn.Linear(M, F), nn.ReLU(), nn.Linear(F + 1, M))), "hidden width"),
        (dict(backend="tpu"), "backend.*tpu"),
        (dict(k=0), "k"),
        (dict(k=5), "k"),
        (dict(num_experts=0), "num_experts"),
        # ep_size > 1 needs torch.distributed (not initialised in this process).
        (dict(num_experts=4, ep_size=2), "torch.distributed"),
    ],
)
def test_bad_arguments_raise(kw, match):
    args = dict(hidden_size=M, expert=nn.Linear(M, M), num_experts=E)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        MoE(**args)


def test_bad_inputs_raise():
    me = MoE(hidden_size=M, expert=EXPERTS["gelu"](), num_experts=E)
    with pytest.raises(ValueError, match="hidden"):
        me(torch.randn(4, M + 1))
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(2, 8, M)
        x[1, 3, 5] = bad
        with pytest.raises(ValueError, match="non-finite"):
            me(x)
    with pytest.raises(ValueError, match="used_token"):
        me(torch.randn(2, 8, M), used_token=torch.ones(15, dtype=torch.bool))
    # The layer is still usable after the errors.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, l_aux, counts = me(torch.randn(2, 8, M))
    assert y.shape == (2, 8, M) and torch.isfinite(y).all() and int(counts.sum()) == 16


def test_backends_other_than_cpu():
    """A backend the machine lacks is a RuntimeError naming it (a device failure, not bad
    input); where wgpu has an adapter (lavapipe in CI), the drop-in agrees with the cpu."""
    import moe_engine

    kw = dict(hidden_size=M, expert=EXPERTS["gelu"](), num_experts=E, k=2)
    if moe_engine.auto_backend() != "cuda":
        with pytest.raises(RuntimeError, match="(?i)cuda"):
            MoE(**kw, backend="cuda")
    try:
        me_gpu = MoE(**kw, backend="wgpu")
    except RuntimeError as e:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"no wgpu adapter here: {e}")
    me = MoE(**kw)
    with torch.no_grad():  # distinct experts (all start as copies of one)
        for p in me.parameters():
            p.normal_(0.0, 0.3)
    me_gpu.load_state_dict(me.state_dict())
    x = tokens(7)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    # The same draws for the second-expert sampling on both.
    torch.manual_seed(3)
    ya, la, ca = me.eval()(xa)
    torch.manual_seed(3)
    yb, lb, cb = me_gpu.eval()(xb)
    torch.testing.assert_close(yb, ya, rtol=1e-4, atol=1e-5)
    assert torch.equal(ca, cb) and abs(la.item() - lb.item()) < 1e-5
    ya.sum().backward()
    yb.sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)
    for (n, p), (_, q) in zip(me.named_parameters(), me_gpu.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")

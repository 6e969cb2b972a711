"""``moe_engine.torch.patch`` against the unpatched transformers model.

Tiny random models (f32, eval, seeded) of each family are built from configs; a deep copy
is patched and must give the same logits, router logits, aux loss and greedy tokens as the
original, with the engine (not torch) running the MoE blocks.
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from torch import nn  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

import moe_engine.torch as met  # noqa: E402
from _report import record_diff  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
transformers.logging.set_verbosity_error()

ATOL, RTOL = 1e-5, 1e-4
VOCAB = 128

COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.15,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)

# family -> (config overrides, decoder layers that hold an MoE block)
FAMILIES = {
    "mixtral": (dict(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2), [0, 1]),
    "qwen3_moe": (dict(
        num_hidden_layers=3, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16,
        head_dim=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1],
    ), [0, 2]),
    "deepseek_v3": (dict(
        num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2,
        n_group=4, topk_group=2, n_shared_experts=1, moe_intermediate_size=16,
        routed_scaling_factor=2.5, norm_topk_prob=True, kv_lora_rank=16, q_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4,
    ), [1, 2]),
    "gpt_oss": (dict(
        num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
        sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        swiglu_limit=0.5,  # small, so that the clamps of the gated activation really bite
    ), [0, 1]),
    "qwen2_moe": (dict(
        num_hidden_layers=3, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, decoder_sparse_step=1, mlp_only_layers=[0],
    ), [1, 2]),
    "olmoe": (dict(num_hidden_layers=2, num_experts=4, num_experts_per_tok=2), [0, 1]),
}
# families whose CausalLM output has an aux (load balancing) loss with output_router_logits
HAS_AUX = {"mixtral", "qwen3_moe", "gpt_oss", "qwen2_moe", "olmoe"}


def build(family: str, seed: int = 0) -> nn.Module:
    overrides, _ = FAMILIES[family]
    cfg = AutoConfig.for_model(family, **{**COMMON, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            # Terms that init to zero would go untested: DeepSeek's routing correction bias
            # and gpt-oss's expert biases.
            if name.endswith(("e_score_correction_bias", "gate_up_proj_bias", "down_proj_bias")):
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    return model


def moe_blocks(model: nn.Module) -> dict:
    """{layer index: the layer's MoE block} as the test (not patch) sees them."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        if any(type(c).__name__.endswith("Router") for c in mlp.children()):
            out[i] = mlp
    return out


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in the second row
    return ids, mask


def maxdiff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def close(actual, expected, what, key=None):
    """``actual`` is ``expected`` to the tolerance; ``key`` names the recorded max diff."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    if key is not None:
        record_diff(f"hf.{key}", maxdiff(actual, expected))
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL,
                               msg=lambda m: f"{what}: max diff {maxdiff(actual, expected):.3g}\n{m}")


@pytest.fixture(scope="module", params=list(FAMILIES))
def fam(request):
    family = request.param
    ref = build(family)
    pat = copy.deepcopy(ref)
    sd = {k: v.clone() for k, v in pat.state_dict().items()}
    n = met.patch(pat, backend="cpu")
    return dict(family=family, ref=ref, pat=pat, n=n, sd=sd, layers=FAMILIES[family][1])


def test_patch_count_and_classes(fam):
    ref, pat = fam["ref"], fam["pat"]
    assert moe_blocks(ref).keys() == set(fam["layers"])  # the configs give what they mean to
    assert fam["n"] == len(fam["layers"])
    for i, (rl, pl) in enumerate(zip(ref.model.layers, pat.model.layers)):
        if i in fam["layers"]:
            assert type(pl.mlp) is not type(rl.mlp)
            assert isinstance(pl.mlp, type(rl.mlp))  # a subclass in place: isinstance still holds
            assert type(pl.mlp).__name__ == type(rl.mlp).__name__
        else:
            assert type(pl.mlp) is type(rl.mlp)  # dense MLP layers are left alone
    # no parameter or buffer is renamed, moved or changed
    sd = pat.state_dict()
    assert list(sd) == list(fam["sd"])
    for k, v in fam["sd"].items():
        assert torch.equal(sd[k], v), k


def test_block_outputs(fam):
    """Each patched block on its own, on inputs larger than the model's own activations."""
    g = torch.Generator().manual_seed(5)
    ref_blocks, pat_blocks = moe_blocks(fam["ref"]), moe_blocks(fam["pat"])
    for i in fam["layers"]:
        x = torch.randn(3, 5, 32, generator=g) * 2.0
        with torch.no_grad():
            r, p = ref_blocks[i](x), pat_blocks[i](x)
        assert type(r) is type(p)
        if isinstance(r, tuple):  # gpt-oss: (output, routing scores)
            assert len(r) == len(p)
            for j, (a, b) in enumerate(zip(r, p)):
                close(b, a, f"{fam['family']} layer {i} block output[{j}]", f"{fam['family']}.block")
        else:
            close(p, r, f"{fam['family']} layer {i} block output", f"{fam['family']}.block")
        y = r[0] if isinstance(r, tuple) else r
        assert y.abs().max() > 1e-2  # the MoE really contributes at this scale


def test_logits(fam):
    ids, mask = inputs()
    with torch.no_grad():
        r = fam["ref"](ids).logits
        p = fam["pat"](ids).logits
        rm = fam["ref"](ids, attention_mask=mask).logits
        pm = fam["pat"](ids, attention_mask=mask).logits
    close(p, r, f"{fam['family']} logits", f"{fam['family']}.logits")
    close(pm, rm, f"{fam['family']} logits (padded)", f"{fam['family']}.logits")


def test_router_logits_and_aux_loss(fam):
    ids, mask = inputs(2)
    with torch.no_grad():
        r = fam["ref"](ids, attention_mask=mask, output_router_logits=True)
        p = fam["pat"](ids, attention_mask=mask, output_router_logits=True)
    close(p.logits, r.logits, f"{fam['family']} logits (output_router_logits)")
    assert len(r.router_logits) == len(fam["layers"])
    assert len(p.router_logits) == len(r.router_logits)
    for i, (a, b) in enumerate(zip(r.router_logits, p.router_logits)):
        close(b, a, f"{fam['family']} router_logits[{i}]", f"{fam['family']}.router_logits")
    if fam["family"] in HAS_AUX:
        assert r.aux_loss is not None and p.aux_loss is not None
        close(p.aux_loss, r.aux_loss, f"{fam['family']} aux_loss", f"{fam['family']}.aux_loss")
    else:
        assert r.aux_loss is None and p.aux_loss is None


def test_generate(fam):
    ids, mask = inputs(3)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        r = fam["ref"].generate(ids, **kw)
        p = fam["pat"].generate(ids, **kw)
    assert r.shape == p.shape and r.shape[1] > ids.shape[1]
    assert torch.equal(p, r), (p, r)


def test_idempotent_and_unpatch(fam):
    ids, _ = inputs(4)
    model = copy.deepcopy(fam["ref"])
    n = len(fam["layers"])
    assert met.patch(model, backend="cpu") == n
    assert met.patch(model, backend="cpu") == 0  # nothing more to patch
    blocks = moe_blocks(model)
    with torch.no_grad():
        ref = fam["ref"](ids).logits
        close(model(ids).logits, ref, f"{fam['family']} logits after a second patch")
    assert met.unpatch(model) == n
    orig = moe_blocks(fam["ref"])
    for i, b in blocks.items():
        assert type(b) is type(orig[i])
        assert not any(a.startswith("_moe") for a in vars(b))
    for (name, a), b in zip(model.named_modules(), fam["ref"].modules()):
        assert type(a) is type(b), name  # blocks and routers alike
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)  # the original forward again, bit for bit
    assert met.unpatch(model) == 0
    assert met.patch(model, backend="cpu") == n  # and can be patched again


class _TouchedParams(TorchFunctionMode):
    """Records which of the given tensors any torch function reads."""

    def __init__(self, tensors):
        super().__init__()
        self.ids = {id(t): name for name, t in tensors}
        self.touched = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        for a in tree_flatten((args, kwargs or {}))[0]:
            if id(a) in self.ids:
                self.touched.add(self.ids[id(a)])
        return func(*args, **(kwargs or {}))


class _EngineSpy:
    """Wraps a block's engine: counts calls and shifts what it returns."""

    def __init__(self, engine, dy=0.0, dlogits=0.0):
        self.engine, self.dy, self.dlogits, self.calls = engine, dy, dlogits, 0

    def forward(self, x):
        self.calls += 1
        out = dict(self.engine.forward(x))
        out["y"] = out["y"] + self.dy
        out["logits"] = out["logits"] + self.dlogits
        return out

    def __getattr__(self, name):
        return getattr(self.engine, name)


def test_engine_runs_instead_of_torch(fam):
    ids, _ = inputs(5)
    ref = copy.deepcopy(fam["ref"])
    with torch.no_grad():
        want = ref(ids, output_router_logits=True)  # recorder hooks installed before patching
    model = copy.deepcopy(ref)
    assert met.patch(model, backend="cpu") == len(fam["layers"])
    blocks = moe_blocks(model)
    params = [(f"{i}.{n}", t) for i, b in blocks.items()
              for n, t in list(b.named_parameters()) + list(b.named_buffers())]

    # Not one weight of an MoE block (router, experts, shared experts) is read by torch...
    with torch.no_grad(), _TouchedParams(params) as spy:
        got = model(ids, output_router_logits=True)
    assert spy.touched == set(), sorted(spy.touched)
    close(got.logits, want.logits, f"{fam['family']} logits (hooks before patch)")
    for a, b in zip(want.router_logits, got.router_logits):
        close(b, a, f"{fam['family']} router_logits (hooks before patch)")
    # ...while the unpatched model reads them all (the spy sees what it should).
    ref_params = [(f"{i}.{n}", t) for i, b in moe_blocks(ref).items()
                  for n, t in list(b.named_parameters()) + list(b.named_buffers())]
    with torch.no_grad(), _TouchedParams(ref_params) as spy:
        ref(ids)
    assert spy.touched == {n for n, _ in ref_params}

    # The engine's outputs are the ones the model records and uses.
    engines = {i: b._moe_engine for i, b in blocks.items()}
    spies = {i: _EngineSpy(e, dlogits=1.0) for i, e in engines.items()}
    for i, b in blocks.items():
        b._moe_engine = spies[i]
    with torch.no_grad():
        shifted = model(ids, output_router_logits=True)
    assert all(s.calls == 1 for s in spies.values())
    assert len(shifted.router_logits) == len(want.router_logits)
    for a, b in zip(want.router_logits, shifted.router_logits):
        close(b, a + 1.0, f"{fam['family']} recorded router_logits are the engine's")
    close(shifted.logits, want.logits, f"{fam['family']} logits (logits shifted only)")
    for i, b in blocks.items():
        b._moe_engine = _EngineSpy(engines[i], dy=0.5)
    with torch.no_grad():
        moved = model(ids).logits
    assert maxdiff(moved, want.logits) > 1e-2


def test_deepseek_correction_bias_matters():
    """The DeepSeek-V3 tests cover the routing bias: without it, the block routes otherwise."""
    model = build("deepseek_v3")
    block = model.model.layers[1].mlp
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)).view(4, 16, 32) * 2
    with torch.no_grad():
        with_bias = block(x)
        idx_bias = block.gate(x)[2].sort(-1).values
        block.gate.e_score_correction_bias.zero_()
        without = block(x)
        idx_plain = block.gate(x)[2].sort(-1).values
    assert not torch.equal(idx_bias, idx_plain)
    assert maxdiff(with_bias, without) > 1e-2


def test_gpt_oss_clamp_bites():
    """The gpt-oss tests cover swiglu_limit: the expert pre-activations pass it."""
    model = build("gpt_oss")
    ex = model.model.layers[0].mlp.experts
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(0)) * 2
    with torch.no_grad():
        gate_up = x @ ex.gate_up_proj[0] + ex.gate_up_proj_bias[0]
    assert (gate_up.abs() > ex.limit).float().mean() > 0.1


# ---- bad inputs -------------------------------------------------------------------------


def test_patch_rejects_non_models():
    with pytest.raises(ValueError, match="transformers config"):
        met.patch(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="torch module"):
        met.patch("mixtral")
    with pytest.raises(ValueError, match="torch module"):
        met.patch(None)


def test_patch_rejects_unsupported_family():
    cfg = AutoConfig.for_model("llama", **{**COMMON, "num_hidden_layers": 1})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(ValueError, match=r"llama.*not an MoE family"):
        met.patch(model)


def test_patch_rejects_bad_backend_and_leaves_model_alone():
    ref = build("mixtral")
    model = copy.deepcopy(ref)
    with pytest.raises(ValueError, match=r"backend.*nope"):
        met.patch(model, backend="nope")
    for a, b in zip(model.modules(), ref.modules()):
        assert type(a) is type(b)
    assert met.patch(model, backend="cpu") == 2  # still patchable


def test_patch_rejects_config_that_disagrees_with_model():
    model = build("qwen3_moe")
    model.config.mlp_only_layers = [0, 1, 2]  # the config now says every layer is dense
    with pytest.raises(ValueError, match="dense"):
        met.patch(model)
    assert all(type(b).__dict__.get("_moe_engine_patched") is None for b in model.modules())


# ---- wgpu (lavapipe on CI) --------------------------------------------------------------


def test_wgpu_mixtral():
    ref = build("mixtral")
    model = copy.deepcopy(ref)
    try:
        n = met.patch(model, backend="wgpu")
    except RuntimeError as e:
        pytest.skip(f"no wgpu adapter: {e}")
    assert n == 2
    ids, mask = inputs(6)
    with torch.no_grad():
        r = ref(ids, attention_mask=mask, output_router_logits=True)
        p = model(ids, attention_mask=mask, output_router_logits=True)
        rg = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        pg = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    close(p.logits, r.logits, "wgpu mixtral logits", "wgpu.mixtral.logits")
    for a, b in zip(r.router_logits, p.router_logits):
        close(b, a, "wgpu mixtral router_logits", "wgpu.mixtral.router_logits")
    close(p.aux_loss, r.aux_loss, "wgpu mixtral aux_loss", "wgpu.mixtral.aux_loss")
    assert torch.equal(pg, rg)

"""``moe_engine.torch.patch`` on every family of ``tests/golden-models``.

Each ``NN_<family>/model`` folder is a complete tiny model that transformers 5.23 saved
with ``save_pretrained`` (the family's checkpoint layout; 31-33 as published checkpoints
store them: MXFP4, FP8 with block scales, bf16). The test loads it as a user would
(``AutoModelForCausalLM.from_pretrained``, f32), patches a deep copy and checks:

* the patched blocks are the model's MoE blocks, at the layers the engine says;
* the patched block of the case's layer gives the case's ``expect/y`` and
  ``expect/router_logits`` on its ``input/x`` (the oracle's own transformers run);
* the model's logits match the unpatched model's, and greedy generation gives the same
  tokens.

Where the tiny model cannot run whole in transformers 5.23 as saved, the load is adjusted
without changing a tensor (see ``load``).
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

import moe_engine.torch as met  # noqa: E402
from moe_engine import _native  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
transformers.logging.set_verbosity_error()

from _report import record_diff  # noqa: E402

ROOT = Path(__file__).parents[2] / "tests/golden-models"
CASES = sorted(p.parent for p in ROOT.glob("[0-9][0-9]_*/model") if p.is_dir())
REL = 1e-5  # the cases' tolerance (rel_l2), and the logits' (max |diff| / max |ref|)
NEW_TOKENS = 6


def record(key, value):
    record_diff(f"fam.{key}", value)


def load(folder: Path):
    """The saved model, f32, eval; skips (with the reason) where transformers cannot load it
    on this machine. The adjustments change no tensor:

    * DeepSeek-V2/V3/V3.2 (MLA): the tiny configs have ``num_key_value_heads`` below
      ``num_attention_heads``, which transformers 5.23's MLA attention cannot run (it
      repeats the per-head keys by the group count: "size of tensor a (4) must match the
      size of tensor b (8)"); MLA has no key/value-head weights, so the heads are set equal.
    * DBRX: ``clip_qkv: null`` makes transformers 5.23 call ``clamp(min=None, max=None)``,
      an error; a bound no activation reaches (1e30) is the same model.
    * MXFP4 (gpt-oss): ``Mxfp4Config(dequantize=True)``, transformers' own dequantizer.
    * FP8 (DeepSeek-V3): transformers dequantizes on a CPU by itself, but needs the
      ``accelerate`` package for it; the tensors it keeps unquantized stay bf16 whatever
      ``dtype`` says, so the model is cast to f32 after loading.
    """
    model_dir = folder / "model"
    raw = json.loads((model_dir / "config.json").read_text())
    quant = (raw.get("quantization_config") or {}).get("quant_method")
    kwargs = {}
    if quant == "mxfp4":
        kwargs["quantization_config"] = transformers.Mxfp4Config(dequantize=True)
    elif quant == "fp8":
        if importlib.util.find_spec("accelerate") is None:
            reason = f"{folder.name}: transformers needs `accelerate` to load (dequantize) an FP8 checkpoint"
            print(f"\nSKIP {reason}")
            pytest.skip(reason)
    elif quant is not None:  # pragma: no cover - no such case
        pytest.fail(f"{folder.name}: unexpected quantization {quant}")
    cfg = AutoConfig.from_pretrained(model_dir)
    if "kv_lora_rank" in raw and raw.get("num_key_value_heads") not in (None, raw["num_attention_heads"]):
        cfg.num_key_value_heads = cfg.num_attention_heads
    if raw.get("model_type") == "dbrx" and cfg.attn_config.clip_qkv is None:
        cfg.attn_config.clip_qkv = 1e30
    model, info = AutoModelForCausalLM.from_pretrained(
        model_dir, config=cfg, dtype=torch.float32, output_loading_info=True, **kwargs
    )
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info[key], (folder.name, key, info[key])
    return model.float().eval()


def blocks_of(model, case):
    """{qualified name: block} of every module of the case's block class."""
    return {n: m for n, m in model.named_modules() if type(m).__name__ == case["block_class"]}


def hash_layers(model) -> set:
    """DeepSeek-V4's hash-routed MoE layers (experts from a token-id table, not from the
    hidden states): the engine does not run them, so ``patch`` leaves them to torch."""
    types = getattr(model.config.get_text_config(), "mlp_layer_types", None) or []
    return {i for i, t in enumerate(types) if t == "hash_moe"}


def layer_of(name: str) -> int:
    parts = name.split(".")
    return int(parts[-2])


def rel_l2(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def rel_max(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def fam(request):
    folder = request.param
    case = json.loads((folder / "case.json").read_text())
    ref = load(folder)
    pat = copy.deepcopy(ref)
    n = met.patch(pat, backend="cpu")
    return dict(name=folder.name, folder=folder, case=case, ref=ref, pat=pat, n=n)


def test_patched_blocks(fam):
    """Every MoE block the engine runs is patched, and nothing else."""
    ref, pat, case = fam["ref"], fam["pat"], fam["case"]
    blocks = blocks_of(pat, case)
    assert case["block_path_in_memory"] in blocks
    hashed = hash_layers(pat)
    want = {n for n in blocks if layer_of(n) not in hashed}
    patched = {n for n, m in pat.named_modules() if type(m).__dict__.get("_moe_engine_patched")}
    assert patched == want, (sorted(patched), sorted(want))
    assert fam["n"] == len(want)
    _, moe_layers = _native.hf_moe_layers(pat.config.to_json_string(use_diff=False))
    assert sorted(layer_of(n) for n in patched) == sorted(moe_layers)
    if hashed:  # DeepSeek-V4: its hash-routed layers are there, and left alone
        assert any(layer_of(n) in hashed for n in blocks)
    # no parameter or buffer is renamed, moved or changed
    rs, ps = ref.state_dict(), pat.state_dict()
    assert list(ps) == list(rs)
    for k, v in rs.items():
        assert torch.equal(ps[k], v), k


def test_block_matches_case(fam):
    """The case's block, patched, on the case's input: the oracle's y and router logits."""
    case, folder = fam["case"], fam["folder"]
    t = load_file(str(folder / "tensors.safetensors"))
    x, y_want, logits_want = t["input/x"], t["expect/y"], t["expect/router_logits"]
    outs = {}
    for which in ("ref", "pat"):  # the unpatched block too: the model loaded as the oracle saved it
        model = fam[which]
        block = model.get_submodule(case["block_path_in_memory"])
        seen = {}
        h = None
        if which == "pat":
            # A hook on the router makes the patched block replay the engine's logits through it.
            idx = block._moe_router_index

            def hook(mod, args, out):
                seen["logits"] = out[idx] if isinstance(out, tuple) else out

            h = block._modules[block._moe_router_attr].register_forward_hook(hook)
        try:
            with torch.no_grad():
                outs[which] = out = block(x[None])
                y = (out[0] if isinstance(out, tuple) else out).reshape(x.shape)
                for extra in case.get("extra_modules_added_to_y") or []:  # granitemoeshared's shared_mlp
                    y = y + model.get_submodule(extra)(x[None]).reshape(x.shape)
        finally:
            if h is not None:
                h.remove()
        err = rel_l2(y, y_want)
        record(f"{fam['name']}.block_y.{which}", err)
        assert err <= REL, f"{fam['name']} ({which}) block y: rel_l2 {err:.3g}"
    # The patched block returns what the original does: a tensor of its shape, or a tuple of
    # them (gpt-oss's routing weights, Llama 4's router logits).
    r, p = outs["ref"], outs["pat"]
    assert type(p) is type(r)
    assert not isinstance(r, tuple) or len(p) == len(r)
    for a, b in zip(r, p) if isinstance(r, tuple) else [(r, p)]:
        assert (a is None) == (b is None)
        if a is not None:
            assert b.shape == a.shape and b.dtype == a.dtype, (b.shape, a.shape, b.dtype, a.dtype)
            err = rel_l2(b, a)
            record(f"{fam['name']}.block_outputs", err)
            assert err <= REL, f"{fam['name']} patched block output: rel_l2 {err:.3g}"
    logits = seen["logits"].reshape(logits_want.shape)
    err = rel_l2(logits, logits_want)
    record(f"{fam['name']}.router_logits", err)
    assert err <= REL, f"{fam['name']} patched router logits: rel_l2 {err:.3g}"


def inputs(model, seed=0):
    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (2, 8), generator=g)


def test_logits(fam):
    ids = inputs(fam["ref"])
    with torch.no_grad():
        r = fam["ref"](ids).logits
        p = fam["pat"](ids).logits
    assert p.shape == r.shape and p.dtype == r.dtype
    err = rel_max(p, r)
    record(f"{fam['name']}.logits", err)
    assert err <= REL, f"{fam['name']} logits: max |patched - ref| / max |ref| = {err:.3g}"


def test_generate(fam):
    ids = inputs(fam["ref"], seed=1)
    pad = fam["ref"].config.get_text_config().pad_token_id
    kw = dict(
        attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
        do_sample=False, pad_token_id=0 if pad is None else pad,
    )
    with torch.no_grad():
        r = fam["ref"].generate(ids, **kw)
        p = fam["pat"].generate(ids, **kw)
    assert r.shape == (2, ids.shape[1] + NEW_TOKENS)
    assert torch.equal(p, r), (fam["name"], p, r)


def test_router_logits_and_aux_loss(fam):
    """``output_router_logits=True``: the recorded logits (the engine's, replayed through the
    routers' hooks) and the aux loss, where the family has one."""
    ids = inputs(fam["ref"], seed=2)
    with torch.no_grad():
        r = fam["ref"](ids, output_router_logits=True)
        p = fam["pat"](ids, output_router_logits=True)
    assert len(p.router_logits) == len(r.router_logits) > 0
    for i, (a, b) in enumerate(zip(r.router_logits, p.router_logits)):
        assert b.shape == a.shape and b.dtype == a.dtype
        err = rel_max(b, a)
        record(f"{fam['name']}.recorded_router_logits", err)
        assert err <= REL, f"{fam['name']} router_logits[{i}]: {err:.3g}"
    ra, pa = getattr(r, "aux_loss", None), getattr(p, "aux_loss", None)
    assert (ra is None) == (pa is None)
    if ra is not None:
        err = abs(pa.item() - ra.item()) / abs(ra.item())
        record(f"{fam['name']}.aux_loss", err)
        assert err <= REL, f"{fam['name']} aux_loss: {err:.3g}"


def test_unpatch(fam):
    """``unpatch`` gives the original model back, bit for bit; a second patch patches nothing."""
    model = copy.deepcopy(fam["ref"])
    n = fam["n"]
    assert met.patch(model, backend="cpu") == n
    assert met.patch(model, backend="cpu") == 0
    assert met.unpatch(model) == n
    for (name, a), b in zip(model.named_modules(), fam["ref"].modules()):
        assert type(a) is type(b), name
    ids = inputs(fam["ref"], seed=3)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fam["ref"](ids).logits)


def test_quantized_block_is_refused():
    """A block still holding quantized tensors (not dequantized on loading) is refused."""
    folder = ROOT / "01_mixtral"
    if not folder.is_dir():
        pytest.skip("no 01_mixtral case")
    model = load(folder)
    block = model.model.layers[0].mlp
    block.experts.down_proj.data = block.experts.down_proj.data.to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="quantized model"):
        met.patch(model)
    assert not any(type(m).__dict__.get("_moe_engine_patched") for m in model.modules())

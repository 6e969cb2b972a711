"""``patch(model)``: every MoE block of a transformers model runs on the engine.

transformers 5 records router logits with a forward hook on each block's router
(``_can_record_outputs["router_logits"]``, an ``OutputRecorder`` of the router class), so
the blocks are found from that spec (a block is a module with a router child) and patched
in place: the block's class becomes a subclass of its own whose ``forward`` runs the
engine, and the router stays where it is, called only to replay the engine's logits
through its hooks. Names, parameters, ``isinstance`` checks and everything else of the
model are left as they were; ``unpatch`` restores the classes.

The engine reads a block in its family's checkpoint layout (the names and shapes
``save_pretrained`` writes), which for several families differs from the modules in memory
(Mixtral's ``block_sparse_moe.experts.{e}.w1`` loads as ``mlp.experts.gate_up_proj``,
Granite's ``router.layer.weight`` as ``router.weight``, EXAONE's ``mlp.e_score_correction_bias``
as ``mlp.gate.e_score_correction_bias``, ...). transformers 5 keeps the conversions it
applied on loading (or has them by model type) and reverts them when saving; ``patch``
runs the same reversion on each block's tensors (``revert_weight_conversion``), so the
engine gets what a checkpoint of the block would hold.
"""

from __future__ import annotations

import json
import re

import torch
from torch import nn

from . import _native

_ROUTER_ATTRS = ("gate", "router")
_ROUTER_CLASSES: dict = {}
_BLOCK_CLASSES: dict = {}
# A block is a child of the i-th decoder layer: `model.layers.3.mlp`, DBRX's `transformer.blocks.3.ffn`.
_LAYER = re.compile(r"(?:^|\.)[^.]+\.(\d+)\.[^.]+$")
# Config keys that make the engine's layer of a family hold more than the block that
# `patch` replaces, and the value that leaves just the block: Granite-MoE-shared's engine
# layer is the decoder layer's feed-forward (`block_sparse_moe` + the `shared_mlp` beside
# it, as its checkpoints are read), but the decoder layer calls `shared_mlp` itself, so it
# stays in torch.
_BLOCK_ONLY_CONFIG = {"granitemoeshared": {"shared_intermediate_size": 0}}


def _router_specs(model: nn.Module) -> dict:
    """{router class: index of the logits in its output} from the models' recorder specs."""
    try:
        from transformers.modeling_utils import PreTrainedModel
        from transformers.utils.output_capturing import OutputRecorder
    except ImportError as e:  # pragma: no cover - transformers is the caller's
        raise ValueError(f"patch needs transformers >= 5 (output recorders): {e}") from None
    specs = {}
    for m in model.modules():
        if not isinstance(m, PreTrainedModel):
            continue
        spec = (getattr(type(m), "_can_record_outputs", None) or {}).get("router_logits")
        for s in spec if isinstance(spec, list) else [spec] if spec is not None else []:
            if isinstance(s, OutputRecorder) and s.target_class is not None:
                specs[s.target_class] = s.index
    return specs


def _find_blocks(model: nn.Module):
    """(qualified name, block, router attribute, logits index) of every unpatched block.

    A recorded module that holds another recorded one is not a router but a mixture
    around one: JetMoE records its attention's logits from the attention module, whose
    mixture-of-attention (`self_attention.experts`) has a router of the MLP's class. Such
    a module is no block's router, and the blocks inside it are not feed-forward blocks:
    they stay in torch."""
    specs = _router_specs(model)
    classes = tuple(specs)
    if not classes:
        return []
    routers = [n for n, m in model.named_modules() if isinstance(m, classes)]
    composite = {n for n in routers if any(o.startswith(f"{n}.") for o in routers if o != n)}

    def inside(name):
        return any(name == c or name.startswith(f"{c}.") for c in composite)

    out = []
    for name, block in model.named_modules():
        if getattr(block, "_moe_engine_patched", False) or inside(name):
            continue
        for rattr, router in block.named_children():
            if inside(f"{name}.{rattr}" if name else rattr):
                continue
            idx = next((i for cls, i in specs.items() if isinstance(router, cls)), None)
            if idx is not None:
                out.append((name, block, rattr, idx))
                break
    return out


def _probe(block: nn.Module, router_attr: str, index: int):
    """Runs the original block on one token: what it returns (``_block_outputs``) and the
    dtype of its router's logits (output ``index`` of the router; DeepSeek's router
    computes in f32 whatever the model's dtype)."""
    router = getattr(block, router_attr)
    # The router's weight `[E, H]`, wherever the router keeps it (`weight`, Hunyuan's
    # `wg.weight`, AFMoE's `gate.weight`, LongCat's `classifier.weight`, ...).
    w = next((p for p in router.parameters() if p.dim() == 2), None)
    if w is None or w.device.type == "meta":
        raise ValueError(f"{type(block).__name__}: its router has no materialised weight to read")
    # The block's input is in the model's dtype, which the router's weight need not be
    # (DeepSeek-V3's FP8 checkpoints keep the router in bf16; it computes in f32).
    rest = {id(p) for p in router.parameters()}
    dtype = next((p.dtype for p in block.parameters() if id(p) not in rest and p.is_floating_point()), w.dtype)
    seen = {}

    def hook(mod, args, output):
        seen["out"] = output if isinstance(output, tuple) else (output,)

    h = router.register_forward_hook(hook)
    try:
        with torch.no_grad():
            y = block(torch.zeros(1, 1, w.shape[1], dtype=dtype, device=w.device))
    finally:
        h.remove()
    routed = seen["out"]
    return _block_outputs(block, router, y, routed, index), routed[index].dtype


def _block_outputs(block: nn.Module, router: nn.Module, y, routed: tuple, index: int):
    """What the block returns, from its output ``y`` on a ``[1, 1, H]`` input and its
    router's output ``routed``: ``(flat, extras)``, ``flat`` when the output is ``[T, H]``
    rather than the input's shape (Llama 4), ``extras`` None for a bare tensor, else what
    follows the output in the tuple: "logits" where the block passes the router's logits
    on (Llama 4), "scores" for another of the router's outputs, the top-k softmax weights
    (gpt-oss), None for None."""
    out = y[0] if isinstance(y, tuple) else y
    flat = out.dim() == 2
    if not isinstance(y, tuple):
        return flat, None
    extras = []
    for i, e in enumerate(y[1:], 1):
        if e is routed[index]:
            extras.append("logits")
        elif e is None:
            extras.append(None)
        elif any(e is r for r in routed) and hasattr(router, "top_k"):
            extras.append("scores")
        else:
            raise ValueError(
                f"{type(block).__name__} returns a {type(e).__name__} as its output {i}, which patch cannot give"
            )
    return flat, tuple(extras)


def _router_class(cls: type) -> type:
    if cls not in _ROUTER_CLASSES:
        orig = cls.forward

        def forward(self, hidden_states, *args, _precomputed=None, **kwargs):
            if _precomputed is not None:
                return _precomputed
            return orig(self, hidden_states, *args, **kwargs)

        _ROUTER_CLASSES[cls] = type(cls.__name__, (cls,), {
            "forward": forward, "_moe_engine_orig_class": cls,
            "__module__": cls.__module__, "__qualname__": cls.__qualname__,
        })
    return _ROUTER_CLASSES[cls]


def _has_hooks(m: nn.Module) -> bool:
    g = nn.modules.module
    return bool(m._forward_hooks or m._forward_pre_hooks or g._global_forward_hooks or g._global_forward_pre_hooks)


def _block_class(cls: type) -> type:
    if cls not in _BLOCK_CLASSES:

        def forward(self, hidden_states, *args, **kwargs):
            shape = hidden_states.shape
            x2 = hidden_states.reshape(-1, shape[-1])
            out = self._moe_engine.forward(x2.detach().float().cpu().contiguous())
            flat, extras = self._moe_block_outputs
            y = out["y"].to(device=hidden_states.device, dtype=hidden_states.dtype)
            y = y if flat else y.reshape(shape)
            logits = out["logits"].to(device=hidden_states.device, dtype=self._moe_logits_dtype or hidden_states.dtype)
            router = self._modules[self._moe_router_attr]
            if _has_hooks(router):
                # Replays the engine's logits through the router's hooks (the recorder).
                pre = [None] * max(3, self._moe_router_index + 1)
                pre[self._moe_router_index] = logits
                router(x2, _precomputed=tuple(pre))
            if extras is None:
                return y
            rest = []
            for kind in extras:
                if kind == "logits":  # Llama 4 passes its router's logits on
                    rest.append(logits)
                elif kind == "scores":  # gpt-oss returns the routing weights beside the output
                    top, _ = torch.topk(logits, router.top_k, dim=-1)
                    rest.append(torch.softmax(top, dim=1, dtype=top.dtype))
                else:
                    rest.append(None)
            return (y, *rest)

        _BLOCK_CLASSES[cls] = type(cls.__name__, (cls,), {
            "forward": forward, "_moe_engine_patched": True, "_moe_engine_orig_class": cls,
            "__module__": cls.__module__, "__qualname__": cls.__qualname__,
        })
    return _BLOCK_CLASSES[cls]


def _config_json(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_json_string"):
        raise ValueError(f"{type(model).__name__} has no transformers config")
    return cfg.to_json_string(use_diff=False)


def _block_only(config: str, family: str) -> str:
    """The config for an engine layer of just the block (``_BLOCK_ONLY_CONFIG``)."""
    keys = _BLOCK_ONLY_CONFIG.get(family)
    if not keys:
        return config
    cfg = json.loads(config)
    for c in (cfg, cfg.get("text_config")):
        if isinstance(c, dict) and c.get("model_type", family) == family:
            c.update(keys)
    return json.dumps(cfg)


def _common_prefix(names, depth: int) -> str:
    """The dotted prefix all ``names`` share, at most ``depth`` components deep."""
    parts = [n.split(".") for n in names]
    pre = []
    for col in zip(*parts):
        if len(set(col)) != 1:
            break
        pre.append(col[0])
    pre = pre[: min(depth, min(len(p) for p in parts) - 1)]
    return "".join(f"{p}." for p in pre)


_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _revert(model: nn.Module, sd: dict):
    """``sd`` (full names in ``model``) in the family's checkpoint layout, by transformers'
    own reversion of its load-time conversions (``save_pretrained``'s), or None where
    transformers has none for it.

    The family's mapping is used, as for a model built from its config, not the one the
    model was loaded with (``_weight_conversions``): that one also holds what a checkpoint
    alone needed (a caller's ``key_mapping``, legacy names, a quantizer's dequantization,
    whose reversal would rename the dequantized stacks back to ``*_blocks``), none of
    which is the family's layout."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import PreTrainedModel
    except ImportError:  # pragma: no cover - older transformers
        return None
    if not isinstance(model, PreTrainedModel) or not sd:
        return None
    missing = object()
    loaded = model.__dict__.get("_weight_conversions", missing)
    model.__dict__["_weight_conversions"] = None
    try:
        return revert_weight_conversion(model, dict(sd))
    except Exception:  # noqa: BLE001 - an unrevertable block falls back to its own names
        return None
    finally:
        if loaded is missing:
            del model.__dict__["_weight_conversions"]
        else:
            model.__dict__["_weight_conversions"] = loaded


def _block_tensors(model: nn.Module, name: str, block: nn.Module) -> dict:
    """The block's tensors as its family's checkpoints hold them, named relative to the
    block's checkpoint prefix (``model.layers.3.block_sparse_moe.`` for Mixtral's block at
    ``model.layers.3.mlp``), in f32 on the host.

    The reversion works on full names, so the block's are given with their prefix in
    ``model``. Where it is not there (transformers without it, a model that is not a
    ``PreTrainedModel``) or cannot revert the block, the in-memory names are passed: the
    engine reads transformers-5's fused stacks as well for most families."""
    full = f"{name}." if name else ""
    for k, t in block.named_parameters():
        if t.dtype not in _FLOATS:
            raise ValueError(
                f"{full}{k}: a {t.dtype} parameter (a quantized model): load it dequantized, e.g. "
                "`quantization_config=...(dequantize=True)` in `from_pretrained`"
            )
    sd = {f"{full}{k}": t.detach() for k, t in block.state_dict().items()}
    reverted = _revert(model, sd)
    tensors = reverted or sd
    prefix = _common_prefix(list(tensors), len(full.split(".")) - 1) if reverted else full
    out = {}
    for k, t in tensors.items():
        if not k.startswith(prefix):  # pragma: no cover - the common prefix is everyone's
            raise ValueError(f"{name}: tensor `{k}` is not under the block's checkpoint prefix `{prefix}`")
        out[k[len(prefix):]] = t.detach().float().cpu().contiguous()
    return out


def patch(model: nn.Module, backend: str = "cpu", device=None) -> int:
    """Runs every MoE block of ``model`` (a transformers model of a family the engine
    knows) on the engine, on the same weights; returns how many blocks it patched. The
    rest of the model is left alone, so ``model(...)``, ``model.generate(...)`` and
    ``output_router_logits=True`` keep working. Inference only. Patching twice patches
    nothing more.

    What is not a feed-forward MoE block the engine runs stays in torch: DeepSeek-V4's
    hash-routed layers (their router is no recorded router), JetMoE's mixture of attention
    heads, Granite-MoE-shared's ``shared_mlp`` (the decoder layer's, beside the block). A
    block that still holds quantized parameters is refused: load the model dequantized."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"patch takes a torch module, got {type(model).__name__}")
    config = _config_json(model)
    family, moe_layers = _native.hf_moe_layers(config)
    block_config = _block_only(config, family)
    found = _find_blocks(model)
    engines = []
    for name, block, rattr, idx in found:
        m = _LAYER.search(name)
        if m is None:
            raise ValueError(f"{name}: an MoE block outside a decoder layer (`layers.<i>.<block>`)")
        layer = int(m.group(1))
        if layer not in moe_layers:
            raise ValueError(f"{name}: the model has an MoE block at layer {layer}, but its {family} config makes it dense")
        tensors = _block_tensors(model, name, block)
        outputs, logits_dtype = _probe(block, rattr, idx)
        engine = _native.hf_layer(block_config, layer, tensors, backend=backend, device=device)
        engines.append((block, rattr, idx, engine, outputs, logits_dtype))
    # Every block is built before any is patched: an error leaves the model as it was.
    for block, rattr, idx, engine, outputs, logits_dtype in engines:
        router = block._modules[rattr]
        router.__class__ = _router_class(type(router))
        block._moe_engine = engine
        block._moe_router_attr = rattr
        block._moe_router_index = idx
        block._moe_logits_dtype = logits_dtype
        block._moe_block_outputs = outputs
        block.__class__ = _block_class(type(block))
    return len(engines)


def unpatch(model: nn.Module) -> int:
    """Undoes ``patch``: the blocks run their own forward again. Returns how many."""
    n = 0
    for m in model.modules():
        cls = type(m).__dict__.get("_moe_engine_orig_class")
        if cls is None:
            continue
        n += int(type(m).__dict__.get("_moe_engine_patched", False))
        m.__class__ = cls
        for a in ("_moe_engine", "_moe_router_attr", "_moe_router_index", "_moe_logits_dtype", "_moe_block_outputs"):
            m.__dict__.pop(a, None)
    return n

"""``patch(model)``: every MoE block of a transformers model runs on the engine.

transformers 5 records router logits with a forward hook on each block's router
(``_can_record_outputs["router_logits"]``, an ``OutputRecorder`` of the router class), so
the blocks are found from that spec (a block is a module with a router child) and patched
in place: the block's class becomes a subclass of its own whose ``forward`` runs the
engine, and the router stays where it is, called only to replay the engine's logits
through its hooks. Names, parameters, ``isinstance`` checks and everything else of the
model are left as they were; ``unpatch`` restores the classes.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from . import _native

_ROUTER_ATTRS = ("gate", "router")
_ROUTER_CLASSES: dict = {}
_BLOCK_CLASSES: dict = {}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.[^.]+$")


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
    """(qualified name, block, router attribute, logits index) of every unpatched block."""
    specs = _router_specs(model)
    out = []
    for name, block in model.named_modules():
        if getattr(block, "_moe_engine_patched", False):
            continue
        for rattr, router in block.named_children():
            idx = next((i for cls, i in specs.items() if isinstance(router, cls)), None)
            if idx is not None:
                out.append((name, block, rattr, idx))
                break
    return out


def _probe(block: nn.Module, router_attr: str):
    """Runs the original block on one token: whether it returns a tuple, and the dtype of
    its router's logits (DeepSeek's router computes in f32 whatever the model's dtype)."""
    router = getattr(block, router_attr)
    w = getattr(router, "weight", None)
    if w is None or w.device.type == "meta":
        raise ValueError(f"{type(block).__name__}: its router has no materialised weight to read")
    seen = {}

    def hook(mod, args, output):
        seen["logits"] = output[0] if isinstance(output, tuple) else output

    h = router.register_forward_hook(hook)
    try:
        with torch.no_grad():
            y = block(torch.zeros(1, 1, w.shape[1], dtype=w.dtype, device=w.device))
    finally:
        h.remove()
    return (len(y) if isinstance(y, tuple) else None), seen["logits"].dtype


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
            y = out["y"].to(device=hidden_states.device, dtype=hidden_states.dtype).reshape(shape)
            logits = out["logits"].to(device=hidden_states.device, dtype=self._moe_logits_dtype or hidden_states.dtype)
            router = self._modules[self._moe_router_attr]
            if _has_hooks(router):
                # Replays the engine's logits through the router's hooks (the recorder).
                pre = [None] * max(3, self._moe_router_index + 1)
                pre[self._moe_router_index] = logits
                router(x2, _precomputed=tuple(pre))
            if self._moe_block_tuple_len:
                # gpt-oss returns the routing weights beside the output.
                top, _ = torch.topk(logits, router.top_k, dim=-1)
                scores = torch.softmax(top, dim=1, dtype=top.dtype)
                return (y, scores, *[None] * (self._moe_block_tuple_len - 2))
            return y

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


def patch(model: nn.Module, backend: str = "cpu", device=None) -> int:
    """Runs every MoE block of ``model`` (a transformers model of a family the engine
    knows) on the engine, on the same weights; returns how many blocks it patched. The
    rest of the model is left alone, so ``model(...)``, ``model.generate(...)`` and
    ``output_router_logits=True`` keep working. Inference only. Patching twice patches
    nothing more."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"patch takes a torch module, got {type(model).__name__}")
    config = _config_json(model)
    family, moe_layers = _native.hf_moe_layers(config)
    found = _find_blocks(model)
    engines = []
    for name, block, rattr, idx in found:
        m = _LAYER.search(name)
        if m is None:
            raise ValueError(f"{name}: an MoE block outside a decoder layer (`layers.<i>.<block>`)")
        layer = int(m.group(1))
        if layer not in moe_layers:
            raise ValueError(f"{name}: the model has an MoE block at layer {layer}, but its {family} config makes it dense")
        tuple_len, logits_dtype = _probe(block, rattr)
        tensors = {n: t.detach().float().cpu().contiguous() for n, t in block.state_dict().items()}
        engine = _native.hf_layer(config, layer, tensors, backend=backend, device=device)
        engines.append((block, rattr, idx, engine, tuple_len, logits_dtype))
    # Every block is built before any is patched: an error leaves the model as it was.
    for block, rattr, idx, engine, tuple_len, logits_dtype in engines:
        router = block._modules[rattr]
        router.__class__ = _router_class(type(router))
        block._moe_engine = engine
        block._moe_router_attr = rattr
        block._moe_router_index = idx
        block._moe_logits_dtype = logits_dtype
        block._moe_block_tuple_len = tuple_len
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
        for a in ("_moe_engine", "_moe_router_attr", "_moe_router_index", "_moe_logits_dtype", "_moe_block_tuple_len"):
            m.__dict__.pop(a, None)
    return n

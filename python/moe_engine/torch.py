"""Torch modules over the engine: ``MoE`` (DeepSpeed's layer) and ``patch`` (transformers
models)."""

from ._hf import patch, unpatch
from ._moe import MoE

__all__ = ["MoE", "patch", "unpatch"]

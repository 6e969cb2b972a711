"""moe_engine: a Mixture-of-Experts engine (Rust) for PyTorch users.

* ``moe_engine.torch.MoE``: a drop-in for ``deepspeed.moe.layer.MoE`` (same arguments,
  same state-dict names, same ``(output, l_aux, exp_counts)``), with autograd.
* ``moe_engine.torch.patch(model)``: runs every MoE block of a transformers model on the
  engine, on the model's own weights.

Backends: ``"cpu"``, ``"wgpu"``, ``"cuda"`` or ``"auto"``. Engine errors are raised as
``ValueError`` (bad configuration, shape, dtype or value) or ``RuntimeError`` (a device,
driver or peer failed).
"""

from ._native import __version__, auto_backend

__all__ = ["__version__", "auto_backend"]

"""``MoE``: ``deepspeed.moe.layer.MoE`` over the engine."""

from __future__ import annotations

import copy
import json
import warnings

import torch
from torch import nn

from . import _native

# DeepSpeed's noise, drawn the way deepspeed.moe.sharded_moe draws it (the same
# distributions on torch's global generator, in the same order), so that a seeded run of
# this module and of DeepSpeed's layer route alike.
_JITTER_EPS = 1e-2


def _uniform(low: float, high: float, shape, device):
    lo, hi = torch.tensor(low, device=device), torch.tensor(high, device=device)
    return torch.distributions.uniform.Uniform(low=lo, high=hi).rsample(shape).cpu()


def _gumbel(shape, device):
    zero, one = torch.tensor(0.0, device=device), torch.tensor(1.0, device=device)
    return torch.distributions.gumbel.Gumbel(zero, one).rsample(shape).cpu()


_ACTIVATIONS = {nn.ReLU: "relu", nn.SiLU: "silu"}


def describe_expert(expert: nn.Module, hidden_size: int) -> dict:
    """The engine's description ``{type, ffn_hidden, bias}`` of a DeepSpeed expert module,
    or a ``ValueError`` naming what it cannot take."""
    def linears_bias(*ls):
        has = {l.bias is not None for l in ls}
        if len(has) != 1:
            raise ValueError("expert: its Linear layers must all have a bias or all have none")
        return has.pop()

    if isinstance(expert, nn.Linear):
        if (expert.in_features, expert.out_features) != (hidden_size, hidden_size):
            raise ValueError(f"expert: nn.Linear({expert.in_features}, {expert.out_features}) must map hidden_size = {hidden_size} to itself")
        return {"type": "linear", "ffn_hidden": None, "bias": linears_bias(expert)}
    if isinstance(expert, nn.Sequential) and len(expert) == 3:
        a, act, b = expert[0], expert[1], expert[2]
        if isinstance(a, nn.Linear) and isinstance(b, nn.Linear):
            if isinstance(act, nn.GELU):
                name = "gelu_tanh" if act.approximate == "tanh" else "gelu"
            else:
                name = _ACTIVATIONS.get(type(act))
            if name is None:
                raise ValueError(f"expert: activation {type(act).__name__} is not one the engine runs (GELU, ReLU, SiLU)")
            if a.in_features != hidden_size or b.out_features != hidden_size or a.out_features != b.in_features:
                raise ValueError(
                    f"expert: Sequential(Linear({a.in_features}, {a.out_features}), ..., Linear({b.in_features}, {b.out_features})) "
                    f"must map hidden_size = {hidden_size} through one hidden width and back"
                )
            return {"type": f"mlp_{name}", "ffn_hidden": a.out_features, "bias": linears_bias(a, b)}
    raise ValueError(
        f"expert: {type(expert).__name__} is not a module the engine recognises: nn.Linear(hidden, hidden), or "
        "nn.Sequential(nn.Linear, nn.GELU | nn.ReLU | nn.SiLU, nn.Linear), with or without biases"
    )


class _Gate(nn.Module):
    """DeepSpeed's ``TopKGate`` parameters: ``wg`` (``[E, M]``, no bias)."""

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.wg = nn.Linear(hidden_size, num_experts, bias=False).float()


class _Experts(nn.Module):
    def __init__(self, expert: nn.Module, num_local_experts: int, expert_group_name: str):
        super().__init__()
        self.deepspeed_experts = nn.ModuleList([copy.deepcopy(expert) for _ in range(num_local_experts)])
        self.num_local_experts = num_local_experts
        # Marked as DeepSpeed's Experts marks them: deepspeed.moe.utils.is_moe_param, the
        # optimizer's MoE parameter groups and DeepSpeed's engine (it all-reduces these
        # gradients over the expert-data-parallel group, not the data-parallel one) read
        # the marks.
        for e in self.deepspeed_experts:
            for param in e.parameters():
                param.allreduce = False
                param.group_name = expert_group_name


class _MOELayer(nn.Module):
    def __init__(self, gate: _Gate, experts: _Experts):
        super().__init__()
        self.gate = gate
        self.experts = experts


class _EngineFunction(torch.autograd.Function):
    """The engine's forward and backward as one autograd node over the input and every
    parameter: ``Σ y·dy + g·l_aux`` is differentiated with ``g`` the gradient reaching
    ``l_aux``."""

    @staticmethod
    def forward(ctx, module, call, x, *params):
        # The engine reads host memory: a CUDA tensor is staged through the host (the
        # engine's own cuda backend, if chosen, uploads it again).
        out = module._engine().forward(x.detach().float().cpu().contiguous(), **call)
        ctx.saved = out.get("saved")
        ctx.module = module
        ctx.in_dtype = x.dtype
        ctx.in_device = x.device
        ctx.names = module._param_names
        ctx.y_shape = out["y"].shape
        y = out["y"].to(device=x.device, dtype=x.dtype)
        l_aux = torch.tensor(out["l_aux"], dtype=torch.float32, device=x.device)
        out.pop("saved", None)
        module.last_report = out
        return y, l_aux

    @staticmethod
    def backward(ctx, dy, dl_aux):
        if ctx.saved is None:
            raise RuntimeError("the engine forward kept no activations (it ran without gradients)")
        coef = 0.0 if dl_aux is None else float(dl_aux)
        if dy is None:
            dy = torch.zeros(ctx.y_shape)
        dx, grads = ctx.saved.backward(dy.detach().float().cpu().contiguous(), coef)
        ctx.saved = None
        pgrads = []
        for name, p in ctx.names:
            g = grads.get(name)
            pgrads.append(None if g is None else g.to(device=p.device, dtype=p.dtype).reshape(p.shape))
        return (None, None, dx.to(device=ctx.in_device, dtype=ctx.in_dtype), *pgrads)


class MoE(nn.Module):
    """``deepspeed.moe.layer.MoE`` on the engine.

    Takes DeepSpeed's keyword arguments (``use_tutel`` is accepted and ignored, with a
    warning) and ``backend=`` (``"cpu"``, ``"wgpu"``, ``"cuda"``, ``"auto"``). The state
    dict uses DeepSpeed's names, so a DeepSpeed checkpoint loads as it is. With
    ``ep_size > 1`` the layer holds ``num_experts / ep_size`` experts and exchanges rows
    with the other ranks of its expert-parallel group over torch.distributed.
    ``forward(hidden_states, used_token=None)`` returns ``(output, l_aux, exp_counts)``;
    ``last_report`` then holds the forward's capacity, routes kept per expert, dropped
    routes and tokens, and the other router losses (nothing dropped goes unreported).
    """

    def __init__(
        self,
        hidden_size: int,
        expert: nn.Module,
        num_experts: int = 1,
        ep_size: int = 1,
        k: int = 1,
        capacity_factor: float = 1.0,
        eval_capacity_factor: float = 1.0,
        min_capacity: int = 4,
        use_residual: bool = False,
        noisy_gate_policy=None,
        drop_tokens: bool = True,
        use_rts: bool = True,
        use_tutel: bool = False,
        enable_expert_tensor_parallelism: bool = False,
        top2_2nd_expert_sampling: bool = True,
        *,
        backend: str = "cpu",
        device=None,
    ):
        super().__init__()
        if noisy_gate_policy not in (None, "None", "Jitter", "RSample"):
            raise ValueError(f"noisy_gate_policy: `{noisy_gate_policy}` is not one of None, Jitter, RSample")
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts: {num_experts!r} must be a positive int")
        if not isinstance(ep_size, int) or ep_size < 1 or num_experts % ep_size:
            raise ValueError(f"ep_size: {ep_size!r} must divide num_experts = {num_experts}")
        if use_tutel:
            warnings.warn("moe_engine.torch.MoE: use_tutel is ignored (the engine runs its own kernels)", stacklevel=2)
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.num_local_experts = num_experts // ep_size
        self.expert_group_name = f"ep_size_{ep_size}"
        self.use_residual = use_residual
        self.enable_expert_tensor_parallelism = enable_expert_tensor_parallelism
        self.backend = backend
        self.device_name = device
        self.expert_description = describe_expert(expert, hidden_size)
        self.config = {
            "hidden_size": hidden_size,
            "num_experts": num_experts,
            "ep_size": ep_size,
            "k": k,
            "capacity_factor": capacity_factor,
            "eval_capacity_factor": eval_capacity_factor,
            "min_capacity": min_capacity,
            "use_residual": use_residual,
            "noisy_gate_policy": None if noisy_gate_policy == "None" else noisy_gate_policy,
            "drop_tokens": drop_tokens,
            "use_rts": use_rts,
            "top2_2nd_expert_sampling": top2_2nd_expert_sampling,
            "expert": self.expert_description,
        }
        self.deepspeed_moe = _MOELayer(
            _Gate(hidden_size, num_experts), _Experts(expert, self.num_local_experts, self.expert_group_name)
        )
        if use_residual:
            self.mlp = copy.deepcopy(expert)
            self.coefficient = nn.Linear(hidden_size, 2)
        self._group = None
        self.last_report = None
        self._layer = None
        self._layer_key = None
        # Checks the configuration once now, so a bad one fails at construction.
        self._engine()

    # ------------------------------------------------------------------ engine layer
    @property
    def _param_names(self):
        return list(self.named_parameters())

    def _group_for_ep(self):
        if self.ep_size > 1 and self._group is None:
            from ._dist import expert_parallel_group

            self._group = expert_parallel_group(self.ep_size)
        return self._group

    def _engine(self):
        """The engine layer on the current weights: rebuilt when a parameter changed
        (an optimizer step, ``load_state_dict``)."""
        params = list(self.named_parameters())
        key = tuple((n, p.data_ptr(), p._version, p.dtype, tuple(p.shape)) for n, p in params)
        if self._layer is None or key != self._layer_key:
            tensors = {n: p.detach().float().cpu().contiguous() for n, p in params}
            self._layer = _native.deepspeed_layer(
                json.dumps(self.config), tensors, backend=self.backend, device=self.device_name,
                trainable=True, group=self._group_for_ep(),
            )
            self._layer_key = key
        return self._layer

    def _noise(self, x2: torch.Tensor, k: int, train: bool) -> dict:
        """DeepSpeed's draws for one forward, in its order (gate input jitter, then Gumbel
        noise, then the RTS priorities)."""
        s, e = x2.shape[0], self.num_experts
        c = self.config
        out = {}
        if train and c["noisy_gate_policy"] == "Jitter":
            out["jitter"] = _uniform(1.0 - _JITTER_EPS, 1.0 + _JITTER_EPS, (s, self.hidden_size), x2.device)
        if (k == 1 and train and c["noisy_gate_policy"] == "RSample") or (k == 2 and c["top2_2nd_expert_sampling"]):
            out["gumbel"] = _gumbel((s, e), x2.device)
        if k == 1 and c["use_rts"]:
            out["rts"] = _uniform(0.0, 1.0, (s, e), x2.device)
        return out

    def forward(self, hidden_states: torch.Tensor, used_token: torch.Tensor = None):
        if not isinstance(hidden_states, torch.Tensor):
            raise ValueError("hidden_states must be a torch tensor")
        if hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states: last dimension {hidden_states.shape[-1]}, hidden_size is {self.hidden_size}")
        if not torch.isfinite(hidden_states).all():
            raise ValueError("hidden_states holds a non-finite value")
        train = self.training
        x2 = hidden_states.reshape(-1, self.hidden_size)
        call = {"train": train, "keep": torch.is_grad_enabled()}
        call.update(self._noise(x2, self.config["k"], train))
        if used_token is not None:
            call["used_token"] = used_token.detach().reshape(-1).float().cpu().contiguous()
        params = [p for _, p in self.named_parameters()]
        y, l_aux = _EngineFunction.apply(self, call, hidden_states, *params)
        report = self.last_report
        exp_counts = torch.tensor(report["exp_counts"], dtype=torch.int64)
        return y, l_aux, exp_counts

    # ------------------------------------------------------------------ DeepSpeed layers
    @classmethod
    def from_deepspeed(cls, module: nn.Module, backend: str = "cpu", device=None) -> "MoE":
        """A copy of a ``deepspeed.moe.layer.MoE`` (its arguments and its weights)."""
        moe = getattr(module, "deepspeed_moe", None)
        gate = getattr(moe, "gate", None)
        if gate is None or not hasattr(gate, "wg"):
            raise ValueError(f"{type(module).__name__} is not a deepspeed.moe.layer.MoE (no deepspeed_moe.gate.wg)")
        experts = moe.experts.deepspeed_experts
        out = cls(
            hidden_size=gate.wg.weight.shape[1],
            expert=experts[0],
            num_experts=module.num_experts,
            ep_size=module.ep_size,
            k=gate.k,
            capacity_factor=gate.capacity_factor,
            eval_capacity_factor=gate.eval_capacity_factor,
            min_capacity=gate.min_capacity,
            use_residual=module.use_residual,
            noisy_gate_policy=gate.noisy_gate_policy,
            drop_tokens=gate.drop_tokens,
            use_rts=gate.use_rts,
            top2_2nd_expert_sampling=gate.top2_2nd_expert_sampling,
            backend=backend,
            device=device,
        )
        out.load_state_dict(module.state_dict())
        out.train(module.training)
        return out

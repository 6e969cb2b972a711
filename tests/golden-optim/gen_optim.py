#!/usr/bin/env python3
"""Reference optimizer steps from torch.optim, for tests/optim_torch.rs.

Every case steps two float32 parameters (a [4, 6] matrix and a [6] vector) for a few
steps with given gradients, through torch.optim.SGD / Adam / AdamW (the single-tensor
implementations: foreach=False, fused=False, which is also torch's choice on the cpu),
optionally over two parameter groups with their own learning rates and with
torch.nn.utils.clip_grad_norm_ before each step. It writes

- optim.safetensors: per case `<case>/p<i>/init`, `<case>/p<i>/grad/<t>`,
  `<case>/p<i>/after/<t>` (the parameter after step t) and the final state
  `<case>/p<i>/<exp_avg|exp_avg_sq|momentum_buffer>`; with clipping, `<case>/norm`
  [steps] (what clip_grad_norm_ returned);
- cases.json: the cases' hyperparameters.

usage: gen_optim.py OUT_DIR      (needs only torch and safetensors)
"""
import json, os, sys
import torch
from safetensors.torch import save_file

SHAPES = [(4, 6), (6,)]
STEPS = 5


def grads(g, t, i, shape, scale):
    x = torch.randn(shape, generator=g) * scale
    if i == 1 and t == 2:
        x = torch.zeros(shape)  # a parameter whose gradient is zero that step (no token)
    return x


CASES = [
    dict(name="sgd", type="sgd", lr=0.1),
    dict(name="sgd_momentum", type="sgd", lr=0.05, momentum=0.9),
    dict(name="sgd_momentum_dampening_wd", type="sgd", lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01),
    dict(name="sgd_nesterov_wd", type="sgd", lr=0.02, momentum=0.8, nesterov=True, weight_decay=0.05),
    dict(name="adam", type="adam", lr=1e-2),
    dict(name="adam_l2", type="adam", lr=5e-3, betas=[0.8, 0.99], eps=1e-6, weight_decay=0.1),
    dict(name="adamw", type="adamw", lr=5e-3, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1),
    dict(name="adamw_defaults", type="adamw", lr=1e-3),
    dict(name="adam_tiny_grads", type="adam", lr=1e-3, grad_scale=1e-6),
    dict(name="adamw_two_groups", type="adamw", lr=5e-3, weight_decay=0.1, group_lrs=[5e-3, 2e-2]),
    dict(name="adamw_clipped", type="adamw", lr=5e-3, weight_decay=0.1, clip=0.5),
    dict(name="sgd_momentum_clipped", type="sgd", lr=0.05, momentum=0.9, clip=1.0, grad_scale=3.0),
]


def make(case, params):
    kw = dict(lr=case["lr"], foreach=False)
    if case["type"] == "sgd":
        kw.update(momentum=case.get("momentum", 0.0), dampening=case.get("dampening", 0.0),
                  weight_decay=case.get("weight_decay", 0.0), nesterov=case.get("nesterov", False))
        cls = torch.optim.SGD
    else:
        kw.update(betas=tuple(case.get("betas", [0.9, 0.999])), eps=case.get("eps", 1e-8), fused=False)
        if "weight_decay" in case:
            kw["weight_decay"] = case["weight_decay"]
        cls = torch.optim.Adam if case["type"] == "adam" else torch.optim.AdamW
    if "group_lrs" in case:
        groups = [{"params": [p], "lr": lr} for p, lr in zip(params, case["group_lrs"])]
        return cls(groups, **kw)
    return cls(params, **kw)


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    tensors, meta = {}, []
    for ci, case in enumerate(CASES):
        g = torch.Generator().manual_seed(1000 + ci)
        params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
        name = case["name"]
        for i, p in enumerate(params):
            tensors[f"{name}/p{i}/init"] = p.detach().clone()
        opt = make(case, params)
        norms = []
        for t in range(STEPS):
            opt.zero_grad()
            for i, p in enumerate(params):
                gr = grads(g, t, i, p.shape, case.get("grad_scale", 1.0))
                tensors[f"{name}/p{i}/grad/{t}"] = gr.clone()
                p.grad = gr.clone()
            if "clip" in case:
                norms.append(torch.nn.utils.clip_grad_norm_(params, case["clip"], foreach=False).reshape(()))
            opt.step()
            for i, p in enumerate(params):
                tensors[f"{name}/p{i}/after/{t}"] = p.detach().clone()
        for i, p in enumerate(params):
            for k, v in opt.state[p].items():
                if k != "step" and v is not None:
                    tensors[f"{name}/p{i}/{k}"] = v.detach().clone()
        if norms:
            tensors[f"{name}/norm"] = torch.stack(norms)
        full = {k: v for k, v in opt.param_groups[0].items() if k != "params" and isinstance(v, (int, float, bool, tuple))}
        full["betas"] = list(full["betas"]) if "betas" in full else None
        meta.append({"name": name, "type": case["type"], "steps": STEPS, "clip": case.get("clip"),
                     "group_lrs": case.get("group_lrs"), "hyper": full})
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, "optim.safetensors"))
    with open(os.path.join(out, "cases.json"), "w") as f:
        json.dump({"source": "torch %s torch.optim (single-tensor, float32, cpu)" % torch.__version__,
                   "shapes": [list(s) for s in SHAPES], "cases": meta}, f, indent=1)
    print("wrote", len(CASES), "cases to", out)


if __name__ == "__main__":
    main()

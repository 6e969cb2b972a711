#!/usr/bin/env python3
"""Adds to t01_ds_top2_residual_adam the Gumbel noise its reference run used.

gen_train.py (../shared/golden) built the trace's `MoE(...)` without
`top2_2nd_expert_sampling`, so DeepSpeed 0.19.8's default (True) applied: every step chose
each token's second expert from logits plus the Gumbel noise gen_train.py replays through
`sharded_moe.gumbel_map` (its `gum` tensor). The trace recorded
`top2_2nd_expert_sampling: false` and no noise, so it could not be reproduced. This script
draws `gum` again from the case's generator exactly as gen_train.py does (seed 2001: the
parameters, inputs and targets it draws first must match the trace's bit for bit, which
it checks), stores it as `noise/gumbel` [steps, S, E], and sets the config and
`train.noise` to say what the reference did.

usage: fix_t01_gumbel.py [CASE_DIR]     (needs torch and safetensors)
"""
import json, os, sys
import torch
from safetensors.torch import load_file, save_file

d = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "t01_ds_top2_residual_adam")
t = load_file(os.path.join(d, "tensors.safetensors"))
steps, B, T, M, E = 6, 2, 16, 16, 4
S = B * T
# MoE(...)'s parameters in registration order: the gate, the experts, the residual MLP, the coefficient.
order = ["deepspeed_moe.gate.wg.weight"]
for e in range(E):
    order += [f"deepspeed_moe.experts.deepspeed_experts.{e}.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")]
order += ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "coefficient.weight", "coefficient.bias"]
g = torch.Generator().manual_seed(2001)
for n in order:
    p = t["param/" + n]
    assert torch.equal(torch.randn(p.shape, generator=g) * (1.0 / max(1, p.shape[-1]) ** 0.5), p), n
assert torch.equal(torch.randn(steps, B, T, M, generator=g), t["input/x"])
assert torch.equal(torch.randn(steps, B, T, M, generator=g) * 0.5, t["input/target"])
torch.empty(steps, S, M).uniform_(0.99, 1.01, generator=g)  # the jitter draw, unused by this case
gum = -torch.log(-torch.log(torch.rand(steps, S, E, generator=g).clamp(1e-9, 1 - 1e-9)))
t["noise/gumbel"] = gum.contiguous()
save_file(t, os.path.join(d, "tensors.safetensors"))
path = os.path.join(d, "case.json")
m = json.load(open(path))
m["config"]["top2_2nd_expert_sampling"] = True
m["train"]["noise"] = {"gumbel": "noise/gumbel"}
m["note"] = ("Corrected from the generated trace by fix_t01_gumbel.py: gen_train.py built MoE(...) without "
             "top2_2nd_expert_sampling, so DeepSpeed's default True applied and the second expert of every token "
             "was chosen with the Gumbel noise gen_train.py replays (its `gum` tensor, drawn from the case's "
             "generator, seed 2001), while the trace recorded top2_2nd_expert_sampling false and no noise. "
             "noise/gumbel is that tensor, drawn again with torch 2.15 (the parameters, inputs and targets drawn "
             "before it match the trace's bit for bit).")
json.dump(m, open(path, "w"), indent=2, sort_keys=True)
print("wrote", d)

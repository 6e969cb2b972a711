"""Expected values of route_reference.rs, computed by transformers' own routers.

Run with torch and transformers installed (the constants there came from torch 2.15.0 and
transformers 5.23.0): `python route_reference.py` prints the Rust constants. Each router
gets fixed logits (the DeepSeek-V4 and ERNIE routers compute them from their weight, so
the input is the identity and the weight the logits' transpose: logits = I · Wᵀ exactly,
and d logits = (d W)ᵀ), returns its routes, and autograd gives d logits of
Σ d_w · weights for a fixed d_w. DeepSeek-V4, DBRX and PhiMoE run in float64 (their exact
formula: in float32, torch's e^x of x = -100 is subnormal and its sqrt-softplus 0.85% off);
ERNIE's router casts to float32 itself. Routes are listed in descending order of the
quantity they are chosen on, ties to the lower index, as the engine lists them.
"""

import types

import numpy as np
import torch
from transformers.activations import ACT2FN
from transformers.models.dbrx.modeling_dbrx import DbrxFFN
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4TopKRouter
from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import Ernie4_5_MoeTopKRouter
from transformers.models.phimoe.modeling_phimoe import sparsemixer

F64 = torch.float64


def f32_exact(rows):
    """The f32 values the Rust test uses, held in float64 (so both sides start equal)."""
    return torch.tensor(rows, dtype=torch.float32).to(F64)


def rust(name, t, ty="f32"):
    vals = t.detach().flatten().tolist()
    if ty == "i32":
        body = ", ".join(str(int(v)) for v in vals)
    else:
        # The shortest decimal that reads back as the same f32.
        body = ", ".join(str(np.float32(v)) for v in vals)
    print(f"const {name}: [{ty}; {len(vals)}] = [{body}];")


def through_weight(router, logits):
    with torch.no_grad():
        router.weight.copy_(logits.t())
    return torch.eye(logits.shape[0], dtype=logits.dtype)


def descending(key, idx, w):
    order = [sorted(range(idx.shape[1]), key=lambda j: (-key[s, idx[s, j]].item(), idx[s, j].item())) for s in range(idx.shape[0])]
    order = torch.tensor(order)
    return idx.gather(1, order), w.gather(1, order)


# DeepSeek-V4: sqrt-softplus scores, bias in the choice only, / (Σ + 1e-20), × 1.5.
V4_LOGITS = f32_exact([[-25.0, -20.5, 19.5, 20.5, 0.3, -1.2, 2.0, 30.0],
                          [-100.0, -50.0, -30.0, -21.0, -19.0, -60.0, -90.0, -40.0],
                          [0.7, -0.4, 1.9, 3.1, -2.2, 0.05, 1.4, -0.9]])
V4_BIAS = f32_exact([0.1, -0.2, 0.05, 0.0, 0.3, -0.1, 0.2, -0.05])
V4_DW = f32_exact([[0.5, -1.0, 0.25], [1.5, 0.75, -0.5], [-0.3, 0.8, 1.1]])
cfg = types.SimpleNamespace(num_experts_per_tok=3, num_local_experts=8, hidden_size=3,
                            scoring_func="sqrtsoftplus", routed_scaling_factor=1.5)
r = DeepseekV4TopKRouter(cfg).to(F64)
with torch.no_grad():
    r.e_score_correction_bias.copy_(V4_BIAS)
_, w, idx = r(through_weight(r, V4_LOGITS))
scores = ACT2FN["sqrtsoftplus"](V4_LOGITS)
idx, w = descending(scores + V4_BIAS, idx, w)
(w * V4_DW).sum().backward()
print("// DeepSeek-V4")
rust("V4_SCORES", scores)
rust("V4_EXPERTS", idx, "i32")
rust("V4_WEIGHTS", w)
rust("V4_D_LOGITS", r.weight.grad.t())

# ERNIE-4.5: softmax, bias in the choice only, / clamp(Σ, min=moe_norm_min).
ERNIE_LOGITS = torch.tensor([[0.2, -1.0, 1.3, 0.4, -0.6, 0.9, -2.0, 0.1],
                             [2.5, 2.1, -0.3, 0.0, -1.5, 0.6, 0.2, -0.8],
                             [-0.2, 0.35, 0.1, -0.7, 0.5, 0.05, -0.1, 0.3],
                             [1.0, -0.5, 0.25, 3.0, -1.0, 0.8, 2.2, -0.3]])
ERNIE_BIAS = torch.tensor([0.02, -0.01, 0.03, 0.0, -0.02, 0.01, 0.04, -0.03])
ERNIE_DW = torch.tensor([[0.5, -1.0], [1.5, 0.75], [-0.3, 0.8], [0.9, -0.6]])
for name, floor in [("ERNIE_FLOOR_06", 0.6), ("ERNIE_FLOOR_1E12", 1e-12)]:
    cfg = types.SimpleNamespace(num_experts=8, hidden_size=4, num_experts_per_tok=2, moe_norm_min=floor)
    r = Ernie4_5_MoeTopKRouter(cfg)
    with torch.no_grad():
        r.moe_statics.e_score_correction_bias.copy_(ERNIE_BIAS[None])
    _, w, idx = r(through_weight(r, ERNIE_LOGITS))
    (w * ERNIE_DW).sum().backward()
    print(f"// ERNIE-4.5, moe_norm_min {floor}; top-2 sums "
          f"{torch.softmax(ERNIE_LOGITS, 1).gather(1, idx).sum(1).tolist()}")
    rust(f"{name}_EXPERTS", idx, "i32")
    rust(f"{name}_WEIGHTS", w)
    rust(f"{name}_D_LOGITS", r.weight.grad.t())

# ERNIE-4.5 at the floor: all-zero logits give softmax scores of exactly 1/8 (in float32,
# as the engine's), so the top-2 sum is exactly the floor 0.25, where torch's clamp(min=)
# passes no gradient to the sum.
ERNIE_EQ_LOGITS = torch.tensor([[0.0] * 8, [0.2, -1.0, 1.3, 0.4, -0.6, 0.9, -2.0, 0.1]])
ERNIE_EQ_DW = torch.tensor([[0.5, -1.0], [1.5, 0.75]])
cfg = types.SimpleNamespace(num_experts=8, hidden_size=2, num_experts_per_tok=2, moe_norm_min=0.25)
r = Ernie4_5_MoeTopKRouter(cfg)
with torch.no_grad():
    r.moe_statics.e_score_correction_bias.copy_(ERNIE_BIAS[None])
_, w, idx = r(through_weight(r, ERNIE_EQ_LOGITS))
(w * ERNIE_EQ_DW).sum().backward()
print(f"// ERNIE-4.5, moe_norm_min 0.25; top-2 sums "
      f"{torch.softmax(ERNIE_EQ_LOGITS, 1).gather(1, idx).sum(1).tolist()}")
rust("ERNIE_FLOOR_EQ_EXPERTS", idx, "i32")
rust("ERNIE_FLOOR_EQ_WEIGHTS", w)
rust("ERNIE_FLOOR_EQ_D_LOGITS", r.weight.grad.t())

# DBRX: softmax top-3, / torch.norm(w, p).
DBRX_LOGITS = f32_exact([[0.2, -1.0, 1.3, 0.4, -0.6, 0.9],
                            [2.5, 2.1, -0.3, 0.0, -1.5, 0.6],
                            [-0.2, 0.35, 0.1, -0.7, 0.5, 0.05]])
DBRX_DW = f32_exact([[0.5, -1.0, 0.2], [1.5, 0.75, -0.4], [-0.3, 0.8, 0.6]])
for name, p in [("DBRX_P1", 1.0), ("DBRX_P2", 2.0), ("DBRX_P15", 1.5), ("DBRX_P05", 0.5)]:
    lp = DBRX_LOGITS.clone().requires_grad_(True)
    w, idx = DbrxFFN.route_tokens_to_experts(types.SimpleNamespace(moe_normalize_expert_weights=p, top_k=3), lp)
    (w * DBRX_DW).sum().backward()
    print(f"// DBRX, moe_normalize_expert_weights {p}")
    rust(f"{name}_EXPERTS", idx, "i32")
    rust(f"{name}_WEIGHTS", w)
    rust(f"{name}_D_LOGITS", lp.grad)

# PhiMoE: sparsemixer(logits, jitter_eps, training=False).
PHI_LOGITS = f32_exact([[2.0, 2.0, 1.99, 0.5, 0.0],
                           [-3.0, -2.0, -2.01, -10.0, -2.03],
                           [0.0, 0.0, 0.0, 0.0, 0.0],
                           [9.0, 1.0, 0.99, 1.0, -4.0],
                           [0.3, 1.2, -0.5, 1.1, 0.9]])
PHI_DW = f32_exact([[0.5, -1.0], [1.5, 0.75], [-0.3, 0.8], [0.9, -0.6], [1.2, 0.4]])
for name, eps in [("PHI_EPS001", 0.01), ("PHI_EPS03", 0.3)]:
    # The engine takes jitter_eps as f32: give torch the same number.
    eps = float(np.float32(eps))
    lp = PHI_LOGITS.clone().requires_grad_(True)
    w, idx = sparsemixer(lp, jitter_eps=eps, training=False, top_k=2)
    (w * PHI_DW).sum().backward()
    print(f"// PhiMoE sparsemixer, jitter_eps {eps}")
    rust(f"{name}_EXPERTS", idx, "i32")
    rust(f"{name}_WEIGHTS", w)
    rust(f"{name}_D_LOGITS", lp.grad)

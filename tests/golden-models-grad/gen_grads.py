"""Reference gradients of the HF model-family MoE blocks (tests/golden-models), from
torch autograd through transformers' own modules.

For each case NN_family (the unquantised ones, 01-30): load `model/` with the case's
`model_class` in float32, take the block at `block_path_in_memory` (plus the case's
`extra_modules_added_to_y`), run it on `input/x` in eval mode exactly as the forward
reference did, and differentiate `sum(y * dy)` for a seeded `dy`. Saves
`NN_family.safetensors` here with `input/dy` [T, H], `grad/dx` [T, H], `grad/router`
(the router weight [E, H] as the block holds it) and, where the block has them,
`grad/router_bias` (gpt-oss) and `grad/output_bias` (JetMoE).

Run from the repository root with torch and transformers 5.23 installed:
    python tests/golden-models-grad/gen_grads.py
"""

import glob
import json
import os

import torch
import transformers
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROUTER_NAMES = ("gate.weight", "router.weight", "router.layer.weight", "gate.wg.weight",
                "router.gate.weight", "router.classifier.weight")


def main():
    torch.manual_seed(0)
    for case_json in sorted(glob.glob(os.path.join(HERE, "..", "golden-models", "*", "case.json"))):
        case_dir = os.path.dirname(case_json)
        c = json.load(open(case_json))
        name = c["name"]
        if int(name[:2]) > 30:
            continue  # quantised copies of families 03, 06, 10: same block, same gradients
        cls = getattr(transformers, c["model_class"])
        model = cls.from_pretrained(os.path.join(case_dir, c["model_dir"]), dtype=torch.float32)
        model.eval()
        block = model.get_submodule(c["block_path_in_memory"])
        extras = [model.get_submodule(m) for m in c["extra_modules_added_to_y"]]
        t = load_file(os.path.join(case_dir, "tensors.safetensors"))
        x = t["input/x"].clone().unsqueeze(0).requires_grad_(True)
        out = block(x)
        y = out[0] if isinstance(out, tuple) else out
        for m in extras:
            y = y + m(x)
        y = y.reshape(t["expect/y"].shape)
        rel = ((y - t["expect/y"]).norm() / t["expect/y"].norm()).item()
        assert rel <= 1e-5, f"{name}: forward differs from expect/y by {rel:.2e}"
        g = torch.Generator().manual_seed(1000 + int(name[:2]))
        dy = torch.randn(y.shape, generator=g)
        block.zero_grad()
        (y * dy).sum().backward()
        e_scored = t["expect/router_logits"].shape[-1]
        params = dict(block.named_parameters())
        router = [n for n, p in params.items()
                  if n.endswith(ROUTER_NAMES) and "shared" not in n and p.shape[0] == e_scored]
        assert len(router) == 1, f"{name}: router weight among {list(params)}"
        out_t = {"input/dy": dy, "grad/dx": x.grad.reshape(y.shape), "grad/router": params[router[0]].grad}
        rb = router[0][: -len("weight")] + "bias"
        if rb in params:
            out_t["grad/router_bias"] = params[rb].grad
        if c["family"] == "jetmoe":
            out_t["grad/output_bias"] = params["bias"].grad
        out_t = {k: v.detach().contiguous().float() for k, v in out_t.items()}
        save_file(out_t, os.path.join(HERE, f"{name}.safetensors"),
                  metadata={"source": f"torch {torch.__version__} autograd, transformers {transformers.__version__} {c['block_class']}",
                            "router_param": router[0]})
        print(name, router[0], {k: list(v.shape) for k, v in out_t.items()})


if __name__ == "__main__":
    main()

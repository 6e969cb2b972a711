#!/usr/bin/env python3
"""The Python path's overhead, and a patched transformers block against the unpatched one.

On one Mixtral-shaped MoE layer (SwiGLU experts, softmax top-k renormalised, f32, cpu
backend), interleaved over --rounds rounds in one run:

* ``cli``: ``moe bench layer --json`` (the engine from Rust; its median forward);
* ``native``: the same layer through ``moe_engine._native`` (torch tensor in, torch
  tensors out: the extension's whole cost);
* ``patched``: the block of a one-layer transformers ``MixtralModel`` after
  ``moe_engine.torch.patch`` (what a patched model runs per MoE layer);
* ``torch``: the same block unpatched (transformers' eager experts path).

Each is the median of --iters forwards after 2 warm-ups; the report gives the median over
rounds, GFLOP/s with FLOPs = 2 · T · k · 3 · H · F (the expert products, as
``moe bench layer`` counts them), each path's time over the CLI's, and over the floor:
max(FLOPs at the rate torch's sgemm reaches here, the experts' weight bytes at the rate
a 256 MiB copy reaches here), both measured in the same run.

usage: python bench/python_overhead.py [--tokens 512] [--rounds 5] [--json]
  (needs the package installed, or PYTHONPATH=python with a built extension; --moe is the
  CLI binary, default target/release/moe)
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch


def median_ms(f, iters):
    for _ in range(2):
        f()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        f()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--moe", default="target/release/moe")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    from transformers import MixtralConfig, MixtralModel
    import moe_engine.torch as met

    torch.manual_seed(0)
    cfg = MixtralConfig(hidden_size=a.hidden, intermediate_size=a.ffn, num_local_experts=a.experts,
                        num_experts_per_tok=a.top_k, num_hidden_layers=1, num_attention_heads=8,
                        num_key_value_heads=8, vocab_size=128)
    model = MixtralModel(cfg).eval()
    with torch.no_grad():
        for prm in model.layers[0].mlp.parameters():
            prm.normal_(0.0, prm.shape[-1] ** -0.5)
    block = model.layers[0].mlp
    x = torch.randn(1, a.tokens, a.hidden)
    with torch.inference_mode():
        ref = block(x).clone()
    patched_model = __import__("copy").deepcopy(model)
    if met.patch(patched_model, backend="cpu") != 1:
        sys.exit("patch did not replace the one MoE block")
    pblock = patched_model.layers[0].mlp
    with torch.inference_mode():
        got = pblock(x)
    err = ((got - ref).norm() / ref.norm()).item()
    if not err < 1e-5:
        sys.exit(f"patched block differs from transformers': rel L2 {err:.2e}")
    native = pblock._moe_engine
    x2 = x.reshape(-1, a.hidden).contiguous()

    cli = [a.moe, "bench", "layer", "--json", "--hidden", str(a.hidden), "--ffn", str(a.ffn), "--experts",
           str(a.experts), "--top-k", str(a.top_k), "--tokens", str(a.tokens), "--iters", str(a.iters)]
    runs = {"cli": [], "native": [], "patched": [], "torch": []}
    for _ in range(a.rounds):
        run = subprocess.run(cli, capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"{' '.join(cli)} failed:\n{run.stderr}")
        out = run.stdout
        runs["cli"].append(json.loads(out.strip().splitlines()[-1])["median_ms"])
        with torch.inference_mode():
            runs["native"].append(median_ms(lambda: native.forward(x2), a.iters))
            runs["patched"].append(median_ms(lambda: pblock(x), a.iters))
            runs["torch"].append(median_ms(lambda: block(x), a.iters))
    flops = 2 * a.tokens * a.top_k * 3 * a.hidden * a.ffn
    med = {k: statistics.median(v) for k, v in runs.items()}
    # The compute floor at the rate this machine's torch sgemm reaches (MKL, 2048³ f32):
    # a measured peak rather than a datasheet one.
    n = 2048
    ma, mb = torch.randn(n, n), torch.randn(n, n)
    sgemm = 2 * n**3 / (median_ms(lambda: ma @ mb, 5) * 1e6)
    # And the memory floor: every expert weight read once, at the rate a 256 MiB copy
    # (read + write) runs here.
    big, dst = torch.empty(64 << 20), torch.empty(64 << 20)
    gbps = 2 * big.numel() * 4 / (median_ms(lambda: dst.copy_(big), 5) * 1e6)
    weight_bytes = a.experts * 3 * a.hidden * a.ffn * 4
    floor_ms = max(flops / (sgemm * 1e6), weight_bytes / (gbps * 1e6))
    report = {
        "shape": {"hidden": a.hidden, "ffn": a.ffn, "experts": a.experts, "top_k": a.top_k, "tokens": a.tokens},
        "torch_threads": torch.get_num_threads(), "rounds": a.rounds, "iters": a.iters, "patched_rel_l2": err,
        "median_ms": med, "gflops": {k: flops / (v * 1e6) for k, v in med.items()},
        "over_cli": {k: v / med["cli"] for k, v in med.items()},
        "sgemm_gflops": sgemm, "copy_gbps": gbps, "floor_ms": floor_ms, "over_floor": {k: v / floor_ms for k, v in med.items()},
        "rounds_ms": runs,
    }
    if a.json:
        print(json.dumps(report))
        return
    print(f"H {a.hidden} F {a.ffn} E {a.experts} k {a.top_k} T {a.tokens} f32, torch threads {torch.get_num_threads()}, "
          f"{a.rounds} rounds x {a.iters} iters; patched block rel L2 {err:.1e} against transformers'")
    print(f"  floor {floor_ms:.2f} ms: max(expert FLOPs at torch's sgemm rate here, {sgemm:.1f} GFLOP/s; "
          f"expert weights at the copy rate here, {gbps:.1f} GB/s)")
    for k in ("cli", "native", "patched", "torch"):
        print(f"  {k:8s} median {med[k]:8.2f} ms  {report['gflops'][k]:6.1f} GFLOP/s  x{report['over_cli'][k]:.3f} of the CLI"
              f"  x{report['over_floor'][k]:.2f} of the floor")


if __name__ == "__main__":
    main()

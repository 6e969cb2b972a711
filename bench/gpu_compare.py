#!/usr/bin/env python3
"""Side-by-side GPU benchmark of one MoE layer forward: `moe bench layer --backend cuda`
against PyTorch on the same GPU, with the physical floor of every case.

Peers (bf16 weights and activations, f32 accumulation, `inference_mode`):
  - transformers' `MixtralSparseMoeBlock` in eager mode (the experts loop of HF),
  - a `torch._grouped_mm` implementation: sort routes by expert, one grouped GEMM for
    gate/up, SiLU·up, one grouped GEMM for down, weighted scatter back. Its output is
    checked against the transformers block before timing.

Shapes: Mixtral (H 4096, F 14336, E 8, k 2) and fine-grained (H 2048, F 1408, E 64, k 6;
H 7168, F 2048, E 256, k 8), each at T = 1, 8, 64, 512, 4096 (override with --shape and
--tokens). Times are CUDA-event medians over --iters after warm-up.

Floor = max(FLOPs / peak, bytes / bandwidth), where bytes are the weights of the experts
the batch touches (expected distinct experts E·(1 − (1 − k/E)^T)) plus router and
activations; peak and bandwidth default to the device's datasheet (H100 SXM: 989 dense
bf16 TFLOP/s, 3.35 TB/s; H200: same peak, 4.8 TB/s; A100 SXM: 312, 2.04), or pass
--peak-tflops / --mem-tbps.

usage: bench/gpu_compare.py [--shape H,F,E,K ...] [--tokens 1,8,64,512,4096] [--iters 20]
                            [--skip-ours] [--device cuda] [--dtype bf16] [--json out.json]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_SHAPES = ["4096,14336,8,2", "2048,1408,64,6", "7168,2048,256,8"]
DATASHEET = {  # name fragment: (dense bf16 TFLOP/s, TB/s)
    "H200": (989.0, 4.8),
    "H100": (989.0, 3.35),
    "A100": (312.0, 2.04),
}


def device_floor_params(args):
    if args.peak_tflops and args.mem_tbps:
        return args.peak_tflops, args.mem_tbps
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    for frag, (peak, bw) in DATASHEET.items():
        if frag in name:
            return args.peak_tflops or peak, args.mem_tbps or bw
    return args.peak_tflops or float("nan"), args.mem_tbps or float("nan")


def floor_ms(h, f, e, k, t, peak_tflops, mem_tbps, elem=2):
    flops = 2.0 * t * k * 3 * h * f + 2.0 * t * h * e
    touched = e * (1.0 - (1.0 - k / e) ** t)
    weight_bytes = touched * 3 * h * f * elem + e * h * 4
    act_bytes = t * h * elem * 2 + t * k * h * elem * 4
    return max(flops / (peak_tflops * 1e12), (weight_bytes + act_bytes) / (mem_tbps * 1e12)) * 1e3, flops


def build_hf_block(h, f, e, k, dtype, device):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=h, intermediate_size=f, num_local_experts=e, num_experts_per_tok=k,
                        num_hidden_layers=1, hidden_act="silu", router_jitter_noise=0.0)
    if hasattr(cfg, "_experts_implementation"):
        cfg._experts_implementation = "eager"
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        for _, p in block.named_parameters():
            p.normal_(0.0, p.shape[-1] ** -0.5)
    return block.to(device=device, dtype=dtype).eval()


def weights_of(block, e, f, h):
    ex = block.experts
    if hasattr(ex, "gate_up_proj"):
        gate_up, down = ex.gate_up_proj.detach(), ex.down_proj.detach()
    else:
        gate_up = torch.stack([torch.cat([m.w1.weight, m.w3.weight], 0) for m in ex]).detach()
        down = torch.stack([m.w2.weight for m in ex]).detach()
    # transformers stores gate_up as [E, 2F, H] (5.x) or builds it so; accept [E, H, 2F] too.
    if gate_up.shape == (e, h, 2 * f):
        gate_up = gate_up.transpose(1, 2)
    if down.shape == (e, f, h):
        down = down.transpose(1, 2)
    return gate_up.contiguous(), down.contiguous(), block.gate.weight.detach()


def grouped_mm_forward(gate_up, down, router, k):
    """Sort-by-expert MoE with torch._grouped_mm (mat_b laid out [E, K, N])."""
    e, two_f, _ = gate_up.shape
    f = two_f // 2
    w1 = gate_up.transpose(1, 2).contiguous()   # [E, H, 2F]
    w2 = down.transpose(1, 2).contiguous()      # [E, F, H]

    def forward(x):
        n, hdim = x.shape
        logits = F.linear(x, router)
        probs = torch.softmax(logits.float(), dim=-1)
        topw, topi = torch.topk(probs, k, dim=-1)
        topw = (topw / topw.sum(-1, keepdim=True)).to(x.dtype)
        flat = topi.reshape(-1)
        order = torch.argsort(flat, stable=True)
        offs = torch.cumsum(torch.bincount(flat, minlength=e), 0).to(torch.int32)
        xs = x.index_select(0, order // k)
        gu = torch._grouped_mm(xs, w1, offs=offs)
        hmid = F.silu(gu[:, :f]) * gu[:, f:]
        ys = torch._grouped_mm(hmid, w2, offs=offs)
        ys = ys * topw.reshape(-1)[order].unsqueeze(-1)
        out = torch.zeros(n * k, hdim, dtype=ys.dtype, device=ys.device)
        out[order] = ys
        return out.view(n, k, hdim).sum(1)

    return forward


def time_ms(fn, x, warmup, iters, device):
    with torch.inference_mode():
        for _ in range(warmup):
            fn(x)
        if device != "cuda":
            import time
            ts = []
            for _ in range(iters):
                t0 = time.perf_counter()
                fn(x)
                ts.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(ts)
        ts = []
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn(x)
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b))
        return statistics.median(ts)


def ours(args, h, f, e, k, t):
    cmd = [args.moe, "bench", "layer", "--backend", args.backend, "--dtype", args.dtype, "--hidden", str(h),
           "--ffn", str(f), "--experts", str(e), "--top-k", str(k), "--tokens", str(t), "--iters", str(args.iters),
           "--json"]
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])["median_ms"]
    except (subprocess.CalledProcessError, FileNotFoundError) as err:
        msg = getattr(err, "stderr", "") or str(err)
        print(f"# ours failed for {h},{f},{e},{k},T={t}: {msg.strip()[:300]}", file=sys.stderr)
        return float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", action="append", help="H,F,E,K (repeatable)")
    ap.add_argument("--tokens", default="1,8,64,512,4096")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    ap.add_argument("--backend", default="cuda", help="our backend (cuda, or wgpu)")
    ap.add_argument("--moe", default=os.path.join(ROOT, "target", "release", "moe"))
    ap.add_argument("--skip-ours", action="store_true")
    ap.add_argument("--peak-tflops", type=float)
    ap.add_argument("--mem-tbps", type=float)
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[args.dtype]
    peak, bw = device_floor_params(args)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"# {name}, torch {torch.__version__}, {args.dtype}, floor: {peak} TFLOP/s, {bw} TB/s")
    print("| H | F | E | k | T | moe ms | transformers ms | _grouped_mm ms | floor ms | moe/floor | hf/floor | gmm/floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for sh in args.shape or DEFAULT_SHAPES:
        h, f, e, k = (int(v) for v in sh.split(","))
        block = build_hf_block(h, f, e, k, dtype, args.device)
        gate_up, down, router = weights_of(block, e, f, h)
        gmm = grouped_mm_forward(gate_up, down, router, k)
        for t in (int(v) for v in args.tokens.split(",")):
            x = torch.randn(t, h, device=args.device, dtype=dtype)

            def hf(inp):
                out = block(inp.unsqueeze(0))
                return (out[0] if isinstance(out, tuple) else out).squeeze(0)

            with torch.inference_mode():
                ref = hf(x).float()
                try:
                    g = gmm(x).float()
                    err = ((g - ref).norm() / ref.norm().clamp_min(1e-30)).item()
                    if err > 2e-2:
                        raise RuntimeError(f"_grouped_mm output differs from transformers (rel L2 {err:.3g})")
                    gmm_ok = True
                except RuntimeError as ex:  # unsupported device/dtype, or a mismatch
                    print(f"# _grouped_mm unavailable for {sh} T={t}: {str(ex)[:200]}", file=sys.stderr)
                    gmm_ok = False
            hf_ms = time_ms(hf, x, args.warmup, args.iters, args.device)
            gmm_ms = time_ms(gmm, x, args.warmup, args.iters, args.device) if gmm_ok else float("nan")
            our_ms = float("nan") if args.skip_ours else ours(args, h, f, e, k, t)
            fl, _ = floor_ms(h, f, e, k, t, peak, bw, elem=2 if dtype != torch.float32 else 4)
            row = dict(h=h, f=f, e=e, k=k, t=t, moe_ms=our_ms, hf_ms=hf_ms, gmm_ms=gmm_ms, floor_ms=fl)
            rows.append(row)
            print(f"| {h} | {f} | {e} | {k} | {t} | {our_ms:.3f} | {hf_ms:.3f} | {gmm_ms:.3f} | {fl:.4f} | "
                  f"{our_ms / fl:.1f} | {hf_ms / fl:.1f} | {gmm_ms / fl:.1f} |", flush=True)
        del block, gate_up, down, router
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()

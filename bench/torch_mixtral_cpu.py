#!/usr/bin/env python3
"""PyTorch CPU peer benchmark for the Mixtral sparse-MoE block.

Times one forward pass of a Mixtral MoE block (router + top-k experts) in
float32 (or bf16 / f16 with --dtype) on the CPU, so that `moe bench layer --backend cpu` can be compared
against a well-known reference.

Two implementations are available:

* default:    transformers' `MixtralSparseMoeBlock` (eager experts path:
              one-hot expert mask, per-expert gather + linear + index_add_).
* --grouped:  a plain-torch implementation using the *same* weights: sort the
              (token, slot) pairs by expert, one fused gate/up matmul and one
              down matmul per expert on a contiguous slice, then a weighted
              scatter back. Its output is checked against the transformers
              block before timing.

FLOPs are counted as 2 * tokens * top_k * (3 * hidden * ffn), i.e. only the
expert matmuls (gate, up, down) -- the same count the Rust bench uses. The
router matmul, softmax/top-k and the gathers are excluded from the FLOP count
but included in the measured time.
"""

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F


DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024, help="hidden size (default 1024)")
    p.add_argument("--ffn", type=int, default=2816, help="expert intermediate size (default 2816)")
    p.add_argument("--experts", type=int, default=8, help="number of experts (default 8)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    p.add_argument("--tokens", type=int, default=512, help="tokens per forward, x is [1, tokens, hidden] (default 512)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--iters", type=int, default=10, help="timed forwards (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up forwards (default 3)")
    p.add_argument("--seed", type=int, default=0, help="RNG seed for weights and input (default 0)")
    p.add_argument("--grouped", action="store_true",
                   help="time the plain-torch sort-by-expert implementation instead of transformers' block")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of human-readable text")
    p.add_argument("--dtype", choices=list(DTYPES), default="f32",
                   help="parameter and activation dtype of the block (a bf16 model runs in bf16 in transformers; "
                        "the weights are drawn in f32 and rounded, as `moe bench layer --dtype` stores them)")
    p.add_argument("--fresh-inputs", action="store_true",
                   help="a new seeded input for every forward (warm-ups included), as `moe bench layer --fresh-inputs`: "
                        "a decode-sized forward then routes to other experts each time and reads them from memory")
    p.add_argument("--train", action="store_true",
                   help="time a training step instead: forward, autograd backward of sum(y * dy), "
                        "torch.optim.AdamW step (FLOPs counted as three forwards)")
    args = p.parse_args(argv)
    for name in ("hidden", "ffn", "experts", "top_k", "tokens", "threads", "iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.top_k > args.experts:
        p.error("--top-k must be <= --experts")
    return args


def build_hf_block(args):
    """Build transformers' MixtralSparseMoeBlock with random weights (drawn in float32, then in --dtype)."""
    import transformers
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        num_hidden_layers=1,
        hidden_act="silu",
        router_jitter_noise=0.0,
    )
    # transformers 5.x dispatches the experts forward through
    # config._experts_implementation; a standalone config leaves it None
    # (which falls back to eager with a warning). Pin eager explicitly.
    if hasattr(config, "_experts_implementation"):
        config._experts_implementation = "eager"

    block = MixtralSparseMoeBlock(config)
    block = block.to(torch.float32)
    # 5.x allocates expert weights with torch.empty; initialise everything.
    # Scale ~ 1/sqrt(fan_in) keeps activations O(1) (and far from denormals).
    with torch.no_grad():
        for name, p in block.named_parameters():
            fan_in = p.shape[-1]
            p.normal_(0.0, fan_in ** -0.5)
    block = block.to(DTYPES[args.dtype])
    block.eval()
    return block, transformers.__version__


def expert_weights(block, args):
    """Return (gate_up [E, 2F, H], down [E, H, F], router [E, H]) from the HF block.

    Handles the 5.x fused-3D-parameter layout and the 4.x per-expert
    w1 (gate) / w3 (up) / w2 (down) nn.Linear layout.
    """
    experts = block.experts
    router = block.gate.weight.detach()
    if hasattr(experts, "gate_up_proj"):
        gate_up = experts.gate_up_proj.detach()
        down = experts.down_proj.detach()
    else:  # transformers 4.x: ModuleList of MixtralBlockSparseTop2MLP
        gate_up = torch.stack([torch.cat([e.w1.weight, e.w3.weight], dim=0) for e in experts]).detach()
        down = torch.stack([e.w2.weight for e in experts]).detach()
    assert gate_up.shape == (args.experts, 2 * args.ffn, args.hidden), gate_up.shape
    assert down.shape == (args.experts, args.hidden, args.ffn), down.shape
    return gate_up.contiguous(), down.contiguous(), router.contiguous()


def make_grouped_forward(gate_up, down, router, top_k):
    """Plain-torch sort-by-expert MoE forward using the given weights."""
    num_experts = gate_up.shape[0]
    ffn = down.shape[-1]

    def forward(x):
        bsz, seq, hidden = x.shape
        h = x.reshape(-1, hidden)
        n_tok = h.shape[0]
        # Router: softmax over experts, top-k, renormalise (Mixtral semantics).
        logits = F.linear(h, router)
        probs = torch.softmax(logits, dim=-1)
        topw, topi = torch.topk(probs, top_k, dim=-1)
        topw = topw / topw.sum(dim=-1, keepdim=True)

        flat_e = topi.reshape(-1)                       # [n_tok * k]
        order = torch.argsort(flat_e, stable=True)      # (token, slot) pairs sorted by expert
        tok_of = order // top_k                         # source token of each sorted row
        counts = torch.bincount(flat_e, minlength=num_experts).tolist()

        xs = h.index_select(0, tok_of)                  # [n_tok * k, hidden], grouped by expert
        ys = torch.empty_like(xs)
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            end = start + c
            gu = F.linear(xs[start:end], gate_up[e])    # fused gate/up: [c, 2F]
            act = F.silu(gu[:, :ffn]) * gu[:, ffn:]
            torch.matmul(act, down[e].t(), out=ys[start:end])
            start = end

        ys.mul_(topw.reshape(-1)[order].unsqueeze(-1))  # routing weights, sorted order
        out = torch.empty_like(ys)
        out[order] = ys                                 # back to (token, slot) order
        return out.view(n_tok, top_k, hidden).sum(dim=1).view(bsz, seq, hidden)

    return forward


def read_once(tensors):
    """Reads every element of ``tensors`` once, as the engine's cpu backend reads its weights
    at load: on a VM that backs guest memory lazily the first read of freshly written memory
    runs at about half speed, and a decode forward over many experts would otherwise time
    that first read of each expert instead of decoding."""
    with torch.inference_mode():
        for t in tensors:
            t.sum()


def time_forward(fn, xs, warmup, iters):
    """Times ``fn`` on ``xs[i]`` for each forward (one tensor repeated, or a new one each)."""
    with torch.inference_mode():
        for i in range(warmup):
            fn(xs[i % len(xs)])
        times = []
        for i in range(iters):
            x = xs[(warmup + i) % len(xs)]
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return times


def experts_touched(block, xs, top_k):
    """Mean number of experts that receive a route per forward (the memory floor's bytes)."""
    w = getattr(block.gate, "weight", None)
    if w is None:
        return None
    with torch.inference_mode():
        n = [torch.topk(x.reshape(-1, x.shape[-1]) @ w.T, top_k, dim=-1).indices.unique().numel() for x in xs]
    return sum(n) / len(n)


def time_train_step(block, fwd, x, warmup, iters, seed):
    """Times forward + autograd backward of sum(y * dy) + AdamW step (+ zero_grad)."""
    block.train()
    g = torch.Generator().manual_seed(seed + 1)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float32)
    opt = torch.optim.AdamW(block.parameters(), lr=1e-4)

    def step():
        y = fwd(x)
        (y * dy).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    block, tf_version = build_hf_block(args)
    dtype = DTYPES[args.dtype]
    x = torch.randn(1, args.tokens, args.hidden, dtype=torch.float32).to(dtype)

    def hf_forward(inp):
        out = block(inp)
        # transformers 4.x returns (hidden_states, router_logits); 5.x a tensor.
        return out[0] if isinstance(out, tuple) else out

    max_abs_diff = None
    if args.train:
        if args.grouped:
            print("error: --train times the transformers block (autograd); drop --grouped", file=sys.stderr)
            return 2
        fn = None
        impl = "transformers-MixtralSparseMoeBlock-train"
    elif args.grouped:
        gate_up, down, router = expert_weights(block, args)
        fn = make_grouped_forward(gate_up, down, router, args.top_k)
        with torch.inference_mode():
            ref = hf_forward(x)
            got = fn(x)
        max_abs_diff = (ref - got).abs().max().item()
        if args.dtype == "f32":
            tol = 1e-3 * max(1.0, ref.abs().max().item())
            ok, what = max_abs_diff <= tol, f"max|diff|={max_abs_diff:g} > {tol:g}"
        else:
            # Two orders of rounding in the block's half type: compare as a whole (relative
            # L2), single elements of a sum near zero can differ by its rounding.
            r, gd = ref.double(), got.double()
            rel = ((r - gd).norm() / r.norm().clamp_min(1e-30)).item()
            tol = {"bf16": 2e-2, "f16": 3e-3}[args.dtype]
            ok, what = rel <= tol, f"relative L2 {rel:.2e} > {tol:g}"
        if not ok:
            print(f"error: grouped output differs from transformers block: {what}", file=sys.stderr)
            return 1
        impl = "torch-grouped"
    else:
        fn = hf_forward
        impl = "transformers-MixtralSparseMoeBlock"

    if args.train and args.dtype != "f32":
        print("error: --train times f32 training; drop --dtype", file=sys.stderr)
        return 2
    if args.fresh_inputs and args.train:
        print("error: --fresh-inputs times forwards; drop --train", file=sys.stderr)
        return 2
    if args.fresh_inputs:
        g = torch.Generator().manual_seed(args.seed + 100)
        xs = [torch.randn(1, args.tokens, args.hidden, generator=g).to(dtype) for _ in range(args.warmup + args.iters)]
    else:
        xs = [x]
    touched = None
    read_once(list(block.parameters()) + ([gate_up, down, router] if args.grouped else []))
    if args.train:
        times = time_train_step(block, hf_forward, x, args.warmup, args.iters, args.seed)
    else:
        times = time_forward(fn, xs, args.warmup, args.iters)
        touched = experts_touched(block, xs[args.warmup:] if args.fresh_inputs else xs, args.top_k)
    median_s = statistics.median(times)
    min_s = min(times)
    flops = 2.0 * args.tokens * args.top_k * (3.0 * args.hidden * args.ffn) * (3.0 if args.train else 1.0)

    result = {
        "impl": impl,
        "median_ms": median_s * 1e3,
        "min_ms": min_s * 1e3,
        "tokens_per_s": args.tokens / median_s,
        "gflops": flops / median_s / 1e9,
        "torch_version": torch.__version__,
        "fresh_inputs": args.fresh_inputs,
        "experts_touched": touched,
        "transformers_version": tf_version,
        "threads": args.threads,
        "hidden": args.hidden,
        "ffn": args.ffn,
        "experts": args.experts,
        "top_k": args.top_k,
        "tokens": args.tokens,
        "iters": args.iters,
        "warmup": args.warmup,
        "dtype": args.dtype,
        "train": args.train,
    }
    if max_abs_diff is not None:
        result["max_abs_diff_vs_transformers"] = max_abs_diff

    if args.json:
        print(json.dumps(result))
    else:
        print(f"impl            {impl}")
        print(f"shape           hidden={args.hidden} ffn={args.ffn} experts={args.experts} "
              f"top_k={args.top_k} tokens={args.tokens} ({args.dtype})")
        print(f"versions        torch {torch.__version__}, transformers {tf_version}")
        print(f"threads         {args.threads}  (iters={args.iters}, warmup={args.warmup})")
        print(f"median_ms       {result['median_ms']:.3f}")
        print(f"min_ms          {result['min_ms']:.3f}")
        print(f"tokens_per_s    {result['tokens_per_s']:.1f}")
        print(f"gflops          {result['gflops']:.2f}  (expert matmuls only, on median)")
        if max_abs_diff is not None:
            print(f"check           max|grouped - transformers| = {max_abs_diff:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

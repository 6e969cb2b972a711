#!/usr/bin/env python3
"""Side-by-side cpu benchmark: `moe bench layer` against PyTorch, interleaved in one run.

The machine this project is developed on is a noisy 2-core VM, so absolute times move by
10% between runs; the runs here alternate (ours, transformers, torch grouped) for several
rounds and report the median of the per-round medians and the ratio, plus the physical
floor of the case (FLOPs over the peak, weight bytes over memory bandwidth).

With --train the runs time a training step instead (forward, backward of sum(y * dy),
AdamW step) against transformers' block under autograd, and the FLOP floor is three
forwards'.

usage: bench/compare_cpu.py [--rounds 5] [--threads 2] [--peak-gflops P] [--mem-gbps B]
                            [--shape H,F,E,K,T ...] [--train] [--python PY]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run_json(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def peak_gflops_guess():
    """cores x GHz x 32 FLOP/cycle/FMA-unit-pair (AVX-512: 16 lanes x 2 FMA units x 2)."""
    try:
        info = open("/proc/cpuinfo").read()
        mhz = max(float(l.split(":")[1]) for l in info.splitlines() if l.startswith("cpu MHz"))
        cores = os.cpu_count() or 1
        lanes = 16 if "avx512f" in info else 8
        return cores * mhz / 1e3 * lanes * 2 * 2
    except Exception:
        return float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--peak-gflops", type=float, default=None)
    ap.add_argument("--mem-gbps", type=float, default=None, help="memory bandwidth for the weight-streaming floor")
    ap.add_argument("--shape", action="append", help="H,F,E,K,T (repeatable); default Mixtral-like 1024,2816,8,2,512")
    ap.add_argument("--moe", default=os.path.join(ROOT, "target", "release", "moe"))
    ap.add_argument("--train", action="store_true", help="time training steps (forward + backward + AdamW)")
    ap.add_argument("--python", default=sys.executable, help="the Python with torch and transformers")
    ap.add_argument("--fresh-inputs", action="store_true",
                    help="a new input every forward on both sides (what decoding does: the experts hit change, their "
                         "weights come from memory); the memory floor then counts the experts each forward touched")
    a = ap.parse_args()
    shapes = a.shape or ["1024,2816,8,2,512"]
    peak = a.peak_gflops or peak_gflops_guess()
    print(f"# threads {a.threads}, rounds {a.rounds}, iters {a.iters}, peak {peak:.0f} GFLOP/s (f32)"
          + (f", memory {a.mem_gbps:.1f} GB/s" if a.mem_gbps else ""))
    if a.train:
        print("| H | F | E | k | T | moe cpu step ms | transformers + autograd step ms | ratio vs transformers | floor ms | moe / floor |")
        print("|---|---|---|---|---|---|---|---|---|---|")
    else:
        print("| H | F | E | k | T | moe cpu ms | transformers ms | torch grouped ms | ratio vs transformers | ratio vs grouped | floor ms | moe / floor |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for sh in shapes:
        h, f, e, k, t = (int(v) for v in sh.split(","))
        common = ["--hidden", str(h), "--ffn", str(f), "--experts", str(e), "--top-k", str(k), "--tokens", str(t),
                  "--iters", str(a.iters), "--json"]
        ours, hf, grouped, touched_seen = [], [], [], []
        train = ["--train"] if a.train else []
        train += ["--fresh-inputs"] if a.fresh_inputs else []
        peer = [a.python, os.path.join(HERE, "torch_mixtral_cpu.py"), "--threads", str(a.threads)] + common + train
        for _ in range(a.rounds):
            r = run_json([a.moe, "bench", "layer", "--backend", "cpu", "--threads", str(a.threads)] + common + train)
            ours.append(r["median_ms"])
            if r.get("experts_touched") is not None:
                touched_seen.append(r["experts_touched"])
            hf.append(run_json(peer)["median_ms"])
            if not a.train:
                grouped.append(run_json(peer + ["--grouped"])["median_ms"])
        mo, mh = statistics.median(ours), statistics.median(hf)
        flops = 2.0 * t * k * 3 * h * f * (3 if a.train else 1)
        floor = flops / (peak * 1e9) * 1e3
        if a.mem_gbps:
            # The experts the engine's forwards actually routed to (their mean), else every
            # expert that can receive a route.
            touched = statistics.mean(touched_seen) if touched_seen else min(e, t * k)
            floor = max(floor, touched * 3 * h * f * 4 / (a.mem_gbps * 1e9) * 1e3)
        if a.train:
            print(f"| {h} | {f} | {e} | {k} | {t} | {mo:.1f} | {mh:.1f} | {mh / mo:.2f} | {floor:.1f} | {mo / floor:.2f} |")
        else:
            mg = statistics.median(grouped)
            print(f"| {h} | {f} | {e} | {k} | {t} | {mo:.1f} | {mh:.1f} | {mg:.1f} | {mh / mo:.2f} | {mg / mo:.2f} | {floor:.1f} | {mo / floor:.2f} |")


if __name__ == "__main__":
    main()

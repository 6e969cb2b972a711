#!/usr/bin/env python3
"""Side-by-side cpu benchmark: `moe bench layer` against PyTorch, interleaved in one run.

The machine this project is developed on is a noisy 2-core VM, so absolute times move by
10% between runs; the runs here alternate (ours, transformers, torch grouped) for several
rounds and report the median of the per-round medians and the ratio, plus the physical
floor of the case (FLOPs over the peak, weight bytes over memory bandwidth).

The memory floor's bandwidth is measured in the same run (`moe bench machine`, every
thread reading a buffer far past the last-level cache, before each round, the best of
five passes each time; the floor takes the median of those, the rate the machine gave
while the rows ran, an outlier neither way) unless
--mem-gbps gives it, and so is the compute peak unless --peak-gflops gives it: the f32 FMA
peak (every thread running independent FMA chains with the kernels' instructions), or with
--dtype bf16 on a cpu with AVX-512 BF16 the pair-dot peak (`vdpbf16ps`, which the bf16
products run with). The floor of a row is the larger of its FLOPs over that peak and
the bytes of the experts its forwards touched (in the storage dtype) over that bandwidth.
The last column checks the goal of each row: at least 1.2x the faster PyTorch peer, or at
least 90% of the floor.

With --dtype bf16 (or f16) both sides store the expert weights in that type, and the
PyTorch block runs in that type. The engine's bf16 products multiply bf16-rounded
activations (AVX-512 BF16 pair dots past 16 rows, f32 FMAs on the widened weights below),
its f16 products f32 activations by widened weights; both accumulate in f32. With --train the
runs time a training step instead (forward, backward of sum(y * dy), AdamW step) against
transformers' block under autograd, and the FLOP floor is three forwards'.

usage: bench/compare_cpu.py [--rounds 5] [--threads 2] [--peak-gflops P] [--mem-gbps B]
                            [--shape H,F,E,K,T ...] [--dtype f32|bf16|f16]
                            [--fresh-inputs | --fresh-upto T] [--train] [--python PY]
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


def measure_machine(moe, threads, dtype):
    """(best read bandwidth GB/s, compute peak GFLOP/s) of one `moe bench machine` run: the
    f32 FMA peak, or for bf16 weights the peak of the instruction their products run on:
    AMX tiles where the cpu has them, else AVX-512 BF16 pair dots where it has those."""
    r = run_json([moe, "bench", "machine", "--threads", str(threads), "--passes", "5", "--json"])
    peak = r["fma_gflops"]
    if dtype == "bf16" and r.get("bf16_tile_gflops"):
        peak = r["bf16_tile_gflops"]
    elif dtype == "bf16" and r.get("bf16_dot_gflops"):
        peak = r["bf16_dot_gflops"]
    return r["best_gbps"], peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--peak-gflops", type=float, default=None,
                    help="compute peak for the compute floor (default: measured in this run: the f32 FMA "
                         "peak, or with --dtype bf16 the AVX-512 BF16 pair-dot peak where the cpu has it)")
    ap.add_argument("--mem-gbps", type=float, default=None,
                    help="memory bandwidth for the weight-streaming floor (default: measured in this run)")
    ap.add_argument("--shape", action="append", help="H,F,E,K,T (repeatable); default Mixtral-like 1024,2816,8,2,512")
    ap.add_argument("--dtype", choices=["f32", "bf16", "f16"], default="f32",
                    help="storage dtype of the expert weights on both sides")
    ap.add_argument("--moe", default=os.path.join(ROOT, "target", "release", "moe"))
    ap.add_argument("--train", action="store_true", help="time training steps (forward + backward + AdamW)")
    ap.add_argument("--python", default=sys.executable, help="the Python with torch and transformers")
    ap.add_argument("--fresh-inputs", action="store_true",
                    help="a new input every forward on both sides (what decoding does: the experts hit change, their "
                         "weights come from memory); the memory floor then counts the experts each forward touched")
    ap.add_argument("--fresh-upto", type=int, default=0, metavar="T",
                    help="--fresh-inputs for the rows of at most T tokens only")
    a = ap.parse_args()
    shapes = a.shape or ["1024,2816,8,2,512"]
    elem = {"f32": 4, "bf16": 2, "f16": 2}[a.dtype]
    gbps_seen, peaks_seen = [], []
    rows = []
    for sh in shapes:
        h, f, e, k, t = (int(v) for v in sh.split(","))
        fresh = a.fresh_inputs or t <= a.fresh_upto
        common = ["--hidden", str(h), "--ffn", str(f), "--experts", str(e), "--top-k", str(k), "--tokens", str(t),
                  "--iters", str(a.iters), "--json"]
        ours, hf, grouped, touched_seen = [], [], [], []
        train = ["--train"] if a.train else []
        train += ["--fresh-inputs"] if fresh else []
        peer = [a.python, os.path.join(HERE, "torch_mixtral_cpu.py"), "--threads", str(a.threads),
                "--dtype", a.dtype] + common + train
        for _ in range(a.rounds):
            if a.mem_gbps is None or a.peak_gflops is None:
                g, p = measure_machine(a.moe, a.threads, a.dtype)
                gbps_seen.append(g)
                peaks_seen.append(p)
            r = run_json([a.moe, "bench", "layer", "--backend", "cpu", "--threads", str(a.threads),
                          "--dtype", a.dtype] + common + train)
            ours.append(r["median_ms"])
            if r.get("experts_touched") is not None:
                touched_seen.append(r["experts_touched"])
            hf.append(run_json(peer)["median_ms"])
            if not a.train:
                grouped.append(run_json(peer + ["--grouped"])["median_ms"])
        rows.append((h, f, e, k, t, fresh, ours, hf, grouped, touched_seen))
    gbps = a.mem_gbps or statistics.median(gbps_seen)
    peak = a.peak_gflops or statistics.median(peaks_seen)
    seen = (f" (the median of {len(gbps_seen)} measurements in this run: {min(gbps_seen):.1f}-{max(gbps_seen):.1f} GB/s, "
            f"{min(peaks_seen):.0f}-{max(peaks_seen):.0f} GFLOP/s)") if gbps_seen else ""
    print(f"# threads {a.threads}, rounds {a.rounds}, iters {a.iters}, {a.dtype} expert weights, "
          f"compute peak {peak:.0f} GFLOP/s, memory {gbps:.1f} GB/s{seen}")
    if a.train:
        print("| H | F | E | k | T | moe cpu step ms | transformers + autograd step ms | ratio vs transformers | floor ms | floor / moe |")
        print("|---|---|---|---|---|---|---|---|---|---|")
    else:
        print("| H | F | E | k | T | inputs | moe cpu ms | transformers ms | torch grouped ms | ratio vs transformers "
              "| ratio vs grouped | floor ms | floor / moe | goal |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for h, f, e, k, t, fresh, ours, hf, grouped, touched_seen in rows:
        mo, mh = statistics.median(ours), statistics.median(hf)
        flops = 2.0 * t * k * 3 * h * f * (3 if a.train else 1)
        floor = flops / (peak * 1e9) * 1e3
        # The experts the engine's forwards actually routed to (their mean), else every
        # expert that can receive a route.
        touched = statistics.mean(touched_seen) if touched_seen else min(e, t * k)
        floor = max(floor, touched * 3 * h * f * elem / (gbps * 1e9) * 1e3)
        if a.train:
            print(f"| {h} | {f} | {e} | {k} | {t} | {mo:.1f} | {mh:.1f} | {mh / mo:.2f} | {floor:.2f} | {floor / mo:.0%} |")
        else:
            mg = statistics.median(grouped)
            best_peer = min(mh, mg)
            ok = best_peer / mo >= 1.2 or floor / mo >= 0.9
            print(f"| {h} | {f} | {e} | {k} | {t} | {'fresh' if fresh else 'fixed'} | {mo:.2f} | {mh:.2f} | {mg:.2f} "
                  f"| {mh / mo:.2f} | {mg / mo:.2f} | {floor:.2f} | {floor / mo:.0%} | {'yes' if ok else 'no'} |")


if __name__ == "__main__":
    main()

"""Expert parallelism against DeepSpeed: one rank of ``torchrun --nproc_per_node 2``
(gloo, CPU). Run by tests/test_ep.py; can be run by hand:

    PYTHONPATH=python torchrun --nproc_per_node 2 python/tests/ep_worker.py

Per configuration, each rank builds DeepSpeed's own ``MoE`` with ``ep_size=2`` (its
expert-parallel group from ``set_deepspeed_parallelism()``), gives its local experts
distinct weights (global expert ``g`` from seed ``100 + g``; rank ``r`` holds experts
``r·E/2 ..``), and copies it with ``moe_engine.torch.MoE.from_deepspeed``, which joins
DeepSpeed's group through ``moe_engine._dist.expert_parallel_group``. Each rank then
feeds its *own* tokens (and noise seed) to both layers and compares its output,
``l_aux``, ``exp_counts``, ``dx`` and the gradients of the gate and of its local
experts, then takes SGD steps on both and compares the parameters.

Before that, a first phase runs on plain torch.distributed (``init_process_group``, no
deepspeed.comm), where ``moe_engine`` makes its own expert-parallel groups: each rank
compares the engine's ep_size=2 layer with DeepSpeed's ep_size=1 layer holding all E
experts (the same weights), on the rank's own tokens: output, l_aux, exp_counts, dx, the
gate's gradient and its local experts' gradients (DeepSpeed's experts ``r·E/2 ..``,
their gradients summed over the ranks: an ep expert learns from every rank's tokens).
Then ``deepspeed.init_distributed`` takes over the same process group.

Failures are collected, not raised, so that both ranks run every collective; at the end
the ranks agree on the outcome and every rank exits 1 if any comparison failed on any
rank. A watchdog (``faulthandler``) dumps the stacks and exits if a rank hangs, and the
process groups have a timeout.
"""

import faulthandler
import os
import sys
import traceback
from datetime import timedelta

WATCHDOG_S = float(os.environ.get("EP_WORKER_TIMEOUT", "150"))
faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

import deepspeed  # noqa: E402
import deepspeed.comm.torch  # noqa: E402,F401

# DeepSpeed's TorchBackend JIT-builds a CPU shared-memory all-reduce op when it starts
# (ninja and g++, about a minute); the MoE layer never uses it. `deepspeed.comm.torch` as
# an attribute is the real torch module, hence sys.modules.
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None

from deepspeed.moe.layer import MoE as DSMoE  # noqa: E402
from deepspeed.utils import groups  # noqa: E402

from moe_engine.torch import MoE  # noqa: E402

M, F, E, EP = 16, 24, 4, 2
NL = E // EP
C_AUX = 0.1
Y_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)


def _mlp(act, bias=True):
    return lambda: nn.Sequential(nn.Linear(M, F, bias=bias), act(), nn.Linear(F, M, bias=bias))


EXPERTS = {
    "gelu": _mlp(nn.GELU),
    "relu": _mlp(nn.ReLU),
    "silu_nobias": _mlp(nn.SiLU, bias=False),
    "linear": lambda: nn.Linear(M, M),
}

# name, expert, DeepSpeed kwargs, tokens on rank 0 / rank 1, mode, SGD steps.
# Equal token counts where DeepSpeed drops: its capacity is local and its all-to-all
# needs the same [E, C, M] buffer on every rank. drop_tokens=False all-reduces the
# capacity, so the ranks may hold different numbers of tokens.
CONFIGS = [
    ("k1_rts", "gelu", dict(k=1, use_rts=True, min_capacity=1), (24, 24), "train", 2),
    ("k1_rts_eval", "relu", dict(k=1, use_rts=True, min_capacity=1, eval_capacity_factor=0.75), (24, 24), "eval", 0),
    ("k1_jitter_rts", "silu_nobias", dict(k=1, noisy_gate_policy="Jitter", use_rts=True, min_capacity=1), (24, 24), "train", 0),
    ("k1_rsample_nodrop", "gelu", dict(k=1, noisy_gate_policy="RSample", drop_tokens=False, use_rts=False), (10, 26), "train", 0),
    ("k2_top2s", "relu", dict(k=2, capacity_factor=0.5, min_capacity=1), (24, 24), "train", 2),
    ("k2_no_top2s", "linear", dict(k=2, capacity_factor=0.5, min_capacity=1, top2_2nd_expert_sampling=False), (24, 24), "eval", 0),
    ("k2_nodrop", "gelu", dict(k=2, drop_tokens=False), (12, 20), "train", 2),
    ("k1_nodrop_rts", "silu_nobias", dict(k=1, drop_tokens=False, use_rts=True), (16, 16), "train", 0),
    ("k3", "gelu", dict(k=3, capacity_factor=1.0, min_capacity=1), (24, 24), "train", 0),
]

# Phase 1 (plain torch.distributed): name, expert, kwargs, tokens per rank, mode.
PLAIN_CONFIGS = [
    ("plain_k1_rts", "gelu", dict(k=1, use_rts=True, min_capacity=1), (24, 24), "train"),
    ("plain_k2_nodrop", "relu", dict(k=2, drop_tokens=False), (12, 20), "train"),
    ("plain_k2_drops_eval", "silu_nobias", dict(k=2, capacity_factor=0.5, min_capacity=1), (24, 24), "eval"),
]

rank = world = None
failures: list = []
maxima: dict = {}


def say(msg):
    """One line on stdout in one write: the two ranks share the pipe."""
    sys.stdout.flush()
    os.write(1, (msg + "\n").encode())


def note(name, ref, got):
    d = (ref.detach().double() - got.detach().double()).abs().max().item() if ref.numel() else 0.0
    maxima[name] = max(maxima.get(name, 0.0), d)


def check(what, fn):
    try:
        fn()
    except Exception as e:  # collected: the other rank is still running collectives
        failures.append(f"[r{rank}] {what}: {type(e).__name__}: {e}")


def build(kind, kw):
    torch.manual_seed(0)
    ds = DSMoE(hidden_size=M, expert=EXPERTS[kind](), num_experts=E, ep_size=EP, **kw)
    ds.set_deepspeed_parallelism()  # DeepSpeed's own groups, named ep_size_2
    name = ds.expert_group_name
    ep_rank = groups._get_expert_parallel_rank(name)
    set_weights(ds, ep_rank * NL)
    me = MoE.from_deepspeed(ds)
    return ds, me


def set_weights(ds, first_expert):
    """The shared gate and distinct experts: ``ds``'s expert i is global ``first_expert + i``."""
    gate_gen = torch.Generator().manual_seed(1)  # the same gate on every rank
    with torch.no_grad():
        ds.deepspeed_moe.gate.wg.weight.copy_(torch.randn(E, M, generator=gate_gen) * 0.3)
        for i, ex in enumerate(ds.deepspeed_moe.experts.deepspeed_experts):
            gen = torch.Generator().manual_seed(100 + first_expert + i)
            for p in ex.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def compare(what, ds, me, x, dy, seed, expert_names=None):
    """One forward and backward of both; ``expert_names`` maps the engine's parameter
    names to DeepSpeed's (identity if None)."""
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    for p in list(ds.parameters()) + list(me.parameters()):
        p.grad = None
    torch.manual_seed(seed)
    ya, la, ca = ds(xa)
    rng_a = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        yb, lb, cb = me(xb)
    except Exception:
        failures.append(f"[r{rank}] {what}: engine forward raised\n{traceback.format_exc()}")
        raise
    rng_b = torch.get_rng_state()
    check(f"{what}: RNG draws", lambda: _assert(torch.equal(rng_a, rng_b), "different noise draws"))
    check(f"{what}: output", lambda: torch.testing.assert_close(yb, ya, **Y_TOL))
    check(f"{what}: l_aux", lambda: torch.testing.assert_close(lb, la, rtol=1e-6, atol=1e-6))
    check(f"{what}: exp_counts", lambda: _assert(cb.dtype == ca.dtype and torch.equal(cb, ca), f"{cb.tolist()} vs {ca.tolist()}"))
    note("output", ya, yb)
    note("l_aux", la, lb)
    ((ya * dy).sum() + C_AUX * la).backward()
    try:
        ((yb * dy).sum() + C_AUX * lb).backward()
    except Exception:
        failures.append(f"[r{rank}] {what}: engine backward raised\n{traceback.format_exc()}")
        raise
    check(f"{what}: dx", lambda: torch.testing.assert_close(xb.grad, xa.grad, **GRAD_TOL))
    note("dx", xa.grad, xb.grad)
    pa, pb = dict(ds.named_parameters()), dict(me.named_parameters())
    if expert_names is not None:
        # DeepSpeed's single-rank reference saw this rank's tokens only; an expert of the
        # engine's ep layer gets the gradient of every rank's tokens routed to it.
        for pname, p in pa.items():
            if "experts" in pname:
                g = torch.zeros_like(p) if p.grad is None else p.grad
                dist.all_reduce(g)
                p.grad = g
    names = expert_names or {n: n for n in pb}
    check(f"{what}: parameter names", lambda: _assert(set(names.values()) <= set(pa), f"{list(pb)} vs {list(pa)}"))
    for bname, q in pb.items():
        p = pa.get(names.get(bname, bname))
        if p is None:
            continue
        if p.grad is None or q.grad is None:
            check(f"{what}: {bname} grad", lambda: _assert(p.grad is None and q.grad is None, "None on one side"))
            continue
        check(f"{what}: {bname} grad", lambda: torch.testing.assert_close(q.grad, p.grad, **GRAD_TOL))
        note("grad gate" if ".gate." in bname else "grad expert", p.grad, q.grad)
    return la, ca


def run_plain_config(cfg_name, kind, kw, sizes, mode):
    """Engine ep_size=2 on its own groups vs DeepSpeed ep_size=1 with every expert."""
    torch.manual_seed(0)
    ds = DSMoE(hidden_size=M, expert=EXPERTS[kind](), num_experts=E, ep_size=1, **kw)
    set_weights(ds, 0)
    me = MoE(hidden_size=M, expert=EXPERTS[kind](), num_experts=E, ep_size=EP, **kw)
    full = ds.state_dict()
    local, names = {}, {}
    prefix = "deepspeed_moe.experts.deepspeed_experts."
    for key in me.state_dict():
        if key.startswith(prefix):
            i, rest = key[len(prefix):].split(".", 1)
            names[key] = f"{prefix}{rank * NL + int(i)}.{rest}"
        else:
            names[key] = key
        local[key] = full[names[key]]
    me.load_state_dict(local)
    check(f"{cfg_name}: the engine's own group", lambda: _assert(
        me._group is not None and me._group.size == EP and me._group.rank == rank
        and f"ep_size_{EP}" not in groups._get_expert_parallel_group_dict(), "not a group of its own, of 2"))
    ds.train(mode == "train")
    me.train(mode == "train")
    gen = torch.Generator().manual_seed(2000 + rank)
    x = torch.randn(sizes[rank], M, generator=gen)
    dy = torch.randn(sizes[rank], M, generator=gen)
    la, ca = compare(cfg_name, ds, me, x, dy, seed=5 + 31 * rank, expert_names=names)
    say(f"[r{rank}] {cfg_name}: S={sizes[rank]} exp_counts={ca.tolist()} l_aux={la.item():.6f}")


def run_config(cfg_name, kind, kw, sizes, mode, steps):
    ds, me = build(kind, kw)
    name = ds.expert_group_name
    ep_group = groups._get_expert_parallel_group(name)
    check(f"{cfg_name}: the engine's group", lambda: _check_group(me, ep_group))
    ds.train(mode == "train")
    me.train(mode == "train")
    oa = torch.optim.SGD(ds.parameters(), lr=0.1, momentum=0.5) if steps else None
    ob = torch.optim.SGD(me.parameters(), lr=0.1, momentum=0.5) if steps else None
    for step in range(max(steps, 1)):
        gen = torch.Generator().manual_seed(1000 + 10 * rank + step)  # each rank its own tokens
        x = torch.randn(sizes[rank], M, generator=gen)
        dy = torch.randn(sizes[rank], M, generator=gen)
        what = f"{cfg_name} step {step}"
        la, ca = compare(what, ds, me, x, dy, seed=7 + 31 * rank + step)
        check(f"{what}: parameter names", lambda: _assert(
            [n for n, _ in ds.named_parameters()] == [n for n, _ in me.named_parameters()], "differ"))
        pb = dict(me.named_parameters())
        if steps:
            oa.step()
            ob.step()
            for pname, p in ds.named_parameters():
                q = pb[pname]
                check(f"{what}: {pname} after SGD", lambda: torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5))
                note("params after SGD", p, q)
    say(f"[r{rank}] {cfg_name}: S={sizes[rank]} exp_counts={ca.tolist()} l_aux={la.item():.6f}")


def _check_group(me, ep_group):
    g = me._group
    _assert(g is not None, "the engine layer has no group")
    _assert(g.group is ep_group, "the engine's process group is not DeepSpeed's ep group")
    _assert((g.rank, g.size) == (dist.get_rank(ep_group), EP), f"rank/size {g.rank}/{g.size}")


def _assert(ok, msg):
    if not ok:
        raise AssertionError(msg)


def main():
    global rank, world
    timeout = timedelta(seconds=WATCHDOG_S / 2)
    # Phase 1: plain torch.distributed; deepspeed is imported but deepspeed.comm is not
    # initialised, so moe_engine makes its own groups.
    dist.init_process_group("gloo", timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == EP, f"run with --nproc_per_node {EP}"
    only = os.environ.get("EP_CONFIGS")
    plain = [c for c in PLAIN_CONFIGS if not only or c[0] in only.split(",")]
    configs = [c for c in CONFIGS if not only or c[0] in only.split(",")]
    crashed = False
    for cfg in plain:
        try:
            run_plain_config(*cfg)
        except Exception:
            failures.append(f"[r{rank}] {cfg[0]}: raised\n{traceback.format_exc()}")
            crashed = True
            break
    # Phase 2: DeepSpeed takes over the same process group and makes its own groups.
    if not crashed:
        deepspeed.init_distributed(dist_backend="gloo", timeout=timeout)
    for cfg in configs if not crashed else []:
        try:
            run_config(*cfg)
        except Exception:
            # The other rank may now wait in a collective: the process-group timeout or
            # the watchdog ends it. Report what happened here.
            failures.append(f"[r{rank}] {cfg[0]}: raised\n{traceback.format_exc()}")
            crashed = True
            break
    for f in failures:
        say(f)
    if crashed:
        say(f"[r{rank}] EP FAILED (crashed)")
        os._exit(1)
    bad = torch.tensor([len(failures)], dtype=torch.int64)
    dist.all_reduce(bad)
    if rank == 0:
        for k in sorted(maxima):
            say(f"max |engine - deepspeed| {k:<18} {maxima[k]:.3e}")
    say(f"[r{rank}] EP {'OK' if int(bad) == 0 else 'FAILED'}: {len(plain) + len(configs)} configs, {len(failures)} failures here, {int(bad)} on all ranks")
    dist.barrier()
    dist.destroy_process_group()
    faulthandler.cancel_dump_traceback_later()
    sys.exit(0 if int(bad) == 0 else 1)


if __name__ == "__main__":
    main()

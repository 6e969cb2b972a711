"""Expert-parallel groups over torch.distributed.

The engine exchanges rows through a ``TorchGroup``: two collectives on one process group
(gloo between CPU processes and nodes). The groups are DeepSpeed's own when DeepSpeed made
them (``deepspeed.utils.groups``, named ``ep_size_<n>``) or can make them (deepspeed.comm
initialised), else the same layout made here: expert-parallel groups are contiguous
blocks of ``ep_size`` ranks.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

_GROUPS: dict = {}


class TorchGroup:
    """A process group as the engine's transport: ``rank``, ``size``, ``all_gather`` of
    small byte strings and a variable ``all_to_all`` of byte strings."""

    def __init__(self, group):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def all_gather(self, data: bytes) -> list:
        n = torch.tensor([len(data)], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        dist.all_gather(sizes, n, group=self.group)
        sizes = [int(s.item()) for s in sizes]
        width = max(max(sizes), 1)
        mine = torch.zeros(width, dtype=torch.uint8)
        if data:
            mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        parts = [torch.empty(width, dtype=torch.uint8) for _ in range(self.size)]
        dist.all_gather(parts, mine, group=self.group)
        return [p[:s].numpy().tobytes() for p, s in zip(parts, sizes)]

    def all_to_all(self, parts: list, recv_sizes: list) -> list:
        send_sizes = [len(p) for p in parts]
        joined = b"".join(parts)
        send = torch.frombuffer(bytearray(joined), dtype=torch.uint8) if joined else torch.empty(0, dtype=torch.uint8)
        recv = torch.empty(sum(recv_sizes), dtype=torch.uint8)
        dist.all_to_all_single(recv, send, output_split_sizes=list(recv_sizes), input_split_sizes=send_sizes, group=self.group)
        out, start = [], 0
        for n in recv_sizes:
            out.append(recv[start : start + n].numpy().tobytes())
            start += n
        return out


def _deepspeed_group(name: str, ep_size: int):
    """DeepSpeed's expert-parallel group ``name`` when DeepSpeed's groups are in use: made
    already, or deepspeed.comm initialised (``deepspeed.init_distributed``) so that
    DeepSpeed can make them. None otherwise: a program on plain torch.distributed (which
    may still have imported deepspeed) gets groups made here, since DeepSpeed's group
    constructors assert that deepspeed.comm is initialised."""
    if "deepspeed" not in sys.modules:
        return None  # nobody imported DeepSpeed: none of its groups exist
    try:
        import deepspeed.comm as ds_comm
        from deepspeed.utils import groups as ds_groups
    except ImportError:
        return None
    if name in ds_groups._get_expert_parallel_group_dict():
        return ds_groups._get_expert_parallel_group(name)
    if not ds_comm.is_initialized():
        return None
    ds_groups._create_expert_and_data_parallel(ep_size)
    return ds_groups._get_expert_parallel_group(name)


def expert_parallel_group(ep_size: int):
    """This rank's expert-parallel group of ``ep_size`` ranks: DeepSpeed's when its groups
    exist or deepspeed.comm is initialised, else one made with the same layout
    (collective: every rank must call it)."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            f"ep_size = {ep_size} needs torch.distributed initialised (torchrun, then "
            "dist.init_process_group or deepspeed.init_distributed)"
        )
    world = dist.get_world_size()
    if world % ep_size:
        raise ValueError(f"ep_size = {ep_size} does not divide the world size {world}")
    name = f"ep_size_{ep_size}"
    group = _deepspeed_group(name, ep_size)
    if group is not None:
        return TorchGroup(group)
    if name not in _GROUPS:
        rank = dist.get_rank()
        mine = None
        for start in range(0, world, ep_size):
            g = dist.new_group(list(range(start, start + ep_size)))
            if start <= rank < start + ep_size:
                mine = g
        _GROUPS[name] = mine
    return TorchGroup(_GROUPS[name])

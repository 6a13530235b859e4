"""Rank, world size and the collectives every rank must join (a no-op in one process).

Under torchrun each rank runs the same stage; rank 0 alone writes shared files. A decision
that ends or reshapes training (stop now, the planned number of steps) is agreed across ranks,
or ranks that decide differently deadlock in the next all-reduce.
"""

from __future__ import annotations

import os
from pathlib import Path

from llmctl.rundir import _tmp_name


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def collective_device(backend: str):
    """Where a collective's tensors must live for a process-group backend.

    NCCL only takes CUDA tensors (a CPU tensor fails), gloo only CPU ones; a combined
    backend like 'cpu:gloo,cuda:nccl' takes CPU tensors.
    """
    import torch

    b = str(backend).lower()
    if "cpu:gloo" in b:
        return torch.device("cpu")
    if "nccl" in b:
        return torch.device("cuda", torch.cuda.current_device())
    if "xccl" in b:
        return torch.device("xpu", torch.xpu.current_device())
    return torch.device("cpu")


def _all_reduce(value: float, op_name: str) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], device=collective_device(dist.get_backend()))
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op_name))
    return t.item()


def agree_any(flag: bool) -> bool:
    """True on every rank if it is true on any (a stop every rank takes at the same step)."""
    if world() == 1:
        return flag
    return bool(_all_reduce(1.0 if flag else 0.0, "MAX"))


def agree_min(n: int) -> int:
    """The smallest `n` of all ranks, on every rank (the most cautious plan wins)."""
    if world() == 1:
        return n
    return int(_all_reduce(float(n), "MIN"))


def barrier() -> None:
    if world() > 1:
        import torch.distributed as dist

        dist.barrier()


def shared_tmp(path: Path, is_main: bool) -> Path:
    """A temporary folder next to `path`, named by rank 0 and known to every rank."""
    name = [str(_tmp_name(path))] if is_main else [None]
    if world() > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(name, src=0)
    return Path(name[0])

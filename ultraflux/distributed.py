"""The processes a stage runs on (``accelerate launch``): rank, world size, sharding, gathering, global progress.

One process (plain ``python stages/x.py``) is world size 1 and every function here is a no-op around it. Several
processes join one torch.distributed group through accelerate's ``PartialState`` (NCCL on GPUs, gloo on CPU).
Work is split round-robin (item i goes to rank i mod world), results are gathered in item order, so what rank 0
writes does not depend on the number of processes.
"""
from __future__ import annotations

import math
import os
from typing import Iterator, Sequence, TypeVar

T = TypeVar("T")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _needs_cpu_group() -> bool:
    """Several CPU processes outside DeepSpeed: accelerate must be told ``cpu=True``, else a DDP launch on a machine
    without GPUs comes up as DistributedType.NO (every process alone, no gradient all-reduce)."""
    import torch

    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    return world_size() > 1 and not torch.cuda.is_available() and not deepspeed


def process_state():
    """accelerate's ``PartialState`` (one per process; initialises the process group once, gloo on CPU)."""
    from accelerate import PartialState

    return PartialState(cpu=True, backend="gloo") if _needs_cpu_group() else PartialState()


def init_cpu_group() -> None:
    """Join the gloo group as MULTI_CPU before an ``Accelerator`` is made (it then shares this state); no-op on GPUs,
    under DeepSpeed (its own launcher) and for one process."""
    if _needs_cpu_group():
        process_state()


def rank() -> int:
    return process_state().process_index if world_size() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        process_state().wait_for_everyone()


def shard(items: Sequence[T]) -> list[T]:
    """This process' share of ``items``: every world-th item from its rank."""
    return list(items[rank()::world_size()])


def gather(mine: list) -> list:
    """Every process' ``shard`` results in the original item order (on every rank)."""
    n = world_size()
    if n == 1:
        return list(mine)
    from accelerate.utils import gather_object

    per_rank = gather_object([mine])        # [rank 0's list, rank 1's list, ...]
    out = []
    for i in range(max(len(r) for r in per_rank)):
        out += [r[i] for r in per_rank if i < len(r)]
    return out


def progress(items: Sequence[T], desc: str, enabled: bool = True) -> Iterator[T]:
    """Iterate this process' share of ``items`` while rank 0's progress bar counts the items done by ALL processes.

    Every process runs the same number of rounds (a process whose share is used up waits in the round's count), so
    the caller must consume the iterator to the end on every rank."""
    from tqdm import tqdm

    n, mine = world_size(), shard(items)
    bar = tqdm(total=len(items), desc=desc, disable=not (enabled and is_main()))
    for r in range(math.ceil(len(items) / n)):
        if r < len(mine):
            yield mine[r]
        bar.n = int(_sum_over_processes(min(r + 1, len(mine))))
        bar.refresh()
    bar.close()


def _sum_over_processes(value: float) -> float:
    if world_size() == 1:
        return value
    import torch

    return float(_all_reduce(torch.tensor([float(value)], dtype=torch.float64, device=process_state().device))[0])


def _all_reduce(t):
    import torch.distributed as dist

    dist.all_reduce(t)
    return t


def average_gradients(parameters) -> None:
    """Mean of each parameter's gradient over the processes (data parallelism without a DDP wrapper)."""
    n = world_size()
    if n == 1:
        return
    for p in parameters:
        if p.grad is not None:
            _all_reduce(p.grad).div_(n)


def mean_over_processes(values: dict[str, float]) -> dict[str, float]:
    """The mean of each number over the processes (e.g. a step's loss terms: the global batch's mean)."""
    n = world_size()
    if n == 1:
        return values
    import torch

    names = sorted(values)
    t = _all_reduce(torch.tensor([float(values[k]) for k in names], dtype=torch.float64,
                                 device=process_state().device))
    return {k: float(v) / n for k, v in zip(names, t.tolist())}

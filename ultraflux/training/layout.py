"""How a global batch is laid out over processes: micro-batch per process x processes x accumulation steps.

The training sections of params.yaml state the GLOBAL batch of one optimizer step (the UltraFlux paper's supplement,
Sec. 2.2 and Table 3: 64 for the DiT, 384 for the VAE post-training) and ``batch_size``, the largest micro-batch one
process may hold (its memory). The layout follows from the number of processes the stage runs on: the largest
micro-batch ``b <= batch_size`` with ``global_batch = b x processes x accum``. A global batch that no layout reaches
exactly is refused before any work, naming the three numbers. Changing the process count therefore changes neither
the global batch nor (``training/sampler.py``, ``training/vae.py``) which samples a step trains on.
"""
from __future__ import annotations

import os


class BatchLayoutError(ValueError):
    """No micro-batch <= batch_size gives global_batch = micro-batch x processes x accumulation."""


def batch_layout(global_batch: int, per_process_batch: int, num_processes: int, key: str = "") -> tuple[int, int]:
    """(micro-batch per process, accumulation steps) for ``global_batch`` over ``num_processes``.

    ``per_process_batch`` is the largest micro-batch allowed; ``key`` (e.g. ``dit_stage1``) names the params section
    in the error."""
    where = f"{key}: " if key else ""
    if min(global_batch, per_process_batch, num_processes) < 1:
        raise BatchLayoutError(f"{where}global_batch ({global_batch}), batch_size ({per_process_batch}) and processes "
                               f"({num_processes}) must all be at least 1")
    per_process, rest = divmod(global_batch, num_processes)
    if rest:
        raise BatchLayoutError(
            f"{where}global_batch {global_batch} cannot be split over {num_processes} processes with batch_size "
            f"{per_process_batch}: global_batch must be a multiple of the process count (global_batch = batch_size x "
            f"processes x grad_accum); change global_batch or launch.processes")
    micro = max(b for b in range(1, min(per_process_batch, per_process) + 1) if per_process % b == 0)
    return micro, per_process // micro


def launched_processes() -> int:
    """How many processes this stage runs on (``WORLD_SIZE``, set by ``accelerate launch``; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def stage_layout(section: dict, key: str, num_processes: int | None = None) -> tuple[int, int]:
    """(micro-batch, accumulation) of a training section (``global_batch``, ``batch_size``) for this launch."""
    n = launched_processes() if num_processes is None else num_processes
    return batch_layout(int(section["global_batch"]), int(section["batch_size"]), n, key)

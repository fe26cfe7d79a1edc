"""What both training loops (VAE post-training, DiT) check around their steps: disk space before the work, a finite
loss and gradient norm at every step, and evaluations that leave the random state as they found it.

* :func:`check_disk_space`: before training, the free space under the checkpoint and output directories is compared
  with what ``keep_checkpoints`` checkpoints (+ the one being written) and the final weights need, estimated from the
  parameter count (fp32 weights + AdamW's two fp32 moments); an error names the path, the bytes needed and free.
* :func:`check_finite`: a non-finite loss or gradient norm stops the run (:class:`TrainingDiverged`: stage, step, loss,
  gradient norm, lr); the loop raises before its checkpoint, so the last good checkpoint stays the newest and no
  metrics are written (``ultraflux.stage.run_stage`` exits 1 and the MLflow run ends FAILED with the reason).
* :func:`rng_neutral`: validation and evaluation run inside it, so how often they run (``val_every``, the final step)
  cannot change the trajectory.
* :func:`decided_by_main`: a check made by the main process alone whose failure stops every process.
"""
from __future__ import annotations

import math
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from ultraflux.io import StageFailure

WEIGHT_BYTES = 4        # fp32 weights (checkpoint model state, final save_pretrained)
ADAM_BYTES = 8          # AdamW: exp_avg + exp_avg_sq in fp32 per trainable parameter
MASTER_BYTES = 4        # mixed precision (DeepSpeed bf16): an fp32 master copy per trainable parameter


class TrainingDiverged(StageFailure):
    """A non-finite loss or gradient norm: the run stopped; nothing of that step was saved."""


class NotEnoughDisk(StageFailure):
    """The checkpoints and final weights would not fit: said before any training."""


def check_finite(stage: str, step: int, loss: float, grad_norm: float | None, lr: float,
                 last_checkpoint: Path | None) -> None:
    """Raise :class:`TrainingDiverged` when ``loss`` or ``grad_norm`` is NaN or infinite."""
    if math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm)):
        return
    kept = f"the last good checkpoint {last_checkpoint} is kept" if last_checkpoint else "no checkpoint was written yet"
    raise TrainingDiverged(f"{stage}: training diverged at step {step}: loss {loss}, gradient norm {grad_norm}, "
                           f"lr {lr:g}; stopped without saving this step ({kept}). Lower {stage}.lr or set "
                           f"{stage}.max_grad_norm, then re-run")


def grad_norm_of(parameters) -> float:
    """The global L2 norm of the gradients (for loops that do not clip)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def checkpoint_bytes(num_params: int, num_trainable: int, mixed_precision: bool = False) -> int:
    """Estimated size of one checkpoint: weights + AdamW state (+ fp32 master weights under mixed precision)."""
    per_trainable = ADAM_BYTES + (MASTER_BYTES if mixed_precision else 0)
    return num_params * WEIGHT_BYTES + num_trainable * per_trainable


def check_disk_space(stage: str, needs: dict[Path, tuple[int, str]], keep_key: str) -> None:
    """``needs``: {directory: (bytes, what)}. Directories on one filesystem add up; raise when one lacks space."""
    by_fs: dict[int, list[tuple[Path, int, str]]] = {}
    for path, (nbytes, what) in needs.items():
        path = Path(path)
        probe = next(p for p in (path, *path.parents) if p.exists())
        by_fs.setdefault(probe.stat().st_dev, []).append((path, nbytes, what))
    for entries in by_fs.values():
        need = sum(n for _, n, _ in entries)
        free = shutil.disk_usage(next(p for p in (entries[0][0], *entries[0][0].parents) if p.exists())).free
        if need > free:
            detail = "; ".join(f"{p}: {n:,} bytes for {what}" for p, n, what in entries)
            raise NotEnoughDisk(f"{stage}: not enough disk space to train: {detail}; {need:,} bytes needed, {free:,} "
                                f"free there. Free space, lower {keep_key}, or point the paths elsewhere")


def disk_needs(keep_key: str, ckpt_dir: Path | None, out_dir: Path, per_checkpoint: int, final_bytes: int, keep: int,
               existing: int) -> dict[Path, tuple[int, str]]:
    """What :func:`check_disk_space` compares: ``keep`` + 1 (the one being written) checkpoints minus those already
    on disk, and the final weights."""
    needs = {Path(out_dir): (final_bytes, "the final weights")}
    if ckpt_dir is not None:
        count = max(0, keep + 1 - existing)
        needs[Path(ckpt_dir)] = (count * per_checkpoint,
                                 f"{count} checkpoint(s) of ~{per_checkpoint:,} bytes ({keep_key} + 1)")
    return needs


def decided_by_main(accelerator, check: Callable[[], None]) -> None:
    """Run ``check`` on the main process only; a :class:`StageFailure` it raises is raised on every process (a
    broadcast), so all stop together instead of the others waiting at the next collective."""
    error = None
    if accelerator is None or accelerator.is_main_process:
        try:
            check()
        except StageFailure as e:
            error = (type(e), str(e))
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        error = broadcast_object_list([error])[0]
    if error:
        raise error[0](error[1])


@contextmanager
def rng_neutral() -> Iterator[None]:
    """Run a block (validation, evaluation) without moving torch's global random state, CPU and CUDA."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield

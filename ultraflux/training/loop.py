"""The training loop both trainers (VAE post-training, DiT) run, and what it checks around their steps: disk space
before the work, a finite loss and gradient norm at every step, and evaluations that leave the random state as they
found it.

* :class:`TrainLoop`: the skeleton (resume, then step / check / record / validate / checkpoint until ``steps``, with a
  progress bar and MLflow metrics; :class:`TrainState` is what it checkpoints of its own); the model-specific parts,
  one optimizer step and one validation, come in as callables (``training/vae.py``, ``training/dit.py``).

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

import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ultraflux.io import StageFailure, atomic_path

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


def check_training_disk(stage: str, keep_key: str, keep: int, ckpt, out_dir: Path, per_checkpoint: int,
                        final_bytes: int) -> None:
    """Room for ``keep`` (``keep_key``) + 1 checkpoints in ``ckpt`` (a ``Checkpointer`` or None) and the final
    weights in ``out_dir``, before any training."""
    check_disk_space(stage, disk_needs(keep_key, ckpt.dir if ckpt else None, out_dir, per_checkpoint, final_bytes,
                                       keep, len(ckpt.checkpoints()) if ckpt else 0), keep_key)


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


def write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> None:
    """A history (one dict per row) as a CSV file, written atomically."""
    with atomic_path(path) as tmp:
        pd.DataFrame(rows, columns=columns).to_csv(tmp, index=False)


class TrainState:
    """A loop's own state, registered with ``accelerator.register_for_checkpointing``: step, histories, extras."""

    def __init__(self):
        self.step, self.history, self.val_history, self.extra = 0, [], [], {}

    def state_dict(self) -> dict:
        return {"step": self.step, "history": self.history, "val_history": self.val_history, "extra": self.extra}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.history = int(state["step"]), list(state["history"])
        self.val_history, self.extra = list(state.get("val_history", [])), dict(state.get("extra", {}))


class TrainLoop:
    """The skeleton of both training loops (VAE post-training, DiT): resume, then until ``steps``

        record = train_step(step, batches)   the model's optimizer step; its record has loss, grad_norm, lr
        check_finite                         a diverged step stops the run before anything of it is saved
        history + MLflow                     the record joins ``state.history`` (the loss CSV) and is logged
        validate(step)                       every ``val_every`` steps, at the last and (fresh run) at step 0
        after_step(step)                     optional (tests slow a run down with it)
        checkpoint                           every ``checkpoint_every`` steps and at the last (``ckpt`` not None)

    ``label`` (the stage) names the run in messages and on the progress bar. The loop's :class:`TrainState` is the
    first object registered for checkpointing, so a checkpoint restores it with the models and RNG states."""

    def __init__(self, label: str, accelerator, ckpt, steps: int, val_every: int, checkpoint_every: int,
                 logger=None, progress: bool = True):
        self.label, self.accelerator, self.ckpt, self.logger = label, accelerator, ckpt, logger
        self.steps, self.val_every, self.checkpoint_every = int(steps), int(val_every), int(checkpoint_every)
        self.show_progress = progress and accelerator.is_main_process
        self.state = TrainState()
        accelerator.register_for_checkpointing(self.state)

    def resume(self) -> int:
        """Load the newest checkpoint at or below ``steps`` (collective; none without ``ckpt``); the step reached."""
        if self.ckpt is not None:
            self.ckpt.resume(self.accelerator, self.state, self.steps)
        return self.state.step

    def stream(self, dataset, sampler, accum: int, workers: int, prefetch_factor: int) -> Iterator:
        """The batches of ``sampler`` (moved to the resumed step) read by ``workers`` DataLoader workers."""
        sampler.seek(self.state.step * accum)
        return iter(DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                               prefetch_factor=prefetch_factor if workers else None,
                               pin_memory=torch.cuda.is_available()))

    def log(self, metrics: dict, step: int) -> None:
        """Metrics of ``step`` to MLflow (the main process; the ``step`` key itself is the MLflow step)."""
        if self.logger is not None and self.accelerator.is_main_process and metrics:
            self.logger.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step=step)

    def due(self, every: int, step: int) -> bool:
        return step % every == 0 or step == self.steps

    def run(self, batches: Iterator, train_step: Callable[[int, Iterator], dict], validate: Callable[[int], None],
            after_step: Callable[[int], None] | None = None) -> None:
        """The loop (class doc). ``batches`` is dropped on return, which stops its DataLoader workers."""
        state = self.state
        if state.step == 0:
            validate(0)
        bar = tqdm(total=self.steps, initial=state.step, desc=self.label, disable=not self.show_progress)
        while state.step < self.steps:
            step = state.step + 1
            record = train_step(step, batches)
            check_finite(self.label, step, record["loss"], record["grad_norm"], record["lr"],
                         self.ckpt.latest() if self.ckpt is not None else None)
            state.step = step
            state.history.append(record)
            self.log(record, step)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if self.due(self.val_every, step):
                validate(step)
            if after_step is not None:
                after_step(step)
            if self.ckpt is not None and self.due(self.checkpoint_every, step):
                self.ckpt.save(self.accelerator, step)
        bar.close()

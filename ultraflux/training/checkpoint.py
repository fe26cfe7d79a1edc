"""Resumable checkpoints that follow the training trajectory, for both training loops (VAE post-training and DiT).

Every ``checkpoint_every`` steps the full training state is written by ``accelerator.save_state`` (models,
optimizers, LR schedules, the RNG states of every process, and the objects registered with
``accelerator.register_for_checkpointing``: the loop's :class:`TrainState`, i.e. step, loss and validation history,
from which the samplers' positions follow) to ``<dir>/step-<n>.tmp`` and renamed to ``<dir>/step-<n>`` (atomic on one
filesystem). A process killed at any moment (SIGKILL included) leaves either complete ``step-*`` directories or a
``*.tmp`` one, which the next run deletes; a full disk raises one ``DiskFullError`` naming the path, with the ``.tmp``
removed. The directory is not a DVC output (DVC only deletes declared outputs before a run), so a plain re-run of
``dvc repro`` resumes instead of starting over.

Which run a directory belongs to: ``<dir>/fingerprint.json`` holds the :class:`Fingerprint` of the run that wrote it,
its inputs as dotted keys. The trajectory part is what changes the weights step by step (model, data, objective and
loss, optimizer and its schedule, seed, initial weights, precision); the world part is the process layout. Keys that
only say how far to go or how often to look (``steps``, ``val_every``, ``checkpoint_every``, ``keep_checkpoints``,
loader workers: :data:`NOT_TRAJECTORY`) are left out, so raising ``steps`` resumes from the newest checkpoint and ends
with the weights of a run configured with the larger ``steps`` from the start (the LR schedules are constant; a
schedule shaped by ``steps`` would put ``steps`` in the trajectory). On open (:meth:`Checkpointer.reconcile`):

* same trajectory and world: resume from the newest checkpoint at or below ``steps`` (none there: an error);
* another trajectory: the directory is moved aside to ``<dir>.superseded-<UTC>-<short fp>``, never deleted, with one
  log line naming the changed keys;
* same trajectory, another world size: the run stops before any work, naming both sizes and how to proceed (the
  DeepSpeed ZeRO shards and the global batch depend on the number of processes).

Multi-process (DDP / DeepSpeed ZeRO-2): ``save_state``/``load_state`` are collective, every rank calls ``save`` and
``load``; only the main process touches the directory layout (moves, cleanup, rename, pruning) and its decision is
broadcast, so every rank stops together.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ultraflux.io import StageFailure, atomic_write_text, naming_disk_full, sha256_json
from ultraflux.tracking import flatten
from ultraflux.training.loop import TrainState, decided_by_main

FINGERPRINT = "fingerprint.json"
# Keys (leaf names) that never change the weights at a given step: how far to train, how often to validate /
# checkpoint / evaluate, how many checkpoints to keep, how data is loaded, whether activations are recomputed (same
# arithmetic). Everything else in the sections a loop passes is part of its trajectory.
NOT_TRAJECTORY = frozenset({"steps", "val_every", "eval_every", "eval_images", "checkpoint_every", "keep_checkpoints",
                            "num_workers", "prefetch_factor", "gradient_checkpointing",
                            "max_scale"})   # rope.max_scale: where a warning starts, never a clamp


class CheckpointMismatch(StageFailure):
    """The checkpoints cannot be resumed by this run as configured (world size, steps): the message says why."""


@dataclass
class Fingerprint:
    """What a run's checkpoints depend on, as flat dotted keys (``fingerprint.json`` stores both parts)."""

    trajectory: dict
    world: dict = field(default_factory=dict)

    @classmethod
    def of(cls, sections: dict, world: dict | None = None) -> "Fingerprint":
        """Trajectory from ``{name: value or section}`` (dotted keys, :data:`NOT_TRAJECTORY` leaves dropped)."""
        flat = flatten(sections)
        return cls({k: v for k, v in flat.items() if k.rsplit(".", 1)[-1] not in NOT_TRAJECTORY}, dict(world or {}))

    @property
    def sha256(self) -> str:
        return sha256_json({"trajectory": self.trajectory, "world": self.world})

    def to_json(self) -> str:
        return json.dumps({"sha256": self.sha256, "trajectory": self.trajectory, "world": self.world}, indent=2,
                          sort_keys=True, default=str) + "\n"


def changed_keys(old: dict, new: dict) -> list[str]:
    """``key old -> new`` for every key whose value differs (a missing key reads ``unset``)."""
    def show(d, k):
        return json.dumps(d[k], default=str) if k in d else "unset"
    return [f"{k} {show(old, k)} -> {show(new, k)}" for k in sorted(set(old) | set(new))
            if json.dumps(old.get(k), default=str) != json.dumps(new.get(k), default=str)]


def _utc_stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


class Checkpointer:
    """The checkpoint directory of one training stage (``label`` names it in messages)."""

    def __init__(self, directory: str | Path, label: str, keep: int, accelerator=None):
        self.dir, self.label, self.keep = Path(directory), label, max(1, int(keep))
        self.accelerator = accelerator
        self.is_main = accelerator is None or accelerator.is_main_process

    # ------------------------------------------------------------------------------------------------ layout
    def checkpoints(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted((p for p in self.dir.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")),
                      key=lambda p: int(p.name.split("-")[1]))

    def latest(self, at_most: int | None = None) -> Path | None:
        """The newest checkpoint (at or below step ``at_most``), or None."""
        found = [p for p in self.checkpoints() if at_most is None or self.step_of(p) <= at_most]
        return found[-1] if found else None

    @staticmethod
    def step_of(path: Path) -> int:
        return int(path.name.split("-")[1])

    def stored(self) -> dict | None:
        path = self.dir / FINGERPRINT
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except (OSError, ValueError):
            return None

    # ------------------------------------------------------------------------------------------------ open
    def reconcile(self, fp: Fingerprint, steps: int, pending: tuple[str, ...] = ()) -> None:
        """Make the directory this run's (module doc): resume, move aside, or stop. Collective.

        ``pending``: trajectory keys not known yet (e.g. data keys computed by the latent cache); a first call with
        them settles everything else before that work, a second call with the full fingerprint completes it."""
        decided_by_main(self.accelerator, lambda: self._reconcile(fp, steps, pending))

    def _reconcile(self, fp: Fingerprint, steps: int, pending: tuple[str, ...]) -> None:
        stored = self.stored()
        occupied = self.dir.is_dir() and any(p.name != FINGERPRINT for p in self.dir.iterdir())
        if stored is not None or occupied:
            old = (stored or {}).get("trajectory")
            known = {k: v for k, v in (old or {}).items() if k not in pending}
            ours = {k: v for k, v in fp.trajectory.items() if k not in pending}
            if old is None or known != ours:
                self._move_aside(stored, changed_keys(known, ours) if old is not None else None)
            elif stored.get("world") != fp.world:
                raise CheckpointMismatch(self._world_message(stored["world"], fp.world))
            elif not pending:
                self._check_steps(steps)
        for stale in self.dir.glob("*.tmp") if self.dir.is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)      # a save killed half-way: ours, never published
        if not pending:
            self.dir.mkdir(parents=True, exist_ok=True)
            with naming_disk_full(self.dir / FINGERPRINT, f"{self.label} checkpoint fingerprint"):
                atomic_write_text(self.dir / FINGERPRINT, fp.to_json())

    def _move_aside(self, stored: dict | None, changes: list[str] | None) -> None:
        short = (stored or {}).get("sha256", "unknown")[:8]
        target = self.dir.with_name(f"{self.dir.name}.superseded-{_utc_stamp()}-{short}")
        os.replace(self.dir, target)
        why = (f"changed: {'; '.join(changes)}" if changes else
               "its settings are unknown: no fingerprint.json (written by an older ultraflux or not by a training run)")
        print(f"{self.label}: checkpoints in {self.dir} belong to another training trajectory ({why}); moved aside "
              f"to {target} (nothing deleted; remove it when no longer needed)", flush=True)

    def _world_message(self, old: dict, new: dict) -> str:
        step = self.latest()
        at = f" (newest: {step.name})" if step else ""
        return (f"{self.label}: the checkpoints in {self.dir}{at} were written by {old.get('num_processes')} "
                f"process(es) ({old.get('distributed')}), this run has {new.get('num_processes')} "
                f"({new.get('distributed')}): the global batch and the ZeRO shards depend on it. Relaunch with "
                f"`accelerate launch --num_processes {old.get('num_processes')} ...` to resume, or move {self.dir} "
                f"aside to start over with {new.get('num_processes')}")

    def _check_steps(self, steps: int) -> None:
        found = self.checkpoints()
        if found and self.latest(steps) is None:
            raise CheckpointMismatch(
                f"{self.label}: {self.dir} holds checkpoints of this run at steps "
                f"{', '.join(str(self.step_of(p)) for p in found)}, all beyond steps={steps}; set steps >= "
                f"{self.step_of(found[0])} to continue from one of them, or move {self.dir} aside to train from step 0")

    # ------------------------------------------------------------------------------------------------ save / load
    def resume(self, accelerator, state: TrainState, steps: int) -> Path | None:
        """Load the newest checkpoint at or below ``steps`` (collective); says so. Returns it, or None."""
        path = self.latest(steps)
        if path is not None:
            accelerator.load_state(str(path))          # collective; restores the registered TrainState too
            accelerator.print(f"{self.label}: resumed from {path} at step {state.step}")
        return path

    def save(self, accelerator, step: int) -> Path:
        final, tmp = self.dir / f"step-{step:08d}", self.dir / f"step-{step:08d}.tmp"
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        remove_tmp = (lambda: shutil.rmtree(tmp, ignore_errors=True)) if accelerator.is_main_process else None
        with naming_disk_full(tmp, f"{self.label} checkpoint", cleanup=remove_tmp):   # nothing half-written stays
            accelerator.save_state(str(tmp))   # collective: every rank writes its part (ZeRO shards)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                self._publish(tmp, final)
        accelerator.wait_for_everyone()
        return final

    def _publish(self, tmp: Path, final: Path) -> None:
        """tmp -> final (atomic rename), then prune. Main process only.

        Pruning keeps the newest ``keep`` checkpoints at or below this step; checkpoints beyond it (a longer run of
        the same trajectory, when ``steps`` was lowered) stay."""
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        step = self.step_of(final)
        for old in [p for p in self.checkpoints() if self.step_of(p) <= step][:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(path: Path) -> None:
    """Flush the files of a checkpoint before it is published (the rename is atomic; this makes it durable)."""
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())

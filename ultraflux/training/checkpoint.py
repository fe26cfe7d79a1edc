"""Resumable checkpoints for long runs.

Every ``checkpoint_every`` steps the full training state is written by ``accelerator.save_state`` (models,
optimizers, LR schedules, the RNG states of every process, and the objects registered with
``accelerator.register_for_checkpointing``: the loop's :class:`TrainState`, i.e. step, loss and validation history,
from which the samplers' positions follow) to ``<dir>/step-<n>.tmp`` and renamed to ``<dir>/step-<n>`` (atomic on one
filesystem); only the last ``keep`` survive.
A process killed at any moment (SIGKILL included) leaves either complete ``step-*`` directories or a ``*.tmp`` one,
which the next run deletes. ``<dir>/fingerprint`` records what the run depends on (the stage's params and input
hashes): a checkpoint directory with another fingerprint belongs to another run and is discarded, never resumed. The
directory is not a DVC output (DVC only deletes declared outputs before a run), so a plain re-run of ``dvc repro``
after a crash resumes instead of starting over.

Multi-process (DDP / DeepSpeed ZeRO-2): ``save_state``/``load_state`` are collective, every rank calls ``save`` and
``load``; only the main process touches the directory layout (cleanup, rename, pruning), between barriers. Both
training loops (VAE post-training and DiT) use this one mechanism.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path


class _Layout:
    def __init__(self, directory: str | Path, fingerprint: str, keep: int, is_main: bool = True):
        self.dir, self.keep, self.is_main = Path(directory), max(1, int(keep)), is_main
        if is_main:
            fp = self.dir / "fingerprint"
            if self.dir.exists() and (not fp.exists() or fp.read_text() != fingerprint):
                shutil.rmtree(self.dir)
            self.dir.mkdir(parents=True, exist_ok=True)
            if not fp.exists():
                fp.write_text(fingerprint)
            for stale in self.dir.glob("*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)

    def checkpoints(self) -> list[Path]:
        if not self.dir.exists():
            return []
        return sorted((p for p in self.dir.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")),
                      key=lambda p: int(p.name.split("-")[1]))

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def _paths(self, step: int) -> tuple[Path, Path]:
        return self.dir / f"step-{step:08d}", self.dir / f"step-{step:08d}.tmp"

    def _publish(self, tmp: Path, final: Path) -> None:
        """tmp -> final (atomic rename), then keep only the newest ``keep`` checkpoints. Main process only."""
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in self.checkpoints()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(path: Path) -> None:
    """Flush the files of a checkpoint before it is published (the rename is atomic; this makes it durable)."""
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


class TrainState:
    """A loop's own state, registered with ``accelerator.register_for_checkpointing``: step, histories, extras."""

    def __init__(self):
        self.step, self.history, self.val_history, self.extra = 0, [], [], {}

    def state_dict(self) -> dict:
        return {"step": self.step, "history": self.history, "val_history": self.val_history, "extra": self.extra}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.history = int(state["step"]), list(state["history"])
        self.val_history, self.extra = list(state.get("val_history", [])), dict(state.get("extra", {}))


class Checkpointer(_Layout):
    """Checkpoints of an accelerate-prepared run (plain, DDP or DeepSpeed)."""

    def __init__(self, directory: str | Path, fingerprint: str, keep: int, accelerator=None):
        is_main = accelerator is None or accelerator.is_main_process
        super().__init__(directory, fingerprint, keep, is_main)
        if accelerator is not None:
            accelerator.wait_for_everyone()   # the layout is settled before any rank looks for checkpoints

    def save(self, accelerator, step: int) -> Path:
        final, tmp = self._paths(step)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))           # collective: every rank writes its part (ZeRO shards)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            self._publish(tmp, final)
        accelerator.wait_for_everyone()
        return final

    def load(self, accelerator, path: Path) -> None:
        accelerator.load_state(str(path))          # collective; restores the registered TrainState too

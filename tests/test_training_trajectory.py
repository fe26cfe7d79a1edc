"""Checkpoints that follow the trajectory, divergence, and full disks (training/checkpoint.py, training/loop.py).

Units on a tiny accelerate-prepared model (fingerprint split, move-aside, world size, lowered steps, ENOSPC injected
as OSError), real training runs of tests/dit_worker.py (a NaN injected at a step through ``run_stage``: exit 1, no
metrics, MLflow run FAILED with the reason; a disk filled by another writer at the last step), and real full
filesystems: small tmpfs mounts (skipped where mounting is not permitted, e.g. unprivileged CI).
"""
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from training_fixtures import make_curated, save_vae, tiny_params
from ultraflux.io import DiskFullError
from ultraflux.training.checkpoint import CheckpointMismatch, Checkpointer, Fingerprint, TrainState, changed_keys
from ultraflux.training.loop import NotEnoughDisk, TrainingDiverged, check_finite

WORKER = ROOT / "tests" / "dit_worker.py"
ENV = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture
def tmpfs(tmp_path):
    """``mount(size)`` -> a fresh tmpfs of ``size`` bytes (unmounted afterwards); skips where mount is refused."""
    mounted = []

    def mount(size: int) -> Path:
        d = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()[:80]})")
        mounted.append(d)
        return d
    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], check=False)


def prepared(size: int = 64):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(size, size)
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    model(torch.ones(1, size)).sum().backward()
    optimizer.step()                                              # AdamW state exists: checkpoints have their size
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    return accelerator, state


def fingerprint(lr=1e-4, world=1, **stage) -> Fingerprint:
    cfg = {"lr": lr, "steps": 60, "val_every": 20, "checkpoint_every": 20, "keep_checkpoints": 2, "batch_size": 1,
           **stage}
    return Fingerprint.of({"dit_stage1": cfg, "seed": 0}, world={"num_processes": world, "distributed": "NO"})


def saved(ck: Checkpointer, accelerator, state, *steps):
    for s in steps:
        state.step = s
        ck.save(accelerator, s)


# ------------------------------------------------------------------------------------------------ fingerprint
def test_only_trajectory_keys_enter_the_fingerprint():
    base = fingerprint()
    for key, value in (("steps", 90), ("val_every", 7), ("checkpoint_every", 5), ("keep_checkpoints", 9)):
        assert fingerprint(**{key: value}).sha256 == base.sha256, key
    assert fingerprint(lr=2e-4).sha256 != base.sha256 and fingerprint(batch_size=2).sha256 != base.sha256
    assert fingerprint(world=2).sha256 != base.sha256
    assert changed_keys(base.trajectory, fingerprint(lr=2e-4).trajectory) == ["dit_stage1.lr 0.0001 -> 0.0002"]


def test_changed_trajectory_moves_the_directory_aside_and_says_which_keys(tmp_path, capsys):
    accelerator, state = prepared()
    ck = Checkpointer(tmp_path / "dit_stage1", "dit_stage1", keep=2, accelerator=accelerator)
    ck.reconcile(fingerprint(), 60)
    saved(ck, accelerator, state, 20, 40)
    ck.reconcile(fingerprint(steps=90, val_every=5), 90)          # progress keys only: resumable, untouched
    assert [p.name for p in ck.checkpoints()] == ["step-00000020", "step-00000040"]
    assert "moved aside" not in capsys.readouterr().out

    ck.reconcile(fingerprint(lr=3e-4), 60)
    line = capsys.readouterr().out.strip()
    [aside] = tmp_path.glob("dit_stage1.superseded-*")
    assert aside.name.endswith("-" + fingerprint().sha256[:8])
    assert [p.name for p in aside.glob("step-*")] and len(line.splitlines()) == 1
    assert "dit_stage1.lr 0.0001 -> 0.0003" in line and str(aside) in line
    assert ck.checkpoints() == [] and json.loads((ck.dir / "fingerprint.json").read_text())["sha256"] == \
        fingerprint(lr=3e-4).sha256

    (tmp_path / "old").mkdir()                                     # written before fingerprint.json existed
    (tmp_path / "old" / "fingerprint").write_text("abc")
    (tmp_path / "old" / "step-00000005").mkdir()
    Checkpointer(tmp_path / "old", "vae", keep=1).reconcile(fingerprint(), 10)
    assert "settings are unknown" in capsys.readouterr().out
    assert [p.name for p in tmp_path.glob("old.superseded-*/step-*")] == ["step-00000005"]


def test_world_size_change_stops_before_work_and_lowered_steps_pick_an_earlier_checkpoint(tmp_path):
    accelerator, state = prepared()
    ck = Checkpointer(tmp_path / "ck", "dit_stage1", keep=3, accelerator=accelerator)
    ck.reconcile(fingerprint(world=2), 60)
    saved(ck, accelerator, state, 20, 40, 60)
    with pytest.raises(CheckpointMismatch, match=r"written by 2 process.*this run has 1.*--num_processes 2"):
        ck.reconcile(fingerprint(world=1), 60)
    assert len(ck.checkpoints()) == 3                               # nothing moved, nothing deleted

    ck.reconcile(fingerprint(world=2), 50)
    state.step = 0
    assert ck.resume(accelerator, state, 50).name == "step-00000040" and state.step == 40
    saved(ck, accelerator, state, 50)                               # pruning spares the longer run's step 60
    assert [p.name for p in ck.checkpoints()] == ["step-00000020", "step-00000040", "step-00000050", "step-00000060"]
    with pytest.raises(CheckpointMismatch, match=r"steps 20, 40, 50, 60, all beyond steps=10"):
        ck.reconcile(fingerprint(world=2), 10)


# ------------------------------------------------------------------------------------------------ divergence
def test_check_finite_names_stage_step_loss_and_lr():
    check_finite("vae", 3, 0.5, 1.0, 1e-4, None)
    with pytest.raises(TrainingDiverged, match=r"vae: training diverged at step 7: loss nan, gradient norm 2.0, "
                                               r"lr 0.001.*no checkpoint was written yet"):
        check_finite("vae", 7, float("nan"), 2.0, 1e-3, None)
    with pytest.raises(TrainingDiverged, match=r"gradient norm inf.*last good checkpoint ck/step-4 is kept"):
        check_finite("dit_stage2", 5, 0.1, float("inf"), 1e-4, Path("ck/step-4"))


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    from ultraflux.config import load_params

    base = load_params(ROOT / "params.yaml")
    base["validation"].update(images=2, prompts=[])
    d = tmp_path_factory.mktemp("traj")
    make_curated(d / "curated")
    save_vae(base, d / "vae")
    return base, d


def run_worker(d: Path, name: str, params: dict, env=None, **kw) -> subprocess.CompletedProcess:
    job = d / f"{name}.json"
    job.write_text(json.dumps({"params": params, "stage": "dit_stage1", "curated": str(d / "curated"),
                               "vae": str(d / "vae"), "out": str(kw.pop("out", d / name / "out")),
                               "ckpt": str(d / name / "ckpt"), "cache": str(d / "cache"), **kw}))
    return subprocess.run([sys.executable, str(WORKER), str(job)], env={**ENV, **(env or {})}, capture_output=True,
                          text=True, timeout=600)


def test_nan_loss_stops_the_stage_keeps_the_last_good_checkpoint_and_writes_no_metrics(tiny_set, tmp_path):
    from mlflow.tracking import MlflowClient

    base, d = tiny_set
    params = tiny_params(base, steps=6, checkpoint_every=2, val_every=2)
    stage_dir = tmp_path / "stage"
    stage_dir.mkdir()
    env_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    r = run_worker(d, "nan", params, env={"MLFLOW_TRACKING_URI": env_uri}, nan_loss_at=3, stage_cwd=str(stage_dir))
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-3000:]
    [line] = [x for x in r.stderr.splitlines() if x.startswith("[dit_stage1]")]
    assert "training diverged at step 3: loss nan" in line and "lr 0.0001" in line
    assert "step-00000002 is kept" in line and "Traceback" not in r.stderr
    assert [p.name for p in (d / "nan" / "ckpt").glob("step-*")] == ["step-00000002"]
    assert not (stage_dir / "metrics").exists() and not (stage_dir / "outputs").exists()
    assert not (d / "nan" / "out" / "transformer").exists()
    client = MlflowClient(env_uri)
    [run] = client.search_runs([client.get_experiment_by_name("ultraflux").experiment_id],
                               filter_string="tags.`ultraflux.stage` = 'dit_stage1'")
    assert run.info.status == "FAILED" and "diverged at step 3" in run.data.tags["ultraflux.error"]


# ------------------------------------------------------------------------------------------------ full disks
def test_enospc_at_a_checkpoint_is_named_and_leaves_no_tmp(tmp_path, monkeypatch):
    accelerator, state = prepared()
    ck = Checkpointer(tmp_path / "ck", "dit_stage1", keep=2, accelerator=accelerator)
    ck.reconcile(fingerprint(), 60)
    saved(ck, accelerator, state, 1)

    def full(path, *a, **k):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(accelerator, "save_state", full)
    with pytest.raises(DiskFullError, match=r"ENOSPC .*dit_stage1 checkpoint at .*step-00000002.tmp"):
        saved(ck, accelerator, state, 2)
    assert sorted(p.name for p in ck.dir.iterdir()) == ["fingerprint.json", "step-00000001"]


def test_real_full_disk_at_a_checkpoint(tmp_path, tmpfs):
    accelerator, state = prepared(256)                               # ~0.8 MB per checkpoint
    ck = Checkpointer(tmpfs(1_200_000), "dit_stage1", keep=1, accelerator=accelerator)
    ck.reconcile(fingerprint(), 60)
    saved(ck, accelerator, state, 1)
    with pytest.raises(DiskFullError, match=r"ENOSPC \(no space left on device\) writing dit_stage1 checkpoint at "
                                            r".*step-00000002.tmp \([\d,]+ bytes free\)") as failure:
        saved(ck, accelerator, state, 2)
    assert [p.name for p in ck.checkpoints()] == ["step-00000001"] and not list(ck.dir.glob("*.tmp"))
    # the free space it reports is the space after the half-written checkpoint was removed (not 0 bytes)
    free = int(re.search(r"\(([\d,]+) bytes free\)", str(failure.value)).group(1).replace(",", ""))
    assert free == shutil.disk_usage(ck.dir).free > 0


def test_real_full_disk_at_the_final_save_and_before_training(tiny_set, tmpfs):
    base, d = tiny_set
    out = tmpfs(3_000_000)                                           # room for the weights, until another writer
    r = run_worker(d, "final", tiny_params(base, steps=2, checkpoint_every=2), out=out, fill=str(out / "filler"))
    assert r.returncode != 0
    assert f"ENOSPC (no space left on device) writing dit_stage1 final weights at {out}/transformer" in r.stderr
    assert not (out / "transformer").exists() and [p.name for p in out.iterdir()] == ["filler"]
    assert [p.name for p in (d / "final" / "ckpt").glob("step-*")] == ["step-00000002"]   # the work is kept

    small = tmpfs(200_000)                                           # cannot hold the final weights at all
    r = run_worker(d, "early", tiny_params(base, steps=2), out=small)
    assert r.returncode != 0 and "NotEnoughDisk" in r.stderr
    assert f"dit_stage1: not enough disk space to train: {small}: " in r.stderr and "bytes for the final weights" in \
        r.stderr and "dit_stage1.keep_checkpoints" in r.stderr
    assert not (d / "early" / "ckpt").exists() or not list((d / "early" / "ckpt").glob("step-*"))


def test_full_disk_under_the_mlflow_store(tmpfs, monkeypatch):
    from ultraflux.tracking import ensure_store

    store = tmpfs(100_000)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}/mlflow.db")
    with pytest.raises(DiskFullError, match=rf"ENOSPC .* writing the MLflow store at {store}/mlflow.db"):
        ensure_store()
    assert not (store / "mlflow.db").exists()                       # no half-migrated database


def test_not_enough_disk_is_reported_with_path_and_bytes(tmp_path):
    from ultraflux.training.loop import check_disk_space

    with pytest.raises(NotEnoughDisk, match=rf"{tmp_path}: {10 ** 19:,} bytes for the weights; {10 ** 19:,} bytes "
                                            r"needed, [\d,]+ free there"):
        check_disk_space("vae", {tmp_path: (10 ** 19, "the weights")}, "vae_train.keep_checkpoints")


def test_a_full_disk_in_any_stage_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    """Outputs written without their own naming_disk_full block (sample images, evaluation crops, the report, download
    shards) still end the stage with one line naming the file, exit 1, no traceback; other errors still raise."""
    import ultraflux.stage as stage

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "outputs" / "samples" / "0.png"

    def full(stage_name, fn, params):
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(out))
        except OSError as e:
            raise RuntimeError("PIL could not save the image") from e
    monkeypatch.setattr(stage, "_run", full)
    assert stage.run_stage("sample", lambda p, log: {}, params_path=str(ROOT / "params.yaml")) == 1
    line = capsys.readouterr().err.strip()
    assert line == (f"[sample] ENOSPC (no space left on device) writing the sample stage outputs at {out}: free space "
                    "there and re-run (the outputs of earlier stages are kept)")

    def broken(stage_name, fn, params):
        raise OSError(errno.EACCES, "Permission denied", str(out))
    monkeypatch.setattr(stage, "_run", broken)
    with pytest.raises(PermissionError):
        stage.run_stage("sample", lambda p, log: {}, params_path=str(ROOT / "params.yaml"))

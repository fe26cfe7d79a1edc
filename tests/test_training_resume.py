"""Checkpoint / resume of the DiT trainer, for real: a training subprocess is SIGKILLed after a checkpoint appeared,
re-run, and must end with the same bytes (weights, loss curve, validation curve) as an uninterrupted run (CPU, fp32;
latents streamed from the bf16 cache through DataLoader workers, which prefetch past the checkpoint)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import ROOT
from training_fixtures import make_curated, save_vae, tiny_params
from ultraflux.training.checkpoint import Checkpointer, Fingerprint, TrainState

WORKER = ROOT / "tests" / "dit_worker.py"
ENV = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # 2 runs side by side


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    from ultraflux.config import load_params

    base = load_params(ROOT / "params.yaml")
    d = tmp_path_factory.mktemp("dit")
    make_curated(d / "curated")
    save_vae(base, d / "vae")
    return base, d


def job(d: Path, name: str, params: dict, stage="dit_stage1", **kw) -> Path:
    path = d / f"{name}.json"
    path.write_text(json.dumps({"params": params, "stage": stage, "curated": str(d / "curated"), "vae": str(d / "vae"),
                                "out": str(d / name / "out"), "ckpt": str(d / name / "ckpt"),
                                "cache": str(d / "cache"), **kw}))
    return path


def published(ckpt: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in ckpt.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))


def test_sigkill_mid_training_then_rerun_gives_identical_weights(tiny_set):
    base, d = tiny_set
    params = tiny_params(base, steps=12, batch_size=1, global_batch=2, checkpoint_every=3, keep_checkpoints=2,
                         val_every=4)
    ref = subprocess.Popen([sys.executable, str(WORKER), str(job(d, "ref", params, log=str(d / "ref.jsonl")))], env=ENV,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim_job = job(d, "victim", params, sleep=0.25)  # slowed down (numbers unchanged) so the kill lands mid-run
    victim = subprocess.Popen([sys.executable, str(WORKER), str(victim_job)], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpt = d / "victim" / "ckpt"
    deadline = time.monotonic() + 150
    while not published(ckpt) and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert victim.poll() is None, f"run ended before it could be killed:\n{victim.stdout.read()[-3000:]}"
    assert published(ckpt), "no checkpoint appeared in time"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = published(ckpt)[-1]
    assert 0 < killed_at < 12
    assert not (d / "victim" / "out" / "transformer").exists()

    # A plain re-run of the same job (no sleep: speed must not matter) resumes from the last checkpoint.
    rerun = subprocess.run([sys.executable, str(WORKER), str(job(d, "victim", params))], env=ENV,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"resumed from {ckpt}/step-{killed_at:08d} at step {killed_at}" in rerun.stdout + rerun.stderr
    out, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, out[-3000:]

    weights = "out/transformer/diffusion_pytorch_model.safetensors"
    assert (d / "ref" / weights).read_bytes() == (d / "victim" / weights).read_bytes(), "resumed weights differ"
    a, b = pd.read_csv(d / "ref/out/loss.csv"), pd.read_csv(d / "victim/out/loss.csv")
    assert list(a["step"]) == list(b["step"]) == list(range(1, 13))     # the history survives the kill too
    assert list(a["loss"]) == list(b["loss"])
    va, vb = pd.read_csv(d / "ref/out/val_loss.csv"), pd.read_csv(d / "victim/out/val_loss.csv")
    assert list(va["step"]) == [0, 4, 8, 12] and va.equals(vb)          # so does the validation curve
    assert va["val_loss"].iloc[-1] < va["val_loss"].iloc[0]             # and it measures learning
    assert published(ckpt) == [9, 12] and not list(ckpt.glob("*.tmp"))   # last K=2 kept, nothing half-written

    # What goes to MLflow each step: loss, per-subband wavelet terms, lr, throughput, peak memory (clearly named);
    # at each validation: the held-out loss per sigma and averaged, and the validation sample as an image.
    lines = [json.loads(line) for line in (d / "ref.jsonl").read_text().splitlines()]
    images = [r for r in lines if "image" in r]
    assert [(r["step"], r["image"], r["size"]) for r in images] == [(s, "val_sample_0", [256, 256])
                                                                  for s in (0, 4, 8, 12)]
    val = [r for r in lines if "val_loss" in r]
    assert [r["step"] for r in val] == [0, 4, 8, 12]
    assert all({f"val_loss_t{k}" for k in range(8)} | {"val_objective"} <= set(r) for r in val)
    assert [r["val_loss"] for r in val] == list(va["val_loss"])
    logged = [r for r in lines if "loss" in r]
    assert [r["step"] for r in logged] == list(range(1, 13))
    keys = {"loss", "loss_LL", "loss_LH", "loss_HL", "loss_HH", "lr", "samples_per_s", "peak_host_rss_gb"}
    assert all(keys <= set(r) for r in logged)
    r = logged[-1]
    assert r["lr"] == params["dit_stage1"]["lr"] and r["samples_per_s"] > 0 and 0.05 < r["peak_host_rss_gb"] < 64
    assert sum(r[f"loss_{b}"] for b in ("LL", "LH", "HL", "HH")) == pytest.approx(r["loss_ultraflux"], rel=1e-5)
    assert r["loss"] == pytest.approx(r["loss_ultraflux"], rel=1e-5)   # objective "ultraflux": the loss is the sum


def test_checkpointer_layout(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    c = Checkpointer(tmp_path / "ck", "test", keep=2, accelerator=accelerator)
    c.reconcile(Fingerprint({"lr": 1}), 10)
    for step in (1, 2, 3):
        state.step = step
        c.save(accelerator, step)
    assert [p.name for p in c.checkpoints()] == ["step-00000002", "step-00000003"]
    (tmp_path / "ck" / "step-00000004.tmp").mkdir()   # a save killed half-way
    c = Checkpointer(tmp_path / "ck", "test", keep=2, accelerator=accelerator)
    c.reconcile(Fingerprint({"lr": 1}), 10)
    assert not (tmp_path / "ck" / "step-00000004.tmp").exists()
    state.step = 0
    c.resume(accelerator, state, 10)
    assert state.step == 3                               # the registered state comes back with accelerate's load_state
    c.reconcile(Fingerprint({"lr": 2}), 10)              # another trajectory: never resumed, moved aside (kept)
    assert c.latest() is None and json.loads((tmp_path / "ck" / "fingerprint.json").read_text())["trajectory"] == \
        {"lr": 2}
    assert sorted(p.name for p in tmp_path.glob("ck.superseded-*/step-*")) == ["step-00000002", "step-00000003"]

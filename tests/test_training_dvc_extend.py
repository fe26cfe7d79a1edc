"""A real `dvc repro` of a tiny dit_stage1, then the edits a researcher makes to a finished run:

1. raise ``dit_stage1.steps`` by 50 % -> the stage resumes from the newest checkpoint and runs only the new steps;
2. change only ``val_every`` and ``checkpoint_every`` -> DVC re-runs the stage, which resumes (no step to run) and
   deletes nothing;
3. change ``lr`` (a trajectory key) -> the checkpoints are moved aside (still there) with one line naming the key;
4. put ``lr`` back -> moved aside again, trained from step 0 with the larger ``steps`` from the start: the weights of
   (1) must equal these bit for bit.

The repository's params are shrunk (few images, 2 VAE steps, 4 -> 6 DiT steps) so the test stays short.
"""
import os
import subprocess
import time

import pytest
import yaml

from test_pipeline_e2e import project_copy

pytestmark = pytest.mark.slow

WEIGHTS = "outputs/dit_stage1/transformer/diffusion_pytorch_model.safetensors"
TINY = {"data.synthetic.num_images": 32, "vae_train.steps": 2, "vae_train.eval_images": 2,
        "vae_train.checkpoint_every": 2, "validation.images": 2, "validation.prompts": [],
        "dit_stage1.steps": 4, "dit_stage1.global_batch": 1, "dit_stage1.val_every": 2, "dit_stage1.checkpoint_every": 2,
        "dit_stage1.keep_checkpoints": 2}


def set_params(repo, changes: dict) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for key, value in changes.items():
        *parents, last = key.split(".")
        node = params
        for part in parents:
            node = node[part]
        node[last] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def repro(repo, env) -> tuple[str, float]:
    t0 = time.perf_counter()
    # --no-run-cache: step 4 has the params of step 2, which DVC would otherwise restore instead of training
    proc = subprocess.run("dvc repro --no-run-cache dit_stage1", shell=True, cwd=repo, env=env, capture_output=True, text=True,
                          timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out, time.perf_counter() - t0


def test_extending_a_finished_run_resumes_and_matches_a_longer_run(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    project_copy(repo)
    set_params(repo, TINY)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "GEMINI_API_KEY", "GOOGLE_API_KEY")}
    ck = repo / "checkpoints"

    def steps(d=ck / "dit_stage1"):
        return sorted(p.name for p in d.glob("step-*"))

    out, _ = repro(repo, env)
    assert "resumed" not in out and steps() == ["step-00000002", "step-00000004"]

    # 1. +50 % steps: resumed at 4, only steps 5-6 run.
    set_params(repo, {"dit_stage1.steps": 6})
    out, extend_s = repro(repo, env)
    assert "dit_stage1: resumed from checkpoints/dit_stage1/step-00000004 at step 4" in out
    extended = (repo / WEIGHTS).read_bytes()
    loss = (repo / "outputs/dit_stage1/loss.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in loss[1:]] == [str(s) for s in range(1, 7)]   # the whole history

    # 2. validation / checkpoint cadence only: resumed, nothing moved or deleted, same weights.
    set_params(repo, {"dit_stage1.val_every": 3, "dit_stage1.checkpoint_every": 3})
    out, _ = repro(repo, env)
    assert "resumed from checkpoints/dit_stage1/step-00000006 at step 6" in out
    assert steps() == ["step-00000004", "step-00000006"] and not list(ck.glob("dit_stage1.superseded-*"))
    assert (repo / WEIGHTS).read_bytes() == extended

    # 3. a trajectory key: moved aside (kept), one line naming it.
    set_params(repo, {"dit_stage1.lr": 2e-4, "dit_stage1.steps": 1})
    out, _ = repro(repo, env)
    [line] = [x for x in out.splitlines() if "moved aside" in x]
    assert "dit_stage1.lr 0.0001 -> 0.0002" in line and "resumed" not in out
    [aside] = ck.glob("dit_stage1.superseded-*")
    assert steps(aside) == ["step-00000004", "step-00000006"]
    assert (aside / "fingerprint.json").is_file()

    # 4. back to the first lr, 6 steps from the start: the same bytes as the extended run.
    set_params(repo, {"dit_stage1.lr": 1e-4, "dit_stage1.steps": 6})
    out, scratch_s = repro(repo, env)
    assert "resumed" not in out and "dit_stage1.lr 0.0002 -> 0.0001" in out
    assert len(list(ck.glob("dit_stage1.superseded-*"))) == 2
    assert (repo / WEIGHTS).read_bytes() == extended, "resumed 4 -> 6 differs from 6 steps from the start"
    print(f"\nextend 4 -> 6 steps: {extend_s:.1f} s; 6 steps from scratch: {scratch_s:.1f} s (dvc repro wall)")

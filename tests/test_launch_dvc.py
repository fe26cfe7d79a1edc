"""A real `dvc repro` on 2 CPU processes (gloo) against 1 process, and what `dvc exp run -S launch.processes=2` reuses.

One project on the tiny profile (fewer steps, DDP for the DiT stages: DeepSpeed ZeRO-2 on CPU processes is covered by
test_training_distributed.py):
1. `dvc repro evaluate` on 1 process (curate, vae, dit_stage1, dit_stage2, sample, evaluate);
2. `dvc exp run -S launch.processes=2 evaluate`: launch.* is no science stage's param and the cmd text is fixed, so
   every stage is reused (DVC: "didn't change, skipping"); only the `params` check runs (it reads all of params.yaml);
3. `dvc repro -f -s sample`, `-s evaluate` on 2 processes from the same trained weights: byte-identical images
   (per-prompt seeds) and equal metrics;
4. `dvc repro -f -s vae`, `dit_stage1`, `dit_stage2` on 2 processes: the same manifest, the same global batches (each
   step trains on the same samples and noise), weights equal up to float summation order (gradient all-reduce of two
   halves vs one accumulated batch): the DiT's max |w2 - w1| below a tenth of one learning-rate-sized Adam update,
   the VAE's decoded pixels within 1e-4 (see vae_output_diff), every step's loss within 1e-5 relative.
"""
import io
import json
import os
import re

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from test_pipeline_e2e import project_copy, sh
from ultraflux.config import load_params

# ~3.5 min wall on a 2-core machine (load ~1.4): opt in, ULTRAFLUX_TEST_LAUNCH_DVC=1.
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not os.environ.get("ULTRAFLUX_TEST_LAUNCH_DVC"),
                                                   reason="set ULTRAFLUX_TEST_LAUNCH_DVC=1")]
WEIGHTS = {"vae": "outputs/vae/vae/diffusion_pytorch_model.safetensors",
           "dit_stage1": "outputs/dit_stage1/transformer/diffusion_pytorch_model.safetensors",
           "dit_stage2": "outputs/dit_stage2/transformer/diffusion_pytorch_model.safetensors"}
LEAN = """
launch:
  config: configs/accelerate/ddp.yaml
  main_process_port: 0
vae_train:
  steps: 6
  eval_every: 3
  checkpoint_every: 3
  num_workers: 0
latent_cache:
  num_workers: 0
dit_stage1:
  steps: 6
  checkpoint_every: 3
  val_every: 3
dit_stage2:
  steps: 4
  checkpoint_every: 2
  val_every: 2
sample:
  num_inference_steps: 2
  aspects: ["1:1", "2:1"]
"""


def snapshot(repo):
    samples = sorted((repo / "outputs/samples").rglob("*.png"))
    return {"manifest": (repo / "outputs/curated/manifest.parquet").read_bytes(),
            "samples": {str(p.relative_to(repo)): p.read_bytes() for p in samples},
            "evaluate": json.loads((repo / "outputs/results/evaluate.json").read_text()),
            "metrics": json.loads((repo / "metrics/evaluate.json").read_text()),
            **{k: load_file(repo / v) for k, v in WEIGHTS.items()}}


def max_abs_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def vae_output_diff(repo, one_state) -> float:
    """max |decode_2proc(z) - decode_1proc(z)| for a fixed latent. The VAE is compared by what it computes, not
    weight by weight: in the tiny decoder's 16-channel blocks GroupNorm has one channel per group, so the conv biases
    just before it cannot change any output and their true gradient is 0; Adam turns the float noise in that 0 into
    +-lr steps, different for any summation order (1 process vs 2)."""
    import copy

    from ultraflux.models.vae import load_vae

    two = load_vae(repo / "outputs/vae/vae").eval()
    one = copy.deepcopy(two)
    one.load_state_dict(one_state)
    z = torch.randn((1, two.config.latent_channels, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((one.decode(z).sample - two.decode(z).sample).abs().max())


def test_two_processes_reproduce_one(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    project_copy(repo)
    (repo / "lean.yaml").write_text(LEAN)
    env = {k: v for k, v in os.environ.items() if k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "MLFLOW_TRACKING_URI")}
    env["OMP_NUM_THREADS"] = "1"          # as accelerate sets for each of several processes: the same CPU kernels
    sh("ultraflux profile apply lean.yaml && git add -A && git -c user.name=t -c user.email=t@t commit -qm lean", repo)

    sh("dvc repro evaluate", repo, env)
    one = snapshot(repo)
    sh("git add -A && git -c user.name=t -c user.email=t@t commit -qm one-process", repo)

    out = sh("dvc exp run -S launch.processes=2 evaluate", repo, env)
    assert re.findall(r"Running stage '(\w+)'", out) == ["params"], out   # the params check (reads all of params.yaml)
    for stage in ("curate", "vae", "dit_stage1", "dit_stage2", "sample", "evaluate"):
        assert f"Stage '{stage}' didn't change, skipping" in out, (stage, out)

    for stage in ("sample", "evaluate"):   # 2 processes, the same trained weights
        assert "--num_processes 2" in sh(f"dvc repro -f -s {stage}", repo, env)
    two = snapshot(repo)
    assert two["samples"].keys() == one["samples"].keys() and len(one["samples"]) >= 12
    assert [p for p in one["samples"] if two["samples"][p] != one["samples"][p]] == []
    assert two["metrics"] == one["metrics"] and two["evaluate"] == one["evaluate"]

    # The 1-process checkpoints belong to another process layout: a 2-process run refuses to resume them (the global
    # batch and ZeRO shards depend on it) and says to move them aside, which is what a user would do here.
    (repo / "checkpoints").rename(repo / "checkpoints.one-process")
    table = {}
    for stage in ("vae", "dit_stage1", "dit_stage2"):
        assert "--num_processes 2" in sh(f"dvc repro -f -s {stage}", repo, env)
        result = json.loads((repo / f"outputs/results/{stage}.json").read_text())
        assert result["num_processes"] == 2, result     # accelerate ran them as one distributed group
        two = snapshot(repo)
        table[stage] = max_abs_diff(two[stage], one[stage])
    table["vae_decode"] = vae_output_diff(repo, one["vae"])
    print("max |w_2proc - w_1proc| (vae: weights, and decoded pixels in [-1, 1]):", table)
    assert two["manifest"] == one["manifest"]
    lr = {k: load_params(repo / "params.yaml")[k]["lr"] for k in ("vae_train", "dit_stage1", "dit_stage2")}
    assert table["vae_decode"] < 1e-4, table
    assert table["dit_stage1"] < 0.1 * lr["dit_stage1"] and table["dit_stage2"] < 0.1 * lr["dit_stage2"], table
    for stage in ("vae", "dit_stage1", "dit_stage2"):   # the same loss at every step, to float summation order
        a = pd.read_csv(io.StringIO(sh(f"git show HEAD:outputs/{stage}/loss.csv", repo)))["loss"]
        b = pd.read_csv(repo / f"outputs/{stage}/loss.csv")["loss"]
        assert len(a) == len(b) and ((a - b).abs() <= 1e-5 * a.abs()).all(), (stage, list(a), list(b))

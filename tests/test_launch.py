"""launch.* -> the command each machine runs, global batch layouts, layout-independent samplers, `ultraflux plan`."""
import os
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT
from ultraflux.config import apply_profile, load_params
from ultraflux.launch import head_command, machine_command
from ultraflux.training.layout import BatchLayoutError, batch_layout
from ultraflux.training.sampler import BucketBatchSampler
from ultraflux.training.vae import CropSampler

ONE = {"processes": 1, "config": "configs/accelerate/deepspeed_zero2.yaml",
       "data_parallel_config": "configs/accelerate/ddp.yaml", "prefix": "", "num_machines": 1, "machine_rank_env": "",
       "main_process_ip": "", "main_process_port": 29500, "rdzv_backend": "static"}


@pytest.mark.parametrize("global_batch, max_micro, n, expected", [
    (2, 1, 1, (1, 2)), (2, 1, 2, (1, 1)), (4, 4, 1, (4, 1)), (4, 4, 2, (2, 1)),   # the embedded profile, 1 and 2 procs
    (64, 1, 8, (1, 8)), (64, 1, 16, (1, 4)), (384, 48, 8, (48, 1)), (384, 48, 16, (24, 1)), (12, 5, 2, (3, 2))])
def test_batch_layout(global_batch, max_micro, n, expected):
    micro, accum = batch_layout(global_batch, max_micro, n)
    assert (micro, accum) == expected and micro <= max_micro and micro * n * accum == global_batch


def test_batch_layout_refuses_naming_the_three_numbers():
    with pytest.raises(BatchLayoutError) as e:
        batch_layout(64, 1, 6, "dit_stage1")
    assert all(s in str(e.value) for s in ("dit_stage1", "global_batch 64", "6 processes", "batch_size 1"))


def test_commands():
    assert machine_command("vae", ONE, {}, "python") == ["python", "stages/vae.py"]
    two = {**ONE, "processes": 2}
    dit = machine_command("dit_stage2", two, {}, "python")
    assert dit[:5] == ["python", "-m", "accelerate.commands.launch", "--config_file", ONE["config"]]
    assert dit[dit.index("--num_processes") + 1] == "2" and dit[-2:] == ["stages/dit.py", "dit_stage2"]
    assert machine_command("sample", two, {}, "python")[4] == ONE["data_parallel_config"]
    nodes = {**two, "num_machines": 2, "machine_rank_env": "SLURM_NODEID", "main_process_ip": "$MASTER_ADDR",
             "prefix": "srun --nodes=$SLURM_NNODES --ntasks-per-node=1"}
    env = {"SLURM_NODEID": "1", "MASTER_ADDR": "10.0.0.7", "SLURM_NNODES": "2"}
    import os

    os.environ.update(MASTER_ADDR="10.0.0.7", SLURM_NNODES="2")   # expandvars reads the process environment
    cmd = machine_command("dit_stage1", nodes, env, "python")
    for flag, value in (("--num_processes", "4"), ("--num_machines", "2"), ("--machine_rank", "1"),
                        ("--main_process_ip", "10.0.0.7"), ("--deepspeed_multinode_launcher", "standard")):
        assert cmd[cmd.index(flag) + 1] == value, (flag, cmd)
    assert head_command("vae", nodes, env, "python") == ["srun", "--nodes=2", "--ntasks-per-node=1", "python", "-m",
                                                          "ultraflux.launch", "--on-machine", "vae"]
    shown = machine_command("dit_stage1", nodes, None, "python")   # plan: variables as written
    assert shown[shown.index("--machine_rank") + 1] == "$SLURM_NODEID"


def test_samplers_give_a_step_the_same_samples_whatever_the_layout():
    buckets = ["a"] * 7 + ["b"] * 5 + ["c"] * 4
    for micro, world, accum in ((1, 2, 2), (2, 1, 2), (1, 4, 1), (4, 1, 1)):   # global batch 4
        ref = BucketBatchSampler(buckets, 4, seed=3)
        ranks = [BucketBatchSampler(buckets, micro, 3, r, world, accum) for r in range(world)]
        for step in range(9):
            got = sorted(i for s in ranks for m in range(accum) for i in s.batch(step * accum + m))
            assert got == sorted(ref.batch(step)), (micro, world, accum, step)
    sizes = [(64, 64), (128, 64), (96, 200)]
    ref = CropSampler(sizes, 4, 48, seed=0)
    for micro, world, accum in ((2, 2, 1), (1, 2, 2), (2, 1, 2)):
        ranks = [CropSampler(sizes, micro, 48, 0, r, world, accum) for r in range(world)]
        for step in range(5):
            got = [(m * world + r, ranks[r].batch(step * accum + m), ranks[r].noise(step * accum + m, (2, 3, 3)))
                   for m in range(accum) for r in range(world)]
            got.sort(key=lambda x: x[0])
            assert [c for _, b, _ in got for c in b] == ref.batch(step)
            import torch

            assert torch.equal(torch.cat([n for *_, n in got]), ref.noise(step, (2, 3, 3)))


def paper_params(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text((ROOT / "params.yaml").read_text())
    apply_profile(ROOT / "configs/paper-4k.yaml", p)
    return p


def test_plan_paper_profile(tmp_path):
    from ultraflux.config import load_validated
    from ultraflux.plan import parse_step_times, plan

    paper = load_validated(paper_params(tmp_path), check_paths=False)   # planned before data and weights are here
    text = plan(paper, 8, 1, parse_step_times(["dit_stage1=4.5"]))
    assert ("python -m accelerate.commands.launch --config_file configs/accelerate/deepspeed_zero2.yaml "
            "--num_processes 8") in text
    assert "global batch 64 = micro-batch 1 x 8 processes x 8 accumulation" in text
    assert "global batch 384 = micro-batch 48 x 8 processes x 1 accumulation" in text
    assert "30000 steps x 4.5 s (given) = 37.50 h" in text
    assert "11.901B params" in text and "GiB" in text
    nodes = plan(paper, 16, 2)
    assert "--machine_rank $SLURM_NODEID" in nodes and "--num_processes 16" in nodes
    assert "global batch 64 = micro-batch 1 x 16 processes x 4 accumulation" in nodes
    assert "REFUSED: dit_stage1: global_batch 64 cannot be split over 6 processes" in plan(paper, 6)


def test_launcher_refuses_a_layout_before_starting(tmp_path):
    params = load_params(ROOT / "params.yaml")
    params["launch"]["processes"] = 3
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(params))
    out = subprocess.run([sys.executable, "-m", "ultraflux.launch", "dit_stage1", "--params", str(p)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "global_batch 2 cannot be split over 3 processes with batch_size 1" in out.stderr


def test_params_stage_refuses_a_layout_before_any_stage_runs(tmp_path):
    """dvc.yaml's first stage checks every stage's launch, so a global batch that 3 processes cannot split stops the
    pipeline before download and curation, not when vae starts."""
    params = load_params(ROOT / "params.yaml")
    params["launch"]["processes"] = 3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = subprocess.run([sys.executable, str(ROOT / "stages" / "params.py")], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2, out.stderr
    assert "global_batch 2 cannot be split over 3 processes with batch_size 1" in out.stderr
    assert not (tmp_path / "outputs").exists()


def test_launch_is_no_stage_param_and_cmd_is_fixed():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage in ("vae", "dit_stage1", "dit_stage2", "sample", "evaluate"):
        assert spec[stage]["cmd"] == f"python -m ultraflux.launch {stage}"
        assert not any(str(p).startswith("launch") for p in spec[stage]["params"])


def test_plan_prints_the_slurm_scripts_launch_settings():
    """`ultraflux plan --nodes M` fills in the SLURM script's launch keys: the two must not drift apart."""
    import re

    from ultraflux.plan import SLURM_LAUNCH

    script = (ROOT / "scripts" / "slurm_ultraflux.sbatch").read_text()
    written = {k: v.strip('"').replace("\\$", "$") for k, v in re.findall(r"^  (\w+): (.+)$", script, re.M)}
    assert written["prefix"] == SLURM_LAUNCH["prefix"]
    assert written["machine_rank_env"] == SLURM_LAUNCH["machine_rank_env"]
    assert written["main_process_ip"] == SLURM_LAUNCH["main_process_ip"]

"""End to end: a real `dvc repro` of the whole DAG in a fresh git repository, then a real `dvc exp run`.

Checks every stage's outputs, the MLflow layout (one parent run, a child per stage that ran), that an unchanged
pipeline re-runs nothing, and that changing a dit_stage2 key re-runs only dit_stage2 and its downstream stages.
"""
import json
import os
import subprocess

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import copy_project
from ultraflux.config import load_params

ALL_STAGES = {"download", "curate", "vae", "diagnostics", "dit_stage1", "dit_stage2", "sample", "evaluate", "judge", "report"}


def sh(cmd, cwd, env=None, timeout=900):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, shell=True)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def project_copy(dst):
    copy_project(dst)
    sh("git init -q && git add -A && git -c user.name=t -c user.email=t@t commit -qm init", dst)


def stage_runs(repo, parent_id):
    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    exp = client.get_experiment_by_name("ultraflux")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    return {r.data.tags["ultraflux.stage"]: r for r in runs}


def parents(repo):
    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    exp = client.get_experiment_by_name("ultraflux")
    return client.search_runs([exp.experiment_id], filter_string="tags.`ultraflux.role` = 'parent'",
                              order_by=["attributes.start_time ASC"])


@pytest.mark.slow
def test_dvc_repro_then_exp_run(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    project_copy(repo)
    env = {k: v for k, v in os.environ.items() if k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "MLFLOW_TRACKING_URI")}

    sh("dvc repro", repo, env)
    # Outputs of every stage.
    manifest = pd.read_parquet(repo / "outputs/curated/manifest.parquet")
    assert manifest["kept"].sum() >= 4 and (~manifest["kept"]).sum() >= 1, "filters kept or rejected nothing"
    assert (manifest.loc[~manifest["kept"], "reason"] != "").all()
    assert (repo / "outputs/vae/vae/config.json").exists()
    for stage in ("dit_stage1", "dit_stage2"):
        assert (repo / f"outputs/{stage}/transformer/diffusion_pytorch_model.safetensors").exists()
    params = load_params(repo / "params.yaml")
    for stage in ("dit_stage1", "dit_stage2"):  # trained weights carry the RoPE they were trained with
        saved = json.loads((repo / f"outputs/{stage}/transformer/ultraflux.json").read_text())["rope"]
        assert saved == {k: params["rope"][k] for k in saved} and saved["train_len"] == params["rope"]["train_len"]
    n_prompts, aspects = len(params["sample"]["prompts"]), params["sample"]["aspects"]
    assert len(list((repo / "outputs/samples/dit_stage2").glob("*/*.png"))) == n_prompts * len(aspects)
    evaluate = json.loads((repo / "outputs/results/evaluate.json").read_text())
    assert set(evaluate["generation"]) == {a.replace(":", "x") for a in aspects}
    assert evaluate["vae"]["psnr"] > 0 and evaluate["generation"]["1x1"]["fid"].startswith("not computed")
    judge = json.loads((repo / "outputs/results/judge.json").read_text())
    assert judge["status"] == "skipped (no GEMINI_API_KEY)" and judge.get("wins_a", 0) == 0
    # DVC metrics: a few dozen numbers, no strings (descriptive values live in outputs/results and MLflow tags)
    shown = json.loads(sh("dvc metrics show --json", repo, env))

    def leaves(x):
        return [v for y in x.values() for v in leaves(y)] if isinstance(x, dict) else [x]
    values = leaves(shown)
    assert 10 <= len(values) <= 40 and all(isinstance(v, (int, float)) for v in values), values
    report = (repo / "outputs/report/report.html").read_text()
    assert "data:image/png;base64" in report and "Gemini pairwise preference" in report
    assert "Weights: raw (sample.weights); transformer memory mode: none (sample.memory)" in report

    # MLflow: one parent run, a child per stage.
    [first] = parents(repo)
    assert set(stage_runs(repo, first.info.run_id)) == ALL_STAGES
    assert all(r.info.status == "FINISHED" for r in stage_runs(repo, first.info.run_id).values())
    assert first.data.tags["git_commit"] != "unknown"
    assert "loss" in stage_runs(repo, first.info.run_id)["dit_stage1"].data.metrics
    # the parent carries every stage's headline numbers and all params (MLflow's Compare view of executions)
    assert {"curate.num_kept", "vae.holdout_psnr", "dit_stage1.final_loss", "evaluate.vae.psnr"} <= \
        set(first.data.metrics)
    assert first.data.params["dit_stage1.lr"] == str(load_params(repo / "params.yaml")["dit_stage1"]["lr"])
    # training and curation runs name the curated manifest as their dataset
    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    dit = client.get_run(stage_runs(repo, first.info.run_id)["dit_stage1"].info.run_id)
    [inp] = dit.inputs.dataset_inputs
    assert inp.dataset.name == "curated" and {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "training"

    # Nothing changed: nothing re-runs, no new MLflow runs.
    out = sh("dvc repro", repo, env)
    assert "Running stage" not in out
    assert len(parents(repo)) == 1

    # A dit_stage2 key: only dit_stage2 and its downstream stages re-run.
    sh("git add -A && git -c user.name=t -c user.email=t@t commit -qm baseline", repo)
    new_steps = params["dit_stage2"]["steps"] + 2
    sh(f"dvc exp run -S dit_stage2.steps={new_steps}", repo, env)
    runs = parents(repo)
    assert len(runs) == 2
    second = runs[-1]
    assert second.data.tags.get("dvc_exp_name"), "exp run not tagged with its DVC experiment name"
    assert set(stage_runs(repo, second.info.run_id)) == {"dit_stage2", "sample", "evaluate", "judge", "report"}
    assert json.loads((repo / "outputs/results/dit_stage2.json").read_text())["steps"] == new_steps
    shown = sh("dvc exp show --json", repo, env)
    assert "final_loss" in shown

    # A typo in params.yaml after a full run: refused by the `params` stage before DVC removes any output.
    good = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(good.replace("  entropy_min:", "  entropy_minn:"))
    proc = subprocess.run("dvc repro", cwd=repo, env=env, capture_output=True, text=True, shell=True, timeout=600)
    assert proc.returncode != 0 and "curate.entropy_minn" in proc.stderr, proc.stderr[-3000:]
    assert "Running stage 'curate'" not in proc.stdout
    assert (repo / "outputs/curated/manifest.parquet").is_file() and (repo / "outputs/vae/vae").is_dir()
    (repo / "params.yaml").write_text(good)
    status = sh("dvc status", repo, env)
    assert "deleted" not in status and "not in cache" not in status, status

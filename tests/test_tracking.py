"""MLflow store resolution and the parent/child run layout, against a real sqlite store."""
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ultraflux import tracking


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    return tmp_path


def test_store_follows_dvc_root(store):
    assert tracking.tracking_uri() == f"sqlite:///{store}/mlflow.db"


def test_one_parent_with_a_child_per_stage(store, params, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "exp-test")
    with tracking.stage_run("curate", params, {"seed": 0}) as log:
        log.log_metrics({"num_kept": 7, "note": "strings are not metrics"}, step=1)
    with tracking.stage_run("vae", params, {"vae_train.steps": 12}) as log:
        log.log_metrics({"loss": 0.5}, step=1)
    with pytest.raises(RuntimeError):
        with tracking.stage_run("dit_stage1", params):
            raise RuntimeError("boom")
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    exp = client.get_experiment_by_name(params["tracking"]["experiment"])
    assert exp.artifact_location.endswith("mlartifacts")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.tags["dvc_exp_name"] == "exp-test" and parent.info.run_name == "exp-test"
    assert parent.data.params["dit_stage1.lr"] == str(params["dit_stage1"]["lr"])
    assert {c.data.tags["ultraflux.stage"]: c.info.status for c in children} == \
        {"curate": "FINISHED", "vae": "FINISHED", "dit_stage1": "FAILED"}
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    curate = next(c for c in children if c.data.tags["ultraflux.stage"] == "curate")
    assert curate.data.metrics["num_kept"] == 7 and "note" not in curate.data.metrics
    assert curate.data.params == {"seed": "0"}
    assert "wall_time_s" in curate.data.metrics


def test_experiment_opens_on_runs_and_parent_carries_headline_metrics(store, params, tmp_path):
    manifest = tmp_path / "manifest.parquet"
    manifest.write_bytes(b"PAR1 not really a manifest")
    with tracking.stage_run("dit_stage1", params) as log:
        log.log_summary({"dit_stage1.final_loss": 0.25, "dit_stage1.final_val_loss": 0.5})
        log.log_dataset(manifest, "ab" * 32, context="training", rows=12)
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    exp = client.get_experiment_by_name(params["tracking"]["experiment"])
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    [parent] = client.search_runs([exp.experiment_id], filter_string="tags.`ultraflux.role` = 'parent'")
    assert parent.data.metrics == {"dit_stage1.final_loss": 0.25, "dit_stage1.final_val_loss": 0.5}
    [child] = client.search_runs([exp.experiment_id], filter_string="tags.`ultraflux.role` = 'stage'")
    for run in (parent, child):
        [inp] = client.get_run(run.info.run_id).inputs.dataset_inputs
        assert inp.dataset.name == "curated" and inp.dataset.digest == ("ab" * 32)[:36]
        assert manifest.name in inp.dataset.source
        assert {t.key: t.value for t in inp.tags} == {"mlflow.data.context": "training", "rows": "12"}


def test_runs_of_a_killed_process_are_marked_killed(store, params):
    """A run left RUNNING by a process that no longer exists (SIGKILL) is KILLED when the next stage starts."""
    import subprocess
    import sys

    code = ("import os, signal, sys; from ultraflux import tracking; import yaml\n"
            "params = yaml.safe_load(open(sys.argv[1]))\n"
            "with tracking.stage_run('vae', params) as log:\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    from conftest import ROOT

    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "params.yaml")], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    exp = client.get_experiment_by_name(params["tracking"]["experiment"])
    stale = client.search_runs([exp.experiment_id])
    assert {r.info.status for r in stale} == {"RUNNING"} and len(stale) == 2   # its parent and its stage run
    with tracking.stage_run("curate", params):
        pass
    status = {r.info.run_id: r.info.status for r in client.search_runs([exp.experiment_id])}
    assert all(status[r.info.run_id] == "KILLED" for r in stale)
    assert sorted(status.values()) == ["FINISHED", "FINISHED", "KILLED", "KILLED"]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the clock step is simulated through Linux's /proc")
def test_a_clock_step_keeps_one_execution_and_its_live_runs(store, params, monkeypatch):
    """The system clock steps 30 s between two stages of one execution (NTP, a VM's clock sync). psutil's
    create_time() follows it; the execution key must not: one parent run, and the live run is not taken for killed."""
    import psutil
    import psutil._pslinux

    with tracking.stage_run("curate", params):
        pass
    key = tracking.execution_key()
    before = psutil.Process().create_time()
    stepped = psutil._pslinux.boot_time() + 30
    monkeypatch.setattr(psutil._pslinux, "boot_time", lambda: stepped)
    assert psutil.Process().create_time() == pytest.approx(before + 30)   # the step reaches psutil
    assert tracking.execution_key() == key and tracking._process_alive(key) is True
    with tracking.stage_run("vae", params):
        pass
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    exp = client.get_experiment_by_name(params["tracking"]["experiment"])
    runs = client.search_runs([exp.experiment_id])
    assert sum("mlflow.parentRunId" not in r.data.tags for r in runs) == 1 and len(runs) == 3
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_parallel_first_use_of_a_new_store(store, params):
    """Four processes open a store that does not exist yet, at the same moment: all succeed (the schema is created
    once, under the file lock), and the store is in WAL mode."""
    import sqlite3
    import subprocess
    import sys

    from conftest import ROOT

    code = ("import sys, time, yaml; from ultraflux import tracking\n"
            "params = yaml.safe_load(open(sys.argv[1]))\n"
            "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
            "with tracking.stage_run('curate', params) as log:\n"
            "    log.log_metrics({'x': 1.0})\n")
    import time

    start = str(time.time() + 3.0)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(ROOT / "params.yaml"), start],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [o[1][-2000:] for o in outs]
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    exp = client.get_experiment_by_name(params["tracking"]["experiment"])
    assert len(client.search_runs([exp.experiment_id], filter_string="tags.`ultraflux.role` = 'stage'")) == 4
    with sqlite3.connect(store / "mlflow.db") as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

"""MLflow store resolution and the parent/child run layout, against a real sqlite store."""
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

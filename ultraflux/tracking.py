"""MLflow tracking: one local store per repository, one parent run per pipeline execution, a child run per stage.

The store is ``sqlite:///<repo root>/mlflow.db`` with artifacts in ``<repo root>/mlartifacts``. The repo root is DVC's
``DVC_ROOT`` (set by DVC for every stage; for ``dvc exp run --queue/--temp`` it points at the parent repository, not the
temporary copy), else the git top level, else the working directory. ``MLFLOW_TRACKING_URI`` overrides it.

A *pipeline execution* is one ``dvc repro`` / ``dvc exp run`` process: stages run as child processes of it, so the
key ``<host>:<dvc pid>:<dvc start time>`` (plus ``DVC_EXP_NAME``) identifies it. The first stage of an execution
creates the parent run (tagged with it, the git commit and the experiment name); later stages attach to it.
Outside DVC each stage gets a parent of its own.
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import psutil

EXECUTION_TAG = "ultraflux.execution"
STAGE_TAG = "ultraflux.stage"
ROLE_TAG = "ultraflux.role"  # "parent" (one pipeline execution) | "stage"


def repo_root() -> Path:
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True)
        return Path(out.stdout.strip()).resolve()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return Path.cwd().resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def execution_key() -> str:
    """Identify the enclosing dvc process (see module docstring); falls back to this process."""
    proc = psutil.Process()
    for p in [proc, *proc.parents()]:
        try:
            cmd = p.cmdline()
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
        if any(Path(c).name == "dvc" for c in cmd[:2]) or cmd[1:3] == ["-m", "dvc"]:
            proc = p
            break
    key = f"{socket.gethostname()}:{proc.pid}:{int(proc.create_time())}"
    exp = os.environ.get("DVC_EXP_NAME")
    return f"{key}:{exp}" if exp else key


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def run_tags(params: dict) -> dict[str, str]:
    """Tags that make runs comparable in the UI: code version, experiment name and the co-design axes."""
    tags = {
        "git_commit": git_commit(),
        "data.variant": str(params.get("data", {}).get("variant")),
        "objective": str(params.get("objective")),
        "rope.kind": str(params.get("rope", {}).get("kind")),
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    from ultraflux.ablation import ablation_tags  # ablation=co-design, variant=A..D for experiments co-design-<L>

    tags.update(ablation_tags(params, os.environ.get("DVC_EXP_NAME")))
    for item in filter(None, os.environ.get("ULTRAFLUX_RUN_TAGS", "").split(",")):
        k, _, v = item.partition("=")
        tags[k.strip()] = v.strip()
    return tags


class StageLogger:
    """What a stage logs through: thin over MlflowClient so library code needs no global MLflow state."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        ts = int(time.time() * 1000)
        from mlflow.entities import Metric

        batch = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_image(self, image, key: str, step: int = 0) -> None:
        """A PIL image (or HxWx3 uint8 array) as an MLflow image series ``key`` at ``step`` (the UI's image slider)."""
        self.client.log_image(self.run_id, image, key=key, step=int(step), synchronous=True)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)


class NullLogger(StageLogger):
    """Used by library functions called outside a stage (tests, notebooks)."""

    def __init__(self):
        super().__init__(None, "")

    def log_metrics(self, metrics, step=None): ...
    def log_params(self, params): ...
    def set_tags(self, tags): ...
    def log_image(self, image, key, step=0): ...
    def log_artifact(self, path, artifact_path=None): ...


def _experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifacts = (repo_root() / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifacts)
    except Exception:  # created concurrently by another stage process
        return client.get_experiment_by_name(name).experiment_id


@contextmanager
def stage_run(stage: str, params: dict, stage_params: dict | None = None) -> Iterator[StageLogger]:
    """Open the child run of ``stage`` under this execution's parent run; closes both with the right status."""
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    client = MlflowClient(tracking_uri())
    exp_id = _experiment_id(client, params.get("tracking", {}).get("experiment", "ultraflux"))
    key = execution_key()
    tags = run_tags(params)
    found = client.search_runs([exp_id], max_results=1,
                               filter_string=f"tags.`{EXECUTION_TAG}` = '{key}' and tags.`{ROLE_TAG}` = 'parent'")
    if found:
        parent_id = found[0].info.run_id
    else:
        name = tags.get("dvc_exp_name") or time.strftime("repro-%Y%m%d-%H%M%S")
        parent = client.create_run(exp_id, run_name=name, tags={**tags, EXECUTION_TAG: key, ROLE_TAG: "parent",
                                                               MLFLOW_RUN_NAME: name})
        parent_id = parent.info.run_id
        StageLogger(client, parent_id).log_params(params)
    client.update_run(parent_id, status="RUNNING")
    child = client.create_run(exp_id, run_name=stage, tags={**tags, MLFLOW_PARENT_RUN_ID: parent_id,
                                                              STAGE_TAG: stage, EXECUTION_TAG: key, ROLE_TAG: "stage"})
    logger = StageLogger(client, child.info.run_id)
    if stage_params:
        logger.log_params(stage_params)
    t0 = time.time()
    status = "FAILED"
    try:
        yield logger
        status = "FINISHED"
    finally:
        logger.log_metrics({"wall_time_s": time.time() - t0})
        client.set_terminated(child.info.run_id, status=status)
        client.set_terminated(parent_id, status=status)

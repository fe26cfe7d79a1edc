"""MLflow tracking: one local store per repository, one parent run per pipeline execution, a child run per stage.

The store is ``sqlite:///<repo root>/mlflow.db`` with artifacts in ``<repo root>/mlartifacts``. The repo root is DVC's
``DVC_ROOT`` (set by DVC for every stage; for ``dvc exp run --queue/--temp`` it points at the parent repository, not the
temporary copy), else the git top level, else the working directory. ``MLFLOW_TRACKING_URI`` overrides it.

A *pipeline execution* is one ``dvc repro`` / ``dvc exp run`` process: stages run as child processes of it, so the
key ``<host>:<dvc pid>:<dvc start>`` (plus ``DVC_EXP_NAME``) identifies it. The first stage of an execution
creates the parent run (tagged with it, the git commit and the experiment name); later stages attach to it.
Outside DVC each stage gets a parent of its own.

Parallel writers (``dvc exp run`` queue workers with ``-j 2``, several stages at once) share the store: it is created
or upgraded once, under a file lock (:func:`ensure_store`), in WAL mode. A run left RUNNING by a killed process (same
host, process gone) is marked KILLED the next time a stage starts. Each stage also logs its headline numbers onto
the parent run (``<stage>.<metric>``), so MLflow's Compare view of pipeline executions shows them side by side.

A full disk: a new store is created and migrated in a temporary file beside ``mlflow.db`` and renamed into place, so a
failed creation leaves no half-migrated database; ENOSPC while creating or writing the store is one ``DiskFullError``
naming its path. A stage whose work fails ends its run FAILED with the reason as the ``ultraflux.error`` tag.
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import psutil
from filelock import FileLock

from ultraflux.io import DiskFullError, atomic_path, naming_disk_full

ERROR_TAG = "ultraflux.error"   # why a stage run ended FAILED
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


def ensure_store(uri: str | None = None) -> str:
    """Create or upgrade a sqlite store once, under a file lock; other processes wait, then find it ready.

    Two processes opening a new store at once both run MLflow's schema migrations and one fails ("duplicate column
    name"); the lock serialises that first open. WAL lets readers proceed while one process writes."""
    import sqlite3

    from mlflow.tracking import MlflowClient

    uri = uri or tracking_uri()
    if not uri.startswith("sqlite:///"):
        return uri
    db = store_path(uri)
    with naming_disk_full(db, "the MLflow store"):
        db.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{db}.lock", timeout=600):
            if not db.exists():
                _create_store(db)
            MlflowClient(uri).search_experiments(max_results=1)   # migrates the tables of an older store
            with sqlite3.connect(db, timeout=60) as con:
                con.execute("PRAGMA journal_mode=WAL")
    return uri


def store_path(uri: str) -> Path:
    """The database file of a ``sqlite:///`` tracking URI."""
    return Path(uri[len("sqlite:///"):])


def _create_store(db: Path) -> None:
    """A fresh, fully migrated store at ``db``: built in a temporary beside it, then renamed (never half-made)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    with atomic_path(db) as tmp:
        store = SqlAlchemyStore(f"sqlite:///{tmp}", (db.parent / "mlartifacts").as_uri())
        store.engine.dispose()   # rollback-journal mode: everything is in the file before the rename


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def _started(proc: psutil.Process) -> int:
    """When ``proc`` started, as a number that never changes while it runs. psutil's ``create_time()`` is the boot
    time plus the start offset, and the boot time follows every step of the system clock (NTP, a VM's clock sync):
    one process, keyed twice, got two keys 30 s apart. On Linux the offset alone (clock ticks since boot, field 22
    of ``/proc/<pid>/stat``) is stable; elsewhere the creation time."""
    try:
        with open(f"/proc/{proc.pid}/stat", "rb") as fh:
            return int(fh.read().rsplit(b")", 1)[1].split()[19])
    except OSError:
        return int(proc.create_time())


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
    key = f"{socket.gethostname()}:{proc.pid}:{_started(proc)}"
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
        "data.variant": str(params["data"]["variant"]),
        "objective": str(params["objective"]),
        "rope.kind": str(params["rope"]["kind"]),
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    from ultraflux.codesign import ablation_tags  # ablation=co-design, variant=A..D for co-design-<L>

    tags.update(ablation_tags(params, os.environ.get("DVC_EXP_NAME")))
    for item in filter(None, os.environ.get("ULTRAFLUX_RUN_TAGS", "").split(",")):
        k, _, v = item.partition("=")
        tags[k.strip()] = v.strip()
    return tags


class StageLogger:
    """What a stage logs through: thin over MlflowClient so library code needs no global MLflow state."""

    def __init__(self, client, run_id: str, parent_id: str | None = None):
        self.client, self.run_id, self.parent_id = client, run_id, parent_id

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        ts = int(time.time() * 1000)
        from mlflow.entities import Metric

        batch = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_summary(self, metrics: dict[str, Any]) -> None:
        """Headline numbers onto the pipeline's parent run (what MLflow's Compare view of executions shows)."""
        if self.parent_id:
            StageLogger(self.client, self.parent_id).log_metrics(metrics)

    def log_dataset(self, path: str | os.PathLike, digest: str, name: str = "curated", context: str = "training",
                    rows: int | None = None) -> None:
        """Record a dataset file (e.g. the curated manifest) as an MLflow dataset input of this run and its parent.

        Metadata only (source path, digest, row count): nothing is loaded or copied."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        with warnings.catch_warnings():  # MLflow registers its local-file source class twice and says so
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(Path(path).resolve().as_uri())
        dataset = MetaDataset(source, name=name, digest=digest[:36])._to_mlflow_entity()
        tags = [InputTag(MLFLOW_DATASET_CONTEXT, context)] + ([InputTag("rows", str(rows))] if rows is not None else [])
        for run_id in filter(None, (self.run_id, self.parent_id)):
            self.client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags)])

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
    def log_summary(self, metrics): ...
    def log_dataset(self, path, digest, name="curated", context="training", rows=None): ...
    def log_image(self, image, key, step=0): ...
    def log_artifact(self, path, artifact_path=None): ...


# A classic ML experiment: MLflow's UI then opens it on the runs table, not on the GenAI traces page.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        artifacts = (repo_root() / "mlartifacts").as_uri()
        try:
            return client.create_experiment(name, artifact_location=artifacts, tags=EXPERIMENT_KIND)
        except Exception:  # created concurrently by another stage process
            exp = client.get_experiment_by_name(name)
    if exp.tags.get("mlflow.experimentKind") != EXPERIMENT_KIND["mlflow.experimentKind"]:
        client.set_experiment_tag(exp.experiment_id, "mlflow.experimentKind", EXPERIMENT_KIND["mlflow.experimentKind"])
    return exp.experiment_id


def _process_alive(key: str) -> bool | None:
    """Is the process of an execution key (``host:pid:start[:exp]``) still running? None: another host."""
    host, pid, started = (key.split(":") + ["", "", ""])[:3]
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        return _started(psutil.Process(int(pid))) == int(started)
    except (psutil.NoSuchProcess, ValueError):
        return False


def mark_killed(client, exp_id: str) -> list[str]:
    """Runs left RUNNING by a process of this host that no longer exists -> KILLED. Returns their ids."""
    killed = []
    for run in client.search_runs([exp_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        key = run.data.tags.get(EXECUTION_TAG, "")
        if key and _process_alive(key) is False:
            client.set_terminated(run.info.run_id, status="KILLED")
            killed.append(run.info.run_id)
    return killed


@contextmanager
def stage_run(stage: str, params: dict, stage_params: dict | None = None) -> Iterator[StageLogger]:
    """Open the child run of ``stage`` under this execution's parent run; closes both with the right status."""
    uri = ensure_store()
    with _naming_full_store(uri):
        with _open_stage_run(uri, stage, params, stage_params) as logger:
            yield logger


@contextmanager
def _naming_full_store(uri: str) -> Iterator[None]:
    """SQLite's "database or disk is full" anywhere in the block -> one ``DiskFullError`` naming the store."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        chain, seen = [], e
        while seen is not None and len(chain) < 10:
            chain.append(str(seen).lower())
            seen = seen.__cause__ or seen.__context__
        if any("database or disk is full" in text for text in chain):
            raise DiskFullError(store_path(uri) if uri.startswith("sqlite:///") else uri, "the MLflow store") from e
        raise


@contextmanager
def _open_stage_run(uri: str, stage: str, params: dict, stage_params: dict | None) -> Iterator[StageLogger]:
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    client = MlflowClient(uri)
    exp_id = experiment_id(client, params["tracking"]["experiment"])
    mark_killed(client, exp_id)
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
    logger = StageLogger(client, child.info.run_id, parent_id)
    if stage_params:
        logger.log_params(stage_params)
    t0 = time.monotonic()
    try:
        yield logger
    except BaseException as e:
        _close(client, child.info.run_id, parent_id, "FAILED", time.monotonic() - t0, f"{type(e).__name__}: {e}")
        raise
    _close(client, child.info.run_id, parent_id, "FINISHED", time.monotonic() - t0)


def _close(client, run_id: str, parent_id: str, status: str, wall_s: float, error: str | None = None) -> None:
    """End the stage run and its parent; on a failure the original error wins over one while recording it."""
    calls = [lambda: client.set_tag(run_id, ERROR_TAG, error[:5000])] if error else []
    calls += [lambda: StageLogger(client, run_id).log_metrics({"wall_time_s": wall_s}),
              lambda: client.set_terminated(run_id, status=status),
              lambda: client.set_terminated(parent_id, status=status)]
    for call in calls:
        try:
            call()
        except Exception:
            if not error:
                raise

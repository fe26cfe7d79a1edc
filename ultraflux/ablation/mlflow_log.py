"""The ablation in MLflow: each cell's parent run completed (or created), and one summary run with the table.

A cell's parent run is the pipeline execution of its DVC experiment (``ultraflux.tracking``); its stages already
logged their headline numbers onto it as ``<stage>.<metric>``. A stage restored from DVC's run cache logs nothing,
so the same names are logged here from the cell's DVC metrics: every parent then carries the whole Table 1 row and
MLflow's Compare view of the four parents shows it side by side. A cell in which no stage ran at all (everything
restored, or failed before its first stage) gets a parent run created here.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from ultraflux import tracking
from ultraflux.codesign import ABLATION_TAG, CELLS, PREFIX
from ultraflux.ablation.table import _num, eval_set_check


def _parent_of(client, exp_id: str, name: str, commit: str, t_start: float):
    """The parent run of a cell: the one its stages opened during this invocation; else (every stage restored from
    the run cache) the latest parent of the same experiment name on the same commit, which is reused so that a re-run
    adds no empty parents; None when there is neither."""
    base = f"tags.dvc_exp_name = '{name}' and tags.`{tracking.ROLE_TAG}` = 'parent'"
    for extra in (f" and attributes.start_time >= {int(t_start * 1000)}", f" and tags.git_commit = '{commit}'"):
        found = client.search_runs([exp_id], filter_string=base + extra, order_by=["attributes.start_time DESC"],
                                   max_results=1)
        if found:
            return found[0]
    return None


def log_to_mlflow(repo: Path, results: dict[str, dict], rows: list[dict], paths: dict[str, Path], t_start: float,
                  experiment: str, invocation: str) -> dict[str, str]:
    """Complete (or create) each cell's parent run and log the summary run; returns {letter: parent run id}."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    os.environ.setdefault("DVC_ROOT", str(repo))
    client = MlflowClient(tracking.ensure_store())
    exp_id = tracking.experiment_id(client, experiment)
    run_ids: dict[str, str] = {}
    ts = int(time.time() * 1000)
    for row in rows:
        L = row["variant"]
        res = results[L]
        name = res["exp_name"]
        found = _parent_of(client, exp_id, name, res.get("git_commit", ""), t_start)
        tags = {"ablation": ABLATION_TAG, "variant": L, "dvc_exp_name": name, "git_commit": res.get("git_commit", ""),
                "dvc_exp_rev": res.get("exp_rev", ""), "data.manifest_sha256": res.get("manifest_sha256", ""),
                "data.eval_set_sha256": res.get("eval_set_sha256", ""),
                "ablation.status": res["status"], "ablation.reason": res.get("reason", "")[:4000],
                "ablation.invocation": invocation, "data.variant": CELLS[L][0], "ablation.model": CELLS[L][1]}
        if found:
            run_id = found.info.run_id
            if res["status"] == "interrupted" and found.info.status == "RUNNING":
                client.set_terminated(run_id, status="KILLED")
        else:
            run = client.create_run(exp_id, run_name=name, tags={tracking.ROLE_TAG: "parent", MLFLOW_RUN_NAME: name,
                                                                 "ultraflux.restored": "run-cache"
                                                                 if res["status"] == "success" else "none"})
            run_id = run.info.run_id
            if res.get("params"):
                tracking.StageLogger(client, run_id).log_params(res["params"])
            client.set_terminated(run_id, status="FINISHED" if res["status"] == "success" else "FAILED")
        for k, v in tags.items():
            client.set_tag(run_id, k, str(v))
        metrics = [Metric(k, v, ts, 0) for k, v in tracking.flatten(res.get("metrics") or {}).items()
                   if _num(v) is not None]
        if metrics:
            client.log_batch(run_id, metrics=metrics)
        run_ids[L] = run_id
    summary = client.create_run(exp_id, run_name=f"{PREFIX}-summary", tags={
        "ablation": ABLATION_TAG, tracking.ROLE_TAG: "summary", "ablation.invocation": invocation,
        "git_commit": next((r.get("git_commit") for r in results.values()), ""),
        MLFLOW_RUN_NAME: f"{PREFIX}-summary", "ablation.same_eval_set": str(eval_set_check(rows)[0]).lower(),
        **{f"ablation.status.{L}": r["status"] for L, r in results.items()},
        **{f"ablation.run.{L}": rid for L, rid in run_ids.items()}})
    sid = summary.info.run_id
    client.log_batch(sid, params=[Param(f"exp_name.{L}", r["exp_name"]) for L, r in results.items()])
    batch = [Metric(f"{row['variant']}.{k}", v, ts, 0) for row in rows for k, v in row.items()
             if _num(v) is not None]
    for i in range(0, len(batch), 500):
        client.log_batch(sid, metrics=batch[i:i + 500])
    for p in paths.values():
        client.log_artifact(sid, str(p))
    if (paths["csv"].parent / "logs").is_dir():
        client.log_artifacts(sid, str(paths["csv"].parent / "logs"), "logs")
    failed = any(r["status"] != "success" for r in results.values())
    client.set_terminated(sid, status="FAILED" if failed else "FINISHED")
    run_ids["summary"] = sid
    return run_ids
